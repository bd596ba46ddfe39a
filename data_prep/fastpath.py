"""Exact fast encoding of (prompt, prompt + chosen, prompt + rejected) texts for plain byte-level BPE tokenizers.

`FastTripleEncoder.encode` returns, for each rendered triple, exactly the ids that
`backend.encode_batch_fast([prompt, full_chosen, full_rejected], add_special_tokens=False)` returns, with about
40% of the text encoded instead of 100% (the prompt once, not three times) and most of it by a word cache.

It is used only for the pipeline it is proven for (`eligibility`): no normaliser, the GPT-2 `ByteLevel`
pre-tokenizer (`use_regex=True`, `add_prefix_space=False`), a BPE model without dropout, added tokens without
lstrip/rstrip/single_word, no truncation or padding set on the backend. Anything else returns None and the caller
keeps the full encode.

Why the tail window is exact. Encoding is: split out added tokens (leftmost-longest literal matches), split each
remaining segment with the GPT-2 regex
    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
(every character matched, no look-behind), then BPE each piece on its own. No regex alternative can match a
non-whitespace character followed by " " (a space is only ever a match's first character or part of a
whitespace run), and no eligible added token contains such a pair. So at a position `w` with X[w] == " " and
X[w - 1] not whitespace, every split of X is a boundary: nothing before `w` looks past X[w], and the scan
restarts at `w` exactly as it starts a fresh text. Hence encode(X) == encode(X[:w]) + encode(X[w:]) for any
text X that agrees with the prompt P up to and including X[w]. With w the last such position of P shared by
both full texts F:
    encode(P) = head + encode(P[w:]),   encode(F) = head + encode(F[w:]),   head = encode(P[:w])
so only the short tail P[w:] is encoded three times. Where no such `w` exists, w = 0: the full texts.

Why the word cache is exact. For a text of only printable ASCII, tab, newline and carriage return, every
Unicode class in the regex above is an ASCII class, so Python's `re` with the ASCII pattern below splits it
exactly as the tokenizer does; each piece is then mapped to byte-level characters and given to the tokenizer's
own BPE model (`model.tokenize`), remembered per piece. Other texts go to the Rust encoder unchanged.
`FastTripleEncoder.from_tokenizer` also compares both routes with the full encode on probe texts and declines
on any difference.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

# The GPT-2 pattern with its Unicode classes restricted to the characters `_ASCII_TEXT` admits:
# \p{L} -> [A-Za-z], \p{N} -> [0-9], \s -> [\t\n\r ].
_ASCII_PIECES = re.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\t\n\r A-Za-z0-9]+|[\t\n\r ]+(?![^\t\n\r ])|[\t\n\r ]+"
)
_NOT_ASCII_TEXT = re.compile(r"[^\t\n\r\x20-\x7e]")
_NON_SPACE_THEN_SPACE = re.compile(r"\S ")
_CACHE_LIMIT = 1 << 20
_PRE_TOKENIZER_KEYS = {"type", "add_prefix_space", "trim_offsets", "use_regex"}
_POST_PROCESSORS = {"TemplateProcessing", "ByteLevel", "RobertaProcessing", "BertProcessing", "Sequence"}
PROBE_TEXTS = (
    "Hello world, it's   a test.\n\nAnswer: yes",
    " leading space and trailing spaces   ",
    "tabs\tand\r\nnewlines\n\n  indented 12345 numbers 3.14",
    "<s>special</s> tokens <|user|>\nHi</s>\n<|assistant|>\n",
    "unicode: café naïve 日本語 — “quotes” ",
    "x",
    "",
)


def _byte_level_table() -> dict[int, str]:
    """GPT-2's bytes -> printable characters map, for the ASCII code points the word cache handles."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return {byte: char for byte, char in table.items() if byte < 128}


def eligibility(backend: Tokenizer) -> str | None:
    """None when the fast path is exact for `backend`, else the reason it is not."""
    state = json.loads(backend.to_str())
    model = state.get("model") or {}
    pre = state.get("pre_tokenizer") or {}
    post = state.get("post_processor")
    if state.get("normalizer") is not None:
        return "has a normalizer"
    if pre.get("type") != "ByteLevel" or set(pre) - _PRE_TOKENIZER_KEYS:
        return "pre-tokenizer is not a plain ByteLevel"
    if pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return "ByteLevel pre-tokenizer adds a prefix space or has no regex"
    if model.get("type") != "BPE" or model.get("dropout") not in (None, 0, 0.0):
        return "model is not a BPE without dropout"
    if state.get("truncation") is not None or state.get("padding") is not None:
        return "truncation or padding is set on the tokenizer"
    if post is not None and post.get("type") not in _POST_PROCESSORS:
        return f"unknown post-processor {post.get('type')}"
    if getattr(backend, "encode_special_tokens", False):
        return "special tokens are encoded as text"
    for token in state.get("added_tokens") or []:
        if token["lstrip"] or token["rstrip"] or token["single_word"]:
            return f"added token {token['content']!r} strips or matches single words"
        if _NON_SPACE_THEN_SPACE.search(token["content"]):
            return f"added token {token['content']!r} holds a space after another character"
    return None


def tail_start(prompt: str, limit: int) -> int:
    """The last w < limit with prompt[w] == " " and prompt[w - 1] not whitespace; 0 when there is none."""
    position = prompt.rfind(" ", 0, limit)
    while position > 0:
        if not prompt[position - 1].isspace():
            return position
        position = prompt.rfind(" ", 0, position)
    return 0


