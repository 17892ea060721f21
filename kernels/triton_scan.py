"""Triton selective scan: one kernel for the forward, one for the backward.

Both kernels serve the plain scan (one direction, forward or ``reverse``) and VMamba's fused cross-scan
(four directions over a (H, W) map, read in row-major, column-major and both reversed orders straight from
the map by index arithmetic, their outputs summed into one row-major map). Shapes, for ``K`` directions
(1 or 4), ``G`` groups of B/C and ``dim`` channels of u:

    u, z, out     (batch, dim, L)          u is shared by the K directions; out is their sum
    delta         (batch, K * dim, L)      scan channel c = k * dim + d, in row-major position order
    A             (K * dim, N)             D, delta_bias: (K * dim,)
    B, C          (batch, G, N, L)         scan channel c reads group c // (K * dim // G)

A program owns one batch row and BLOCK_D channels and walks the sequence in chunks of BLOCK_L positions,
keeping the (BLOCK_D, N) state in float32 registers. Inside a chunk the linear recurrence
h_t = a_t h_{t-1} + b_t is an associative scan over the pairs (a_t, b_t) along the chunk; the state entering
the chunk is added as (prod a) * h_in. Gradients (backward kernel), with lam_t = dL/dh_t:

    lam_t      = C_t dy_t + a_{t+1} lam_{t+1}          (a reverse associative scan over (a_{t+1}, C_t dy_t))
    du_t       = sum_n lam_t dt_t B_t + D dy_t
    ddt_t      = sum_n lam_t B_t u_t + A lam_t (h_t - dt_t B_t u_t)     (h_t - b_t = a_t h_{t-1})
    dA         = sum_t dt_t lam_t (h_t - dt_t B_t u_t)
    dB_t, dC_t = sum_d lam_t dt_t u_t,  sum_d h_t dy_t                   (partial sums per program)

dB and dC are written as one partial sum per program and direction, (batch, K * programs along dim, N, L),
then summed over each group's programs: cheaper than atomic adds of every program to the same addresses.
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
def _position(t, L, H, W, k: tl.constexpr, CROSS: tl.constexpr, REVERSE: tl.constexpr):
    """Row-major memory position visited at scan step t (direction k of the cross-scan, or the plain scan)."""
    if CROSS:
        if k >= 2:
            t = L - 1 - t
        if k % 2 == 1:
            t = (t % H) * W + t // H
    elif REVERSE:
        t = L - 1 - t
    return t


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    out_ptr, last_ptr, chunk_state_ptr,
    dim, L, H, W, N, G, channels_per_group,
    K: tl.constexpr, CROSS: tl.constexpr, REVERSE: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    WRITE_OUT: tl.constexpr, WRITE_LAST: tl.constexpr, WRITE_CHUNK_STATES: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """out = sum_k scan_k(u, ...) (* silu(z)); optionally the last state of each direction (batch, K*dim, N)
    and the state entering every chunk (batch, K*dim, n_chunks, N), which the backward starts from."""
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    s = tl.arange(0, BLOCK_L)
    mask_d, mask_n = d < dim, n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    n_chunks = tl.cdiv(L, BLOCK_L)
    row = (b * dim + d[:, None]) * L  # offset of (b, d) rows in u, z and out

    for k in tl.static_range(K):
        c = k * dim + d  # scan channel
        g = (k * dim + tl.program_id(1) * BLOCK_D) // channels_per_group  # one group per program
        A = tl.load(A_ptr + c[:, None] * N + n[None, :], mask=mask_dn, other=0.0).to(tl.float32) * LOG2E
        if HAS_D:
            Dk = tl.load(D_ptr + c, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + c, mask=mask_d, other=0.0).to(tl.float32)
        delta_row = delta_ptr + (b * K * dim + c[:, None]) * L
        B_row = B_ptr + ((b * G + g) * N + n[:, None]) * L
        C_row = C_ptr + ((b * G + g) * N + n[:, None]) * L
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for chunk in range(n_chunks):
            t = chunk * BLOCK_L + s
            mask_t = t < L
            p = _position(t, L, H, W, k, CROSS, REVERSE)[None, :]
            mask_dt = mask_d[:, None] & mask_t[None, :]
            mask_nt = mask_n[:, None] & mask_t[None, :]
            if WRITE_CHUNK_STATES:
                tl.store(chunk_state_ptr + ((b * K * dim + c[:, None]) * n_chunks + chunk) * N + n[None, :],
                         h, mask=mask_dn)
            u = tl.load(u_ptr + row + p, mask=mask_dt, other=0.0).to(tl.float32)
            dt = tl.load(delta_row + p, mask=mask_dt, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += bias[:, None]
            if SOFTPLUS:
                dt = _softplus(dt)
            Bt = tl.load(B_row + p, mask=mask_nt, other=0.0).to(tl.float32)
            a = tl.exp2(dt[:, None, :] * A[:, :, None])
            a = tl.where(mask_t[None, None, :], a, 1.0)  # padding positions carry the state through
            bu = (dt * u)[:, None, :] * Bt[None, :, :]
            a_cum, h_local = tl.associative_scan((a, bu), axis=2, combine_fn=_combine)
            hs = h_local + a_cum * h[:, :, None]
            h = tl.sum(tl.where(s[None, None, :] == BLOCK_L - 1, hs, 0.0), axis=2)
            if WRITE_OUT:
                Ct = tl.load(C_row + p, mask=mask_nt, other=0.0).to(tl.float32)
                y = tl.sum(hs * Ct[None, :, :], axis=1)
                if HAS_D:
                    y += Dk[:, None] * u
                if k > 0:  # cross-scan: add to the directions before (written by this program)
                    y += tl.load(out_ptr + row + p, mask=mask_dt, other=0.0).to(tl.float32)
                if HAS_Z:
                    zt = tl.load(z_ptr + row + p, mask=mask_dt, other=0.0).to(tl.float32)
                    y *= zt * tl.sigmoid(zt)
                tl.store(out_ptr + row + p, y, mask=mask_dt)
        if WRITE_LAST:
            tl.store(last_ptr + (b * K * dim + c[:, None]) * N + n[None, :], h, mask=mask_dn)
        if K > 1:
            tl.debug_barrier()  # the next direction reads what this one stored


@triton.jit
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, dlast_ptr, chunk_state_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr,
    dim, L, H, W, N, G, channels_per_group,
    K: tl.constexpr, CROSS: tl.constexpr, REVERSE: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Gradients of the forward kernel's out (and last state), walking the chunks from the end."""
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    s = tl.arange(0, BLOCK_L)
    mask_d, mask_n = d < dim, n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    n_chunks = tl.cdiv(L, BLOCK_L)
    row = (b * dim + d[:, None]) * L

    for k in tl.static_range(K):
        c = k * dim + d
        g = (k * dim + tl.program_id(1) * BLOCK_D) // channels_per_group
        A = tl.load(A_ptr + c[:, None] * N + n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
        A2 = A * LOG2E
        if HAS_D:
            Dk = tl.load(D_ptr + c, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + c, mask=mask_d, other=0.0).to(tl.float32)
        delta_row = (b * K * dim + c[:, None]) * L
        BC_row = ((b * G + g) * N + n[:, None]) * L
        part_row = (((b * K + k) * tl.num_programs(1) + tl.program_id(1)) * N + n[:, None]) * L  # dB/dC partials
        lam = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # dL/dh at the first step of the later chunk
        if HAS_DLAST:
            dlast = tl.load(dlast_ptr + (b * K * dim + c[:, None]) * N + n[None, :], mask=mask_dn, other=0.0)
        dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for i in range(n_chunks):
            chunk = n_chunks - 1 - i
            t = chunk * BLOCK_L + s
            mask_t = t < L
            mask_next = t + 1 < L
            p = _position(t, L, H, W, k, CROSS, REVERSE)[None, :]
            p_next = _position(t + 1, L, H, W, k, CROSS, REVERSE)[None, :]
            mask_dt = mask_d[:, None] & mask_t[None, :]
            mask_nt = mask_n[:, None] & mask_t[None, :]

            # recompute this chunk's states from the state entering it
            u = tl.load(u_ptr + row + p, mask=mask_dt, other=0.0).to(tl.float32)
            dt_raw = tl.load(delta_ptr + delta_row + p, mask=mask_dt, other=0.0).to(tl.float32)
            dt_next = tl.load(delta_ptr + delta_row + p_next, mask=mask_d[:, None] & mask_next[None, :],
                              other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt_raw += bias[:, None]
                dt_next += bias[:, None]
            if SOFTPLUS:
                dt = _softplus(dt_raw)
                dt_next = _softplus(dt_next)
            else:
                dt = dt_raw
            Bt = tl.load(B_ptr + BC_row + p, mask=mask_nt, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + BC_row + p, mask=mask_nt, other=0.0).to(tl.float32)
            h_in = tl.load(chunk_state_ptr + ((b * K * dim + c[:, None]) * n_chunks + chunk) * N + n[None, :],
                           mask=mask_dn, other=0.0)
            a = tl.where(mask_t[None, None, :], tl.exp2(dt[:, None, :] * A2[:, :, None]), 1.0)
            bu = (dt * u)[:, None, :] * Bt[None, :, :]
            a_cum, h_local = tl.associative_scan((a, bu), axis=2, combine_fn=_combine)
            hs = h_local + a_cum * h_in[:, :, None]

            dy = tl.load(dout_ptr + row + p, mask=mask_dt, other=0.0).to(tl.float32)
            if HAS_Z:
                zt = tl.load(z_ptr + row + p, mask=mask_dt, other=0.0).to(tl.float32)
                sig = tl.sigmoid(zt)
                y = tl.sum(hs * Ct[None, :, :], axis=1)
                if HAS_D:
                    y += Dk[:, None] * u
                tl.store(dz_ptr + row + p, dy * y * sig * (1.0 + zt * (1.0 - sig)), mask=mask_dt)
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
            dB = tl.sum(lam_dt * u[:, None, :], axis=0)
            dC = tl.sum(hs * dy[:, None, :], axis=0)
            tl.store(dB_ptr + part_row + p, dB, mask=mask_nt)
            tl.store(dC_ptr + part_row + p, dC, mask=mask_nt)

            du = tl.sum(lam_dt * Bt[None, :, :], axis=1)
            if HAS_D:
                du += Dk[:, None] * dy
                dD_acc += tl.sum(dy * u, axis=1)
            if k > 0:
                du += tl.load(du_ptr + row + p, mask=mask_dt, other=0.0)
            tl.store(du_ptr + row + p, du, mask=mask_dt)

            lam_ah = lam_t * (hs - bu)  # lam_t * a_t * h_{t-1}
            dA_acc += tl.sum(lam_ah * dt[:, None, :], axis=2)
            ddt = tl.sum(lam_t * Bt[None, :, :] * u[:, None, :] + lam_ah * A[:, :, None], axis=1)
            if SOFTPLUS:
                ddt *= tl.sigmoid(dt_raw)
            ddt = tl.where(mask_dt, ddt, 0.0)
            dbias_acc += tl.sum(ddt, axis=1)
            tl.store(ddelta_ptr + delta_row + p, ddt, mask=mask_dt)

        tl.atomic_add(dA_ptr + c[:, None] * N + n[None, :], dA_acc, mask=mask_dn)
        if HAS_D:
            tl.atomic_add(dD_ptr + c, dD_acc, mask=mask_d)
        if HAS_BIAS:
            tl.atomic_add(dbias_ptr + c, dbias_acc, mask=mask_d)
        if K > 1:
            tl.debug_barrier()  # the next direction adds to the du this one stored


# ---------------------------------------------------------------------------------------------------------
# launch wrappers (inputs validated and contiguous; see vssm.kernels.selective_scan)
# ---------------------------------------------------------------------------------------------------------
def _config(dim, N, L, channels_per_group, backward=False):
    """Block sizes, from a sweep on an H100 (BENCHMARKS.md): long chunks of few channels where N is small
    (VMamba's N = 1: 2 x 512 forward, 4 x 256 backward); 4 x 32 / 16 x 16 at N = 16, where plain scans use
    the stepped kernels anyway."""
    block_n = triton.next_power_of_2(N)
    if block_n >= 8:
        block_d, block_l = (16, 16) if backward else (4, 32)
    else:
        block_d, block_l = (4, 256 // block_n) if backward else (2, 512 // block_n)
    block_l = min(block_l, max(16, triton.next_power_of_2(L)))
    block_d = min(block_d, triton.next_power_of_2(dim))
    if channels_per_group % dim:  # several groups per direction: a block must not straddle two
        block_d = min(block_d, channels_per_group & -channels_per_group)
    return dict(BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=block_l, num_warps=4)


def _geometry(u, delta, B, hw):
    batch, dim, L = u.shape
    K = delta.shape[1] // dim
    G, N = B.shape[1], B.shape[2]
    H, W = hw if hw is not None else (1, L)
    return batch, dim, L, K, G, N, H, W


def scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, hw=None, out_dtype=None,
             write_last=False, write_chunk_states=False):
    """Launch the forward kernel. ``hw=(H, W)`` selects the four-direction cross-scan over an H x W map.
    With ``write_chunk_states`` it writes only the states entering the backward's chunks."""
    batch, dim, L, K, G, N, H, W = _geometry(u, delta, B, hw)
    cfg = _config(dim, N, L, K * dim // G, backward=write_chunk_states)
    n_chunks = triton.cdiv(L, cfg["BLOCK_L"])
    out = torch.empty(batch, dim, L, device=u.device, dtype=out_dtype or u.dtype) if not write_chunk_states \
        else None
    last = torch.empty(batch, K * dim, N, device=u.device, dtype=torch.float32) if write_last else None
    states = torch.empty(batch, K * dim, n_chunks, N, device=u.device, dtype=torch.float32) \
        if write_chunk_states else None
    grid = (batch, triton.cdiv(dim, cfg["BLOCK_D"]))
    _selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, out, last, states,
        dim, L, H, W, N, G, K * dim // G,
        K=K, CROSS=hw is not None, REVERSE=reverse,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        WRITE_OUT=out is not None, WRITE_LAST=write_last, WRITE_CHUNK_STATES=write_chunk_states, **cfg)
    return out, last, states


def scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, hw=None):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); recomputes the chunk states first."""
    batch, dim, L, K, G, N, H, W = _geometry(u, delta, B, hw)
    cfg = _config(dim, N, L, K * dim // G, backward=True)
    _, _, states = scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, hw,
                            write_chunk_states=True)
    f32 = dict(device=u.device, dtype=torch.float32)
    du = torch.empty(u.shape, device=u.device, dtype=torch.float32 if K > 1 else u.dtype)
    ddelta = torch.empty_like(delta)
    dA = torch.zeros(A.shape, **f32)
    grid = (batch, triton.cdiv(dim, cfg["BLOCK_D"]))
    dB_parts = torch.empty(batch, K * grid[1], N, L, **f32)
    dC_parts = torch.empty(batch, K * grid[1], N, L, **f32)
    dD = torch.zeros(D.shape, **f32) if D is not None else None
    dz = torch.empty_like(z) if z is not None else None
    dbias = torch.zeros(delta_bias.shape, **f32) if delta_bias is not None else None
    _selective_scan_bwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, dout, dlast, states,
        du, ddelta, dA, dB_parts, dC_parts, dD, dz, dbias,
        dim, L, H, W, N, G, K * dim // G,
        K=K, CROSS=hw is not None, REVERSE=reverse,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_DLAST=dlast is not None, **cfg)
    # each group's programs are a run of equal length in (direction, block) order
    dB = dB_parts.view(batch, G, K * grid[1] // G, N, L).sum(2)
    dC = dC_parts.view(batch, G, K * grid[1] // G, N, L).sum(2)
    return du.to(u.dtype), ddelta, dA, dB, dC, dD, dz, dbias
