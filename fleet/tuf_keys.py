"""The TUF repository's signing keys on disk: generate them, load them, check each against
the role it claims in root.

Keys (``keys_dir``, mode 0700): ``targets.pem``, ``snapshot.pem``, ``timestamp.pem`` (the
online keys) and ``root-1.pem`` … ``root-K.pem`` (possibly in a separate, offline
directory). PKCS#8 PEM, mode 0600; an existing key is never overwritten.
:mod:`fleet.tuf_repo` signs metadata with them.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Root, Snapshot, Targets, Timestamp

from edgeship.fleet.errors import RepositoryError
from edgeship.fleet.files import write_new

ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)


def _write_key(path: Path, signer: CryptoSigner) -> None:
    write_new(path, signer.private_bytes, mode=0o600)


def _key_files(keys_dir: Path, role: str) -> list[Path]:
    if role == Root.type:
        return sorted(keys_dir.glob("root-*.pem"))
    path = keys_dir / f"{role}.pem"
    return [path] if path.exists() else []


def empty_keys_dir(keys_dir: Path) -> Path:
    """``keys_dir``, made (mode 0700) if missing; refused when it holds a key already."""
    keys_dir = Path(keys_dir)
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(keys_dir.glob("*.pem")):
        raise RepositoryError(f"keys directory {keys_dir} already holds keys; refusing to "
                              "overwrite them")
    return keys_dir


def generate_root_keys(root_keys_dir: Path, count: int) -> list[CryptoSigner]:
    signers = [CryptoSigner.generate_ed25519() for _ in range(count)]
    for i, signer in enumerate(signers, start=1):
        _write_key(root_keys_dir / f"root-{i}.pem", signer)
    return signers


def generate_keys(keys_dir: Path, root_keys_dir: Path,
                  root_keys: int) -> dict[str, list[CryptoSigner]]:
    """``root_keys`` root keys into ``root_keys_dir``, one key per online role into
    ``keys_dir``; both directories must hold no key yet."""
    empty_keys_dir(keys_dir)
    if root_keys_dir != keys_dir:
        empty_keys_dir(root_keys_dir)
    signers: dict[str, list[CryptoSigner]] = {
        Root.type: generate_root_keys(root_keys_dir, root_keys)}
    for role in ROLES[1:]:
        signers[role] = [CryptoSigner.generate_ed25519()]
        _write_key(keys_dir / f"{role}.pem", signers[role][0])
    return signers


def load_signers(keys_dir: Path, root: Root, roles: tuple[str, ...]) -> dict[str, list]:
    """Load the private keys for ``roles`` and check each belongs to its role in ``root``."""
    signers: dict[str, list] = {}
    for role in roles:
        role_keys = root.roles[role]
        found = []
        for path in _key_files(Path(keys_dir), role):
            try:
                private = load_pem_private_key(path.read_bytes(), None)
            except (OSError, ValueError, TypeError) as e:
                raise RepositoryError(f"cannot load key {path}: {e}") from e
            public = SSlibKey.from_crypto(private.public_key())
            if public.keyid not in role_keys.keyids:
                raise RepositoryError(f"key {path} is not a {role} key of this repository")
            found.append(CryptoSigner(private, public))
        if len(found) < role_keys.threshold:
            raise RepositoryError(f"{keys_dir} holds {len(found)} {role} key(s); threshold "
                                  f"is {role_keys.threshold}")
        signers[role] = found
    return signers