def shared_length(a: str, b: str) -> int:
    """Length of the common prefix of two strings, by bisection on C-speed prefix comparisons."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


class FastTripleEncoder:
    """Exact, faster `encode_batch_fast` of (prompt, prompt + chosen, prompt + rejected) triples; see the module."""

    def __init__(self, backend: Tokenizer) -> None:
        self.backend = backend
        self.model = backend.model
        self.byte_level = str.maketrans(_byte_level_table())
        state = json.loads(backend.to_str())
        # Added tokens are split out in two passes, as the tokenizer does: those matched on the raw text first,
        # then those matched on the normalised text (the same text here, as there is no normaliser).
        self.added_ids = {token["content"]: token["id"] for token in state.get("added_tokens") or []}
        passes = [
            [token["content"] for token in state.get("added_tokens") or [] if token["normalized"] is normalized]
            for normalized in (False, True)
        ]
        self.added_patterns = [self._literal_pattern(contents) for contents in passes]
        self.cache: dict[str, list[int]] = {}

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> FastTripleEncoder | None:
        """The encoder when it is exact for `tokenizer` (checked by `eligibility` and on probe texts), else None."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or eligibility(backend) is not None:
            return None
        encoder = cls(backend)
        if not encoder.agrees_with_backend(PROBE_TEXTS):
            return None
        return encoder

    @staticmethod
    def _literal_pattern(contents: list[str]) -> re.Pattern[str] | None:
        # Longest first: at the leftmost match position `re` takes the first alternative, i.e. the longest,
        # which is the tokenizer's leftmost-longest rule.
        contents = sorted((content for content in contents if content), key=len, reverse=True)
        return re.compile("|".join(map(re.escape, contents))) if contents else None

    def agrees_with_backend(self, texts: Sequence[str]) -> bool:
        expected = [encoding.ids for encoding in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]
        triples = [(text, text + other, text + other[::-1]) for text in texts for other in texts]
        full = [
            encoding.ids
            for encoding in self.backend.encode_batch_fast(
                [text for triple in triples for text in triple], add_special_tokens=False
            )
        ]
        got = self.encode(triples)
        return self.encode_texts(list(texts)) == expected and [ids for triple in got for ids in triple] == full

    # ------------------------------------------------------------------ single texts

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids, as `encode_batch_fast(texts, add_special_tokens=False)` gives them."""
        results: list[list[int] | None] = []
        slow: list[int] = []
        for text in texts:
            if _NOT_ASCII_TEXT.search(text) is None:
                results.append(self._encode_ascii(text))
            else:
                slow.append(len(results))
                results.append(None)
        if slow:
            encodings = self.backend.encode_batch_fast([texts[i] for i in slow], add_special_tokens=False)
            for i, encoding in zip(slow, encodings):
                results[i] = encoding.ids
        return results  # type: ignore[return-value]

    def _encode_ascii(self, text: str) -> list[int]:
        ids: list[int] = []
        for segment, added in self._split_added(text, 0):
            if added:
                ids.append(self.added_ids[segment])
                continue
            cache = self.cache
            for piece in _ASCII_PIECES.findall(segment):
                piece_ids = cache.get(piece)
                if piece_ids is None:
                    piece_ids = self._piece_ids(piece)
                ids += piece_ids
        return ids

    def _split_added(self, text: str, level: int) -> list[tuple[str, bool]]:
        """(segment, is an added token) in order, by the added-token passes from `level` on."""
        if level == len(self.added_patterns):
            return [(text, False)] if text else []
        pattern = self.added_patterns[level]
        if pattern is None:
            return self._split_added(text, level + 1)
        parts: list[tuple[str, bool]] = []
        start = 0
        for match in pattern.finditer(text):
            parts += self._split_added(text[start : match.start()], level + 1)
            parts.append((match.group(), True))
            start = match.end()
        parts += self._split_added(text[start:], level + 1)
        return parts

    def _piece_ids(self, piece: str) -> list[int]:
        if len(self.cache) >= _CACHE_LIMIT:
            self.cache.clear()
        ids = [token.id for token in self.model.tokenize(piece.translate(self.byte_level))]
        self.cache[piece] = ids
        return ids

    # ------------------------------------------------------------------ triples

    def encode(self, triples: Sequence[tuple[str, str, str]]) -> list[tuple[list[int], list[int], list[int]]]:
        """For each (prompt, full chosen, full rejected): their three encodings, spliced from a shared head."""
        texts: list[str] = []
        for prompt, chosen, rejected in triples:
            limit = len(prompt)
            if not (chosen.startswith(prompt) and rejected.startswith(prompt)):
                # A template may render the prompt differently inside the conversation: only what is shared,
                # including the character at w, may be reused.
                limit = min(shared_length(prompt, chosen), shared_length(prompt, rejected))
            w = tail_start(prompt, limit)
            texts += (prompt[:w], prompt[w:], chosen[w:], rejected[w:])
        ids = self.encode_texts(texts)
        results = []
        for number in range(len(triples)):
            head, tail, chosen_tail, rejected_tail = ids[4 * number : 4 * number + 4]
            results.append((head + tail, head + chosen_tail, head + rejected_tail))
        return results
