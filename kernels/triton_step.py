"""Triton selective scan, stepped: one position at a time, the state in registers.

For large states (N = 16, Vim and DiffuSSM) this beats the chunked associative scan of ``triton_scan``:
each program (one warp) owns BLOCK_D = 32 channels x N states of one batch row as an (N, BLOCK_D) tile, which
Triton lays out as 4 channels x 4 states per thread (8 lanes along the channels, 4 along the states); the
per-channel work (softplus, gate) is done once per channel and handed to the tile through shared memory, and
the sums over the states take two shuffles. The only serial dependency between steps is one multiply-add per
state element. The forward walks two steps per loop iteration with their inputs loaded one iteration ahead,
so the compiler can overlap one step's softplus and exponentials with the other's sums (1.03-1.10x over one
step per iteration on an H100, BENCHMARKS.md). The chunked kernels stay in use for N < 8 and for the fused
cross-scan, where the per-step work is too small.

Plain scans only (one direction, forward or ``reverse``); shapes as in ``triton_scan`` with K = 1:
u, delta, z, out (batch, dim, L); A (dim, N); B, C (batch, G, N, L); D, delta_bias (dim,). Every tensor is
read at its own strides (B and C share theirs, with the N states contiguous: ``states_last`` lays them out so;
out and the gradients of u, delta and z are laid out in the order of u's). The fast layout is channels-last:
u, delta and z with channels contiguous at each position (a warp then reads whole runs of channels per step),
and each thread reads its step's N values of B and C in two vector loads; ``selective_scan`` copies other
layouts so (``channels_last``, a tiled transpose kernel) and copies the output back.

Forward, at step t (position p = t, or L - 1 - t when reversed):

    h = exp(dt_t A) * h + dt_t u_t B_t          y_t = <C_t, h> + D u_t          out_t = y_t * silu(z_t)

Backward walks the steps from the last, with mu = a_{t+1} lam_{t+1} carried from the step after:

    lam = C_t dy_t + mu;   du_t = dt_t <lam, B_t> + D dy_t;   ddt_t = u_t <lam, B_t> + <A, lam a_t h_{t-1}>
    dA += dt_t lam a_t h_{t-1};   dB_t, dC_t += sum_d lam dt_t u_t, h_t dy_t;   mu = a_t lam

dB and dC are written as one partial sum per program, (batch, programs along dim, L, N), and summed over the
programs afterwards: atomic adds of 48 programs to the same address every step were the backward's
bottleneck (BENCHMARKS.md).

h_{t-1} is needed in reverse order: the forward pass of the backward writes the state entering every
CHUNK-step chunk, (batch, L / CHUNK, N, dim); each chunk is then re-run forward into a per-program scratch of
CHUNK states (small enough to stay in L2) and walked backward. No (batch, dim, L, N) tensor is stored. The
terms in h_t itself, dC and y (for dz), are done in the re-run, which walks forward like the forward kernel;
the backward walk then needs only h_{t-1}, and it too takes two steps per loop iteration.

Few programs (batch x channel blocks, e.g. 384 for a batch of 32 at 1248 px) cannot keep an H100 busy, so both
directions split the sequence into segments run by programs of their own. Forward: a summary pass runs each
segment from a zero state and writes its end state and summed dt; the main pass composes its entry state,
h_in(s) = exp(A sum dt(s-1)) h_in(s-1) + end(s-1). Backward: mu obeys the same kind of recurrence right to
left, so a summary kernel walks each segment from mu = 0 (lam only: C, dy, z and dt) and the main pass
composes the mu entering it from the segments after it.
"""
import torch
import triton
import triton.language as tl

from .triton_scan import LOG2E, _softplus

CHUNK = 16


@triton.jit
def _program_tile(At_ptr, D_ptr, bias_ptr, dim, channels_per_group, su_b, su_d, sB_b, sB_g, sB_n,
                  N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_D: tl.constexpr,
                  HAS_BIAS: tl.constexpr):
    """This program's batch row b, channels d and states n with their masks, the offsets of its channels in
    u and of its B/C group's states, and its channels' float32 A as an (N, BLOCK_D) tile (read from A
    transposed, At (N, dim), so that the tile's layout puts channels across threads), D and delta_bias
    (zeros where absent)."""
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    mask_d, mask_n = d < dim, n < N
    mask_nd = mask_n[:, None] & mask_d[None, :]
    g = tl.program_id(1) * BLOCK_D // channels_per_group
    row = b * su_b + d * su_d
    bc_row = b * sB_b + g * sB_g + n * sB_n
    A = tl.load(At_ptr + n[:, None] * dim + d[None, :], mask=mask_nd, other=0.0).to(tl.float32)
    Dd = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dd = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    return b, d, n, mask_d, mask_n, mask_nd, row, bc_row, A, Dd, bias


@triton.jit
def _time_step(delta, bias, SOFTPLUS: tl.constexpr):
    """dt before the softplus (delta + bias) and after it, in float32."""
    dt_raw = delta.to(tl.float32) + bias
    return dt_raw, (_softplus(dt_raw) if SOFTPLUS else dt_raw)


