"""Sequence parallelism of whole language models (newtonlm.training.sequence_parallel).

Llama (DeepSpeed-Ulysses around transformers' attention) split over 2 gloo ranks against the same
model in one process on the whole sequence, in float64: every rank's chunk of the logits, and the
parameter gradients summed over the ranks (each rank's are partial sums over its chunk). T is
never divisible by K (a padded chunk); GQA (fewer key-value heads); eager and SDPA attention.
The start-up checks run in-process.
"""

import pytest
import torch
import torch.distributed as dist
from test_seqpar import Pool

from newtonlm.kernels import split_sequence
from newtonlm.models import build_model, model_config
from newtonlm.training.sequence_parallel import (
    ULYSSES,
    SequenceParallelUnsupported,
    check_sequence_parallel,
    set_sequence_parallel,
)

VOCAB = 61
LLAMA = {"arch": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64}
GRU = {"arch": "paragru", "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "conv_kernel": 4,
       "intermediate_size": 48}


@pytest.fixture(scope="module")
def pool2():
    pool = Pool(2)
    yield pool
    pool.close()


def _model(preset, attn=None):
    torch.manual_seed(1)
    model = build_model(preset, VOCAB).double()
    if attn is not None:
        model.set_attn_implementation(attn)
    return model


def _loss_weights(T, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, T, VOCAB, generator=g, dtype=torch.float64)


def _llama_case(rank, world, group, preset, attn, T):
    """-> (max |logits chunk - reference chunk|, {name: (summed grad, reference grad)}) on rank 0."""
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, T))
    w = _loss_weights(T)
    ref = _model(preset, attn)
    ref_logits = ref(input_ids=ids, use_cache=False).logits
    (ref_logits * w).sum().backward()

    model = _model(preset, attn)
    set_sequence_parallel(model, group)
    assert model.config._attn_implementation == ULYSSES
    logits = model(input_ids=split_sequence(ids, group)).logits
    (logits * split_sequence(w, group)).sum().backward()  # the chunk's share of the same loss
    err = (logits - split_sequence(ref_logits, group)).abs().max().item()
    grads = {}
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        g = p.grad.clone()
        dist.all_reduce(g, group=group)  # partial sums over the chunks -> the whole sequence's
        grads[name] = (g - q.grad).abs().max().item() / max(q.grad.abs().max().item(), 1e-30)
    set_sequence_parallel(model, None)  # switched off: one process again, the same answer
    back = (model(input_ids=ids, use_cache=False).logits - ref_logits).abs().max().item()
    return err, max(grads.values()), back, model.config._attn_implementation


@pytest.mark.parametrize("attn,T", [("sdpa", 11), ("eager", 10)])
def test_llama_ulysses_matches_one_process(pool2, attn, T):
    """Chunk logits and summed gradients equal the unsplit model (fp64: within 1e-12 measured
    ~1e-15); T=11 pads the second chunk, T=10 is the even case. GQA: 4 heads, 2 key-value heads."""
    for err, grad_rel, back, impl in pool2.run(_llama_case, LLAMA, attn, T):
        assert err < 1e-12 and grad_rel < 1e-12 and back < 1e-12, (err, grad_rel, back)
        assert impl == attn


@pytest.mark.slow
def test_llama_ulysses_on_four_ranks():
    """K=4, T=13 (chunks 4, 3, 3, 3: three padded), 4 heads and 4 key-value heads."""
    pool = Pool(4)
    try:
        preset = {**LLAMA, "num_key_value_heads": 4}
        for err, grad_rel, back, impl in pool.run(_llama_case, preset, "sdpa", 13, timeout=180):
            assert err < 1e-12 and grad_rel < 1e-12 and back < 1e-12 and impl == "sdpa"
    finally:
        pool.close()


def _llama_global_positions(rank, world, group):
    """RoPE must use global positions: a model fed chunks with local positions 0.. differs."""
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (1, 9))
    ref = _model(LLAMA)(input_ids=ids, use_cache=False).logits
    model = _model(LLAMA)
    set_sequence_parallel(model, group)
    chunk = split_sequence(ids, group)
    wrong = model(input_ids=chunk, position_ids=torch.arange(chunk.shape[1])[None]).logits
    right = model(input_ids=chunk).logits
    return ((right - split_sequence(ref, group)).abs().max().item(),
            (wrong - split_sequence(ref, group)).abs().max().item())


