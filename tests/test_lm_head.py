"""The chunked LM head (dpo/lm_head.py) against the dense path (the model's own logits), across architectures.

Oracle: `dense_head_logps` takes the model's `[N, V]` logits from its own forward; the chunked head must give the
same token log-probs and the same gradients for every parameter, within what summing in another order (the chunks)
can change in fp32 given the lengths of the sums on the way (tests/tolerance.py), on tiny random models of several
families whose heads differ: Llama untied and tied, GPT-2 (tied, another base-model layout), Phi (a bias on
the head), Gemma 2 (final_logit_softcapping), Cohere (logit_scale), Granite (logits_scaling), LoRA on the head.
"""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_reordered_close, model_terms, unit_roundoff
from torch.utils._python_dispatch import TorchDispatchMode

from dpo.layouts import make_collate
from dpo.lm_head import chunked_head_logps, chunked_head_supported
from dpo.logprobs import dense_head_logps, sequence_logps

VOCAB = 48
PAIRS = [
    {"prompt_ids": [1, 5, 6, 7], "chosen_ids": [8, 9, 2], "rejected_ids": [10, 2]},
    {"prompt_ids": [1, 11], "chosen_ids": [12, 13, 14, 2], "rejected_ids": [15, 16, 17, 18, 19, 2]},
    {"prompt_ids": [1, 20, 21, 22, 23, 24], "chosen_ids": [2], "rejected_ids": [25, 40, 47, 2]},
]
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build(family: str) -> torch.nn.Module:
    import transformers as t

    if family == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(**SMALL, tie_word_embeddings=False))
    elif family == "llama_tied":
        model = t.LlamaForCausalLM(t.LlamaConfig(**SMALL, tie_word_embeddings=True))
    elif family == "gemma2":  # a small cap, so softcapping changes the log-probs a lot
        model = t.Gemma2ForCausalLM(t.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=2.0))
    elif family == "cohere":
        model = t.CohereForCausalLM(t.CohereConfig(**SMALL, logit_scale=3.0))
    elif family == "granite":
        model = t.GraniteForCausalLM(t.GraniteConfig(**SMALL, logits_scaling=0.25))
    elif family == "phi":  # nn.Linear(bias=True) head
        model = t.PhiForCausalLM(t.PhiConfig(**SMALL))
    elif family == "gpt2":
        model = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    else:
        raise ValueError(family)
    with torch.no_grad():  # logits of a few units, so the log-probs are far from uniform
        for name, param in model.named_parameters():
            if "embed" in name or "wte" in name or "lm_head" in name:
                param.normal_(0, 1.0)
            elif "bias" in name:
                param.normal_(0, 0.5)
    model.config.use_cache = False
    return model.float().train()


def batch_of(layout: str):
    if layout == "padded":
        return make_collate("padded", pad_token_id=0, max_tokens_per_row=64, prefix_sharing=False)(PAIRS, None)
    return make_collate("packed", pad_token_id=0, max_tokens_per_row=64, prefix_sharing=layout == "prefix_shared")(
        PAIRS, None)


def inputs_of(batch) -> dict:
    return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                use_cache=False)


