"""A model size as the evaluation commands configure it: a preset plus per-architecture overrides.

``SizeConfig(preset="demo", overrides={"all": ["num_hidden_layers=2"], "mamba2": [...]})`` means
``configs/model/<arch>_demo.yaml`` with the ``all`` overrides, then the architecture's own. The
comparison and the sweep pass them to the trainer as ``model.<field>=<value>``; the synthetic suite
builds the model in-process from :func:`model_fields`; :func:`parameter_count` counts a size's
parameters exactly without allocating it (the sweep's plan, the scaling reader).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SizeConfig:
    """``preset``: the size part of ``configs/model/<arch>_<preset>.yaml``; ``overrides``: arch (or
    ``all``) -> list of ``field=value`` applied on top, ``all`` first."""

    preset: str = "demo"
    overrides: dict[str, list[str]] = field(default_factory=dict)


def override_list(size: SizeConfig, arch: str) -> list[str]:
    """``field=value`` overrides for ``arch``: the ``all`` entries, then the architecture's."""
    return [*size.overrides.get("all", []), *size.overrides.get(arch, [])]


def model_fields(size: SizeConfig, arch: str) -> dict:
    """The preset's fields (``arch`` included) with the overrides applied (values parsed as YAML)."""
    from omegaconf import OmegaConf

    from newtonlm.models import load_preset

    for o in override_list(size, arch):
        if "=" not in o:
            raise ValueError(f"model override {o!r} for {arch}; expected field=value")
    base = OmegaConf.create(load_preset(f"{arch}_{size.preset}"))
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist(override_list(size, arch)))
    return OmegaConf.to_container(merged, resolve=True)


def parameter_count(fields: dict, vocab_size: int) -> dict[str, int]:
    """``{"total", "non_embedding"}`` of the model ``fields`` (a preset's fields, e.g.
    :func:`model_fields`) at ``vocab_size``, built on the meta device (exact, no memory)."""
    import torch

    from newtonlm.models import build_model, count_parameters

    with torch.device("meta"):
        return count_parameters(build_model(fields, vocab_size))
