"""Naive, obviously-correct references: every fast path in this package is tested against these.

Conventions used across ``newtonlm.kernels``:

* diagonal structure: state ``h`` is ``[..., T, N]`` and the Jacobian ``J`` is ``[..., T, N]``;
* 2x2-block structure (LSTM's ``[c, h]`` state): state is ``[..., T, 2, N]`` and
  ``J[..., t, i, j, n] = d s_t[i, n] / d s_{t-1}[j, n]`` is ``[..., T, 2, 2, N]``.

Forward recurrence:  ``h_t = J_t h_{t-1} + r_t``  for t = 0..T-1, ``h_{-1} = h0`` (0 if None).
Reverse recurrence:  ``h_t = J_t h_{t+1} + r_t``  for t = T-1..0, ``h_{T} = h0`` (0 if None).
"""

from __future__ import annotations

import torch


def _apply_block2(J: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """[..., 2, 2, N] x [..., 2, N] -> [..., 2, N] (a 2x2 matrix per channel)."""
    return (J * h.unsqueeze(-3)).sum(-2)


def scan_diag_ref(J: torch.Tensor, r: torch.Tensor, h0: torch.Tensor | None = None,
                  reverse: bool = False) -> torch.Tensor:
    """Loop reference for the diagonal linear recurrence. J, r: [..., T, N]; h0: [..., N]."""
    T = r.shape[-2]
    h = torch.zeros_like(r[..., 0, :]) if h0 is None else h0
    out = []
    steps = range(T - 1, -1, -1) if reverse else range(T)
    for t in steps:
        h = J[..., t, :] * h + r[..., t, :]
        out.append(h)
    if reverse:
        out.reverse()
    return torch.stack(out, dim=-2)


def scan_block2_ref(J: torch.Tensor, r: torch.Tensor, h0: torch.Tensor | None = None,
                    reverse: bool = False) -> torch.Tensor:
    """Loop reference for 2x2 blocks of diagonals. J: [..., T, 2, 2, N]; r: [..., T, 2, N];
    h0: [..., 2, N]."""
    T = r.shape[-3]
    h = torch.zeros_like(r[..., 0, :, :]) if h0 is None else h0
    out = []
    steps = range(T - 1, -1, -1) if reverse else range(T)
    for t in steps:
        h = _apply_block2(J[..., t, :, :, :], h) + r[..., t, :, :]
        out.append(h)
    if reverse:
        out.reverse()
    return torch.stack(out, dim=-3)


def sequential_apply(step, u: torch.Tensor, params, h0: torch.Tensor, state_ndim: int = 1):
    """Apply ``h_t = step(h_{t-1}, u_t, params)`` one step at a time (autograd flows through the
    loop). ``u`` is ``[..., T, K, N]``; ``h0`` is the state ``[..., N]`` (or ``[..., 2, N]``).
    Returns the stacked states ``[..., T, N]`` (or ``[..., T, 2, N]``)."""
    T = u.shape[-3]
    h = h0
    out = []
    for t in range(T):
        h = step(h, u[..., t, :, :], params)
        out.append(h)
    return torch.stack(out, dim=-1 - state_ndim)
