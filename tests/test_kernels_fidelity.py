"""Fidelity to the ParaRNN reference implementation (Apple's ml-pararnn): initialization draw for
draw, parameter order, state layout, and loading weights the a_max clamp would change."""

import io
import logging
import math

import pytest
import torch

from newtonlm.kernels import ParaGRU, ParaLSTM, accept_clamped_weights


def reference_init(cell: str, D: int, N: int, H: int, seed: int) -> dict:
    """The reference's initialization written out independently, draw for draw:
    ``BaseRNNCell.reset_parameters`` fills every parameter in registration order (A, B, [C,] b)
    with U(-1/sqrt(N), 1/sqrt(N)); then the cell's ``reset_parameters`` draws A ("xlstm":
    N(0, (2/sqrt(5N))^2)), B ("xavier_uniform": U(+-sqrt(6 / (fan_in + fan_out))) with fan_in D/H
    and fan_out N for ParaGRU but N/H for ParaLSTM), C (xlstm, LSTM only), and sets b
    ("bias_minus_linspace": row 0 = -linspace(0, 1, N), other rows 0)."""
    torch.manual_seed(seed)
    shapes = {"A": (3, N), "B": (H, D // H, 3, N // H)}
    if cell == "lstm":
        shapes["C"] = (2, N)
    shapes["b"] = (3, N)
    p = {name: torch.empty(shape) for name, shape in shapes.items()}
    for t in p.values():
        t.uniform_(-1 / math.sqrt(N), 1 / math.sqrt(N))
    p["A"].normal_(0, 2 / math.sqrt(5 * N))
    fan_out = N if cell == "gru" else N // H
    bound = math.sqrt(6 / (D // H + fan_out))
    p["B"].uniform_(-bound, bound)
    if cell == "lstm":
        p["C"].normal_(0, 2 / math.sqrt(5 * N))
    p["b"].zero_()
    p["b"][0] = -torch.linspace(0, 1, N)
    return p


CELLS = [("gru", ParaGRU), ("lstm", ParaLSTM)]


@pytest.mark.parametrize("name, cls", CELLS, ids=["gru", "lstm"])
def test_reference_init_gives_the_reference_tensors_under_the_same_seed(name, cls):
    D, N, H = 48, 64, 4
    want = reference_init(name, D, N, H, seed=123)
    torch.manual_seed(123)
    layer = cls(D, N, H, init="reference")
    got = dict(layer.named_parameters())
    assert list(got) == list(want)  # registration order A, B, [C,] b
    for key in want:
        torch.testing.assert_close(got[key].detach(), want[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name, cls", CELLS, ids=["gru", "lstm"])
def test_reference_init_distributions(name, cls):
    D, N, H = 512, 1024, 4  # ~1.5M draws of B: the spread matches to a few per mille
    layer = cls(D, N, H, init="reference")
    fan_out = N if name == "gru" else N // H  # the reference's (inconsistent) fan-outs
    bound = math.sqrt(6 / (D // H + fan_out))
    B = layer.B.detach()
    assert bound * 0.999 < B.abs().max() <= bound
    assert abs(B.std().item() - bound / math.sqrt(3)) < 0.01 * bound / math.sqrt(3)
    assert abs(B.mean().item()) < 0.01 * bound
    std = 2 / math.sqrt(5 * N)
    for key in layer.recurrent_names:
        p = getattr(layer, key).detach()
        assert abs(p.std().item() - std) < 0.05 * std and abs(p.mean().item()) < 0.05 * std, key
    torch.testing.assert_close(layer.b[0].detach(), -torch.linspace(0, 1, N))
    assert (layer.b[1:] == 0).all() and layer.a_max is None


def test_reference_state_layout_maps_to_ours():
    # the reference's LSTM state is [B, T, 2N] = cat(c, h) and starts from zeros; ours is
    # [B, T, 2, N] with rows (c, h) and h0=None means zeros (docs/kernels.md, "Fidelity")
    torch.manual_seed(0)
    layer = ParaLSTM(8, 6, 2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    h, state = layer(x, return_state=True)
    u = layer.input_drive(x)
    A, C = layer.recurrent_weights()
    s = torch.zeros(2, 12, dtype=torch.float64)  # the reference's [B, 2N]
    for t in range(5):  # the reference's recurrence_step, on its flat state
        cc, hh = s[:, :6], s[:, 6:]
        f = torch.sigmoid(u[:, t, 0] + A[0] * hh + C[0] * cc)
        cc = f * cc + (1 - f) * torch.tanh(u[:, t, 2] + A[2] * hh)
        hh = torch.sigmoid(u[:, t, 1] + A[1] * hh + C[1] * cc) * torch.tanh(cc)
        s = torch.cat([cc, hh], -1)
    torch.testing.assert_close(state.flatten(-2), s)  # ours [B, 2, N] -> theirs [B, 2N]
    torch.testing.assert_close(s.unflatten(-1, (2, 6)), state)
    torch.testing.assert_close(h[:, -1], s[:, 6:])  # the reference outputs h only


# --- loading weights beyond a_max ----------------------------------------------------------------
def _reference_state(cls, top):
    layer = cls(16, 32, 2, init="reference")
    sd = {k: v.detach().clone() for k, v in layer.state_dict().items()}  # a plain dict
    sd["A"][1, 3] = top
    return sd


@pytest.mark.parametrize("cls", [ParaGRU, ParaLSTM])
def test_loading_weights_the_clamp_would_change_raises(cls):
    sd = _reference_state(cls, 0.8)
    lm = cls(16, 32, 2, init="lm", a_max=0.5)
    match = (r"state_dict entry A \(max \|value\| 0\.8 > a_max=0\.5\)"
             r".*init='reference', a_max=None.*a_max >= 0\.8.*accept_clamped_weights")
    with pytest.raises(ValueError, match=match):
        lm.load_state_dict(sd)
    cls(16, 32, 2, init="reference").load_state_dict(sd)  # no clamp: the reference's semantics
    cls(16, 32, 2, init="lm", a_max=0.8).load_state_dict(sd)
    sd["A"][1, 3] = 0.5  # at the bound: the clamp changes nothing
    lm.load_state_dict(sd)


def test_the_error_names_nested_parameters_and_peepholes():
    model = torch.nn.Sequential(ParaLSTM(16, 32, 2, init="lm", a_max=0.5),
                                ParaLSTM(32, 32, 2, init="lm", a_max=0.5))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd["1.C"][0, 0] = -0.75
    with pytest.raises(ValueError, match=r"1\.C \(max \|value\| 0\.75 > a_max=0\.5\)"):
        model.load_state_dict(sd)


def test_newtonlm_state_dicts_with_the_same_clamp_load(caplog):
    # weights trained under the clamp may drift past a_max (clamped, they get no gradient); a
    # newtonlm state_dict records its a_max, and loading it into a layer with the same a_max keeps
    # the outputs: accepted, also through torch.save / torch.load
    torch.manual_seed(0)
    trained = ParaGRU(16, 32, 2, init="lm", a_max=0.5)
    with torch.no_grad():
        trained.A[0, :4] = 0.9
    buf = io.BytesIO()
    torch.save(trained.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    same = ParaGRU(16, 32, 2, init="lm", a_max=0.5)
    same.load_state_dict(sd)
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(same(x), trained(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="a_max=0.3"):
        ParaGRU(16, 32, 2, init="lm", a_max=0.3).load_state_dict(sd)  # another clamp
    plain = dict(sd)  # the metadata is lost (e.g. DeepSpeed's zero_to_fp32): an explicit choice
    with pytest.raises(ValueError, match="max \\|value\\| 0.9"):
        same.load_state_dict(plain)
    with caplog.at_level(logging.INFO, logger="newtonlm.kernels.modules"):
        with accept_clamped_weights():
            same.load_state_dict(plain)
    assert "A (max |value| 0.9 > a_max=0.5): accepted" in caplog.text
    with pytest.raises(ValueError):  # the context ended
        same.load_state_dict(plain)


def test_weights_saved_with_a_clamp_refuse_a_layer_with_a_wider_one():
    """A state_dict records the clamp its layer applied (also the 0.5 that init="lm" with
    a_max=None silently meant before 2026-12-02): loading it where values beyond that clamp would
    reach the cell unclamped raises, also inside accept_clamped_weights (which is for state_dicts
    without the record)."""
    trained = ParaGRU(16, 32, 2, init="lm", a_max=0.5)
    with torch.no_grad():
        trained.A[2, :3] = -0.7  # drifted past the bound: the cell saw -0.5
    sd = trained.state_dict()
    for wider in (None, math.inf, 0.9):
        layer = ParaGRU(16, 32, 2, init="lm", a_max=wider)
        with pytest.raises(ValueError, match=r"A \(max \|value\| 0\.7 > 0\.5\).*a_max=0\.5"):
            layer.load_state_dict(sd)
        with accept_clamped_weights(), pytest.raises(ValueError, match="saved by a newtonlm layer"):
            layer.load_state_dict(sd)
    with torch.no_grad():
        trained.A[2, :3] = -0.4  # within the bound: every clamp gives the same outputs
    for wider in (None, 0.9):
        layer = ParaGRU(16, 32, 2, init="lm", a_max=wider)
        layer.load_state_dict(trained.state_dict())
        x = torch.randn(2, 5, 16)
        torch.testing.assert_close(layer(x), trained(x), rtol=0, atol=0)
