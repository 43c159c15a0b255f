"""ParaRNN in one file: a minimal reference to read top to bottom (plain PyTorch, no options).

A nonlinear RNN ``h_t = f(h_{t-1}, u_t)`` looks sequential. ParaRNN (Danieli et al., arXiv
2510.21450) writes all T steps as one system of equations and solves it with Newton's method; each
Newton step is a *linear* recurrence, which an associative (parallel) scan solves in O(log T)
depth. Gradients come from the adjoint: one reversed linear scan plus local vector-Jacobian
products. This file does all of it for the ParaGRU cell, whose Jacobian is diagonal.

Shapes: B batch, T time, N channels. ``u [B, T, 3, N]`` is the cell's input drive (rows z, r, h:
the input projection ``B x_t + b``, computed for all t before the recurrence), ``A [3, N]`` the
recurrent weights, ``h0 [B, N]`` the state before t = 0, ``h [B, T, N]`` the states.

The package's fast paths (newtonlm.kernels: compiled CPU loops, Triton kernels, telemetry,
fallbacks, the LSTM cell) compute the same thing; tests/test_kernels_minimal.py checks that.
Nothing else in newtonlm imports this file, and it imports nothing from newtonlm.
"""

import torch


# 1. The cell. Every channel has its own scalar recurrence, so df/dh is diagonal: one number per
#    (batch, time, channel). That is what makes each scan element O(N) instead of O(N^2).
def gru_gates(h, u, A):
    """h [..., N], u [..., 3, N], A [3, N] -> gates z, r and candidate c, each [..., N]."""
    z = torch.sigmoid(A[0] * h + u[..., 0, :])
    r = torch.sigmoid(A[1] * h + u[..., 1, :])
    c = torch.tanh(A[2] * (h * r) + u[..., 2, :])
    return z, r, c


def gru_step(h, u, A):
    """One step f(h, u): h [..., N], u [..., 3, N] -> h' [..., N]. Vectorized over any leading
    dims, so one call evaluates all T steps at once given the previous states."""
    z, r, c = gru_gates(h, u, A)
    return z * c + (1 - z) * h


def gru_jacobian(h, u, A):
    """Diagonal of df/dh at (h, u): [..., N] (the chain rule through z, r and c)."""
    z, r, c = gru_gates(h, u, A)
    return (1 - z) + (c - h) * z * (1 - z) * A[0] + z * (1 - c * c) * A[2] * (r + h * r * (1 - r) * A[1])


def sequential(u, A, h0):
    """What everything below computes: the plain loop over time. -> h [B, T, N]."""
    h, out = h0, []
    for t in range(u.shape[1]):
        h = gru_step(h, u[:, t], A)
        out.append(h)
    return torch.stack(out, dim=1)


def shift(h, h0):
    """h_{t-1} for every t: [B, T, N] with h0 at t = 0."""
    return torch.cat((h0[:, None], h[:, :-1]), dim=1)


# 2. The linear recurrence x_t = J_t x_{t-1} + r_t (J, r [B, T, N]; x0 [B, N] is x_{-1}).
def scan_loop(J, r, x0):
    """The obvious sequential loop: T dependent steps."""
    x, out = x0, []
    for t in range(r.shape[1]):
        x = J[:, t] * x + r[:, t]
        out.append(x)
    return torch.stack(out, dim=1)


def scan_assoc(J, r, x0):
    """Same result in ceil(log2 T) parallel steps (Hillis-Steele doubling).

    Step t is the affine map x -> J_t x + r_t. Composing maps is associative:
    (J2, r2) after (J1, r1) = (J2 J1, J2 r1 + r2). After round k, element t holds the composition
    of the maps max(0, t - 2^k + 1) .. t; once it covers 0 .. t, its offset r is that composition
    applied to 0, i.e. x_t (x0 is folded into map 0 first). Each round is one elementwise update
    of all t at once: O(T log T) work, O(log T) depth.
    """
    r = torch.cat((J[:, :1] * x0[:, None] + r[:, :1], r[:, 1:]), dim=1)
    k = 1
    while k < r.shape[1]:
        # element t absorbs element t - k (earlier maps first); both updates read the old J, r
        r = torch.cat((r[:, :k], J[:, k:] * r[:, :-k] + r[:, k:]), dim=1)
        J = torch.cat((J[:, :k], J[:, k:] * J[:, :-k]), dim=1)
        k *= 2
    return r


