"""Records with k >= 2 scored answers per prompt: validated into `RankedRecord`s (or a `BadRecord` saying why not).

Two layouts are read (`formats.detect_shape` calls a record "ranked" when it has `responses` or `completions` and no
`chosen`):

- {"prompt": str | [msg, ...], "responses": [r1, ..., rk], "scores": [s1, ..., sk]}, each r a string or a message
  list, higher score better; or "ranks": [1, 3, 2, ...] instead of scores, 1 = best (stored as score = -rank)
- UltraFeedback's raw layout: {"instruction": str, "completions": [{"response": str, "overall_score": x, ...}]},
  the score read from `score_field` (`--score_field`, default overall_score; fine-grained_score, or any key)

Skipped and counted (`formats.Reason`), never a crash: fewer than two answers (too_few_responses), a score that is
missing, not a number or NaN/inf (bad_score), every answer scored alike (all_tied: nothing to learn), an empty
prompt or answer, two identical answers with different scores (chosen_equals_rejected). Partial ties are kept: the
pairwise objectives leave tied pairs out, Plackett-Luce orders them by input order (dpo/listwise.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from data_prep.records import BadRecord, Message, Reason, messages_of

DEFAULT_SCORE_FIELD = "overall_score"
ANSWER_KEYS = ("responses", "completions")  # a record with one of these and no "chosen" has k answers


@dataclass(frozen=True)
class RankedRecord:
    """One usable ranked record: the prompt and k answers in input order, with their scores (higher better).
    Text records hold strings; conversational ones message lists (a string prompt becomes one user message)."""

    prompt: str | list[Message]
    responses: list[str] | list[list[Message]]
    scores: list[float]
    shape: str
    location: str
    index: int
    tools: list[dict] | None = None


def is_ranked(value: object) -> bool:
    return isinstance(value, dict) and "chosen" not in value and any(key in value for key in ANSWER_KEYS)


def _score(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _answers(value: dict, location: str, score_field: str) -> tuple[list[object], list[float]] | BadRecord:
    """(raw answers, scores) of either layout."""
    if "completions" in value and "responses" not in value:
        completions = value["completions"]
        if not isinstance(completions, list):
            return BadRecord(location, Reason.WRONG_TYPE, "'completions' is not a list")
        answers, scores = [], []
        for number, completion in enumerate(completions):
            if not isinstance(completion, dict) or "response" not in completion:
                return BadRecord(location, Reason.MISSING_FIELD, f"completions[{number}] has no 'response'")
            score = _score(completion.get(score_field))
            if score is None:
                return BadRecord(location, Reason.BAD_SCORE,
                                 f"completions[{number}].{score_field} is {completion.get(score_field)!r}")
            answers.append(completion["response"])
            scores.append(score)
        return answers, scores
    answers = value["responses"]
    if not isinstance(answers, list):
        return BadRecord(location, Reason.WRONG_TYPE, "'responses' is not a list")
    key = "scores" if "scores" in value else "ranks" if "ranks" in value else None
    if key is None:
        return BadRecord(location, Reason.MISSING_FIELD, "no 'scores' or 'ranks' beside 'responses'")
    raw = value[key]
    if not isinstance(raw, list) or len(raw) != len(answers):
        return BadRecord(location, Reason.WRONG_TYPE, f"'{key}' is not a list of {len(answers)} numbers")
    scores = []
    for number, item in enumerate(raw):
        score = _score(item)
        if score is None:
            return BadRecord(location, Reason.BAD_SCORE, f"{key}[{number}] is {item!r}")
        scores.append(-score if key == "ranks" else score)  # rank 1 is the best: the highest score
    return answers, scores


def normalise_ranked(value: dict, location: str, *, index: int, score_field: str = DEFAULT_SCORE_FIELD
                     ) -> RankedRecord | BadRecord:
    """Validate one ranked record (either layout) and decide its shape: text or conversational."""
    prompt = value.get("prompt", value.get("instruction"))
    if prompt is None:
        return BadRecord(location, Reason.MISSING_FIELD, "no 'prompt' (or 'instruction')")
    got = _answers(value, location, score_field)
    if isinstance(got, BadRecord):
        return got
    raw, scores = got
    if len(raw) < 2:
        return BadRecord(location, Reason.TOO_FEW_RESPONSES, f"{len(raw)} answer(s); at least 2 are needed")
    conversational = isinstance(prompt, list) or any(isinstance(a, list) for a in raw)
    if conversational:
        messages = messages_of(prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}],
                               "prompt", location)
        if isinstance(messages, BadRecord):
            return messages
        answers: list = []
        for number, answer in enumerate(raw):
            turns = messages_of(answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}],
                                f"responses[{number}]", location)
            if isinstance(turns, BadRecord):
                return turns
            answers.append(turns)
        texts = [m["content"] for m in messages]
        answer_texts = [" ".join(m["content"] for m in turns) for turns in answers]
        prompt = messages
    else:
        if not isinstance(prompt, str):
            return BadRecord(location, Reason.WRONG_TYPE, f"'prompt' is a {type(prompt).__name__}")
        wrong = [n for n, a in enumerate(raw) if not isinstance(a, str)]
        if wrong:
            return BadRecord(location, Reason.WRONG_TYPE, f"responses[{wrong[0]}] is not a string or message list")
        texts, answers, answer_texts = [prompt], list(raw), list(raw)
    if not any(text.strip() for text in texts):
        return BadRecord(location, Reason.EMPTY_PROMPT, "the prompt is empty")
    empty = [n for n, text in enumerate(answer_texts) if not text.strip()]
    if empty:
        return BadRecord(location, Reason.EMPTY_RESPONSE, f"responses[{empty[0]}] is empty")
    if len(set(scores)) == 1:
        return BadRecord(location, Reason.ALL_TIED, f"all {len(scores)} answers scored {scores[0]}")
    clash = identical_with_other_scores(answers, scores)
    if clash:
        return BadRecord(location, Reason.CHOSEN_EQUALS_REJECTED, clash)
    tools = value.get("tools") if conversational else None
    return RankedRecord(prompt, answers, scores, "conversational" if conversational else "explicit", location,
                        index, tools if isinstance(tools, list) else None)


def identical_with_other_scores(answers: list, scores: list[float]) -> str | None:
    seen: dict[str, float] = {}
    for number, (answer, score) in enumerate(zip(answers, scores)):
        key = repr(answer)
        if key in seen and seen[key] != score:
            return f"responses[{number}] repeats an earlier answer with another score"
        seen.setdefault(key, score)
    return None


def has_surrogate(record: RankedRecord, pattern: re.Pattern[str]) -> bool:
    """Whether any text of the record holds a lone surrogate (`formats._ANY_SURROGATE`)."""
    parts = [record.prompt, *record.responses]
    for part in parts:
        texts = [part] if isinstance(part, str) else [text for message in part for text in message.values()]
        if any(not text.isascii() and pattern.search(text) for text in texts):
            return True
    return False


def best_and_worst(scores: list[float]) -> tuple[int, int]:
    """The first top-scored answer and the last bottom-scored one: the pairwise columns of a ranked shard."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = max(range(len(scores)), key=lambda i: (-scores[i], i))
    return best, worst


