"""nn.Modules: ParaGRU, ParaLSTM and ParaRNN (any :class:`~newtonlm.kernels.cells.Cell`).

Parameters follow the ParaRNN reference implementation so that its state_dicts load one-to-one,
registered in its order (A, B, then ParaLSTM's C, then b):

* ``A [K, N]``: diagonal recurrent weights, one row per gate (GRU: z, r, h; LSTM: f, o, c);
* ``B [H, D/H, K, N/H]``: block-diagonal (multi-head) input projection;
* ``C [2, N]`` (ParaLSTM): peephole weights (f, o);
* ``b [K, N]``: gate biases.

Initialization (``init=``):

* ``"reference"``: the reference's initialization, draw for draw (the same seed gives the same
  tensors on CPU): its base class first fills every parameter (in registration order) with
  U(-1/sqrt(N), 1/sqrt(N)), then A and C ~ N(0, (2/sqrt(5N))^2) (xLSTM-style), B xavier-uniform
  with fan-in D/H and fan-out N (ParaGRU) or N/H (ParaLSTM), the first bias row -linspace(0, 1, N),
  the other rows 0; no bound on A and C. Custom cells follow ParaGRU.
* ``"lm"`` (what reproductions use for language-model training): the same A and C draw, B
  kaiming-uniform, biases 0.

``a_max`` (any init): A and C are clamped to [-a_max, a_max] at init and in every forward; None
(or ``math.inf``) means unbounded, for every init. Language-model training uses ``a_max=0.5``
(the LM configs set it explicitly; 0.9 suits synthetic tasks): a bounded recurrence stays
contracting, which keeps Newton at 3 iterations. (Before 2026-12-02, ``init="lm"`` with
``a_max=None`` silently meant 0.5; state_dicts saved then record the 0.5, see below.)

The clamp is applied to the values the cell sees, not to the stored parameters: a raw A or C
that an optimizer step moves past ``a_max`` stays there (its gradient is 0 beyond the bound, so
only weight decay pulls it back), and state_dicts hold these raw values.

Loading a state_dict whose |A| or |C| exceeds the layer's ``a_max`` would silently change the
outputs (the clamp applies in every forward), so it raises, unless the state_dict was saved by a
newtonlm layer with the same ``a_max`` (then the clamp is part of the saved model), or inside
:func:`accept_clamped_weights` (an explicit, logged choice for state_dicts without that record).
A state_dict saved by a layer with a *different* clamp (recorded in its metadata) raises when
any value lies beyond the smaller of the two bounds, e.g. weights trained with 0.5 loaded into an
unbounded layer.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch import nn

from .cells import DIAG, GRU, LSTM, Cell, LSTMCell
from .checks import check_device, check_floating, check_shape
from .function import MODES, parallel_rnn
from .newton import NewtonConfig, NewtonStats
from .seqpar import CommStats, seqpar_rnn

log = logging.getLogger(__name__)

INITS = ("reference", "lm")


def _positive_int(name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name}={v!r}; expected a positive integer")


class ParaRNN(nn.Module):
    """A ParaRNN layer for any cell: x ``[B, T, input_dim]`` -> h ``[B, T, state_dim]``.

    ``cell.recurrent_params`` names the recurrent parameters and their row counts (default
    ``{"A": cell.num_gates}``); each is ``[rows, state_dim]``. 2x2-block cells return the second
    state component (an LSTM's h), not the first (its c).

    ``sequence_group`` (or :meth:`set_sequence_parallel`): a torch.distributed process group over
    which the time axis is split (see :mod:`newtonlm.kernels.seqpar`); None: the whole sequence here.
    """

    def __init__(self, cell: Cell, input_dim: int, state_dim: int, num_heads: int = 1, *,
                 mode: str = "auto", newton: NewtonConfig | None = None, init: str = "reference",
                 a_max: float | None = None, sequence_group=None):
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
        if a_max is not None and (isinstance(a_max, bool) or not isinstance(a_max, (int, float))
                                  or not a_max > 0):
            raise ValueError(f"a_max={a_max!r}; expected None (unbounded) or a positive number "
                             "(math.inf: unbounded)")
        self.cell, self.mode = cell, mode
        self.newton = newton or NewtonConfig()
        self.input_dim, self.state_dim, self.num_heads = input_dim, state_dim, num_heads
        self.init_scheme = init
        self.a_max = a_max  # None or inf: unbounded, whatever the init
        K, N, H = cell.num_gates, state_dim, num_heads
        rows = dict(getattr(cell, "recurrent_params", {"A": K}))
        self.recurrent_names = tuple(rows)
        # the reference's registration order: the first recurrent parameter (A), B, the others
        # (ParaLSTM's C), b; positional parameter lists and optimizer states line up with it
        first, *others = self.recurrent_names
        self.register_parameter(first, nn.Parameter(torch.empty(rows[first], N)))
        self.B = nn.Parameter(torch.empty(H, input_dim // H, K, N // H))
        for name in others:
            self.register_parameter(name, nn.Parameter(torch.empty(rows[name], N)))
        self.b = nn.Parameter(torch.empty(K, N))
        self.stats = NewtonStats()
        self.sequence_group, self.comm = None, CommStats()
        if sequence_group is not None:
            self.set_sequence_parallel(sequence_group)
        self.reset_parameters()
        self.register_state_dict_post_hook(_save_a_max)
        self.register_load_state_dict_pre_hook(_check_loaded_a_max)

    def set_sequence_parallel(self, group):
        """Split the time axis over the ranks of ``group`` (a torch.distributed process group;
        None: back to single-process). Then :meth:`forward` takes this rank's chunk
        ``x [B, L_k, input_dim]`` (chunks in rank order along time) and returns its chunk of h; the
        ``state`` argument is the state before the whole sequence, read on rank 0; ``return_state``
        gives this chunk's last state (the sequence's final state on the last rank). Parameter
        gradients are this rank's partial sums: sum them over the group. Traffic is counted in
        ``self.comm`` (:class:`~newtonlm.kernels.seqpar.CommStats`)."""
        if group is not None:
            import torch.distributed as dist

            if not dist.is_available() or not dist.is_initialized():
                raise ValueError("set_sequence_parallel needs an initialized torch.distributed "
                                 "process group (init_process_group); none is initialized")
            if not isinstance(group, dist.ProcessGroup):
                raise ValueError(f"group is {type(group).__name__}; expected a "
                                 "torch.distributed.ProcessGroup or None")
        self.sequence_group = group

    @torch.no_grad()
    def reset_parameters(self):
        N, H, D = self.state_dim, self.num_heads, self.input_dim
        if self.init_scheme == "reference":
            # the reference's base class fills every parameter first and its cell overwrites them:
            # drawn (and discarded) only so that a seed gives the reference's tensors
            for p in self.parameters(recurse=False):
                p.uniform_(-1.0 / math.sqrt(N), 1.0 / math.sqrt(N))
        for name, p in self.named_parameters(recurse=False):  # registration order = the reference's draws
            if name == "B":
                if self.init_scheme == "reference":
                    fan_in, fan_out = _reference_b_fans(self.cell, D, N, H)
                    bound = math.sqrt(6.0 / (fan_in + fan_out))  # xavier-uniform
                else:
                    bound = 1.0 / math.sqrt(D // H)  # kaiming-uniform (a=sqrt(5)), as nn.Linear
                p.uniform_(-bound, bound)
            elif name == "b":
                p.zero_()
                if self.init_scheme == "reference":
                    p[0] = -torch.linspace(0, 1, N, device=p.device, dtype=p.dtype)
            else:  # recurrent: xLSTM-style N(0, (2/sqrt(5N))^2)
                p.normal_(0.0, 2.0 / math.sqrt(5 * N))
                if self.bounded:
                    p.clamp_(-self.a_max, self.a_max)

    @property
    def bounded(self) -> bool:
        """Whether A (and C) are clamped: ``a_max`` is a finite number."""
        return self.a_max is not None and not math.isinf(self.a_max)

    def recurrent_weights(self) -> tuple:
        """The recurrent parameters as the cell sees them (clamped to [-a_max, a_max])."""
        ps = tuple(getattr(self, n) for n in self.recurrent_names)
        if self.bounded:
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
        check_shape("x", x, (None,) * (ndim - 1) + (self.input_dim,),
                    f"{doc} with input_dim={self.input_dim}")
        check_floating("x", x)
        check_device("x", x, self.B.device, "the parameters")

    def _state_shape(self, batch: int):
        return (batch, self.state_dim) if self.cell.structure == DIAG else (batch, 2, self.state_dim)

    def _check_state(self, state, batch):
        if state is not None:
            check_shape("state", state, self._state_shape(batch))

    def _output(self, s: torch.Tensor) -> torch.Tensor:
        return s if self.cell.structure == DIAG else s[..., 1, :]

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None,
                return_state: bool = False):
        """x ``[B, T, input_dim]`` -> h ``[B, T, state_dim]`` (and the final full state
        ``[B, state_dim]`` or ``[B, 2, state_dim]`` when ``return_state``)."""
        self._check_x(x, 3)
        self._check_state(state, x.shape[0])
        if self.sequence_group is not None:
            s = seqpar_rnn(self.cell, self.input_drive(x), self.recurrent_weights(), state,
                           group=self.sequence_group, mode=self.mode, newton=self.newton,
                           stats=self.stats, comm=self.comm)
        else:
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


_A_MAX_KEY = "newtonlm_a_max"  # in the state_dict's per-module metadata (no extra tensor keys)
_MISSING = object()
_accept_clamped = False


def _save_a_max(module, state_dict, prefix, local_metadata):
    """state_dict hook: record the clamp the saved weights were used with (None: unbounded)."""
    local_metadata[_A_MAX_KEY] = module.a_max


def _bound(a_max) -> float:
    return math.inf if a_max is None else float(a_max)


def _check_loaded_a_max(module, state_dict, prefix, local_metadata, *_):
    """load_state_dict pre-hook of ParaRNN: refuse recurrent weights whose outputs would change.

    The saved model saw clamp(v, saved a_max) (its metadata; unknown: taken as unbounded), this
    layer sees clamp(v, module.a_max): the same wherever |v| <= the smaller bound."""
    saved = local_metadata.get(_A_MAX_KEY, _MISSING)
    if saved is not _MISSING and _bound(saved) == _bound(module.a_max):
        return  # saved by a layer that applied this very clamp: same outputs
    known = saved is not _MISSING and saved is not None
    bound = min(_bound(module.a_max), _bound(saved) if known else math.inf)
    if math.isinf(bound):
        return
    for name in module.recurrent_names:
        v = state_dict.get(prefix + name)
        if not isinstance(v, torch.Tensor) or v.is_meta or v.numel() == 0:
            continue  # missing, partitioned or shape-less entries are load_state_dict's business
        top = v.detach().abs().max()
        if not bool(top > bound):  # compared in v's dtype, as the clamp does
            continue
        top = top.item()
        if known and _bound(saved) < _bound(module.a_max):
            raise ValueError(
                f"state_dict entry {prefix + name} (max |value| {top:.4g} > {saved:g}): these weights "
                f"were saved by a newtonlm layer that clamps {name} to [-{saved:g}, {saved:g}] in "
                f"every forward, but this layer has a_max={module.a_max}, so its outputs would "
                f"differ. Build the layer (the model config) with a_max={saved:g}; a newtonlm model "
                "config saved before 2026-12-02 with a_max=None and cell_init='lm' was trained "
                "with a_max=0.5")
        where = f"{prefix + name} (max |value| {top:.4g} > a_max={module.a_max})"
        if _accept_clamped and not known:
            log.info("loading %s: accepted, the clamp to [-a_max, a_max] applies in every "
                        "forward (accept_clamped_weights)", where)
            continue
        raise ValueError(
            f"state_dict entry {where}: this layer clamps {name} to [-{module.a_max}, {module.a_max}] "
            f"in every forward, so the loaded weights would silently give different outputs "
            f"(e.g. from a reference-implementation checkpoint, which has no clamp). Construct "
            f"the layer without the clamp (init='reference', a_max=None: the reference's "
            f"semantics) or with a_max >= {top:.4g}; or, "
            f"if the weights were trained with this clamp (a newtonlm checkpoint), load them "
            f"inside `with newtonlm.kernels.accept_clamped_weights():`")


@contextlib.contextmanager
def accept_clamped_weights():
    """Within this context ParaRNN layers load recurrent weights beyond their ``a_max`` (logged per
    parameter at INFO level: the normal case for trained weights, not a console warning): for
    weights trained by newtonlm with the same ``a_max``, whose clamp is part of the model, arriving
    without the metadata a newtonlm state_dict carries (e.g. consolidated by DeepSpeed's zero_to_fp32).
    A state_dict whose metadata records a different clamp still raises."""
    global _accept_clamped
    before, _accept_clamped = _accept_clamped, True
    try:
        yield
    finally:
        _accept_clamped = before


def _reference_b_fans(cell: Cell, D: int, N: int, H: int) -> tuple[int, int]:
    """(fan_in, fan_out) of the reference's xavier-uniform B. The reference is inconsistent
    between its two cells: ParaGRU passes fan_out = N (the whole state), ParaLSTM fan_out = N/H
    (one head's state); both are reproduced exactly. Other cells follow ParaGRU."""
    return D // H, (N // H if isinstance(cell, LSTMCell) else N)


class ParaGRU(ParaRNN):
    """ParaGRU layer (diagonal Jacobian): x ``[B, T, input_dim]`` -> h ``[B, T, state_dim]``."""

    def __init__(self, input_dim: int, state_dim: int, num_heads: int = 1, **kw):
        super().__init__(GRU, input_dim, state_dim, num_heads, **kw)


class ParaLSTM(ParaRNN):
    """ParaLSTM layer (CIFG + peepholes, [c, h] state, 2x2-block Jacobian): x ``[B, T, input_dim]``
    -> h ``[B, T, state_dim]``; the cell state c is internal (see ``return_state``)."""

    def __init__(self, input_dim: int, state_dim: int, num_heads: int = 1, **kw):
        super().__init__(LSTM, input_dim, state_dim, num_heads, **kw)
