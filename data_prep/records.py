"""The vocabulary every reader of raw records shares: why a record was skipped (`Reason`), the skip itself
(`BadRecord`, located "file:line"), and message lists. `data_prep.formats` (pairs) and `data_prep.ranked` (k answers)
both build on it, and re-export nothing new: `from data_prep.formats import Reason, BadRecord` keeps working."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

Message = dict[str, str]


class Reason(StrEnum):
    """Why a record was skipped. Every skipped record is counted under exactly one reason."""

    INVALID_JSON = "invalid_json"
    NOT_A_JSON_ARRAY = "not_a_json_array"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    EMPTY_PROMPT = "empty_prompt"
    EMPTY_RESPONSE = "empty_response"
    CHOSEN_EQUALS_REJECTED = "chosen_equals_rejected"
    NO_SHARED_PROMPT = "no_shared_prompt"
    MIXED_SHAPES = "mixed_shapes"
    UNDECODABLE_BYTES = "undecodable_bytes"
    IDENTICAL_AFTER_TRUNCATION = "identical_after_truncation"
    INVALID_UNICODE = "invalid_unicode"
    TEMPLATE_ERROR = "template_error"
    TOKENIZER_ERROR = "tokenizer_error"
    TOO_FEW_RESPONSES = "too_few_responses"  # a ranked record with fewer than two answers
    ALL_TIED = "all_tied"  # a ranked record whose answers all have one score
    BAD_SCORE = "bad_score"  # a ranked record's score missing, not a number, NaN or infinite


@dataclass(frozen=True)
class BadRecord:
    location: str
    reason: Reason
    detail: str


def messages_of(value: object, key: str, location: str) -> list[Message] | BadRecord:
    if not isinstance(value, list):
        return BadRecord(
            location, Reason.WRONG_TYPE, f"{key!r} is a {type(value).__name__}, not a message list"
        )
    messages: list[Message] = []
    for number, message in enumerate(value):
        if not isinstance(message, dict):
            return BadRecord(location, Reason.WRONG_TYPE, f"{key}[{number}] is not an object")
        for part in ("role", "content"):
            if part not in message:
                return BadRecord(location, Reason.MISSING_FIELD, f"{key}[{number}] has no {part!r}")
            if not isinstance(message[part], str):
                return BadRecord(location, Reason.WRONG_TYPE, f"{key}[{number}].{part} is not a string")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages
