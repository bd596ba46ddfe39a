"""The data contract between data_prep and training, defined once: what a prepared folder holds, how its identity
is hashed, and the check training runs before it trusts the folder.

    TOKEN_COLUMNS, REF_COLUMNS, PREP_FEATURES     the columns of a split (data_prep writes PREP_FEATURES;
                                                  dpo.precompute_ref adds REF_COLUMNS)
    split_sha256(dataset)                         one split's token columns (lengths and ids, as int64)
    data_sha256(split_hashes)                     the whole data: its splits' hashes, by split name
    tokenizer_sha256(tokenizer)                   token definition, special ids and chat template
    stamp_report(report, folder)                  records those hashes of a written folder in its report
    check_data_contract(cfg, splits)              training's check -> PreparedData (verified hashes, the tokenizer
                                                  final/ ships)

data_prep writes `prep_report.json` with `stamp_report`; training recomputes the same functions on what it loads and
compares. Refused, each with one line naming the file and what to do: an unreadable report, a split whose token
columns differ from the report (changed after data_prep wrote it), a split the report does not list or a listed one
that is gone, a `tokenizer/` that is not the one the report names, a tokenizer with other tokens or special ids than
the model's, and ids outside the model's embedding matrix. A folder without a report, or with one from before these
hashes (Arrow shards written by other means, an older data_prep), is said in the log and checked against the model
only (tokenizer, ids); its hashes are computed here with the same functions. A chat template that
differs from the model's is allowed (data_prep --chat_template gives one to a tokenizer without it) and said.
The verified split hashes are the data's identity for the precomputed reference's fingerprint (dpo.reference).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import datasets
import numpy as np
import pyarrow.compute as pc
from transformers import AutoConfig, AutoTokenizer

from dpo.errors import UserError

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
PREP_FEATURES = datasets.Features({
    **{name: datasets.List(datasets.Value("int32")) for name in TOKEN_COLUMNS},
    "source_index": datasets.Value("int64"),  # the record's number among the records read for its split
})
SPLITS = ("train", "eval")
REPORT_NAME = "prep_report.json"
TOKENIZER_DIR = "tokenizer"


# ------------------------------------------------------------------------------------------------ hashes


def split_sha256(dataset: datasets.Dataset) -> str:
    """sha256 of one split's token columns (row lengths and ids, as int64): independent of how the rows are
    chunked into shards, of int32/int64 storage and of any other column (adding the reference columns keeps it).
    A ranked split's answers and scores are hashed too (a pairwise split's hash is what it always was)."""
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
    if "responses_ids" in dataset.column_names:  # k answers per prompt: every answer and its score count too
        digest.update(f"ranked:{_ranked_sha256(dataset)}".encode())
    return digest.hexdigest()


def _ranked_sha256(dataset: datasets.Dataset) -> str:
    """sha256 of a ranked split's answers (answer counts, their lengths and ids, as int64) and scores (float64)."""
    digest = hashlib.sha256()
    for chunk in dataset.data.column("responses_ids").chunks:
        answers = chunk.flatten()
        digest.update(np.diff(np.asarray(chunk.offsets, dtype=np.int64)).astype("<i8").tobytes())
        digest.update(np.diff(np.asarray(answers.offsets, dtype=np.int64)).astype("<i8").tobytes())
        digest.update(np.asarray(answers.flatten(), dtype="<i8").tobytes())
    for chunk in dataset.data.column("scores").chunks:
        digest.update(np.asarray(chunk.flatten(), dtype="<f8").tobytes())
    return digest.hexdigest()


def data_sha256(split_hashes: Mapping[str, str]) -> str:
    """One digest of the whole data: each split's `split_sha256`, by split name (sorted)."""
    digest = hashlib.sha256()
    for name in sorted(split_hashes):
        digest.update(f"{name}:{split_hashes[name]};".encode())
    return digest.hexdigest()


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
    """The whole tokenizer: token definition, special ids and chat template. The same after save_pretrained and
    from_pretrained."""
    parts = [token_definition(tokenizer), json.dumps(special_ids(tokenizer), sort_keys=True),
             json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ the report


def stamp_report(report: dict[str, Any], folder: str | Path) -> dict[str, Any]:
    """Record in `report` the hashes of the prepared `folder` as written (its splits and `tokenizer/`), the values
    training checks: `data_hashes` (split -> `split_sha256`), `data_hash` and `tokenizer.hash`. Returns `report`."""
    folder = Path(folder)
    hashes = {name: split_sha256(datasets.load_from_disk(str(folder / name)))
              for name in SPLITS if (folder / name).is_dir()}
    report["data_hashes"] = hashes
    report["data_hash"] = data_sha256(hashes)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR), local_files_only=True)
    report.setdefault("tokenizer", {})["hash"] = tokenizer_sha256(tokenizer)
    return report