@triton.jit
def _across_segment(h, s, summary_ptr, seg_dt_ptr, b, n, d, mask_d, mask_nd, dim, N, A2):
    """h (the state, or the backward's mu) carried across segment s: exp(A sum dt) h + the segment's summary
    (what it leaves from a zero start). Summaries are (batch, segments, N, dim), summed dt (batch, segments,
    dim); A2 = A log2(e), an (N, BLOCK_D) tile."""
    n_seg = tl.num_programs(2)
    dt_sum = tl.load(seg_dt_ptr + (b * n_seg + s) * dim + d, mask=mask_d, other=0.0)
    summary = tl.load(summary_ptr + ((b * n_seg + s) * N + n[:, None]) * dim + d[None, :], mask=mask_nd, other=0.0)
    return tl.exp2(dt_sum[None, :] * A2) * h + summary


@triton.jit
def _store_summary(h, dt_sum, summary_ptr, seg_dt_ptr, b, n, d, mask_d, mask_nd, dim, N):
    """This program's segment summary (see _across_segment)."""
    s, n_seg = tl.program_id(2), tl.num_programs(2)
    tl.store(summary_ptr + ((b * n_seg + s) * N + n[:, None]) * dim + d[None, :], h, mask=mask_nd)
    tl.store(seg_dt_ptr + (b * n_seg + s) * dim + d, dt_sum, mask=mask_d)


@triton.jit
def _load_step(p, valid, u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, row, dt_row, bc_row, z_row, su_l, sdt_l, sB_l, sz_l,
               mask_d, mask_n, WRITE_OUT: tl.constexpr, HAS_Z: tl.constexpr):
    """u, delta, B, C and z at position p (zeros where not valid; C and z only when they are used)."""
    # valid is a scalar, applied with tl.where (Triton 3.9's interpreter turns bool & bool into int32)
    mask_d, mask_n = tl.where(valid, mask_d, False), tl.where(valid, mask_n, False)
    u = tl.load(u_ptr + row + p * su_l, mask=mask_d, other=0.0)
    delta = tl.load(delta_ptr + dt_row + p * sdt_l, mask=mask_d, other=0.0)
    B = tl.load(B_ptr + bc_row + p * sB_l, mask=mask_n, other=0.0)
    C, z = B, u  # placeholders where C or z is not read
    if WRITE_OUT:
        C = tl.load(C_ptr + bc_row + p * sB_l, mask=mask_n, other=0.0)
        if HAS_Z:
            z = tl.load(z_ptr + z_row + p * sz_l, mask=mask_d, other=0.0)
    return u, delta, B, C, z


@triton.jit
def _load_channels(p, valid, u_ptr, delta_ptr, z_ptr, row, dt_row, z_row, su_l, sdt_l, sz_l, mask_d,
                   WRITE_OUT: tl.constexpr, HAS_Z: tl.constexpr):
    """The per-channel inputs at position p, u, delta and z (zeros where not valid; z only when used): three
    registers a thread, read from HBM, so the forward loads them two iterations ahead."""
    mask_d = tl.where(valid, mask_d, False)
    u = tl.load(u_ptr + row + p * su_l, mask=mask_d, other=0.0)
    delta = tl.load(delta_ptr + dt_row + p * sdt_l, mask=mask_d, other=0.0)
    z = u  # placeholder where z is not read
    if WRITE_OUT:
        if HAS_Z:
            z = tl.load(z_ptr + z_row + p * sz_l, mask=mask_d, other=0.0)
    return u, delta, z


@triton.jit
def _load_states(p, valid, B_ptr, C_ptr, bc_row, sB_l, mask_n, WRITE_OUT: tl.constexpr):
    """B and C at position p (zeros where not valid; C only when used): 2 N registers a thread, shared by
    every channel block of the batch row (L2), loaded one iteration ahead."""
    mask_n = tl.where(valid, mask_n, False)
    B = tl.load(B_ptr + bc_row + p * sB_l, mask=mask_n, other=0.0)
    C = B  # placeholder where C is not read
    if WRITE_OUT:
        C = tl.load(C_ptr + bc_row + p * sB_l, mask=mask_n, other=0.0)
    return B, C


@triton.jit
def _advance(h, u, delta, Bt, A2, bias, valid, SOFTPLUS: tl.constexpr):
    """The state after one step and the step's dt (dt = 0 where not valid, which leaves h as it is)."""
    _, dt = _time_step(delta, bias, SOFTPLUS)
    dt = tl.where(valid, dt, 0.0)
    return tl.exp2(dt[None, :] * A2) * h + Bt.to(tl.float32)[:, None] * (dt * u.to(tl.float32))[None, :], dt


@triton.jit
def _y(h, Ct, u, Dd, HAS_D: tl.constexpr):
    """y = <C, h> + D u, per channel."""
    y = tl.sum(h * Ct.to(tl.float32)[:, None], axis=0)
    if HAS_D:
        y += Dd * u.to(tl.float32)
    return y


@triton.jit
def _store_output(h, p, valid, u, Ct, zt, Dd, out_ptr, out_row, so_l, mask_d, HAS_D: tl.constexpr,
                  HAS_Z: tl.constexpr):
    """out at position p (where valid): <C, h> + D u, gated by silu(z)."""
    y = _y(h, Ct, u, Dd, HAS_D)
    if HAS_Z:
        zt = zt.to(tl.float32)
        y *= zt * tl.sigmoid(zt)
    tl.store(out_ptr + out_row + p * so_l, y, mask=tl.where(valid, mask_d, False))