def logps_and_grads(model, batch, *, chunked: bool, chunk_size: int = 5):
    model.zero_grad(set_to_none=True)
    keep = batch.target_seq >= 0
    labels = batch.target_ids[keep]
    fn = chunked_head_logps if chunked else dense_head_logps
    logps = fn(model, inputs_of(batch), keep, labels, chunk_size=chunk_size)
    assert logps is not None
    # An uneven weighting, so a wrong gradient at any one position shows.
    weights = torch.linspace(0.5, 2.0, logps.shape[0])
    (logps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


def reduction_terms(model, batch) -> int:
    return model_terms(model.config, positions=batch.input_ids.numel(), row_length=batch.input_ids.shape[-1])


def assert_same(model, batch, *, chunk_size: int = 5) -> None:
    torch.manual_seed(0)
    dense, dense_grads = logps_and_grads(model, batch, chunked=False)
    torch.manual_seed(0)
    chunked, chunked_grads = logps_and_grads(model, batch, chunked=True, chunk_size=chunk_size)
    terms = reduction_terms(model, batch)
    assert_reordered_close(chunked, dense, terms=terms, msg="log-probs")
    assert chunked_grads.keys() == dense_grads.keys() and dense_grads
    for name, grad in dense_grads.items():  # the chunks sum in another order: near-zero entries need the floor
        assert_reordered_close(chunked_grads[name], grad, terms=terms, msg=name)


@pytest.mark.parametrize("family", ["llama", "llama_tied", "gpt2", "phi", "gemma2", "cohere", "granite"])
def test_chunked_head_equals_the_models_own_logits(family: str) -> None:
    torch.manual_seed(0)
    model = build(family)
    batch = batch_of("padded")
    assert chunked_head_supported(model, batch.input_ids)
    assert_same(model, batch)


@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_every_layout_and_chunk_size(layout: str, chunk_size: int) -> None:
    torch.manual_seed(1)
    assert_same(build("llama"), batch_of(layout), chunk_size=chunk_size)


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_the_logit_transforms_are_not_vacuous(family: str) -> None:
    """Without the family's transform the log-probs differ by far more than the tolerance above: the equality test
    could not pass if the transform were skipped."""
    from dpo.lm_head import causal_lm_of

    torch.manual_seed(0)
    model = build(family)
    batch = batch_of("padded")
    keep = batch.target_seq >= 0
    with torch.no_grad():
        dense = dense_head_logps(model, inputs_of(batch), keep, batch.target_ids[keep], chunk_size=8)
        hidden = model.get_decoder()(**inputs_of(batch)).last_hidden_state[keep]
        raw = torch.log_softmax(causal_lm_of(model).get_output_embeddings()(hidden), -1)
        raw = raw.gather(-1, batch.target_ids[keep][:, None]).squeeze(-1)
    assert (raw - dense).abs().max() > 0.1


def test_lora_on_the_head_gets_its_gradients() -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(build("llama"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():  # B is zero in a fresh adapter; make the head adapter matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    batch = batch_of("prefix_shared")
    assert_same(model, batch)
    _, grads = logps_and_grads(model, batch, chunked=True)
    assert any("lm_head" in n and "lora_A" in n for n in grads)
    with model.disable_adapter(), torch.no_grad():  # the reference: adapters off, head adapter included
        keep = batch.target_seq >= 0
        off = chunked_head_logps(model, inputs_of(batch), keep, batch.target_ids[keep], chunk_size=3)
        want = dense_head_logps(model, inputs_of(batch), keep, batch.target_ids[keep], chunk_size=3)
        on_base = dense_head_logps(model.get_base_model(), inputs_of(batch), keep, batch.target_ids[keep],
                                   chunk_size=3)
    terms = reduction_terms(model, batch)
    assert_reordered_close(off, want, terms=terms, msg="adapters off, chunked vs dense")
    assert_reordered_close(off, on_base, terms=terms, msg="adapters off vs the base model")


def test_bf16_autocast_uses_the_head_dtype_of_the_models_forward() -> None:
    """Under autocast the head runs in bf16 as inside the model's forward: chunked equals dense within bf16 rounding,
    and both differ from fp32 (so the autocast really applied)."""
    torch.manual_seed(0)
    model = build("llama").eval()
    batch = batch_of("packed")
    keep = batch.target_seq >= 0
    labels = batch.target_ids[keep]
    with torch.no_grad():
        fp32 = dense_head_logps(model, inputs_of(batch), keep, labels, chunk_size=4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dense = dense_head_logps(model, inputs_of(batch), keep, labels, chunk_size=4)
            chunked = chunked_head_logps(model, inputs_of(batch), keep, labels, chunk_size=4)
            largest_logit = float(model(**inputs_of(batch)).logits.abs().max())
    # A BLAS that blocks 4 rows otherwise than all of them may round a logit to the neighbouring bf16 value: each
    # log-prob then moves by at most one bf16 rounding of the largest logit in its label term and its logsumexp.
    bf16_rounding = 2 * 2 * unit_roundoff(torch.bfloat16) * largest_logit
    assert float((chunked - dense).abs().max()) <= bf16_rounding, (chunked - dense).abs().max()
    assert (dense - fp32).abs().max() > 1e-4


class DoubledLogits(torch.nn.Module):
    """A model whose forward does something to logits that dpo.lm_head does not know: it must be detected."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.inner.get_output_embeddings()

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = out.logits * 2
        return out


def test_an_unknown_head_is_detected_and_falls_back(capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = DoubledLogits(build("llama"))
    batch = batch_of("padded")
    assert not chunked_head_supported(model, batch.input_ids)
    assert not chunked_head_supported(model, batch.input_ids)  # decided once, said once
    assert capsys.readouterr().err.count("using the model's own logits") == 1
    keep = batch.target_seq >= 0
    assert chunked_head_logps(model, inputs_of(batch), keep, batch.target_ids[keep], chunk_size=4) is None
    with torch.no_grad():
        got = sequence_logps(model, batch)  # the dense fallback: the doubled logits' log-probs
        want = dense_head_logps(model, inputs_of(batch), keep, batch.target_ids[keep], chunk_size=4)
    per_sequence = torch.zeros(6).index_add(0, batch.target_seq[keep], want)
    torch.testing.assert_close(got.chosen_logps, per_sequence[:3])
    torch.testing.assert_close(got.rejected_logps, per_sequence[3:])


class LargestLogits(TorchDispatchMode):
    """Records the most rows of any [rows, V] tensor an op creates (logits, their softmax or gradient), leaving out
    the [H, V] transpose of the head weight itself."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == VOCAB and t.shape[0] != self.hidden:
                self.rows = max(self.rows, t.shape[0])
        return out


@pytest.mark.parametrize("chunked", [True, False])
def test_no_scored_positions_by_vocab_tensor_in_forward_or_backward(chunked: bool) -> None:
    """The oracle for memory: no op of the chunked forward + backward creates a logits-shaped tensor of more than
    chunk rows (the dense path, checked too, creates one of all N scored positions)."""
    torch.manual_seed(0)
    model = build("llama")
    batch = batch_of("padded")
    n = int((batch.target_seq >= 0).sum())
    assert n != 32 and n > 4
    assert chunked_head_supported(model, batch.input_ids)  # the one-off probe (8 tokens) is not the training path
    with LargestLogits(hidden=32) as seen:
        logps_and_grads(model, batch, chunked=chunked, chunk_size=4)
    assert seen.rows == (4 if chunked else n)


def head_path(model, batch, *, chunk_size: int = 4) -> str:
    """The name of the autograd node the chunked head's log-probs come from."""
    keep = batch.target_seq >= 0
    logps = chunked_head_logps(model, inputs_of(batch), keep, batch.target_ids[keep], chunk_size=chunk_size)
    return type(logps.grad_fn).__name__


def test_a_plain_linear_head_is_one_node_and_others_go_through_checkpoint() -> None:
    """nn.Linear heads (with or without a transform after them) take `_LinearHeadLogps`; a LoRA head and autocast
    take the per-chunk checkpointed form (the tests above check both against the dense path)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    batch = batch_of("packed")
    for family in ("llama", "phi", "gemma2"):
        assert head_path(build(family), batch) == "_LinearHeadLogpsBackward", family
    lora = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["lm_head"]))
    assert head_path(lora, batch) == "CatBackward0"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head_path(build("llama"), batch) == "CatBackward0"


@pytest.mark.parametrize("family", ["llama", "phi", "gemma2"])
def test_the_checkpointed_form_equals_the_dense_path_too(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The general form, forced on heads the single node would take, against the same oracle."""
    import dpo.lm_head

    monkeypatch.setattr(dpo.lm_head, "_plain_linear_head", lambda *a, **k: False)
    torch.manual_seed(0)
    model = build(family)
    batch = batch_of("padded")
    assert head_path(model, batch) == "CatBackward0"
    assert_same(model, batch)


class NewVocabByHidden(TorchDispatchMode):
    """Records the ops that create a new [V, H] tensor (a weight-gradient buffer or temporary): an output of that
    shape in storage none of the op's inputs has (views and in-place results are not new)."""

    def __init__(self, shape: tuple[int, int]) -> None:
        super().__init__()
        self.shape, self.ops = shape, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape \
                    and t.untyped_storage().data_ptr() not in inputs:
                self.ops.append(func.overloadpacket.__name__)
        return out


@pytest.mark.parametrize("single_node", [True, False])
def test_backward_makes_one_head_gradient_not_one_per_chunk(single_node: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle for the weight gradient's memory: the single node accumulates every chunk into one [V, H] buffer,
    which becomes the head's `.grad` as it is (the embedding's gradient is the only other new [V, H] tensor);
    through `checkpoint`, each chunk's weight gradient is a new [V, H] tensor and so is each partial sum."""
    import dpo.lm_head

    if not single_node:
        monkeypatch.setattr(dpo.lm_head, "_plain_linear_head", lambda *a, **k: False)
    torch.manual_seed(0)
    model = build("llama")
    batch = batch_of("padded")
    keep = batch.target_seq >= 0
    chunks = -(-int(keep.sum()) // 4)
    assert chunks >= 4
    logps = chunked_head_logps(model, inputs_of(batch), keep, batch.target_ids[keep], chunk_size=4)
    with NewVocabByHidden((VOCAB, 32)) as seen:
        logps.sum().backward()
    if single_node:
        assert sorted(seen.ops) == ["embedding_dense_backward", "zeros_like"]
    else:
        assert sorted(seen.ops) == ["add"] * (chunks - 1) + ["embedding_dense_backward"] + ["mm"] * chunks
