"""Pure-PyTorch selective scan and cross-scan: the exact reference, and the CPU path of every model.

The S6 recurrence (Gu & Dao, "Mamba", 2023), per batch b, channel d and state n:

    dt_t  = softplus(delta_t + delta_bias)            (softplus and bias optional)
    h_t   = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * B[n, t] * u_t
    y_t   = sum_n C[n, t] * h_t + D[d] * u_t
    out_t = y_t * silu(z_t)                           (gate optional)

Within a chunk of T positions the recurrence has the closed form (S_t = sum_{r <= t} dt_r * A, a cumulative
log-decay, taken relative to its midpoint m = S_T / 2)

    h_t = exp(S_t - m) * (exp(m) * h_0 + sum_{s <= t} dt_s * B_s * u_s / exp(S_s - m))

which is a handful of vectorised cumsum/exp ops over the (batch * dim * N, T) rows of a chunk instead of T
Python steps (S_t - m = A * (the chunk's cumulative dt - half its sum), a cumsum over (batch, dim) only). It is
computed in float64 for float64 inputs and in float32 otherwise (like mamba_ssm's reference; the state is
float32 in the kernels too). |S_t - m| is at most half of sum_t |dt_t * A|, and where that bound exceeds
``_MAX_LOG_RANGE`` (exp(S - m), or the weights bu / exp(S - m), would come near the dtype's range) the
row takes the closed form in float64, and beyond float64's range steps through the chunk one position at a
time, so the result is exact for every input; such rows are rare (steep decays). A chunk's (rows, T) tensors
are sized to a core's L2 cache (800 KB each measured best on the 2-core CI machine class, 1 MB of L2 per core).

The backward is written out (`_ReferenceScan`): autograd keeps the states h (batch, dim, N, L) alone, and the
adjoint, a recurrence of the same kind run right to left, goes through the same chunked closed form.
"""
import torch
import torch.nn.functional as F

__all__ = ["selective_scan_ref", "cross_scan_ref", "cross_merge_ref", "cross_selective_scan_ref"]

_CHUNK_BYTES = 800 << 10  # one (rows, T) tensor of a chunk
# |S - m| stays below this: exp(+-(S - m)) and the chunk's sums of bu / exp(S - m) far inside the dtype's range
# (float32 overflows at exp(88.7), float64 at exp(709)). Nothing differentiates through the closed form (the
# backward is written out), so the range is the values' alone; the rounding error does not grow with it, since
# every term reaches h_t scaled by exp(S_t - S_s) <= 1.
_MAX_LOG_RANGE = {torch.float64: 600.0, torch.float32: 60.0}


def _scan_chunk(h, log_e, m, bu, log_a_rows, span):
    """States (R, T) of one chunk of rows by the closed form, from the states h (R,) before it, the centred
    log-decays log_e = S - m (R, T) and m (R,). Rows whose bound span (R,) on sum |log_a| is too large for the
    closed form in this dtype are computed by `_steep_rows` from their per-step log-decays log_a_rows(idx)."""
    steep = span > 2 * _MAX_LOG_RANGE[log_e.dtype]
    idx = steep.nonzero()[:, 0] if steep.any() else None
    if idx is not None:
        steep_hs = _steep_rows(h[idx], bu[idx], log_a_rows(idx), span[idx])
        log_e, m = log_e.index_fill(0, idx, 0.0), m.index_fill(0, idx, 0.0)  # finite; overwritten below
    E = log_e.exp_()
    w = bu / E
    w[:, 0] += h * m.exp()
    hs = E * w.cumsum(-1)
    return hs if idx is None else hs.index_copy_(0, idx, steep_hs)


def _steep_rows(h, bu, log_a, span):
    """States of rows too steep for the closed form in bu's dtype: the closed form in float64 (log-decays summed
    there from the per-step log_a), and where even that would overflow, one position at a time."""
    if bu.dtype != torch.float64:
        log_a = log_a.double()
        S = log_a.cumsum(-1)
        m = S[:, -1] * 0.5
        return _scan_chunk(h.double(), S - m[:, None], m, bu.double(), lambda j: log_a[j], span).to(bu.dtype)
    a, steps = log_a.exp(), []
    for t in range(bu.shape[-1]):
        h = torch.addcmul(bu[:, t], a[:, t], h)
        steps.append(h)
    return torch.stack(steps, -1)