@triton.jit
def _rerun_outputs(h, p, valid, u, Ct, zt, dy, Dd, dz_ptr, dC_ptr, part, g_row, so_l, mask_d, mask_n, N,
                   HAS_D: tl.constexpr, HAS_Z: tl.constexpr):
    """The backward's terms in h_t at position p (where valid): dz from y = <C, h> + D u, and this program's
    partial dC = sum_d h dy with dy gated by silu(z)."""
    dy = dy.to(tl.float32)
    if HAS_Z:
        zt = zt.to(tl.float32)
        sig = tl.sigmoid(zt)
        tl.store(dz_ptr + g_row + p * so_l, dy * _y(h, Ct, u, Dd, HAS_D) * sig * (1.0 + zt * (1.0 - sig)),
                 mask=tl.where(valid, mask_d, False))
        dy = dy * zt * sig
    tl.store(dC_ptr + part + p * N, tl.sum(h * dy[None, :], axis=1), mask=tl.where(valid, mask_n, False))


@triton.jit
def _load_back(p, valid, u_ptr, delta_ptr, B_ptr, C_ptr, dout_ptr, z_ptr, row, dt_row, bc_row, do_row, z_row,
               su_l, sdt_l, sB_l, sdo_l, sz_l, mask_d, mask_n, HAS_Z: tl.constexpr):
    """What a step of the backward (its re-run and its walk) reads at position p: the forward's u, delta, B, C
    and z, and dout (zeros where not valid)."""
    u, delta, B, C, z = _load_step(p, valid, u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, row, dt_row, bc_row, z_row,
                                   su_l, sdt_l, sB_l, sz_l, mask_d, mask_n, True, HAS_Z)
    dy = tl.load(dout_ptr + do_row + p * sdo_l, mask=tl.where(valid, mask_d, False), other=0.0)
    return u, delta, B, C, dy, z


@triton.jit
def _step_back(mu, dA_acc, dD_acc, dbias_acc, p, valid, u, delta, Bt, Ct, dy, zt, h_prev, A, A2, Dd, bias, dB_ptr,
               du_ptr, ddelta_ptr, part, g_row, so_l, mask_d, mask_n, N, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
               SOFTPLUS: tl.constexpr):
    """One step of the backward walk at position p: writes du, ddelta and this program's partial dB, returns
    mu for the step before and the updated dA, dD and dbias sums. Where not valid the inputs are zeros and
    dt = 0, so mu and the sums pass through unchanged and nothing is written."""
    u, Bt, Ct, dy = u.to(tl.float32), Bt.to(tl.float32), Ct.to(tl.float32), dy.to(tl.float32)
    dt_raw, dt = _time_step(delta, bias, SOFTPLUS)
    dt = tl.where(valid, dt, 0.0)
    a = tl.exp2(dt[None, :] * A2)
    a_h = a * h_prev
    if HAS_Z:
        zt = zt.to(tl.float32)
        dy = dy * zt * tl.sigmoid(zt)
    lam = Ct[:, None] * dy[None, :] + mu  # zero outside the tile: dy, C and mu are loaded as zeros there
    tl.store(dB_ptr + part + p * N, tl.sum(lam * (dt * u)[None, :], axis=1), mask=tl.where(valid, mask_n, False))
    lam_B = tl.sum(lam * Bt[:, None], axis=0)  # <lam, B_t>, in both du and ddt
    du = dt * lam_B
    if HAS_D:
        du += Dd * dy
        dD_acc += dy * u
    mask_d = tl.where(valid, mask_d, False)
    tl.store(du_ptr + g_row + p * so_l, du, mask=mask_d)
    lam_ah = lam * a_h
    dA_acc += lam_ah * dt[None, :]
    ddt = u * lam_B + tl.sum(lam_ah * A, axis=0)
    if SOFTPLUS:
        ddt *= tl.sigmoid(dt_raw)
    dbias_acc += tl.where(mask_d, ddt, 0.0)
    tl.store(ddelta_ptr + g_row + p * so_l, ddt, mask=mask_d)
    return a * lam, dA_acc, dD_acc, dbias_acc


