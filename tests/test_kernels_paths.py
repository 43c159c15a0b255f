"""One decision of what runs (``choose_path``), checked against the table in docs/kernels.md, and
used by every caller (parallel_rnn forward and backward, the fallback, linear_scan "auto")."""

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import cell_inputs

from newtonlm.kernels import GRU, LSTM, MODES, NewtonStats, choose_path, cpu_ext, linear_scan, parallel_rnn
from newtonlm.kernels import function as function_mod
from newtonlm.kernels import newton as newton_mod
from newtonlm.kernels.cells import Cell

DOC = Path(__file__).resolve().parents[1] / "docs" / "kernels.md"
DEVICES = ("CPU", "CPU, no C library", "CPU, interpreter", "CUDA", "CUDA, no triton")


def doc_rows() -> list[tuple[str, ...]]:
    """(mode, device, cell, forward, newton scan, backward) rows of the Paths table."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("\n## Paths\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("`"):
            rows.append((cells[0].strip("`"), *cells[1:]))
    return rows


def render(fwd, bwd) -> tuple[str, str, str]:
    """A forward and a backward Path in the table's words."""
    if fwd.mode == "sequential":
        forward = "sequential: C loop" if fwd.fused == "c" else "sequential: PyTorch loop"
    elif fwd.mode == "fused":
        forward = "fused: Triton Newton kernel"
    else:
        forward = f"{fwd.mode}: Newton"
    scan = "-" if fwd.scan is None else f"`{fwd.scan}`"
    backward = {"c": "C adjoint", "triton": "Triton adjoint"}.get(bwd.fused, f"reverse scan `{bwd.scan}`")
    return forward, scan, backward


def on(device_kind: str, monkeypatch) -> torch.device:
    """The device of a table row, with the machine made to look like it."""
    if device_kind == "CPU, no C library":
        monkeypatch.setattr(cpu_ext, "available", lambda: False)
    if device_kind.startswith("CPU"):  # triton and fused only under the interpreter
        monkeypatch.setenv("TRITON_INTERPRET", "1" if device_kind == "CPU, interpreter" else "0")
    if device_kind == "CUDA, no triton":
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "triton" else real(name, *a))
    if device_kind.startswith("CPU"):
        assert device_kind == "CPU, no C library" or cpu_ext.available(), cpu_ext.status()
        return torch.device("cpu")
    return torch.device("cuda")


def paths(mode, device, builtin):
    """Rendered paths for both structures; they must agree (every path handles both)."""
    out = set()
    for structure in ("diag", "block2"):
        fwd = choose_path(mode, device, structure, "forward", torch.float32, builtin)
        bwd = choose_path(mode, device, structure, "backward", torch.float32, builtin)
        assert fwd.mode == bwd.mode
        out.add(render(fwd, bwd))
    assert len(out) == 1, out
    return out.pop()


def test_the_table_is_complete_and_has_no_duplicates():
    rows = doc_rows()
    assert len(rows) == 20, rows
    keys = [(mode, dev, cell) for mode, dev, cell, *_ in rows]
    assert len(set(keys)) == len(keys)
    assert {dev for _, dev, _ in keys} == set(DEVICES)
    assert {mode for mode, _, _ in keys} == set(MODES)


@pytest.mark.parametrize("row", doc_rows(), ids=lambda r: f"{r[0]}-{r[1]}-{r[2]}")
def test_choose_path_follows_the_documented_table(row, monkeypatch):
    if row[1] in ("CPU, interpreter", "CUDA") and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    mode, device_kind, cell, *want = row
    device = on(device_kind, monkeypatch)
    builtins = {"GRU/LSTM": [True], "custom": [False], "any": [True, False]}[cell]
    for builtin in builtins:
        assert paths(mode, device, builtin) == tuple(want), (row, builtin)


@pytest.mark.parametrize("device_kind", ["CPU", "CPU, no C library", "CUDA", "CUDA, no triton"])
def test_every_valid_combination_is_in_the_table_and_the_rest_are_errors(device_kind, monkeypatch):
    rows = {(m, c): rest for m, d, c, *rest in doc_rows() if d == device_kind}
    device = on(device_kind, monkeypatch)
    for mode in MODES:
        for builtin in (True, False):
            documented = rows.get((mode, "any")) or rows.get((mode, "GRU/LSTM" if builtin else "custom"))
            if documented is None:
                with pytest.raises(ValueError, match=f"mode='{mode}'"):
                    choose_path(mode, device, "diag", "forward", torch.float32, builtin)
            else:
                assert paths(mode, device, builtin) == tuple(documented)