# ------------------------------------------------------------------------------------------------ tokenizing


@dataclass(frozen=True)
class TokenizedRanked:
    """A ranked record as token ids: the prompt, each answer (ending in one EOS, input order) and the scores.
    `chosen_ids` / `rejected_ids` are the best and the worst answer (`best_and_worst`), written as the pairwise
    columns so the data contract, the eval order and a pairwise run read ranked shards unchanged."""

    prompt_ids: list[int]
    responses_ids: list[list[int]]
    scores: list[float]
    index: int
    location: str
    boundary_adjusted: bool
    truncated: bool

    @property
    def chosen_ids(self) -> list[int]:
        return self.responses_ids[best_and_worst(self.scores)[0]]

    @property
    def rejected_ids(self) -> list[int]:
        return self.responses_ids[best_and_worst(self.scores)[1]]


def as_ranked(pair: Any) -> TokenizedRanked:
    """A tokenized pair as a ranked record of two answers scored [1, 0] (a split that mixes both is ranked)."""
    if isinstance(pair, TokenizedRanked):
        return pair
    return TokenizedRanked(pair.prompt_ids, [pair.chosen_ids, pair.rejected_ids], [1.0, 0.0], pair.index,
                           pair.location, pair.boundary_adjusted, pair.truncated)


RANKED_COLUMNS = ("responses_ids", "scores")


def answer_counts(records: list[TokenizedRanked]) -> dict[str, int]:
    """How many written records have k answers, by k."""
    counts: dict[str, int] = {}
    for record in records:
        counts[str(len(record.responses_ids))] = counts.get(str(len(record.responses_ids)), 0) + 1
    return dict(sorted(counts.items(), key=lambda item: int(item[0])))
