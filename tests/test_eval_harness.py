"""lm-evaluation-harness on tiny models offline: the local held-out task, lm_eval's own `hf` model
type on a saved folder, the in-process runner, and the context length lm_eval reads."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from helpers import run_trainer

pytest.importorskip("lm_eval")

from newtonlm.data import train_bpe_tokenizer, vocab_size_for_model  # noqa: E402
from newtonlm.eval.harness import run_lm_eval, write_task  # noqa: E402
from newtonlm.eval.loading import load_for_eval  # noqa: E402
from newtonlm.models import build_model, load_preset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    assert write_task(out, ["data=shakespeare"], "val", max_docs=2) == "newtonlm_shakespeare_val"
    return out


@pytest.fixture(scope="module")
def byte_llama(tmp_path_factory):
    """A Llama with every weight zero (uniform next-token distribution over V = 320) and a
    byte-level tokenizer without merges, saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("hf_llama")
    tok = train_bpe_tokenizer(["abc"], 259)
    model = build_model({"arch": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128},
                        vocab_size_for_model(tok))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_written_task_holds_the_held_out_documents(tasks_dir):
    from newtonlm.data import compose_data_config
    from newtonlm.eval.corpus import split_documents

    lines = (tasks_dir / "newtonlm_shakespeare_val.jsonl").read_text().splitlines()
    expected = [t for _, t in zip(range(2), split_documents(compose_data_config([]), "val"))]
    assert [json.loads(line)["text"] for line in lines] == expected
    yaml = (tasks_dir / "newtonlm_shakespeare_val.yaml").read_text()
    assert "output_type: loglikelihood_rolling" in yaml and str(tasks_dir.resolve()) in yaml


def test_lm_eval_hf_model_type_on_a_saved_folder(tasks_dir, byte_llama):
    """lm_eval's own loading (--model hf --model_args pretrained=PATH): finite numbers, and bits per
    byte exactly log2(320) for the uniform model (every byte is one token of probability 1/320),
    as the perplexity command computes it."""
    out = run_lm_eval("hf", ["newtonlm_shakespeare_val"], tasks_dir,
                      model_args=f"pretrained={byte_llama},trust_remote_code=True")
    m = out["newtonlm_shakespeare_val"]
    assert all(math.isfinite(v) for v in m.values()) and set(m) == {"word_perplexity", "byte_perplexity",
                                                                    "bits_per_byte"}
    assert m["bits_per_byte"] == pytest.approx(math.log2(320), rel=1e-6)
    assert m["byte_perplexity"] == pytest.approx(320.0, rel=1e-5)


def test_mismatched_or_damaged_models_are_refused_before_lm_eval_runs(tasks_dir, byte_llama, tmp_path,
                                                                     capsys):
    """A tokenizer with more ids than the embedding (in-process runner and lm_eval's `hf` loading of
    a folder) and a truncated model.safetensors: clear errors naming the sizes or the file; the
    command prints one line and exits 2."""
    import shutil

    from newtonlm.eval.harness import main
    from newtonlm.eval.loading import LoadedModel

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7))) for _ in range(4000)]
    big = train_bpe_tokenizer([" ".join(words)], 400)
    assert len(big) == 400  # the uniform Llama's embedding has 320 rows
    lm = load_for_eval(byte_llama)
    wrong = LoadedModel(lm.model, big, lm.arch, lm.context, lm.recurrent, "a model")
    with pytest.raises(ValueError, match=rf"max token id \+ 1 = {len(big)}\), but the model at a model has "
                       "an embedding of 320 rows"):
        run_lm_eval(wrong, ["newtonlm_shakespeare_val"], tasks_dir)
    folder = tmp_path / "hf"
    shutil.copytree(byte_llama, folder)
    big.save_pretrained(folder)
    with pytest.raises(ValueError, match=rf"the tokenizer at {folder} .* embedding of 320 rows"):
        run_lm_eval("hf", ["newtonlm_shakespeare_val"], tasks_dir, model_args=f"pretrained={folder}")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(folder), "--tasks-dir", str(tasks_dir)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"newtonlm harness: error: cannot read {weights} (") and "SafetensorError" in err


@pytest.mark.slow
def test_exported_paragru_under_lm_eval_hf_equals_the_in_process_runner(tasks_dir, tmp_path):
    """A one-step DeepSpeed run of a tiny ParaGRU, exported by the export command: lm_eval's `hf`
    model type with trust_remote_code gives finite numbers, equal to the in-process runner on the
    run directory (same weights, same max_length)."""
    from newtonlm.export import export_checkpoint

    run = tmp_path / "run"
    overrides = ["model=paragru_demo", "model.hidden_size=32", "model.num_hidden_layers=1",
                 "model.intermediate_size=64", "model.num_heads=2", "model.max_position_embeddings=256",
                 "train.seq_len=16", "train.micro_batch_size=2", "train.max_steps=1", "train.sample_tokens=0",
                 "train.progress=false", "data.val_sequences=2", "data.num_workers=0",
                 "data.tokenizer.vocab_size=300", f"data.tokenizer.cache_dir={tmp_path / 'tok'}",
                 "wandb=disabled", f"hydra.run.dir={run}"]
    run_trainer(overrides, timeout=300)
    export_checkpoint(run, tmp_path / "hf")
    task = "newtonlm_shakespeare_val"
    hf = run_lm_eval("hf", [task], tasks_dir, limit=1,
                     model_args=f"pretrained={tmp_path / 'hf'},trust_remote_code=True")[task]
    assert set(hf) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert all(math.isfinite(v) and v > 0 for v in hf.values())
    lm = load_for_eval(run, context=256)
    assert lm.recurrent and lm.arch == "paragru"
    ours = run_lm_eval(lm, [task], tasks_dir, limit=1)[task]
    assert ours == pytest.approx(hf, rel=1e-5)


@pytest.mark.parametrize("arch", ["paragru", "paralstm", "llama", "mamba2"])
def test_configs_expose_the_context_length_lm_eval_reads(arch):
    from lm_eval.models.utils import resolve_max_length

    with torch.device("meta"):
        model = build_model(load_preset(f"{arch}_demo"), 512)
    assert resolve_max_length(model.config, None, default=999) == 2048 == model.config.max_position_embeddings
