"""The Triton kernels of :func:`coorkern.coor_attention` (device code only).

CUDA; CPU tensors only under ``TRITON_INTERPRET=1``, for the tests.  Launched, with their
buffers, grids and configurations, by ``launch``, and declared for ahead-of-time builds by
``aot`` (design notes: ``docs/design/coor_attention.md``).  The kernels:

* ``_sample_kernel``      -- bilinear sampling pre-pass of the key side (maps -> tokens;
                             why pre-sample rather than fuse there: see its docstring);
* ``_attn_fwd_kernel``    -- flash attention forward on sampled/plain tokens (why Q is
                             pre-sampled too: see its docstring); online softmax, saves
                             the log-sum-exp;
* ``_attn_bwd_dkv_kernel``/``_attn_bwd_dq_kernel`` -- flash-attention-2 backward split in
                             two passes (key-major for dK/dV, query-major for dQ) so no
                             gradient needs atomics and none is N x N;
* ``_scatter_kernel``     -- scatters d(sampled tokens) to a map through the bilinear
                             weights (fp32 atomics, or per-corner partials reduced by a
                             deterministic sort-based ``index_put_`` when
                             ``torch.are_deterministic_algorithms_enabled()``) and reduces
                             the coordinate gradient over d inside the program;
* ``_row_dot_kernel``     -- ``delta = rowsum(dO * O)`` of the backward.

Numerics: fp32 accumulation everywhere; exp2 with the scale folded into log2 e in fp32;
float64 (the interpreter's gradcheck) uses exp/log and a two-float scale so that results
match the float64 oracle to ~1e-15.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ---------------------------------------------------------------------------
# Triton device helpers


@triton.jit
def _bilinear_setup(cx, cy, height, width, ALIGN: tl.constexpr):
    """Top-left corner and weights of the bilinear stencil at normalized (cx, cy).

    grid_sample's unnormalization; the source index is clamped to [-2, size + 1] first
    so that coordinates far outside the map (legal; they sample zeros) cannot overflow
    the int32 corner index -- with all four corners outside, clamping changes nothing.
    A NaN coordinate gives NaN weights (the sample is NaN, as in grid_sample).
    """
    wf = tl.cast(width, cx.dtype)  # not .to(): a size of 1 arrives as a Python int (JIT specialization)
    hf = tl.cast(height, cx.dtype)
    if ALIGN:
        ix = (cx + 1.0) * 0.5 * (wf - 1.0)
        iy = (cy + 1.0) * 0.5 * (hf - 1.0)
    else:
        ix = ((cx + 1.0) * wf - 1.0) * 0.5
        iy = ((cy + 1.0) * hf - 1.0) * 0.5
    # NaN must survive the clamp (grid_sample samples NaN there): plain tl.minimum/maximum
    # lower to min.f32/max.f32, which return the other operand for a NaN.
    ix = tl.clamp(ix, -2.0, wf + 1.0, propagate_nan=tl.PropagateNan.ALL)
    iy = tl.clamp(iy, -2.0, hf + 1.0, propagate_nan=tl.PropagateNan.ALL)
    x0f = tl.floor(ix)
    y0f = tl.floor(iy)
    wx1 = ix - x0f  # NaN for a NaN coordinate: every weight below is NaN
    wy1 = iy - y0f
    # float -> int of NaN is undefined: send NaN stencils to a corner outside the map
    # (loads 0; 0 * NaN weight = NaN, as grid_sample).
    x0 = tl.where(ix == ix, x0f, -2.0).to(tl.int32)
    y0 = tl.where(iy == iy, y0f, -2.0).to(tl.int32)
    return x0, y0, 1.0 - wx1, wx1, 1.0 - wy1, wy1


@triton.jit
def _corner(base, x, y, height, width, sy, sx, sd, offs_d, row_mask, d_mask, ACC: tl.constexpr):
    """(BLOCK, BLOCK_D) rows of the map at integer pixels (x, y); zeros outside the map."""
    valid = row_mask & (x >= 0) & (x < width) & (y >= 0) & (y < height)
    off = y.to(tl.int64) * sy + x.to(tl.int64) * sx
    ptrs = base + off[:, None] + offs_d[None, :] * sd
    return tl.load(ptrs, mask=valid[:, None] & d_mask[None, :], other=0.0).to(ACC)


@triton.jit
def _bilinear_sample(base, sy, sx, sd, height, width, cx, cy, offs_d, row_mask, d_mask,
                     ALIGN: tl.constexpr, ACC: tl.constexpr):
    """Bilinearly sampled (BLOCK, BLOCK_D) tile: 4 row gathers of d contiguous channels."""
    x0, y0, wx0, wx1, wy0, wy1 = _bilinear_setup(cx, cy, height, width, ALIGN)
    # One corner at a time: only the accumulator and one gathered tile are live.
    acc = (wx0 * wy0)[:, None] * _corner(base, x0, y0, height, width, sy, sx, sd, offs_d, row_mask, d_mask, ACC)
    acc += (wx1 * wy0)[:, None] * _corner(base, x0 + 1, y0, height, width, sy, sx, sd, offs_d, row_mask, d_mask, ACC)
    acc += (wx0 * wy1)[:, None] * _corner(base, x0, y0 + 1, height, width, sy, sx, sd, offs_d, row_mask, d_mask, ACC)
    acc += (wx1 * wy1)[:, None] * _corner(base, x0 + 1, y0 + 1, height, width, sy, sx, sd, offs_d, row_mask, d_mask,
                                          ACC)
    return acc


@triton.jit
def _program(heads, n, d, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """(bh, b, h) of this program, its BLOCK rows of n, the channel offsets and both masks.

    The grid is 1-D: (B heads) cdiv(n, BLOCK) programs, the row blocks of one (batch, head)
    adjacent (they share K/V in L2).  A second grid axis for B heads would cap it at 65535.
    """
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(n, BLOCK)
    bh = pid // n_blocks
    offs = (pid - bh * n_blocks) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    return bh, (bh // heads).to(tl.int64), (bh % heads).to(tl.int64), offs, offs_d, offs < n, offs_d < d


@triton.jit
def _softmax_stats(lse_acc_ptr, delta_acc_ptr, rows, mask, ACC: tl.constexpr):
    """Saved lse (in _exp_of's units) and delta of query rows; padding rows get lse = +inf
    so that their probabilities are exactly 0."""
    lse = tl.load(lse_acc_ptr + rows, mask=mask, other=float("inf")).to(ACC)
    delta = tl.load(delta_acc_ptr + rows, mask=mask, other=0.0).to(ACC)
    return _exp_units(lse, ACC), delta


@triton.jit
def _coords(c_acc_ptr, b, h, offs, s_cb, s_ch, s_cn, s_cc, mask, ACC: tl.constexpr):
    """(x, y) of coordinates ``offs`` of (b, h) (s_ch = 0 when shared by the heads)."""
    base = c_acc_ptr + b * s_cb + h * s_ch + offs * s_cn
    return tl.load(base, mask=mask, other=0.0).to(ACC), tl.load(base + s_cc, mask=mask, other=0.0).to(ACC)


@triton.jit
def _tile(base, rows, offs_d, s_n, s_d, row_mask, d_mask):
    """(rows, BLOCK_D) tile of a token tensor; zeros outside."""
    return tl.load(base + rows[:, None] * s_n + offs_d[None, :] * s_d,
                   mask=row_mask[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _tile_t(base, rows, offs_d, s_n, s_d, row_mask, d_mask):
    """The same tile transposed, (BLOCK_D, rows): the B operand of A B^T products."""
    return tl.load(base + rows[None, :] * s_n + offs_d[:, None] * s_d,
                   mask=row_mask[None, :] & d_mask[:, None], other=0.0)


@triton.jit
def _exp_units(x, ACC: tl.constexpr):
    """x (natural-log units) -> the units _exp_of takes: base 2 in fp32 (exp2 is one MUFU
    op; the log2 e factor folds into the softmax scale), natural in fp64 (exact oracle
    comparisons: a rounded log2 e constant would cost 1e-8 relative)."""
    if ACC == tl.float64:
        return x
    else:
        return x * 1.4426950408889634


@triton.jit
def _exp_of(x, ACC: tl.constexpr):
    if ACC == tl.float64:
        return tl.exp(x)
    else:
        return tl.exp2(x)


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, ACC: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """tl.dot with ACC accumulation.  DOT_UPCAST (bf16 under the interpreter only, whose
    bf16 tl.dot returns garbage in triton 3.9) multiplies the same bf16-rounded values in fp32."""
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee", out_dtype=ACC)
    else:
        return tl.dot(a, b, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def _scale_of(scale_hi, scale_lo, ACC: tl.constexpr):
    """The softmax scale from two fp32 kernel arguments (hi + lo carries fp64 precision)."""
    return tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)


# ---------------------------------------------------------------------------
# Kernels.  Pointer arguments ending in ``_acc_ptr`` are fp32 (fp64 under the
# interpreter's gradcheck) accumulation/coordinate buffers, ``_idx_ptr`` int64;
# the others have the inputs' dtype.  All strides are in elements.


@triton.jit(do_not_specialize=["heads", "n_tok", "height", "width"])
def _sample_kernel(
    m_ptr, c_acc_ptr, out_ptr,
    heads, n_tok, height, width, d,
    s_mb, s_mh, s_my, s_mx, s_md,
    s_cb, s_ch, s_cn, s_cc,
    ALIGN: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Key-side pre-pass: tokens[b, h, n, :] = bilinear(map[b, h], coords[b, (h), n]).

    Why pre-sample the key side instead of fusing it into the attention loop: each of
    the ceil(Nq / BLOCK_M) query programs streams all N keys.  Fused, every key row
    costs 4 gathered rows (4 N d bytes per program and pass) plus 8 N d FLOPs of
    interpolation, and the gathers defeat the software pipelining of the K/V tile
    loads that feeds the tensor cores.  Pre-sampled, the pass reads 4 N d + 8 N bytes
    (corners + coords) and writes N d once (fp16: ~10 N d bytes in all, ~1 us at
    N d = 1e6 on an H100), after which each program reads N d contiguous bytes --
    4x fewer than fused from the first query block on.  Output is contiguous
    (B, heads, N, d) in the map dtype.
    """
    bh, b, h, offs_n, offs_d, n_mask, d_mask = _program(heads, n_tok, d, BLOCK, BLOCK_D)
    cx, cy = _coords(c_acc_ptr, b, h, offs_n, s_cb, s_ch, s_cn, s_cc, n_mask, ACC)
    m_base = m_ptr + b * s_mb + h * s_mh
    tile = _bilinear_sample(m_base, s_my, s_mx, s_md, height, width, cx, cy, offs_d, n_mask, d_mask, ALIGN, ACC)
    o_ptrs = out_ptr + bh.to(tl.int64) * n_tok * d + offs_n[:, None] * d + offs_d[None, :]
    tl.store(o_ptrs, tile.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=["heads", "n_q", "n_kv"])
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_acc_ptr,
    heads, n_q, n_kv, d, scale_hi, scale_lo,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Flash attention forward; one program = BLOCK_M queries of one (batch, head).

    For each BLOCK_N keys: S = Q K^T (2 BLOCK_M BLOCK_N d FLOPs, tensor cores), online
    softmax in base 2 (the scale folded into one multiply by scale*log2 e), O += P V (2
    BLOCK_M BLOCK_N d FLOPs).  Per program HBM/L2 traffic: 2 N d elements (K, V) + BLOCK_M d
    (Q) + BLOCK_M d out + BLOCK_M lse; per (b, h) 4 Nq N d FLOPs.  Stores O in the input
    dtype and lse = m + log(l) (natural log, fp32) for the backward.

    Q is a token tensor: for sample="qk" it is pre-sampled by ``_sample_kernel``.  Fusing
    the bilinear gather into the Q tile load was measured by the SASS (sm_90, bf16, d=64,
    BLOCK 128 x 64, 8 warps; triton 3.7.1 and 3.9 alike): the sampled tile lives in
    registers and Triton then waits for every HGMMA (static SASS: 8 HGMMA, 8
    ``WARPGROUP.DEPBAR`` waits) instead of pipelining the smem operand of a loaded tile (8
    HGMMA, 2 waits), so the S and O products no longer overlap the softmax.  Pre-sampling costs one
    launch and 2 Nq d elements of traffic (write the tokens, read them back; the 4 Nq d
    corner gathers are paid either way), against 2 N d elements streamed per query block:
    a fraction BLOCK_M / N of the forward's bytes (0.8% at N = 16384).
    """
    bh, b, h, offs_m, offs_d, m_mask, d_mask = _program(heads, n_q, d, BLOCK_M, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    q = _tile(q_ptr + b * s_qb + h * s_qh, offs_m, offs_d, s_qn, s_qd, m_mask, d_mask)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    qk_scale = _exp_units(_scale_of(scale_hi, scale_lo, ACC), ACC)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, n_kv, BLOCK_N):
        offs_n = start_n + offs_n0
        n_mask = offs_n < n_kv
        kt = _tile_t(k_base, offs_n, offs_d, s_kn, s_kd, n_mask, d_mask)
        s = _mm(q, kt, PRECISION, ACC, DOT_UPCAST) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: the first block holds key 0
        p = _exp_of(s - m_new[:, None], ACC)
        alpha = _exp_of(m_i - m_new, ACC)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = _tile(v_base, offs_n, offs_d, s_vn, s_vd, n_mask, d_mask)
        acc = acc * alpha[:, None] + _mm(p.to(vt.dtype), vt, PRECISION, ACC, DOT_UPCAST)
        m_i = m_new
    out = acc / l_i[:, None]
    o_ptrs = o_ptr + bh.to(tl.int64) * n_q * d + offs_m[:, None] * d + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    if ACC == tl.float64:
        lse = m_i + tl.log(l_i)
    else:
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log
    tl.store(lse_acc_ptr + bh.to(tl.int64) * n_q + offs_m, lse, mask=m_mask)


@triton.jit(do_not_specialize=["heads", "n_q", "n_kv"])
def _attn_bwd_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_acc_ptr, delta_acc_ptr, dk_acc_ptr, dv_grad_ptr,
    heads, n_q, n_kv, d, scale_hi, scale_lo,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of the (sampled) keys; one program = BLOCK_N keys, looping over all queries.

    Per query block: S^T = K Q^T, P^T = exp(S^T - lse) from the saved log-sum-exp (no
    softmax renormalization, no N x N buffer), dV += P^T dO, dP^T = V dO^T,
    dS^T = P^T (dP^T - delta), dK += dS^T Q: 4 dots = 8 BLOCK_M BLOCK_N d FLOPs.  Reads
    Q, dO (2 Nq d elements) + lse, delta per program; writes dK (fp32, to be scattered)
    and dV (fp32 when V was sampled, else straight in v's dtype) once, without atomics
    (each key block belongs to one program).  ``delta = rowsum(dO * O)``.
    """
    bh, b, h, offs_n, offs_d, n_mask, d_mask = _program(heads, n_kv, d, BLOCK_N, BLOCK_D)
    offs_m0 = tl.arange(0, BLOCK_M)
    k = _tile(k_ptr + b * s_kb + h * s_kh, offs_n, offs_d, s_kn, s_kd, n_mask, d_mask)
    v = _tile(v_ptr + b * s_vb + h * s_vh, offs_n, offs_d, s_vn, s_vd, n_mask, d_mask)
    q_base = q_ptr + b * s_qb + h * s_qh
    do_base = do_ptr + bh.to(tl.int64) * n_q * d
    row_base = bh.to(tl.int64) * n_q
    scale = _scale_of(scale_hi, scale_lo, ACC)
    qk_scale = _exp_units(scale, ACC)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for start_m in range(0, n_q, BLOCK_M):
        offs_m = start_m + offs_m0
        m_mask = offs_m < n_q
        qt = _tile_t(q_base, offs_m, offs_d, s_qn, s_qd, m_mask, d_mask)
        do = _tile(do_base, offs_m, offs_d, d, 1, m_mask, d_mask)
        lse, delta = _softmax_stats(lse_acc_ptr, delta_acc_ptr, row_base + offs_m, m_mask, ACC)
        st = _mm(k, qt, PRECISION, ACC, DOT_UPCAST)
        pt = _exp_of(st * qk_scale - lse[None, :], ACC)
        dv += _mm(pt.to(do.dtype), do, PRECISION, ACC, DOT_UPCAST)
        dpt = _mm(v, tl.trans(do), PRECISION, ACC, DOT_UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk += _mm(dst.to(qt.dtype), tl.trans(qt), PRECISION, ACC, DOT_UPCAST)
    out_off = bh.to(tl.int64) * n_kv * d + offs_n[:, None] * d + offs_d[None, :]
    kv_mask = n_mask[:, None] & d_mask[None, :]
    tl.store(dk_acc_ptr + out_off, dk * scale, mask=kv_mask)
    tl.store(dv_grad_ptr + out_off, dv.to(dv_grad_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=["heads", "n_q", "n_kv"])
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_acc_ptr, delta_acc_ptr, dq_grad_ptr, heads, n_q, n_kv, d, scale_hi, scale_lo,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,  # same arguments as the dK/dV pass
    ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of the (sampled) queries; one program = BLOCK_M queries, looping over all keys.

    Recomputes S = Q K^T and dP = dO V^T (3 dots = 6 BLOCK_M BLOCK_N d FLOPs per tile)
    rather than sharing them with the dK/dV pass through fp32 atomics on dQ: 1.4x the
    backward FLOPs of the fused formulation, but deterministic and atomic-free.  dQ is
    fp32 when Q was sampled (to be scattered), else stored straight in q's dtype.
    """
    bh, b, h, offs_m, offs_d, m_mask, d_mask = _program(heads, n_q, d, BLOCK_M, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    q = _tile(q_ptr + b * s_qb + h * s_qh, offs_m, offs_d, s_qn, s_qd, m_mask, d_mask)
    do = _tile(do_ptr + bh.to(tl.int64) * n_q * d, offs_m, offs_d, d, 1, m_mask, d_mask)
    lse, delta = _softmax_stats(lse_acc_ptr, delta_acc_ptr, bh.to(tl.int64) * n_q + offs_m, m_mask, ACC)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    scale = _scale_of(scale_hi, scale_lo, ACC)
    qk_scale = _exp_units(scale, ACC)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, n_kv, BLOCK_N):
        offs_n = start_n + offs_n0
        n_mask = offs_n < n_kv
        kt = _tile_t(k_base, offs_n, offs_d, s_kn, s_kd, n_mask, d_mask)
        vt = _tile_t(v_base, offs_n, offs_d, s_vn, s_vd, n_mask, d_mask)
        s = _mm(q, kt, PRECISION, ACC, DOT_UPCAST)
        p = _exp_of(s * qk_scale - lse[:, None], ACC)
        p = tl.where(n_mask[None, :], p, 0.0)  # padding keys (K = 0 would give exp(-lse))
        dp = _mm(do, vt, PRECISION, ACC, DOT_UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(kt.dtype), tl.trans(kt), PRECISION, ACC, DOT_UPCAST)
    tl.store(dq_grad_ptr + bh.to(tl.int64) * n_q * d + offs_m[:, None] * d + offs_d[None, :],
             (dq * scale).to(dq_grad_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@triton.jit
def _scatter_corner(g, m_base, s_my, s_mx, s_md, w, sgx, sgy, x, y, bh, row, height, width, d, n_pix,
                    dm_acc_ptr, part_acc_ptr, idx_idx_ptr, CORNER: tl.constexpr, offs_d, n_mask, d_mask,
                    DETERMINISTIC: tl.constexpr, ACC: tl.constexpr):
    """One bilinear corner: add w * g to map pixel (x, y) (fp32 atomics, or record the
    partial); return (sgx, sgy) * sum_d g * map[y, x, :], the corner's share of the
    coordinate gradient, with sgx = d w / d ix and sgy = d w / d iy."""
    valid = n_mask & (x >= 0) & (x < width) & (y >= 0) & (y < height)
    pix = (bh.to(tl.int64) * height + y.to(tl.int64)) * width + x.to(tl.int64)
    contrib = g * w[:, None]
    if DETERMINISTIC:
        # Per-corner partials (B, heads, N, 4, d) + target pixel (n_pix, one past the last
        # pixel: outside the map); the host reduces them with a sort-based deterministic
        # index_put_ into n_pix + 1 rows and drops the last.
        slot = row * 4 + CORNER
        tl.store(part_acc_ptr + slot[:, None] * d + offs_d[None, :], contrib, mask=n_mask[:, None] & d_mask[None, :])
        tl.store(idx_idx_ptr + slot, tl.where(valid, pix, n_pix), mask=n_mask)
    else:
        tl.atomic_add(dm_acc_ptr + pix[:, None] * d + offs_d[None, :], contrib,
                      mask=valid[:, None] & d_mask[None, :], sem="relaxed")
    val = _corner(m_base, x, y, height, width, s_my, s_mx, s_md, offs_d, n_mask, d_mask, ACC)
    gv = tl.sum(g * val, 1)
    return sgx * gv, sgy * gv


@triton.jit
def _scatter_map(m_ptr, g_acc_ptr, dm_acc_ptr, part_acc_ptr, idx_idx_ptr, bh, b, h, n_tok, height, width, d, n_pix,
                 s_mb, s_mh, s_my, s_mx, s_md, cx, cy, offs_n, offs_d, n_mask, d_mask,
                 ALIGN: tl.constexpr, DETERMINISTIC: tl.constexpr, ACC: tl.constexpr):
    """Scatter one sampled tensor's gradient; return its (d out/d ix, d out/d iy) per row.

    sample = sum_c w_c M_c with w = (1-fx)(1-fy), fx(1-fy), (1-fx)fy, fx fy, so
    d sample/d ix = sum_c (d w_c/d fx) M_c (grid_sample's one-sided convention at integer
    ix); it is reduced over d corner by corner, keeping one corner tile live at a time.
    """
    x0, y0, wx0, wx1, wy0, wy1 = _bilinear_setup(cx, cy, height, width, ALIGN)
    row = bh.to(tl.int64) * n_tok + offs_n
    g = tl.load(g_acc_ptr + row[:, None] * d + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :],
                other=0.0).to(ACC)
    m_base = m_ptr + b * s_mb + h * s_mh
    gx, gy = _scatter_corner(g, m_base, s_my, s_mx, s_md, wx0 * wy0, -wy0, -wx0, x0, y0, bh, row, height, width,
                             d, n_pix, dm_acc_ptr, part_acc_ptr, idx_idx_ptr, 0, offs_d, n_mask, d_mask,
                             DETERMINISTIC, ACC)
    ax, ay = _scatter_corner(g, m_base, s_my, s_mx, s_md, wx1 * wy0, wy0, -wx1, x0 + 1, y0, bh, row, height, width,
                             d, n_pix, dm_acc_ptr, part_acc_ptr, idx_idx_ptr, 1, offs_d, n_mask, d_mask,
                             DETERMINISTIC, ACC)
    gx += ax
    gy += ay
    ax, ay = _scatter_corner(g, m_base, s_my, s_mx, s_md, wx0 * wy1, -wy1, wx0, x0, y0 + 1, bh, row, height, width,
                             d, n_pix, dm_acc_ptr, part_acc_ptr, idx_idx_ptr, 2, offs_d, n_mask, d_mask,
                             DETERMINISTIC, ACC)
    gx += ax
    gy += ay
    ax, ay = _scatter_corner(g, m_base, s_my, s_mx, s_md, wx1 * wy1, wy1, wx1, x0 + 1, y0 + 1, bh, row, height,
                             width, d, n_pix, dm_acc_ptr, part_acc_ptr, idx_idx_ptr, 3, offs_d, n_mask, d_mask,
                             DETERMINISTIC, ACC)
    return gx + ax, gy + ay


@triton.jit(do_not_specialize=["heads", "n_tok", "height", "width", "n_pix"])
def _scatter_kernel(
    m_ptr, g_acc_ptr, dm_acc_ptr, part_acc_ptr, idx_idx_ptr, c_acc_ptr, dc_acc_ptr,
    heads, n_tok, height, width, d, n_pix,
    s_mb, s_mh, s_my, s_mx, s_md,
    s_cb, s_ch, s_cn, s_cc,
    ALIGN: tl.constexpr, DETERMINISTIC: tl.constexpr, ADD_DC: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward of the bilinear sampling of one map; one program = BLOCK coords of one (b, h).

    Map gradient: corner c of row n receives w_c * dXs[n] (fp32 atomics, or per-corner
    partials for the deterministic path).  Coordinate gradient: reduced over d here and
    stored once per (b, h, n) without atomics; ADD_DC (the second sampled map) adds it to
    the first map's, read back by the same program -- a fixed order, no extra launch.
    Per row: reads d (gradient) + 4 d (corners) elements, ~24 d FLOPs, 4 d fp32 atomics.
    """
    bh, b, h, offs_n, offs_d, n_mask, d_mask = _program(heads, n_tok, d, BLOCK, BLOCK_D)
    cx, cy = _coords(c_acc_ptr, b, h, offs_n, s_cb, s_ch, s_cn, s_cc, n_mask, ACC)
    gx, gy = _scatter_map(m_ptr, g_acc_ptr, dm_acc_ptr, part_acc_ptr, idx_idx_ptr, bh, b, h, n_tok,
                          height, width, d, n_pix, s_mb, s_mh, s_my, s_mx, s_md, cx, cy, offs_n, offs_d,
                          n_mask, d_mask, ALIGN, DETERMINISTIC, ACC)
    # d ix / d cx: (W - 1) / 2 with align_corners, W / 2 without.
    if ALIGN:
        gx = gx * ((width - 1) * 0.5)
        gy = gy * ((height - 1) * 0.5)
    else:
        gx = gx * (width * 0.5)
        gy = gy * (height * 0.5)
    dc = dc_acc_ptr + (bh.to(tl.int64) * n_tok + offs_n) * 2
    if ADD_DC:
        gx += tl.load(dc, mask=n_mask, other=0.0)
        gy += tl.load(dc + 1, mask=n_mask, other=0.0)
    tl.store(dc, gx, mask=n_mask)
    tl.store(dc + 1, gy, mask=n_mask)


@triton.jit
def _row_dot_kernel(a_ptr, b_ptr, out_acc_ptr, n_rows, d, ACC: tl.constexpr, BLOCK: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """out[r] = sum_d a[r, :] * b[r, :] in ACC for contiguous (n_rows, d) a, b: the backward's
    ``delta = rowsum(dO * O)`` in one launch (reads 2 n_rows d elements, writes n_rows)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (offs_d < d)[None, :]
    off = rows[:, None] * d + offs_d[None, :]
    a = tl.load(a_ptr + off, mask=mask, other=0.0).to(ACC)
    b = tl.load(b_ptr + off, mask=mask, other=0.0).to(ACC)
    tl.store(out_acc_ptr + rows, tl.sum(a * b, 1), mask=rows < n_rows)
