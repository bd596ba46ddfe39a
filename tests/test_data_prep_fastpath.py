"""data_prep.fastpath: the fast triple encoder gives exactly the full encode's ids, and PairTokenizer the same pairs.

The oracle is the Rust tokenizer itself: `encode_batch_fast` of the whole prompt, prompt + chosen and
prompt + rejected texts (the rule data prep used before the fast path), and `PairTokenizer(fast=False)`.
"""

from __future__ import annotations

import copy
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from data_prep.fastpath import FastTripleEncoder, eligibility, shared_length, tail_start
from data_prep.formats import BadRecord, PreferencePair
from data_prep.tokenize import PairTokenizer, TokenizedPair
from demo.tiny import build_tokenizer
from tests.conftest import FIXTURE_TEXTS

# Fragments chosen to hit the boundary: words that merge across it ("hel" + "lo"), contractions, runs of
# spaces/tabs/newlines (the "\s+(?!\S)" rule), digits, punctuation, non-ASCII letters and spaces (NBSP, U+2028,
# ideographic space), an emoji, and the tokenizer's special tokens.
FRAGMENTS = [
    "hel",
    "lo",
    "hello",
    " world",
    "Say",
    " the",
    "answer",
    " is",
    "'s",
    "'ll",
    "'re",
    "n't",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n",
    " \n",
    "\r\n",
    "12",
    "345",
    ".",
    ",",
    "?!",
    " -",
    "é",
    "café",
    "日本",
    "\u00a0",
    "\u2028",
    "\u3000",
    "🙂",
    "<s>",
    "</s>",
    "<|user|>",
    "<|assistant|>",
    "\n\nHuman: ",
    "\n\nAssistant:",
    "Ġ",
    "x",
]
texts = st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join)
mixed_texts = st.one_of(texts, st.text(max_size=24), st.text(alphabet=" \t\nab'1.", max_size=16))


def _full(tokenizer: PreTrainedTokenizerFast, triple: tuple[str, str, str]) -> list[list[int]]:
    encodings = tokenizer.backend_tokenizer.encode_batch_fast(list(triple), add_special_tokens=False)
    return [encoding.ids for encoding in encodings]


def _pair(prompt: object, chosen: object, rejected: object) -> PreferencePair:
    shape = "explicit" if isinstance(prompt, str) else "conversational"
    return PreferencePair(prompt, chosen, rejected, shape, "f.jsonl:1", 0)  # type: ignore[arg-type]


def _both(
    tokenizer: PreTrainedTokenizerFast, pairs: list[PreferencePair], **limits: int
) -> tuple[list[TokenizedPair | BadRecord], list[TokenizedPair | BadRecord]]:
    kwargs = {"max_length": limits.get("max_length", 1024), "max_prompt_length": limits.get("max_prompt_length", 512)}
    fast = PairTokenizer(tokenizer, **kwargs)
    assert fast.fast_encoder is not None, "the fast path must be on, or this compares the full encode with itself"
    return fast(pairs), PairTokenizer(tokenizer, fast=False, **kwargs)(pairs)


@pytest.fixture(scope="module")
def spaces_tokenizer() -> PreTrainedTokenizerFast:
    """Trained on indented, blank-line-heavy text, so that runs of spaces and newlines are merged tokens
    ("ĠĠ", "ĠĠĠ", "ĊĊ"): where a whitespace run is split matters for the ids, unlike in the fixture tokenizer."""
    code = ["def f(x):\n    return x  # note\n\n\n  ok   then\t\tdone \n \n", "a  b   c    d\n\n  e"] * 40
    return build_tokenizer(FIXTURE_TEXTS + code, vocab_size=600)


