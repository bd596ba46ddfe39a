"""Fingerprints of weight files: what a model or adapter folder is, whatever its format or location.

    file_sha256(path)                      one file (checkpoint manifests)
    weights_sha256(model_dir)              every weight file, whatever its format
    adapter_sha256(adapter_dir)            every adapter weight file plus adapter_config.json

Used by `dpo.reference` (what stored reference log-probs were computed with) and `dpo.checkpoint` (manifests).
The data's and the tokenizer's hashes are part of the data contract (`dpo.contract`). Digests are hex sha256.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from dpo.errors import UserError

# Weight files in any format a model or adapter folder may hold them in (the loaders read safetensors only, but a
# changed .bin beside them still means another model: a fingerprint must not look away from it).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.msgpack", "*.h5")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: str | Path, patterns: tuple[str, ...], *, also: tuple[str, ...] = ()) -> str:
    """One digest over the files of `folder` matching `patterns` (at least one must), plus the named `also`
    files when present, by relative name then content. Sub-folders count (sharded or nested weights)."""
    folder = Path(folder)
    files = sorted({p for pattern in patterns for p in folder.rglob(pattern) if p.is_file()})
    if not files:
        raise UserError(f"{folder}: no weight files ({', '.join(patterns)}) to fingerprint")
    files += sorted(folder / name for name in also if (folder / name).is_file())
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\0".encode())
    return digest.hexdigest()


def weights_sha256(model_dir: str | Path) -> str:
    """The weight files only: a copy of the weights in a folder of their own is the same model (config.json also
    carries version stamps that change on every re-save)."""
    return folder_sha256(model_dir, WEIGHT_PATTERNS)


def adapter_sha256(adapter_dir: str | Path) -> str:
    return folder_sha256(adapter_dir, WEIGHT_PATTERNS, also=("adapter_config.json",))
