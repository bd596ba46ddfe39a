"""Read raw preference files and normalise every record to one `PreferencePair`, or say exactly why not.

Inputs are `.json` (an array of records), `.jsonl` (one record per line), either optionally gzipped
(`.gz`), or a directory searched recursively for such files. A `.json` file whose first non-blank character
is `{` is read as JSON Lines. Blank lines in JSON Lines are not records.

Three record shapes, detected per file (the first record that is valid in its own shape decides, so a bad first
record cannot; later records of another shape are `mixed_shapes`), or forced with `shape=`:

- explicit:       {"prompt": str, "chosen": str, "rejected": str}
- implicit:       {"chosen": str, "rejected": str}, one conversation up to the answer (see `split_implicit`)
- conversational: {"chosen": [msg, ...], "rejected": [msg, ...], "prompt"?: [msg, ...] | str, "tools"?: [...]},
                  msg = {"role": str, "content": str}; tools: function schemas for the chat template

Extra fields are ignored. A record that cannot be used becomes a `BadRecord(location, reason, detail)` whose
location is "file:line" (the line where the record starts) and whose reason is one of `Reason`: whatever a record
holds (nesting too deep for the parser, numbers too long to convert, lone surrogate escapes such as "\\ud800"),
it is skipped and counted, never a crash.

Folders are searched recursively, skipping data_prep's own outputs and staging folders (`outputs.written_by_data_prep`),
so an output written inside an input folder is never read back as input.

A `.json` array whose text stops parsing part-way (a missing comma, a truncated file) yields one
`invalid_json` record at the line of the error, and nothing after it can be read: the records before it are
kept.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data_prep.outputs import written_by_data_prep
from data_prep.ranked import ANSWER_KEYS, RankedRecord, has_surrogate, normalise_ranked
from data_prep.records import BadRecord, Message, Reason, messages_of

__all__ = ["ANSWER_KEYS", "BadRecord", "Message", "Reason", "RankedRecord", "messages_of"]  # shared with ranked

Shape = Literal["explicit", "implicit", "conversational", "ranked"]
SHAPES: tuple[Shape, ...] = ("explicit", "implicit", "conversational", "ranked")
INPUT_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")

# The Anthropic HH assistant marker. The implicit prompt ends right after its colon (see `split_implicit`).
ASSISTANT_MARKER = "\n\nAssistant:"
MAX_EXAMPLES = 5

_LONE_SURROGATE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of undecodable bytes
_ANY_SURROGATE = re.compile("[\ud800-\udfff]")  # after parsing, only a lone "\\udXXX" escape leaves one
_WHITESPACE = re.compile(r"\s+")
_NUMBER = re.compile(r"-?[0-9][0-9.eE+-]*")


class InputError(Exception):
    """A problem with the inputs as a whole (unreadable file, no input file, nothing usable): stop."""


class BadRecordError(Exception):
    """Raised under `--on_bad_record error` at the first record that would be skipped."""

    def __init__(self, bad: BadRecord) -> None:
        super().__init__(f"{bad.location}: {bad.reason}: {bad.detail}")
        self.bad = bad


@dataclass(frozen=True)
class PreferencePair:
    """One usable record. Text shapes hold strings; conversational holds message lists.

    `chosen`/`rejected` are the responses only (without the prompt); `index` numbers the records read, in
    input order, across all files of a split; `tools` (conversational only) are function schemas for the chat
    template, from the record's optional `tools` (a list, or that list as a JSON string).
    """

    prompt: str | list[Message]
    chosen: str | list[Message]
    rejected: str | list[Message]
    shape: Shape
    location: str
    index: int
    tools: list[dict] | None = None


@dataclass
class SkipLog:
    """Counts skipped records by reason, keeps up to `MAX_EXAMPLES` locations each; raises in strict mode."""

    strict: bool = False
    counts: dict[str, int] = field(default_factory=lambda: {reason.value: 0 for reason in Reason})
    examples: dict[str, list[str]] = field(default_factory=lambda: {reason.value: [] for reason in Reason})

    def add(self, bad: BadRecord) -> None:
        if self.strict:
            raise BadRecordError(bad)
        self.counts[bad.reason.value] += 1
        if len(self.examples[bad.reason.value]) < MAX_EXAMPLES:
            self.examples[bad.reason.value].append(bad.location)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class ReadResult:
    pairs: list[PreferencePair | RankedRecord]  # RankedRecord: k scored answers (data_prep.ranked)
    records_read: int
    formats: dict[str, str]  # file -> detected (or forced) shape, "unknown" when no record had a usable shape
    skipped_folders: list[str] = field(default_factory=list)  # data_prep outputs found inside input folders


def expand_inputs(paths: list[str], *, skipped_folders: list[Path] | None = None) -> list[Path]:
    """Files named directly, plus the supported files under each named directory (recursively, sorted).

    Folders written by data_prep are not searched; they are appended to `skipped_folders` when given.
    """
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            if written_by_data_prep(path):
                raise InputError(f"{path}: a data_prep output, not raw input: pass the raw .json/.jsonl files")
            found = sorted(_search(path, [] if skipped_folders is None else skipped_folders))
            if not found:
                raise InputError(f"{path}: directory holds no {', '.join(INPUT_SUFFIXES)} files")
            files.extend(found)
        elif not path.exists():
            raise InputError(f"{path}: no such file or directory")
        elif not path.name.endswith(INPUT_SUFFIXES):
            raise InputError(f"{path}: unsupported file type (expected one of {', '.join(INPUT_SUFFIXES)})")
        else:
            files.append(path)
    return files


def _search(root: Path, skipped_folders: list[Path]) -> Iterator[Path]:
    """Supported files under `root`, not descending into folders that data_prep wrote."""
    for folder, subfolders, names in os.walk(root):
        kept = []
        for sub in sorted(subfolders):
            if written_by_data_prep(Path(folder, sub)):
                skipped_folders.append(Path(folder, sub))
            else:
                kept.append(sub)
        subfolders[:] = kept
        for name in names:
            if name.endswith(INPUT_SUFFIXES) and Path(folder, name).is_file():
                yield Path(folder, name)


def read_inputs(paths: list[str], *, shape: Shape | None, skips: SkipLog) -> ReadResult:
    """Read every record of every input, in order; bad records go to `skips`."""
    skipped_folders: list[Path] = []
    files = expand_inputs(paths, skipped_folders=skipped_folders)
    result = read_records(((str(path), iter_records(path)) for path in files), shape=shape, skips=skips)
    result.skipped_folders = [str(folder) for folder in skipped_folders]
    return result


def read_records(
    sources: Iterable[tuple[str, Iterable[tuple[str, object]]]], *, shape: Shape | None, skips: SkipLog,
    score_field: str = "overall_score",
) -> ReadResult:
    """Normalise the ("file:line", value) records of each named source (a file, or a table: `data_prep.sources`).
    `score_field`: the key of UltraFeedback completions' scores (`data_prep.ranked`)."""
    options = {"score_field": score_field}
    result = ReadResult(pairs=[], records_read=0, formats={})
    for name, records in sources:
        file_shape = shape
        # Records read before the source's shape is known wait here, in order, so that a bad first record (say
        # `"prompt": null` in an explicit file) cannot decide the shape of the whole source.
        pending: list[tuple[object, str, int]] = []
        for location, value in records:
            index = result.records_read
            result.records_read += 1
            if isinstance(value, BadRecord):
                skips.add(value)
                continue
            if file_shape is None:
                detected = _deciding_shape(value, location, index, **options)
                if detected is None:
                    pending.append((value, location, index))
                    continue
                file_shape = detected
                for waiting in pending:
                    _keep(normalise(*waiting[:2], shape=file_shape, index=waiting[2], **options), result, skips)
                pending.clear()
            _keep(normalise(value, location, shape=file_shape, index=index, forced=shape is not None, **options),
                  result, skips)
        kept_before = len(result.pairs)
        for waiting in pending:  # no record decided the source's shape: each is judged in its own shape
            _keep(normalise(*waiting[:2], shape=None, index=waiting[2], **options), result, skips)
        if file_shape is None and len(result.pairs) > kept_before:
            file_shape = result.pairs[kept_before].shape
        result.formats[name] = file_shape or "unknown"
    return result


