"""The fleet's certificate authority: one CA, a server certificate for the broker, client
certificates whose CN is the device id (or ``fleet:NAME`` for fleet servers), revocation
through a CRL the broker loads (``crlfile``).

Layout of a CA directory (the key never leaves it; keep it offline or on the fleet host)::

    ca.key  (0600)  ca.crt  crl.pem  index.json   # index: serial -> {cn, role, revoked_at}

Keys are ECDSA P-256 (fast on a Pi Zero, supported by Mosquitto's OpenSSL). Every write is
atomic. Device ids are checked with the wire contract's ``validate_id``; identities with a
``:`` (fleet servers, operators) can never collide with a device id.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeship.agent.errors import ConfigError
from edgeship.common.fsutil import atomic_write
from edgeship.agent.protocol import validate_id

logger = logging.getLogger(__name__)

ROLES = ("device", "fleet", "operator", "broker")
FLEET_PREFIX = "fleet:"
OPERATOR_PREFIX = "ops:"
CA_DAYS = 10 * 365
CERT_DAYS = 3 * 365
CRL_DAYS = 30


class PkiError(ConfigError):
    """The CA directory is missing, or a request to it is invalid."""


@dataclass(frozen=True)
class Issued:
    cn: str
    role: str
    serial: int
    key_path: Path
    cert_path: Path


def identity_for(role: str, name: str) -> str:
    """The certificate CN (= the broker username) for a role and a name."""
    if role == "device":
        return validate_id(name)
    if role == "fleet":
        return FLEET_PREFIX + validate_id(name, "fleet server name")
    if role == "operator":
        return OPERATOR_PREFIX + validate_id(name, "operator name")
    if role == "broker":
        return name
    raise PkiError(f"unknown role {role!r} (known: {', '.join(ROLES)})", key="role")


class CertificateAuthority:
    def __init__(self, ca_dir: Path) -> None:
        self.dir = Path(ca_dir)

    key_path = property(lambda self: self.dir / "ca.key")
    cert_path = property(lambda self: self.dir / "ca.crt")
    crl_path = property(lambda self: self.dir / "crl.pem")
    index_path = property(lambda self: self.dir / "index.json")

    # --- creation ------------------------------------------------------------------------

    @classmethod
    def init(cls, ca_dir: Path, name: str = "edgeship fleet CA",
             days: int = CA_DAYS) -> "CertificateAuthority":
        ca = cls(ca_dir)
        if ca.key_path.exists():
            raise PkiError(f"{ca.key_path} already exists; refusing to replace a fleet CA",
                           key="ca_dir")
        ca.dir.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                             False, False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        atomic_write(ca.key_path, _key_pem(key), mode=0o600)
        atomic_write(ca.cert_path, cert.public_bytes(serialization.Encoding.PEM))
        ca._write_index({})
        ca.write_crl()
        logger.info("created fleet CA in %s", ca.dir)
        return ca

    def _load(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        if not self.key_path.exists():
            raise PkiError(f"no fleet CA in {self.dir}: run 'edgeship provision ca init'",
                           key="ca_dir")
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        return key, cert  # type: ignore[return-value]

    # --- issuing -------------------------------------------------------------------------

    def issue(self, role: str, name: str, out_dir: Path, *, days: int = CERT_DAYS,
              hosts: tuple[str, ...] = ()) -> Issued:
        """A fresh key and certificate for ``role``/``name`` written to ``out_dir`` as
        ``<stem>.key`` (0600) and ``<stem>.crt``; ``hosts`` become SANs (broker role)."""
        cn = identity_for(role, name)
        ca_key, ca_cert = self._load()
        key = ec.generate_private_key(ec.SECP256R1())
        serial = x509.random_serial_number()
        now = _now()
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(ca_cert.subject).public_key(key.public_key())
                   .serial_number(serial).not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                   .add_extension(x509.KeyUsage(True, False, True, False, False, False, False,
                                                False, False), critical=True)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
        eku = ExtendedKeyUsageOID.SERVER_AUTH if role == "broker" else \
            ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        if role == "broker":
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san(h) for h in (hosts or (name,))]), False)
        cert = builder.sign(ca_key, hashes.SHA256())
        stem = cn.replace(":", "-")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        key_path, cert_path = out_dir / f"{stem}.key", out_dir / f"{stem}.crt"
        atomic_write(key_path, _key_pem(key), mode=0o600)
        atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        index = self._read_index()
        index[str(serial)] = {"cn": cn, "role": role, "issued_at": now.isoformat(),
                              "not_after": cert.not_valid_after_utc.isoformat(),
                              "revoked_at": None}
        self._write_index(index)
        logger.info("issued %s certificate for %s (serial %x)", role, cn, serial)
        return Issued(cn, role, serial, key_path, cert_path)

    # --- revocation ----------------------------------------------------------------------

    def revoke(self, cn: str) -> list[int]:
        """Revoke every unrevoked certificate issued to ``cn``; rewrite the CRL. Returns the
        serials revoked (empty: nothing to revoke)."""
        index = self._read_index()
        hits = [s for s, e in index.items() if e["cn"] == cn and e["revoked_at"] is None]
        if not hits and not any(e["cn"] == cn for e in index.values()):
            raise PkiError(f"no certificate was issued to {cn!r}", key="device_id")
        for s in hits:
            index[s]["revoked_at"] = _now().isoformat()
        self._write_index(index)
        self.write_crl()
        return [int(s) for s in hits]

    def write_crl(self, days: int = CRL_DAYS) -> Path:
        """(Re)sign the CRL. It expires after ``days``: re-run (``edgeship provision ca
        crl``) from cron, or the broker will refuse every client once it is stale."""
        ca_key, ca_cert = self._load()
        now = _now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
                   .last_update(now - dt.timedelta(minutes=5))
                   .next_update(now + dt.timedelta(days=days)))
        for serial, e in self._read_index().items():
            if e["revoked_at"] is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(int(serial))
                    .revocation_date(dt.datetime.fromisoformat(e["revoked_at"])).build())
        crl = builder.sign(ca_key, hashes.SHA256())
        atomic_write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        return self.crl_path

    def certificates(self) -> list[dict]:
        return [{"serial": f"{int(s):x}", **e} for s, e in self._read_index().items()]

    # --- index -------------------------------------------------------------------------

    def _read_index(self) -> dict:
        try:
            return json.loads(self.index_path.read_text())
        except FileNotFoundError:
            return {}

    def _write_index(self, index: dict) -> None:
        atomic_write(self.index_path, json.dumps(index, indent=1).encode())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
