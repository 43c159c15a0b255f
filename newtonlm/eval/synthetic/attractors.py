"""How many states can one ParaRNN channel hold? Attractors of the cell map under a constant input.

A diagonal cell (ParaGRU) or 2x2-block cell (ParaLSTM) evolves every channel on its own, given
the drive ``u`` (the input projection of the current input). Under a constant drive the channel is
an autonomous map ``h -> f(h, u)``; the channel can store a bit at arbitrary length only if that map
has two attractors (two stable fixed points, a flip-flop), and it can *flip* the bit (parity) only
if some drive gives an attracting orbit of period 2.

ParaGRU, ``h' = h + z (c - h)`` with ``c = tanh(A_h r h + u_h)``: the fixed points are those of
``phi(h) = tanh(A_h r(h) h + u_h)`` (z > 0), and ``|phi'| = (1 - c^2) |A_h| |r + h r (1 - r) A_r|
<= |A_h|`` when ``|A_r| <= 1`` (then ``0 <= r + h r (1 - r) A_r <= 1`` for |h| <= 1). So with
``a_max < 1``, phi is a contraction, the fixed point h* is unique and
``|f(h) - h*| <= (1 - z (1 - a_max)) |h - h*|``: every constant input drives every channel to one
state, whatever it held; no bistability, no period-2 orbit. With ``|A_h| > 1`` (and r near 1)
``tanh(A_h h)`` has the two stable fixed points ±h* (A_h > 1) or the attracting 2-cycle
{h*, -h*} (A_h < -1, z near 1).

This module checks the statement numerically for the actual cells of ``newtonlm.kernels.cells``
(GRU and LSTM, gates and peepholes included): :func:`limit_states` iterates a cell from a grid of
initial states under constant drives; :func:`classify` counts the attractors and period-2 orbits
per channel; :func:`survey` draws random channels with ``|A|, |C| <= a_max``.
"""

from __future__ import annotations

import torch

from newtonlm.kernels.cells import GRU, LSTM, Cell


def _cell(name: str) -> Cell:
    cells = {"gru": GRU, "lstm": LSTM}
    if name not in cells:
        raise ValueError(f"cell={name!r}; expected one of {tuple(cells)}")
    return cells[name]


def limit_states(cell: str, params: tuple, u: torch.Tensor, starts: torch.Tensor, steps: int) -> torch.Tensor:
    """The last three iterates of every channel from every start under the constant drive ``u``.

    ``params``: the cell's recurrent parameters (``(A,)`` ``[3, N]`` for GRU, ``(A, C)`` for LSTM);
    ``u`` ``[3, N]``; ``starts`` ``[S, N]`` (GRU: h) or ``[S, 2, N]`` (LSTM: c, h). Returns
    ``[3, S, N]`` (GRU) or ``[3, S, 2, N]``: the states after ``steps - 2``, ``steps - 1``, ``steps``
    steps (the output component h for LSTM is index 1 of the state)."""
    c = _cell(cell)
    if steps < 3:
        raise ValueError(f"steps={steps}; expected >= 3")
    s = starts.clone()
    tail = []
    for k in range(steps):
        s = c.step(s, u, params)
        if k >= steps - 3:
            tail.append(s)
    return torch.stack(tail)


def classify(tail: torch.Tensor, tol: float = 1e-4) -> dict[str, torch.Tensor]:
    """Per channel, from :func:`limit_states`'s output (the output component for LSTM):

    * ``attractors``: the number of distinct limit states among the starts (values within ``tol``
      count as one), counting period-2 orbits once per orbit;
    * ``period2``: True where some start ends on an orbit of period 2;
    * ``unsettled``: True where some start has neither settled to a fixed point nor a 2-cycle
      (too few steps, or a longer cycle)."""
    if tail.dim() == 4:  # LSTM: judge by the full state, count by h
        fixed = ((tail[2] - tail[1]).abs().amax(dim=1) < tol)
        cycle2 = ((tail[2] - tail[0]).abs().amax(dim=1) < tol) & ~fixed
        last, prev = tail[2][:, 1], tail[1][:, 1]
    else:
        fixed = (tail[2] - tail[1]).abs() < tol
        cycle2 = ((tail[2] - tail[0]).abs() < tol) & ~fixed
        last, prev = tail[2], tail[1]
    key = torch.minimum(last, prev)  # one representative per 2-cycle
    S, N = key.shape
    counts = torch.empty(N, dtype=torch.long)
    ordered, _ = key.sort(dim=0)
    gaps = (ordered[1:] - ordered[:-1]) > 10 * tol
    counts[:] = 1 + gaps.sum(dim=0)
    return {"attractors": counts, "period2": cycle2.any(dim=0), "unsettled": (~fixed & ~cycle2).any(dim=0)}


