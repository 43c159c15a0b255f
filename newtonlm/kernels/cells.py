"""Recurrent cells as pure tensor math: step, Jacobian with respect to the state, and the
vector-Jacobian product used by the adjoint backward.

A cell never sees the time axis: every function here is vectorized over arbitrary leading
dimensions, so the Newton solver and the adjoint evaluate all T steps in one call.

* ``u`` is the cell's precomputed input drive ``[..., K, N]`` (K gate rows, e.g. 3 for GRU);
  the (multi-head) input projection that produces it lives outside the recurrence.
* ``params`` is a tuple of recurrent parameter tensors (e.g. ``(A,)`` with ``A: [3, N]``).
* diagonal cells have state ``[..., N]``; 2x2-block cells have state ``[..., 2, N]``.

Built-in cells (:class:`GRUCell`, :class:`LSTMCell`) have analytic Jacobians and VJPs. A custom
cell subclasses :class:`Cell` and writes only :meth:`Cell.step`: its Jacobian then comes from
``torch.func.jvp`` (one JVP with a ones tangent for a diagonal Jacobian, two for 2x2 blocks) and
its VJP from autograd on the vectorized step.
"""

from __future__ import annotations

import abc

import torch

DIAG = "diag"
BLOCK2 = "block2"
STRUCTURES = (DIAG, BLOCK2)


class Cell(abc.ABC):
    """Base class. Subclasses set ``structure`` (``"diag"`` or ``"block2"``), ``num_gates``
    (rows K of ``u``) and implement :meth:`step`."""

    structure: str = DIAG
    num_gates: int = 1
    name: str = "custom"

    @property
    def recurrent_params(self) -> dict:
        """Names and row counts of the recurrent parameters passed as ``params`` (each
        ``[rows, N]``), in order; layers create them. Default: ``{"A": num_gates}``."""
        return {"A": self.num_gates}

    @abc.abstractmethod
    def step(self, h: torch.Tensor, u: torch.Tensor, params: tuple) -> torch.Tensor:
        """One step: previous state ``h`` and drive ``u`` -> new state (same shape as ``h``)."""

    # --- derived quantities (override with analytic forms for speed) ---
    def jacobian(self, h: torch.Tensor, u: torch.Tensor, params: tuple) -> torch.Tensor:
        """d step / d h: ``[..., N]`` (diag) or ``[..., 2, 2, N]`` (block2, [i, j] = d out_i / d h_j)."""
        def f(hh):
            return self.step(hh, u, params)

        h = h.contiguous()  # a dual tensor cannot be built on an expanded (overlapping) view
        if self.structure == DIAG:
            return torch.func.jvp(f, (h,), (torch.ones_like(h),))[1]
        cols = []
        for j in range(2):
            tangent = torch.zeros_like(h)
            tangent[..., j, :] = 1.0
            cols.append(torch.func.jvp(f, (h,), (tangent,))[1])
        return torch.stack(cols, dim=-2)

    def vjp(self, h: torch.Tensor, u: torch.Tensor, params: tuple, lam: torch.Tensor):
        """Cotangent ``lam`` of the step's output -> (d h, d u, tuple of d params reduced to the
        parameters' shapes)."""
        with torch.enable_grad():
            hh = h.detach().requires_grad_(True)
            uu = u.detach().requires_grad_(True)
            pp = tuple(p.detach().requires_grad_(True) for p in params)
            out = self.step(hh, uu, pp)
            grads = torch.autograd.grad(out, (hh, uu, *pp), lam, allow_unused=True)
        dh, du, *dp = grads
        dh = torch.zeros_like(h) if dh is None else dh
        du = torch.zeros_like(u) if du is None else du
        dp = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, dp))
        return dh, du, dp


def _reduce_to(g: torch.Tensor, shape) -> torch.Tensor:
    """Sum a broadcast gradient back to ``shape`` (the parameter's shape)."""
    lead = g.dim() - len(shape)
    return g.sum(dim=tuple(range(lead))) if lead > 0 else g


