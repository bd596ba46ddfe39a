"""data_prep.tokenize: the boundary rule, BOS/EOS rules, both truncation steps, chat templates, hashing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data_prep.formats import BadRecord, InputError, PreferencePair, Reason
from data_prep.tokenize import (
    PairTokenizer,
    SpecialIds,
    TokenizedPair,
    assemble,
    common_prefix_length,
    truncate,
)
from demo.tiny import CHAT_TEMPLATE
from dpo.contract import tokenizer_sha256 as tokenizer_hash

BOS, EOS = 1, 2


def _pair(prompt: object, chosen: object, rejected: object) -> PreferencePair:
    shape = "explicit" if isinstance(prompt, str) else "conversational"
    return PreferencePair(prompt, chosen, rejected, shape, "f.jsonl:1", 0)  # type: ignore[arg-type]


def _one(
    tokenizer: PreTrainedTokenizerFast, pair: PreferencePair, **limits: int
) -> TokenizedPair | BadRecord:
    pair_tokenizer = PairTokenizer(
        tokenizer,
        max_length=limits.get("max_length", 1024),
        max_prompt_length=limits.get("max_prompt_length", 512),
    )
    return pair_tokenizer([pair])[0]


def _tokens(tokenizer: PreTrainedTokenizerFast, result: TokenizedPair | BadRecord) -> tuple[list[str], ...]:
    assert isinstance(result, TokenizedPair), result
    return tuple(
        tokenizer.convert_ids_to_tokens(ids)
        for ids in (result.prompt_ids, result.chosen_ids, result.rejected_ids)
    )


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- pure helpers


def test_common_prefix_length() -> None:
    assert common_prefix_length([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix_length([1, 2, 3], [1, 2, 9, 4]) == 2
    assert common_prefix_length([1, 2, 3], [1, 2]) == 2
    assert common_prefix_length([], [5]) == 0


def test_assemble_by_hand() -> None:
    special = SpecialIds(bos_id=BOS, eos_id=EOS, adds_bos=True)
    # Prompt [10, 11, 12]; chosen text merges 12 with its first letters into 20; rejected does not.
    prompt, chosen, rejected, adjusted = assemble(
        [10, 11, 12], [10, 11, 20, 21], [10, 11, 12, 30, EOS], special
    )
    assert (prompt, chosen, rejected, adjusted) == ([BOS, 10, 11], [20, 21, EOS], [12, 30, EOS], True)
    # Text that already starts with BOS (a template writing it) and ends with EOS twice: never doubled.
    prompt, chosen, rejected, adjusted = assemble(
        [BOS, BOS, 10], [BOS, 10, 21, EOS, EOS], [BOS, 10, 30], special
    )
    assert (prompt, chosen, rejected, adjusted) == ([BOS, 10], [21, EOS], [30, EOS], False)
    # A tokenizer that adds no BOS keeps none, unless the text itself starts with it.
    no_bos = SpecialIds(bos_id=BOS, eos_id=EOS, adds_bos=False)
    assert assemble([10], [10, 21], [10, 30], no_bos)[0] == [10]
    assert assemble([BOS, 10], [BOS, 10, 21], [BOS, 10, 30], no_bos)[0] == [BOS, 10]


def test_truncate_prompt_from_the_left_keeping_bos_then_responses_from_the_right_keeping_eos() -> None:
    prompt = [BOS, 10, 11, 12, 13, 14]
    chosen, rejected = [20, 21, 22, 23, EOS], [30, EOS]
    # Step 1: prompt 6 -> 4 tokens: BOS and the last 3. Step 2: budget 7 - 4 = 3: chosen -> [20, 21, EOS].
    assert truncate(prompt, chosen, rejected, max_length=7, max_prompt_length=4, keep_first=True) == (
        [BOS, 12, 13, 14],
        [20, 21, EOS],
        [30, EOS],
        True,
    )
    # Without BOS the prompt keeps only its last tokens.
    assert truncate(
        [10, 11, 12], [20, EOS], [30, EOS], max_length=9, max_prompt_length=2, keep_first=False
    ) == (
        [11, 12],
        [20, EOS],
        [30, EOS],
        True,
    )
    # Nothing to cut.
    assert truncate([BOS, 10], [20, EOS], [30, EOS], max_length=4, max_prompt_length=2, keep_first=True) == (
        [BOS, 10],
        [20, EOS],
        [30, EOS],
        False,
    )


def test_limits_are_checked(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="max_prompt_length"):
        PairTokenizer(tokenizer, max_length=8, max_prompt_length=8)


# ---------------------------------------------------------------- the real tokenizer


def test_explicit_pair_without_boundary_merge(tokenizer: PreTrainedTokenizerFast) -> None:
    result = _one(tokenizer, _pair("The answer is", " yes", " no"))
    assert _tokens(tokenizer, result) == (["<s>", "The", "Ġanswer", "Ġis"], ["Ġyes", "</s>"], ["Ġno", "</s>"])
    assert isinstance(result, TokenizedPair) and not result.boundary_adjusted and not result.truncated


def test_bpe_merge_across_the_boundary_moves_the_prompt_tail_into_the_responses(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    # Alone, "Say hel" is [Say, Ġhe, l]; "Say hello world" is [Say, Ġhello, Ġworld]: the merge crosses the boundary.
    assert tokenizer.tokenize("Say hel") == ["Say", "Ġhe", "l"]
    result = _one(tokenizer, _pair("Say hel", "lo world", " there"))
    assert _tokens(tokenizer, result) == (
        ["<s>", "Say"],
        ["Ġhello", "Ġworld", "</s>"],
        ["Ġhe", "l", "Ġthere", "</s>"],  # rejected shares the shortened prompt
    )
    assert isinstance(result, TokenizedPair) and result.boundary_adjusted
    # No token lost or duplicated: prompt + response is exactly the tokenization of the joined text.
    for ids, text in ((result.chosen_ids, "Say hello world"), (result.rejected_ids, "Say hel there")):
        assert result.prompt_ids + ids == [BOS] + tokenizer.encode(text, add_special_tokens=False) + [EOS]
        assert tokenizer.decode(result.prompt_ids + ids[:-1], skip_special_tokens=True) == text


def test_trailing_space_in_the_prompt_is_a_boundary_case(tokenizer: PreTrainedTokenizerFast) -> None:
    result = _one(tokenizer, _pair("The answer is ", "yes", "no"))
    assert _tokens(tokenizer, result) == (["<s>", "The", "Ġanswer", "Ġis"], ["Ġyes", "</s>"], ["Ġno", "</s>"])
    assert isinstance(result, TokenizedPair) and result.boundary_adjusted


def test_exactly_one_eos_and_one_bos(tokenizer: PreTrainedTokenizerFast) -> None:
    result = _one(tokenizer, _pair("<s>The answer is", " yes</s>", " no</s></s>"))
    assert _tokens(tokenizer, result) == (["<s>", "The", "Ġanswer", "Ġis"], ["Ġyes", "</s>"], ["Ġno", "</s>"])


def test_a_tokenizer_without_bos_gets_none(tokenizer_no_bos: PreTrainedTokenizerFast) -> None:
    result = _one(tokenizer_no_bos, _pair("The answer is", " yes", " no"))
    assert _tokens(tokenizer_no_bos, result) == (["The", "Ġanswer", "Ġis"], ["Ġyes", "</s>"], ["Ġno", "</s>"])


def test_conversational_multi_turn_renders_with_the_template(tokenizer: PreTrainedTokenizerFast) -> None:
    history = [_user("Hi"), _assistant("Hello"), _user("yes or no?")]
    result = _one(tokenizer, _pair(history, [_assistant("yes")], [_assistant("no")]))
    assert isinstance(result, TokenizedPair)
    prompt_text = "<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n<|user|>\nyes or no?</s>\n<|assistant|>\n"
    assert result.prompt_ids == [BOS] + tokenizer.encode(prompt_text, add_special_tokens=False)
    # The template writes "</s>\n" after every message: the response ends at its EOS, once.
    assert tokenizer.convert_ids_to_tokens(result.chosen_ids) == ["yes", "</s>"]
    assert tokenizer.convert_ids_to_tokens(result.rejected_ids) == ["no", "</s>"]
    assert tokenizer.convert_ids_to_tokens(result.prompt_ids)[-3:] == ["Ċ", "<|assistant|>", "Ċ"]
    assert not result.boundary_adjusted


def test_a_template_that_writes_bos_does_not_double_it(tokenizer: PreTrainedTokenizerFast) -> None:
    with_bos = copy.deepcopy(tokenizer)
    with_bos.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    result = _one(with_bos, _pair([_user("Hi")], [_assistant("yes")], [_assistant("no")]))
    assert isinstance(result, TokenizedPair)
    assert result.prompt_ids[:2] == [BOS, tokenizer.convert_tokens_to_ids("<|user|>")]
    assert BOS not in result.prompt_ids[1:] + result.chosen_ids + result.rejected_ids


def test_a_template_that_crosses_the_boundary_is_adjusted(tokenizer: PreTrainedTokenizerFast) -> None:
    # The generation prompt ends in "\n", but a rendered assistant message has no "\n" after its role tag.
    crossing = copy.deepcopy(tokenizer)
    crossing.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ '\\n' if m['role'] == 'user' }}{{ m['content'] }}</s>"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    result = _one(crossing, _pair([_user("Hi")], [_assistant("yes")], [_assistant("no")]))
    assert _tokens(crossing, result) == (
        ["<s>", "<|user|>", "Ċ", "H", "i", "</s>", "<|assistant|>"],
        ["yes", "</s>"],
        ["no", "</s>"],
    )
    assert isinstance(result, TokenizedPair) and result.boundary_adjusted


def test_no_chat_template_is_a_clear_error(tokenizer: PreTrainedTokenizerFast) -> None:
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(InputError, match="chat template"):
        _one(bare, _pair([_user("Hi")], [_assistant("yes")], [_assistant("no")]))


def test_prompt_truncation_then_response_truncation(tokenizer: PreTrainedTokenizerFast) -> None:
    # Prompt [<s>, The, Ġanswer, Ġis] -> 3 tokens: [<s>, Ġanswer, Ġis]; responses get 6 - 3 = 3 tokens.
    result = _one(
        tokenizer, _pair("The answer is", " yes hello world", " no"), max_length=6, max_prompt_length=3
    )
    assert _tokens(tokenizer, result) == (
        ["<s>", "Ġanswer", "Ġis"],
        ["Ġyes", "Ġhello", "</s>"],
        ["Ġno", "</s>"],
    )
    assert isinstance(result, TokenizedPair) and result.truncated


def test_identical_after_truncation_is_dropped(tokenizer: PreTrainedTokenizerFast) -> None:
    result = _one(tokenizer, _pair("Say", " hello world", " hello there"), max_length=4, max_prompt_length=2)
    assert result == BadRecord("f.jsonl:1", Reason.IDENTICAL_AFTER_TRUNCATION, "identical at 2 tokens")


def test_equal_token_ids_are_chosen_equals_rejected(tokenizer: PreTrainedTokenizerFast) -> None:
    # Different texts, same ids once the EOS written in the text is merged with the appended one.
    result = _one(tokenizer, _pair("Say", " yes", " yes</s>"))
    assert isinstance(result, BadRecord) and result.reason == Reason.CHOSEN_EQUALS_REJECTED


def test_a_response_of_only_eos_is_empty(tokenizer: PreTrainedTokenizerFast) -> None:
    result = _one(tokenizer, _pair("Say", "</s>", " no"))
    assert isinstance(result, BadRecord) and result.reason == Reason.EMPTY_RESPONSE


def test_tokenizer_hash_survives_save_and_load_and_sees_the_template(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    tokenizer.save_pretrained(str(tmp_path))
    assert tokenizer_hash(AutoTokenizer.from_pretrained(str(tmp_path))) == tokenizer_hash(tokenizer)
    other = copy.deepcopy(tokenizer)
    other.chat_template = "{{ messages }}"
    assert tokenizer_hash(other) != tokenizer_hash(tokenizer)
    assert len(tokenizer_hash(tokenizer)) == 64