def _deciding_shape(value: object, location: str, index: int, **options: str) -> Shape | None:
    """The record's shape if the record is valid in it (so it may decide the file's shape), else None."""
    detected = detect_shape(value, location)
    if isinstance(detected, BadRecord):
        return None
    if detected == "implicit" and isinstance(value, dict) and "prompt" in value:
        return None  # `"prompt": null`: an explicit record without its prompt, or an implicit one; let others decide
    pair = normalise(value, location, shape=detected, index=index, **options)
    return detected if not isinstance(pair, BadRecord) else None


def _keep(pair: PreferencePair | BadRecord, result: ReadResult, skips: SkipLog) -> None:
    if isinstance(pair, BadRecord):
        skips.add(pair)
    else:
        result.pairs.append(pair)


def _read_text(path: Path) -> tuple[str, bool]:
    """The file's text and whether it held undecodable bytes (kept as lone surrogates, found per record)."""
    try:
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"{path}: cannot read: {error}") from error
    try:
        return data.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        return data.decode("utf-8-sig", errors="surrogateescape"), True


def iter_records(path: Path) -> Iterator[tuple[str, object]]:
    """Yield ("file:line", parsed JSON value) per record, or ("file:line", BadRecord) if unparsable."""
    text, has_bad_bytes = _read_text(path)
    stripped = text.lstrip()
    is_array = path.name.endswith((".json", ".json.gz")) and stripped.startswith("[")
    if (
        path.name.endswith((".json", ".json.gz"))
        and stripped
        and not is_array
        and not stripped.startswith("{")
    ):
        line = text.count("\n", 0, len(text) - len(stripped)) + 1
        yield f"{path}:{line}", BadRecord(
            f"{path}:{line}", Reason.NOT_A_JSON_ARRAY, "expected '[' or JSON Lines"
        )
        return
    chunks = _array_elements(text, path) if is_array else _lines(text)
    for line, raw in chunks:
        location = f"{path}:{line}"
        if isinstance(raw, BadRecord):
            yield location, raw
        elif has_bad_bytes and _LONE_SURROGATE.search(raw):
            yield location, BadRecord(location, Reason.UNDECODABLE_BYTES, "bytes that are not valid UTF-8")
        else:
            try:
                yield location, json.loads(raw)
            except RecursionError:
                yield location, BadRecord(location, Reason.INVALID_JSON, "nested too deeply to parse")
            except ValueError as error:  # JSONDecodeError, or a number too long to convert
                yield location, BadRecord(location, Reason.INVALID_JSON, str(error))


