"""nn.Modules: ParaGRU, ParaLSTM and ParaRNN (any :class:`~newtonlm.kernels.cells.Cell`).

Parameters follow the ParaRNN reference implementation so that its state_dicts load one-to-one:

* ``A [K, N]``: diagonal recurrent weights, one row per gate (GRU: z, r, h; LSTM: f, o, c);
* ``B [H, D/H, K, N/H]``: block-diagonal (multi-head) input projection;
* ``b [K, N]``: gate biases;
* ``C [2, N]`` (ParaLSTM): peephole weights (f, o).

Initialization (``init=``):

* ``"reference"``: A and C ~ N(0, (2/sqrt(5N))^2) (xLSTM-style), B xavier-uniform, the first bias
  row -linspace(0, 1, N), the other rows 0; no bound on A and C.
* ``"lm"`` (what reproductions use for language-model training): the same A and C draw, B
  kaiming-uniform, biases 0, and ``a_max=0.5``: A and C are clamped to [-a_max, a_max] in every
  forward (``a_max`` can be set for any init; 0.9 suits synthetic tasks). A bounded recurrence
  stays contracting, which keeps Newton at 3 iterations.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .cells import DIAG, GRU, LSTM, Cell
from .function import MODES, parallel_rnn
from .newton import NewtonConfig, NewtonStats

INITS = ("reference", "lm")


def _positive_int(name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name}={v!r}; expected a positive integer")


class ParaRNN(nn.Module):
    """A ParaRNN layer for any cell: x ``[B, T, input_dim]`` -> h ``[B, T, state_dim]``.

    ``cell.recurrent_params`` names the recurrent parameters and their row counts (default
    ``{"A": cell.num_gates}``); each is ``[rows, state_dim]``. 2x2-block cells return the second
    state component (an LSTM's h), not the first (its c).
    """

    def __init__(self, cell: Cell, input_dim: int, state_dim: int, num_heads: int = 1, *,
                 mode: str = "auto", newton: NewtonConfig | None = None, init: str = "reference",
                 a_max: float | None = None):
        super().__init__()
        if not isinstance(cell, Cell):
            raise ValueError(f"cell is {type(cell).__name__}; expected a newtonlm.kernels.Cell")
        for name, v in (("input_dim", input_dim), ("state_dim", state_dim), ("num_heads", num_heads)):
            _positive_int(name, v)
        for name, v in (("input_dim", input_dim), ("state_dim", state_dim)):
            if v % num_heads:
                raise ValueError(f"{name}={v} is not divisible by num_heads={num_heads}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; expected one of {MODES}")
        if init not in INITS:
            raise ValueError(f"init={init!r}; expected one of {INITS}")
        if a_max is not None and not a_max > 0:
            raise ValueError(f"a_max={a_max!r}; expected None or a positive number")
        self.cell, self.mode = cell, mode
        self.newton = newton or NewtonConfig()
        self.input_dim, self.state_dim, self.num_heads = input_dim, state_dim, num_heads
        self.init_scheme = init
        self.a_max = 0.5 if (init == "lm" and a_max is None) else a_max
        K, N, H = cell.num_gates, state_dim, num_heads
        self.recurrent_names = tuple(getattr(cell, "recurrent_params", {"A": K}))
        rows = getattr(cell, "recurrent_params", {"A": K})
        for name, n_rows in rows.items():
            self.register_parameter(name, nn.Parameter(torch.empty(n_rows, N)))
        self.B = nn.Parameter(torch.empty(H, input_dim // H, K, N // H))
        self.b = nn.Parameter(torch.empty(K, N))
        self.stats = NewtonStats()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        N, K = self.state_dim, self.cell.num_gates
        std = 2.0 / math.sqrt(5 * N)
        for name in self.recurrent_names:
            p = getattr(self, name)
            p.normal_(0.0, std)
            if self.a_max is not None:
                p.clamp_(-self.a_max, self.a_max)
        fan_in, fan_out = self.input_dim // self.num_heads, K * N // self.num_heads
        if self.init_scheme == "reference":
            bound = math.sqrt(6.0 / (fan_in + fan_out))  # xavier-uniform per head
            self.B.uniform_(-bound, bound)
            self.b.zero_()
            self.b[0] = -torch.linspace(0, 1, N)
        else:
            bound = 1.0 / math.sqrt(fan_in)  # kaiming-uniform (a=sqrt(5)), as nn.Linear
            self.B.uniform_(-bound, bound)
            self.b.zero_()

    def recurrent_weights(self) -> tuple:
        ps = tuple(getattr(self, n) for n in self.recurrent_names)
        if self.a_max is not None:
            ps = tuple(p.clamp(-self.a_max, self.a_max) for p in ps)
        return ps

    def input_drive(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head input projection: x ``[..., D]`` -> u ``[..., K, N]`` (bias included)."""
        H = self.num_heads
        xh = x.reshape(*x.shape[:-1], H, self.input_dim // H)
        u = torch.einsum("...hd,hdkn->...khn", xh, self.B)
        return u.reshape(*x.shape[:-1], self.cell.num_gates, self.state_dim) + self.b

    def _check_x(self, x: torch.Tensor, ndim: int):
        doc = "[B, T, input_dim]" if ndim == 3 else "[B, input_dim]"
        if not isinstance(x, torch.Tensor) or x.dim() != ndim or x.shape[-1] != self.input_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x has shape {shape}; expected {doc} with input_dim={self.input_dim}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"x has dtype {x.dtype}; expected a floating-point dtype")
        if x.device != self.B.device:
            raise ValueError(f"x is on {x.device}; expected {self.B.device} like the parameters")

    def _state_shape(self, batch: int):
        return (batch, self.state_dim) if self.cell.structure == DIAG else (batch, 2, self.state_dim)

    def _check_state(self, state, batch):
        if state is not None and tuple(state.shape) != self._state_shape(batch):
            raise ValueError(f"state has shape {tuple(state.shape)}; expected "
                             f"{self._state_shape(batch)}")

    def _output(self, s: torch.Tensor) -> torch.Tensor:
        return s if self.cell.structure == DIAG else s[..., 1, :]

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None,
                return_state: bool = False):
        """x ``[B, T, input_dim]`` -> h ``[B, T, state_dim]`` (and the final full state
        ``[B, state_dim]`` or ``[B, 2, state_dim]`` when ``return_state``)."""
        self._check_x(x, 3)
        self._check_state(state, x.shape[0])
        s = parallel_rnn(self.cell, self.input_drive(x), self.recurrent_weights(), state,
                         mode=self.mode, newton=self.newton, stats=self.stats)
        out = self._output(s)
        return (out, s[:, -1]) if return_state else out

    def step(self, x_t: torch.Tensor, state: torch.Tensor | None = None):
        """One time step: x_t ``[B, input_dim]`` -> (h_t ``[B, state_dim]``, new full state)."""
        self._check_x(x_t, 2)
        self._check_state(state, x_t.shape[0])
        u = self.input_drive(x_t)
        if state is None:
            state = u.new_zeros(self._state_shape(x_t.shape[0]))
        new = self.cell.step(state.to(u.dtype), u, self.recurrent_weights())
        return self._output(new), new

    def extra_repr(self) -> str:
        return (f"cell={self.cell.name}, input_dim={self.input_dim}, state_dim={self.state_dim}, "
                f"num_heads={self.num_heads}, mode={self.mode}, init={self.init_scheme}, "
                f"a_max={self.a_max}")


class ParaGRU(ParaRNN):
    """ParaGRU layer (diagonal Jacobian): x ``[B, T, input_dim]`` -> h ``[B, T, state_dim]``."""

    def __init__(self, input_dim: int, state_dim: int, num_heads: int = 1, **kw):
        super().__init__(GRU, input_dim, state_dim, num_heads, **kw)


class ParaLSTM(ParaRNN):
    """ParaLSTM layer (CIFG + peepholes, [c, h] state, 2x2-block Jacobian): x ``[B, T, input_dim]``
    -> h ``[B, T, state_dim]``; the cell state c is internal (see ``return_state``)."""

    def __init__(self, input_dim: int, state_dim: int, num_heads: int = 1, **kw):
        super().__init__(LSTM, input_dim, state_dim, num_heads, **kw)