def _chunk_states(dt5, A5, x5, B5, h, T):
    """Yield (s, states (batch, G, dim // G, N, t)) for the chunks s .. s + t of the recurrence
    h_t = exp(dt_t A) h_{t-1} + x_t B_t, from the states h (rows,) before position 0. dt5, x5 (batch, G,
    dim // G, 1, L); A5 (1, G, dim // G, N, 1); B5 (batch, G, 1, N, L); rows = batch * dim * N."""
    batch, G, dpg, _, L = dt5.shape
    N = A5.shape[3]
    rows = batch * G * dpg * N
    absA = A5.detach().abs()[..., 0]
    for s in range(0, L, T):
        dt_c = dt5[..., s:s + T]
        t = dt_c.shape[-1]
        # the chunk's cumulative time, centred on its midpoint, over (batch, dim) only: times A it is S - m
        cdt = dt_c.cumsum(-1)
        half = cdt[..., -1:] * 0.5
        span = (dt_c.detach().abs().sum(-1) * absA).view(rows)  # = sum_t |dt_t * A| per row

        def log_a_rows(idx, dt_c=dt_c, t=t):  # per-step log-decays dt_t * A of rows idx ((b, d) row, (d, n))
            return dt_c.reshape(-1, t)[idx // N] * A5.reshape(-1)[idx % (G * dpg * N), None]
        hs = _scan_chunk(h, ((cdt - half) * A5).view(rows, t), (half * A5).view(rows),
                         (x5[..., s:s + T] * B5[..., s:s + T]).view(rows, t), log_a_rows, span)
        h = hs[:, -1]
        yield s, hs.view(batch, G, dpg, N, t)


def _chunk_length(rows, element_size):
    T = 16
    while T < 64 and rows * 2 * T * element_size <= _CHUNK_BYTES:
        T *= 2
    return T


def _scan_forward(dt5, u5, A5, B5, C5, keep_states):
    """y (batch, G, dim // G, 1, L), the last state (batch, G, dim // G, N) and, if keep_states, every state
    (batch, G, dim // G, N, L) of the scan on the shapes of `_chunk_states`."""
    batch, G, dpg, _, L = dt5.shape
    N = A5.shape[3]
    h = dt5.new_zeros(batch * G * dpg * N)
    states = dt5.new_empty(batch, G, dpg, N, L) if keep_states else None
    ys = []
    for s, hs in _chunk_states(dt5, A5, dt5 * u5, B5, h, _chunk_length(h.numel(), h.element_size())):
        ys.append((hs * C5[..., s:s + hs.shape[-1]]).sum(-2, keepdim=True))
        if keep_states:
            states[..., s:s + hs.shape[-1]] = hs
    return torch.cat(ys, -1), hs[..., -1], states


class _ReferenceScan(torch.autograd.Function):
    """The chunked scan with its adjoint written out, so that autograd keeps the states alone (not every
    intermediate of every chunk) and the backward is one reverse chunked scan plus a few products:

        lam_t = C_t gy_t + exp(dt_{t+1} A) lam_{t+1}    (lam after the end: the last state's gradient)
        dC_t = sum_d h_t gy_t,   dB_t = sum_d lam_t dt_t u_t,   du_t = dt_t <lam_t, B_t>,
        ddt_t = u_t <lam_t, B_t> + <A, lam_t a_t h_{t-1}>,   dA = sum_{b, t} dt_t lam_t a_t h_{t-1},

    with a_t h_{t-1} = h_t - dt_t u_t B_t taken from the kept states. The adjoint is the forward recurrence
    on the flipped sequence (decays shifted by one position), so it is exact the same way."""

    @staticmethod
    def forward(ctx, dt5, u5, A5, B5, C5):
        y5, last, hs = _scan_forward(dt5, u5, A5, B5, C5, keep_states=True)
        ctx.save_for_backward(dt5, u5, A5, B5, C5, hs)
        return y5, last

    @staticmethod
    def backward(ctx, gy5, glast):
        dt5, u5, A5, B5, C5, hs = ctx.saved_tensors
        L = dt5.shape[-1]
        dtu5 = dt5 * u5
        dt_next = F.pad(dt5[..., 1:], (0, 1)).flip(-1)  # flipped: position s decays the lam after it
        gy5 = torch.zeros_like(dt5) if gy5 is None else gy5.contiguous()  # any layout (a channels-last z makes one)
        h0 = (glast if glast is not None else hs.new_zeros(hs.shape[:-1])).reshape(-1)
        T = _chunk_length(h0.numel(), h0.element_size())
        du, ddt, dB, dC = [], [], [], []
        dA = torch.zeros_like(A5)
        for s, lam in _chunk_states(dt_next, A5, gy5.flip(-1), C5.flip(-1), h0, T):
            t = lam.shape[-1]
            at = slice(L - s - t, L - s)  # the chunk's positions in the original order
            lam, h, dt, dtu, B = lam.flip(-1), hs[..., at], dt5[..., at], dtu5[..., at], B5[..., at]
            lam_ah = lam * (h - dtu * B)  # lam_t a_t h_{t-1}
            lam_B = (lam * B).sum(3, keepdim=True)
            dC.append((h * gy5[..., at]).sum(2, keepdim=True))
            dB.append((lam * dtu).sum(2, keepdim=True))
            du.append(dt * lam_B)
            ddt.append(u5[..., at] * lam_B + (lam_ah * A5).sum(3, keepdim=True))
            dA += (lam_ah * dt).sum((0, 4), keepdim=True)
        # the chunks came from the end of the sequence
        return tuple(torch.cat(g[::-1], -1) for g in (ddt, du)) + (dA,) + tuple(
            torch.cat(g[::-1], -1) for g in (dB, dC))


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, reverse=False):
    """Reference scan on validated inputs; B and C are grouped (batch, G, N, L). See `selective_scan`."""
    f = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, dim, L = u.shape
    G, N = B.shape[1], B.shape[2]
    u_f = u.to(f)
    dt = delta.to(f)
    if delta_bias is not None:
        dt = dt + delta_bias.to(f)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    # channels as (G, dim // G) so that B and C broadcast over a group's channels without copies; the small
    # factors contiguous, so that their products come out as dense (rows, T) chunks
    A5 = A.to(f).view(1, G, dim // G, N, 1)
    dt5 = dt.contiguous().view(batch, G, dim // G, 1, L)
    u5 = u_f.contiguous().view(batch, G, dim // G, 1, L)
    B5, C5 = B.to(f).contiguous()[:, :, None], C.to(f).contiguous()[:, :, None]
    if reverse:
        dt5, u5, B5, C5 = dt5.flip(-1), u5.flip(-1), B5.flip(-1), C5.flip(-1)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (dt5, u5, A5, B5, C5)):
        y, h = _ReferenceScan.apply(dt5, u5, A5, B5, C5)
    else:
        y, h = _scan_forward(dt5, u5, A5, B5, C5, keep_states=False)[:2]
    h = h.reshape(batch, dim, N)
    y = y.reshape(batch, dim, L)
    if reverse:
        y = y.flip(-1)
    if D is not None:
        y = y + D.to(f)[:, None] * u_f
    if z is not None:
        y = y * F.silu(z.to(f))
    y = y.to(u.dtype)
    return (y, h.float()) if return_last_state else y


# ---------------------------------------------------------------------------------------------------------
# VMamba's four scan orders of a (batch, C, H, W) map: k=0 row-major, k=1 column-major, k=2 and k=3 the same
# two reversed. cross_merge is the adjoint: every direction's output back to row-major, summed.
# ---------------------------------------------------------------------------------------------------------
def cross_scan_ref(x):
    """(batch, C, H, W) -> (batch, 4, C, H*W) in the four scan orders."""
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], 1)


