"""What export and evaluation verify before they load (issue 12, items 1, 2 and 4): the checkpoint
against its manifest (the ``COMPLETE`` marker, format 2 of the contract in
``newtonlm/training/checkpoint.py``), the run's ``tokenizer/`` against the fingerprint recorded at
the save, every tokenizer against the embedding it is paired with, the weight files of a Hugging
Face folder; and what they print (one-line errors, notes, no library progress bars).

Fast: the run directories are written by hand in the trainer's layout (a tiny ParaGRU, ZeRO stage 0,
one rank; the client state and the manifest as the contract specifies them), each fault made by hand
(a truncated file, a changed byte, a swapped tokenizer folder, a tokenizer with more ids than the
embedding, a truncated ``model.safetensors``). Every refused export is checked to leave nothing
behind. That this verifier accepts the manifests the trainer's ``Checkpoints`` writes is checked in
``tests/test_export.py`` (``test_the_exports_verifier_accepts_what_the_trainers_checkpoints_write``).
"""

import functools
import json
import random
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from newtonlm import export as ex
from newtonlm.data import train_bpe_tokenizer, vocab_size_for_model
from newtonlm.data.tokenizer import tokenizer_fingerprint
from newtonlm.eval.loading import load_for_eval
from newtonlm.export import source
from newtonlm.models import build_model

REPO = Path(__file__).resolve().parents[1]
MODEL = {"arch": "paragru", "hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2,
         "intermediate_size": 64}
CONFIG = {"model": MODEL, "train": {"zero_stage": 0, "seq_len": 16, "micro_batch_size": 2},
          "data": {"sources": {"shakespeare": {"kind": "shakespeare", "weight": 1.0}}}}
STATES = "mp_rank_00_model_states.pt"


def _texts(seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join("".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7)))
                     for _ in range(200)) for _ in range(20)]


@functools.cache
def run_tokenizer():
    """The fake runs' tokenizer: 400 ids, an embedding of 448 rows (also used by tests/test_export.py)."""
    return train_bpe_tokenizer(_texts(0), 400)


@pytest.fixture(scope="module")
def tokenizers():
    """The run's tokenizer, another one of the same size (another text: another fingerprint), a
    larger one (500 ids) and a smaller one (300 ids: 320 rows)."""
    return {"run": run_tokenizer(), "swapped": train_bpe_tokenizer(_texts(1), 400),
            "larger": train_bpe_tokenizer(_texts(0), 500), "smaller": train_bpe_tokenizer(_texts(0), 300)}


def write_marker(tag_dir: Path, step: int, fingerprint: str | None, crc: bool = True) -> dict:
    """The COMPLETE marker as the contract specifies it (format 2), computed here independently of
    the reader: every file of the folder with its size and zlib.crc32 (or null)."""
    files = {p.name: {"size": p.stat().st_size,
                      "crc32": f"{zlib.crc32(p.read_bytes()):08x}" if crc else None}
             for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != source.MARKER}
    manifest = {"format": 2, "step": step, "time": 0.0, "world_size": 1, "tokenizer_fingerprint": fingerprint,
                "config": CONFIG, "files": files}
    (tag_dir / source.MARKER).write_text(json.dumps(manifest))
    return manifest


def make_run(root: Path, tokenizer, steps=(1, 2), manifest: bool = True, fingerprint: bool = True) -> Path:
    """A run directory in the trainer's layout: config.yaml, tokenizer/, checkpoints/step_N (ZeRO 0,
    one rank) whose weights differ by step (the final norm's weight = step), ``latest``.
    ``manifest=False``: format-1 markers ({"step", "time"}); ``fingerprint=False``: no fingerprint
    in the client state nor the manifest (checkpoints of older trainers)."""
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(CONFIG)))
    tokenizer.save_pretrained(run / "tokenizer")
    torch.manual_seed(0)
    model = build_model(MODEL, vocab_size_for_model(tokenizer))
    fp = tokenizer_fingerprint(tokenizer) if fingerprint else None
    for step in steps:
        with torch.no_grad():
            model.model.norm.weight.fill_(step)
        tag_dir = run / "checkpoints" / source.tag_for(step)
        tag_dir.mkdir()
        client = {"step": step, "tokens_seen": 64 * step, "skipped_total": 0, "consecutive_skips": 0,
                  "world_size": 1, "config": CONFIG, "data": [{}], "rng": [{}],
                  **({"tokenizer_fingerprint": fp} if fingerprint else {})}
        torch.save({"module": model.state_dict(), "ds_config": {"zero_optimization": {"stage": 0}},
                    "dp_world_size": 1, **client}, tag_dir / STATES)
        if manifest:
            write_marker(tag_dir, step, fp)
        else:
            (tag_dir / source.MARKER).write_text(json.dumps({"step": step, "time": 0.0}))
        (run / "checkpoints" / "latest").write_text(tag_dir.name)
    return run


