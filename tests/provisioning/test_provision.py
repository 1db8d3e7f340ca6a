"""Enrollment bundles, the boot partition of a real FAT image (mkfs.vfat, read back with
mtools, no mount) and scripts/install-agent in --root / --dry-run mode."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from edgeship.agent.config import load_config
from edgeship.agent.errors import ConfigError
from edgeship.cli import main
from edgeship.fleet.pki import CertificateAuthority
from edgeship.fleet.provision import (EnrollmentSettings, Mtools, ProvisionError, build_enrollment,
                             check_pip_spec, fat_offset, write_boot_partition)
from edgeship.fleet.tuf_repo import init_repository

REPO_ROOT = Path(__file__).resolve().parents[2]
MKFS = shutil.which("mkfs.vfat") or "/usr/sbin/mkfs.vfat"
pytestmark = pytest.mark.skipif(shutil.which("mcopy") is None or not Path(MKFS).exists(),
                                reason="needs mtools and dosfstools (scripts/_setup.sh)")


@pytest.fixture(scope="module")
def fleet_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    init_repository(root / "keys", root / "repo")
    CertificateAuthority.init(root / "ca")
    return root


WHEEL = "/opt/wheels/edgeship-0.1.0-py3-none-any.whl"


def enroll(fleet_dirs, out: Path, device="pi-0001", profile="rpi4", **more) -> Path:
    s = EnrollmentSettings(device_id=device, profile=profile,
                           mqtt_url="mqtts://broker.example.com:8883",
                           repo_dir=fleet_dirs / "repo", **{"pip_spec": WHEEL, **more})
    return build_enrollment(s, CertificateAuthority(fleet_dirs / "ca"), out)


def test_bundle_has_key_cert_with_device_cn_ca_config_and_pinned_root(fleet_dirs, tmp_path):
    b = enroll(fleet_dirs, tmp_path / "pi-0001")
    assert sorted(p.name for p in b.iterdir()) == [
        "agent.toml", "ca.crt", "device.crt", "device.key", "edgeship-agent.service",
        "enrollment.json", "firstboot.sh", "install-agent", "root.json"]
    for name in ("install-agent", "edgeship-agent.service"):  # from the installed package
        assert (b / name).read_bytes() == (REPO_ROOT / "devices" / name).read_bytes()
    assert os.access(b / "install-agent", os.X_OK)
    assert stat.S_IMODE(os.stat(b / "device.key").st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((b / "device.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-0001"
    ca = x509.load_pem_x509_certificate((b / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert (b / "root.json").read_bytes() == \
        (fleet_dirs / "repo/metadata/1.root.json").read_bytes()
    cfg = load_config(b / "agent.toml")
    assert (cfg.device_id, cfg.profile, cfg.mqtt_url) == \
        ("pi-0001", "rpi4", "mqtts://broker.example.com:8883")
    assert cfg.tls_key_file == "/etc/edgeship/device.key"
    assert str(cfg.state_dir) == "/var/lib/edgeship"
    doc = json.loads((b / "enrollment.json").read_text())
    assert doc["certificate_serial"] == f"{cert.serial_number:x}"


@pytest.mark.parametrize("change, key", [
    ({"mqtt_url": "mqtt://broker:1883"}, "mqtt_url"),
    ({"profile": "rpi9"}, "profile"),
    ({"device_id": "bad/id"}, None),
])
def test_bad_enrollment_requests_are_refused(fleet_dirs, tmp_path, change, key):
    args = dict(device_id="pi-9", profile="rpi4", mqtt_url="mqtts://b:8883",
                repo_dir=fleet_dirs / "repo") | change
    with pytest.raises(Exception) as e:
        build_enrollment(EnrollmentSettings(**args), CertificateAuthority(fleet_dirs / "ca"),
                         tmp_path / "x")
    if key:
        assert isinstance(e.value, ConfigError) and e.value.key == key
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / ".x.partial").exists()


@pytest.mark.parametrize("spec, ok", [
    ("", True), (WHEEL, True),
    ("https://example.com/edgeship-0.1.0-py3-none-any.whl#sha256=" + "ab" * 32, True),
    ("git+https://example.com/edgeship.git@" + "0" * 40, True),
    ("edgeship", False), ("edgeship==0.1.0", False),
    ("https://example.com/edgeship-0.1.0-py3-none-any.whl", False),
    ("https://example.com/e.whl#sha256=abc", False),
    ("git+https://example.com/edgeship.git@main", False),
])
def test_a_remote_pip_spec_must_be_pinned_by_hash(spec, ok):
    if ok:
        assert check_pip_spec(spec) == spec
    else:
        with pytest.raises(ConfigError) as e:
            check_pip_spec(spec)
        assert e.value.key == "pip_spec"


def test_any_failure_while_writing_leaves_nothing_behind(fleet_dirs, tmp_path, monkeypatch):
    """As from a wheel that lacks a file the bundle needs: no bundle, no .partial."""
    from edgeship.fleet import provision

    monkeypatch.setattr(provision, "PACKAGED_FILES",
                        {**provision.PACKAGED_FILES, "not-packaged": 0o755})
    with pytest.raises(FileNotFoundError):
        enroll(fleet_dirs, tmp_path / "pi-0009", device="pi-0009")
    assert list(tmp_path.iterdir()) == []


def fake_wheelhouse(path: Path, names=("edgeship-0.1.0-py3-none-any.whl",
                                       "numpy-2.0.2-cp311-cp311-manylinux_2_17_aarch64.whl")):
    path.mkdir()
    for name in names:
        (path / name).write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
    (path / "README.txt").write_text("not a wheel")
    return path


def test_a_wheelhouse_travels_in_the_bundle_and_installs_with_no_index(fleet_dirs, tmp_path):
    wheels = fake_wheelhouse(tmp_path / "wh")
    b = enroll(fleet_dirs, tmp_path / "pi-0010", device="pi-0010", pip_spec="",
               wheelhouse=wheels)
    assert sorted(p.name for p in (b / "wheels").iterdir()) == sorted(
        p.name for p in wheels.glob("*.whl"))
    doc = json.loads((b / "enrollment.json").read_text())
    assert doc["pip_spec"] == "" and len(doc["wheels"]) == 2
    proc = install_agent("--bundle", str(b), "--root", str(tmp_path / "root"))
    assert proc.returncode == 0, proc.stderr
    pip = [line for line in proc.stdout.splitlines() if "/venv/bin/pip install" in line]
    assert pip == [f"skip (--root): /opt/edgeship/venv/bin/pip install --no-index "
                   f"--find-links {b}/wheels edgeship[onnxruntime]"]


def test_a_wheelhouse_without_edgeship_is_refused(fleet_dirs, tmp_path):
    wheels = fake_wheelhouse(tmp_path / "wh", names=("numpy-2.0.2-py3-none-any.whl",))
    with pytest.raises(ConfigError, match="no edgeship-") as e:
        enroll(fleet_dirs, tmp_path / "pi-0011", device="pi-0011", wheelhouse=wheels)
    assert e.value.key == "wheelhouse"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wh"]


def test_existing_bundle_is_not_overwritten(fleet_dirs, tmp_path):
    enroll(fleet_dirs, tmp_path / "b", device="pi-7")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        enroll(fleet_dirs, tmp_path / "b", device="pi-7")


def fat_image(path: Path, files: dict[str, str], size_kb: int = 32768,
              offset_sectors: int = 0) -> Path:
    if offset_sectors:
        # an MBR like a Raspberry Pi OS image's: partition 1, type 0x0c (FAT32 LBA)
        entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x0C, b"\0\0\0", offset_sectors,
                            size_kb * 2)
        with open(path, "wb") as f:
            f.truncate(size_kb * 1024 + offset_sectors * 512)
            f.seek(446)
            f.write(entry)
            f.seek(510)
            f.write(b"\x55\xaa")
        subprocess.run([MKFS, "-n", "BOOTFS", "--offset", str(offset_sectors), str(path),
                        str(size_kb)], check=True, capture_output=True)
    else:
        subprocess.run([MKFS, "-C", "-n", "BOOTFS", str(path), str(size_kb)], check=True,
                       capture_output=True)
    fat = Mtools(path, offset_sectors * 512)
    for name, text in files.items():
        src = path.with_name(name)
        src.write_text(text)
        fat.put(src, name)
        src.unlink()
    return path


CMDLINE = "console=serial0,115200 console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 " \
          "fsck.repair=yes rootwait"


def test_firstrun_hook_on_a_classic_pi_os_boot_partition(fleet_dirs, tmp_path):
    b = enroll(fleet_dirs, tmp_path / "pi-0001")
    img = fat_image(tmp_path / "boot.img", {"cmdline.txt": CMDLINE + "\n",
                                            "config.txt": "arm_64bit=1\n"})
    assert write_boot_partition(img, b) == "firstrun"
    fat = Mtools(img)
    for name in ("agent.toml", "ca.crt", "device.crt", "device.key", "root.json",
                 "install-agent", "firstboot.sh"):
        assert fat.read(f"edgeship/{name}") == (b / name).read_bytes(), name
    cmdline = fat.read("cmdline.txt").decode()
    assert cmdline.startswith(CMDLINE) and cmdline.count("\n") == 1
    assert "systemd.run=/boot/firmware/firstrun.sh" in cmdline
    firstrun = fat.read("firstrun.sh").decode()
    assert "edgeship/firstboot.sh" in firstrun and "network-online.target" in firstrun
    assert fat.read("config.txt") == b"arm_64bit=1\n"  # untouched
    # again (e.g. re-provisioned): the hook is not added twice
    write_boot_partition(img, b)
    assert fat.read("cmdline.txt").decode().count("systemd.run=") == 1


def test_cloud_init_hook_keeps_the_images_user_data(fleet_dirs, tmp_path):
    b = enroll(fleet_dirs, tmp_path / "pi-0002", device="pi-0002", profile="rpi5")
    user_data = "#cloud-config\nhostname: pi-0002\nusers:\n  - name: pi\n"
    img = fat_image(tmp_path / "boot.img", {"cmdline.txt": CMDLINE, "user-data": user_data,
                                            "meta-data": "instance-id: x\n"},
                    offset_sectors=8192)
    assert fat_offset(img) == 8192 * 512  # found through the MBR partition table
    assert write_boot_partition(img, b) == "cloud-init"
    fat = Mtools(img)
    ud = fat.read("user-data").decode()
    assert ud.startswith(user_data.rstrip()) and "edgeship/firstboot.sh" in ud
    assert ud.index("runcmd:") > ud.index("hostname: pi-0002")
    assert "systemd.run" not in fat.read("cmdline.txt").decode()
    assert fat.read("edgeship/device.crt") == (b / "device.crt").read_bytes()


def test_not_a_fat_image_is_refused(tmp_path):
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(ProvisionError, match="no boot sector"):
        fat_offset(junk)


def test_cli_provision_writes_bundle_and_image(fleet_dirs, tmp_path, capsys):
    img = fat_image(tmp_path / "boot.img", {"cmdline.txt": CMDLINE})
    common = ["--broker", "mqtts://b:8883", "--ca-dir", str(fleet_dirs / "ca"),
              "--repo", str(fleet_dirs / "repo")]
    # the first boot must know what to install
    rc = main(["provision", "pi-cli", "--profile", "rpi4", *common, "--out",
               str(tmp_path / "pi-cli"), "--image", str(img)])
    assert rc == 2 and "--image needs --wheelhouse" in capsys.readouterr().err
    wheels = fake_wheelhouse(tmp_path / "wh")
    rc = main(["provision", "pi-cli", "--profile", "rpi4", *common, "--out",
               str(tmp_path / "pi-cli"), "--image", str(img), "--wheelhouse", str(wheels),
               "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["method"] == "firstrun" and "device.key" in doc["files"]
    listing = Mtools(img).listing()
    assert "edgeship/agent.toml" in listing
    assert "edgeship/wheels/edgeship-0.1.0-py3-none-any.whl" in listing
    # a file that is no boot image: bad input, and the bundle made for it is gone again
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * 4096)
    rc = main(["provision", "pi-junk", "--profile", "rpi4", *common, "--out",
               str(tmp_path / "pi-junk"), "--image", str(junk), "--pip-spec", WHEEL])
    assert rc == 2 and "no boot sector" in capsys.readouterr().err
    assert not (tmp_path / "pi-junk").exists() and not (tmp_path / ".pi-junk.partial").exists()
    rc = main(["provision", "pi-x", "--profile", "nope", "--broker", "mqtts://b:8883",
               "--ca-dir", str(fleet_dirs / "ca"), "--repo", str(fleet_dirs / "repo"),
               "--out", str(tmp_path / "pi-x")])
    assert rc == 2 and "unknown device profile 'nope'" in capsys.readouterr().err


# --- scripts/install-agent ----------------------------------------------------------------

def install_agent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO_ROOT / "scripts/install-agent"), *args],
                          capture_output=True, text=True, timeout=60)


def test_install_agent_root_mode_lays_out_config_certs_root_and_unit(fleet_dirs, tmp_path):
    b = enroll(fleet_dirs, tmp_path / "pi-0003", device="pi-0003")
    root = tmp_path / "root"
    proc = install_agent("--bundle", str(b), "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    etc = root / "etc/edgeship"
    assert (etc / "agent.toml").read_bytes() == (b / "agent.toml").read_bytes()
    assert stat.S_IMODE(os.stat(etc / "device.key").st_mode) == 0o600
    assert (root / "var/lib/edgeship/tuf/root.json").read_bytes() == \
        (b / "root.json").read_bytes()
    unit = (root / "etc/systemd/system/edgeship-agent.service").read_text()
    assert "edgeship agent run --config /etc/edgeship/agent.toml" in unit
    assert "User=edgeship" in unit
    # what it would have done to the system, in order, with the agent deps only
    planned = [line for line in proc.stdout.splitlines() if line.startswith("skip (--root)")]
    assert "useradd --system" in planned[0]
    assert f"skip (--root): /opt/edgeship/venv/bin/pip install edgeship[onnxruntime] @ " \
           f"file://{WHEEL}" in planned
    assert not any("converter" in p or "fleet]" in p for p in planned)
    assert planned[-1].endswith("systemctl restart edgeship-agent.service")
    # a second run keeps the root the agent may have rotated since
    (root / "var/lib/edgeship/tuf/root.json").write_text("{rotated}")
    assert install_agent("--bundle", str(b), "--root", str(root)).returncode == 0
    assert (root / "var/lib/edgeship/tuf/root.json").read_text() == "{rotated}"


def test_install_agent_dry_run_changes_nothing(fleet_dirs, tmp_path):
    b = enroll(fleet_dirs, tmp_path / "pi-0004", device="pi-0004")
    proc = install_agent("--bundle", str(b), "--root", str(tmp_path / "r"), "--dry-run",
                         "--onnxruntime", "onnxruntime_gpu-1.18.0-cp310-linux_aarch64.whl")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "r").exists()
    # NVIDIA's build and edgeship without a runtime extra, in one pip call: nothing replaces it
    assert "would run: /opt/edgeship/venv/bin/pip install onnxruntime_gpu-1.18.0-cp310-linux_" \
           f"aarch64.whl edgeship @ file://{WHEEL}" in proc.stdout
    assert "uninstall" not in proc.stdout


def test_install_agent_rejects_bad_usage(fleet_dirs, tmp_path):
    proc = install_agent("--bundle", str(tmp_path))
    assert proc.returncode == 2 and "not an enrollment bundle" in proc.stderr
    assert install_agent("--frobnicate").returncode == 2
    b = enroll(fleet_dirs, tmp_path / "pi-0012", device="pi-0012", pip_spec="")
    proc = install_agent("--bundle", str(b), "--root", str(tmp_path / "r"))
    assert proc.returncode == 2 and "nothing to install" in proc.stderr
    proc = install_agent("--bundle", str(b), "--root", str(tmp_path / "r"), "--pip-spec", WHEEL,
                         "--runtime", "pytorch")
    assert proc.returncode == 2 and "unknown --runtime pytorch" in proc.stderr
