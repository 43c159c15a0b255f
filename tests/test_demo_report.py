"""The end-of-run summary (newtonlm.training.loop._report): what the numbers mean, computed from the
run's own vocabulary, and next commands that are copy-pasteable with this run's paths; and the
demo's vocabulary being one number across the trainer and the sizes table."""

import math
import os
import shlex
import sys

from newtonlm.training.loop import _report


def result(**changes) -> dict:
    base = {"status": "finished", "step": 300, "tokens_seen": 614_400, "parameters": {"total": 1_873_024},
            "run_dir": os.path.abspath("runs/paragru_demo-shakespeare"), "vocab_size": 8000,
            "model_preset": "paragru_demo", "overrides": [], "val_loss": 5.0173, "val_ppl": 150.99,
            "val_tokens": 32_768, "sample_prompt": "ROMEO:", "sample": "ROMEO: What, ho!"}
    return {**base, **changes}


def report(capsys, **changes) -> list[str]:
    _report(result(**changes))
    return capsys.readouterr().out.splitlines()


def commands(lines: list[str]) -> list[list[str]]:
    """The command lines of the "next" block, split as a shell would."""
    block = lines[lines.index("next (each line copy-pasteable):") + 1:]
    return [shlex.split(line) for line in block if not line.lstrip().startswith("#")]


def python() -> str:
    rel = os.path.relpath(sys.executable)
    return sys.executable if rel.startswith("..") else rel


def test_numbers_are_explained_from_the_run_vocabulary(capsys):
    lines = report(capsys)
    assert lines[:3] == [
        "status: finished at step 300 (614,400 tokens), run dir runs/paragru_demo-shakespeare",
        "validation: loss 5.0173, perplexity 150.99 (32,768 tokens)", "sample:"]
    text = "\n".join(lines)
    assert "a uniform choice among 151 tokens" in text and "32,768 held-out tokens" in text
    assert f"loss ln 8000 = {math.log(8000):.2f}, perplexity ~8,000" in text and "8.99" in text
    assert "trained on 614,400 tokens in 300 steps; 1,873,024 parameters" in text
    other = "\n".join(report(capsys, vocab_size=512))  # computed, not a constant
    assert "loss ln 512 = 6.24, perplexity ~512" in other and "8,000" not in other


def test_next_commands_use_this_runs_paths(capsys):
    py = python()
    cmds = commands(report(capsys))
    assert cmds[0] == [py, "-m", "newtonlm.eval.perplexity", "runs/paragru_demo-shakespeare"]
    assert cmds[1] == [py, "-m", "newtonlm.export", "--checkpoint", "runs/paragru_demo-shakespeare",
                       "--out", "hf/paragru_demo-shakespeare"]
    assert cmds[2][:2] == [py, "-c"]
    code = cmds[2][2]
    compile(code, "<load the export>", "exec")  # valid Python once the shell has unquoted it
    # both with trust_remote_code: the tokenizer's from_pretrained asks interactively otherwise
    assert code.count('from_pretrained("hf/paragru_demo-shakespeare", trust_remote_code=True)') == 2
    assert 't("ROMEO:", return_tensors="pt")' in code
    assert cmds[3] == [py, "-m", "newtonlm.training.train", "model=llama_demo"]
    assert len(cmds) == 4


def test_another_architecture_keeps_the_other_overrides_and_gets_its_own_run_dir(capsys):
    lines = report(capsys, model_preset="llama_125m", run_dir="/scratch/my run",
                   overrides=["model=llama_125m", "model.num_hidden_layers=2", "+model.rope_theta=1e4",
                              "train.max_steps=5", "data.sources.x.paths=[a b/*.txt]",
                              "hydra.run.dir=/scratch/my run"])
    cmds = commands(lines)
    assert cmds[0][-1] == "/scratch/my run"  # quoted for the shell, split back to one argument
    assert cmds[3][3:] == ["model=paragru_125m", "train.max_steps=5", "data.sources.x.paths=[a b/*.txt]",
                           "hydra.run.dir=/scratch/my run-paragru_125m"]
    assert "# the same run with another architecture (or paralstm_125m, mamba2_125m)" in "\n".join(lines)


def test_a_preempted_run_says_how_to_continue_and_nothing_else(capsys):
    lines = report(capsys, status="preempted (SIGTERM)", overrides=["train.max_steps=50"])
    assert lines[-2] == "to continue from the checkpoint, run the same command again:"
    assert shlex.split(lines[-1]) == [python(), "-m", "newtonlm.training.train", "train.max_steps=50"]
    assert not any("what the numbers mean" in line or "next" in line for line in lines)


def test_the_sizes_table_uses_the_demo_tokenizers_vocabulary():
    from newtonlm.data import compose_data_config, vocab_size_for_model
    from newtonlm.models.presets import REFERENCE_VOCAB

    class Trained:  # what the byte-level BPE trainer returns: ids 0 .. vocab_size - 1
        def __init__(self, n):
            self.n = n

        def get_vocab(self):
            return {f"t{i}": i for i in range(self.n)}

        def __len__(self):
            return self.n

    demo = compose_data_config([])  # configs/data/shakespeare.yaml, the demo's corpus
    assert REFERENCE_VOCAB["demo"] == vocab_size_for_model(Trained(demo.tokenizer.vocab_size)) == 8000
