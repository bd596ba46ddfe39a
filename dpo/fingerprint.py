"""Fingerprints of what a run is made of, and the data contract between prepared data and the model.

    weights_sha256(model_dir)              every weight file, whatever its format
    adapter_sha256(adapter_dir)            every adapter weight file plus adapter_config.json
    tokenizer_sha256(tokenizer)            the token definition, special ids and the chat template
    data_sha256(dataset)                   the token columns' contents
    check_data_contract(cfg)               the prepared data's tokenizer is the model's own, every id fits the
                                           embedding matrix; returns the tokenizer `final/` ships

Used by `dpo.precompute_ref` (what the stored reference log-probs were computed with) and `dpo.train` (refusing
data prepared for another model). Digests are hex sha256; a file's digest is remembered per (path, size, mtime).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from dpo.errors import UserError

# Weight files in any format a model or adapter folder may hold them in (the loaders read safetensors only, but a
# changed .bin beside them still means another model: a fingerprint must not look away from it).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.msgpack", "*.h5")
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")

_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so a run that checks twice reads big weights once."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        _FILE_DIGESTS[key] = digest.hexdigest()
    return _FILE_DIGESTS[key]


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


# ------------------------------------------------------------------------------------------------ tokenizers


def token_definition(tokenizer: Any) -> str:
    """What maps text to ids: the fast tokenizer's serialised model, normaliser, pre-tokeniser and added tokens
    (padding/truncation settings left out: they do not change an id), or the vocabulary of a slow one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return json.dumps(tokenizer.get_vocab(), sort_keys=True)
    body = json.loads(backend.to_str())
    body.pop("padding", None)
    body.pop("truncation", None)
    return json.dumps(body, sort_keys=True)


def special_ids(tokenizer: Any) -> dict[str, int | None]:
    return {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("pad", "bos", "eos", "unk")}


def tokenizer_sha256(tokenizer: Any) -> str:
    """The whole tokenizer: token definition, special ids and chat template."""
    parts = [token_definition(tokenizer), json.dumps(special_ids(tokenizer), sort_keys=True),
             json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def load_tokenizer_from(folder: str | Path, *, trust_remote_code: bool = False) -> Any | None:
    """The tokenizer saved in `folder`, or None when the folder holds none."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((folder / name).is_file() for name in names):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder}: the tokenizer cannot be loaded ({' '.join(str(exc).split())[:200]})") from None


# ------------------------------------------------------------------------------------------------- data


def data_sha256(dataset: Any) -> str:
    """sha256 of the token columns' contents (row lengths and ids, as int64), independent of how the rows are
    chunked into shards and of any other column (so adding the reference columns keeps it)."""
    if dataset._indices is not None:  # a selected/shuffled view: hash what it shows
        dataset = dataset.flatten_indices()
    digest = hashlib.sha256(f"{len(dataset)}".encode())
    for name in TOKEN_COLUMNS:
        lengths, values = hashlib.sha256(), hashlib.sha256()
        for chunk in dataset.data.column(name).chunks:
            offsets = np.asarray(chunk.offsets, dtype=np.int64)
            lengths.update(np.diff(offsets).astype("<i8").tobytes())
            values.update(np.asarray(chunk.flatten(), dtype="<i8").tobytes())
        digest.update(f"{name}:{lengths.hexdigest()}:{values.hexdigest()}".encode())
    return digest.hexdigest()


def id_range(dataset: Any) -> tuple[int, int]:
    """(smallest, largest) token id over the token columns; (0, -1) for a dataset without tokens."""
    import pyarrow.compute as pc

    low, high = 0, -1
    for name in TOKEN_COLUMNS:
        for chunk in dataset.data.column(name).chunks:
            values = chunk.flatten()
            if len(values):
                bounds = pc.min_max(values).as_py()
                low = min(low, bounds["min"]) if high >= 0 else bounds["min"]
                high = max(high, bounds["max"])
    return low, high


# ----------------------------------------------------------------------------------------- the contract


def embedding_rows(model_dir: str | Path, *, trust_remote_code: bool = False) -> int | None:
    """Rows of the model's input embedding matrix, from its config (the text model's, for a multimodal one)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code, local_files_only=True)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


def check_data_contract(cfg: Any, splits: dict[str, Any], *, log: Any = print) -> Any:
    """Refuse data prepared for another model; return the tokenizer `final/` ships (the model's own).

    The data's tokenizer (data_path/tokenizer) must define the same tokens and special ids as the model's; a
    different chat template is allowed (data_prep --chat_template gives one to a tokenizer without it) and said.
    Every id in `splits` must be a row of the embedding matrix (which may be larger than the tokenizer)."""
    data_tok = load_tokenizer_from(Path(cfg.data_path) / "tokenizer", trust_remote_code=cfg.trust_remote_code)
    model_tok = load_tokenizer_from(cfg.model_path, trust_remote_code=cfg.trust_remote_code)
    fix = (f"prepare the data again with this model's tokenizer (python -m data_prep ... --tokenizer "
           f"{cfg.model_path} --output NEW_DIR), or train the model the data was prepared for")
    if data_tok is not None and model_tok is not None:
        if token_definition(data_tok) != token_definition(model_tok):
            raise UserError(f"{cfg.data_path}/tokenizer is not {cfg.model_path}'s tokenizer (its vocabulary or "
                            f"merges differ): the data was prepared for another model; {fix}")
        data_special, model_special = special_ids(data_tok), special_ids(model_tok)
        if data_special != model_special:
            differ = ", ".join(f"{k} {data_special[k]} vs {model_special[k]}" for k in data_special
                               if data_special[k] != model_special[k])
            raise UserError(f"{cfg.data_path}/tokenizer and {cfg.model_path}'s tokenizer have other special token "
                            f"ids (data vs model: {differ}); {fix}")
        if data_tok.chat_template != model_tok.chat_template:
            log(f"[dpo] note: the data was prepared with another chat template than {cfg.model_path}'s "
                f"(data_prep --chat_template?); final/ keeps the model's tokenizer"
                + (", with the data's template" if model_tok.chat_template is None else ""))
            if model_tok.chat_template is None:
                model_tok.chat_template = data_tok.chat_template
    rows = embedding_rows(cfg.model_path, trust_remote_code=cfg.trust_remote_code)
    for name, dataset in splits.items():
        if dataset is None or rows is None:
            continue
        low, high = id_range(dataset)
        if low < 0 or high >= rows:
            raise UserError(f"{cfg.data_path}/{name}: token id {high if high >= rows else low} does not fit "
                            f"{cfg.model_path}'s embedding matrix ({rows} rows): the data was prepared for another "
                            f"model; {fix}")
    shipped = model_tok if model_tok is not None else data_tok
    if shipped is None:
        raise UserError(f"no tokenizer in {cfg.data_path}/tokenizer nor in {cfg.model_path}")
    return shipped
