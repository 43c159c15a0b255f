"""Library notices that every CPU run would print and that ask nothing of the user, kept off the
console, each by its exact source (never by silencing warnings, a logger or a library as a whole).
Layer-less (like ``paths`` and ``machine``): the trainer, the exporter and evaluation use it.

* DeepSpeed logs "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to
  detect it" when it is imported and has to guess the accelerator. :func:`known_accelerator` tells
  it, through its documented ``DS_ACCELERATOR`` variable, what it would have detected: ``cpu`` when
  no CUDA device is visible (DeepSpeed's own test). A value the user set is kept; on a CUDA machine
  nothing is set (DeepSpeed detects CUDA silently).
* transformers logs "`...` is falling back to its reference PyTorch implementation because
  `mamba_ssm` (or `causal_conv1d`) is not installed" (logger ``transformers.integrations.hub_kernels``,
  Mamba2): those packages are CUDA kernels, so on CPU the reference path is the only one.
  :func:`no_cuda_kernel_notices` drops that message on machines without CUDA; on a GPU the hint stays.
"""

from __future__ import annotations

import logging
import os


def known_accelerator() -> None:
    """Set ``DS_ACCELERATOR=cpu`` when no CUDA device is visible, before DeepSpeed is first imported
    (it reads the variable once, at import: later it has no effect). A value the user set is kept."""
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    if torch.cuda.device_count() == 0:  # DeepSpeed's own test: cuda if device_count() > 0 and available
        os.environ["DS_ACCELERATOR"] = "cpu"


class _DropMessages(logging.Filter):
    """Drop the records of one logger whose message contains one of ``fragments``."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


_CUDA_KERNEL_NOTICE = _DropMessages("is falling back to its reference PyTorch implementation")


def no_cuda_kernel_notices() -> None:
    """On a machine without CUDA, drop transformers' notice that Mamba2's CUDA kernels are not
    installed (idempotent)."""
    import torch

    if torch.cuda.device_count() == 0:
        logging.getLogger("transformers.integrations.hub_kernels").addFilter(_CUDA_KERNEL_NOTICE)


def quiet_expected_notices() -> None:
    """Both of the above (imports torch)."""
    known_accelerator()
    no_cuda_kernel_notices()
