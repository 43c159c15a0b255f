"""``python -m newtonlm.training.train`` with mistakes in it: one message naming the setting, its value
and what was expected (a "did you mean" for misspelled keys and options), exit code 2, before torch
is imported and before anything is written; internal errors keep their traceback (exit code 1)."""

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from newtonlm.data import DataError
from newtonlm.quiet import quiet_expected_notices
from newtonlm.training.config import compose_train_config
from newtonlm.training.errors import UserError
from newtonlm.training.train import precheck, reported_errors

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, message", [
    ("train.max_step=10", "train.max_step: no such setting (did you mean train.max_steps?); the train "
                          "settings are documented in newtonlm/training/config.py (TrainConfig)"),
    ("wandb.mod=online", "wandb.mod: no such setting (did you mean wandb.mode?)"),
    ("data.tokenizer.vocab_sise=512", "data.tokenizer.vocab_sise: no such setting (did you mean "
                                      "data.tokenizer.vocab_size?); the data settings are documented in "
                                      "newtonlm/data/config.py"),
    ("trian.lr=1", "trian: no such setting (did you mean train?); the top-level sections are hydra, model, "
                   "data, train, wandb"),
    ("hydra.run.dirr=x", "hydra.run.dirr: no such setting (did you mean hydra.run.dir?)"),
    ("model.hiden_size=64", "model.hiden_size: the model preset has no such field (did you mean "
                            "model.hidden_size?); a field of the architecture's transformers config that the "
                            "preset does not set is added with +model.hiden_size=64"),
    ("model=llama_dmeo", "model=llama_dmeo: no such option (did you mean model=llama_demo?); the options of "
                         "model: llama_125m, llama_1b"),
    ("train=demoo", "train=demoo: no such option (did you mean train=demo?); the options of train: "
                    "cluster, demo"),
    ("train.max_steps=abc", "Error merging override train.max_steps=abc: Value 'abc' of type 'str' could not "
                            "be converted to Integer"),
    ("train.lr=1,2", "Ambiguous value for argument 'train.lr=1,2'"),
])
def test_composition_errors_are_one_message_with_a_did_you_mean(override, message):
    with pytest.raises(UserError) as err:
        compose_train_config([override])
    text = str(err.value)
    assert text.startswith(message), text
    assert "To append to your config" not in text and "full_key" not in text and "schema" not in text


def test_the_composed_config_is_hydras_with_its_run_dir():
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_train_config(["model=llama_demo", "train.max_steps=7"])
    assert cfg.hydra.run.dir == "runs/llama_demo-shakespeare" and cfg.train.max_steps == 7
    assert cfg.model.arch == "llama" and not HydraConfig.initialized()  # left for hydra.main to set


@pytest.mark.parametrize("overrides, error, message", [
    (["hydra.run.dir={tmp}/a_file/run"], UserError,
     "hydra.run.dir='{tmp}/a_file/run': {tmp}/a_file is a file, so the run directory cannot be created "
     "there"),
    (["train.lr=-1"], UserError, "train.lr=-1.0; expected > 0"),
    (["+train.foo=1"], UserError, r"unknown setting(s) train.foo"),
    (["data=local", "data.sources.local.paths=[{tmp}/none/*.txt]"], DataError,
     "data.sources.local.paths=['{tmp}/none/*.txt']: no file matches the glob '{tmp}/none/*.txt'"),
    (["data=local", "data.sources.local.paths=[{tmp}/corpus.txt]"], DataError,
     "data.sources.local.paths=['{tmp}/corpus.txt']: data path {tmp}/corpus.txt does not exist"),
    (["data.format=shards", "data.shards_dir={tmp}/shards"], DataError,
     "data.shards_dir='{tmp}/shards' does not exist; write the shards first"),
    (["data.tokenizer.pretrained={tmp}/tok"], DataError,
     "data.tokenizer.pretrained: tokenizer folder '{tmp}/tok' does not exist; expected a folder with "
     "tokenizer.json"),
])
def test_settings_and_paths_are_checked_before_anything_is_written(tmp_path, overrides, error, message):
    (tmp_path / "a_file").write_text("not a folder")
    run_dir = tmp_path / "run"
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        overrides.append(f"hydra.run.dir={run_dir}")
    with pytest.raises(error) as err:
        precheck(overrides)
    assert str(err.value).startswith(message.format(tmp=tmp_path)), str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing created


def test_precheck_passes_a_good_command_and_leaves_hydras_own_answers_to_hydra(tmp_path, capsys):
    cfg = precheck(["train.max_steps=5", f"hydra.run.dir={tmp_path}/run"])
    assert cfg.train.max_steps == 5 and cfg.hydra.run.dir == f"{tmp_path}/run"
    for argv in (["--help"], ["--info"], ["--config-dir", str(tmp_path)], ["train.lr=1", "--bogus"],
                 ["--version"]):
        assert precheck(argv) is None
    assert capsys.readouterr() == ("", "")  # Hydra prints its answer once, not precheck
    assert precheck(["train.lr=-1", "--cfg", "job"]).train.lr == -1  # printing the config checks keys only


