"""The training job: ``python -m newtonlm.training.train [hydra overrides]``.

This module is the entry point, light on purpose: everything a user can get wrong is checked before
torch, DeepSpeed and transformers are imported, so a mistake is reported in about a second.

1. :func:`precheck` composes the configuration the command line asks for (Hydra's compose API, the
   same files and overrides; a misspelled key or option gets a "did you mean":
   :func:`~newtonlm.training.config.composition_error`) and checks it before Hydra creates any
   folder: the run directory, the settings, the data config, the data and tokenizer paths
   (:func:`~newtonlm.training.config.check_job`).
2. ``hydra.main`` composes it again and runs the job, :func:`newtonlm.training.loop.run`
   (multirun, ``hydra.run.dir``, ``--cfg job`` ... work as with any Hydra application).

Errors a user caused (:class:`~newtonlm.training.errors.UserError`, newtonlm.data's ``DataError``)
are printed as one message, exit code 2; any other exception is an internal error, printed with its
full traceback, exit code 1. ``NEWTONLM_DEBUG=1`` (or Hydra's ``HYDRA_FULL_ERROR=1``) lets every
exception through with its traceback.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback

import hydra
from omegaconf import DictConfig

from ..data.errors import DataError
from ..paths import CONFIG_DIR
from ..quiet import quiet_expected_notices
from .config import check_job, check_run_dir, compose_train_config, register_schemas
from .errors import UserError

register_schemas()

USER_ERRORS = (UserError, DataError)
EXIT_USER_ERROR = 2  # the usual exit code of a command-line usage error
DEBUG_ENV = ("NEWTONLM_DEBUG", "HYDRA_FULL_ERROR")


def _debug() -> bool:
    return any(os.environ.get(name, "") not in ("", "0") for name in DEBUG_ENV)


@contextlib.contextmanager
def reported_errors():
    """User errors -> one message on stderr, exit 2; other exceptions -> the full traceback, exit 1
    (Hydra would print a shortened one). With NEWTONLM_DEBUG=1 / HYDRA_FULL_ERROR=1 exceptions pass."""
    try:
        yield
    except USER_ERRORS as exc:
        if _debug():
            raise
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        print(f"newtonlm: error{f' (rank {rank})' if rank else ''}: {exc}\n"
              f"(NEWTONLM_DEBUG=1 shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except Exception:
        if _debug():
            raise
        traceback.print_exc()
        sys.exit(1)


def _first_of_sweeps(overrides: list[str]) -> list[str]:
    """The overrides of a multirun's first job (``a=1,2`` -> ``a=1``), as Hydra's basic sweeper
    builds them, so that the first job's configuration is checked before any job starts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override()
            else o.input_line for o in parsed]


def precheck(argv: list[str]) -> DictConfig | None:
    """Compose the configuration of command line ``argv`` (Hydra's flags and overrides) and check
    it (:func:`~newtonlm.training.config.check_job`; a multirun's first job) and the run directory;
    raise UserError or DataError. Returns the composed configuration (``hydra`` node included), or
    None for the command lines Hydra answers on its own (``--help``, ``--info``, another
    ``--config-dir``/``--config-name``, arguments its parser refuses)."""
    from hydra._internal.utils import get_args_parser
    from hydra.errors import HydraException

    try:  # quietly: on a usage error (or --version) Hydra's own parse prints the answer
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(argv)
    except SystemExit:
        return None
    if (args.help or args.hydra_help or args.info or args.shell_completion or args.experimental_rerun
            or args.config_path or args.config_name or args.config_dir):
        return None
    overrides = args.overrides
    if args.multirun:
        try:
            overrides = _first_of_sweeps(overrides)
        except HydraException:
            pass  # a malformed override: the composition below reports it
    cfg = compose_train_config(overrides)
    if args.cfg is None:  # not just printing the configuration: check it before Hydra creates folders
        if not args.multirun:
            check_run_dir(cfg.hydra.run.dir)
        check_job(cfg, _world_size())
    return cfg


def _world_size() -> int:
    """The launcher's world size (torchrun, the deepspeed launcher: WORLD_SIZE; Slurm: SLURM_NTASKS)."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def _job(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    with reported_errors():
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # precheck saw the first job's settings only
            check_job(cfg, _world_size())
        quiet_expected_notices()  # newtonlm/quiet.py: DeepSpeed's accelerator guess, CUDA-kernel hints
        from .loop import run

        run(cfg)


def main() -> None:
    with reported_errors():
        precheck(sys.argv[1:])
    _job()


if __name__ == "__main__":
    main()