def test_llama_chunk_positions_are_global(pool2):
    (r0, w0), (r1, w1) = pool2.run(_llama_global_positions)
    assert max(r0, r1) < 1e-12
    assert w0 < 1e-12 and w1 > 1e-6  # rank 0's local positions are the global ones; rank 1's not


def _llama_bad_input(rank, world, group, what):
    model = _model(LLAMA)
    set_sequence_parallel(model, group)
    ids = torch.randint(0, VOCAB, (2, 5))
    if what == "padding" and rank == 1:
        model(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 1, 0]] * 2))
    elif what == "cache":
        from transformers import DynamicCache

        model(input_ids=ids, cache=DynamicCache(config=model.config) if rank == 0 else None)
    elif what == "empty":
        model(input_ids=ids[:, :0] if rank == 1 else ids)
    model(input_ids=ids)


@pytest.mark.parametrize("what,message", [
    ("padding", "rank 1 of 2\\): an attention_mask with padding|rank\\(s\\) \\[1\\] of 2 rejected"),
    ("cache", "rank 0 of 2\\): a cache was passed|rank\\(s\\) \\[0\\] of 2 rejected"),
    ("empty", "chunk lengths \\[5, 0\\]")])
def test_llama_bad_chunk_input_raises_on_every_rank(pool2, what, message):
    import re

    errors = pool2.run(_llama_bad_input, what, expect_error=True)
    for kind, text in errors:
        assert kind == "SequenceParallelUnsupported" and re.search(message, text), (kind, text)


def _switch_mamba(rank, world, group):
    model = build_model({"arch": "mamba2", "hidden_size": 32, "num_hidden_layers": 1, "head_dim": 16,
                         "state_size": 8, "n_groups": 1, "chunk_size": 8}, VOCAB)
    set_sequence_parallel(model, group)


def test_mamba2_is_refused_with_the_reason(pool2):
    for kind, text in pool2.run(_switch_mamba, expect_error=True):
        assert kind == "SequenceParallelUnsupported" and "initial SSM state" in text, text


# ----------------------------------------------------------------------------- start-up checks


def test_check_returns_the_chunk_lengths():
    assert check_sequence_parallel(model_config(LLAMA, VOCAB), 2, 11) == [6, 5]
    assert check_sequence_parallel(model_config(GRU, VOCAB), 3, 10) == [4, 3, 3]
    assert check_sequence_parallel(model_config(GRU, VOCAB), 1, 1) == [1]


@pytest.mark.parametrize("preset,K,T,message", [
    (LLAMA, 3, 12, "num_attention_heads=4, num_key_value_heads=2 over sequence_parallel=3"),
    (LLAMA, 4, 12, "num_key_value_heads=2 over sequence_parallel=4"),
    (LLAMA, 2, 1, "seq_len=1 over sequence_parallel=2: a sequence of T=1 steps cannot be split"),
    (GRU, 4, 11, r"chunks \[3, 3, 3, 2\]; the paragru convolution \(conv_kernel=4\) needs every chunk "
                 r"to have at least 3 steps \(seq_len >= 12\)"),
    (GRU, 0, 11, "sequence_parallel=0; expected a positive integer"),
    ({"arch": "mamba2", "hidden_size": 32, "num_hidden_layers": 1, "head_dim": 16}, 2, 64,
     "arch 'mamba2' has no sequence parallelism"),
])
def test_check_rejects_bad_settings_naming_the_value(preset, K, T, message):
    with pytest.raises(SequenceParallelUnsupported, match=message):
        check_sequence_parallel(model_config(preset, VOCAB), K, T)


def test_switching_on_without_a_process_group_is_an_error():
    assert not dist.is_initialized()
    with pytest.raises(SequenceParallelUnsupported, match="needs an initialized torch.distributed"):
        set_sequence_parallel(_model(LLAMA), object())
    with pytest.raises(SequenceParallelUnsupported, match="expected a ParaRNN or Llama"):
        set_sequence_parallel(torch.nn.Linear(2, 2), None)
