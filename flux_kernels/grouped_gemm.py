"""Grouped GEMMs over (token, group) pairs sorted by group (ScatterMoE-style).

Pairs p in [offsets[g], offsets[g+1]) belong to group g.  Two kernels:

* ``grouped_mm``:    C[p, :] = A[row(p), :] @ B[g(p)]        (rows of A gathered on load)
  with fused epilogues (GLU forward, GLU backward, per-row scale).  The (group, m-tile) of a
  program comes from a tile table built on device with torch (no host sync): its length is the
  static bound cdiv(P, BLOCK_M) + G, programs past the real tile count exit at once.
* ``grouped_wgrad``: C[g] = sum_{p in g} A[row_a(p), :]^T (x) B[row_b(p), :]   (weight gradients),
  one program per (group, output tile) reducing over the group's pairs: no float atomics.

B is addressed through explicit strides B[g][n, k] = b + g*stride_bg + n*stride_bn + k*stride_bk,
so W and W^T cost the same.  Indices are widened to int64 before multiplying by strides.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from flux_kernels._common import INTERPRET, act_fwd, act_fwd_bwd, cdiv, dot_precision, round_to

BLOCK_M = 64  # rows (pairs) per tile; fixed because the tile table depends on it

EPI_STORE = 0      # C = acc
EPI_ROW_SCALE = 1  # C = acc * scale[p]
EPI_GLU_FWD = 2    # acc = gate half, acc2 = up half: C = pre_act (both halves), D = f(gate)*up
EPI_GLU_BWD = 3    # acc = grad of act: C = d pre_act, D = act (optional), F = rowsum(acc*act)

ACTIVATIONS = {"silu": 0, "gelu": 1}


def tile_table(group_offsets: torch.Tensor, g0: int, g1: int, num_pairs: int) -> torch.Tensor:
    """int32 [3, cdiv(num_pairs, BLOCK_M) + G_s]: (local group or -1, first row, row end) per tile
    of the groups g0..g1-1 (one stack).  Pure torch on device, no host synchronisation."""
    dev = group_offsets.device
    lo, hi = group_offsets[g0:g1], group_offsets[g0 + 1 : g1 + 1]
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    last = tiles.cumsum(0)  # inclusive: tile t belongs to the first group with last > t
    t = torch.arange(cdiv(num_pairs, BLOCK_M) + (g1 - g0), device=dev)
    g = torch.searchsorted(last, t, right=True)
    valid = g < (g1 - g0)
    g = g.clamp(max=g1 - g0 - 1)
    start = lo[g] + (t - (last[g] - tiles[g])) * BLOCK_M
    return torch.stack((torch.where(valid, g, -1), start, hi[g])).to(torch.int32)


@triton.jit
def _grouped_mm_kernel(
    a_ptr, a_rows_ptr, stride_am, stride_ak,   # A [*, K]; row(p) = a_rows[p] if GATHER_A else p
    b_ptr, stride_bg, stride_bn, stride_bk,    # B[g] [N, K] (+ N more rows at glu_off for GLU_FWD)
    c_ptr, stride_cm,                          # C [P, *] (unit column stride)
    d_ptr, stride_dm,                          # act [P, N] (GLU epilogues)
    pre_ptr, stride_pm,                        # pre_act [P, 2N] (GLU_BWD input)
    scale_ptr,                                 # fp32 [P] per-pair scale (ROW_SCALE, GLU_BWD)
    f_ptr, stride_f,                           # fp32 [n_tiles, P] partial row sums (GLU_BWD)
    table_ptr, table_len,                      # tile table [3, table_len]
    N, K, glu_off,
    EPI: tl.constexpr, GATHER_A: tl.constexpr, ACT: tl.constexpr, STORE_D: tl.constexpr,
    STORE_F: tl.constexpr, CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.load(table_ptr + pid_m)
    if g < 0:  # past the last real tile
        return
    start = tl.load(table_ptr + table_len + pid_m)
    end = tl.load(table_ptr + 2 * table_len + pid_m)
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    rows = offs_m.to(tl.int64)
    if GATHER_A:
        rows = tl.load(a_rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + g.to(tl.int64) * stride_bg + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if CAST_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if EPI == 2:  # the up half: same A tile, B rows shifted by glu_off
            b2 = tl.load(b_ptrs + glu_off * stride_bn, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if CAST_F32:
                b2 = b2.to(tl.float32)
            acc2 = tl.dot(a, b2, acc2, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    pm = offs_m.to(tl.int64)[:, None]
    n = offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    c_ty = c_ptr.dtype.element_ty
    if EPI == 0:
        tl.store(c_ptr + pm * stride_cm + n, round_to(acc, c_ty), mask=mask)
    elif EPI == 1:
        s = tl.load(scale_ptr + offs_m, mask=mask_m, other=0.0)
        tl.store(c_ptr + pm * stride_cm + n, round_to(acc * s[:, None], c_ty), mask=mask)
    elif EPI == 2:
        gate = round_to(acc, c_ty)
        up = round_to(acc2, c_ty)
        tl.store(c_ptr + pm * stride_cm + n, gate, mask=mask)
        tl.store(c_ptr + pm * stride_cm + glu_off + n, up, mask=mask)
        # act from the stored (rounded) pre_act, as the backward will see it
        act = act_fwd(gate.to(tl.float32), ACT) * up.to(tl.float32)
        tl.store(d_ptr + pm * stride_dm + n, round_to(act, d_ptr.dtype.element_ty), mask=mask)
    else:  # ordered so that acc, f and up die early (this epilogue is the register-heavy one)
        s = tl.load(scale_ptr + offs_m, mask=mask_m, other=0.0)
        gate = tl.load(pre_ptr + pm * stride_pm + n, mask=mask, other=0.0).to(tl.float32)
        f, df = act_fwd_bwd(gate, ACT)
        up = tl.load(pre_ptr + pm * stride_pm + glu_off + n, mask=mask, other=0.0).to(tl.float32)
        act = round_to(f * up, d_ptr.dtype.element_ty)
        if STORE_F:  # d loss / d pair_weight, partial over this N tile (summed in torch)
            part = tl.sum(tl.where(mask, acc * act.to(tl.float32), 0.0), axis=1)
            tl.store(f_ptr + pid_n * stride_f + offs_m, part, mask=mask_m)
        if STORE_D:
            tl.store(d_ptr + pm * stride_dm + n, act, mask=mask)
        d_act = acc * s[:, None]
        tl.store(c_ptr + pm * stride_cm + glu_off + n, round_to(d_act * f, c_ty), mask=mask)
        tl.store(c_ptr + pm * stride_cm + n, round_to(d_act * up * df, c_ty), mask=mask)


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr, a_rows_ptr, stride_am, stride_an,   # A [*, N]; row_a(p) = a_rows[p] if GATHER_A else p
    scale_ptr,                                 # fp32 [P] scale of A's rows (SCALE_A)
    b_ptr, b_rows_ptr, stride_bm, stride_bk,   # B [*, M]; row_b(p) likewise
    c_ptr, stride_cg, stride_cn, stride_cm,    # C[g] [N, M]
    offsets_ptr, group_base,                   # pairs of local group g: offsets[base+g : base+g+1]
    N, M,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, SCALE_A: tl.constexpr, CAST_F32: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    g = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_n = tl.program_id(1) // num_m
    pid_m = tl.program_id(1) % num_m
    lo = tl.load(offsets_ptr + group_base + g)
    hi = tl.load(offsets_ptr + group_base + g + 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for p0 in range(lo, hi, BLOCK_P):  # an empty group leaves acc = 0 (its gradient is zero)
        p = p0 + tl.arange(0, BLOCK_P)
        mask_p = p < hi
        ra = p
        rb = p
        if GATHER_A:
            ra = tl.load(a_rows_ptr + p, mask=mask_p, other=0)
        if GATHER_B:
            rb = tl.load(b_rows_ptr + p, mask=mask_p, other=0)
        a = tl.load(a_ptr + ra.to(tl.int64)[None, :] * stride_am + offs_n[:, None] * stride_an,
                    mask=mask_n[:, None] & mask_p[None, :], other=0.0)  # A^T tile [BLOCK_N, BLOCK_P]
        b = tl.load(b_ptr + rb.to(tl.int64)[:, None] * stride_bm + offs_m[None, :] * stride_bk,
                    mask=mask_p[:, None] & mask_m[None, :], other=0.0)  # [BLOCK_P, BLOCK_M]
        if CAST_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if SCALE_A:  # scale in fp32, back to the operand dtype (tensor cores on CUDA)
            s = tl.load(scale_ptr + p, mask=mask_p, other=0.0)
            a = round_to(a.to(tl.float32) * s[None, :], b.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    c_ptrs = c_ptr + g.to(tl.int64) * stride_cg + offs_n[:, None] * stride_cn + offs_m[None, :] * stride_cm
    tl.store(c_ptrs, round_to(acc, c_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


# ----------------------------------------------------------------------------- configs
# Interpreter: one big fixed tile (its cost is per operation).  CUDA: a few autotuned configs;
# every kernel overwrites (never accumulates into) its outputs, so re-running for tuning is safe.
_MM_FIXED = dict(BLOCK_N=64, BLOCK_K=64)
_WG_FIXED = dict(BLOCK_N=64, BLOCK_M=64, BLOCK_P=64)
MIN_BLOCK_N = 64  # smallest BLOCK_N of any config (sizes the GLU_BWD partial-sum buffer)

if INTERPRET:
    _mm_kernel, _wg_kernel = _grouped_mm_kernel, _grouped_wgrad_kernel
else:
    _mm_kernel = triton.autotune(
        configs=[  # checked on sm_90 compiles: no spills except 4 warps with the GLU_BWD epilogue
            triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=8, num_stages=3),
        ],
        key=["N", "K", "EPI", "GATHER_A"],
        # GLU_BWD partial sums: a config with a bigger BLOCK_N writes fewer rows of f, so rows
        # left by slower configs must be cleared before the chosen one runs
        reset_to_zero=["f_ptr"],
    )(_grouped_mm_kernel)
    _wg_kernel = triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_P": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_P": 32}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_P": 32}, num_warps=8, num_stages=3),
        ],
        key=["N", "M", "GATHER_A", "GATHER_B"],
    )(_grouped_wgrad_kernel)


def grouped_mm(a, a_rows, b, b_strides, c, table, n, k, *, epi=EPI_STORE, d=None, pre=None,
               scale=None, f=None, glu_off=0, activation="silu"):
    """C[p, :n] = A[row(p)] @ B[g(p)] (+ epilogue) for the tiles of ``table`` (one stack).

    a: [*, k] any strides; a_rows: int32 [P] gather index or None (identity); b: [G_s, ...] with
    ``b_strides`` = (stride_g, stride_n, stride_k); c: [P, *] unit column stride; d/pre/scale/f:
    epilogue operands (see the EPI_* constants).  fp32 accumulation; same dtype for a and b.
    """
    store_d, store_f = d is not None, f is not None
    d = c if d is None else d  # unused pointer slots get c (never the tile table: see reset_to_zero)
    pre = c if pre is None else pre
    grid = lambda meta: (table.shape[1], triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    fixed = _MM_FIXED if INTERPRET else {}
    _mm_kernel[grid](
        a, a_rows if a_rows is not None else table, a.stride(0), a.stride(1),
        b, *b_strides,
        c, c.stride(0), d, d.stride(0), pre, pre.stride(0),
        scale if scale is not None else c, f if store_f else c, f.stride(0) if store_f else 0,
        table, table.shape[1], n, k, glu_off,
        EPI=epi, GATHER_A=a_rows is not None, ACT=ACTIVATIONS[activation],
        STORE_D=store_d, STORE_F=store_f,
        CAST_F32=INTERPRET, PRECISION=dot_precision(a.dtype), BLOCK_M=BLOCK_M, **fixed,
    )


def grouped_wgrad(a, a_rows, b, b_rows, c, group_offsets, group_base, *, scale=None):
    """C[g] = sum over the pairs p of group (group_base + g) of (scale[p] * A[row_a(p)])^T (x) B[row_b(p)].

    a: [*, N], b: [*, M] (any strides, same dtype); a_rows/b_rows: int32 [P] or None (identity);
    c: [G_s, N, M] (any strides), fully overwritten (empty groups get 0).
    """
    num_groups, n, m = c.shape
    grid = lambda meta: (num_groups, triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(m, meta["BLOCK_M"]))  # noqa: E731
    fixed = _WG_FIXED if INTERPRET else {}
    _wg_kernel[grid](
        a, a_rows if a_rows is not None else group_offsets, a.stride(0), a.stride(1),
        scale if scale is not None else a,
        b, b_rows if b_rows is not None else group_offsets, b.stride(0), b.stride(1),
        c, c.stride(0), c.stride(1), c.stride(2),
        group_offsets, group_base, n, m,
        GATHER_A=a_rows is not None, GATHER_B=b_rows is not None, SCALE_A=scale is not None,
        CAST_F32=INTERPRET, PRECISION=dot_precision(a.dtype), **fixed,
    )
