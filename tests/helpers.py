"""Shared test helpers: random contracting problems for the kernel tests, and the training job
run as a user runs it (a subprocess).

Every process a test starts through :func:`start_process` runs in its own process group (so a
timeout can kill it with its children: launchers, ranks, compilers) and is remembered until it has
been waited for. The group is killed when waiting is interrupted (Ctrl-C in pytest raises
KeyboardInterrupt there), after each test (``conftest.py``) and when the test process exits, so an
interrupted or failed test run leaves no orphan behind."""

import atexit
import os
import signal
import subprocess
import sys
from pathlib import Path

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


REPO = Path(__file__).resolve().parents[1]


_LIVE: set[subprocess.Popen] = set()  # started, not yet waited for


def start_process(cmd, env=None, cwd=REPO) -> subprocess.Popen:
    """Start ``cmd`` in a new process group (so that a timeout can kill it with its children)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _LIVE.add(proc)
    return proc


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group: the launcher and every rank or compiler it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the whole group has exited already


@atexit.register
def kill_started_processes() -> None:
    """Kill the groups of every started process not waited for (a failed or interrupted test)."""
    while _LIVE:
        proc = _LIVE.pop()
        kill_group(proc)
        try:
            proc.communicate(timeout=10)  # reap it and close its pipes
        except (subprocess.TimeoutExpired, ValueError, OSError):
            pass


def wait_process(proc: subprocess.Popen, timeout: float, check: bool = True):
    """Wait for ``proc``; on timeout kill its whole group and fail; on an interrupt (Ctrl-C) kill it
    and re-raise. -> CompletedProcess."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s\n{out[-3000:]}\n{err[-5000:]}") from None
    except BaseException:
        kill_group(proc)
        proc.communicate()
        raise
    finally:
        _LIVE.discard(proc)
        kill_group(proc)  # members that outlived the leader (a rank after its launcher)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{out[-3000:]}\n{err[-5000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def start_trainer(overrides, nproc=1, faults="") -> subprocess.Popen:
    """``python -m newtonlm.training.train *overrides`` (torchrun with ``nproc`` > 1), started.
    ``faults``: NEWTONLM_FAULTS (newtonlm/training/faults.py)."""
    launcher = ([] if nproc == 1 else
                ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)])
    env = {**os.environ, "NEWTONLM_FAULTS": faults, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    return start_process([sys.executable, *launcher, "-m", "newtonlm.training.train", *overrides], env)


def run_trainer(overrides, nproc=1, faults="", check=True, timeout=600):
    """The training job as a user runs it, to completion. -> CompletedProcess."""
    return wait_process(start_trainer(overrides, nproc, faults), timeout, check)
