"""The training job: ``python -m newtonlm.training.train [hydra overrides]``.

This module is the entry point: Hydra composes the configuration (typed schemas: a misspelled key or
a wrongly typed value is an error here), then :func:`newtonlm.training.loop.run` runs the job (the
loop reads top to bottom there). The heavy imports (torch, DeepSpeed, transformers) happen only
once the configuration has been accepted, so a mistake is reported in seconds.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ..paths import CONFIG_DIR
from .config import register_schemas

register_schemas()


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from .loop import run

    run(cfg)


if __name__ == "__main__":
    main()