# 3. Newton. Unknowns: all of h. Equations: F_t(h) = h_t - f(h_{t-1}, u_t) = 0 for every t.
#    Linearizing F(h + d) = 0 gives d_t - J_t d_{t-1} = f(h_{t-1}, u_t) - h_t =: r_t, i.e. the
#    linear recurrence d_t = J_t d_{t-1} + r_t with d_{-1} = 0 (h0 is given, not unknown).
def newton(u, A, h0, iters=3):
    """Solve h_t = f(h_{t-1}, u_t) for all t: u [B, T, 3, N], h0 [B, N] -> h [B, T, N].

    Start from h_t = f(0, u_t) (f(h0, u_0) at t = 0). Iteration k makes at least step k exact
    (step 0 already is), so T - 1 iterations give the exact answer for any cell; for contracting
    cells (bounded |A|) the convergence is quadratic and ~3 iterations reach float32 precision,
    which is why the ParaRNN reference runs exactly 3. The fast paths also check the residual
    and fall back to the sequential loop when Newton has not converged.
    """
    h = gru_step(shift(torch.zeros_like(u[:, :, 0]), h0), u, A)
    for _ in range(iters):
        h_prev = shift(h, h0)
        r = gru_step(h_prev, u, A) - h  # residual of every equation, all t at once
        J = gru_jacobian(h_prev, u, A)
        h = h + scan_assoc(J, r, torch.zeros_like(h0))
    return h


# 4. The adjoint backward. With g_t = dL/dh_t from above, the total derivative
#    lam_t = dL/dh_t (through all later steps) obeys lam_t = g_t + J_{t+1}^T lam_{t+1},
#    lam_{T-1} = g_{T-1}: the same linear recurrence run backward in time (J^T = J: diagonal).
#    Then d u_t, d A and d h0 are vector-Jacobian products of the single step f at
#    (h_{t-1}, u_t) with cotangent lam_t: local, so all t are done at once. Only u, A, h0 and the
#    solution h are saved; there is no autograd graph through time or through Newton iterates.
class ParaGRUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, A, h0, iters):
        h = newton(u, A, h0, iters)
        ctx.save_for_backward(u, A, h0, h)
        return h

    @staticmethod
    def backward(ctx, g):
        u, A, h0, h = ctx.saved_tensors
        h_prev = shift(h, h0)
        J = gru_jacobian(h_prev, u, A)  # J[:, t] = d h_t / d h_{t-1}
        J_next = torch.cat((J[:, 1:], torch.zeros_like(J[:, :1])), dim=1)  # J_{t+1}, 0 at the end
        lam = scan_assoc(J_next.flip(1), g.flip(1), torch.zeros_like(h0)).flip(1)  # reversed scan
        with torch.enable_grad():  # autograd of ONE vectorized step = the local VJPs
            hp, uu, AA = (x.detach().requires_grad_(True) for x in (h_prev, u, A))
            d_hp, du, dA = torch.autograd.grad(gru_step(hp, uu, AA), (hp, uu, AA), lam)
        return du, dA, d_hp[:, 0], None  # d h_{-1} = d h0


def para_gru(u, A, h0=None, iters=3):
    """ParaGRU over a sequence, differentiable in u, A and h0: u [B, T, 3, N], A [3, N],
    h0 [B, N] or None (zeros) -> h [B, T, N]."""
    if h0 is None:
        h0 = u.new_zeros(u.shape[0], u.shape[3])
    return ParaGRUFunction.apply(u, A, h0, iters)
