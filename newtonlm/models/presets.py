"""Size presets: ``configs/model/<arch>_<size>.yaml``, Hydra configs (``model=paragru_125m``, any
field overridable, e.g. ``model.num_hidden_layers=6``).

The four architectures at the same nominal size share the width and the vocabulary, and their
parameter counts (total and non-embedding) are within 10% of each other; ``python -m
newtonlm.models.sizes`` prints the exact counts. Nominal sizes refer to the reference vocabulary of
:data:`REFERENCE_VOCAB` (the demo size to the demo tokenizer's 8000, the others to 32000);
the real vocabulary comes from the tokenizer.
"""

from __future__ import annotations

from ..paths import CONFIG_DIR
from .factory import ARCHS

PRESET_DIR = CONFIG_DIR / "model"
SIZES = ("demo", "125m", "400m", "1b", "3b", "7b")
REFERENCE_VOCAB = {"demo": 8000, "125m": 32000, "400m": 32000, "1b": 32000, "3b": 32000, "7b": 32000}


def preset_names() -> list[str]:
    """Every ``<arch>_<size>`` preset, architectures in :data:`ARCHS` order, sizes ascending."""
    return [f"{arch}_{size}" for size in SIZES for arch in ARCHS]


def load_preset(name: str) -> dict:
    """The fields of preset ``name`` (e.g. "paragru_125m") as a plain dict, ``arch`` included."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"preset {name!r} not found at {path}; expected one of {preset_names()}")
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
