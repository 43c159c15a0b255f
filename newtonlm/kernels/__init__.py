"""Newton-scan core: nonlinear RNNs applied in parallel over the sequence (ParaRNN).

Layers: :class:`ParaGRU`, :class:`ParaLSTM`, :class:`ParaRNN` (any cell).
Functional: :func:`parallel_rnn` (forward solve + adjoint backward), :func:`linear_scan`.
Custom cells: subclass :class:`Cell`, set ``structure`` ("diag" or "block2") and ``num_gates``,
write ``step(h, u, params)``; Jacobians come from ``torch.func``.
Sequence parallelism: :func:`seqpar_rnn`, ``ParaRNN.set_sequence_parallel`` (the time axis split
over a process group), :func:`split_sequence` / :func:`gather_sequence`, :func:`halo_exchange`.
Paths: :func:`choose_path` decides what runs for (mode, device, structure, direction, dtype).
Telemetry: :class:`NewtonStats` per layer, :func:`newton_telemetry` flattens several for logs.
"""

from .cells import BLOCK2, DIAG, GRU, LSTM, Cell, GRUCell, LSTMCell
from .function import parallel_rnn
from .modules import ParaGRU, ParaLSTM, ParaRNN, accept_clamped_weights
from .newton import NewtonConfig, NewtonDivergence, NewtonStats, newton_telemetry
from .scan import MODES, Path, choose_path, linear_scan
from .seqpar import (
    CommStats,
    chunk_bounds,
    gather_sequence,
    halo_exchange,
    seqpar_rnn,
    split_lengths,
    split_sequence,
)

__all__ = [
    "BLOCK2", "DIAG", "GRU", "LSTM", "MODES", "Cell", "CommStats", "GRUCell", "LSTMCell",
    "NewtonConfig", "NewtonDivergence", "NewtonStats", "ParaGRU", "ParaLSTM", "ParaRNN", "Path",
    "accept_clamped_weights", "choose_path", "chunk_bounds", "gather_sequence", "halo_exchange",
    "linear_scan", "newton_telemetry", "parallel_rnn", "seqpar_rnn", "split_lengths",
    "split_sequence",
]
