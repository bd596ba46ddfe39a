"""Shared fixtures: small byte-level BPE tokenizers trained locally on fixed text (no hub, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from demo.tiny import build_tokenizer

# Enough repetition that common words ("Ġhello", "Ġworld", "Ġyes", ...) become single tokens.
FIXTURE_TEXTS: list[str] = [
    "Say hello world. Hello there, hello again! The answer is yes. The answer is no.",
    "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road? To get to the other side.",
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine.",
    "Please write a short poem about the sea. The sea is blue and wide and deep.",
    "What is two plus two? Two plus two is four. I do not know the answer, sorry.",
] * 20


def _save(tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """512-token byte-level BPE; adds BOS; pad "<pad>" (id 0), BOS "<s>" (1), EOS "</s>" (2); ChatML-like template."""
    return build_tokenizer(FIXTURE_TEXTS, vocab_size=512)


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tokenizer` saved with `save_pretrained`, for anything that loads it by path."""
    return _save(tokenizer, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer_no_bos() -> PreTrainedTokenizerFast:
    """Same vocabulary rules, but the tokenizer adds no BOS."""
    return build_tokenizer(FIXTURE_TEXTS, vocab_size=512, add_bos=False)


@pytest.fixture(scope="session")
def tokenizer_no_bos_dir(
    tokenizer_no_bos: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return _save(tokenizer_no_bos, tmp_path_factory.mktemp("tokenizer_no_bos"))


@pytest.fixture
def network_attempts(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every socket connection the test's code tries, refused and recorded. "Never downloads" is then checked by
    what was attempted, not by a time bound that a loaded machine can break."""
    import socket

    attempts: list = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: refuse(self, address))
    return attempts
