"""Triton selective scan, stepped: one position per loop iteration, the state in registers.

For large states (N = 16, Vim and DiffuSSM) this beats the chunked associative scan of ``triton_scan``:
each program owns BLOCK_D channels x N states of one batch row, and the only serial dependency between
steps is one multiply-add per state element; each step's inputs are loaded one iteration ahead, so their
latency overlaps the previous step's arithmetic. The chunked kernels stay in use for N < 8 and for the fused
cross-scan, where the per-step work is too small.

Plain scans only (one direction, forward or ``reverse``); shapes as in ``triton_scan`` with K = 1:
u, delta, z, out (batch, dim, L); A (dim, N); B, C (batch, G, N, L); D, delta_bias (dim,).

Forward, at step t (position p = t, or L - 1 - t when reversed):

    h = exp(dt_t A) * h + dt_t u_t B_t          y_t = <C_t, h> + D u_t          out_t = y_t * silu(z_t)

Backward walks the steps from the last, with mu = a_{t+1} lam_{t+1} carried from the step after:

    lam = C_t dy_t + mu;   du_t = <lam, dt_t B_t> + D dy_t;   ddt_t = <lam, B_t u_t> + <A, lam a_t h_{t-1}>
    dA += dt_t lam a_t h_{t-1};   dB_t, dC_t += sum_d lam dt_t u_t, h_t dy_t;   mu = a_t lam

dB and dC are written as one partial sum per program, (batch, programs along dim, N, L), and summed over the
programs afterwards: atomic adds of 48 programs to the same address every step were the backward's
bottleneck (BENCHMARKS.md).

h_{t-1} is needed in reverse order: the forward pass of the backward writes the state entering every
CHUNK-step chunk, (batch, dim, L / CHUNK, N); each chunk is then re-run forward into a per-program scratch of
CHUNK states (small enough to stay in L2) and walked backward. No (batch, dim, L, N) tensor is stored.
"""
import torch
import triton
import triton.language as tl

from .triton_scan import LOG2E, _softplus

CHUNK = 16


@triton.jit
def _load_step(u_ptr, delta_ptr, B_ptr, row, bc_row, p, mask_d, mask_n):
    """u_t, delta_t and B_t at position p, as stored. The kernels load a step's inputs one iteration ahead
    (software prefetch: the loads of step t+1 are in flight while step t computes)."""
    return (tl.load(u_ptr + row + p, mask=mask_d, other=0.0), tl.load(delta_ptr + row + p, mask=mask_d, other=0.0),
            tl.load(B_ptr + bc_row + p, mask=mask_n, other=0.0))


