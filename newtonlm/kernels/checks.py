"""Argument checks shared by the kernels: one wording for the same mistake everywhere.

Every check raises ``ValueError`` naming the argument, what it got and what was expected, e.g.
``J has shape (2, 4, 4); expected (2, 5, 4) ([B, T, N] like r)``.
"""

from __future__ import annotations

import torch


def _describe(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def check_shape(name: str, x, expected: tuple, doc: str | None = None) -> None:
    """``x`` must be a tensor whose shape matches ``expected``: a tuple of sizes where ``None``
    matches any size (then ``doc``, e.g. ``"[B, T, 2, N]"``, says what is meant)."""
    ok = (isinstance(x, torch.Tensor) and x.dim() == len(expected)
          and all(e is None or e == s for e, s in zip(expected, x.shape)))
    if ok:
        return
    if any(e is None for e in expected):
        want = doc or "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
    else:
        want = f"{tuple(expected)}" + (f" ({doc})" if doc else "")
    got = f"has shape {_describe(x)}" if isinstance(x, torch.Tensor) else f"is {_describe(x)}"
    raise ValueError(f"{name} {got}; expected {want}")


def check_device(name: str, x: torch.Tensor, device: torch.device, like: str) -> None:
    """``x`` must be on ``device`` (the device of the argument named ``like``)."""
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}; expected {device} like {like}")


def check_dtype(name: str, x: torch.Tensor, dtype: torch.dtype, like: str) -> None:
    """``x`` must have ``dtype`` (the dtype of the argument named ``like``)."""
    if x.dtype != dtype:
        raise ValueError(f"{name} has dtype {x.dtype}; expected {dtype} like {like}")


def check_floating(name: str, x: torch.Tensor) -> None:
    """``x`` must have a floating-point dtype."""
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} has dtype {x.dtype}; expected a floating-point dtype")


__all__ = ["check_device", "check_dtype", "check_floating", "check_shape"]
