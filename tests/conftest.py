"""Test-wide setup. The Triton interpreter must be selected before any kernel module is imported,
so that Triton kernels run on machines without a GPU (CI)."""

import os

if os.environ.get("NEWTONLM_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    # `make test` (CI) runs all but the matrices, `make test-all` everything, `make test-fast` (-m "not
    # slow and not matrix") is the quick run (see README)
    config.addinivalue_line(
        "markers", "slow: starts subprocesses (trainer runs, multi-process DeepSpeed, Slurm template, wheel "
        "build) or trains for more than a few seconds; deselect with -m \"not slow\"")
    config.addinivalue_line(
        "markers", "matrix: the rest of an exhaustive matrix whose representative case runs in `make test` "
        "(elastic resume over ZeRO stages x directions, 4-rank sequence parallelism, the rehearsal of every "
        "architecture); `make test-all` runs them; deselect with -m \"not matrix\"")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread: tiny models gain nothing from a second one, and on a shared 2-core machine
    an OpenMP barrier waiting for a descheduled thread made steps ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
