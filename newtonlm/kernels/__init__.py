"""Newton-scan core: nonlinear RNNs applied in parallel over the sequence (ParaRNN).

Layers: :class:`ParaGRU`, :class:`ParaLSTM`, :class:`ParaRNN` (any cell).
Functional: :func:`parallel_rnn` (forward solve + adjoint backward), :func:`linear_scan`.
Custom cells: subclass :class:`Cell`, set ``structure`` ("diag" or "block2") and ``num_gates``,
write ``step(h, u, params)``; Jacobians come from ``torch.func``.
"""

from .cells import BLOCK2, DIAG, GRU, LSTM, Cell, GRUCell, LSTMCell
from .function import MODES, parallel_rnn
from .modules import ParaGRU, ParaLSTM, ParaRNN
from .newton import NewtonConfig, NewtonDivergence, NewtonStats
from .scan import linear_scan

__all__ = [
    "BLOCK2", "DIAG", "GRU", "LSTM", "MODES", "Cell", "GRUCell", "LSTMCell", "NewtonConfig",
    "NewtonDivergence", "NewtonStats", "ParaGRU", "ParaLSTM", "ParaRNN", "linear_scan",
    "parallel_rnn",
]