def test_a_multirun_is_checked_on_its_first_job_before_any_starts():
    with pytest.raises(UserError, match=r"train.max_step: no such setting \(did you mean train.max_steps"):
        precheck(["train.max_step=1,2", "--multirun"])
    with pytest.raises(UserError, match=r"train.lr=-1.0; expected > 0"):
        precheck(["train.lr=-1,1e-3", "--multirun"])
    assert precheck(["train.lr=1e-3,-1", "--multirun"]).train.lr == 1e-3  # the second job: checked in it


def run_reported(exc: BaseException, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stop:
        with reported_errors():
            raise exc
    return stop.value.code, capsys.readouterr().err


def test_user_errors_are_one_message_and_internal_errors_keep_their_traceback(monkeypatch, capsys):
    for name in ("NEWTONLM_DEBUG", "HYDRA_FULL_ERROR", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    code, err = run_reported(UserError("train.lr=-1.0; expected > 0"), capsys)
    assert code == 2 and err == ("newtonlm: error: train.lr=-1.0; expected > 0\n"
                                 "(NEWTONLM_DEBUG=1 shows the traceback)\n")
    code, err = run_reported(DataError("data path x does not exist"), capsys)
    assert code == 2 and err.startswith("newtonlm: error: data path x does not exist\n")
    code, err = run_reported(RuntimeError("a bug"), capsys)
    assert code == 1 and err.startswith("Traceback (most recent call last):") and "RuntimeError: a bug" in err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run_reported(UserError("refused"), capsys)[1].startswith("newtonlm: error (rank 1): refused\n")
    for name in ("NEWTONLM_DEBUG", "HYDRA_FULL_ERROR"):  # the traceback on request
        monkeypatch.setenv(name, "1")
        with pytest.raises(UserError):
            with reported_errors():
                raise UserError("x")
        monkeypatch.delenv(name)


def test_a_missing_tokenizer_folder_is_named_without_asking_the_hub(tmp_path, monkeypatch):
    from newtonlm.data.tokenizer import load_tokenizer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "file.json").write_text("{}")
    start = time.perf_counter()
    cases = ((str(tmp_path / "x" / "tok"), f"tokenizer folder '{tmp_path}/x/tok' does not exist"),
             ("runs/tok", f"tokenizer folder 'runs/tok' ({tmp_path}/runs/tok) does not exist"),
             ("./tok", f"tokenizer folder './tok' ({tmp_path}/tok) does not exist"),
             ("file.json", "tokenizer 'file.json' is a file; expected a folder"))
    for name, message in cases:
        with pytest.raises(DataError) as err:
            load_tokenizer(name)
        assert str(err.value).startswith(message), str(err.value)
    assert time.perf_counter() - start < 10  # no hub retries (about a minute offline)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the filters apply without a GPU only")
def test_expected_library_warnings_are_filtered_by_source(monkeypatch, caplog):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    hub_kernels = logging.getLogger("transformers.integrations.hub_kernels")
    monkeypatch.setattr(hub_kernels, "filters", list(hub_kernels.filters))  # restored after the test
    quiet_expected_notices()
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    with caplog.at_level(logging.WARNING):
        hub_kernels.warning("`causal_conv1d_fn` is falling back to its reference PyTorch implementation "
                            "because `causal_conv1d` is not installed.")
        hub_kernels.warning("another message of that logger")
        other = "`x` is falling back to its reference PyTorch implementation"  # another logger: kept
        logging.getLogger("transformers").warning(other)
    assert [r.getMessage() for r in caplog.records] == ["another message of that logger", other]
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    quiet_expected_notices()
    assert os.environ["DS_ACCELERATOR"] == "xpu"  # the user's choice stays


def test_the_checks_import_neither_torch_nor_deepspeed_nor_transformers(tmp_path):
    code = ("import sys; from newtonlm.training.train import precheck; "
            f"precheck(['train.max_steps=3', 'hydra.run.dir={tmp_path}/run']); "
            "print([m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


@pytest.mark.parametrize("override, message", [
    ("train.max_step=10", "newtonlm: error: train.max_step: no such setting (did you mean train.max_steps?)"),
    ("hydra.run.dir={tmp}/a_file/run", "newtonlm: error: hydra.run.dir='{tmp}/a_file/run': {tmp}/a_file is a "
                                       "file"),
])
def test_the_command_prints_one_message_and_exits_2(tmp_path, override, message):
    (tmp_path / "a_file").write_text("")
    override = override.format(tmp=tmp_path)
    args = [override] + ([] if override.startswith("hydra.run.dir") else [f"hydra.run.dir={tmp_path}/run"])
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "newtonlm.training.train", *args], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    seconds = time.perf_counter() - start
    assert out.returncode == 2 and out.stdout == "", out.stderr[-2000:]
    lines = out.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith(message.format(tmp=tmp_path)), out.stderr
    assert lines[1] == "(NEWTONLM_DEBUG=1 shows the traceback)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # no run directory, no outputs/
    assert seconds < 30, seconds  # ~1 s on an idle machine; generous for a loaded one
