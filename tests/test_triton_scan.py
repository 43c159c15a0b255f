"""Triton linear-recurrence scans against the loop references.

Runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which executes the
programs one after another in Python, so sizes are small and ``chunk`` is forced small to exercise
the multi-chunk (summary, carry, rescan) path even for short sequences.
"""

import os

import pytest
import torch

from newtonlm.kernels import triton_scan
from newtonlm.kernels.reference import scan_block2_ref, scan_diag_ref
from newtonlm.kernels.triton_scan import (
    INTERPRETER_CONFIG,
    launch_configs,
    triton_scan_block2,
    triton_scan_diag,
)

# CPU tensors under the interpreter; CUDA when run on a GPU (NEWTONLM_TEST_GPU=1).
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
F64_TOL = {"rtol": 1e-12, "atol": 1e-12}
# fp32 arithmetic over up to a few hundred steps of a contraction (|J| < 0.9): ~1e-6 absolute.
F32_TOL = {"rtol": 1e-5, "atol": 1e-5}


def _inputs(structure, B, T, N, dtype=torch.float64, with_h0=True):
    """Bounded random problem of either sign: diag |J| < 0.9; block2 rows of |J| sum to < 0.9."""
    state = (N,) if structure == "diag" else (2, N)
    jac = (N,) if structure == "diag" else (2, 2, N)
    scale = 0.9 if structure == "diag" else 0.45
    J = scale * (2 * torch.rand(B, T, *jac, dtype=torch.float64) - 1)
    r = torch.randn(B, T, *state, dtype=torch.float64)
    h0 = torch.randn(B, *state, dtype=torch.float64)
    return (J.to(DEVICE, dtype), r.to(DEVICE, dtype),
            h0.to(DEVICE, dtype) if with_h0 else None)


def _run(structure, J, r, h0, reverse, **kw):
    fn = triton_scan_diag if structure == "diag" else triton_scan_block2
    return fn(J, r, h0, reverse, **kw)


def _ref(structure, J, r, h0, reverse):
    """Reference in float64 on exactly the values the kernel sees."""
    fn = scan_diag_ref if structure == "diag" else scan_block2_ref
    return fn(J.double(), r.double(), None if h0 is None else h0.double(), reverse)


