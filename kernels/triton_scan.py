"""Triton selective scan: one kernel for the forward, one for the backward.

Both kernels serve the plain scan (one direction, forward or ``reverse``) and VMamba's fused cross-scan
(four directions over a (H, W) map, read in row-major, column-major and both reversed orders straight from
the map by index arithmetic, their outputs summed into one map). Shapes, for ``K`` directions (1 or 4),
``G`` groups of B/C and ``dim`` channels of u, with every position written as a (row, column) pair of the
map (a plain scan is a 1 x L map):

    u, z, out     (batch, dim, H, W)          u is shared by the K directions; out is their sum
    delta         (batch, K, dim, H, W)       scan channel c = k * dim + d
    A             (K * dim, N)                D, delta_bias: (K * dim,)
    B, C          (batch, G, N, H, W)         scan channel c reads group c // (K * dim // G)

Every tensor is read at its own strides (B and C share theirs; out, z and the gradient of u take u's), so a
channels-last map (channels contiguous at each pixel) is read as whole runs of channels per position, and
the column-major directions cost what the row-major ones do.

A program owns one batch row, one direction k and BLOCK_D channels, and walks the sequence in chunks of
BLOCK_L positions (a loop pipelined NUM_STAGES deep), keeping the (BLOCK_D, N) state in float32 registers.
Inside a chunk the linear recurrence h_t = a_t h_{t-1} + b_t is an associative scan over the pairs
(a_t, b_t) along the chunk; the state entering the chunk is added as (prod a) * h_in. The K directions
run as separate programs and add their outputs into out atomically (so the order of the four-term sum, and
its last float32 bit, varies between runs).
Gradients (backward kernel), with lam_t = dL/dh_t:

    lam_t      = C_t dy_t + a_{t+1} lam_{t+1}          (a reverse associative scan over (a_{t+1}, C_t dy_t))
    du_t       = sum_n lam_t dt_t B_t + D dy_t                          (summed over directions atomically)
    ddt_t      = sum_n lam_t B_t u_t + A lam_t (h_t - dt_t B_t u_t)     (h_t - b_t = a_t h_{t-1})
    dA         = sum_t dt_t lam_t (h_t - dt_t B_t u_t)
    dB_t, dC_t = sum_d lam_t dt_t u_t,  sum_d h_t dy_t                   (partial sums per program)

dB and dC are written as one partial sum per program, (batch, K * programs along dim, N, H * W), then
summed over each group's programs: cheaper than atomic adds of every program to the same addresses.
The backward does not read stored per-position states: a forward pass of the same kernel first writes
only the state entering each chunk, (batch, K * dim, L / BLOCK_L, N), and the backward recomputes the
states inside each chunk from it, so nothing of size (batch, dim, L, N) is ever stored.
"""
import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _combine(a1, b1, a2, b2):
    # apply (a1, b1) then (a2, b2):  h -> a2 * (a1 * h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _map_position(t, k, L, H, W, CROSS: tl.constexpr, REVERSE: tl.constexpr):
    """(row, column) of the map visited at scan step t of direction k (cross-scan) or of the plain scan."""
    if CROSS:
        t = tl.where(k >= 2, L - 1 - t, t)
        column_major = k % 2 == 1
        return tl.where(column_major, t % H, t // W), tl.where(column_major, t // H, t % W)
    if REVERSE:
        t = L - 1 - t
    return t * 0, t


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    out_ptr, last_ptr, chunk_state_ptr,
    dim, L, H, W, N, channels_per_group,
    su_b, su_d, su_h, su_w, sdt_b, sdt_k, sdt_d, sdt_h, sdt_w, sbc_b, sbc_g, sbc_n, sbc_h, sbc_w,
    CROSS: tl.constexpr, REVERSE: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    WRITE_OUT: tl.constexpr, WRITE_LAST: tl.constexpr, WRITE_CHUNK_STATES: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """out (+)= scan_k(u, ...) (* silu(z)); optionally the last state (batch, K*dim, N) and the state entering
    every chunk (batch, K*dim, n_chunks, N), which the backward starts from."""
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    K = tl.num_programs(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    s = tl.arange(0, BLOCK_L)
    mask_d, mask_n = d < dim, n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    n_chunks = tl.cdiv(L, BLOCK_L)
    c = k * dim + d  # scan channel
    g = (k * dim + tl.program_id(2) * BLOCK_D) // channels_per_group  # one group per program

    A = tl.load(A_ptr + c[:, None] * N + n[None, :], mask=mask_dn, other=0.0).to(tl.float32) * LOG2E
    if HAS_D:
        Dk = tl.load(D_ptr + c, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c, mask=mask_d, other=0.0).to(tl.float32)
    u_rows = b * su_b + d[:, None] * su_d  # also out's and z's
    delta_rows = delta_ptr + b * sdt_b + k * sdt_k + d[:, None] * sdt_d
    bc_rows = b * sbc_b + g * sbc_g + n[:, None] * sbc_n
    state_rows = (b * K * dim + c[:, None]) * N + n[None, :]
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for chunk in tl.range(0, n_chunks, num_stages=NUM_STAGES):
        t = chunk * BLOCK_L + s
        mask_t = t < L
        row, col = _map_position(t, k, L, H, W, CROSS, REVERSE)
        u_pos = (row * su_h + col * su_w)[None, :]
        mask_dt = mask_d[:, None] & mask_t[None, :]
        mask_nt = mask_n[:, None] & mask_t[None, :]
        if WRITE_CHUNK_STATES:
            tl.store(chunk_state_ptr + (b * K * dim + c[:, None]) * n_chunks * N + chunk * N + n[None, :],
                     h, mask=mask_dn)
        u = tl.load(u_ptr + u_rows + u_pos, mask=mask_dt, other=0.0).to(tl.float32)
        dt = tl.load(delta_rows + (row * sdt_h + col * sdt_w)[None, :], mask=mask_dt, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt += bias[:, None]
        if SOFTPLUS:
            dt = _softplus(dt)
        bc_pos = (row * sbc_h + col * sbc_w)[None, :]
        Bt = tl.load(B_ptr + bc_rows + bc_pos, mask=mask_nt, other=0.0).to(tl.float32)
        a = tl.exp2(dt[:, None, :] * A[:, :, None])
        a = tl.where(mask_t[None, None, :], a, 1.0)  # padding positions carry the state through
        bu = (dt * u)[:, None, :] * Bt[None, :, :]
        a_cum, h_local = tl.associative_scan((a, bu), axis=2, combine_fn=_combine)
        hs = h_local + a_cum * h[:, :, None]
        h = tl.sum(tl.where(s[None, None, :] == BLOCK_L - 1, hs, 0.0), axis=2)
        if WRITE_OUT:
            Ct = tl.load(C_ptr + bc_rows + bc_pos, mask=mask_nt, other=0.0).to(tl.float32)
            y = tl.sum(hs * Ct[None, :, :], axis=1)
            if HAS_D:
                y += Dk[:, None] * u
            if HAS_Z:
                zt = tl.load(z_ptr + u_rows + u_pos, mask=mask_dt, other=0.0).to(tl.float32)
                y *= zt * tl.sigmoid(zt)
            if CROSS:  # the four directions' programs sum into out
                tl.atomic_add(out_ptr + u_rows + u_pos, y, mask=mask_dt, sem="relaxed")
            else:
                tl.store(out_ptr + u_rows + u_pos, y, mask=mask_dt)
    if WRITE_LAST:
        tl.store(last_ptr + state_rows, h, mask=mask_dn)


@triton.jit
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, dlast_ptr, chunk_state_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr,
    dim, L, H, W, N, channels_per_group,
    su_b, su_d, su_h, su_w, sdt_b, sdt_k, sdt_d, sdt_h, sdt_w, sbc_b, sbc_g, sbc_n, sbc_h, sbc_w,
    sg_b, sg_d, sg_h, sg_w,
    CROSS: tl.constexpr, REVERSE: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Gradients of the forward kernel's out (and last state), walking the chunks from the end. du and dz
    take u's strides, ddelta delta's; dout is read at its own (sg_*)."""
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    K = tl.num_programs(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    s = tl.arange(0, BLOCK_L)
    mask_d, mask_n = d < dim, n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    n_chunks = tl.cdiv(L, BLOCK_L)
    c = k * dim + d
    g = (k * dim + tl.program_id(2) * BLOCK_D) // channels_per_group

    A = tl.load(A_ptr + c[:, None] * N + n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    A2 = A * LOG2E
    if HAS_D:
        Dk = tl.load(D_ptr + c, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c, mask=mask_d, other=0.0).to(tl.float32)
    u_rows = b * su_b + d[:, None] * su_d  # also du's, z's and dz's
    delta_rows = b * sdt_b + k * sdt_k + d[:, None] * sdt_d  # also ddelta's
    bc_rows = b * sbc_b + g * sbc_g + n[:, None] * sbc_n
    g_rows = b * sg_b + d[:, None] * sg_d
    part_rows = (((b * K + k) * tl.num_programs(2) + tl.program_id(2)) * N + n[:, None]) * H * W  # dB/dC partials
    lam = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # dL/dh at the first step of the later chunk
    if HAS_DLAST:
        dlast = tl.load(dlast_ptr + (b * K * dim + c[:, None]) * N + n[None, :], mask=mask_dn, other=0.0)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in tl.range(0, n_chunks, num_stages=NUM_STAGES):
        chunk = n_chunks - 1 - i
        t = chunk * BLOCK_L + s
        mask_t = t < L
        mask_next = t + 1 < L
        row, col = _map_position(t, k, L, H, W, CROSS, REVERSE)
        row_next, col_next = _map_position(t + 1, k, L, H, W, CROSS, REVERSE)
        u_pos = (row * su_h + col * su_w)[None, :]
        dt_pos = (row * sdt_h + col * sdt_w)[None, :]
        bc_pos = (row * sbc_h + col * sbc_w)[None, :]
        mask_dt = mask_d[:, None] & mask_t[None, :]
        mask_nt = mask_n[:, None] & mask_t[None, :]

        # recompute this chunk's states from the state entering it
        u = tl.load(u_ptr + u_rows + u_pos, mask=mask_dt, other=0.0).to(tl.float32)
        dt_raw = tl.load(delta_ptr + delta_rows + dt_pos, mask=mask_dt, other=0.0).to(tl.float32)
        dt_next = tl.load(delta_ptr + delta_rows + (row_next * sdt_h + col_next * sdt_w)[None, :],
                          mask=mask_d[:, None] & mask_next[None, :], other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt_raw += bias[:, None]
            dt_next += bias[:, None]
        if SOFTPLUS:
            dt = _softplus(dt_raw)
            dt_next = _softplus(dt_next)
        else:
            dt = dt_raw
        Bt = tl.load(B_ptr + bc_rows + bc_pos, mask=mask_nt, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bc_rows + bc_pos, mask=mask_nt, other=0.0).to(tl.float32)
        h_in = tl.load(chunk_state_ptr + (b * K * dim + c[:, None]) * n_chunks * N + chunk * N + n[None, :],
                       mask=mask_dn, other=0.0)
        a = tl.where(mask_t[None, None, :], tl.exp2(dt[:, None, :] * A2[:, :, None]), 1.0)
        bu = (dt * u)[:, None, :] * Bt[None, :, :]
        a_cum, h_local = tl.associative_scan((a, bu), axis=2, combine_fn=_combine)
        hs = h_local + a_cum * h_in[:, :, None]

        dy = tl.load(dout_ptr + g_rows + (row * sg_h + col * sg_w)[None, :], mask=mask_dt, other=0.0).to(tl.float32)
        if HAS_Z:
            zt = tl.load(z_ptr + u_rows + u_pos, mask=mask_dt, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zt)
            y = tl.sum(hs * Ct[None, :, :], axis=1)
            if HAS_D:
                y += Dk[:, None] * u
            tl.store(dz_ptr + u_rows + u_pos, dy * y * sig * (1.0 + zt * (1.0 - sig)), mask=mask_dt)
            dy = dy * zt * sig

        # lam_t = C_t dy_t + a_{t+1} lam_{t+1}, the chunk's end continuing into lam of the later chunk
        a_next = tl.where(mask_next[None, None, :], tl.exp2(dt_next[:, None, :] * A2[:, :, None]), 0.0)
        c_dy = Ct[None, :, :] * dy[:, None, :]
        if HAS_DLAST:
            c_dy += tl.where(t[None, None, :] == L - 1, dlast[:, :, None], 0.0)
        a_rev, lam_local = tl.associative_scan((a_next, c_dy), axis=2, combine_fn=_combine, reverse=True)
        lam_t = lam_local + a_rev * lam[:, :, None]
        lam = tl.sum(tl.where(s[None, None, :] == 0, lam_t, 0.0), axis=2)

        lam_dt = lam_t * dt[:, None, :]
        map_pos = (row * W + col)[None, :]
        tl.store(dB_ptr + part_rows + map_pos, tl.sum(lam_dt * u[:, None, :], axis=0), mask=mask_nt)
        tl.store(dC_ptr + part_rows + map_pos, tl.sum(hs * dy[:, None, :], axis=0), mask=mask_nt)

        du = tl.sum(lam_dt * Bt[None, :, :], axis=1)
        if HAS_D:
            du += Dk[:, None] * dy
            dD_acc += tl.sum(dy * u, axis=1)
        if CROSS:  # u is shared by the four directions
            tl.atomic_add(du_ptr + u_rows + u_pos, du, mask=mask_dt, sem="relaxed")
        else:
            tl.store(du_ptr + u_rows + u_pos, du, mask=mask_dt)

        lam_ah = lam_t * (hs - bu)  # lam_t * a_t * h_{t-1}
        dA_acc += tl.sum(lam_ah * dt[:, None, :], axis=2)
        ddt = tl.sum(lam_t * Bt[None, :, :] * u[:, None, :] + lam_ah * A[:, :, None], axis=1)
        if SOFTPLUS:
            ddt *= tl.sigmoid(dt_raw)
        ddt = tl.where(mask_dt, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(ddelta_ptr + delta_rows + dt_pos, ddt, mask=mask_dt)

    tl.atomic_add(dA_ptr + c[:, None] * N + n[None, :], dA_acc, mask=mask_dn)
    if HAS_D:
        tl.atomic_add(dD_ptr + c, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + c, dbias_acc, mask=mask_d)


# ---------------------------------------------------------------------------------------------------------
# launch wrappers (inputs validated; see vssm.kernels.selective_scan)
# ---------------------------------------------------------------------------------------------------------
def _config(dim, N, L, channels_per_group, channels_last=False, backward=False, rows=1):
    """Block sizes, from sweeps on an H100 (BENCHMARKS.md); rows = batch * K, the programs per channel block.
    Positions contiguous (plain scans, channels-first maps): long chunks of few channels where N is small
    (N = 1: 2 x 512 forward, 4 x 256 backward); 4 x 32 / 16 x 16 at N = 16, where plain scans use the
    stepped kernels anyway. Channels contiguous (channels-last maps): short chunks of a run of channels, so
    every position's load is whole sectors (forward 32 x 16, 2 warps; backward 16 x 8, 1 warp: 168 registers
    per thread against 255 at 16 x 16, 19-28% faster at VMamba's 14x14 and 7x7 stages), with the
    chunk loop software-pipelined 3 deep (NUM_STAGES: later chunks' loads in flight while one is scanned;
    20-25% faster at VMamba's shapes). The scan is latency-bound, so where that leaves too few programs to
    fill the GPU (small batches of large maps) the channel runs are halved, down to 8, until there are about
    1024 forward / 512 backward programs: 2.4x faster forward at batch 8 of 256 x 256."""
    block_n = triton.next_power_of_2(N)
    stages = 1
    if channels_last:
        (block_d, min_programs), block_l, stages = ((16, 512) if backward else (32, 1024)), 8 if backward else 16, 3
        while block_d > 8 and rows * triton.cdiv(dim, block_d) < min_programs:
            block_d //= 2
        warps = 2 if block_d >= 16 and not backward else 1
        block_l = max(8, block_l // block_n)
    elif block_n >= 8:
        (block_d, block_l), warps = ((16, 16) if backward else (4, 32)), 4
    else:
        (block_d, block_l), warps = ((4, 256 // block_n) if backward else (2, 512 // block_n)), 4
    block_l = min(block_l, max(16, triton.next_power_of_2(L)))
    block_d = min(block_d, triton.next_power_of_2(dim))
    if channels_per_group % dim:  # several groups per direction: a block must not straddle two
        block_d = min(block_d, channels_per_group & -channels_per_group)
    return dict(BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=block_l, NUM_STAGES=stages, num_warps=warps)


def _as_maps(u, delta, B, C, z, hw):
    """A plain scan's (batch, dim, L) tensors as views of a 1 x L map (u, z: (batch, dim, 1, L); delta:
    (batch, 1, dim, 1, L); B, C: (batch, G, N, 1, L)); the cross-scan's are maps already."""
    if hw is not None:
        return u, delta, B, C, z
    return (u.unsqueeze(2), delta.unsqueeze(1).unsqueeze(3), B.unsqueeze(3), C.unsqueeze(3),
            None if z is None else z.unsqueeze(2))


def _launch_args(u, delta, B, C, z):
    """(batch, dim, L, H, W, K, G, N) and the strides that the kernels take."""
    batch, dim, H, W = u.shape
    K, G, N = delta.shape[1], B.shape[1], B.shape[2]
    assert C.stride() == B.stride() and (z is None or z.stride() == u.stride())
    strides = (*u.stride(), *delta.stride(), *B.stride())
    return (batch, dim, H * W, H, W, K, G, N), strides


def _flags(D, z, delta_bias, delta_softplus, reverse, hw):
    return dict(CROSS=hw is not None, REVERSE=reverse, HAS_D=D is not None, HAS_Z=z is not None,
                HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus)


def _like(t, dtype=None, zero=False):
    """An empty tensor with t's shape and strides (t is dense: its elements fill their span)."""
    out = torch.empty_strided(t.shape, t.stride(), device=t.device, dtype=dtype or t.dtype)
    return out.zero_() if zero else out


def scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, hw=None, out_dtype=None,
             write_last=False, write_chunk_states=False):
    """Launch the forward kernel. ``hw=(H, W)`` selects the four-direction cross-scan: u (batch, dim, H, W),
    delta (batch, 4, dim, H, W), B and C (batch, 4, N, H, W), any strides (u and delta dense); out then has
    u's strides. With ``write_chunk_states`` it writes only the states entering the backward's chunks."""
    shape_u = u.shape
    u, delta, B, C, z = _as_maps(u, delta, B, C, z, hw)
    (batch, dim, L, H, W, K, G, N), strides = _launch_args(u, delta, B, C, z)
    cfg = _config(dim, N, L, K * dim // G, channels_last=hw is not None and u.stride(1) == 1,
                  backward=write_chunk_states, rows=batch * K)
    n_chunks = triton.cdiv(L, cfg["BLOCK_L"])
    out = None if write_chunk_states else _like(u, out_dtype or u.dtype, zero=hw is not None)
    last = torch.empty(batch, K * dim, N, device=u.device, dtype=torch.float32) if write_last else None
    states = torch.empty(batch, K * dim, n_chunks, N, device=u.device, dtype=torch.float32) \
        if write_chunk_states else None
    grid = (batch, K, triton.cdiv(dim, cfg["BLOCK_D"]))
    _selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, out, last, states, dim, L, H, W, N, K * dim // G, *strides,
        WRITE_OUT=out is not None, WRITE_LAST=write_last, WRITE_CHUNK_STATES=write_chunk_states,
        **_flags(D, z, delta_bias, delta_softplus, reverse, hw), **cfg)
    return (None if out is None else out.view(shape_u)), last, states


def scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, hw=None):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), shaped and strided like the inputs (dB, dC
    contiguous); recomputes the chunk states first. dout may have any strides."""
    shapes = u.shape, delta.shape, B.shape
    _, _, states = scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, hw,
                            write_chunk_states=True)
    u, delta, B, C, z = _as_maps(u, delta, B, C, z, hw)
    dout = dout if hw is not None else dout.unsqueeze(2)
    (batch, dim, L, H, W, K, G, N), strides = _launch_args(u, delta, B, C, z)
    cfg = _config(dim, N, L, K * dim // G, channels_last=hw is not None and u.stride(1) == 1, backward=True,
                  rows=batch * K)
    f32 = dict(device=u.device, dtype=torch.float32)
    du = _like(u, torch.float32, zero=True) if hw is not None else _like(u)
    ddelta = _like(delta)
    dA = torch.zeros(A.shape, **f32)
    grid = (batch, K, triton.cdiv(dim, cfg["BLOCK_D"]))
    dB_parts = torch.empty(batch, K * grid[2], N, L, **f32)
    dC_parts = torch.empty(batch, K * grid[2], N, L, **f32)
    dD = torch.zeros(D.shape, **f32) if D is not None else None
    dz = _like(z) if z is not None else None
    dbias = torch.zeros(delta_bias.shape, **f32) if delta_bias is not None else None
    _selective_scan_bwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, dout, dlast, states,
        du, ddelta, dA, dB_parts, dC_parts, dD, dz, dbias, dim, L, H, W, N, K * dim // G, *strides,
        *dout.stride(), HAS_DLAST=dlast is not None, **_flags(D, z, delta_bias, delta_softplus, reverse, hw),
        **cfg)
    # each group's programs are a run of equal length in (direction, block) order
    dB = dB_parts.view(batch, G, K * grid[2] // G, N, L).sum(2).view(shapes[2])
    dC = dC_parts.view(batch, G, K * grid[2] // G, N, L).sum(2).view(shapes[2])
    dz = None if dz is None else dz.view(shapes[0])
    return du.to(u.dtype).view(shapes[0]), ddelta.view(shapes[1]), dA, dB, dC, dD, dz, dbias
