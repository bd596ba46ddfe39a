"""One `PreferencePair` -> `prompt_ids`, `chosen_ids`, `rejected_ids`: rendering, BOS/EOS, boundary, cuts.

Rendering. Text shapes are used as they are: the prompt text, and prompt + response as one text.
Conversational pairs go through the tokenizer's chat template: the prompt with `add_generation_prompt=True`,
prompt + response messages without it, both with the pair's `tools` (function schemas) when it has any. Where
the rendered conversation ends in the EOS token followed only by whitespace (a template that writes "</s>\\n"
after every message), the trailing whitespace is dropped so that the response ends in EOS.

Tokens. Texts are encoded in batches with the fast tokenizer and without special tokens; BOS and EOS are then
placed by these rules, so a template or a text that already holds them never doubles them:
- BOS: leading BOS ids collapse to one. The prompt starts with BOS if the tokenizer adds one (its
  post-processor puts BOS before "a") or the rendered text starts with one. Responses never hold it.
- EOS: trailing EOS ids of each response collapse into exactly one EOS, appended when missing.

Speed. For plain byte-level BPE tokenizers `data_prep.fastpath` produces the very same three encodings while
encoding the prompt once instead of three times and most words from a cache (`fast=False` turns it off).

Boundary. The prompt is encoded once, prompt + response once per response; the response ids are the tokens
of prompt + response after their longest common prefix with the prompt's tokens. When a BPE merge (or the
template) crosses the boundary, that prefix is shorter than the prompt: the prompt's last tokens are then
dropped from `prompt_ids`, and the full text's tokens from that point on are the response. Chosen and
rejected share `prompt_ids`, so the shorter of their two common prefixes is used for both. In every case
`prompt_ids + chosen_ids` is exactly the tokenization of prompt + chosen (plus BOS/EOS), so nothing is lost
or duplicated; such pairs are counted as `boundary_adjusted`. Example (byte-level BPE, "Ġhello" in vocab):
    prompt "Say hel", chosen "lo world"  ->  prompt tokens [Say, Ġhe, l], full [Say, Ġhello, Ġwor, ld]
    ->  prompt_ids [BOS, Say], chosen_ids [Ġhello, Ġwor, ld, EOS]

Failures. A record the chat template rejects (its `raise_exception`, or any error while rendering) is a
`template_error`; a text the tokenizer cannot encode is a `tokenizer_error`: both are `BadRecord`s of that record
alone (a failing batch is re-encoded pair by pair to find it), never the end of the run.

Truncation. The prompt is cut from the left to `max_prompt_length` (keeping its BOS, then its last tokens);
then each response is cut from the right so that prompt + response <= `max_length`. A cut response still ends
in EOS (its last kept token is replaced), so every response ends in exactly one EOS. A pair whose responses
become identical is dropped (`identical_after_truncation`).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from data_prep.fastpath import FastTripleEncoder
from data_prep.formats import BadRecord, InputError, PreferencePair, Reason
from data_prep.ranked import RankedRecord, TokenizedRanked, identical_with_other_scores


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int
    location: str
    boundary_adjusted: bool
    truncated: bool


@dataclass(frozen=True)
class SpecialIds:
    bos_id: int | None
    eos_id: int
    adds_bos: bool


def special_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
    """BOS/EOS ids, and whether the tokenizer's own special-token step puts BOS first."""
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no EOS token: every response must end in one")
    bos_id = tokenizer.bos_token_id
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds_bos = bos_id is not None and with_special[:1] == [bos_id] and without[:1] != [bos_id]
    return SpecialIds(bos_id=bos_id, eos_id=tokenizer.eos_token_id, adds_bos=adds_bos)