def _lines(text: str) -> Iterator[tuple[int, str]]:
    # Split on "\n" only: str.splitlines would also split on U+2028 and friends, legal inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield number, line


def _array_elements(text: str, path: Path) -> Iterator[tuple[int, str | BadRecord]]:
    """The raw text of each element of a top-level JSON array, with the line where it starts."""
    decoder = json.JSONDecoder()
    line_of = _LineCounter(text)
    position = _skip_space(text, text.index("[") + 1)
    if position < len(text) and text[position] == "]":
        return
    while True:
        try:
            _, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            line = line_of(error.pos)
            yield line, BadRecord(f"{path}:{line}", Reason.INVALID_JSON, str(error))
            return
        except (RecursionError, ValueError) as error:
            # Too deep for the parser, or a number too long to convert: skip the element if its end can be found.
            skipped = _element_end(text, position)
            line = line_of(position)
            detail = "nested too deeply to parse" if isinstance(error, RecursionError) else str(error)
            yield line, BadRecord(f"{path}:{line}", Reason.INVALID_JSON, detail)
            if skipped is None:
                return
            end = skipped
        else:
            yield line_of(position), text[position:end]
        position = _skip_space(text, end)
        separator = text[position : position + 1]
        if separator == ",":
            position = _skip_space(text, position + 1)
        elif separator == "]":
            rest = _skip_space(text, position + 1)
            if rest < len(text):
                line = line_of(rest)
                yield line, BadRecord(f"{path}:{line}", Reason.INVALID_JSON, "extra data after the array")
            return
        else:
            line = line_of(position)
            yield line, BadRecord(
                f"{path}:{line}", Reason.INVALID_JSON, "expected ',' or ']' between records"
            )
            return


def _element_end(text: str, position: int) -> int | None:
    """The offset just past the JSON number, array or object starting at `position`, found without recursion
    (brackets counted outside strings); None when the element is none of these or never closes."""
    number = _NUMBER.match(text, position)
    if number:
        return number.end()
    if text[position : position + 1] not in ("[", "{"):
        return None
    depth, in_string, escaped = 0, False, False
    for offset in range(position, len(text)):
        char = text[offset]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                return offset + 1
    return None


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


class _LineCounter:
    """1-based line number of a character offset, for offsets that only grow (counts newlines as it goes)."""

    def __init__(self, text: str) -> None:
        self.text, self.offset, self.line = text, 0, 1

    def __call__(self, offset: int) -> int:
        self.line += self.text.count("\n", self.offset, offset)
        self.offset = offset
        return self.line


