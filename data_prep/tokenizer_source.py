"""The tokenizer for data prep, from local files only, with one clear line for each way it can fail.

`--tokenizer` is a folder (the SFT model's, or one written by `save_pretrained`), or a model name already in the
local Hugging Face cache. Nothing is downloaded: a name that is neither fails at once instead of retrying the
network. A missing path, a file, a folder without tokenizer files, files that do not load and a chat template
with a syntax error each get their own `InputError` message.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import TemplateSyntaxError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from data_prep.formats import InputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _looks_like_path(name: str) -> bool:
    """A name that can only be a folder path, not a Hugging Face model name ("name" or "org/name")."""
    return name.startswith(("/", "~", ".")) or "\\" in name or name.endswith("/") or name.count("/") > 1


def load_tokenizer(name_or_path: str, chat_template: Path | None) -> tuple[PreTrainedTokenizerBase, bool]:
    """The tokenizer with `chat_template` applied, and whether a pad token (EOS) had to be set.

    Local only: a folder, or a model name already in the local Hugging Face cache; never a download.
    """
    path = Path(name_or_path).expanduser()
    where = f"--tokenizer {name_or_path}"
    if path.is_file():
        raise InputError(f"{where}: a file; pass the folder that holds it (the SFT model's folder)")
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"{where}: the folder holds no {' or '.join(TOKENIZER_FILES)}; pass the SFT model's folder "
            "(or one written by the tokenizer's save_pretrained)"
        )
    if not path.is_dir() and _looks_like_path(name_or_path):
        raise InputError(f"{where}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(path) if path.is_dir() else name_or_path, local_files_only=True, trust_remote_code=False
        )
    except Exception as error:  # whatever the files hold, it is the user's tokenizer that does not load
        if not path.is_dir():
            raise InputError(
                f"{where}: no such folder, and no model of that name in the local Hugging Face cache; data_prep "
                f"never downloads: download it first (hf download {name_or_path} --local-dir DIR) and pass DIR"
            ) from error
        first = (str(error).strip().splitlines() or [""])[0]
        raise InputError(f"{where}: cannot load the tokenizer: {type(error).__name__}: {first}") from error
    if chat_template is not None:
        try:
            tokenizer.chat_template = chat_template.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"--chat_template {chat_template}: cannot read: {error}") from error
    if tokenizer.chat_template:
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        except TemplateSyntaxError as error:
            source = f"--chat_template {chat_template}" if chat_template else f"{where}: its chat template"
            raise InputError(f"{source}: template syntax error, line {error.lineno}: {error.message}") from error
        except Exception:  # a template may reject this probe conversation: records are judged one by one
            pass
    pad_added = tokenizer.pad_token is None
    if pad_added:
        # Training pads with this id but masks by length, so sharing the EOS id is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, pad_added
