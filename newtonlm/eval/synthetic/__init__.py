"""Synthetic capability suite: parity, modular counting, associative recall, selective copying.

* ``tasks``: deterministic generators (``generate(task, cfg, batch, length, rng)``, ``batch_rng``);
* ``train``: ``train_model`` (a small model, plain PyTorch) and ``evaluate`` (accuracy at a length);
* ``python -m newtonlm.eval.synthetic [overrides]``: the suite, every task x architecture, accuracy
  against length (beyond the training lengths too); config ``configs/eval/synthetic.yaml``;
* ``python -m newtonlm.eval.synthetic.probe``: the state-tracking probe (ParaRNN settings against
  Mamba2 and Llama, whole-sequence accuracy to 8x, seeds); config ``configs/eval/state_tracking.yaml``;
* ``python -m newtonlm.eval.synthetic.attractors``: attractors of the ParaRNN cell maps per ``a_max``.
"""

from .tasks import TASKS, TaskConfig, batch_rng, generate, vocab_size
from .train import TrainSettings, evaluate, train_model

__all__ = ["TASKS", "TaskConfig", "TrainSettings", "batch_rng", "evaluate", "generate", "train_model",
           "vocab_size"]
