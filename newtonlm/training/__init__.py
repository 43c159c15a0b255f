"""The pretraining engine: ``python -m newtonlm.training.train [hydra overrides]`` (README: Training).

DeepSpeed on every path, one process to many nodes. Modules: ``train`` (the job: set-up, resume,
the loop, final validation), ``config`` (typed Hydra settings: TrainConfig, WandbConfig),
``distributed`` (process group for every launcher), ``optim`` (AdamW parameter groups, schedules,
the DeepSpeed config), ``checkpoint`` (the run directory's checkpoints: layout, completeness
marker, pruning), ``metrics`` (metrics.jsonl, progress line, wandb, peak FLOP/s and MFU),
``bench`` (trainer throughput against a bare loop), ``faults`` (fault injection for the tests).

Training owns the run-directory format (``config.yaml``, ``metrics.jsonl``, ``tokenizer/``,
``checkpoints/``) that ``newtonlm.export`` and ``newtonlm.eval`` read; it imports neither.
"""
