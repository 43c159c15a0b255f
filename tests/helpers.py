"""Shared builders for the kernel tests: random problems whose recurrences are contracting."""

import torch

from newtonlm.kernels.cells import DIAG


def cell_inputs(cell, B, T, N, dtype=torch.float64, a_scale=0.5, with_h0=True, seed=0):
    """u [B, T, K, N], recurrent params (|A| <= a_scale), h0 (or None)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, cell.num_gates, N, generator=g, dtype=torch.float64)
    params = tuple(a_scale * (2 * torch.rand(rows, N, generator=g, dtype=torch.float64) - 1)
                   for rows in cell.recurrent_params.values())
    shape = (B, N) if cell.structure == DIAG else (B, 2, N)
    h0 = 0.5 * torch.randn(*shape, generator=g, dtype=torch.float64) if with_h0 else None
    return (u.to(dtype), tuple(p.to(dtype) for p in params),
            None if h0 is None else h0.to(dtype))


def state_ndim(cell):
    return 1 if cell.structure == DIAG else 2


def zeros_state(cell, u):
    B, _, _, N = u.shape
    return u.new_zeros((B, N) if cell.structure == DIAG else (B, 2, N))
