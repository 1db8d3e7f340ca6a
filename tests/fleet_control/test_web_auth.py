"""Who may use the fleet's REST API and dashboard: every documented operation refuses a
request without a token; roles; cross-site forms and text/plain posts; DNS rebinding;
revoked, expired and forged tokens; the audit log names the token; HTTPS and mutual TLS."""

from __future__ import annotations

import re
import ssl
import subprocess

import pytest

from edgeship.fleet.auth import Role, TokenStore
from edgeship.fleet.pki import CertificateAuthority
from edgeship.fleet.web.openapi import openapi
from edgeship.fleet.web.server import WebSettings
from tests.fleet_control.web import start_web, stop_web


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    fleet = start_web(tmp_path_factory.mktemp("web") / "fleet.db")
    fleet.registry.upsert_presence("pi-1", {"online": True, "models": {"m": {"version": 1}}})
    fleet.registry.add_release("m", 2, 1.0, "test")
    yield fleet
    stop_web(fleet)


def _operations():
    for path, item in openapi()["paths"].items():
        for method, op in item.items():
            concrete = re.sub(r"\{[^}]+\}", "x", path)
            yield method.upper(), concrete, op


def test_every_documented_operation_refuses_a_request_without_a_valid_token(web):
    ops = list(_operations())
    assert len(ops) >= 15
    for method, path, op in ops:
        body = {} if method == "POST" else None
        for token in (None, "esf_000000000000_" + "A" * 43, "not-a-token"):
            reply = web.call(method, path, token=token, body=body)
            assert reply.status == 401, (method, path, token, reply.body)
            assert "error" in reply.json() and reply.headers["www-authenticate"].startswith(
                "Bearer")
        assert op["x-required-role"] in ("read", "operate", "admin")
    for path in ("/openapi.json", "/metrics"):
        assert web.call("GET", path).status == 401
    assert web.registry.rollouts() == [] and web.registry.devices()[0].tags == ()


def test_the_openapi_document_declares_the_schemes(web):
    spec = web.call("GET", "/openapi.json", token=web.tokens["read"]).json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["token"] == {**schemes["token"], "type": "http", "scheme": "bearer"}
    assert schemes["fleetCA"]["type"] == "mutualTLS"
    assert {"token": []} in spec["security"]


def test_roles_read_operate_admin(web):
    read, operate, admin = (web.tokens[r] for r in ("read", "operate", "admin"))
    assert web.call("GET", "/api/v1/devices", token=read).status == 200
    refused = web.call("POST", "/api/v1/devices/pi-1/tags", token=read, body={"add": ["x"]})
    assert refused.status == 403 and "needs operate" in refused.json()["error"]
    assert web.call("GET", "/api/v1/tokens", token=operate).status == 403
    assert web.call("POST", "/api/v1/devices/pi-1/tags", token=operate,
                    body={"add": ["lab"]}).status == 200
    listed = web.call("GET", "/api/v1/tokens", token=admin).json()
    assert {t["role"] for t in listed} >= {"read", "operate", "admin"}
    assert all("secret" not in key for t in listed for key in t)
    assert web.call("GET", "/api/v1/whoami", token=admin).json()["role"] == "admin"


@pytest.mark.parametrize("ctype", ["application/x-www-form-urlencoded", "text/plain",
                                   "multipart/form-data; boundary=x", None])
def test_a_cross_site_form_or_text_plain_post_is_refused(web, ctype):
    headers = {"Origin": "http://evil.example", "Content-Type": ctype}
    reply = web.call("POST", "/api/v1/devices/pi-1/tags", token=web.tokens["admin"],
                     body=b'{"add": ["pwned"]}', headers=headers)
    assert reply.status == 415 and "application/json" in reply.json()["error"]
    assert "pwned" not in web.registry.devices()[0].tags


@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"},
                                     {"Origin": "null"},
                                     {"Sec-Fetch-Site": "cross-site"}])
def test_a_json_post_from_another_origin_is_refused(web, headers):
    reply = web.call("POST", "/api/v1/devices/pi-1/tags", token=web.tokens["admin"],
                     body={"add": ["pwned"]}, headers=headers)
    assert reply.status == 403 and "cross-site" in reply.json()["error"]
    assert "pwned" not in web.registry.devices()[0].tags
    same = {"Origin": f"http://127.0.0.1:{web.port}", "Sec-Fetch-Site": "same-origin"}
    assert web.call("POST", "/api/v1/devices/pi-1/tags", token=web.tokens["admin"],
                    body={"add": []}, headers=same).status == 200


@pytest.mark.parametrize("path", ["/", "/api/v1/devices", "/metrics"])
def test_dns_rebinding_host_is_refused(web, path):
    reply = web.call("GET", path, token=web.tokens["admin"],
                     headers={"Host": "evil.example"})
    assert reply.status == 403 and "evil.example" in reply.json()["error"]
    post = web.call("POST", "/api/v1/devices/pi-1/tags", token=web.tokens["admin"],
                    body={"add": ["pwned"]}, headers={"Host": "evil.example:8080"})
    assert post.status == 403 and "pwned" not in web.registry.devices()[0].tags


