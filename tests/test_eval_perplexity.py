"""Perplexity, bits per byte and the long-sequence scoring strategies, against independent
computations: transformers' own loss on whole windows, per-target brute force, and a model whose
probabilities are known exactly."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_trainer

from newtonlm.data import train_bpe_tokenizer, vocab_size_for_model
from newtonlm.eval.corpus import token_stream, windows
from newtonlm.eval.loading import LoadedModel, load_for_eval
from newtonlm.eval.perplexity import evaluate_stream, main, position_bins
from newtonlm.eval.scoring import token_nll
from newtonlm.models import build_model

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
         "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles\n" * 3,
         "And by opposing end them. To die\u2014to sleep,\nNo more; and by a sleep to say we end"]
TINY = {"paragru": {"num_heads": 2, "intermediate_size": 64},
        "paralstm": {"num_heads": 2, "intermediate_size": 64},
        "llama": {"num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 64},
        "mamba2": {"head_dim": 16, "state_size": 8, "n_groups": 1, "chunk_size": 16}}


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS * 4, 300)


def tiny_model(arch, vocab, layers=2):
    torch.manual_seed(0)
    fields = {"arch": arch, "hidden_size": 32, "num_hidden_layers": layers, **TINY[arch]}
    return build_model(fields, vocab).eval()


def loaded(model, tokenizer, arch, context):
    return LoadedModel(model, tokenizer, arch, context, arch != "llama", "test")


@pytest.mark.parametrize("arch", ["paragru", "paralstm", "llama", "mamba2"])
def test_perplexity_is_exp_of_the_mean_loss_computed_independently(tokenizer, arch):
    model = tiny_model(arch, vocab_size_for_model(tokenizer))
    stream = token_stream(TEXTS, tokenizer)
    # independent: the stream rebuilt with the tokenizer's own call, each window scored by
    # transformers' loss over the whole window at once (no chunks, no state carried)
    eos = tokenizer.eos_token_id
    ids, text_target = [eos], []
    for t in TEXTS:
        piece = tokenizer(t, add_special_tokens=False).input_ids
        ids += piece + [eos]
        text_target += [True] * len(piece) + [False]
    assert ids == stream.ids.tolist() and text_target == stream.text_mask.tolist()
    L = 24
    nats = text_nats = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, L):
            w = torch.tensor(ids[start:start + L + 1])[None]
            out = model(input_ids=w, labels=w, use_cache=False)
            nats += out.loss.item() * (w.shape[1] - 1)
            logp = torch.log_softmax(out.logits[0, :-1].double(), -1)
            nll = -logp.gather(1, w[0, 1:, None]).squeeze(1)
            text_nats += nll[torch.tensor(text_target[start:start + L])].sum().item()
    n_targets, n_bytes = len(ids) - 1, sum(len(t.encode("utf-8")) for t in TEXTS)
    # context 8 < L: recurrent models run in chunks carrying their state, llama full attention
    r = evaluate_stream(loaded(model, tokenizer, arch, 8), stream, L, batch_size=3, attention="full")
    assert r["tokens"] == n_targets and r["bytes"] == n_bytes
    assert r["ppl"] == pytest.approx(math.exp(nats / n_targets), rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(text_nats / (math.log(2) * n_bytes), rel=1e-5)
    assert sum(r["position_count"]) == n_targets
    assert r["in_context"]["tokens"] + r["beyond_context"]["tokens"] == n_targets


def test_bits_per_byte_by_hand_with_a_uniform_model():
    """A byte-level tokenizer without merges (one token per UTF-8 byte) and a Llama with all weights
    zero (logits 0: every token has probability 1/V): each of the 12 bytes costs log2(V) bits."""
    tok = train_bpe_tokenizer(["abc"], 259)  # 3 specials + 256 bytes: no merge
    V = vocab_size_for_model(tok)
    assert V == 320
    model = tiny_model("llama", V)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    texts = ["Héllo", "wörld!"]  # 6 + 7 UTF-8 bytes (é and ö take 2 each)
    stream = token_stream(texts, tok)
    assert stream.n_bytes == 13 and stream.n_targets == 13 + 2  # every byte + one EOS per document
    r = evaluate_stream(loaded(model, tok, "llama", 4), stream, eval_len=5)
    assert r["bits_per_byte"] == pytest.approx(math.log2(320), rel=1e-6)  # 8.3219 bits per byte
    assert r["ppl"] == pytest.approx(320.0, rel=1e-5)
    assert r["bytes_per_token"] == 1.0


@pytest.mark.parametrize("arch", ["paragru", "paralstm", "mamba2"])
def test_recurrent_chunks_carry_the_state(tokenizer, arch):
    model = tiny_model(arch, vocab_size_for_model(tokenizer))
    ids = torch.as_tensor(token_stream(TEXTS, tokenizer).ids[:71])[None].repeat(2, 1)
    full = token_nll(model, ids, "full", chunk=1)
    for chunk in (7, 32):
        torch.testing.assert_close(token_nll(model, ids, "recurrent", chunk), full, rtol=1e-4, atol=1e-5)


def test_sliding_window_matches_per_target_brute_force(tokenizer):
    model = tiny_model("llama", vocab_size_for_model(tokenizer))
    ids = torch.as_tensor(token_stream(TEXTS, tokenizer).ids[:41])[None]
    T, chunk, stride = 40, 16, 5
    got = token_nll(model, ids, "window", chunk, stride)[0]
    expected = []
    with torch.no_grad():
        for j in range(T):
            # target j sits in the first window (j < chunk) or in the window ending at
            # chunk + k * stride (clipped to T) for the smallest k that covers it
            end = chunk if j < chunk else min(T, chunk + math.ceil((j + 1 - chunk) / stride) * stride)
            start = end - chunk
            logits = model(input_ids=ids[:, start:end], use_cache=False).logits[0, j - start]
            expected.append(-torch.log_softmax(logits.double(), -1)[ids[0, j + 1]].item())
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(token_nll(model, ids, "window", 64), token_nll(model, ids, "full", 1))


def test_windows_and_bins_cover_every_target_once(tokenizer):
    stream = token_stream(TEXTS, tokenizer)
    seqs = list(windows(stream, 10))
    assert sum(len(m) for _, m in seqs) == stream.n_targets
    assert np.array_equal(np.concatenate([ids[1:] for ids, _ in seqs]), stream.ids[1:])
    assert position_bins(256, 1024) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024]
    assert position_bins(100, 50) == [0, 1, 2, 4, 8, 16, 32, 50]
    capped = token_stream(TEXTS, tokenizer, max_tokens=5)
    assert capped.n_docs == 1 and capped.n_bytes == len(TEXTS[0].encode())


def test_a_tokenizer_with_ids_beyond_the_embedding_is_refused_before_scoring(tokenizer, tmp_path, capsys):
    """A model whose embedding has fewer rows than the tokenizer has ids: a clear error naming both
    sizes (not "IndexError: index out of range in self" from inside the embedding), from the Python
    entry point and from the command (one line, exit 2)."""
    import newtonlm.eval.perplexity as ppl

    rows = 256  # the tokenizer has 300 ids
    model = tiny_model("paragru", rows)
    stream = token_stream(TEXTS, tokenizer)
    with pytest.raises(ValueError, match=r"produces token ids up to 299 \(max token id \+ 1 = 300\), but the "
                       r"model at test has an embedding of 256 rows"):
        evaluate_stream(loaded(model, tokenizer, "paragru", 8), stream, 16)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    capsys.readouterr()  # save_pretrained's own bar
    with pytest.raises(SystemExit) as exit_:
        ppl.main([str(tmp_path / "hf"), "--quiet"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"newtonlm perplexity: error: the tokenizer at {tmp_path / 'hf'} produces token "
                          "ids up to 299 (max token id + 1 = 300)") and "256 rows" in err


@pytest.mark.slow
def test_command_on_a_training_run(tmp_path, capsys):
    """A real (one-step) DeepSpeed run, evaluated by the command on its held-out split: the JSON
    result equals an independent forward of the checkpoint's weights."""
    run = tmp_path / "run"
    overrides = ["model=paragru_demo", "model.hidden_size=32", "model.num_hidden_layers=1",
                 "model.intermediate_size=64", "model.num_heads=2", "train.seq_len=16",
                 "train.micro_batch_size=2", "train.max_steps=1", "train.sample_tokens=0",
                 "train.progress=false", "data.val_sequences=2", "data.num_workers=0",
                 "data.tokenizer.vocab_size=300", f"data.tokenizer.cache_dir={tmp_path / 'tok'}",
                 "wandb=disabled", f"hydra.run.dir={run}"]
    run_trainer(overrides, timeout=300)
    main([str(run), "--json", "--max-tokens", "200", "--eval-factor", "2", "--out", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    r = json.loads(captured.out)  # stdout: the JSON only; stderr: what it is doing and how far along
    assert "loading" in captured.err and "tokenizing the val split" in captured.err
    assert "scoring" in captured.err and "batch" in captured.err
    assert r == json.loads((tmp_path / "r.json").read_text())
    assert r["context"] == 16 and r["eval_len"] == 32 and r["strategy"] == "recurrent"
    assert r["split"] == "val" and r["data"] == ["shakespeare"] and r["tokens"] >= 200
    state = torch.load(run / "checkpoints" / "step_00000001" / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
    lm = load_for_eval(run)
    fields = {"arch": "paragru", "hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64,
              "num_heads": 2}
    model = build_model(fields, vocab_size_for_model(lm.tokenizer))
    model.load_state_dict(state, strict=False)
    from newtonlm.data import compose_data_config
    from newtonlm.eval.corpus import split_documents

    cfg = compose_data_config([])
    stream = token_stream(split_documents(cfg, "val"), lm.tokenizer, max_tokens=200)
    nats = 0.0
    with torch.no_grad():
        for ids, _ in windows(stream, 32):
            w = torch.as_tensor(ids)[None]
            nats += model(input_ids=w, labels=w).loss.item() * (len(ids) - 1)
    assert r["ppl"] == pytest.approx(math.exp(nats / stream.n_targets), rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(r["loss"]), rel=1e-9)
    with pytest.raises(ValueError, match="step_00000009"):
        load_for_eval(run, step=9)
