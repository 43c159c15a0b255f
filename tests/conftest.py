"""Test-wide setup. The Triton interpreter must be selected before any kernel module is imported,
so that Triton kernels run on machines without a GPU (CI)."""

import os

if os.environ.get("NEWTONLM_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
