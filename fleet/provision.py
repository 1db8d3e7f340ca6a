"""Enrollment bundles, and writing one onto a Raspberry Pi OS boot partition.

An enrollment bundle is everything one device needs to join the fleet, in one directory::

    agent.toml        the agent config, with the paths it will have on the device
    ca.crt            the fleet CA (to check the broker)
    device.crt        the device's client certificate, CN = device id
    device.key  0600  its private key
    root.json         the pinned TUF root (trust anchor for every model update)
    enrollment.json   what this is: device id, profile, broker, certificate serial, when
    install-agent     the installer (user, venv, config, systemd unit)
    edgeship-agent.service  the systemd unit it installs
    firstboot.sh      runs install-agent with this bundle on the device's first boot
    wheels/           (with a wheelhouse) edgeship and its dependencies: installs offline

``write_boot_partition`` copies it to ``/edgeship/`` on the FAT boot partition of an image
or SD card with mtools (no root, no mount) and hooks ``firstboot.sh`` into the first boot:
cloud-init ``user-data`` (Raspberry Pi OS images that ship cloud-init) or the classic
``firstrun.sh`` + ``cmdline.txt`` ``systemd.run=`` hook that Raspberry Pi Imager uses.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgeship import devices
from edgeship.agent.config import load_config
from edgeship.agent.errors import ConfigError, EdgeshipError
from edgeship.common.fsutil import atomic_write
from edgeship.agent.protocol import validate_id
from edgeship.fleet.pki import CertificateAuthority

logger = logging.getLogger(__name__)

#: what the bundle carries from the installed package (edgeship/devices/)
PACKAGED_FILES = {"install-agent": 0o755, "edgeship-agent.service": 0o644}
FAT_TYPES = {0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0E}
BOOT_DIR = "edgeship"


class ProvisionError(EdgeshipError):
    """An image or boot partition could not be written."""


class NotABootImageError(ProvisionError):
    """The file given as ``--image`` has no FAT boot partition."""

    bad_input = True


@dataclass(frozen=True)
class DevicePaths:
    """Where the installed files live on the device."""

    config_dir: Path = Path("/etc/edgeship")
    state_dir: Path = Path("/var/lib/edgeship")


@dataclass(frozen=True)
class EnrollmentSettings:
    device_id: str
    profile: str
    mqtt_url: str
    repo_dir: Path          # the fleet's TUF repository (metadata/N.root.json)
    api_port: int = 8470
    telemetry_interval_s: float = 60.0
    pip_spec: str = ""      # what the device installs when there is no wheelhouse
    wheelhouse: Path | None = None  # wheels to carry: the first boot needs no internet
    paths: DevicePaths = DevicePaths()


def check_pip_spec(spec: str) -> str:
    """A pip spec a device may install unattended, as root: a file on the device (an
    absolute path), a URL pinned with ``#sha256=``, or a git URL at a full commit. A bare name
    would install whatever an index serves that day: refused."""
    if not spec or spec.startswith("/"):
        return spec
    if spec.startswith(("https://", "http://")):
        if not re.search(r"[#&]sha256=[0-9a-fA-F]{64}(&|$)", spec):
            raise ConfigError(f"--pip-spec {spec}: a URL must be pinned by hash "
                              "(add #sha256=<the file's sha256>)", key="pip_spec")
        return spec
    if spec.startswith("git+"):
        if not re.search(r"@[0-9a-f]{40}(#|$)", spec):
            raise ConfigError(f"--pip-spec {spec}: a git URL must name a full commit hash "
                              "(...@<40 hex digits>)", key="pip_spec")
        return spec
    raise ConfigError(f"--pip-spec {spec!r} would install from a package index without a "
                      "hash: give --wheelhouse DIR (offline), a wheel URL with #sha256=..., "
                      "or a git URL at a commit", key="pip_spec")


def copy_wheelhouse(src: Path, dest: Path) -> list[str]:
    """The ``*.whl`` files of ``src`` into ``dest``; there must be an edgeship wheel."""
    wheels = sorted(Path(src).glob("*.whl")) if Path(src).is_dir() else []
    if not any(w.name.startswith("edgeship-") for w in wheels):
        raise ConfigError(f"--wheelhouse {src} has no edgeship-*.whl (scripts/wheelhouse "
                          "makes one)", key="wheelhouse")
    dest.mkdir()
    for wheel in wheels:
        shutil.copyfile(wheel, dest / wheel.name)
    return [w.name for w in wheels]


def agent_toml(s: EnrollmentSettings) -> str:
    c, st = s.paths.config_dir, s.paths.state_dir
    return (f"# edgeship agent config for {s.device_id} (written by 'edgeship provision')\n"
            "[agent]\n"
            f'device_id = "{s.device_id}"\n'
            f'state_dir = "{st}"\n'
            f'mqtt_url = "{s.mqtt_url}"\n'
            f'profile = "{s.profile}"\n'
            f"api_port = {s.api_port}\n"
            f"telemetry_interval_s = {s.telemetry_interval_s}\n"
            f'tls_ca_file = "{c / "ca.crt"}"\n'
            f'tls_cert_file = "{c / "device.crt"}"\n'
            f'tls_key_file = "{c / "device.key"}"\n')


def latest_root(repo_dir: Path) -> Path:
    """The newest ``N.root.json`` of the repository (the root a new device should pin)."""
    roots = sorted((p for p in (Path(repo_dir) / "metadata").glob("*.root.json")
                    if p.name.split(".")[0].isdigit()), key=lambda p: int(p.name.split(".")[0]))
    if not roots:
        raise ConfigError(f"no N.root.json in {repo_dir}/metadata: is it a TUF repository "
                          "('edgeship keys init')?", key="repo_dir")
    return roots[-1]


def build_enrollment(s: EnrollmentSettings, ca: CertificateAuthority, out_dir: Path) -> Path:
    """Write the enrollment bundle of ``s.device_id`` into ``out_dir`` (must not exist).
    All or nothing: on any failure nothing is left behind."""
    validate_id(s.device_id)
    devices.load_profile(s.profile)  # fail early on an unknown profile
    if not s.mqtt_url.startswith("mqtts://"):
        raise ConfigError(f"mqtt_url {s.mqtt_url!r} must be mqtts://HOST:PORT: the broker "
                          "only accepts TLS with client certificates", key="mqtt_url")
    check_pip_spec(s.pip_spec)
    root = latest_root(s.repo_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} exists and is not empty; refusing to overwrite an "
                          "enrollment bundle", key="out")
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_bundle(s, ca, root, tmp)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    load_config(out_dir / "agent.toml")  # the agent itself must accept what we wrote
    return out_dir


def _write_bundle(s: EnrollmentSettings, ca: CertificateAuthority, root: Path,
                  tmp: Path) -> None:
    wheels = copy_wheelhouse(s.wheelhouse, tmp / "wheels") if s.wheelhouse else []
    for name, mode in PACKAGED_FILES.items():
        atomic_write(tmp / name, (resources.files("edgeship.devices") / name).read_bytes(),
                     mode=mode)
    atomic_write(tmp / "firstboot.sh", FIRSTBOOT_SH.encode(), mode=0o755)
    shutil.copyfile(ca.cert_path, tmp / "ca.crt")
    shutil.copyfile(root, tmp / "root.json")
    atomic_write(tmp / "agent.toml", agent_toml(s).encode())
    issued = ca.issue("device", s.device_id, tmp)
    issued.key_path.rename(tmp / "device.key")
    issued.cert_path.rename(tmp / "device.crt")
    atomic_write(tmp / "enrollment.json", json.dumps({
        "device_id": s.device_id, "profile": s.profile, "mqtt_url": s.mqtt_url,
        "certificate_serial": f"{issued.serial:x}", "tuf_root": root.name,
        "pip_spec": s.pip_spec, "wheels": wheels, "config_dir": str(s.paths.config_dir),
        "state_dir": str(s.paths.state_dir), "created_at": time.time()}, indent=2).encode())


# --- first boot on Raspberry Pi OS ---------------------------------------------------------

FIRSTBOOT_SH = r"""#!/bin/bash
# edgeship first boot: install the agent from the enrollment bundle next to this script.
# Idempotent: does nothing once /var/lib/edgeship/.enrolled exists.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
marker=/var/lib/edgeship/.enrolled
[ -e "$marker" ] && exit 0
exec > >(tee -a /var/log/edgeship-firstboot.log) 2>&1
echo "edgeship firstboot: $(date -u) from $here"
if [ ! -d "$here/wheels" ]; then  # no wheelhouse: pip needs the network
  for i in $(seq 1 60); do getent hosts pypi.org >/dev/null && break; sleep 5; done