@triton.jit
def _scan_fwd_step_kernel(
    u_ptr, delta_ptr, At_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, chunk_state_ptr,
    seg_state_ptr, seg_dt_ptr, dim, L, channels_per_group, seg_len,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l, sB_b, sB_g, sB_n, sB_l, so_b, so_d, so_l,
    N: tl.constexpr, REVERSE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, WRITE_OUT: tl.constexpr, WRITE_CHUNK_STATES: tl.constexpr, SUMMARY: tl.constexpr,
    COMPOSE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    """Program (b, channel block, segment) walks the steps of its segment, [s * seg_len, (s + 1) * seg_len).

    SUMMARY: from a zero state; writes the segment's end state (batch, segments, N, dim) and its summed dt
    (batch, segments, dim), so that exp(A sum dt) carries a state across it. Otherwise (COMPOSE: after a
    SUMMARY launch) the state entering the segment is composed from the summaries of the segments before it;
    then the walk writes out (batch, dim, L) at strides so_* and the last state (batch, dim, N), or only the
    chunk-entry states (batch, L / CHUNK, N, dim)."""
    b, d, n, mask_d, mask_n, mask_nd, row, bc_row, A, Dd, bias = _program_tile(
        At_ptr, D_ptr, bias_ptr, dim, channels_per_group, su_b, su_d, sB_b, sB_g, sB_n,
        N, BLOCK_D, BLOCK_N, HAS_D, HAS_BIAS)
    dt_row, z_row, out_row = b * sdt_b + d * sdt_d, b * sz_b + d * sz_d, b * so_b + d * so_d
    A = A * LOG2E
    seg, n_seg = tl.program_id(2), tl.num_programs(2)
    t_begin = seg * seg_len
    t_end = tl.minimum(L, t_begin + seg_len)
    h = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if COMPOSE:
        for s in range(seg):  # compose the state entering this segment
            h = _across_segment(h, s, seg_state_ptr, seg_dt_ptr, b, n, d, mask_d, mask_nd, dim, N, A)
    dt_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    state = (b * tl.cdiv(L, CHUNK) * N + n[:, None]) * dim + d[None, :]  # offset of the first chunk's state
    step = -1 if REVERSE else 1
    p = L - 1 - t_begin if REVERSE else t_begin  # the position of step t
    # two steps per iteration; u, delta and z loaded two iterations ahead, B and C one
    u0, dl0, z0 = _load_channels(p, t_begin < t_end,
                                 u_ptr, delta_ptr, z_ptr, row, dt_row, z_row, su_l, sdt_l, sz_l, mask_d,
                                 WRITE_OUT, HAS_Z)
    u1, dl1, z1 = _load_channels(p + step, t_begin + 1 < t_end,
                                 u_ptr, delta_ptr, z_ptr, row, dt_row, z_row, su_l, sdt_l, sz_l, mask_d,
                                 WRITE_OUT, HAS_Z)
    u2, dl2, z2 = _load_channels(p + 2 * step, t_begin + 2 < t_end,
                                 u_ptr, delta_ptr, z_ptr, row, dt_row, z_row, su_l, sdt_l, sz_l, mask_d,
                                 WRITE_OUT, HAS_Z)
    u3, dl3, z3 = _load_channels(p + 3 * step, t_begin + 3 < t_end,
                                 u_ptr, delta_ptr, z_ptr, row, dt_row, z_row, su_l, sdt_l, sz_l, mask_d,
                                 WRITE_OUT, HAS_Z)
    B0, C0 = _load_states(p, t_begin < t_end, B_ptr, C_ptr, bc_row, sB_l, mask_n, WRITE_OUT)
    B1, C1 = _load_states(p + step, t_begin + 1 < t_end, B_ptr, C_ptr, bc_row, sB_l, mask_n, WRITE_OUT)
    for t in range(t_begin, t_end, 2):
        if WRITE_CHUNK_STATES:
            if t % CHUNK == 0:
                tl.store(chunk_state_ptr + state + (t // CHUNK) * N * dim, h, mask=mask_nd)
        cu0, cd0, cz0, cu1, cd1, cz1 = u0, dl0, z0, u1, dl1, z1
        cB0, cC0, cB1, cC1 = B0, C0, B1, C1
        u0, dl0, z0, u1, dl1, z1 = u2, dl2, z2, u3, dl3, z3
        u2, dl2, z2 = _load_channels(p + 4 * step, t + 4 < t_end,
                                     u_ptr, delta_ptr, z_ptr, row, dt_row, z_row, su_l, sdt_l, sz_l, mask_d,
                                     WRITE_OUT, HAS_Z)
        u3, dl3, z3 = _load_channels(p + 5 * step, t + 5 < t_end,
                                     u_ptr, delta_ptr, z_ptr, row, dt_row, z_row, su_l, sdt_l, sz_l, mask_d,
                                     WRITE_OUT, HAS_Z)
        B0, C0 = _load_states(p + 2 * step, t + 2 < t_end, B_ptr, C_ptr, bc_row, sB_l, mask_n, WRITE_OUT)
        B1, C1 = _load_states(p + 3 * step, t + 3 < t_end, B_ptr, C_ptr, bc_row, sB_l, mask_n, WRITE_OUT)
        h, dt = _advance(h, cu0, cd0, cB0, A, bias, True, SOFTPLUS)
        dt_sum += dt
        if WRITE_OUT:
            _store_output(h, p, True, cu0, cC0, cz0, Dd, out_ptr, out_row, so_l, mask_d, HAS_D, HAS_Z)
        h, dt = _advance(h, cu1, cd1, cB1, A, bias, t + 1 < t_end, SOFTPLUS)
        dt_sum += dt
        if WRITE_OUT:
            _store_output(h, p + step, t + 1 < t_end, cu1, cC1, cz1, Dd, out_ptr, out_row, so_l, mask_d, HAS_D,
                          HAS_Z)
        p += 2 * step
    if SUMMARY:
        _store_summary(h, dt_sum, seg_state_ptr, seg_dt_ptr, b, n, d, mask_d, mask_nd, dim, N)
    if WRITE_OUT:
        tl.store(last_ptr + (b * dim + d[None, :]) * N + n[:, None], h, mask=tl.where(seg == n_seg - 1, mask_nd, False))


@triton.jit
def _scan_bwd_summary_kernel(
    delta_ptr, At_ptr, C_ptr, z_ptr, bias_ptr, dout_ptr, seg_mu_ptr, seg_dt_ptr, dim, L, channels_per_group,
    seg_len, su_b, su_d, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l, sB_b, sB_g, sB_n, sB_l, sdo_b, sdo_d, sdo_l,
    N: tl.constexpr, REVERSE: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The backward's segment summaries: program (b, channel block, segment) walks its segment's steps from the
    last with mu = 0, lam = C_t dy_t + mu, mu = a_t lam, and writes the final mu (batch, segments, N, dim) and
    the segment's summed dt (batch, segments, dim). The mu leaving a segment is then its summary plus
    exp(A sum dt) times the mu entering it from the right."""
    b, d, n, mask_d, mask_n, mask_nd, _, bc_row, A, _, bias = _program_tile(
        At_ptr, At_ptr, bias_ptr, dim, channels_per_group, su_b, su_d, sB_b, sB_g, sB_n,
        N, BLOCK_D, BLOCK_N, False, HAS_BIAS)
    dt_row, z_row, do_row = b * sdt_b + d * sdt_d, b * sz_b + d * sz_d, b * sdo_b + d * sdo_d
    A = A * LOG2E
    t_begin = tl.program_id(2) * seg_len
    t_end = tl.minimum(L, t_begin + seg_len)
    mu = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dt_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for tt in range(t_end - t_begin):
        t = t_end - 1 - tt
        p = L - 1 - t if REVERSE else t
        delta = tl.load(delta_ptr + dt_row + p * sdt_l, mask=mask_d, other=0.0)
        Ct = tl.load(C_ptr + bc_row + p * sB_l, mask=mask_n, other=0.0).to(tl.float32)
        dy = tl.load(dout_ptr + do_row + p * sdo_l, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_Z:
            zt = tl.load(z_ptr + z_row + p * sz_l, mask=mask_d, other=0.0).to(tl.float32)
            dy = dy * zt * tl.sigmoid(zt)
        _, dt = _time_step(delta, bias, SOFTPLUS)
        dt_sum += dt
        mu = tl.exp2(dt[None, :] * A) * (Ct[:, None] * dy[None, :] + mu)
    _store_summary(mu, dt_sum, seg_mu_ptr, seg_dt_ptr, b, n, d, mask_d, mask_nd, dim, N)


@triton.jit
def _scan_bwd_step_kernel(
    u_ptr, delta_ptr, At_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, dlast_ptr, chunk_state_ptr,
    scratch_ptr, seg_mu_ptr, seg_dt_ptr, du_ptr, ddelta_ptr, dAt_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr,
    dim, L, channels_per_group, seg_len,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l, sB_b, sB_g, sB_n, sB_l, so_b, so_d, so_l,
    sdo_b, sdo_d, sdo_l,
    N: tl.constexpr, REVERSE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_DLAST: tl.constexpr, COMPOSE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    """Gradients of the stepped forward, from the chunk-entry states; program (b, channel block, segment)
    walks its segment's chunks from the last, its scratch holding one chunk's states. COMPOSE (more than one
    segment, after the summary kernel): the mu entering the segment from the right is composed from the
    summaries of the segments after it. du, ddelta and dz are written at strides so_*; dA is accumulated
    transposed, (N, dim) like At."""
    b, d, n, mask_d, mask_n, mask_nd, row, bc_row, A, Dd, bias = _program_tile(
        At_ptr, D_ptr, bias_ptr, dim, channels_per_group, su_b, su_d, sB_b, sB_g, sB_n,
        N, BLOCK_D, BLOCK_N, HAS_D, HAS_BIAS)
    dt_row, z_row, do_row = b * sdt_b + d * sdt_d, b * sz_b + d * sz_d, b * sdo_b + d * sdo_d
    g_row = b * so_b + d * so_d  # du, ddelta, dz
    A2 = A * LOG2E
    n_chunks = tl.cdiv(L, CHUNK)
    state = chunk_state_ptr + (b * n_chunks * N + n[:, None]) * dim + d[None, :]
    part = ((b * tl.num_programs(1) + tl.program_id(1)) * L) * N + n  # this program's dB, dC partials (L, N)
    seg, n_seg = tl.program_id(2), tl.num_programs(2)
    tile = n[:, None] * BLOCK_D + d[None, :] - tl.program_id(1) * BLOCK_D
    program = (b * tl.num_programs(1) + tl.program_id(1)) * n_seg + seg
    scratch = scratch_ptr + program * CHUNK * BLOCK_D * BLOCK_N + tile

    mu = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)  # a_{t+1} * lam_{t+1}
    if HAS_DLAST:
        mu = tl.load(dlast_ptr + (b * dim + d[None, :]) * N + n[:, None], mask=mask_nd, other=0.0)
    if COMPOSE:  # the mu entering this segment: fold the summaries of the segments after it, from the last
        for i in range(n_seg - 1 - seg):
            mu = _across_segment(mu, n_seg - 1 - i, seg_mu_ptr, seg_dt_ptr, b, n, d, mask_d, mask_nd, dim, N, A2)
    dA_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    step = -1 if REVERSE else 1
    first_chunk = seg * seg_len // CHUNK
    last_chunk = tl.minimum(n_chunks, (seg + 1) * seg_len // CHUNK) - 1
    for i in range(last_chunk + 1 - first_chunk):
        chunk = last_chunk - i
        t0 = chunk * CHUNK
        steps = tl.minimum(CHUNK, L - t0)
        # re-run the chunk forward, keeping h_{t-1} of every step in the scratch; the terms that need h_t
        # itself (dC, and y for dz) are done here, two steps per iteration as in the forward kernel
        h = tl.load(state + chunk * N * dim, mask=mask_nd, other=0.0)
        p = L - 1 - t0 if REVERSE else t0
        u0, dl0, B0, C0, dy0, z0 = _load_back(p, True, u_ptr, delta_ptr, B_ptr, C_ptr, dout_ptr, z_ptr, row, dt_row,
                                              bc_row, do_row, z_row, su_l, sdt_l, sB_l, sdo_l, sz_l, mask_d, mask_n,
                                              HAS_Z)
        u1, dl1, B1, C1, dy1, z1 = _load_back(p + step, 1 < steps, u_ptr, delta_ptr, B_ptr, C_ptr, dout_ptr, z_ptr,
                                              row, dt_row, bc_row, do_row, z_row, su_l, sdt_l, sB_l, sdo_l, sz_l,
                                              mask_d, mask_n, HAS_Z)
        for j in range(0, steps, 2):
            cu0, cd0, cB0, cC0, cz0, cy0 = u0, dl0, B0, C0, z0, dy0
            cu1, cd1, cB1, cC1, cz1, cy1 = u1, dl1, B1, C1, z1, dy1
            u0, dl0, B0, C0, dy0, z0 = _load_back(p + 2 * step, j + 2 < steps, u_ptr, delta_ptr, B_ptr, C_ptr,
                                                  dout_ptr, z_ptr, row, dt_row, bc_row, do_row, z_row, su_l, sdt_l,
                                                  sB_l, sdo_l, sz_l, mask_d, mask_n, HAS_Z)
            u1, dl1, B1, C1, dy1, z1 = _load_back(p + 3 * step, j + 3 < steps, u_ptr, delta_ptr, B_ptr, C_ptr,
                                                  dout_ptr, z_ptr, row, dt_row, bc_row, do_row, z_row, su_l, sdt_l,
                                                  sB_l, sdo_l, sz_l, mask_d, mask_n, HAS_Z)
            tl.store(scratch + j * BLOCK_D * BLOCK_N, h)
            h = _advance(h, cu0, cd0, cB0, A2, bias, True, SOFTPLUS)[0]
            _rerun_outputs(h, p, True, cu0, cC0, cz0, cy0, Dd, dz_ptr, dC_ptr, part, g_row, so_l, mask_d, mask_n, N,
                           HAS_D, HAS_Z)
            tl.store(scratch + (j + 1) * BLOCK_D * BLOCK_N, h)
            h = _advance(h, cu1, cd1, cB1, A2, bias, j + 1 < steps, SOFTPLUS)[0]
            _rerun_outputs(h, p + step, j + 1 < steps, cu1, cC1, cz1, cy1, Dd, dz_ptr, dC_ptr, part, g_row, so_l,
                           mask_d, mask_n, N, HAS_D, HAS_Z)
            p += 2 * step
        # walk it backward, two steps per iteration, their inputs loaded one iteration ahead (h_{t-1} is read
        # from the scratch in the iteration itself: prefetched too, it spilled registers)
        p = L - 1 - (t0 + steps - 1) if REVERSE else t0 + steps - 1
        u0, dl0, B0, C0, dy0, z0 = _load_back(p, True, u_ptr, delta_ptr, B_ptr, C_ptr, dout_ptr, z_ptr, row, dt_row,
                                              bc_row, do_row, z_row, su_l, sdt_l, sB_l, sdo_l, sz_l, mask_d, mask_n,
                                              HAS_Z)
        u1, dl1, B1, C1, dy1, z1 = _load_back(p - step, steps > 1, u_ptr, delta_ptr, B_ptr, C_ptr, dout_ptr, z_ptr,
                                              row, dt_row, bc_row, do_row, z_row, su_l, sdt_l, sB_l, sdo_l, sz_l,
                                              mask_d, mask_n, HAS_Z)
        for jj in range(0, steps, 2):
            j = steps - 1 - jj
            cu0, cd0, cB0, cC0, cy0, cz0 = u0, dl0, B0, C0, dy0, z0
            cu1, cd1, cB1, cC1, cy1, cz1 = u1, dl1, B1, C1, dy1, z1
            ch0 = tl.load(scratch + j * BLOCK_D * BLOCK_N)
            ch1 = tl.load(scratch + tl.maximum(j - 1, 0) * BLOCK_D * BLOCK_N)
            u0, dl0, B0, C0, dy0, z0 = _load_back(p - 2 * step, j >= 2, u_ptr, delta_ptr, B_ptr, C_ptr, dout_ptr,
                                                  z_ptr, row, dt_row, bc_row, do_row, z_row, su_l, sdt_l, sB_l, sdo_l,
                                                  sz_l, mask_d, mask_n, HAS_Z)
            u1, dl1, B1, C1, dy1, z1 = _load_back(p - 3 * step, j >= 3, u_ptr, delta_ptr, B_ptr, C_ptr, dout_ptr,
                                                  z_ptr, row, dt_row, bc_row, do_row, z_row, su_l, sdt_l, sB_l, sdo_l,
                                                  sz_l, mask_d, mask_n, HAS_Z)
            mu, dA_acc, dD_acc, dbias_acc = _step_back(mu, dA_acc, dD_acc, dbias_acc, p, True, cu0, cd0, cB0, cC0, cy0,
                                                       cz0, ch0, A, A2, Dd, bias, dB_ptr, du_ptr, ddelta_ptr, part,
                                                       g_row, so_l, mask_d, mask_n, N, HAS_D, HAS_Z, SOFTPLUS)
            mu, dA_acc, dD_acc, dbias_acc = _step_back(mu, dA_acc, dD_acc, dbias_acc, p - step, j >= 1, cu1, cd1, cB1,
                                                       cC1, cy1, cz1, ch1, A, A2, Dd, bias, dB_ptr, du_ptr, ddelta_ptr,
                                                       part, g_row, so_l, mask_d, mask_n, N, HAS_D, HAS_Z, SOFTPLUS)
            p -= 2 * step
    tl.atomic_add(dAt_ptr + n[:, None] * dim + d[None, :], dA_acc, mask=mask_nd)
    if HAS_D:
        tl.atomic_add(dD_ptr + d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + d, dbias_acc, mask=mask_d)


# ---------------------------------------------------------------------------------------------------------
# launch wrappers, with the signatures of triton_scan's (plain scans only: hw must be None)
# ---------------------------------------------------------------------------------------------------------
def _config(dim, N, channels_per_group):
    """32 channels per program on one warp, each thread holding the N states of one channel, forward and
    backward (from a sweep on an H100, BENCHMARKS.md)."""
    block_d, warps = 32, 1
    block_d = min(block_d, triton.next_power_of_2(dim))
    if channels_per_group % dim:
        block_d = min(block_d, channels_per_group & -channels_per_group)
    return dict(BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(N), CHUNK=CHUNK, num_warps=warps)


def _flags(D, z, delta_bias, delta_softplus, reverse):
    return dict(REVERSE=reverse, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=delta_softplus)


@triton.jit
def _transpose_kernel(x_ptr, y_ptr, X, Y, sx_b, sx_x, sx_y, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr):
    """y[b, j, i] = x[b, i, j] for x (batch, X, Y) at any strides and y a dense (batch, Y, X): one
    (BLOCK_X, BLOCK_Y) tile per program, read along x's rows and written along y's (Triton turns the tile
    round in shared memory)."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
    j = tl.program_id(2) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    mask = (i[:, None] < X) & (j[None, :] < Y)
    tile = tl.load(x_ptr + b * sx_b + i[:, None] * sx_x + j[None, :] * sx_y, mask=mask)
    tl.store(y_ptr + b * X * Y + j[None, :] * X + i[:, None], tile, mask=mask)


def transposed(x):
    """x (batch, X, Y) -> a dense (batch, Y, X) copy of x.transpose(1, 2); about 5x the speed of PyTorch's
    ``x.transpose(1, 2).contiguous()`` on an H100 (2.6-2.9 TB/s, BENCHMARKS.md)."""
    batch, X, Y = x.shape
    y = torch.empty(batch, Y, X, device=x.device, dtype=x.dtype)
    grid = (batch, triton.cdiv(X, 64), triton.cdiv(Y, 64))
    _transpose_kernel[grid](x, y, X, Y, *x.stride(), BLOCK_X=64, BLOCK_Y=64, num_warps=4)
    return y


def channels_last(t):
    """A (batch, dim, L) tensor with its channels contiguous at each position, which a step reads as one run:
    t itself where they are (e.g. a transposed view of a (batch, L, dim) activation), else a copy laid out so.
    mamba_ssm's contiguous (batch, dim, L) scans faster copied so, forward and backward (BENCHMARKS.md)."""
    return t if t is None or t.stride(1) == 1 else transposed(t).transpose(1, 2)


def states_last(B, C):
    """B and C (batch, G, N, L) sharing strides with their N states contiguous at each position: the inputs as
    they are where they already do (e.g. views of one (batch, L, 2N) projection), else copies laid out so."""
    if B.stride(2) == 1 and B.stride() == C.stride():
        return B, C
    return [t.transpose(2, 3).contiguous().transpose(2, 3) for t in (B, C)]


def _strides(u, delta, z, B, out):
    return (*u.stride(), *delta.stride(), *(z.stride() if z is not None else (0, 0, 0)), *B.stride(),
            *out.stride())


def _dense_like(t, dtype=None):
    """An empty dense tensor of t's shape whose dimensions are laid out in the order of t's strides (t itself
    may have gaps, e.g. one half of a projection's channels)."""
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    out = torch.empty([t.shape[i] for i in order], device=t.device, dtype=dtype or t.dtype)
    return out.permute([order.index(i) for i in range(t.dim())])


# A scan with fewer programs (batch x channel blocks) than SEGMENT_BELOW is split along the sequence into
# segments until there are about SEGMENT_TARGET programs, in the forward kernel's launches and the backward's
# (H100 sweep on channels-last inputs, which vssm.kernels.selective_scan always passes, BENCHMARKS.md: with
# 1536 programs one segment is best; with 384, 16 forward segments).
SEGMENT_BELOW = 1536
SEGMENT_TARGET = dict(forward=6144, backward=3072)


def _segments(programs, L, target):
    """Steps per segment: one segment for SEGMENT_BELOW programs or more, else enough segments for about
    ``target`` one-warp programs, each a whole number of the backward's chunks and at least 4 of them."""
    n_seg = 1 if programs >= SEGMENT_BELOW else min(triton.cdiv(target, programs), triton.cdiv(L, 4 * CHUNK))
    return triton.cdiv(triton.cdiv(L, max(n_seg, 1)), CHUNK) * CHUNK


def scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, hw=None, out_dtype=None,
             write_last=False, write_chunk_states=False):
    """Forward launch: every input at its own strides (B and C as ``states_last`` gives them); out dense, its
    dimensions in the order of u's strides.
    With ``write_chunk_states`` it writes only the states entering the backward's chunks."""
    assert hw is None, "the stepped kernels serve plain scans; the cross-scan uses triton_scan"
    batch, dim, L = u.shape
    G, N = B.shape[1], B.shape[2]
    cfg = _config(dim, N, dim // G)
    f32 = dict(device=u.device, dtype=torch.float32)
    out = last = states = None
    if write_chunk_states:
        states = torch.empty(batch, triton.cdiv(L, CHUNK), N, dim, **f32)
    else:
        out = _dense_like(u, out_dtype)
        last = torch.empty(batch, dim, N, **f32)
    seg_len = _segments(batch * triton.cdiv(dim, cfg["BLOCK_D"]), L, SEGMENT_TARGET["forward"])
    grid = (batch, triton.cdiv(dim, cfg["BLOCK_D"]), triton.cdiv(L, seg_len))
    seg_states = torch.empty(batch, grid[2], N, dim, **f32) if grid[2] > 1 else None
    seg_dt = torch.empty(batch, grid[2], dim, **f32) if grid[2] > 1 else None
    args = (u, delta, A.t().contiguous(), B, C, D, z, delta_bias, out, last, states, seg_states, seg_dt, dim, L,
            dim // G, seg_len, *_strides(u, delta, z, B, out if out is not None else u))
    flags = dict(N=N, **_flags(D, z, delta_bias, delta_softplus, reverse), **cfg)
    if grid[2] > 1:
        _scan_fwd_step_kernel[grid](*args, WRITE_OUT=False, WRITE_CHUNK_STATES=False, SUMMARY=True,
                                    COMPOSE=False, **flags)
    _scan_fwd_step_kernel[grid](*args, WRITE_OUT=out is not None, WRITE_CHUNK_STATES=write_chunk_states,
                                SUMMARY=False, COMPOSE=grid[2] > 1, **flags)
    return out, last, states


def scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, hw=None):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); du, ddelta and dz laid out like the forward's
    out, dB and dC with their N states contiguous. dout may have any strides."""
    assert hw is None, "the stepped kernels serve plain scans; the cross-scan uses triton_scan"
    batch, dim, L = u.shape
    G, N = B.shape[1], B.shape[2]
    cfg = _config(dim, N, dim // G)
    _, _, states = scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, write_chunk_states=True)
    dout = channels_last(dout)
    blocks = triton.cdiv(dim, cfg["BLOCK_D"])
    seg_len = _segments(batch * blocks, L, SEGMENT_TARGET["backward"])
    grid = (batch, blocks, triton.cdiv(L, seg_len))
    f32 = dict(device=u.device, dtype=torch.float32)
    scratch = torch.empty(batch * blocks * grid[2] * CHUNK * cfg["BLOCK_D"] * cfg["BLOCK_N"], **f32)
    seg_mu = torch.empty(batch, grid[2], N, dim, **f32) if grid[2] > 1 else None
    seg_dt = torch.empty(batch, grid[2], dim, **f32) if grid[2] > 1 else None
    du, ddelta = _dense_like(u), _dense_like(u, delta.dtype)
    dAt = torch.zeros(N, dim, **f32)
    dB_parts = torch.empty(batch, blocks, L, N, **f32)
    dC_parts = torch.empty(batch, blocks, L, N, **f32)
    dD = torch.zeros(D.shape, **f32) if D is not None else None
    dz = _dense_like(u, z.dtype) if z is not None else None
    dbias = torch.zeros(delta_bias.shape, **f32) if delta_bias is not None else None
    At = A.t().contiguous()
    flags = _flags(D, z, delta_bias, delta_softplus, reverse)
    if grid[2] > 1:
        _scan_bwd_summary_kernel[grid](delta, At, C, z, delta_bias, dout, seg_mu, seg_dt, dim, L, dim // G, seg_len,
                                       *u.stride()[:2], *delta.stride(),
                                       *(z.stride() if z is not None else (0, 0, 0)), *B.stride(), *dout.stride(),
                                       N=N, REVERSE=reverse, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                                       SOFTPLUS=delta_softplus, BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"],
                                       num_warps=cfg["num_warps"])
    _scan_bwd_step_kernel[grid](u, delta, At, B, C, D, z, delta_bias, dout, dlast, states, scratch, seg_mu, seg_dt,
                                du, ddelta, dAt, dB_parts, dC_parts, dD, dz, dbias, dim, L, dim // G, seg_len,
                                *_strides(u, delta, z, B, du), *dout.stride(), N=N, HAS_DLAST=dlast is not None,
                                COMPOSE=grid[2] > 1, **flags, **cfg)
    # programs of one group are consecutive along dim (a block never straddles two groups)
    dB = dB_parts.view(batch, G, blocks // G, L, N).sum(2).transpose(2, 3)
    dC = dC_parts.view(batch, G, blocks // G, L, N).sum(2).transpose(2, 3)
    return du, ddelta, dAt.t(), dB, dC, dD, dz, dbias