@pytest.mark.parametrize("structure", ["diag", "block2"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("T", [1, 2, 7, 128])
def test_fp64_matches_reference(structure, reverse, with_h0, T):
    # chunk=3: T=1, 2 take the single-pass path, T=7 and 128 many chunks with a partial last one.
    J, r, h0 = _inputs(structure, 2 if T < 100 else 1, T, 5, with_h0=with_h0)
    out = _run(structure, J, r, h0, reverse, chunk=3)
    assert out.dtype == torch.float64 and out.shape == r.shape
    torch.testing.assert_close(out, _ref(structure, J, r, h0, reverse), **F64_TOL)


# block2 forward is left out at this length only to keep the interpreter run short.
@pytest.mark.parametrize(("structure", "reverse"),
                         [("diag", False), ("diag", True), ("block2", True)])
def test_fp64_long_sequence(structure, reverse):
    J, r, h0 = _inputs(structure, 1, 1000, 5)
    out = _run(structure, J, r, h0, reverse, chunk=16)
    torch.testing.assert_close(out, _ref(structure, J, r, h0, reverse), **F64_TOL)


def test_many_chunks_default_chunking():
    # Default launch parameters: one channel block, so time is split into 65 chunks of 64.
    J, r, h0 = _inputs("diag", 1, 4097, 3)
    out = triton_scan_diag(J, r, h0)
    torch.testing.assert_close(out, _ref("diag", J, r, h0, False), **F64_TOL)


@pytest.mark.parametrize("structure", ["diag", "block2"])
def test_default_launch_parameters(structure):
    J, r, h0 = _inputs(structure, 2, 128, 5)
    out = _run(structure, J, r, h0, True)
    torch.testing.assert_close(out, _ref(structure, J, r, h0, True), **F64_TOL)


@pytest.mark.parametrize("structure", ["diag", "block2"])
@pytest.mark.parametrize("reverse", [False, True])
def test_channel_tail_across_blocks(structure, reverse):
    # N=33 with 16-channel blocks: three programs per chunk, the last one masked down to 1.
    J, r, h0 = _inputs(structure, 2, 20, 33)
    out = _run(structure, J, r, h0, reverse, chunk=8, block_n=16)
    torch.testing.assert_close(out, _ref(structure, J, r, h0, reverse), **F64_TOL)


@pytest.mark.parametrize("structure", ["diag", "block2"])
@pytest.mark.parametrize("reverse", [False, True])
def test_fp32(structure, reverse):
    J, r, h0 = _inputs(structure, 2, 128, 5, dtype=torch.float32)
    out = _run(structure, J, r, h0, reverse, chunk=16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _ref(structure, J, r, h0, reverse), **F32_TOL)


@pytest.mark.parametrize("structure", ["diag", "block2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_fp32(structure, dtype):
    J, r, h0 = _inputs(structure, 2, 64, 5, dtype=dtype)
    out = _run(structure, J, r, h0, True, chunk=16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _ref(structure, J, r, h0, True), **F32_TOL)


def test_mixed_dtypes_and_non_contiguous():
    B, T, N = 2, 10, 5
    J = (0.9 * torch.rand(B, N, T, dtype=torch.float64, device=DEVICE)).transpose(1, 2)
    r = torch.randn(T, B, N, device=DEVICE).transpose(0, 1).to(torch.bfloat16)
    h0 = torch.randn(N, B, dtype=torch.float16, device=DEVICE).t()
    assert not (J.is_contiguous() or r.is_contiguous() or h0.is_contiguous())
    out = triton_scan_diag(J, r, h0, chunk=4)
    assert out.dtype == torch.float64  # any fp64 input -> fp64 arithmetic and output
    torch.testing.assert_close(out, _ref("diag", J, r, h0, False), **F64_TOL)

    J2 = (0.45 * torch.rand(B, T, 2, N, 2, dtype=torch.float64, device=DEVICE)).transpose(-1, -2)
    r2 = torch.randn(B, T, N, 2, device=DEVICE).transpose(-1, -2)
    out2 = triton_scan_block2(J2, r2, None, True, chunk=4)
    torch.testing.assert_close(out2, _ref("block2", J2, r2, None, True), **F64_TOL)


def test_empty_sequence():
    J, r, h0 = _inputs("block2", 2, 0, 5)
    assert triton_scan_block2(J, r, h0).shape == (2, 0, 2, 5)


def test_bad_shapes_raise():
    J, r, h0 = _inputs("diag", 2, 7, 8)
    with pytest.raises(ValueError, match=r"J has shape \(2, 5, 8\); expected \(2, 7, 8\)"):
        triton_scan_diag(J[:, :5], r)
    with pytest.raises(ValueError, match=r"r has shape \(7, 8\); expected \[B, T, N\]"):
        triton_scan_diag(J, r[0])
    with pytest.raises(ValueError, match=r"h0 has shape \(2, 7\); expected \(2, 8\)"):
        triton_scan_diag(J, r, h0[:, :7])
    J2, r2, h02 = _inputs("block2", 2, 7, 8)
    with pytest.raises(ValueError, match=r"J has shape \(2, 7, 2, 8\); expected \(2, 7, 2, 2, 8\)"):
        triton_scan_block2(J2[:, :, 0], r2)
    with pytest.raises(ValueError, match=r"r has shape \(2, 7, 3, 8\); expected \[B, T, 2, N\]"):
        triton_scan_block2(J2, torch.zeros(2, 7, 3, 8, device=DEVICE))
    with pytest.raises(ValueError, match=r"h0 has shape \(2, 8\); expected \(2, 2, 8\)"):
        triton_scan_block2(J2, r2, h02[:, 0])


def test_bad_dtype_and_device_raise(monkeypatch):
    J, r, h0 = _inputs("diag", 2, 7, 8)
    with pytest.raises(ValueError, match="J has dtype torch.int64"):
        triton_scan_diag(J.long(), r)
    with pytest.raises(ValueError, match="h0 is on meta; expected .* like r"):
        triton_scan_diag(J, r, h0.to("meta"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="need CUDA tensors, got r on cpu"):
        triton_scan_diag(J.cpu(), r.cpu(), h0.cpu())


def test_bad_arguments_raise():
    J, r, _ = _inputs("diag", 2, 7, 8)
    with pytest.raises(TypeError, match="J must be a torch.Tensor"):
        triton_scan_diag(J.tolist(), r)
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16"):
        triton_scan_diag(J, r, block_n=24)
    with pytest.raises(ValueError, match="chunk must be a positive"):
        triton_scan_diag(J, r, chunk=0)


CHUNK_KERNELS = (triton_scan._diag_chunk_kernel, triton_scan._block2_chunk_kernel)


def test_interpreter_runs_its_single_config():
    if not triton_scan.INTERPRET:
        pytest.skip("on a GPU the autotuner benchmarks several configurations")
    assert launch_configs() == [INTERPRETER_CONFIG]
    for kernel in CHUNK_KERNELS:
        assert kernel.configs == [INTERPRETER_CONFIG]
    J, r, h0 = _inputs("diag", 2, 9, 5)
    triton_scan_diag(J, r, h0, chunk=4)  # no block_n: through the autotuner, all three phases
    assert triton_scan._diag_chunk_kernel.best_config is INTERPRETER_CONFIG


def test_gpu_config_list_is_well_formed():
    configs = launch_configs(interpret=False)
    assert len(configs) >= 4 and len({str(c) for c in configs}) == len(configs)
    for c in configs:
        assert set(c.kwargs) == {"BLOCK_N"}
        block_n = c.kwargs["BLOCK_N"]
        assert block_n in (32, 64, 128, 256) and c.num_warps in (1, 2, 4, 8), c
        assert block_n // (32 * c.num_warps) in (1, 2), c  # 1 or 2 channels per thread
        assert c.num_stages == 1, c
    for kernel in CHUNK_KERNELS:
        assert "BLOCK_N" in kernel.fn.arg_names
        assert set(kernel.keys) <= set(kernel.fn.arg_names)
    # fitted to 20 channels: 32-wide blocks with 1 warp, duplicates dropped
    fitted = triton_scan._fit_configs(configs, {"N": 20})
    assert [(c.kwargs["BLOCK_N"], c.num_warps) for c in fitted] == [(32, 1)]
    assert [str(c) for c in triton_scan._fit_configs(configs, {"N": 1024})] == [str(c) for c in configs]