def read_report(data_path: str | Path, *, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """`data_path/prep_report.json` when it holds the hashes training checks; None, said in the log, when there is
    no report or one from before those hashes (Arrow shards made another way, or by an older data_prep): such data
    is still checked against the model, not against a report. An unreadable report is refused."""
    path = Path(data_path) / REPORT_NAME
    redo = f"prepare the data with `python -m data_prep --input ... --tokenizer MODEL --output {data_path}`"
    unverified = ("the data is checked against the model (token ids, tokenizer) but cannot be verified against "
                  f"what data_prep wrote; {redo} for a verified run")
    if not path.is_file():
        log(f"[dpo] note: {path} is missing: {unverified}")
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({' '.join(str(exc).split())[:120]}); {redo}") from None
    hashes = report.get("data_hashes") if isinstance(report, dict) else None
    tokenizer = report.get("tokenizer") if isinstance(report, dict) else None
    if not isinstance(report, dict):
        raise UserError(f"{path}: not a data_prep report (a JSON object); {redo}")
    if not isinstance(hashes, dict) or not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("hash"), str):
        log(f"[dpo] note: {path} has no data_hashes and tokenizer hash (written by an older data_prep, or not by "
            f"data_prep): {unverified}")
        return None
    return report


# ------------------------------------------------------------------------------------------- training's check


@dataclass(frozen=True)
class PreparedData:
    """The prepared data as verified against its report (when it has one)."""

    splits: dict[str, datasets.Dataset]  # the splits present ("train", and "eval" when there is one)
    hashes: dict[str, str]  # split -> split_sha256, equal to the report's
    tokenizer_hash: str  # tokenizer_sha256 of data_path/tokenizer (equal to the report's), else the model's
    tokenizer: Any  # the tokenizer final/ ships: the model's own (with the data's template if it has none)


def load_tokenizer_from(folder: str | Path, *, trust_remote_code: bool = False) -> Any | None:
    """The tokenizer saved in `folder`, or None when the folder holds none."""
    folder = Path(folder)
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((folder / name).is_file() for name in names):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder}: the tokenizer cannot be loaded ({' '.join(str(exc).split())[:200]})") from None


def id_range(dataset: datasets.Dataset) -> tuple[int, int]:
    """(smallest, largest) token id over the token columns; (0, -1) for a dataset without tokens."""
    low, high = 0, -1
    for name in TOKEN_COLUMNS:
        for chunk in dataset.data.column(name).chunks:
            values = chunk.flatten()
            if len(values):
                bounds = pc.min_max(values).as_py()
                low = min(low, bounds["min"]) if high >= 0 else bounds["min"]
                high = max(high, bounds["max"])
    return low, high


def embedding_rows(model_dir: str | Path, *, trust_remote_code: bool = False) -> int | None:
    """Rows of the model's input embedding matrix, from its config (the text model's, for a multimodal one)."""
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code, local_files_only=True)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


def verified_split_hashes(data_path: str | Path, report: dict[str, Any],
                          splits: Mapping[str, datasets.Dataset]) -> dict[str, str]:
    """Each split's `split_sha256`, refused unless it equals the report's (and the report lists no other split)."""
    stored = report["data_hashes"]
    hashes = {}
    for name, dataset in splits.items():
        if name not in stored:
            raise UserError(f"{data_path}/{name}: not in {REPORT_NAME} (which lists {sorted(stored) or 'no split'}): "
                            f"it was added after data_prep wrote the folder; prepare the data again")
        hashes[name] = split_sha256(dataset)
        if hashes[name] != stored[name]:
            raise UserError(f"{data_path}/{name}: its token columns differ from {REPORT_NAME} (sha256 "
                            f"{hashes[name][:12]} vs {str(stored[name])[:12]}): the data changed after data_prep "
                            f"wrote it; prepare it again")
    absent = sorted(set(stored) - set(splits))
    if absent:
        raise UserError(f"{data_path}/{absent[0]}: missing, but {REPORT_NAME} lists it; prepare the data again")
    return hashes