fi
"$here/install-agent" --bundle "$here"
# the private key must not stay on a FAT partition anyone can read by pulling the card
shred -u "$here/device.key" 2>/dev/null || rm -f "$here/device.key"
mkdir -p "$(dirname "$marker")" && date -u > "$marker"
echo "edgeship firstboot: done"
"""

#: Raspberry Pi Imager-style hook: runs once from the kernel command line (no network yet),
#: so it only installs a oneshot unit that runs firstboot.sh once the network is up.
FIRSTRUN_SH = r"""#!/bin/bash
set +e
BOOT=/boot/firmware; [ -d "$BOOT/edgeship" ] || BOOT=/boot
cat > /etc/systemd/system/edgeship-enroll.service <<UNIT
[Unit]
Description=edgeship enrollment (first boot)
Wants=network-online.target
After=network-online.target
ConditionPathExists=!/var/lib/edgeship/.enrolled
[Service]
Type=oneshot
ExecStart=$BOOT/edgeship/firstboot.sh
RemainAfterExit=yes
[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/edgeship-enroll.service \
  /etc/systemd/system/multi-user.target.wants/edgeship-enroll.service
rm -f "$BOOT/firstrun.sh"
sed -i 's| systemd.run.*||g' "$BOOT/cmdline.txt"
exit 0
"""

CMDLINE_HOOK = (" systemd.run=/boot/firmware/firstrun.sh systemd.run_success_action=reboot "
                "systemd.unit=kernel-command-line.target")

USER_DATA = """#cloud-config
# edgeship enrollment (written by 'edgeship provision --image')
runcmd:
  - [bash, -c, "B=/boot/firmware; [ -d $B/edgeship ] || B=/boot; $B/edgeship/firstboot.sh"]
"""


def fat_offset(image: Path) -> int:
    """Byte offset of the FAT file system in ``image``: 0 for a bare partition (or an SD
    card's partition device), else the first FAT partition of the MBR (Pi OS images)."""
    with open(image, "rb") as f:
        head = f.read(512)
    if len(head) < 512 or head[510:512] != b"\x55\xaa":
        raise NotABootImageError(f"{image}: no boot sector (not a FAT image or MBR disk "
                                 "image)")
    if head[54:59] == b"FAT12" or head[54:59] == b"FAT16" or head[82:87] == b"FAT32":
        return 0
    for i in range(4):
        entry = head[446 + 16 * i: 462 + 16 * i]
        ptype, lba = entry[4], struct.unpack("<I", entry[8:12])[0]
        if ptype in FAT_TYPES and lba:
            return lba * 512
    raise NotABootImageError(f"{image}: no FAT partition in the partition table")


class Mtools:
    """mcopy/mdir/mtype on ``image@@offset``: no root, no mount."""

    def __init__(self, image: Path, offset: int | None = None) -> None:
        for tool in ("mcopy", "mdir", "mtype"):
            if shutil.which(tool) is None:
                raise ProvisionError(f"{tool} not found: apt-get install mtools")
        self.image = Path(image)
        self.offset = fat_offset(self.image) if offset is None else offset

    @property
    def target(self) -> str:
        return f"{self.image}@@{self.offset}"

    def _run(self, *args: str) -> str:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120,
                              env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"})
        if proc.returncode != 0:
            raise ProvisionError(f"{' '.join(args[:2])} failed on {self.image}: "
                                 f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def exists(self, path: str) -> bool:
        try:
            self._run("mdir", "-b", "-i", self.target, f"::{path}")
            return True
        except ProvisionError:
            return False

    def put(self, src: Path, dest: str) -> None:
        self._run("mcopy", "-o", "-s", "-i", self.target, str(src), f"::{dest}")

    def read(self, path: str) -> bytes:
        proc = subprocess.run(["mtype", "-i", self.target, f"::{path}"], capture_output=True,
                              timeout=60, env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin"})
        if proc.returncode != 0:
            raise ProvisionError(f"cannot read {path} from {self.image}: "
                                 f"{proc.stderr.decode().strip()}")
        return proc.stdout

    def listing(self) -> list[str]:
        return [line.split("::", 1)[-1].lstrip("/") for line in
                self._run("mdir", "-b", "-/", "-i", self.target, "::").splitlines() if line]


def write_boot_partition(image: Path, bundle: Path, method: str = "auto",
                         offset: int | None = None) -> str:
    """Copy ``bundle`` to ``/edgeship`` on the boot partition and hook the first boot.
    ``method``: ``cloud-init``, ``firstrun`` or ``auto`` (cloud-init when the image has a
    ``user-data`` file or no ``cmdline.txt``). Returns the method used."""
    fat = Mtools(image, offset)
    if method == "auto":
        method = "cloud-init" if fat.exists("user-data") or not fat.exists("cmdline.txt") \
            else "firstrun"
    if method not in ("cloud-init", "firstrun"):
        raise ConfigError(f"unknown first-boot method {method!r}", key="method")
    stage = Path(bundle).with_name(f".{Path(bundle).name}.boot")
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(bundle, stage / BOOT_DIR)
    try:
        fat.put(stage / BOOT_DIR, BOOT_DIR)
        if method == "cloud-init":
            _hook_cloud_init(fat, stage)
        else:
            _hook_firstrun(fat, stage)
        _put_text(fat, stage, "edgeship-enroll.txt",
                  f"edgeship enrollment for {bundle.name}: method {method}\n")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return method


def _put_text(fat: Mtools, stage: Path, name: str, text: str) -> None:
    path = stage / name
    path.write_text(text)
    fat.put(path, name)


def _hook_cloud_init(fat: Mtools, stage: Path) -> None:
    existing = fat.read("user-data").decode() if fat.exists("user-data") else ""
    if "edgeship/firstboot.sh" in existing:
        return
    if existing.strip() and "runcmd:" in existing:
        raise ProvisionError("the image's user-data already has a runcmd section; add "
                             "'/boot/firmware/edgeship/firstboot.sh' to it by hand, or use "
                             "--method firstrun")
    body = existing.rstrip() + "\n" + USER_DATA.split("\n", 1)[1] if existing.strip() \
        else USER_DATA
    _put_text(fat, stage, "user-data", body)
    if not fat.exists("meta-data"):
        _put_text(fat, stage, "meta-data", "instance-id: edgeship-enroll\n")


def _hook_firstrun(fat: Mtools, stage: Path) -> None:
    cmdline = fat.read("cmdline.txt").decode().strip()
    if "systemd.run=" in cmdline and "firstrun.sh" not in cmdline:
        raise ProvisionError("cmdline.txt already runs another systemd.run= script")
    _put_text(fat, stage, "firstrun.sh", FIRSTRUN_SH)
    if "firstrun.sh" not in cmdline:
        _put_text(fat, stage, "cmdline.txt", cmdline + CMDLINE_HOOK + "\n")