@triton.jit
def _program_tile(A_ptr, D_ptr, bias_ptr, dim, L, N, channels_per_group,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """This program's batch row b, channels d and states n with their masks, the row offsets of u/z/out
    and of its B/C group, and its channels' float32 A (dim, N), D and delta_bias (zeros where absent)."""
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    mask_d, mask_n = d < dim, n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    g = tl.program_id(1) * BLOCK_D // channels_per_group
    row = (b * dim + d) * L
    bc_row = ((b * tl.cdiv(dim, channels_per_group) + g) * N + n) * L
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    Dd = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dd = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    return b, d, n, mask_d, mask_n, mask_dn, row, bc_row, A, Dd, bias


@triton.jit
def _time_step(delta, bias, SOFTPLUS: tl.constexpr):
    """dt before the softplus (delta + bias) and after it, in float32."""
    dt_raw = delta.to(tl.float32) + bias
    return dt_raw, (_softplus(dt_raw) if SOFTPLUS else dt_raw)


@triton.jit
def _scan_fwd_step_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, chunk_state_ptr,
    dim, L, N, channels_per_group,
    REVERSE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, WRITE_OUT: tl.constexpr, WRITE_CHUNK_STATES: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    """out (batch, dim, L) and the last state (batch, dim, N); or only the chunk-entry states."""
    b, d, n, mask_d, mask_n, mask_dn, row, bc_row, A, Dd, bias = _program_tile(
        A_ptr, D_ptr, bias_ptr, dim, L, N, channels_per_group, BLOCK_D, BLOCK_N, HAS_D, HAS_BIAS)
    A = A * LOG2E
    state_row = (b * dim + d[:, None]) * tl.cdiv(L, CHUNK)
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    p = tl.full((), 0, tl.int32) + (L - 1 if REVERSE else 0)  # a tensor: it is carried through the loop
    nu, nd, nB = _load_step(u_ptr, delta_ptr, B_ptr, row, bc_row, p, mask_d, mask_n)
    nC, nz = nB, nu  # placeholders where C or z is not read
    if WRITE_OUT:
        nC = tl.load(C_ptr + bc_row + p, mask=mask_n, other=0.0)
        if HAS_Z:
            nz = tl.load(z_ptr + row + p, mask=mask_d, other=0.0)
    for t in range(L):
        if WRITE_CHUNK_STATES:
            if t % CHUNK == 0:
                tl.store(chunk_state_ptr + (state_row + t // CHUNK) * N + n[None, :], h, mask=mask_dn)
        u, delta, Bt, Ct, zt = nu.to(tl.float32), nd, nB.to(tl.float32), nC.to(tl.float32), nz.to(tl.float32)
        q = L - 2 - t if REVERSE else t + 1  # the next step's position
        more = t + 1 < L  # a scalar condition, applied with tl.where (Triton 3.9's interpreter turns bool & bool into int32)
        more_d, more_n = tl.where(more, mask_d, False), tl.where(more, mask_n, False)
        nu, nd, nB = _load_step(u_ptr, delta_ptr, B_ptr, row, bc_row, q, more_d, more_n)
        if WRITE_OUT:
            nC = tl.load(C_ptr + bc_row + q, mask=more_n, other=0.0)
            if HAS_Z:
                nz = tl.load(z_ptr + row + q, mask=more_d, other=0.0)
        _, dt = _time_step(delta, bias, SOFTPLUS)
        h = tl.exp2(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
        if WRITE_OUT:
            y = tl.sum(h * Ct[None, :], axis=1)
            if HAS_D:
                y += Dd * u
            if HAS_Z:
                y *= zt * tl.sigmoid(zt)
            tl.store(out_ptr + row + p, y, mask=mask_d)
        p = q
    if WRITE_OUT:
        tl.store(last_ptr + (b * dim + d[:, None]) * N + n[None, :], h, mask=mask_dn)


@triton.jit
def _scan_bwd_step_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, dlast_ptr, chunk_state_ptr,
    scratch_ptr, du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr,
    dim, L, N, channels_per_group,
    REVERSE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_DLAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    """Gradients of the stepped forward, from the chunk-entry states; scratch holds one chunk's states."""
    b, d, n, mask_d, mask_n, mask_dn, row, bc_row, A, Dd, bias = _program_tile(
        A_ptr, D_ptr, bias_ptr, dim, L, N, channels_per_group, BLOCK_D, BLOCK_N, HAS_D, HAS_BIAS)
    A2 = A * LOG2E
    n_chunks = tl.cdiv(L, CHUNK)
    state_row = (b * dim + d[:, None]) * n_chunks
    part_row = ((b * tl.num_programs(1) + tl.program_id(1)) * N + n) * L  # this program's dB, dC partials
    tile = d[:, None] * BLOCK_N + n[None, :] - tl.program_id(1) * BLOCK_D * BLOCK_N
    scratch = scratch_ptr + (b * tl.num_programs(1) + tl.program_id(1)) * CHUNK * BLOCK_D * BLOCK_N + tile

    mu = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # a_{t+1} * lam_{t+1}
    if HAS_DLAST:
        mu = tl.load(dlast_ptr + (b * dim + d[:, None]) * N + n[None, :], mask=mask_dn, other=0.0)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(n_chunks):
        chunk = n_chunks - 1 - i
        t0 = chunk * CHUNK
        steps = tl.minimum(CHUNK, L - t0)
        # re-run the chunk forward, keeping h_{t-1} of every step in the scratch
        h = tl.load(chunk_state_ptr + (state_row + chunk) * N + n[None, :], mask=mask_dn, other=0.0)
        p = L - 1 - t0 if REVERSE else t0
        nu, nd, nB = _load_step(u_ptr, delta_ptr, B_ptr, row, bc_row, p, mask_d, mask_n)
        for j in range(steps):
            tl.store(scratch + j * BLOCK_D * BLOCK_N, h)
            u, delta, Bt = nu.to(tl.float32), nd, nB.to(tl.float32)
            p = L - 2 - (t0 + j) if REVERSE else t0 + j + 1
            more = j + 1 < steps
            nu, nd, nB = _load_step(u_ptr, delta_ptr, B_ptr, row, bc_row, p, tl.where(more, mask_d, False),
                                    tl.where(more, mask_n, False))
            _, dt = _time_step(delta, bias, SOFTPLUS)
            h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt[None, :]
        # walk it backward
        p = L - 1 - (t0 + steps - 1) if REVERSE else t0 + steps - 1
        nu, nd, nB = _load_step(u_ptr, delta_ptr, B_ptr, row, bc_row, p, mask_d, mask_n)
        nC = tl.load(C_ptr + bc_row + p, mask=mask_n, other=0.0)
        ndy = tl.load(dout_ptr + row + p, mask=mask_d, other=0.0)
        nz = ndy  # placeholder where there is no z
        if HAS_Z:
            nz = tl.load(z_ptr + row + p, mask=mask_d, other=0.0)
        nh = tl.load(scratch + (steps - 1) * BLOCK_D * BLOCK_N)
        for jj in range(steps):
            j = steps - 1 - jj
            u, delta, Bt, Ct = nu.to(tl.float32), nd, nB.to(tl.float32), nC.to(tl.float32)
            dy, zt, h_prev = ndy.to(tl.float32), nz.to(tl.float32), nh
            q = L - 1 - (t0 + j - 1) if REVERSE else t0 + j - 1  # the next (earlier) step's position
            more_d, more_n = tl.where(j > 0, mask_d, False), tl.where(j > 0, mask_n, False)
            nu, nd, nB = _load_step(u_ptr, delta_ptr, B_ptr, row, bc_row, q, more_d, more_n)
            nC = tl.load(C_ptr + bc_row + q, mask=more_n, other=0.0)
            ndy = tl.load(dout_ptr + row + q, mask=more_d, other=0.0)
            if HAS_Z:
                nz = tl.load(z_ptr + row + q, mask=more_d, other=0.0)
            nh = tl.load(scratch + tl.maximum(j - 1, 0) * BLOCK_D * BLOCK_N)
            dt_raw, dt = _time_step(delta, bias, SOFTPLUS)
            a = tl.exp2(dt[:, None] * A2)
            a_h = a * h_prev
            h = a_h + (dt * u)[:, None] * Bt[None, :]
            if HAS_Z:
                sig = tl.sigmoid(zt)
                y = tl.sum(h * Ct[None, :], axis=1)
                if HAS_D:
                    y += Dd * u
                tl.store(dz_ptr + row + p, dy * y * sig * (1.0 + zt * (1.0 - sig)), mask=mask_d)
                dy = dy * zt * sig
            lam = Ct[None, :] * dy[:, None] + mu
            lam = tl.where(mask_dn, lam, 0.0)
            lam_dt = lam * dt[:, None]
            tl.store(dB_ptr + part_row + p, tl.sum(lam_dt * u[:, None], axis=0), mask=mask_n)
            tl.store(dC_ptr + part_row + p, tl.sum(h * dy[:, None], axis=0), mask=mask_n)
            du = tl.sum(lam_dt * Bt[None, :], axis=1)
            if HAS_D:
                du += Dd * dy
                dD_acc += dy * u
            tl.store(du_ptr + row + p, du, mask=mask_d)
            lam_ah = lam * a_h
            dA_acc += lam_ah * dt[:, None]
            ddt = tl.sum(lam * Bt[None, :] * u[:, None] + lam_ah * A, axis=1)
            if SOFTPLUS:
                ddt *= tl.sigmoid(dt_raw)
            dbias_acc += tl.where(mask_d, ddt, 0.0)
            tl.store(ddelta_ptr + row + p, ddt, mask=mask_d)
            mu = a * lam
            p = q
    tl.atomic_add(dA_ptr + d[:, None] * N + n[None, :], dA_acc, mask=mask_dn)
    if HAS_D:
        tl.atomic_add(dD_ptr + d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + d, dbias_acc, mask=mask_d)


# ---------------------------------------------------------------------------------------------------------
# launch wrappers, with the signatures of triton_scan's (plain scans only: hw must be None)
# ---------------------------------------------------------------------------------------------------------
def _config(dim, N, channels_per_group, backward=False):
    """16 channels x N states per program on two warps forward, 32 backward (from a sweep on an H100,
    BENCHMARKS.md)."""
    block_d, warps = (32, 2) if backward else (16, 2)
    block_d = min(block_d, triton.next_power_of_2(dim))
    if channels_per_group % dim:
        block_d = min(block_d, channels_per_group & -channels_per_group)
    return dict(BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(N), CHUNK=CHUNK, num_warps=warps)


def _flags(D, z, delta_bias, delta_softplus, reverse):
    return dict(REVERSE=reverse, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=delta_softplus)


def scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, hw=None, out_dtype=None,
             write_last=False, write_chunk_states=False):
    assert hw is None, "the stepped kernels serve plain scans; the cross-scan uses triton_scan"
    batch, dim, L = u.shape
    G, N = B.shape[1], B.shape[2]
    cfg = _config(dim, N, dim // G)
    out = last = states = None
    if write_chunk_states:
        states = torch.empty(batch, dim, triton.cdiv(L, CHUNK), N, device=u.device, dtype=torch.float32)
    else:
        out = torch.empty(batch, dim, L, device=u.device, dtype=out_dtype or u.dtype)
        last = torch.empty(batch, dim, N, device=u.device, dtype=torch.float32)
    grid = (batch, triton.cdiv(dim, cfg["BLOCK_D"]))
    _scan_fwd_step_kernel[grid](u, delta, A, B, C, D, z, delta_bias, out, last, states, dim, L, N, dim // G,
                                WRITE_OUT=out is not None, WRITE_CHUNK_STATES=write_chunk_states,
                                **_flags(D, z, delta_bias, delta_softplus, reverse), **cfg)
    return out, last, states


def scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, hw=None):
    assert hw is None, "the stepped kernels serve plain scans; the cross-scan uses triton_scan"
    dout = dout.contiguous()  # read at u's (contiguous) offsets
    batch, dim, L = u.shape
    G, N = B.shape[1], B.shape[2]
    cfg = _config(dim, N, dim // G, backward=True)
    _, _, states = scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, write_chunk_states=True)
    grid = (batch, triton.cdiv(dim, cfg["BLOCK_D"]))
    scratch = torch.empty(batch * grid[1] * CHUNK * cfg["BLOCK_D"] * cfg["BLOCK_N"], device=u.device,
                          dtype=torch.float32)
    f32 = dict(device=u.device, dtype=torch.float32)
    du = torch.empty_like(u)
    ddelta = torch.empty_like(delta)
    dA = torch.zeros(A.shape, **f32)
    dB_parts = torch.empty(batch, grid[1], N, L, **f32)
    dC_parts = torch.empty(batch, grid[1], N, L, **f32)
    dD = torch.zeros(D.shape, **f32) if D is not None else None
    dz = torch.empty_like(z) if z is not None else None
    dbias = torch.zeros(delta_bias.shape, **f32) if delta_bias is not None else None
    _scan_bwd_step_kernel[grid](u, delta, A, B, C, D, z, delta_bias, dout, dlast, states, scratch,
                                du, ddelta, dA, dB_parts, dC_parts, dD, dz, dbias, dim, L, N, dim // G,
                                HAS_DLAST=dlast is not None, **_flags(D, z, delta_bias, delta_softplus, reverse),
                                **cfg)
    # programs of one group are consecutive along dim (a block never straddles two groups)
    dB = dB_parts.view(batch, G, grid[1] // G, N, L).sum(2)
    dC = dC_parts.view(batch, G, grid[1] // G, N, L).sum(2)
    return du, ddelta, dA, dB, dC, dD, dz, dbias