def cross_merge_ref(y):
    """(batch, 4, C, H, W), direction k laid out in scan order k, -> (batch, C, H*W) row-major sum."""
    b, k, c, H, W = y.shape
    y = y.flatten(3)
    rows = y[:, 0] + y[:, 2].flip(-1)
    cols = y[:, 1] + y[:, 3].flip(-1)
    return rows + cols.view(b, c, W, H).transpose(2, 3).flatten(2)


def _to_scan_orders(t):
    """(batch, 4, C, H, W) per-direction maps in row-major layout -> (batch, 4, C, L), slice k in order k."""
    rows = t.flatten(3)
    cols = t.transpose(3, 4).flatten(3)
    return torch.stack([rows[:, 0], cols[:, 1], rows[:, 2].flip(-1), cols[:, 3].flip(-1)], 1)


def cross_selective_scan_ref(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Unfused SS2D core: cross-scan, one grouped scan over the 4 directions, cross-merge. See
    `cross_selective_scan` for the shapes. Returns (batch, dim, H, W) in float32 (float64 for float64 x)."""
    batch, dim, H, W = x.shape
    L = H * W
    xs = cross_scan_ref(x).reshape(batch, 4 * dim, L)
    ds = _to_scan_orders(delta).reshape(batch, 4 * dim, L)
    Bs, Cs = _to_scan_orders(B), _to_scan_orders(C)
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    ys = selective_scan_ref(xs.to(out_dtype), ds, A, Bs, Cs, D, None, delta_bias, delta_softplus)
    return cross_merge_ref(ys.view(batch, 4, dim, H, W)).view(batch, dim, H, W)
