"""Sequence parallelism (newtonlm.kernels.seqpar): the time axis split over K gloo ranks.

Every distributed case runs in a pool of K spawned processes (started once per module: starting
processes that import torch is the slow part) and compares, on every rank, its chunk with an
independent reference: the cell applied step by step in float64 with autograd through the loop
(``reference.sequential_apply``), on the whole sequence. T is never divisible by K.
"""

import os
import queue
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import cell_inputs
from test_custom_cell import LeakyTanhCell, RotatingCell

from newtonlm.kernels import GRU, LSTM, NewtonConfig, NewtonStats, linear_scan, parallel_rnn, seqpar
from newtonlm.kernels.reference import sequential_apply

CELLS = {"gru": GRU, "lstm": LSTM, "leaky-tanh": LeakyTanhCell(), "rotating": RotatingCell()}
FP32_TOL = 2e-5  # fp32 chunks against the fp64 reference (T <= 13, |A| <= 0.5): measured <= 3e-7


# ----------------------------------------------------------------------------- the pool


def _serve(rank, world, init_file, tasks, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            torch.manual_seed(0)
            results.put((rank, True, fn(rank, world, group, *args)))
        except BaseException as e:  # noqa: BLE001 - reported to the parent with its traceback
            results.put((rank, False, (type(e).__name__, str(e), traceback.format_exc())))
    dist.destroy_process_group()


class Pool:
    """K processes in one gloo group; :meth:`run` runs ``fn(rank, K, group, *args)`` on all."""

    def __init__(self, world):
        ctx = mp.get_context("spawn")
        self.world, self.dead = world, False
        self.dir = tempfile.TemporaryDirectory()
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        init = os.path.join(self.dir.name, "init")
        self.procs = [ctx.Process(target=_serve, args=(r, world, init, self.tasks[r], self.results),
                                  daemon=True) for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, timeout=60.0, expect_error=False):
        """Per-rank results; a rank that does not answer within ``timeout`` (a hang) fails the test.
        With ``expect_error``: every rank must raise; returns their (type name, message)."""
        if self.dead:
            pytest.fail("the process pool was killed after an earlier hang")
        for q in self.tasks:
            q.put((fn, args))
        got = {}
        try:
            while len(got) < self.world:
                rank, ok, value = self.results.get(timeout=timeout)
                got[rank] = (ok, value)
        except queue.Empty:
            self.dead = True
            self.close(kill=True)
            pytest.fail(f"ranks {sorted(set(range(self.world)) - set(got))} did not answer within "
                        f"{timeout} s (a hang)")
        oks = [got[r][0] for r in range(self.world)]
        if expect_error:
            assert not any(oks), f"expected every rank to raise; got {got}"
            return [got[r][1][:2] for r in range(self.world)]
        failed = [f"rank {r}:\n{got[r][1][2]}" for r in range(self.world) if not got[r][0]]
        assert not failed, "\n".join(failed)
        return [got[r][1] for r in range(self.world)]

    def close(self, kill=False):
        if self.procs is None:
            return
        for p, q in zip(self.procs, self.tasks):
            if kill:
                p.kill()
            elif p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self.procs = None
        self.dir.cleanup()


@pytest.fixture(scope="module")
def pool2():
    pool = Pool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def pool4():
    pool = Pool(4)
    yield pool
    pool.close()


# ----------------------------------------------------------------------------- worker cases


def _reference(cell, u, params, h0, g):
    """Whole-sequence states and gradients of sum(h * g) by the fp64 loop with autograd."""
    args = [u.double().requires_grad_(), h0.double().requires_grad_(),
            *(p.double().requires_grad_() for p in params)]
    ndim = 1 if cell.structure == "diag" else 2
    h = sequential_apply(cell.step, args[0], tuple(args[2:]), args[1], ndim)
    grads = torch.autograd.grad((h * g.double()).sum(), args)
    return h.detach(), grads


def _problem(cell, B, T, N, dtype, seed=0):
    u, params, h0 = cell_inputs(cell, B, T, N, dtype=torch.float64, seed=seed)
    shape = (B, T, N) if cell.structure == "diag" else (B, T, 2, N)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return u, params, h0, g


def case_solve(rank, world, group, cell_name, T, dtype, mode, tol):
    """A chunk's states, last state and gradients (u, h0 on rank 0, params summed over ranks)
    against the whole-sequence reference."""
    cell = CELLS[cell_name]
    u, params, h0, g = _problem(cell, 2, T, 3, dtype)
    h_ref, (du_ref, dh0_ref, *dp_ref) = _reference(cell, u, params, h0, g)
    start, stop = seqpar.chunk_bounds(T, world, rank)
    args = [u[:, start:stop].to(dtype).requires_grad_(), h0.to(dtype).requires_grad_(),
            *(p.to(dtype).requires_grad_() for p in params)]
    cfg = NewtonConfig(max_iters=3, max_extra_iters=6)
    stats, comm, single = NewtonStats(), seqpar.CommStats(), NewtonStats()
    h = seqpar.seqpar_rnn(cell, args[0], tuple(args[2:]), args[1], group=group, mode=mode,
                          newton=cfg, stats=stats, comm=comm)
    # the split linear solve is exact: Newton takes as many iterations as in one process (an
    # inexact one, e.g. without the cross-rank fix-up, still converges, in more iterations)
    parallel_rnn(cell, u.to(dtype), tuple(p.to(dtype) for p in params), h0.to(dtype), mode=mode,
                 newton=cfg, stats=single)
    assert stats.iterations == single.iterations, (stats.history, single.history)
    du, dh0, *dp = torch.autograd.grad((h * g[:, start:stop].to(dtype)).sum(), args,
                                       allow_unused=True)

    def close(a, b, what):
        err = (a.double() - b).abs().max().item()
        assert err <= tol, f"{cell_name} {dtype} {mode} rank {rank}: {what} differs by {err:.3g}"
        return err

    errs = [close(h, h_ref[:, start:stop], "h"), close(h[:, -1], h_ref[:, stop - 1], "last state"),
            close(du, du_ref[:, start:stop], "du")]
    if rank == 0:
        errs.append(close(dh0, dh0_ref, "dh0"))
    else:
        assert dh0 is None or float(dh0.abs().max()) == 0.0
    for p_grad, ref in zip(dp, dp_ref):
        total = p_grad.detach().clone()
        dist.all_reduce(total, group=group)
        errs.append(close(total, ref, "dparams (summed over ranks)"))
    return {"err": max(errs), "stats": stats.as_dict(), "comm": (comm.bytes, comm.calls,
                                                                 comm.newton_iterations)}


def case_errors(rank, world, group, which):
    """Bad inputs on one rank: every rank raises (the parent checks that no rank hangs)."""
    cell = GRU
    u, params, _ = cell_inputs(cell, 2, 3 * world, 4)
    local = u[:, : 3]
    if which == "short":  # T < K: the last rank has no step
        local = u[:, :1] if rank < world - 1 else u[:, :0]
    elif which == "state_size" and rank == 1:
        local, params = u[..., :3], tuple(p[:, :3] for p in params)
    elif which == "shape" and rank == 1:
        local = u[:, :, :2]  # 2 gate rows for a 3-gate cell
    elif which == "halo":  # a kernel-4 conv needs 3 steps of every chunk; the last rank has 2
        x = torch.zeros(2, 2 if rank == world - 1 else 5, 3)
        seqpar.halo_exchange(x, 3, group)
    seqpar.seqpar_rnn(cell, local, params, group=group, mode="parallel")


def case_fallback(rank, world, group, T, fallback):
    """A chunk that Newton cannot solve in the allowed iterations, on the last rank only: every
    rank takes the same decision (fallback, or raise) and the answer is the exact one."""
    cell = LeakyTanhCell()
    u, (A,), h0, g = _problem(cell, 2, T, 3, torch.float64)
    A = torch.full_like(A, 3.0)  # strongly nonlinear: needs many Newton iterations ...
    start, stop = seqpar.chunk_bounds(T, world, world - 1)
    u[:, :start, 1] = -40.0  # ... only where the gate is open: the other chunks are linear (s = 0)
    h_ref, (du_ref, *_) = _reference(cell, u, (A,), h0, g)
    start, stop = seqpar.chunk_bounds(T, world, rank)
    x = u[:, start:stop].clone().requires_grad_()
    stats = NewtonStats()
    cfg = NewtonConfig(max_iters=1, max_extra_iters=0, fallback=fallback)
    h = seqpar.seqpar_rnn(cell, x, (A,), h0, group=group, mode="parallel", newton=cfg, stats=stats)
    (du,) = torch.autograd.grad((h * g[:, start:stop]).sum(), (x,))
    torch.testing.assert_close(h, h_ref[:, start:stop], rtol=0, atol=1e-12)
    torch.testing.assert_close(du, du_ref[:, start:stop], rtol=0, atol=1e-10)
    single = NewtonStats()  # one process takes the same decision on the whole sequence
    if fallback == "sequential":
        parallel_rnn(cell, u, (A,), h0, mode="parallel", newton=cfg, stats=single)
        assert single.fallbacks == 1 and single.history == pytest.approx(stats.history, rel=1e-9)
    return stats.as_dict()


def _conv_reference(x, weight, bias):
    from newtonlm.models.modeling_pararnn import CausalDepthwiseConv

    conv = CausalDepthwiseConv(x.shape[-1], weight.shape[1]).double()
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


def case_conv_halo(rank, world, group, T, kernel):
    """The causal depthwise conv of a chunk with its halo equals the unsplit conv (output, input
    gradient, and weight/bias gradients summed over ranks)."""
    from newtonlm.models.modeling_pararnn import sequence_parallel_conv_state

    gen = torch.Generator().manual_seed(3)
    C = 5
    x = torch.randn(2, T, C, generator=gen, dtype=torch.float64)
    w, b, g = torch.randn(C, kernel, generator=gen), torch.randn(C, generator=gen), torch.randn(
        2, T, C, generator=gen, dtype=torch.float64)
    full = _conv_reference(x, w.double(), b.double())
    xr = x.clone().requires_grad_()
    y_ref, _ = full(xr)
    y_ref.mul(g).sum().backward()
    start, stop = seqpar.chunk_bounds(T, world, rank)
    conv = _conv_reference(x, w.double(), b.double())
    xl = x[:, start:stop].clone().requires_grad_()
    y, _ = conv(xl, sequence_parallel_conv_state(xl, kernel, group))
    y.mul(g[:, start:stop]).sum().backward()
    torch.testing.assert_close(y, y_ref[:, start:stop], rtol=0, atol=1e-12)
    torch.testing.assert_close(xl.grad, xr.grad[:, start:stop], rtol=0, atol=1e-12)
    for p, ref in ((conv.weight, full.weight), (conv.bias, full.bias)):
        total = p.grad.clone()
        dist.all_reduce(total, group=group)
        torch.testing.assert_close(total, ref.grad, rtol=0, atol=1e-12)


def case_layer(rank, world, group, cell_name, T):
    """ParaRNN.set_sequence_parallel: the chunk's output, last state and gradients equal the
    single-process layer's (same weights)."""
    from newtonlm.kernels import ParaGRU, ParaLSTM

    cls = ParaGRU if cell_name == "gru" else ParaLSTM
    torch.manual_seed(5)
    layer = cls(4, 6, 2, mode="parallel", newton=NewtonConfig(max_iters=6)).double()
    x = torch.randn(2, T, 4, dtype=torch.float64)
    state = layer._state_shape(2)
    state = 0.3 * torch.randn(state, dtype=torch.float64)
    out_ref, last_ref = layer(x.clone().requires_grad_(), state, return_state=True)
    grads_ref = torch.autograd.grad(out_ref.square().sum(), list(layer.parameters()))
    start, stop = seqpar.chunk_bounds(T, world, rank)
    layer.set_sequence_parallel(group)
    xl = seqpar.split_sequence(x, group).clone().requires_grad_()
    out, last = layer(xl, state, return_state=True)
    grads = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
    torch.testing.assert_close(out, out_ref[:, start:stop], rtol=0, atol=1e-11)
    torch.testing.assert_close(seqpar.gather_sequence(out, group), out_ref.detach(), rtol=0,
                               atol=1e-11)
    if rank == world - 1:
        torch.testing.assert_close(last, last_ref, rtol=0, atol=1e-11)
    for gl, gr in zip(grads, grads_ref):
        dist.all_reduce(gl, group=group)
        torch.testing.assert_close(gl, gr, rtol=0, atol=1e-10)
    assert layer.comm.calls["summary"] >= 1 and layer.stats.fallbacks == 0


def case_model(rank, world, group, T):
    """A tiny ParaGRU LM with set_sequence_parallel: each rank's logits are its chunk of the
    single-process logits, and parameter gradients summed over ranks are the full ones."""
    from newtonlm.models.configuration_pararnn import ParaGRUConfig
    from newtonlm.models.modeling_pararnn import ParaGRUForCausalLM

    torch.manual_seed(7)
    cfg = ParaGRUConfig(vocab_size=31, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                        expand=1, state_dim=8, num_heads=2, cell_mode="parallel")
    model = ParaGRUForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 31, (2, T))
    logits_ref = model(ids, use_cache=False).logits
    grads_ref = torch.autograd.grad(logits_ref.square().mean(), list(model.parameters()))
    start, stop = seqpar.chunk_bounds(T, world, rank)
    model.set_sequence_parallel(group)
    logits = model(seqpar.split_sequence(ids, group), use_cache=False).logits
    torch.testing.assert_close(logits, logits_ref[:, start:stop], rtol=0, atol=1e-10)
    loss = logits.square().sum() / logits_ref.numel()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for gl, gr in zip(grads, grads_ref):
        dist.all_reduce(gl, group=group)
        torch.testing.assert_close(gl, gr, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- single-process


def test_split_lengths_give_the_first_ranks_the_remainder():
    assert seqpar.split_lengths(11, 4) == [3, 3, 3, 2]
    assert seqpar.split_lengths(8, 4) == [2, 2, 2, 2]
    assert [seqpar.chunk_bounds(11, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 11)]
    with pytest.raises(ValueError, match=r"T=3 steps cannot be split over K=4"):
        seqpar.split_lengths(3, 4)
    with pytest.raises(ValueError, match=r"rank=4; expected 0 <= rank < K=4"):
        seqpar.chunk_bounds(11, 4, 4)
    with pytest.raises(ValueError, match=r"K=0; expected a positive integer"):
        seqpar.split_lengths(5, 0)


@pytest.mark.parametrize("structure", ["diag", "block2"])
def test_chunk_product_is_the_ordered_product_of_the_jacobians(structure):
    gen = torch.Generator().manual_seed(1)
    for L in (1, 2, 5, 8):
        shape = (2, L, 3) if structure == "diag" else (2, L, 2, 2, 3)
        J = torch.randn(shape, generator=gen, dtype=torch.float64)
        P = J[:, 0]
        for t in range(1, L):
            P = J[:, t] * P if structure == "diag" else torch.einsum("bijn,bjkn->bikn", J[:, t], P)
        torch.testing.assert_close(seqpar.chunk_product(J, structure), P, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("structure", ["diag", "block2"])
@pytest.mark.parametrize("reverse", [False, True])
def test_chunk_summaries_compose_to_the_whole_scan(structure, reverse):
    """The algebra of the split solve without processes: local scans from zero, summaries, the
    composition over the chunks before (after) each one, and the local rescan from the incoming
    state give the single scan of the whole sequence."""
    gen = torch.Generator().manual_seed(2)
    T, K = 13, 4
    shape = (2, T, 3) if structure == "diag" else (2, T, 2, 3)
    r = torch.randn(shape, generator=gen, dtype=torch.float64)
    J = 0.9 * torch.randn(shape[:2] + ((3,) if structure == "diag" else (2, 2, 3)), generator=gen,
                          dtype=torch.float64)
    whole = linear_scan(J, r, None, reverse=reverse, structure=structure, backend="reference")
    bounds = [seqpar.chunk_bounds(T, K, k) for k in range(K)]
    parts = []
    for a, b in bounds:
        loc = linear_scan(J[:, a:b], r[:, a:b], None, reverse=reverse, structure=structure,
                          backend="reference")
        M = seqpar.chunk_product(J[:, a:b].flip(1) if reverse else J[:, a:b], structure)
        parts.append((M, loc[:, 0] if reverse else loc[:, -1]))
    for k, (a, b) in enumerate(bounds):
        x = seqpar.compose_incoming(parts, k, structure, reverse=reverse)
        assert (x is None) == (k == (K - 1 if reverse else 0))
        got = linear_scan(J[:, a:b], r[:, a:b], x, reverse=reverse, structure=structure,
                          backend="reference")
        torch.testing.assert_close(got, whole[:, a:b], rtol=1e-12, atol=1e-12)


def test_without_a_process_group_the_error_says_so():
    u, params, _ = cell_inputs(GRU, 1, 4, 2)
    with pytest.raises(ValueError, match="initialized torch.distributed process group"):
        seqpar.seqpar_rnn(GRU, u, params)
    from newtonlm.kernels import ParaGRU

    with pytest.raises(ValueError, match="initialized torch.distributed process group"):
        ParaGRU(2, 2).set_sequence_parallel(object())


# ----------------------------------------------------------------------------- 2 ranks


@pytest.mark.parametrize("cell_name", list(CELLS))
def test_two_ranks_fp64_match_the_sequential_reference(pool2, cell_name):
    res = pool2.run(case_solve, cell_name, 11, torch.float64, "parallel", 1e-10)
    assert res[0]["stats"] == res[1]["stats"], "the ranks took different decisions"
    assert res[0]["stats"]["newton"] == 1 and res[0]["stats"]["fallbacks"] == 0


@pytest.mark.parametrize("cell_name", ["gru", "lstm"])
def test_two_ranks_fp32_within_the_stated_tolerance(pool2, cell_name):
    res = pool2.run(case_solve, cell_name, 13, torch.float32, "parallel", FP32_TOL)
    assert res[0]["stats"]["fallbacks"] == 0


@pytest.mark.parametrize("cell_name", ["gru", "rotating"])
def test_two_ranks_sequential_mode_passes_the_state_rank_after_rank(pool2, cell_name):
    res = pool2.run(case_solve, cell_name, 9, torch.float64, "sequential", 1e-12)
    assert res[0]["stats"]["sequential"] == 1
    assert "summary" not in res[0]["comm"][0] or res[0]["comm"][1]["summary"] == 1  # adjoint only


def test_counted_bytes_follow_the_formula(pool2):
    """Per Newton iteration a rank receives: the previous state (rank > 0), (K-1) chunk summaries
    of 2 N values (diagonal) or 6 N (2x2 blocks) per sequence, and (K-1) x 2 residual scalars."""
    for cell_name, per_seq in (("gru", 2), ("lstm", 6)):
        res = pool2.run(case_solve, cell_name, 11, torch.float64, "parallel", 1e-10)
        B, N, K = 2, 3, 2
        for rank, r in enumerate(res):
            nbytes, calls, iters = r["comm"]
            state = N if cell_name == "gru" else 2 * N
            assert calls["summary"] == iters + 1  # one per iteration, one in the adjoint
            assert nbytes["summary"] == (K - 1) * B * per_seq * N * 8 * (iters + 1)
            assert nbytes["residual"] == (K - 1) * 2 * 8 * (iters + 1)
            assert nbytes.get("state", 0) == (B * state * 8 * (iters + 1) if rank else 0)


@pytest.mark.parametrize("fallback", ["sequential", "raise"])
def test_newton_failing_in_one_chunk_is_decided_by_every_rank(pool2, fallback):
    if fallback == "raise":
        errors = pool2.run(case_fallback, 10, fallback, expect_error=True)
        assert [e[0] for e in errors] == ["NewtonDivergence"] * 2
        assert all("over all ranks" in e[1] for e in errors)
        return
    stats = pool2.run(case_fallback, 10, fallback)
    assert stats[0] == stats[1]
    assert stats[0]["fallbacks"] == 1 and stats[0]["path"] == "fallback"


@pytest.mark.parametrize("which,match", [
    ("short", r"chunk lengths \[1, 0\] over 2 ranks; every rank needs at least one step"),
    ("state_size", r"differ in state size N: \[4, 3\]"),
    ("shape", r"rejected their inputs|u has shape"),
    ("halo", r"chunk lengths \[5, 2\] over 2 ranks; a causal convolution of kernel 4 needs every "
             r"chunk to have at least 3 steps"),
])
def test_bad_inputs_raise_on_every_rank_before_any_work(pool2, which, match):
    errors = pool2.run(case_errors, which, expect_error=True)
    import re

    for name, msg in errors:
        assert name == "ValueError" and re.search(match, msg), msg


def test_conv_halo_matches_the_unsplit_convolution(pool2):
    pool2.run(case_conv_halo, 9, 4)


@pytest.mark.parametrize("cell_name", ["gru", "lstm"])
def test_layer_set_sequence_parallel_matches_the_single_process_layer(pool2, cell_name):
    pool2.run(case_layer, cell_name, 11)


@pytest.mark.slow
def test_model_set_sequence_parallel_matches_the_single_process_model(pool2):
    pool2.run(case_model, 11, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["triton", "fused"])
def test_two_ranks_triton_paths_in_the_interpreter(pool2, mode):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter is not selected")
    pytest.importorskip("triton")
    for cell_name in ("gru", "lstm"):
        pool2.run(case_solve, cell_name, 5, torch.float64, mode, 1e-10, timeout=300)


# ----------------------------------------------------------------------------- 4 ranks


@pytest.mark.slow
@pytest.mark.matrix
@pytest.mark.parametrize("cell_name", list(CELLS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_four_ranks_match_the_sequential_reference(pool4, cell_name, dtype):
    tol = 1e-10 if dtype == torch.float64 else FP32_TOL
    res = pool4.run(case_solve, cell_name, 13, dtype, "parallel", tol)
    assert all(r["stats"] == res[0]["stats"] for r in res)


@pytest.mark.slow
def test_four_ranks_fallback_conv_and_errors(pool4):
    stats = pool4.run(case_fallback, 14, "sequential")
    assert all(s == stats[0] for s in stats) and stats[0]["fallbacks"] == 1
    pool4.run(case_solve, "lstm", 14, torch.float64, "sequential", 1e-12)
    pool4.run(case_conv_halo, 13, 4)
    errors = pool4.run(case_errors, "short", expect_error=True)
    assert all("every rank needs at least one step" in m for _, m in errors)



@pytest.mark.slow
def test_bench_counts_the_bytes_of_the_formula(capsys):
    """The benchmark command end to end (2 processes, tiny sizes): its bytes per Newton iteration
    are the formula's (per iteration the previous state, K-1 summaries of 2N values per sequence,
    K-1 residual pairs; plus the state and residual of the final check, spread over the iterations)."""
    from newtonlm.kernels import seqpar_bench

    rows = seqpar_bench.main(["--cells", "gru", "--modes", "parallel", "--ranks", "1", "2", "--B", "2",
                              "--T", "17", "--N", "4", "--heads", "1", "--steps", "1", "--warmup", "0"])
    assert "B/iter/rank" in capsys.readouterr().out
    one, two = rows
    assert (one["K"], one["bytes_per_iter"], two["K"], two["chunk"]) == (1, 0, 2, 9)
    B, N, K, it = 2, 4, 2, two["iters"]
    state, residual, summary = B * N * 4, (K - 1) * 2 * 8, (K - 1) * B * 2 * N * 4
    assert two["bytes_per_iter"] == pytest.approx(((it + 1) * (state + residual) + it * summary) / it)
    assert two["activation_bytes"] == B * 9 * N * 4
