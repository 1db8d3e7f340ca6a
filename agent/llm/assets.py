"""A language-model variant is one signed ONNX file that carries its own tokenizer.

The converter stores the tokenizer files, ``genai_config.json`` and the generation config
as ONNX ``metadata_props`` entries named ``edgeship.llm/<file name>``; so the one file TUF
signs and the delta machinery diffs is all a device needs, and a fine-tuned version with the
same tokenizer differs only in its weights.

On the device, ``materialize`` lays those files out beside the model file in the directory
shape ``onnxruntime-genai`` loads (``genai_config.json`` + ``model.onnx`` as a symlink to the
variant file). Reading the entries needs no ``onnx`` package: ``read_metadata`` walks the
top-level protobuf fields of the file and skips the graph by seeking past it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import BinaryIO

from edgeship.agent.errors import BundleError, Reason

PREFIX = "edgeship.llm/"
GENAI_CONFIG = "genai_config.json"
MODEL_LINK = "model.onnx"
MARKER = ".edgeship-assets"
ALLOWED = ("genai_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "generation_config.json", "chat_template.jinja",
           "added_tokens.json")
_METADATA_FIELD = 14  # ModelProto.metadata_props
MAX_METADATA_BYTES = 64 * 1024 * 1024


def _varint(f: BinaryIO) -> int | None:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            if shift == 0:
                return None
            raise BundleError("ONNX file ends inside a varint", reason_code=Reason.BUNDLE_INVALID)
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise BundleError("ONNX file has a bad varint", reason_code=Reason.BUNDLE_INVALID)


def _string_pair(data: bytes) -> tuple[str, str]:
    """Parse a StringStringEntryProto (key = field 1, value = field 2)."""
    import io

    f, out = io.BytesIO(data), {1: b"", 2: b""}
    while (tag := _varint(f)) is not None:
        if tag & 7 != 2:
            raise BundleError("bad metadata entry in ONNX file", reason_code=Reason.BUNDLE_INVALID)
        n = _varint(f) or 0
        out[tag >> 3] = f.read(n)
    return out[1].decode(), out[2].decode()


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """``metadata_props`` of an ONNX file, reading only the top-level fields."""
    found: dict[str, str] = {}
    total = 0
    with open(path, "rb") as f:
        while (tag := _varint(f)) is not None:
            field, wire = tag >> 3, tag & 7
            if wire == 0:
                _varint(f)
            elif wire == 2:
                n = _varint(f) or 0
                if field == _METADATA_FIELD:
                    total += n
                    if total > MAX_METADATA_BYTES:
                        raise BundleError("ONNX metadata is too large",
                                          reason_code=Reason.BUNDLE_INVALID)
                    key, value = _string_pair(f.read(n))
                    found[key] = value
                else:
                    f.seek(n, os.SEEK_CUR)
            elif wire in (1, 5):
                f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
            else:
                raise BundleError(f"{path}: not an ONNX file (wire type {wire})",
                                  reason_code=Reason.BUNDLE_INVALID)
    return found


def llm_assets(path: str | os.PathLike) -> dict[str, str]:
    assets = {k[len(PREFIX):]: v for k, v in read_metadata(path).items() if k.startswith(PREFIX)}
    if GENAI_CONFIG not in assets or "tokenizer.json" not in assets:
        raise BundleError(f"{Path(path).name} carries no tokenizer or genai config",
                          reason_code=Reason.BUNDLE_INVALID)
    return {k: v for k, v in assets.items() if k in ALLOWED}


def materialize(model_file: str | os.PathLike, dest: str | os.PathLike | None = None) -> Path:
    """Lay out ``model_file``'s assets as an onnxruntime-genai model directory (reused when
    already there for the same contents); returns the directory."""
    model_file = Path(model_file).resolve()
    out = Path(dest) if dest is not None else model_file.with_name(model_file.name + ".genai")
    assets = llm_assets(model_file)
    config = json.loads(assets[GENAI_CONFIG])
    config["model"]["decoder"]["filename"] = MODEL_LINK
    assets[GENAI_CONFIG] = json.dumps(config, indent=2)
    digest = hashlib.sha256(json.dumps(sorted(assets.items())).encode()
                            + str(model_file).encode()).hexdigest()
    if (out / MARKER).is_file() and (out / MARKER).read_text() == digest:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for name, text in assets.items():
        (out / name).write_text(text)
    link = out / MODEL_LINK
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(model_file)
    (out / MARKER).write_text(digest)
    return out


def genai_config(model_file: str | os.PathLike) -> dict:
    return json.loads(llm_assets(model_file)[GENAI_CONFIG])