def truncate(file: Path) -> tuple[int, int]:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    return len(data), len(data) // 2


def export_fails(capsys, run: Path, out: Path, *args) -> str:
    """Run the export command; check it exits 2 with one line on stderr and leaves nothing at or
    next to ``out``; return that line."""
    assert ex.main(["--checkpoint", str(run), "--out", str(out), *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("newtonlm export: error: ") and err.count("\n") == 1, err
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return err


# ---------------------------------------------------------------- the manifest


def test_an_intact_checkpoint_passes_and_each_damage_is_named(tmp_path, tokenizers, capsys):
    run = make_run(tmp_path, tokenizers["run"])
    ckpt = source.read_checkpoint(run)
    assert (ckpt.tag, ckpt.notes) == ("step_00000002", [])
    assert torch.equal(ckpt.state_dict["model.norm.weight"], torch.full((32,), 2.0))
    assert ckpt.tokenizer_fingerprint == tokenizer_fingerprint(tokenizers["run"])
    tag_dir = run / "checkpoints" / "step_00000002"
    file = tag_dir / STATES
    # a changed byte, same size: only the checksum sees it
    original = file.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    file.write_bytes(bytes(damaged))
    expected = f"{zlib.crc32(original):08x}"
    with pytest.raises(ex.ExportError) as err:
        source.read_checkpoint(run, step=2)
    found = f"{zlib.crc32(bytes(damaged)):08x}"
    assert f"{file} has crc32 {found}, the manifest records {expected}" in str(err.value)
    assert "other steps: 1; choose one of them with --step N" in str(err.value)
    # truncated (the COMPLETE marker present, as after a storage fault or a bad copy)
    file.write_bytes(original)
    size, half = truncate(file)
    out = tmp_path / "hf"
    err = export_fails(capsys, run, out)
    assert f"checkpoint {tag_dir} is corrupt: {file} has {half:,} bytes, the manifest records {size:,} " \
           "(truncated)" in err
    assert "step_00000002 is the newest complete checkpoint, and an older one is never used in its place " \
           "silently: the newest intact checkpoint is step_00000001, pass --step 1 to use it" in err
    # that advice works; the damaged folder was never touched
    assert ex.main(["--checkpoint", str(run), "--out", str(out), "--step", "1"]) == 0
    assert "| checkpoint | step 1 (`step_00000001`) |" in (out / "README.md").read_text()
    assert file.stat().st_size == half
    # a listed file missing
    file.unlink()
    with pytest.raises(ex.ExportError, match=rf"{STATES} is missing \(expected {size:,} bytes\)"):
        source.read_checkpoint(run / "checkpoints" / "step_00000002")


def test_no_intact_checkpoint_left_is_said(tmp_path, tokenizers):
    run = make_run(tmp_path, tokenizers["run"], steps=(1, 2, 3))
    for step in (1, 3):
        truncate(run / "checkpoints" / source.tag_for(step) / STATES)
    with pytest.raises(ex.ExportError) as err:
        source.read_checkpoint(run)
    assert "the newest intact checkpoint is step_00000002, pass --step 2 to use it" in str(err.value)
    truncate(run / "checkpoints" / "step_00000002" / STATES)
    with pytest.raises(ex.ExportError) as err:
        source.read_checkpoint(run)
    assert "no older complete checkpoint is intact (1, 2 checked)" in str(err.value)


def test_malformed_or_unknown_manifests_are_errors(tmp_path, tokenizers):
    run = make_run(tmp_path, tokenizers["run"], steps=(1,))
    marker = run / "checkpoints" / "step_00000001" / source.MARKER
    manifest = json.loads(marker.read_text())
    for files, what in (({}, "'files' is {}"), ({"../x.pt": {"size": 1, "crc32": None}}, "entry '../x.pt'"),
                        ({STATES: {"size": "12", "crc32": None}}, f"entry '{STATES}'"),
                        ({STATES: {"size": 12, "crc32": "XYZ"}}, f"entry '{STATES}'")):
        marker.write_text(json.dumps({**manifest, "files": files}))
        with pytest.raises(ex.ExportError, match=f"the manifest {marker} is malformed") as err:
            source.read_checkpoint(run)
        assert what in str(err.value)
    marker.write_text(json.dumps({**manifest, "format": 3}))
    with pytest.raises(ex.ExportError, match="manifest of format 3; this newtonlm reads formats 1 and 2"):
        source.read_checkpoint(run)
    marker.write_text(json.dumps(manifest)[:40])  # a damaged manifest is not taken for an old marker
    with pytest.raises(ex.ExportError, match=f"the marker {marker} is unreadable .*JSONDecodeError"):
        source.read_checkpoint(run)
    marker.write_text("")  # `touch COMPLETE`: a bare flag, read unverified
    assert "was written before checkpoint manifests" in source.read_checkpoint(run).notes[0]


def test_old_checkpoints_are_read_unverified_with_notes(tmp_path, tokenizers, capsys):
    """Format-1 markers and no fingerprint (older trainers): accepted, and the user is told what was
    not checked; a damaged file is still named by the loader, with the previous checkpoint to try."""
    run = make_run(tmp_path, tokenizers["run"], manifest=False, fingerprint=False)
    assert source.read_manifest(run / "checkpoints" / "step_00000002") is None
    out = tmp_path / "hf"
    assert ex.main(["--checkpoint", str(run), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.startswith("newtonlm export: note: ")]
    assert len(notes) == 2 and captured.err.count("\n") == 2, captured.err
    assert "was written before checkpoint manifests" in notes[0] and "not verified" in notes[0]
    assert "records no tokenizer fingerprint" in notes[1]
    assert captured.out.startswith("exported paragru step 2")
    file = run / "checkpoints" / "step_00000002" / STATES
    truncate(file)
    err = export_fails(capsys, run, tmp_path / "hf2")
    assert f"cannot read {file}: " in err and "corrupt or truncated" in err
    assert "the previous complete checkpoint is step_00000001 (written before checkpoint manifests, so it " \
           "cannot be verified without loading it): try --step 1" in err


# ---------------------------------------------------------------- tokenizer against checkpoint


def test_a_swapped_tokenizer_folder_is_refused_by_export_and_evaluation(tmp_path, tokenizers, capsys):
    run = make_run(tmp_path, tokenizers["run"])
    shutil.rmtree(run / "tokenizer")
    tokenizers["swapped"].save_pretrained(run / "tokenizer")  # same vocabulary size, other ids
    ours, theirs = (tokenizer_fingerprint(tokenizers[k]) for k in ("run", "swapped"))
    expected = (f"the tokenizer at {run / 'tokenizer'} (fingerprint {theirs}) is not the one checkpoint "
                f"{run / 'checkpoints' / 'step_00000002'} was trained with (fingerprint {ours})")
    err = export_fails(capsys, run, tmp_path / "hf")
    assert expected in err and "Put the run's original tokenizer back" in err
    with pytest.raises(ValueError) as refused:
        load_for_eval(run)
    assert expected in str(refused.value)


@pytest.mark.parametrize("recorded", [True, False])
def test_a_tokenizer_with_more_ids_than_the_embedding(tmp_path, tokenizers, capsys, recorded):
    """With the fingerprint recorded the swap is caught by it; without (an older checkpoint), by the
    sizes: 500 ids against an embedding of 448 rows. A smaller tokenizer (320 rows) is refused too."""
    run = make_run(tmp_path, tokenizers["run"], fingerprint=recorded)
    shutil.rmtree(run / "tokenizer")
    tokenizers["larger"].save_pretrained(run / "tokenizer")
    err = export_fails(capsys, run, tmp_path / "hf")
    with pytest.raises(ValueError) as refused:
        load_for_eval(run)
    for message in (err, str(refused.value)):
        if recorded:
            assert "fingerprint" in message and "is not the one checkpoint" in message
        else:
            assert (f"the tokenizer at {run / 'tokenizer'} produces token ids up to 499 (max token id + 1 = "
                    f"500), but the model at {run / 'checkpoints' / 'step_00000002'} has an embedding of 448 "
                    "rows") in message
    if not recorded:
        shutil.rmtree(run / "tokenizer")
        tokenizers["smaller"].save_pretrained(run / "tokenizer")
        err = export_fails(capsys, run, tmp_path / "hf")
        assert "gives a vocabulary of 320 (max token id + 1 = 300, rounded up to 64), but the embedding " \
               f"of checkpoint {run / 'checkpoints' / 'step_00000002'} has 448 rows" in err


# ---------------------------------------------------------------- Hugging Face folders


@pytest.fixture
def folder(tmp_path, tokenizers):
    run = make_run(tmp_path, tokenizers["run"], steps=(1,))
    out = tmp_path / "hf"
    ex.export_checkpoint(run, out)
    return out


def test_a_truncated_weights_file_is_named(folder, capsys):
    size, half = truncate(folder / "model.safetensors")
    with pytest.raises(ValueError) as err:
        load_for_eval(folder)
    message = str(err.value)
    assert message.startswith(f"cannot read {folder / 'model.safetensors'} ({half:,} bytes): SafetensorError")
    assert "truncated or damaged" in message
    from newtonlm.eval import perplexity

    with pytest.raises(SystemExit) as exit_:
        perplexity.main([str(folder), "--quiet"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == f"newtonlm perplexity: error: {message}\n"


def test_a_folder_whose_tokenizer_exceeds_the_embedding(folder, tokenizers):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    tokenizers["larger"].save_pretrained(folder)
    with pytest.raises(ValueError, match=rf"the tokenizer at {folder} produces token ids up to 499 \(max "
                       rf"token id \+ 1 = 500\), but the model at {folder} has an embedding of 448 rows"):
        load_for_eval(folder)
    from newtonlm.eval.harness import check_hf_model_args

    with pytest.raises(ValueError, match="max token id \\+ 1 = 500.*448 rows"):
        check_hf_model_args(f"pretrained={folder},trust_remote_code=True")


# ---------------------------------------------------------------- the console


def test_export_and_loading_print_no_library_progress_bars(folder, tmp_path, capfd):
    """transformers' weight bars are turned off around our calls only: its switch is back on after.
    (DeepSpeed's accelerator warning and zero_to_fp32's output need a fresh process and ZeRO shards:
    tests/test_export.py::test_export_and_perplexity_commands_print_only_their_own_output.)"""
    from transformers.utils import logging as hf_logging

    capfd.readouterr()
    run = tmp_path / "run"
    assert ex.main(["--checkpoint", str(run), "--out", str(tmp_path / "again")]) == 0
    load_for_eval(folder)
    out, err = capfd.readouterr()
    assert out.startswith("exported paragru step 1") and out.count("\n") == 1, out
    for noise in ("Loading weights", "Writing model shards", "it/s", "Setting accelerator"):
        assert noise not in err, err
    assert hf_logging.is_progress_bar_enabled()


def test_the_card_counts_the_global_batch_not_the_ranks(tmp_path):
    """With sequence parallelism the K ranks of a group share sequences: the card's tokens per step
    come from the recorded global batch; a run from before it was recorded: micro x accum x ranks."""
    from newtonlm.export.card import _training_rows
    from newtonlm.export.source import Checkpoint

    def rows(train: dict, world: int) -> dict:
        ckpt = Checkpoint(tmp_path, "step_00000004", 4, 1024, 0, world, {"train": train, "model": {}}, {})
        return dict(_training_rows(ckpt))

    sp = {"seq_len": 32, "micro_batch_size": 2, "grad_accum": 1, "global_batch_size": 2,
          "sequence_parallel": 2}
    assert rows(sp, world=2)["batch"] == f"{2 * 32:,} tokens per step"
    old = {"seq_len": 32, "micro_batch_size": 2, "grad_accum": 3}
    assert rows(old, world=4)["batch"] == f"{2 * 3 * 4 * 32:,} tokens per step"