def test_revoked_expired_and_forged_tokens_are_refused(web):
    store = TokenStore(web.registry)
    token, text = store.create("laptop", Role.OPERATE, by="test")
    assert web.call("GET", "/api/v1/devices", token=text).status == 200
    revoked = web.call("POST", f"/api/v1/tokens/{token.id}/revoke",
                       token=web.tokens["admin"], body={})
    assert revoked.status == 200 and revoked.json()["revoked_at"] is not None
    replay = web.call("POST", "/api/v1/devices/pi-1/tags", token=text,
                      body={"add": ["replayed"]})
    assert replay.status == 401 and "revoked" in replay.json()["error"]
    assert web.call("GET", "/api/v1/devices", token=text).status == 401
    _, short = store.create("temp", Role.READ, ttl_s=-1.0)  # expired at once
    assert "expired" in web.call("GET", "/api/v1/devices", token=short).json()["error"]
    forged = text[:-4] + ("AAAA" if not text.endswith("AAAA") else "BBBB")
    assert web.call("GET", "/api/v1/devices", token=forged).status == 401
    cookie = web.call("GET", "/api/v1/devices", headers={"Cookie": f"token={text}"})
    assert cookie.status == 401
    assert "replayed" not in web.registry.devices()[0].tags


def test_the_audit_log_records_which_token_did_what(web):
    operate = web.tokens["operate"]
    [tok] = [t for t in TokenStore(web.registry).list() if t.name == "operate-token"]
    reply = web.call("POST", "/api/v1/devices/pi-1/tags", token=operate,
                     body={"add": ["audited"], "by": "somebody-else"})
    assert reply.status == 200
    entry = [e for e in web.registry.audit_log() if e["action"] == "devices.tag"][-1]
    assert (entry["actor"], entry["token"], entry["add"]) == \
        ("token:operate-token", tok.id, ["audited"])


def test_token_cli_create_list_revoke(tmp_path, capsys):
    from edgeship.cli import main
    db = str(tmp_path / "fleet.db")

    def cli(*args):
        try:
            code = main(["fleet", "token", *args, "--db", db, "--by", "alice"])
        except SystemExit as e:  # argparse's usage errors
            code = e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)
    from edgeship.fleet.registry import Registry
    Registry(db).close()
    made = cli("create", "--role", "operate", "--name", "ci")
    assert made.returncode == 0, made.stderr
    text = re.search(r"esf_[0-9a-f]{12}_\S+", made.stdout).group(0)
    token_id = text.split("_")[1]
    listed = cli("ls", "--json")
    assert token_id in listed.stdout and text.split("_", 2)[2] not in listed.stdout
    assert cli("create", "--role", "root", "--name", "x").returncode == 2
    assert cli("revoke", token_id).returncode == 0
    assert cli("revoke", "nope").returncode == 2
    from edgeship.fleet.auth import AuthError
    reg = Registry(db)
    with pytest.raises(AuthError, match="revoked"):
        TokenStore(reg).verify(text)
    assert [e["action"] for e in reg.audit_log()] == ["token.create", "token.revoke"]
    assert reg.audit_log()[0]["actor"] == "alice"
    reg.close()


def test_https_and_mutual_tls_with_the_fleet_ca(tmp_path):
    ca = CertificateAuthority.init(tmp_path / "ca")
    server_cert = ca.issue("broker", "127.0.0.1", tmp_path / "srv", hosts=("127.0.0.1",))
    client = ca.issue("operator", "alice", tmp_path / "cli")
    settings = WebSettings(tls_cert=server_cert.cert_path, tls_key=server_cert.key_path,
                           client_ca=ca.cert_path, idle_timeout_s=5)
    web = start_web(tmp_path / "fleet.db", settings)
    try:
        ctx = ssl.create_default_context(cafile=str(ca.cert_path))
        ctx.load_cert_chain(str(client.cert_path), str(client.key_path))
        ok = web.call("GET", "/api/v1/whoami", token=web.tokens["read"], context=ctx)
        assert ok.status == 200 and web.server.url.startswith("https://")
        assert web.call("GET", "/api/v1/whoami", context=ctx).status == 401  # still a token
        no_cert = ssl.create_default_context(cafile=str(ca.cert_path))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            web.call("GET", "/api/v1/whoami", token=web.tokens["read"], context=no_cert)
        with pytest.raises((ConnectionError, OSError)):  # plain HTTP to the TLS port
            reply = web.call("GET", "/api/v1/whoami", token=web.tokens["read"])
            raise ConnectionError(f"answered {reply.status}")
    finally:
        stop_web(web)
