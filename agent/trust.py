"""Device-side trust rules on top of python-tuf: what a *verified* target may be used for.

TUF proves who signed a target; these pure checks decide whether this device may install it:
the signed custom fields must name the model and version being installed, the target's
hardware classes must include one of the device's, and a model version never goes below the
highest version this device has ever installed (persisted, so it survives restarts and a
wiped model store).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from edgeship.agent.errors import Reason, VerificationError
from edgeship.common.fsutil import atomic_write

logger = logging.getLogger(__name__)

#: Key of edgeship's custom fields in a TUF target (``custom: {"edgeship": {...}}``).
CUSTOM_KEY = "edgeship"


def target_custom(info: Any) -> dict[str, Any]:
    """edgeship's custom fields of a tuf ``TargetFile`` (empty when absent/malformed)."""
    custom = (getattr(info, "unrecognized_fields", None) or {}).get("custom") or {}
    fields = custom.get(CUSTOM_KEY) if isinstance(custom, dict) else None
    return fields if isinstance(fields, dict) else {}


def check_target(info: Any, model: str, version: int,
                 hardware_classes: tuple[str, ...]) -> dict[str, Any]:
    """Raise VerificationError unless the signed target belongs to ``model`` v``version``
    and (for a model variant) is built for one of ``hardware_classes``."""
    custom = target_custom(info)
    if custom.get("model") != model or custom.get("version") != version:
        raise VerificationError(
            f"target {info.path} is signed for {custom.get('model')!r} "
            f"v{custom.get('version')!r}, not {model} v{version}",
            reason_code=Reason.METADATA_INVALID)
    hardware = custom.get("hardware")
    if custom.get("kind") == "variant":
        if not isinstance(hardware, list) or not set(hardware) & set(hardware_classes):
            raise VerificationError(
                f"target {info.path} is built for {hardware!r}; this device is "
                f"{list(hardware_classes)!r}", reason_code=Reason.HARDWARE_MISMATCH)
    return custom


class VersionFloor:
    """Highest model version ever installed, per model, in one atomic JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def _read(self) -> dict[str, int]:
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:  # corrupt: refuse rather than forget the floor
            raise VerificationError(f"cannot read version floor {self.path}: {e}",
                                    reason_code=Reason.INTERNAL) from e
        return {k: v for k, v in raw.items() if isinstance(v, int)}

    def get(self, model: str) -> int:
        with self._lock:
            return self._read().get(model, 0)

    def raise_to(self, model: str, version: int) -> None:
        with self._lock:
            floors = self._read()
            if version > floors.get(model, 0):
                floors[model] = version
                atomic_write(self.path, json.dumps(floors, sort_keys=True).encode())

    def check(self, model: str, version: int) -> None:
        floor = self.get(model)
        if version < floor:
            raise VerificationError(f"{model} v{version} is older than v{floor}, which this "
                                    "device has installed", reason_code=Reason.ROLLBACK)


class DesiredVerifier:
    """Checks a desired state's signature against the timestamp keys of the device's
    trusted TUF root (``tuf/root.json``, kept current by every metadata refresh): the key
    the fleet server holds online. Raises :class:`VerificationError` (``bad_signature``)."""

    def __init__(self, root_path: Path, device: str) -> None:
        self.root_path = Path(root_path)
        self.device = device

    def __call__(self, desired: Any) -> None:
        from securesystemslib.exceptions import UnverifiedSignatureError
        from securesystemslib.signer import Signature
        from tuf.api.metadata import Metadata

        assert desired.sig is not None
        keyid, sig = desired.sig
        try:
            root = Metadata.from_bytes(self.root_path.read_bytes()).signed
            role = root.roles["timestamp"]
        except Exception as e:  # unreadable root: refuse rather than trust
            raise VerificationError(f"cannot read the trusted root {self.root_path}: {e}",
                                    reason_code=Reason.METADATA_INVALID) from e
        if keyid not in role.keyids:
            raise VerificationError(f"desired state for {desired.model} is signed by key "
                                    f"{keyid[:16]}, not by the fleet",
                                    reason_code=Reason.BAD_SIGNATURE)
        try:
            root.keys[keyid].verify_signature(Signature(keyid, sig),
                                              desired.signing_bytes(self.device))
        except UnverifiedSignatureError as e:
            raise VerificationError(f"desired state for {desired.model}: bad signature",
                                    reason_code=Reason.BAD_SIGNATURE) from e
