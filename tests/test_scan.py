"""Linear recurrence solvers (CPU backends and the dispatcher) against the naive loops."""

import pytest
import torch

from newtonlm.kernels import cpu_ext, linear_scan
from newtonlm.kernels.reference import scan_block2_ref, scan_diag_ref

F64 = {"rtol": 1e-12, "atol": 1e-12}
# fp32 over up to 4097 steps of a contraction (|J| < 0.9): rounding stays ~1e-6 absolute.
F32 = {"rtol": 1e-5, "atol": 1e-5}


def problem(structure, B, T, N, dtype=torch.float64, with_h0=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    jac = (N,) if structure == "diag" else (2, 2, N)
    state = (N,) if structure == "diag" else (2, N)
    scale = 0.9 if structure == "diag" else 0.45  # rows of |J| sum to < 0.9
    J = scale * (2 * torch.rand(B, T, *jac, generator=g, dtype=torch.float64) - 1)
    r = torch.randn(B, T, *state, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, *state, generator=g, dtype=torch.float64) if with_h0 else None
    return J.to(dtype), r.to(dtype), None if h0 is None else h0.to(dtype)


def ref(structure, J, r, h0, reverse):
    fn = scan_diag_ref if structure == "diag" else scan_block2_ref
    return fn(J.double(), r.double(), None if h0 is None else h0.double(), reverse)


BACKENDS = ["cpu", "torch", "doubling"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("structure", ["diag", "block2"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T", [1, 2, 7, 128, 1000])
def test_backends_match_reference_fp64(backend, structure, reverse, T):
    B, N = (3, 70) if T < 1000 else (1, 9)  # N=70: a full block of 64 plus a tail
    J, r, h0 = problem(structure, B, T, N, with_h0=T % 2 == 0)
    out = linear_scan(J, r, h0, reverse=reverse, structure=structure, backend=backend)
    assert out.shape == r.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, ref(structure, J, r, h0, reverse), **F64)


@pytest.mark.parametrize("structure", ["diag", "block2"])
@pytest.mark.parametrize("reverse", [False, True])
def test_cpu_fp32_long_sequence(structure, reverse):
    J, r, h0 = problem(structure, 2, 4097, 5, dtype=torch.float32)
    out = linear_scan(J, r, h0, reverse=reverse, structure=structure, backend="cpu")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref(structure, J, r, h0, reverse), **F32)


@pytest.mark.parametrize("structure", ["diag", "block2"])
def test_cpu_any_length_65537(structure):
    J, r, h0 = problem(structure, 1, 65537, 2)
    out = linear_scan(J, r, h0, structure=structure, backend="cpu")
    torch.testing.assert_close(out, ref(structure, J, r, h0, False), **F64)


def test_auto_uses_compiled_library_on_cpu():
    assert cpu_ext.available(), cpu_ext.status()
    J, r, _ = problem("diag", 2, 9, 4)
    torch.testing.assert_close(linear_scan(J, r), ref("diag", J, r, None, False), **F64)


def test_leading_batch_shapes_and_noncontiguous_inputs():
    J, r, h0 = problem("diag", 4, 33, 6)
    Jt = J.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    out = linear_scan(Jt, r, h0, backend="cpu")
    torch.testing.assert_close(out, ref("diag", J, r, h0, False), **F64)


@pytest.mark.parametrize("structure", ["diag", "block2"])
@pytest.mark.parametrize("reverse", [False, True])
def test_triton_backend_through_dispatcher(structure, reverse):
    J, r, h0 = problem(structure, 1, 9, 5)
    out = linear_scan(J, r, h0, reverse=reverse, structure=structure, backend="triton")
    torch.testing.assert_close(out, ref(structure, J, r, h0, reverse), **F64)


def test_bad_inputs_name_the_tensor_and_shape():
    J, r, h0 = problem("diag", 2, 5, 4)
    with pytest.raises(ValueError, match=r"J has shape \(2, 4, 4\); expected \(2, 5, 4\)"):
        linear_scan(J[:, :4], r)
    with pytest.raises(ValueError, match=r"h0 has shape \(2, 3\); expected \(2, 4\)"):
        linear_scan(J, r, h0[:, :3])
    with pytest.raises(ValueError, match=r"r has shape \(2, 5, 4\); expected \[B, T, 2, N\]"):
        linear_scan(J, r, structure="block2")
    with pytest.raises(ValueError, match="J has dtype torch.float32; expected torch.float64"):
        linear_scan(J.float(), r)
    with pytest.raises(ValueError, match="J is on meta; expected cpu"):
        linear_scan(J.to("meta"), r)
    with pytest.raises(ValueError, match="backend='fast'"):
        linear_scan(J, r, backend="fast")
    with pytest.raises(ValueError, match="structure='dense'"):
        linear_scan(J, r, structure="dense")


def test_cpu_backend_rejects_what_it_cannot_run():
    J, r, _ = problem("diag", 1, 3, 2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="backend='cpu' needs fp32/fp64"):
        linear_scan(J, r, backend="cpu")


def test_without_triton_auto_falls_back_to_pytorch_paths(monkeypatch):
    import importlib.util

    from newtonlm.kernels import GRU, scan
    from newtonlm.kernels.function import resolve_mode

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real(name, *a))
    cuda = torch.device("cuda")
    assert not scan.triton_usable(cuda)
    assert scan.choose_path("auto", cuda, "diag", "backward", torch.float32).scan == "doubling"
    assert resolve_mode("auto", GRU, cuda) == "parallel"
    with pytest.raises(ValueError, match="needs the triton package"):
        resolve_mode("fused", GRU, cuda)