def detect_shape(value: object, location: str) -> Shape | BadRecord:
    """The shape a record has, from the types of `chosen`/`rejected` and the presence of `prompt`."""
    if not isinstance(value, dict):
        return BadRecord(location, Reason.NOT_AN_OBJECT, f"a JSON {type(value).__name__}, not an object")
    if "chosen" not in value and any(key in value for key in ANSWER_KEYS):
        return "ranked"
    missing = [key for key in ("chosen", "rejected") if key not in value]
    if missing:
        return BadRecord(location, Reason.MISSING_FIELD, f"no {missing[0]!r}")
    chosen, rejected = value["chosen"], value["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt = value.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            return BadRecord(location, Reason.WRONG_TYPE, f"'prompt' is a {type(prompt).__name__}, not a string")
        return "explicit" if prompt is not None else "implicit"
    if isinstance(chosen, list) and isinstance(rejected, list):
        return "conversational"
    return BadRecord(
        location, Reason.WRONG_TYPE, "'chosen' and 'rejected' must both be strings or both lists"
    )


def normalise(
    value: object, location: str, *, shape: Shape | None, index: int, forced: bool = False,
    score_field: str = "overall_score",
) -> PreferencePair | RankedRecord | BadRecord:
    """Validate one parsed record against `shape` (None: its own shape) and split off its prompt."""
    detected = detect_shape(value, location)
    if isinstance(detected, BadRecord):
        if not forced or detected.reason in (Reason.NOT_AN_OBJECT, Reason.MISSING_FIELD):
            return detected
    assert isinstance(value, dict)
    if not forced and shape == "explicit" and detected == "implicit" and "prompt" in value:
        return BadRecord(location, Reason.MISSING_FIELD, "'prompt' is null")
    if not forced and shape is not None and detected != shape:
        return BadRecord(location, Reason.MIXED_SHAPES, f"a {detected} record in a {shape} file")
    target: Shape = shape if shape is not None else detected  # type: ignore[assignment]
    if target == "ranked":
        if detected != "ranked":  # forced --format ranked on a pairwise record
            return BadRecord(location, Reason.MISSING_FIELD, "no 'responses' or 'completions'")
        return _valid_unicode(normalise_ranked(value, location, index=index, score_field=score_field))
    if target == "conversational":
        return _valid_unicode(_conversational(value, location, index))
    for key in ("prompt", "chosen", "rejected") if target == "explicit" else ("chosen", "rejected"):
        if key not in value or value[key] is None:
            return BadRecord(location, Reason.MISSING_FIELD, f"no {key!r}")
        if not isinstance(value[key], str):
            return BadRecord(
                location, Reason.WRONG_TYPE, f"{key!r} is a {type(value[key]).__name__}, not a string"
            )
    chosen, rejected = value["chosen"], value["rejected"]
    if not chosen.strip() or not rejected.strip():
        return BadRecord(location, Reason.EMPTY_RESPONSE, "'chosen' or 'rejected' is empty")
    if chosen == rejected:
        return BadRecord(location, Reason.CHOSEN_EQUALS_REJECTED, "identical responses")
    if target == "explicit":
        prompt = value["prompt"]
    else:
        split = split_implicit(chosen, rejected)
        if split is None:
            return BadRecord(location, Reason.NO_SHARED_PROMPT, "'chosen' and 'rejected' share no beginning")
        prompt, chosen, rejected = split
        if not chosen.strip() or not rejected.strip():
            return BadRecord(location, Reason.EMPTY_RESPONSE, "nothing follows the shared prompt")
    if not prompt.strip():
        return BadRecord(location, Reason.EMPTY_PROMPT, "the prompt is empty")
    return _valid_unicode(PreferencePair(prompt, chosen, rejected, target, location, index))


def _valid_unicode(pair: PreferencePair | RankedRecord | BadRecord) -> PreferencePair | RankedRecord | BadRecord:
    """A pair whose text holds a lone surrogate (from a "\\ud800" escape) cannot be encoded: a `BadRecord`."""
    if isinstance(pair, BadRecord):
        return pair
    if isinstance(pair, RankedRecord):
        if has_surrogate(pair, _ANY_SURROGATE):
            return BadRecord(pair.location, Reason.INVALID_UNICODE, "a lone surrogate escape (\\ud800-\\udfff)")
        return pair
    for part in (pair.prompt, pair.chosen, pair.rejected):
        texts = [part] if isinstance(part, str) else [text for message in part for text in message.values()]
        for text in texts:
            if not text.isascii() and _ANY_SURROGATE.search(text):
                return BadRecord(pair.location, Reason.INVALID_UNICODE, "a lone surrogate escape (\\ud800-\\udfff)")
    return pair


def split_implicit(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Split two texts holding the same conversation into (prompt, chosen response, rejected response).

    Rule 1 (Anthropic HH): the prompt ends right after the colon of the last "\\n\\nAssistant:" marker that
    lies wholly inside the longest common prefix; each response keeps what follows, normally a leading space:
        "\\n\\nHuman: Hi\\n\\nAssistant: Hello" / "\\n\\nHuman: Hi\\n\\nAssistant: Go away"
        -> ("\\n\\nHuman: Hi\\n\\nAssistant:", " Hello", " Go away")
    Rule 2 (no shared marker): the longest common prefix, cut back to the start of the whitespace before its
    last (possibly partial) word, so that each response starts at a word boundary with its leading space:
        "The answer is yes" / "The answer is no" -> ("The answer is", " yes", " no")
    If that cut leaves nothing, the whole common prefix is the prompt. No common prefix at all: None.
    """
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    if shared == 0:
        return None
    marker = chosen.rfind(ASSISTANT_MARKER, 0, shared)  # the whole marker lies inside the common prefix
    if marker >= 0:
        cut = marker + len(ASSISTANT_MARKER)
    else:
        spaces = list(_WHITESPACE.finditer(chosen, 0, shared))
        cut = spaces[-1].start() if spaces and spaces[-1].start() > 0 else shared
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _conversational(value: dict, location: str, index: int) -> PreferencePair | BadRecord:
    """Messages after the prompt are the responses.

    With a `prompt` (a message list, or a string meaning one user message), `chosen`/`rejected` are the
    responses (trl-lib), or whole conversations that both start with the prompt messages (UltraFeedback-binarized,
    Argilla): then the prompt is every leading message they share, so the answers are only what differs (the
    last assistant turn) and a multi-turn conversation whose `prompt` holds only its first turn is not cut
    after that turn. Without one, the leading messages that `chosen` and `rejected` share are the prompt
    (MiniMind's dpo.jsonl).
    """
    chosen, rejected = messages_of(value["chosen"], "chosen", location), messages_of(
        value["rejected"], "rejected", location
    )
    if isinstance(chosen, BadRecord):
        return chosen
    if isinstance(rejected, BadRecord):
        return rejected
    if chosen == rejected:
        return BadRecord(location, Reason.CHOSEN_EQUALS_REJECTED, "identical conversations")
    raw_prompt = value.get("prompt")
    if raw_prompt is None:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            return BadRecord(location, Reason.NO_SHARED_PROMPT, "no shared leading messages and no 'prompt'")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        if isinstance(raw_prompt, str):
            raw_prompt = [{"role": "user", "content": raw_prompt}]
        prompt = messages_of(raw_prompt, "prompt", location)
        if isinstance(prompt, BadRecord):
            return prompt
        if not prompt or not any(message["content"].strip() for message in prompt):
            return BadRecord(location, Reason.EMPTY_PROMPT, "the prompt is empty")
        if chosen[: len(prompt)] == prompt and rejected[: len(prompt)] == prompt:
            shared = len(prompt)
            while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
                shared += 1
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        else:
            chosen = chosen[len(prompt) :] if chosen[: len(prompt)] == prompt else chosen
            rejected = rejected[len(prompt) :] if rejected[: len(prompt)] == prompt else rejected
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if not any(message["content"].strip() for message in messages):
            return BadRecord(location, Reason.EMPTY_RESPONSE, f"no {name} message after the prompt")
    if chosen == rejected:
        return BadRecord(location, Reason.CHOSEN_EQUALS_REJECTED, "identical responses after the prompt")
    tools = _tools(value.get("tools"), location)
    if isinstance(tools, BadRecord):
        return tools
    return PreferencePair(prompt, chosen, rejected, "conversational", location, index, tools)


def _tools(value: object, location: str) -> list[dict] | None | BadRecord:
    """A record's `tools`: None, a list of JSON objects or that list as a JSON string; empty means none."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            return BadRecord(location, Reason.WRONG_TYPE, f"'tools' is a string but not JSON: {error}")
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        return BadRecord(location, Reason.WRONG_TYPE, "'tools' must be a list of objects (function schemas)")
    return value
