"""Process-group set-up for every launch path.

* no launcher (``python -m newtonlm.training.train``): one process; RANK/WORLD_SIZE/MASTER_* are set
  here (a free local port) so that DeepSpeed does not look for MPI;
* torchrun, the deepspeed launcher, Slurm (``srun``): their environment variables are used as is
  (Slurm's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID are mapped when RANK is absent).

Backend: nccl with CUDA, gloo otherwise. Every collective times out after ``timeout_s``, so a dead
rank makes the others fail (non-zero exit) instead of hanging.

Sequence parallelism (:func:`init_sequence_parallel`): the world of W ranks is D = W / K
data-parallel groups of K consecutive ranks (group d: ranks d K .. d K + K - 1). The ranks of a
group read the same batches (the data loader sees rank d of D) and each holds a chunk of the time
axis. DeepSpeed keeps treating all W ranks as data-parallel: it averages the gradients over all of
them, which sums each group's partial (per-chunk) gradients and averages over the groups, given
the loss scaling of ``loop.train_step``.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    sequence_parallel: int = 1   # K: the ranks of this rank's sequence group
    sequence_group: Any = None   # its torch.distributed group (None when K = 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """This rank's data-parallel group (what the data loader sees as its rank)."""
        return self.rank // self.sequence_parallel

    @property
    def data_world(self) -> int:
        """The number of data-parallel groups (the data loader's world size)."""
        return self.world_size // self.sequence_parallel


def sequence_groups(world_size: int, K: int) -> list[list[int]]:
    """The ranks of each sequence-parallel group: K consecutive ranks each, in data-parallel order."""
    if K < 1 or world_size % K:
        raise ValueError(f"sequence_parallel={K} does not divide the world size {world_size}")
    return [list(range(d * K, d * K + K)) for d in range(world_size // K)]


def init_sequence_parallel(info: DistInfo, K: int) -> DistInfo:
    """``info`` with its sequence group of ``K`` ranks (:func:`sequence_groups`). A collective:
    every rank creates every group, in the same order (torch.distributed.new_group's rule)."""
    if K == 1:
        return replace(info, sequence_parallel=1, sequence_group=None)
    mine = None
    for ranks in sequence_groups(info.world_size, K):
        group = dist.new_group(ranks)
        if info.rank in ranks:
            mine = group
    return replace(info, sequence_parallel=K, sequence_group=mine)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill_env() -> None:
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("LOCAL_RANK", "0")


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The GPU of a rank: its local rank among the node's visible GPUs, or the only visible one
    (launchers or Slurm's --gpus-per-task=1 that bind one GPU per process)."""
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but this process sees {visible} GPUs; expected "
                           f"fewer processes per node than GPUs, or one visible GPU per process")
    return local_rank


def init_distributed(timeout_s: int, shm_comm: bool = False) -> DistInfo:
    """Initialize torch.distributed (and DeepSpeed's comm layer on top of it). ``shm_comm``:
    let DeepSpeed build and use its shared-memory CPU all-reduce (compiled at first use)."""
    _fill_env()
    if not shm_comm:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        index = cuda_device_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        device, backend = torch.device("cuda", index), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, device)


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few floats over all ranks (float64 on the wire)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the world size); (0, 1) without a process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` without a process
    group. A collective: every rank must call it."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
