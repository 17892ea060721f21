"""Pure-PyTorch selective scan and cross-scan: the exact reference, and the CPU path of every model.

The S6 recurrence (Gu & Dao, "Mamba", 2023), per batch b, channel d and state n:

    dt_t  = softplus(delta_t + delta_bias)            (softplus and bias optional)
    h_t   = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * B[n, t] * u_t
    y_t   = sum_n C[n, t] * h_t + D[d] * u_t
    out_t = y_t * silu(z_t)                           (gate optional)

Within a chunk of T positions the recurrence has the closed form (S_t = sum_{r <= t} dt_r * A, a cumulative
log-decay)

    h_t = exp(S_t) * (h_0 + sum_{s <= t} exp(-S_s) * dt_s * B_s * u_s)

which is a handful of vectorised cumsum/exp ops over (batch, dim, N, T) instead of T Python steps. It is
computed in float64 for float64 inputs and in float32 otherwise (like mamba_ssm's reference; the state is
float32 in the kernels too); a chunk whose log-decay spans more than ``_MAX_LOG_RANGE`` (where exp(-S) times
the summed inputs would leave the dtype's range) is halved until it fits, down to single steps, so the
result is exact for every input. Chunks are short enough that one (batch, dim, N, T) tensor stays under
``_CHUNK_BYTES``: glibc serves larger blocks as fresh mmap pages on every allocation, and their page faults
cost the CPU more than the arithmetic (3x on a DiffuSSM training step).
"""
import torch
import torch.nn.functional as F

__all__ = ["selective_scan_ref", "cross_scan_ref", "cross_merge_ref", "cross_selective_scan_ref"]

_CHUNK = 64  # the longest chunk
_CHUNK_BYTES = 8 << 20
# exp(600) ~ 1e260, exp(60) ~ 1e26: exp(-S) times inputs and their cumsum stay inside the dtype's range
_MAX_LOG_RANGE = {torch.float64: 600.0, torch.float32: 60.0}


def _scan_chunk(h, log_a, bu):
    """States h_t of one chunk (..., N, T) from the state h (..., N) before it, by the closed form; halves
    the chunk where its log-decay leaves float64's exp range, and steps where one position does."""
    T = log_a.shape[-1]
    S = log_a.cumsum(-1)
    lo, hi = torch.aminmax(S)
    if max(-lo, hi) <= _MAX_LOG_RANGE[S.dtype]:
        E = S.exp()
        w = bu * S.neg_().exp_()  # exp(-S), in place (no division: its gradient overflows)
        w[..., 0] += h  # the state entering the chunk, carried by the cumsum
        return E * w.cumsum(-1)
    if T == 1:
        return (log_a.exp() * h[..., None] + bu)
    first = _scan_chunk(h, log_a[..., :T // 2], bu[..., :T // 2])
    second = _scan_chunk(first[..., -1], log_a[..., T // 2:], bu[..., T // 2:])
    return torch.cat([first, second], -1)


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
    # channels as (G, dim // G) so that B and C broadcast over a group's channels without copies
    A5 = A.to(f).view(1, G, dim // G, N, 1)
    dt5 = dt.view(batch, G, dim // G, 1, L)
    dtu5 = (dt * u_f).view(batch, G, dim // G, 1, L)
    B5, C5 = B.to(f)[:, :, None], C.to(f)[:, :, None]
    if reverse:
        dt5, dtu5, B5, C5 = dt5.flip(-1), dtu5.flip(-1), B5.flip(-1), C5.flip(-1)

    h = u_f.new_zeros(batch, G, dim // G, N)
    T = _CHUNK
    while T > 8 and batch * dim * N * T * h.element_size() > _CHUNK_BYTES:
        T //= 2
    ys = []
    for s in range(0, L, T):
        hs = _scan_chunk(h, dt5[..., s:s + T] * A5, dtu5[..., s:s + T] * B5[..., s:s + T])
        h = hs[..., -1]
        ys.append((hs * C5[..., s:s + T]).sum(-2))
    h = h.reshape(batch, dim, N)
    y = torch.cat(ys, -1).reshape(batch, dim, L)
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