def _one_line(error: Exception) -> str:
    """`Type: message`, first line only and at most 200 characters, for a `BadRecord` detail."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


def common_prefix_length(a: list[int], b: list[int]) -> int:
    if len(b) >= len(a) and b[: len(a)] == a:  # the usual case, checked at C speed
        return len(a)
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def assemble(
    prompt_tokens: list[int], chosen_tokens: list[int], rejected_tokens: list[int], special: SpecialIds
) -> tuple[list[int], list[int], list[int], bool]:
    """(prompt_ids, chosen_ids, rejected_ids, boundary_adjusted) from the encodings of prompt, prompt + chosen
    and prompt + rejected (no special tokens added), by the BOS, EOS and boundary rules of this module.
    """
    prompt_ids, (chosen_ids, rejected_ids), adjusted = assemble_answers(
        prompt_tokens, [chosen_tokens, rejected_tokens], special)
    return prompt_ids, chosen_ids, rejected_ids, adjusted


def assemble_answers(
    prompt_tokens: list[int], full_tokens: list[list[int]], special: SpecialIds
) -> tuple[list[int], list[list[int]], bool]:
    """`assemble` for any number of answers: (prompt_ids, answer ids, boundary_adjusted) from the encodings of the
    prompt and of prompt + each answer. The prompt is the part every encoding shares."""
    bos = special.bos_id
    starts_with_bos = bos is not None and prompt_tokens[:1] == [bos]
    if starts_with_bos:
        prompt_tokens = _strip_leading(prompt_tokens, bos)
        full_tokens = [_strip_leading(ids, bos) for ids in full_tokens]
    shared = min(common_prefix_length(prompt_tokens, ids) for ids in full_tokens)
    lead = [bos] if bos is not None and (special.adds_bos or starts_with_bos) else []
    prompt_ids = lead + prompt_tokens[:shared]
    answers = [_end_with_eos(ids[shared:], special.eos_id) for ids in full_tokens]
    return prompt_ids, answers, shared < len(prompt_tokens)


def _strip_leading(ids: list[int], token: int) -> list[int]:
    start = 0
    while start < len(ids) and ids[start] == token:
        start += 1
    return ids[start:]


def _end_with_eos(ids: list[int], eos_id: int) -> list[int]:
    end = len(ids)
    while end > 0 and ids[end - 1] == eos_id:
        end -= 1
    return ids[:end] + [eos_id]


def truncate(
    prompt_ids: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    *,
    max_length: int,
    max_prompt_length: int,
    keep_first: bool,
) -> tuple[list[int], list[int], list[int], bool]:
    """Prompt from the left to `max_prompt_length` (keeping its first token, BOS, when `keep_first`), then
    each response from the right to `max_length - len(prompt)`, its last kept token replaced by its EOS.
    """
    prompt_ids, (chosen_ids, rejected_ids), truncated = truncate_answers(
        prompt_ids, [chosen_ids, rejected_ids], max_length=max_length, max_prompt_length=max_prompt_length,
        keep_first=keep_first)
    return prompt_ids, chosen_ids, rejected_ids, truncated


def truncate_answers(
    prompt_ids: list[int], answers: list[list[int]], *, max_length: int, max_prompt_length: int, keep_first: bool
) -> tuple[list[int], list[list[int]], bool]:
    """`truncate` for any number of answers, each cut alike."""
    truncated = False
    if len(prompt_ids) > max_prompt_length:
        head = prompt_ids[:1] if keep_first else []
        prompt_ids = head + prompt_ids[len(prompt_ids) - (max_prompt_length - len(head)) :]
        truncated = True
    budget = max_length - len(prompt_ids)
    responses = []
    for ids in answers:
        if len(ids) > budget:
            ids = ids[: budget - 1] + ids[-1:]
            truncated = True
        responses.append(ids)
    return prompt_ids, responses, truncated


class PairTokenizer:
    """A batch of `PreferencePair`s -> `TokenizedPair`s, or `BadRecord`s saying why each was dropped."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, *, max_length: int, max_prompt_length: int, fast: bool = True
    ) -> None:
        if not 1 <= max_prompt_length < max_length:
            raise ValueError(
                f"need 1 <= max_prompt_length < max_length, got {max_prompt_length}, {max_length}"
            )
        self.tokenizer = tokenizer
        self.special = special_ids(tokenizer)
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self._encode_fast = getattr(getattr(tokenizer, "backend_tokenizer", None), "encode_batch_fast", None)
        # None unless the tokenizer's pipeline is one the fast path is proven (and probed) exact for.
        self.fast_encoder = FastTripleEncoder.from_tokenizer(tokenizer) if fast else None

    def render(self, pair: PreferencePair) -> tuple[str, str, str]:
        """(prompt text, prompt + chosen text, prompt + rejected text)."""
        if isinstance(pair.prompt, str):
            assert isinstance(pair.chosen, str) and isinstance(pair.rejected, str)
            return pair.prompt, pair.prompt + pair.chosen, pair.prompt + pair.rejected
        if not self.tokenizer.chat_template:
            raise InputError(
                "conversational records need a chat template: the tokenizer has none, pass --chat_template"
            )
        prompt_text = self.tokenizer.apply_chat_template(
            pair.prompt, tools=pair.tools, tokenize=False, add_generation_prompt=True
        )
        return (
            prompt_text,
            self._render_full(pair.prompt + pair.chosen, pair.tools),
            self._render_full(pair.prompt + pair.rejected, pair.tools),
        )

    def _render_full(self, messages: list[dict[str, str]], tools: list[dict] | None) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=False
        )
        eos_token = self.tokenizer.eos_token
        stripped = text.rstrip()
        return stripped if eos_token and stripped.endswith(eos_token) else text

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self._encode_fast is not None:
            return [encoding.ids for encoding in self._encode_fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode_triples(self, rendered: list[tuple[str, str, str]]) -> list[tuple[list[int], list[int], list[int]]]:
        if self.fast_encoder is not None:
            return self.fast_encoder.encode(rendered)
        ids = self.encode([text for texts in rendered for text in texts])
        return [(ids[3 * number], ids[3 * number + 1], ids[3 * number + 2]) for number in range(len(rendered))]

    def __call__(self, pairs: list[PreferencePair | RankedRecord]
                 ) -> list[TokenizedPair | TokenizedRanked | BadRecord]:
        if any(isinstance(pair, RankedRecord) for pair in pairs):  # k-answer records (data_prep.ranked), one by one
            pairwise = [pair for pair in pairs if not isinstance(pair, RankedRecord)]
            plain = iter(self(pairwise) if pairwise else [])
            return [self.ranked(pair) if isinstance(pair, RankedRecord) else next(plain) for pair in pairs]
        rendered = [self._render_or_bad(pair) for pair in pairs]
        todo = [number for number, texts in enumerate(rendered) if not isinstance(texts, BadRecord)]
        triples: list[tuple[str, str, str]] = [rendered[number] for number in todo]  # type: ignore[misc]
        try:
            encoded: list = self.encode_triples(triples)
        except MemoryError:
            raise
        except Exception:  # one text the tokenizer refuses fails the whole batch: find it, one pair at a time
            encoded = [self._encode_or_bad(pairs[number], texts) for number, texts in zip(todo, triples)]
        results: list[TokenizedPair | BadRecord] = list(rendered)  # type: ignore[arg-type]
        for number, triple in zip(todo, encoded):
            results[number] = triple if isinstance(triple, BadRecord) else self._one(pairs[number], *triple)
        return results

    def _render_or_bad(self, pair: PreferencePair) -> tuple[str, str, str] | BadRecord:
        try:
            return self.render(pair)
        except (InputError, MemoryError):
            raise
        except Exception as error:  # jinja2's TemplateError (the template's raise_exception) and any other
            return BadRecord(pair.location, Reason.TEMPLATE_ERROR, _one_line(error))

    def _encode_or_bad(
        self, pair: PreferencePair, texts: tuple[str, str, str]
    ) -> tuple[list[int], list[int], list[int]] | BadRecord:
        try:
            return self.encode_triples([texts])[0]
        except MemoryError:
            raise
        except Exception as error:
            return BadRecord(pair.location, Reason.TOKENIZER_ERROR, _one_line(error))

    def _one(
        self, pair: PreferencePair, prompt: list[int], chosen: list[int], rejected: list[int]
    ) -> TokenizedPair | BadRecord:
        special = self.special
        prompt_ids, chosen_ids, rejected_ids, adjusted = assemble(prompt, chosen, rejected, special)
        if not prompt_ids:
            return BadRecord(pair.location, Reason.EMPTY_PROMPT, "no prompt token before the response")
        if len(chosen_ids) == 1 or len(rejected_ids) == 1:
            return BadRecord(pair.location, Reason.EMPTY_RESPONSE, "a response has no token besides EOS")
        if chosen_ids == rejected_ids:
            return BadRecord(pair.location, Reason.CHOSEN_EQUALS_REJECTED, "identical token ids")
        prompt_ids, chosen_ids, rejected_ids, truncated = truncate(
            prompt_ids,
            chosen_ids,
            rejected_ids,
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            keep_first=special.bos_id is not None and prompt_ids[0] == special.bos_id,
        )
        if chosen_ids == rejected_ids:
            return BadRecord(
                pair.location, Reason.IDENTICAL_AFTER_TRUNCATION, f"identical at {len(chosen_ids)} tokens"
            )
        return TokenizedPair(
            prompt_ids, chosen_ids, rejected_ids, pair.index, pair.location, adjusted, truncated
        )

    def render_ranked(self, record: RankedRecord) -> list[str]:
        """[prompt text, prompt + answer 1 text, ...], as `render` renders a pair."""
        if isinstance(record.prompt, str):
            return [record.prompt] + [record.prompt + answer for answer in record.responses]  # type: ignore[operator]
        prompt_text = self.tokenizer.apply_chat_template(record.prompt, tools=record.tools, tokenize=False,
                                                         add_generation_prompt=True)
        return [prompt_text] + [self._render_full(record.prompt + answer, record.tools)  # type: ignore[operator]
                                for answer in record.responses]

    def ranked(self, record: RankedRecord) -> TokenizedRanked | BadRecord:
        """One k-answer record through the same template, encoder, BOS/EOS/boundary rules and truncation as a pair
        (each answer cut alike), or the BadRecord saying why it was dropped."""
        try:
            texts = self.render_ranked(record)
        except (InputError, MemoryError):
            raise
        except Exception as error:  # the template's raise_exception and any other
            return BadRecord(record.location, Reason.TEMPLATE_ERROR, _one_line(error))
        try:
            encoded = self.encode(texts)
        except MemoryError:
            raise
        except Exception as error:
            return BadRecord(record.location, Reason.TOKENIZER_ERROR, _one_line(error))
        special = self.special
        prompt_ids, answers, adjusted = assemble_answers(encoded[0], encoded[1:], special)
        if not prompt_ids:
            return BadRecord(record.location, Reason.EMPTY_PROMPT, "no prompt token before the response")
        if any(len(ids) == 1 for ids in answers):
            return BadRecord(record.location, Reason.EMPTY_RESPONSE, "a response has no token besides EOS")
        clash = identical_with_other_scores(answers, record.scores)
        if clash:
            return BadRecord(record.location, Reason.CHOSEN_EQUALS_REJECTED, f"identical token ids: {clash}")
        prompt_ids, answers, truncated = truncate_answers(
            prompt_ids, answers, max_length=self.max_length, max_prompt_length=self.max_prompt_length,
            keep_first=special.bos_id is not None and prompt_ids[0] == special.bos_id)
        clash = identical_with_other_scores(answers, record.scores)
        if clash:
            return BadRecord(record.location, Reason.IDENTICAL_AFTER_TRUNCATION, clash)
        return TokenizedRanked(prompt_ids, answers, list(record.scores), record.index, record.location, adjusted,
                               truncated)