def test_linear_scan_auto_is_the_adjoint_scan_of_mode_auto(monkeypatch):
    cpu = torch.device("cpu")
    for dtype, want in ((torch.float32, "cpu"), (torch.float64, "cpu"), (torch.bfloat16, "torch")):
        assert choose_path("auto", cpu, "diag", "backward", dtype).scan == want
    # bf16 on CPU: auto used to pick the C scan, which cannot take bf16, and raised
    J = torch.full((1, 5, 3), 0.5, dtype=torch.bfloat16)
    r = torch.ones(1, 5, 3, dtype=torch.bfloat16)
    torch.testing.assert_close(linear_scan(J, r)[0, :, 0].float(),
                               torch.tensor([1, 1.5, 1.75, 1.875, 1.9375]))
    seen = []
    real = cpu_ext.scan_diag
    monkeypatch.setattr(cpu_ext, "scan_diag", lambda *a: seen.append("cpu") or real(*a))
    linear_scan(J.float(), r.float())
    assert seen == ["cpu"]


def test_bad_arguments_name_the_value():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"mode='gpu'; expected one of"):
        choose_path("gpu", cpu, "diag", "forward", torch.float32)
    with pytest.raises(ValueError, match=r"structure='dense'"):
        choose_path("auto", cpu, "dense", "forward", torch.float32)
    with pytest.raises(ValueError, match=r"direction='up'; expected one of \('forward', 'backward'\)"):
        choose_path("auto", cpu, "diag", "up", torch.float32)
    with pytest.raises(ValueError, match="mode='fused' exists for the built-in GRU/LSTM cells only"):
        choose_path("fused", torch.device("cuda"), "diag", "forward", torch.float32, builtin=False)


class _Spy:
    """Records the scan backends and fused kernels the solver and the adjoint use."""

    def __init__(self, monkeypatch):
        self.calls = []
        for mod in (newton_mod, function_mod):
            real_scan = mod.linear_scan
            monkeypatch.setattr(mod, "linear_scan", self._wrap(real_scan, mod.__name__))
        real_seq, real_adj = newton_mod.sequential_forward, function_mod.adjoint_backward

        def seq(cell, u, params, h0=None, fused=None):
            self.calls.append(("sequential", fused))
            return real_seq(cell, u, params, h0, fused)

        def adj(cell, u, params, h0, h, g, scan_backend, fused=None):
            self.calls.append(("adjoint", scan_backend, fused))
            return real_adj(cell, u, params, h0, h, g, scan_backend, fused)

        monkeypatch.setattr(newton_mod, "sequential_forward", seq)
        monkeypatch.setattr(function_mod, "adjoint_backward", adj)

    def _wrap(self, real, where):
        def scan(*a, backend="auto", **k):
            self.calls.append((where.rsplit(".", 1)[1], backend))
            return real(*a, backend=backend, **k)
        return scan


class _Leaky(Cell):
    num_gates = 2

    def step(self, h, u, params):
        (A,) = params
        s = torch.sigmoid(u[..., 1, :])
        return (1 - s) * h + s * torch.tanh(A[0] * h + u[..., 0, :])


@pytest.mark.parametrize("cell", [GRU, LSTM, _Leaky()], ids=["gru", "lstm", "custom"])
@pytest.mark.parametrize("mode", ["auto", "sequential", "parallel"])
def test_callers_run_what_choose_path_says(cell, mode, monkeypatch):
    spy = _Spy(monkeypatch)
    u, params, h0 = cell_inputs(cell, 1, 12, 4)
    u = u.requires_grad_(True)
    stats = NewtonStats()
    parallel_rnn(cell, u, params, h0, mode=mode, stats=stats).sum().backward()
    builtin = type(cell) in (type(GRU), type(LSTM))
    fwd = choose_path(mode, u.device, cell.structure, "forward", u.dtype, builtin)
    bwd = choose_path(mode, u.device, cell.structure, "backward", u.dtype, builtin)
    if fwd.mode == "sequential":
        assert spy.calls[0] == ("sequential", fwd.fused) and stats.path == "sequential"
    else:
        assert spy.calls[0] == ("newton", fwd.scan) and stats.path == "newton"
    adjoint = next(c for c in spy.calls if c[0] == "adjoint")
    assert adjoint == ("adjoint", bwd.scan, bwd.fused)
    if bwd.fused is None:
        assert ("function", bwd.scan) in spy.calls
