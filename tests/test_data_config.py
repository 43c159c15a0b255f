"""Configuration: every YAML of configs/data composes with Hydra into a valid DataConfig, typos and
bad values stop at start-up, and the trainer's factory works on the bundled default corpus."""

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from test_data_common import tiny_tokenizer

from newtonlm.data import DataError, build_dataloaders, compose_data_config, load_data_config
from newtonlm.data.config import CONFIG_DIR
from newtonlm.data.sources import DocumentSource

YAMLS = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))


def test_the_config_folder_has_the_documented_files():
    assert YAMLS == ["bible", "hub", "local", "mixture", "shakespeare", "slimpajama"]


@pytest.mark.parametrize("name", YAMLS)
def test_every_yaml_composes_and_validates(name):
    cfg = compose_data_config([f"data={name}"])
    assert cfg.sources and cfg.tokenizer.vocab_size == (32000 if name == "slimpajama" else 8000)
    assert cfg.shards_dir.startswith(".cache/newtonlm/shards/")


def test_default_and_overrides():
    cfg = compose_data_config(["data.val_fraction=0.1", "data.sources.shakespeare.weight=2"])
    assert list(cfg.sources) == ["shakespeare"] and cfg.sources["shakespeare"].kind == "shakespeare"
    assert (cfg.val_fraction, cfg.sources["shakespeare"].weight, cfg.num_workers) == (0.1, 2.0, 1)
    mix = compose_data_config(["data=mixture"])
    assert {n: s.weight for n, s in mix.sources.items()} == {"shakespeare": 0.8, "bible": 0.2}


@pytest.mark.parametrize("override", ["data.shuffle_bufer=3", "data.val_fraction=lots",
                                      "data.sources.shakespeare.wieght=2"])
def test_typos_and_wrong_types_are_errors(override):
    with pytest.raises(ConfigCompositionException, match=override.replace(".", r"\.")):
        compose_data_config([override])


def test_forced_unknown_keys_are_errors():
    with pytest.raises(DataError, match=r"data has no field\(s\) \['shuffle_bufer'\]"):
        compose_data_config(["+data.shuffle_bufer=3"])
    with pytest.raises(DataError, match=r"data.sources.shakespeare has no field\(s\) \['wieght'\]"):
        compose_data_config(["+data.sources.shakespeare.wieght=3"])


@pytest.mark.parametrize("change, message", [
    ({"val_fraction": 1.0}, r"data.val_fraction=1.0; expected 0 <= val_fraction < 1"),
    ({"format": "arrow"}, r"data.format='arrow'; expected one of \('stream', 'shards'\)"),
    ({"sources": {"x": {"kind": "files"}}}, r"data.sources.x.paths is empty"),
    ({"sources": {"x": {"kind": "web"}}}, r"data.sources.x.kind='web'"),
    ({"sources": {"x": {"kind": "bible", "weight": 0}}}, r"data.sources.x.weight=0.0; expected a positive"),
    ({"sources": {}}, r"data.sources is empty"),
    ({"format": "shards", "shards_dir": None}, r"data.format=shards needs data.shards_dir"),
])
def test_bad_values_name_the_field(change, message):
    base = {"sources": {"shakespeare": {"kind": "shakespeare"}}}
    with pytest.raises(DataError, match=message):
        load_data_config({**base, **change})


def test_factory_on_the_bundled_corpus():
    cfg = compose_data_config(["data.num_workers=0", "data.val_sequences=12"])
    tok = tiny_tokenizer()  # any tokenizer works; the real run trains one on the corpus
    train, val = build_dataloaders(cfg, tok, seq_len=32, micro_batch_size=4, rank=0, world_size=1, seed=0)
    batch = next(iter(train))
    assert batch["input_ids"].shape == batch["targets"].shape == (4, 32)
    assert batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])
    first, second = list(val), list(val)
    assert len(first) == len(val) == 3
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second))
    # Validation sequences are Shakespeare's held-out scenes, EOS-separated.
    source = DocumentSource("shakespeare", cfg.sources["shakespeare"])
    held_out = tok.eos_token.join(t for _, t in source.documents(split="val", val_fraction=cfg.val_fraction))
    for batch in first:
        for row in batch["input_ids"]:
            assert tok.decode(row)[2:-2] in held_out  # [2:-2]: a window may cut a character's bytes


def test_config_dir_must_hold_a_data_group(tmp_path: Path):
    with pytest.raises(DataError, match=f"config directory {tmp_path} has no data/ group"):
        compose_data_config([], config_dir=tmp_path)