def check_tokenizers(cfg: Any, report: dict[str, Any] | None, *, log: Callable[[str], None]) -> tuple[str, Any]:
    """(the data tokenizer's hash, the tokenizer final/ ships). The data's `tokenizer/` must be the one the report
    names; it must define the same tokens and special ids as the model's (the chat template may differ). Without a
    report (None) a data folder without `tokenizer/` is taken to use the model's tokenizer."""
    folder = Path(cfg.data_path) / TOKENIZER_DIR
    data_tok = load_tokenizer_from(folder, trust_remote_code=cfg.trust_remote_code)
    model_tok = load_tokenizer_from(cfg.model_path, trust_remote_code=cfg.trust_remote_code)
    if data_tok is None and report is None and model_tok is not None:
        return tokenizer_sha256(model_tok), model_tok
    if data_tok is None:
        raise UserError(f"{folder}: missing, but the data's ids mean something only with the tokenizer they were "
                        f"made with; prepare the data again")
    data_hash = tokenizer_sha256(data_tok)
    if report is not None and data_hash != report["tokenizer"]["hash"]:
        raise UserError(f"{folder}: not the tokenizer {REPORT_NAME} names (sha256 {data_hash[:12]} vs "
                        f"{report['tokenizer']['hash'][:12]}): it changed after data_prep wrote it; prepare the "
                        f"data again")
    if model_tok is None or tokenizer_sha256(model_tok) == data_hash:
        return data_hash, model_tok if model_tok is not None else data_tok
    fix = (f"prepare the data again with this model's tokenizer (python -m data_prep ... --tokenizer "
           f"{cfg.model_path} --output NEW_DIR), or train the model the data was prepared for")
    if token_definition(data_tok) != token_definition(model_tok):
        raise UserError(f"{cfg.data_path}/tokenizer is not {cfg.model_path}'s tokenizer (its vocabulary or merges "
                        f"differ): the data was prepared for another model; {fix}")
    data_special, model_special = special_ids(data_tok), special_ids(model_tok)
    if data_special != model_special:
        differ = ", ".join(f"{k} {data_special[k]} vs {model_special[k]}" for k in data_special
                           if data_special[k] != model_special[k])
        raise UserError(f"{cfg.data_path}/tokenizer and {cfg.model_path}'s tokenizer have other special token ids "
                        f"(data vs model: {differ}); {fix}")
    if data_tok.chat_template != model_tok.chat_template:
        log(f"[dpo] note: the data was prepared with another chat template than {cfg.model_path}'s "
            f"(data_prep --chat_template?); final/ keeps the model's tokenizer"
            + (", with the data's template" if model_tok.chat_template is None else ""))
        if model_tok.chat_template is None:
            model_tok.chat_template = data_tok.chat_template
    return data_hash, model_tok


def check_data_contract(cfg: Any, splits: Mapping[str, datasets.Dataset | None], *,
                        log: Callable[[str], None] = print) -> PreparedData:
    """Verify the loaded `splits` (None: absent) of `cfg.data_path` against its prep_report.json and the model;
    raise UserError naming the first problem. Every id must be a row of the embedding matrix (which may be larger
    than the tokenizer)."""
    present = {name: dataset for name, dataset in splits.items() if dataset is not None}
    report = read_report(cfg.data_path, log=log)
    if report is None:  # nothing to verify against (said in the log): the same hash, computed here
        hashes = {name: split_sha256(dataset) for name, dataset in present.items()}
    else:
        hashes = verified_split_hashes(cfg.data_path, report, present)
    tokenizer_hash, shipped = check_tokenizers(cfg, report, log=log)
    rows = embedding_rows(cfg.model_path, trust_remote_code=cfg.trust_remote_code)
    for name, dataset in present.items():
        if rows is None:
            break
        low, high = id_range(dataset)
        if low < 0 or high >= rows:
            raise UserError(f"{cfg.data_path}/{name}: token id {high if high >= rows else low} does not fit "
                            f"{cfg.model_path}'s embedding matrix ({rows} rows): the data was prepared for another "
                            f"model; prepare the data again with this model's tokenizer (python -m data_prep ... "
                            f"--tokenizer {cfg.model_path} --output NEW_DIR), or train the model the data was "
                            f"prepared for")
    return PreparedData(splits=present, hashes=hashes, tokenizer_hash=tokenizer_hash, tokenizer=shipped)