class GRUCell(Cell):
    """ParaGRU (diagonal Jacobian). params = (A,), A: [3, N] rows (z, r, h); u: [..., 3, N].

        z = sigmoid(A_z h + u_z);  r = sigmoid(A_r h + u_r)
        c = tanh(A_h (h r) + u_h); h' = z c + (1 - z) h
    """

    structure = DIAG
    num_gates = 3
    name = "gru"

    @staticmethod
    def _gates(h, u, A):
        z = torch.sigmoid(torch.addcmul(u[..., 0, :], A[0], h))
        r = torch.sigmoid(torch.addcmul(u[..., 1, :], A[1], h))
        c = torch.tanh(torch.addcmul(u[..., 2, :], A[2], h * r))
        return z, r, c

    def step(self, h, u, params):
        (A,) = params
        z, r, c = self._gates(h, u, A)
        return torch.addcmul(h, z, c - h)

    def jacobian(self, h, u, params):
        (A,) = params
        z, r, c = self._gates(h, u, A)
        dz = z * (1 - z)
        dr = r * (1 - r)
        # (1 - z) + (c - h) z(1-z) A_z + z (1 - c^2) A_h (r + h r(1-r) A_r)
        return (1 - z) + (c - h) * dz * A[0] + z * (1 - c * c) * A[2] * (r + h * dr * A[1])

    def vjp(self, h, u, params, lam):
        (A,) = params
        z, r, c = self._gates(h, u, A)
        g_pz = lam * (c - h) * z * (1 - z)
        g_pc = lam * z * (1 - c * c)
        g_pr = g_pc * A[2] * h * r * (1 - r)
        du = torch.stack((g_pz, g_pr, g_pc), dim=-2)
        dh = lam * (1 - z) + g_pz * A[0] + g_pr * A[1] + g_pc * A[2] * r
        dA = torch.stack((_reduce_to(g_pz * h, A.shape[1:]), _reduce_to(g_pr * h, A.shape[1:]),
                          _reduce_to(g_pc * h * r, A.shape[1:])))
        return dh, du, (dA,)


class LSTMCell(Cell):
    """ParaLSTM: CIFG LSTM with peepholes, state s = [c, h] (``[..., 2, N]``), 2x2-block Jacobian.
    params = (A, C): A [3, N] rows (f, o, c), C [2, N] peepholes (f, o); u: [..., 3, N] rows (f, o, c).

        f  = sigmoid(A_f h_p + u_f + C_f c_p);  c~ = tanh(A_c h_p + u_c)
        c  = f c_p + (1 - f) c~;                 o  = sigmoid(A_o h_p + u_o + C_o c)
        h  = o tanh(c)
    """

    structure = BLOCK2
    num_gates = 3
    name = "lstm"
    recurrent_params = {"A": 3, "C": 2}

    @staticmethod
    def _forward(s, u, A, C):
        cp, hp = s[..., 0, :], s[..., 1, :]
        f = torch.sigmoid(u[..., 0, :] + A[0] * hp + C[0] * cp)
        ct = torch.tanh(torch.addcmul(u[..., 2, :], A[2], hp))
        c = ct + f * (cp - ct)
        o = torch.sigmoid(u[..., 1, :] + A[1] * hp + C[1] * c)
        tc = torch.tanh(c)
        return cp, hp, f, ct, c, o, tc

    def step(self, s, u, params):
        A, C = params
        *_, c, o, tc = self._forward(s, u, A, C)
        return torch.stack((c, o * tc), dim=-2)

    def jacobian(self, s, u, params):
        A, C = params
        cp, hp, f, ct, c, o, tc = self._forward(s, u, A, C)
        dfp = (cp - ct) * f * (1 - f)
        dc_dcp = f + dfp * C[0]
        dc_dhp = dfp * A[0] + (1 - f) * (1 - ct * ct) * A[2]
        do = o * (1 - o)
        k = do * C[1] * tc + o * (1 - tc * tc)  # d h / d c (through o and tanh)
        dh_dcp = k * dc_dcp
        dh_dhp = do * A[1] * tc + k * dc_dhp
        row_c = torch.stack((dc_dcp, dc_dhp), dim=-2)
        row_h = torch.stack((dh_dcp, dh_dhp), dim=-2)
        return torch.stack((row_c, row_h), dim=-3)

    def vjp(self, s, u, params, lam):
        A, C = params
        cp, hp, f, ct, c, o, tc = self._forward(s, u, A, C)
        lc, lh = lam[..., 0, :], lam[..., 1, :]
        g_po = lh * tc * o * (1 - o)
        g_c = lc + lh * o * (1 - tc * tc) + g_po * C[1]
        g_pf = g_c * (cp - ct) * f * (1 - f)
        g_pc = g_c * (1 - f) * (1 - ct * ct)
        du = torch.stack((g_pf, g_po, g_pc), dim=-2)
        d_cp = g_c * f + g_pf * C[0]
        d_hp = g_pf * A[0] + g_po * A[1] + g_pc * A[2]
        n = A.shape[1:]
        dA = torch.stack((_reduce_to(g_pf * hp, n), _reduce_to(g_po * hp, n), _reduce_to(g_pc * hp, n)))
        dC = torch.stack((_reduce_to(g_pf * cp, n), _reduce_to(g_po * c, n)))
        return torch.stack((d_cp, d_hp), dim=-2), du, (dA, dC)


GRU = GRUCell()
LSTM = LSTMCell()
