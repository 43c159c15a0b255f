"""Run outputs in process: the GPU peak table and MFU arithmetic, the console progress line, and
metrics.jsonl on resume."""

import io
import json

import pytest
import torch

from newtonlm.training import metrics
from newtonlm.training.metrics import MetricsLog, Progress, gpu_peak_flops, matmul_mode, mfu, peak_flops

T = 1e12

# Device names as torch.cuda.get_device_name reports them -> dense fp32 / TF32 / bf16 TFLOP/s of the
# vendor's datasheet (the sparse tensor figures halved).
DATASHEET = {
    "NVIDIA H100 80GB HBM3": (67, 495, 989),       # H100 SXM5
    "NVIDIA H200": (67, 495, 989),                 # H200 SXM: the H100 SXM's compute
    "NVIDIA H100 PCIe": (51, 378, 756),
    "NVIDIA A100-SXM4-80GB": (19.5, 156, 312),
    "NVIDIA A100-PCIE-40GB": (19.5, 156, 312),
    "NVIDIA A100 80GB PCIe": (19.5, 156, 312),
    "NVIDIA L40S": (91.6, 183, 362),
    "NVIDIA A10": (31.2, 62.5, 125),
}


@pytest.mark.parametrize("name", DATASHEET)
def test_gpu_peak_table_holds_the_datasheet_dense_figures(name):
    fp32, tf32, bf16 = (x * T for x in DATASHEET[name])
    assert gpu_peak_flops(name, "fp32") == fp32
    assert gpu_peak_flops(name, "tf32") == tf32
    assert gpu_peak_flops(name, "bf16") == bf16
    # dense TF32 is half of dense bf16 on these tensor cores; fp32 on the CUDA cores is below both
    assert tf32 == pytest.approx(bf16 / 2, rel=0.02) and fp32 < tf32


@pytest.mark.parametrize("name", ["NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA A10G",
                                  "NVIDIA GeForce RTX 4090", "NVIDIA GH200 480GB"])
def test_gpus_with_other_figures_are_not_guessed(name):
    assert gpu_peak_flops(name, "bf16") is None


def test_matmul_mode_and_bad_values():
    assert matmul_mode("bf16", False) == matmul_mode("bf16", True) == "bf16"
    assert matmul_mode("fp32", False) == "fp32"  # torch's default: allow_tf32 is False
    assert matmul_mode("fp32", True) == "tf32"
    with pytest.raises(ValueError, match=r"precision='fp16'; expected fp32 or bf16"):
        matmul_mode("fp16", False)
    with pytest.raises(ValueError, match=r"mode='fp16'; expected one of \('fp32', 'tf32', 'bf16'\)"):
        gpu_peak_flops("NVIDIA H100 80GB HBM3", "fp16")


@pytest.fixture
def tf32_setting():
    """Set torch.backends.cuda.matmul.allow_tf32 in a test (a cuBLAS flag; restored afterwards)."""
    matmul, before = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    yield lambda value: setattr(matmul, "allow_tf32", value)
    matmul.allow_tf32 = before


def test_peak_flops_on_a_gpu_follows_the_tf32_setting(monkeypatch, tf32_setting):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    gpu = torch.device("cuda", 0)
    tf32_setting(False)
    assert peak_flops(gpu, "fp32", 0.0) == (67 * T, "table (NVIDIA H100 80GB HBM3, dense fp32)")
    assert peak_flops(gpu, "bf16", 0.0) == (989 * T, "table (NVIDIA H100 80GB HBM3, dense bf16)")
    tf32_setting(True)
    assert peak_flops(gpu, "fp32", 0.0) == (495 * T, "table (NVIDIA H100 80GB HBM3, dense tf32)")
    assert peak_flops(gpu, "fp32", 5e14) == (5e14, "configured (train.peak_flops)")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10G")
    assert peak_flops(gpu, "bf16", 0.0) == (0.0, "unknown GPU NVIDIA A10G: set train.peak_flops")


def test_cpu_peak_is_measured_without_moving_the_training_rng():
    before = torch.get_rng_state()
    peak, how = peak_flops(torch.device("cpu"), "fp32", 0.0)
    assert peak > 1e8 and how == "measured fp32 matmul on this CPU"
    assert torch.equal(torch.get_rng_state(), before)