def random_channels(cell: str, a_max: float, n: int, drive_scale: float, generator: torch.Generator):
    """``n`` random channels: recurrent parameters uniform in ``[-a_max, a_max]`` (half of the
    channels pushed to ``±a_max``, where the bound binds), drives uniform in ``[-drive_scale,
    drive_scale]``; returns (params, u ``[3, n]``) in float64."""
    if not a_max > 0 or not drive_scale > 0 or n < 2:
        raise ValueError(f"a_max={a_max}, drive_scale={drive_scale}, n={n}; expected positive values, n >= 2")
    rows = {"gru": (3,), "lstm": (3, 2)}[_cell(cell).name]

    def draw(k):
        p = (torch.rand(k, n, generator=generator, dtype=torch.float64) * 2 - 1) * a_max
        p[:, : n // 2] = torch.sign(p[:, : n // 2]) * a_max
        return p

    params = tuple(draw(k) for k in rows)
    u = (torch.rand(3, n, generator=generator, dtype=torch.float64) * 2 - 1) * drive_scale
    return params, u


def grid_starts(cell: str, n: int, points: int = 8) -> torch.Tensor:
    """Initial states spread over the reachable box (|h| < 1; LSTM: |c|, |h| < 1; an even ``points``
    leaves out 0, a fixed point of every odd cell map at zero drive), ``[S, N]`` or
    ``[S, 2, N]`` in float64."""
    g = torch.linspace(-0.99, 0.99, points, dtype=torch.float64)
    if _cell(cell).name == "gru":
        return g[:, None].expand(points, n).clone()
    cc, hh = torch.meshgrid(g, g, indexing="ij")
    return torch.stack((cc.reshape(-1), hh.reshape(-1)), dim=1)[:, :, None].expand(-1, 2, n).clone()


def survey(cell: str, a_max: float, n: int = 2048, steps: int = 3000, drive_scale: float = 4.0,
           seed: int = 0) -> dict:
    """Random channels with ``|A|, |C| <= a_max``: fractions with two or more attractors, with a
    period-2 orbit, and still unsettled after ``steps`` (excluded from nothing; reported)."""
    gen = torch.Generator().manual_seed(seed)
    params, u = random_channels(cell, a_max, n, drive_scale, gen)
    starts = grid_starts(cell, n)
    r = classify(limit_states(cell, params, u, starts, steps))
    return {"cell": cell, "a_max": a_max, "channels": n, "steps": steps,
            "multistable": float((r["attractors"] >= 2).double().mean()),
            "period2": float(r["period2"].double().mean()),
            "unsettled": float(r["unsettled"].double().mean())}


def main(argv: list[str] | None = None) -> None:
    """``python -m newtonlm.eval.synthetic.attractors [--a-max 0.5 0.9 ...] [--channels N] [--steps S]
    [--json]``: the :func:`survey` of both cells at each bound, as a markdown table (or JSON)."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a-max", type=float, nargs="+", default=[0.5, 0.9, 1.0, 1.5, 3.0, 8.0])
    p.add_argument("--channels", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = [survey(cell, a, n=args.channels, steps=args.steps)
            for cell in ("gru", "lstm") for a in args.a_max]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| cell | a_max | channels with >= 2 attractors | with a period-2 orbit | unsettled |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['cell']} | {r['a_max']:g} | {r['multistable']:.4f} | {r['period2']:.4f} "
              f"| {r['unsettled']:.4f} |")


if __name__ == "__main__":
    main()
