"""Keep the libraries' console output out of the export's and the evaluation's way, one known source
at a time (never by silencing all warnings or all logging):

* DeepSpeed logs ``Setting accelerator to CPU. If you have GPU ...`` when it is imported and has to
  guess the accelerator (``save_pretrained`` imports it through accelerate; consolidating ZeRO
  shards imports it directly): ``newtonlm.quiet.known_accelerator`` tells it the accelerator.
* transformers draws ``Loading weights`` / ``Writing model shards`` bars in ``from_pretrained`` and
  ``save_pretrained`` (tiny for the models we load: the bar is all there is to see).
  :func:`no_transformers_bars` turns transformers' (and huggingface_hub's) bars off around our calls
  with ``transformers.utils.logging.disable_progress_bar()`` and back on after, if they were on.
* DeepSpeed's ``zero_to_fp32`` prints its parsing steps on stdout and draws tqdm bars, with no switch
  for either. :func:`quiet_zero_to_fp32` gives that module a tqdm with ``disable=True`` and keeps its
  prints in a buffer, which is returned so that an error can still show them.

Warnings transformers or DeepSpeed emit for a real problem (a missing weight, a bad config) are not
touched.
"""

from __future__ import annotations

import contextlib
import functools
import io

from ..quiet import known_accelerator


@contextlib.contextmanager
def no_transformers_bars():
    """transformers' and huggingface_hub's progress bars off inside the block, restored after."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_zero_to_fp32():
    """Yield DeepSpeed's ``zero_to_fp32`` module with its bars off and its prints kept in a
    ``StringIO`` (the second element of the yielded pair)."""
    known_accelerator()
    from deepspeed.utils import zero_to_fp32

    printed = io.StringIO()
    original = zero_to_fp32.tqdm
    zero_to_fp32.tqdm = functools.partial(original, disable=True)
    try:
        with contextlib.redirect_stdout(printed):
            yield zero_to_fp32, printed
    finally:
        zero_to_fp32.tqdm = original