def test_mfu_arithmetic():
    # 6e6 FLOPs/token x 1000 tokens in 0.5 s on 2 devices of 1 TFLOP/s: 1.2e10 / 2e12
    assert mfu(6e6, 1000, 0.5, 1e12, 2) == pytest.approx(0.006)
    assert mfu(6e6, 1000, 0.5, 0.0, 2) is None


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_off_a_terminal_prints_a_line_per_tenth_of_the_run_or_per_interval():
    out, clock = io.StringIO(), FakeClock()
    progress = Progress(100, 0, True, stream=out, every_frac=0.1, every_s=60.0, clock=clock)
    for step in range(1, 101):
        clock.now = float(step)  # 1 step/s: the tenths come first
        progress.update(step, 2.0, 1234.4)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0] == "step 10/100 (10%), loss 2.0000, 1,234 tok/s, elapsed 00:10, ETA 01:30"
    assert lines[-1].startswith("step 100/100 (100%)")

    out, clock = io.StringIO(), FakeClock()
    progress = Progress(1000, 400, True, stream=out, every_frac=0.1, every_s=60.0, clock=clock)
    for step in range(401, 451):
        clock.now = 10.0 * (step - 400)  # 10 s/step: a line every 60 s, none for a tenth
        progress.update(step, 1.5, 10.0, skipped=step == 406)
    lines = out.getvalue().splitlines()
    assert len(lines) == 8  # at 60, 120, ..., 480 s
    # a resumed run: the rate counts only this process's steps (6 in 60 s -> 594 steps: 99 min)
    assert lines[0] == "step 406/1000 (41%), loss 1.5000, 10 tok/s (skipped), elapsed 01:00, ETA 1:39:00"


def test_progress_on_a_terminal_is_a_tqdm_bar_and_nothing_when_disabled():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    progress = Progress(10, 0, True, stream=out)
    for step in range(1, 11):
        progress.update(step, 3.25, 500.0)
    progress.close()
    text = out.getvalue()
    assert "\r" in text and "step 10/10, loss 3.2500, 500 tok/s [" in text and "<00:00]" in text

    quiet = Terminal()
    disabled = Progress(10, 0, False, stream=quiet)
    disabled.update(1, 1.0, 1.0)
    disabled.close()
    assert quiet.getvalue() == ""


def test_metrics_log_resume_drops_the_final_validation(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": 1}, {"kind": "train", "step": 2}, {"kind": "val", "step": 2},
            {"kind": "val", "step": 2, "final": True}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    MetricsLog(path, True, resume_step=2).close()  # resumed from the run's last checkpoint, step 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:3]


def test_gpu_table_patterns_compile_and_are_listed_once():
    assert len({p for p, _ in metrics.GPU_PEAKS}) == len(metrics.GPU_PEAKS)
    assert all(set(peaks) == set(metrics.MODES) for _, peaks in metrics.GPU_PEAKS)


def _telemetry(mode: str, newton=None) -> dict:
    """A record's newton/... keys from real solves of two GRU layers (newtonlm.kernels)."""
    from newtonlm.kernels import GRU, NewtonStats, newton_telemetry, parallel_rnn

    g = torch.Generator().manual_seed(0)
    stats = [NewtonStats(), NewtonStats()]
    for s in stats:
        u = torch.randn(2, 32, 3, 8, generator=g, dtype=torch.float64)
        params = (0.3 * torch.randn(3, 8, generator=g, dtype=torch.float64),)
        parallel_rnn(GRU, u, params, mode=mode, newton=newton, stats=s)
    return {"step": 7, **newton_telemetry(stats)}


def test_progress_detail_names_the_path_the_recurrence_took():
    from newtonlm.kernels import NewtonConfig

    assert metrics.newton_summary({"step": 1, "loss": 1.0}) == ""  # a baseline: no ParaRNN layer
    assert metrics.newton_summary(_telemetry("sequential")) == "sequential"
    record = _telemetry("parallel")
    assert record["newton/newton"] == 2 and record["newton/fallbacks"] == 0
    assert metrics.newton_summary(record) == f"newton {record['newton/mean_iterations']:.1f} it"
    rejected = _telemetry("parallel", NewtonConfig(max_iters=0, max_extra_iters=0))
    assert rejected["newton/fallbacks"] == 2 and rejected["newton/fallback_rate"] == 1.0
    assert metrics.newton_summary(rejected) == "newton 0.0 it, fallback 100%"
    stream = io.StringIO()
    progress = Progress(10, 0, True, stream=stream)
    progress.update(10, 2.5, 1000.0, detail=metrics.newton_summary(rejected))
    assert "loss 2.5000, 1,000 tok/s, newton 0.0 it, fallback 100%" in stream.getvalue()


def test_fallback_warning_above_the_threshold_names_the_layers():
    from newtonlm.kernels import NewtonConfig

    assert metrics.fallback_warning(_telemetry("parallel")) is None
    assert metrics.fallback_warning(_telemetry("sequential")) is None  # no Newton, nothing rejected
    rejected = _telemetry("parallel", NewtonConfig(max_iters=0, max_extra_iters=0))
    warning = metrics.fallback_warning(rejected)
    assert warning.startswith("step 7: Newton was rejected for 100% of the solves")
    assert "layer0: 100%" in warning and "layer1: 100%" in warning and "model.a_max" in warning
    assert metrics.fallback_warning({**rejected, "newton/fallback_rate": 0.05}) is None  # at the threshold