@pytest.fixture(scope="module")
def tokenizer_with_added(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Non-special added tokens (matched on the normalised text, a second pass) beside the special ones."""
    extended = copy.deepcopy(tokenizer)
    extended.add_tokens([AddedToken("ello", normalized=True), AddedToken("s>x", normalized=True), "<sep>"])
    extended.add_special_tokens({"additional_special_tokens": [AddedToken("<|x", normalized=False)]})
    return extended


# ---------------------------------------------------------------- pure helpers, by hand


def test_tail_start_by_hand() -> None:
    assert tail_start("Say hello world", 15) == 9  # the space before "world"
    assert tail_start("Say hello world", 9) == 3  # the space must lie before the limit
    assert tail_start("a  b", 4) == 1  # "a" then "  ": only the first space follows a non-space
    assert tail_start("\n b", 3) == 0  # the space follows whitespace: no split point
    assert tail_start(" lead", 5) == 0  # position 0 is no split: the head would be empty anyway
    assert tail_start("nospace", 7) == 0


def test_shared_length_by_hand() -> None:
    assert shared_length("abcdef", "abcxyz") == 3
    assert shared_length("abc", "abc") == 3
    assert shared_length("", "abc") == 0
    assert shared_length("abc", "ab") == 2


def test_the_pipeline_checks_name_the_reason(tokenizer: PreTrainedTokenizerFast) -> None:
    assert eligibility(tokenizer.backend_tokenizer) is None
    cases = []
    with_normalizer = copy.deepcopy(tokenizer)
    with_normalizer.backend_tokenizer.normalizer = normalizers.NFC()
    cases.append((with_normalizer, "normalizer"))
    prefix_space = copy.deepcopy(tokenizer)
    prefix_space.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    cases.append((prefix_space, "prefix space"))
    metaspace = copy.deepcopy(tokenizer)
    metaspace.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    cases.append((metaspace, "ByteLevel"))
    stripping = copy.deepcopy(tokenizer)
    stripping.add_tokens([AddedToken("<mask>", rstrip=True)])
    cases.append((stripping, "strips"))
    spaced = copy.deepcopy(tokenizer)
    spaced.add_tokens(["a b"])
    cases.append((spaced, "space after"))
    for other, reason in cases:
        assert reason in (eligibility(other.backend_tokenizer) or ""), reason
        assert PairTokenizer(other, max_length=64, max_prompt_length=32).fast_encoder is None


# ---------------------------------------------------------------- exactness against the full encode


def test_the_split_point_lemma_on_the_rust_tokenizer(spaces_tokenizer: PreTrainedTokenizerFast) -> None:
    # encode(X) == encode(X[:w]) + encode(X[w:]) at every " " that follows a non-space, in the Rust tokenizer.
    backend = spaces_tokenizer.backend_tokenizer
    assert backend.encode("a   b", add_special_tokens=False).tokens == ["a", "ĠĠ", "Ġb"]  # runs are merged
    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        text = "".join(rng.choices(FRAGMENTS, k=10))
        for w in range(1, len(text)):
            if text[w] == " " and not text[w - 1].isspace():
                head, tail, whole = (
                    backend.encode(part, add_special_tokens=False).ids for part in (text[:w], text[w:], text)
                )
                assert head + tail == whole, (text, w)
                checked += 1
    assert checked > 300


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=mixed_texts, chosen=mixed_texts, rejected=mixed_texts)
def test_fast_triples_equal_the_full_encode(
    tokenizer: PreTrainedTokenizerFast,
    spaces_tokenizer: PreTrainedTokenizerFast,
    prompt: str,
    chosen: str,
    rejected: str,
) -> None:
    for tok in (tokenizer, spaces_tokenizer):
        encoder = FastTripleEncoder.from_tokenizer(tok)
        assert encoder is not None
        triple = (prompt, prompt + chosen, prompt + rejected)
        assert [list(ids) for ids in encoder.encode([triple])[0]] == _full(tok, triple)
        # Rendered conversations need not start with the rendered prompt: only the shared part is reused.
        diverging = (prompt + chosen, prompt + rejected, prompt + chosen[::-1])
        assert [list(ids) for ids in encoder.encode([diverging])[0]] == _full(tok, diverging)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=texts, chosen=texts, rejected=texts)
def test_fast_triples_with_two_passes_of_added_tokens(
    tokenizer_with_added: PreTrainedTokenizerFast, prompt: str, chosen: str, rejected: str
) -> None:
    encoder = FastTripleEncoder.from_tokenizer(tokenizer_with_added)
    assert encoder is not None
    for extra in ("ello", "s>x", "<sep>", "<|x", "<|user|>"):
        triple = (prompt + extra, prompt + extra + chosen, prompt + rejected + extra)
        assert [list(ids) for ids in encoder.encode([triple])[0]] == _full(tokenizer_with_added, triple)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=mixed_texts, chosen=mixed_texts, rejected=mixed_texts, max_length=st.integers(3, 40))
def test_pair_tokenizer_fast_equals_full(
    tokenizer: PreTrainedTokenizerFast, prompt: str, chosen: str, rejected: str, max_length: int
) -> None:
    fast, full = _both(
        tokenizer, [_pair(prompt, chosen, rejected)], max_length=max_length, max_prompt_length=max_length // 2
    )
    assert fast == full


def test_corpus_fast_equals_full_with_the_same_boundary_counts(tokenizer: PreTrainedTokenizerFast) -> None:
    """HH-style, MiniMind-style and random-cut pairs, explicit and chat-template rendered, multi-turn."""
    rng = random.Random(1)
    sentences = [text for text in FIXTURE_TEXTS[:6]] + [
        "Ünïcödé  and\u00a0NBSP, 日本語のテキスト。",
        "tabs\tand  runs   ",
    ]
    pairs: list[PreferencePair] = []
    for _ in range(150):
        text = rng.choice(sentences) + " " + rng.choice(sentences)
        cut = rng.randrange(1, len(text))  # anywhere, mid-word included: BPE merges cross the boundary
        pairs.append(_pair(text[:cut], text[cut:], rng.choice(["", " "]) + rng.choice(sentences)))
        turns = [{"role": role, "content": rng.choice(sentences)} for role in ("user", "assistant", "user")]
        pairs.append(
            _pair(
                turns[: rng.choice([1, 3])],
                [{"role": "assistant", "content": text[cut:]}],
                [{"role": "assistant", "content": rng.choice(sentences)}],
            )
        )
    crossing = copy.deepcopy(tokenizer)
    crossing.chat_template = (  # the generation prompt is not a prefix of the rendered answer
        "{% for m in messages %}<|{{ m['role'] }}|>{{ '\\n' if m['role'] == 'user' }}{{ m['content'] }}</s>"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    for tok in (tokenizer, crossing):
        fast, full = _both(tok, pairs)
        assert fast == full
        kept = [result for result in full if isinstance(result, TokenizedPair)]
        assert len(kept) > 250
        assert sum(result.boundary_adjusted for result in kept) > 30  # the boundary case really is exercised
