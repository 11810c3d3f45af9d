"""Coordinate-indexed attention: the CoorTransformer core (paper Section IV.A), fused.

::

    Qs = sample(q, coords)  Ks = sample(k, coords)  Vs = v          (sample="qk", the paper)
    Qs = q                  Ks = sample(k, coords)  Vs = sample(v)  (sample="kv", DAT / released code)
    out = softmax(Qs Ks^T * scale) Vs                               (B, heads, Nq, d)

``sample(m, coords)`` is ``F.grid_sample(mode="bilinear", padding_mode="zeros")`` of a
channels-last map ``m`` ``(B, heads, H, W, d)`` at normalized (x, y) coordinates
``(B, N, 2)`` (shared by the heads) or ``(B, heads, N, 2)``; tokens are ``(B, heads, N, d)``.

Triton kernels (CUDA; CPU tensors only under ``TRITON_INTERPRET=1``, for the tests):

* ``_sample_kernel``      -- bilinear sampling pre-pass of the key side (maps -> tokens;
                             why pre-sample rather than fuse there: see its docstring);
* ``_attn_fwd_kernel``    -- flash attention forward with the query-side sampling fused
                             into the Q tile load; online softmax, saves the log-sum-exp;
* ``_attn_bwd_dkv_kernel``/``_attn_bwd_dq_kernel`` -- flash-attention-2 backward split in
                             two passes (key-major for dK/dV, query-major for dQ) so no
                             gradient needs atomics and none is N x N;
* ``_scatter_kernel``     -- scatters d(sampled tokens) to a map through the bilinear
                             weights (fp32 atomics, or per-corner partials reduced by a
                             deterministic sort-based ``index_put_`` when
                             ``torch.are_deterministic_algorithms_enabled()``) and reduces
                             the coordinate gradient over d inside the program.

Forward: sample K (and V for "kv") -> attention.  Backward: re-sample Q/K/V into token
buffers (an O(N d) pre-pass, cheaper than keeping them alive since the forward),
``delta = rowsum(dO * O)``, dK/dV pass, dQ pass, then one scatter per sampled map; the
two maps' (and, for shared coords, the heads') coordinate gradients are added by the
host in a fixed order.  Extra memory is O(N d): sampled tokens, fp32 gradient buffers
and log-sum-exp (plus 4 N d fp32 partials on the deterministic path); never N x N.

Numerics: fp32 accumulation everywhere; exp2 with the scale folded into log2 e in fp32;
float64 (the interpreter's gradcheck) uses exp/log and a two-float scale so that results
match the float64 oracle to ~1e-15.

CPU tensors normally run the C++ op (``csrc/coor_attention.cpp``: ATen grid sampler +
CPU flash attention); ``torch.ops.coorkern.coor_attention`` returns ``(out, lse)`` and
``coor_attention_backward`` is its autograd formula on every device.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _backend, reference
from .._checks import check_choice, check_number, check_rank, check_same_device, check_tensor
from .._library import define_op

__all__ = ["coor_attention", "CoorAttention"]

SAMPLE_MODES = ("qk", "kv")
_MAP = "(B, heads, H, W, d)"
_TOKENS = "(B, heads, N, d)"


# ---------------------------------------------------------------------------
# Triton device helpers


@triton.jit
def _bilinear_setup(cx, cy, height, width, ALIGN: tl.constexpr):
    """Top-left corner and weights of the bilinear stencil at normalized (cx, cy).

    grid_sample's unnormalization; the source index is clamped to [-2, size + 1] first
    so that coordinates far outside the map (legal; they sample zeros) cannot overflow
    the int32 corner index -- with all four corners outside, clamping changes nothing.
    """
    wf = width.to(cx.dtype)
    hf = height.to(cx.dtype)
    if ALIGN:
        ix = (cx + 1.0) * 0.5 * (wf - 1.0)
        iy = (cy + 1.0) * 0.5 * (hf - 1.0)
    else:
        ix = ((cx + 1.0) * wf - 1.0) * 0.5
        iy = ((cy + 1.0) * hf - 1.0) * 0.5
    ix = tl.minimum(tl.maximum(ix, -2.0), wf + 1.0)
    iy = tl.minimum(tl.maximum(iy, -2.0), hf + 1.0)
    x0f = tl.floor(ix)
    y0f = tl.floor(iy)
    wx1 = ix - x0f
    wy1 = iy - y0f
    return x0f.to(tl.int32), y0f.to(tl.int32), 1.0 - wx1, wx1, 1.0 - wy1, wy1


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
def _head(heads):
    """(bh, b, h) of this program: grid axis 1 enumerates the (batch, head) pairs."""
    bh = tl.program_id(1)
    return bh, (bh // heads).to(tl.int64), (bh % heads).to(tl.int64)


@triton.jit
def _rows(n, d, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows (grid axis 0), the channel offsets, and their masks."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    return offs, offs_d, offs < n, offs_d < d


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
    bh, b, h = _head(heads)
    offs_n, offs_d, n_mask, d_mask = _rows(n_tok, d, BLOCK, BLOCK_D)
    cx, cy = _coords(c_acc_ptr, b, h, offs_n, s_cb, s_ch, s_cn, s_cc, n_mask, ACC)
    m_base = m_ptr + b * s_mb + h * s_mh
    tile = _bilinear_sample(m_base, s_my, s_mx, s_md, height, width, cx, cy, offs_d, n_mask, d_mask, ALIGN, ACC)
    o_ptrs = out_ptr + bh.to(tl.int64) * n_tok * d + offs_n[:, None] * d + offs_d[None, :]
    tl.store(o_ptrs, tile.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=["heads", "n_q", "n_kv", "q_height", "q_width"])
def _attn_fwd_kernel(
    q_ptr, c_acc_ptr, k_ptr, v_ptr, o_ptr, lse_acc_ptr,
    heads, n_q, n_kv, q_height, q_width, d, scale_hi, scale_lo,
    s_qb, s_qh, s_qy, s_qx, s_qd,
    s_cb, s_ch, s_cn, s_cc,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    SAMPLE_Q: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Flash attention forward; one program = BLOCK_M queries of one (batch, head).

    Q tile: SAMPLE_Q gathers the 4 bilinear corners straight from the q map (4 BLOCK_M d
    elements read, 8 BLOCK_M d FLOPs, never written back); else a plain token load.  Then
    for each BLOCK_N keys: S = Q K^T (2 BLOCK_M BLOCK_N d FLOPs, tensor cores), online
    softmax in base 2 (the scale folded into one multiply by scale*log2 e), O += P V (2
    BLOCK_M BLOCK_N d FLOPs).  Per program HBM/L2 traffic: 2 N d elements (K, V) + the Q
    tile + BLOCK_M d out + BLOCK_M lse; per (b, h) 4 Nq N d FLOPs.  Stores O in the
    input dtype and lse = m + log(l) (natural log, fp32) for the backward.
    """
    bh, b, h = _head(heads)
    offs_m, offs_d, m_mask, d_mask = _rows(n_q, d, BLOCK_M, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    q_base = q_ptr + b * s_qb + h * s_qh
    if SAMPLE_Q:
        cx, cy = _coords(c_acc_ptr, b, h, offs_m, s_cb, s_ch, s_cn, s_cc, m_mask, ACC)
        q = _bilinear_sample(q_base, s_qy, s_qx, s_qd, q_height, q_width, cx, cy, offs_d, m_mask, d_mask, ALIGN, ACC)
        q = q.to(k_ptr.dtype.element_ty)
    else:
        q = _tile(q_base, offs_m, offs_d, s_qy, s_qd, m_mask, d_mask)
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
    q_ptr, k_ptr, v_ptr, do_ptr, lse_acc_ptr, delta_acc_ptr, dk_acc_ptr, dv_acc_ptr,
    heads, n_q, n_kv, d, scale_hi, scale_lo,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of the (sampled) keys; one program = BLOCK_N keys, looping over all queries.

    Per query block: S^T = K Q^T, P^T = exp(S^T - lse) from the saved log-sum-exp (no
    softmax renormalization, no N x N buffer), dV += P^T dO, dP^T = V dO^T,
    dS^T = P^T (dP^T - delta), dK += dS^T Q: 4 dots = 8 BLOCK_M BLOCK_N d FLOPs.  Reads
    Q, dO (2 Nq d elements) + lse, delta per program; writes dK, dV once in fp32 without
    atomics (each key block belongs to one program).  ``delta = rowsum(dO * O)``.
    """
    bh, b, h = _head(heads)
    offs_n, offs_d, n_mask, d_mask = _rows(n_kv, d, BLOCK_N, BLOCK_D)
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
    tl.store(dv_acc_ptr + out_off, dv, mask=kv_mask)


@triton.jit(do_not_specialize=["heads", "n_q", "n_kv"])
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_acc_ptr, delta_acc_ptr, dq_acc_ptr, heads, n_q, n_kv, d, scale_hi, scale_lo,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,  # same arguments as the dK/dV pass
    ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of the (sampled) queries; one program = BLOCK_M queries, looping over all keys.

    Recomputes S = Q K^T and dP = dO V^T (3 dots = 6 BLOCK_M BLOCK_N d FLOPs per tile)
    rather than sharing them with the dK/dV pass through fp32 atomics on dQ: 1.4x the
    backward FLOPs of the fused formulation, but deterministic and atomic-free.
    """
    bh, b, h = _head(heads)
    offs_m, offs_d, m_mask, d_mask = _rows(n_q, d, BLOCK_M, BLOCK_D)
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
    tl.store(dq_acc_ptr + bh.to(tl.int64) * n_q * d + offs_m[:, None] * d + offs_d[None, :], dq * scale,
             mask=m_mask[:, None] & d_mask[None, :])


@triton.jit
def _scatter_corner(g, m_base, s_my, s_mx, s_md, w, sgx, sgy, x, y, bh, row, height, width, d,
                    dm_acc_ptr, part_acc_ptr, idx_idx_ptr, CORNER: tl.constexpr, offs_d, n_mask, d_mask,
                    DETERMINISTIC: tl.constexpr, ACC: tl.constexpr):
    """One bilinear corner: add w * g to map pixel (x, y) (fp32 atomics, or record the
    partial); return (sgx, sgy) * sum_d g * map[y, x, :], the corner's share of the
    coordinate gradient, with sgx = d w / d ix and sgy = d w / d iy."""
    valid = n_mask & (x >= 0) & (x < width) & (y >= 0) & (y < height)
    pix = (bh.to(tl.int64) * height + y.to(tl.int64)) * width + x.to(tl.int64)
    contrib = g * w[:, None]
    if DETERMINISTIC:
        # Per-corner partials (B, heads, N, 4, d) + target pixel (-1: outside the map);
        # the host reduces them with a sort-based deterministic index_put_.
        slot = row * 4 + CORNER
        tl.store(part_acc_ptr + slot[:, None] * d + offs_d[None, :], contrib, mask=n_mask[:, None] & d_mask[None, :])
        tl.store(idx_idx_ptr + slot, tl.where(valid, pix, -1), mask=n_mask)
    else:
        tl.atomic_add(dm_acc_ptr + pix[:, None] * d + offs_d[None, :], contrib,
                      mask=valid[:, None] & d_mask[None, :], sem="relaxed")
    val = _corner(m_base, x, y, height, width, s_my, s_mx, s_md, offs_d, n_mask, d_mask, ACC)
    gv = tl.sum(g * val, 1)
    return sgx * gv, sgy * gv


@triton.jit
def _scatter_map(m_ptr, g_acc_ptr, dm_acc_ptr, part_acc_ptr, idx_idx_ptr, bh, b, h, n_tok, height, width, d,
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
                             d, dm_acc_ptr, part_acc_ptr, idx_idx_ptr, 0, offs_d, n_mask, d_mask, DETERMINISTIC, ACC)
    ax, ay = _scatter_corner(g, m_base, s_my, s_mx, s_md, wx1 * wy0, wy0, -wx1, x0 + 1, y0, bh, row, height, width,
                             d, dm_acc_ptr, part_acc_ptr, idx_idx_ptr, 1, offs_d, n_mask, d_mask, DETERMINISTIC, ACC)
    gx += ax
    gy += ay
    ax, ay = _scatter_corner(g, m_base, s_my, s_mx, s_md, wx0 * wy1, -wy1, wx0, x0, y0 + 1, bh, row, height, width,
                             d, dm_acc_ptr, part_acc_ptr, idx_idx_ptr, 2, offs_d, n_mask, d_mask, DETERMINISTIC, ACC)
    gx += ax
    gy += ay
    ax, ay = _scatter_corner(g, m_base, s_my, s_mx, s_md, wx1 * wy1, wy1, wx1, x0 + 1, y0 + 1, bh, row, height,
                             width, d, dm_acc_ptr, part_acc_ptr, idx_idx_ptr, 3, offs_d, n_mask, d_mask,
                             DETERMINISTIC, ACC)
    return gx + ax, gy + ay


@triton.jit(do_not_specialize=["heads", "n_tok", "height", "width"])
def _scatter_kernel(
    m_ptr, g_acc_ptr, dm_acc_ptr, part_acc_ptr, idx_idx_ptr, c_acc_ptr, dc_acc_ptr,
    heads, n_tok, height, width, d,
    s_mb, s_mh, s_my, s_mx, s_md,
    s_cb, s_ch, s_cn, s_cc,
    ALIGN: tl.constexpr, DETERMINISTIC: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward of the bilinear sampling of one map; one program = BLOCK coords of one (b, h).

    Map gradient: corner c of row n receives w_c * dXs[n] (fp32 atomics, or per-corner
    partials for the deterministic path).  Coordinate gradient: reduced over d here and
    stored once per (map, b, h, n) without atomics; the host adds the two sampled maps
    (and the heads for shared coords) in a fixed order -- 4 numbers per coordinate.
    Per row: reads d (gradient) + 4 d (corners) elements, ~24 d FLOPs, 4 d fp32 atomics.
    """
    bh, b, h = _head(heads)
    offs_n, offs_d, n_mask, d_mask = _rows(n_tok, d, BLOCK, BLOCK_D)
    cx, cy = _coords(c_acc_ptr, b, h, offs_n, s_cb, s_ch, s_cn, s_cc, n_mask, ACC)
    gx, gy = _scatter_map(m_ptr, g_acc_ptr, dm_acc_ptr, part_acc_ptr, idx_idx_ptr, bh, b, h, n_tok,
                          height, width, d, s_mb, s_mh, s_my, s_mx, s_md, cx, cy, offs_n, offs_d,
                          n_mask, d_mask, ALIGN, DETERMINISTIC, ACC)
    # d ix / d cx: (W - 1) / 2 with align_corners, W / 2 without.
    if ALIGN:
        gx = gx * ((width - 1) * 0.5)
        gy = gy * ((height - 1) * 0.5)
    else:
        gx = gx * (width * 0.5)
        gy = gy * (height * 0.5)
    dc = dc_acc_ptr + (bh.to(tl.int64) * n_tok + offs_n) * 2
    tl.store(dc, gx, mask=n_mask)
    tl.store(dc + 1, gy, mask=n_mask)


# ---------------------------------------------------------------------------
# Host side: launch configuration and launchers


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 follows torch's matmul setting (tf32 unless "highest")."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _dot_upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _backend.triton_interpreter_enabled()


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _current_arch() -> int:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return 10 * major + minor
    return 90


def launch_config(kind: str, d: int, dtype: torch.dtype, interpret: Optional[bool] = None,
                  arch: Optional[int] = None) -> dict:
    """Block sizes, warps and stages of one kernel, chosen by hand per (d, dtype, arch).

    GPU: every dot has an M dimension that is a multiple of 64 with 4 or 8 warps, so sm_90
    uses wgmma (HGMMA; fp32 as tf32 when torch allows it); d = 128 and fp32 (twice the
    bytes per tile) get smaller tiles so nothing spills (checked for sm_80 and sm_90 by
    the tests: zero LOCAL and zero STACK bytes).  The interpreter costs ~1 ms per program
    instance, so it gets large blocks.
    """
    if interpret is None:
        interpret = _backend.triton_interpreter_enabled()
    bd = _block_d(d)
    if interpret:
        return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK": 128, "num_warps": 4, "num_stages": 1}
    if arch is None:
        arch = _current_arch()
    fp32 = dtype == torch.float32
    wide = bd >= 128 or fp32
    if kind == "fwd":  # the sampled fp32 Q tile + fp32 O accumulator: halve BLOCK_M at fp32 d=128
        if fp32 and bd >= 128:
            return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2 if arch >= 90 else 1}
        return {"BLOCK_M": 128, "BLOCK_N": 32 if wide else 64, "num_warps": 8, "num_stages": 2 if wide else 3}
    if kind == "dkv":  # M of every dot is BLOCK_N (keys); K, V, dK, dV stay in registers
        if fp32:
            return {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 8 if bd >= 128 and arch < 90 else 4, "num_stages": 2}
        return {"BLOCK_M": 32, "BLOCK_N": 64 if wide else 128, "num_warps": 4 if wide else 8, "num_stages": 2}
    if kind == "dq":
        return {"BLOCK_M": 64 if wide else 128, "BLOCK_N": 32, "num_warps": 4 if wide else 8, "num_stages": 2}
    if kind == "scatter":  # 8-16 tile elements per thread: sm_80 has no vector fp32 atomics
        return {"BLOCK": (2048 if arch >= 90 else 1024) // bd, "num_warps": 4, "num_stages": 1}
    if kind == "sample":  # 4 gathered corner tiles of 32 elements per thread
        return {"BLOCK": 4096 // bd, "num_warps": 4, "num_stages": 1}
    raise ValueError(f"unknown kernel kind {kind!r}")


_TL_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
_UNIT_STRIDES = ("s_md", "s_qd", "s_kd", "s_vd", "s_ad", "s_bd", "s_cc")


def aot_spec(name: str, dtype: torch.dtype, d: int, *, arch: int = 90, sample_q: bool = True,
             deterministic: bool = False, align_corners: bool = True):
    """``(kernel, signature, constexprs, config, divisible)`` of one kernel as the launchers
    run it on a GPU with contiguous inputs, for ``coorkern._triton_aot.compile_for_gpu``.

    Unit channel/coordinate strides are constexpr 1 and ``divisible`` names the arguments
    Triton's launcher marks divisible by 16 for 16-byte aligned, contiguous inputs with
    d in {16, 32, 64, 128} (pointers, d, and the map/token strides, which are multiples
    of d): pass them to ``ASTSource`` as ``tt.divisibility`` attributes to compile the
    variant a GPU actually runs.
    """
    kernels = {"fwd": _attn_fwd_kernel, "dkv": _attn_bwd_dkv_kernel, "dq": _attn_bwd_dq_kernel,
               "sample": _sample_kernel, "scatter": _scatter_kernel}
    fn = kernels[name]
    cfg = launch_config(name, d, dtype, interpret=False, arch=arch)
    acc = _acc_dtype(dtype)
    blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
    constexprs = dict(ACC=_tl_acc(dtype), BLOCK_D=_block_d(d), ALIGN=align_corners, SAMPLE_Q=sample_q,
                      DETERMINISTIC=deterministic, PRECISION="tf32" if dtype == torch.float32 else "ieee",
                      DOT_UPCAST=False, **blocks)
    constexprs.update({k: 1 for k in _UNIT_STRIDES})
    params = [p.name for p in fn.params]
    signature = {}
    for p in fn.params:
        if p.name in constexprs:
            signature[p.name] = "constexpr"
        elif p.name.endswith("_acc_ptr"):
            signature[p.name] = "*" + _TL_NAMES[acc]
        elif p.name.endswith("_idx_ptr"):
            signature[p.name] = "*i64"
        elif p.name.endswith("_ptr"):
            signature[p.name] = "*" + _TL_NAMES[dtype]
        elif p.name.startswith("scale"):
            signature[p.name] = "fp32"
        else:
            signature[p.name] = "i32"
    constexprs = {k: v for k, v in constexprs.items() if k in params}
    divisible = [p for p in params if p not in constexprs and (
        p.endswith("_ptr") or p == "d" or re.fullmatch(r"s_[mqkvab][bhyxn]", p))]
    return fn, signature, constexprs, cfg, divisible


def _split(x: float) -> tuple[float, float]:
    """x as fp32 hi + lo (Triton passes Python floats as fp32; fp64 kernels add them)."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(x - hi)


def _grid_strides(coords: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides (b, h, n, c) of coords; h stride 0 when shared by the heads."""
    if coords.dim() == 3:
        return coords.stride(0), 0, coords.stride(1), coords.stride(2)
    return tuple(coords.stride())


def _sample_tokens(fmap: torch.Tensor, coords: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """Pre-pass: sample a (B, heads, H, W, d) map at coords -> contiguous (B, heads, N, d)."""
    batch, heads, height, width, d = fmap.shape
    n = coords.shape[-2]
    out = torch.empty((batch, heads, n, d), device=fmap.device, dtype=fmap.dtype)
    cfg = launch_config("sample", d, fmap.dtype)
    _sample_kernel[(triton.cdiv(n, cfg["BLOCK"]), batch * heads)](
        fmap, coords, out, heads, n, height, width, d, *fmap.stride(), *_grid_strides(coords),
        ALIGN=align_corners, ACC=_tl_acc(fmap.dtype), BLOCK=cfg["BLOCK"], BLOCK_D=_block_d(d),
        num_warps=cfg["num_warps"],
    )
    return out


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when the launcher will specialize it as 16-byte aligned with unit channel
    stride and multiple-of-16 strides -- the kernel variant the tests compile spill-free for
    sm_80/sm_90 -- else a contiguous copy (O(input), only for sliced or permuted inputs)."""
    aligned = t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all(s % 16 == 0 for s in t.stride()[:-1])
    return t if aligned else t.contiguous()


def _prepare_coords(coords: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return coords.detach().to(_acc_dtype(dtype))  # tiny (N x 2); keeps its strides if no cast


def _triton_forward(q, k, v, coords, sample, scale, align_corners):
    """Returns (out, lse): out (B, heads, Nq, d) in q's dtype, lse (B, heads, Nq) fp32."""
    q, k, v = (_kernel_layout(t) for t in (q, k, v))
    c = _prepare_coords(coords, q.dtype)
    batch, heads, d = q.shape[0], q.shape[1], q.shape[-1]
    n = c.shape[-2]
    ks = _sample_tokens(k, c, align_corners)
    if sample == "qk":
        vs, n_q, (q_h, q_w), q_strides = v, n, q.shape[2:4], q.stride()
    else:
        vs = _sample_tokens(v, c, align_corners)
        n_q, (q_h, q_w) = q.shape[2], (1, 1)
        q_strides = (q.stride(0), q.stride(1), q.stride(2), 0, q.stride(3))  # tokens: "y" = token index
    out = torch.empty((batch, heads, n_q, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, heads, n_q), device=q.device, dtype=_acc_dtype(q.dtype))
    cfg = launch_config("fwd", d, q.dtype)
    _attn_fwd_kernel[(triton.cdiv(n_q, cfg["BLOCK_M"]), batch * heads)](
        q, c, ks, vs, out, lse, heads, n_q, n, q_h, q_w, d, *_split(scale),
        *q_strides, *_grid_strides(c), *ks.stride(), *vs.stride(),
        SAMPLE_Q=sample == "qk", ALIGN=align_corners, ACC=_tl_acc(q.dtype), PRECISION=_precision(q.dtype),
        DOT_UPCAST=_dot_upcast(q.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_block_d(d),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


def _scatter(fmap, grad, coords, align_corners):
    """Gradient of ``_sample_tokens``: (map gradient fp32, coords gradient fp32 (B, heads, N, 2))."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    batch, heads, n, d = grad.shape
    acc = grad.dtype
    dmap = torch.zeros(fmap.shape, device=fmap.device, dtype=acc)
    if deterministic:
        part = torch.empty((batch, heads, n, 4, d), device=fmap.device, dtype=acc)
        idx = torch.empty((batch, heads, n, 4), device=fmap.device, dtype=torch.int64)
    else:
        part, idx = dmap, dmap  # unused pointer slots
    dcoords = torch.empty((batch, heads, n, 2), device=fmap.device, dtype=acc)
    cfg = launch_config("scatter", d, acc)
    _scatter_kernel[(triton.cdiv(n, cfg["BLOCK"]), batch * heads)](
        fmap, grad, dmap, part, idx, coords, dcoords, heads, n, fmap.shape[2], fmap.shape[3], d,
        *fmap.stride(), *_grid_strides(coords),
        ALIGN=align_corners, DETERMINISTIC=deterministic, ACC=_tl_acc(acc),
        BLOCK=cfg["BLOCK"], BLOCK_D=_block_d(d), num_warps=cfg["num_warps"],
    )
    if deterministic:
        # Ordered reduction of the per-corner partials: index_put_ with accumulate is
        # sort-based and deterministic under torch.use_deterministic_algorithms (the last
        # row collects the corners outside the map and is dropped).
        flat = dmap.new_zeros((dmap.numel() // d + 1, d))
        flat.index_put_((idx.view(-1) % flat.shape[0],), part.view(-1, d), accumulate=True)
        dmap = flat[:-1].view(dmap.shape)
    return dmap, dcoords


def _scatter_pair(map_a, grad_a, map_b, grad_b, coords, align_corners):
    """Map gradients of both sampled maps and the coords gradient (fp32)."""
    dmap_a, dc_a = _scatter(map_a, grad_a, coords, align_corners)
    dmap_b, dc_b = _scatter(map_b, grad_b, coords, align_corners)
    dc = dc_a + dc_b
    return dmap_a, dmap_b, dc.sum(1) if coords.dim() == 3 else dc


def _triton_backward(grad_out, q, k, v, coords, out, lse, sample, scale, align_corners):
    q, k, v = (_kernel_layout(t) for t in (q, k, v))
    c = _prepare_coords(coords, q.dtype)
    batch, heads, d = q.shape[0], q.shape[1], q.shape[-1]
    n = c.shape[-2]
    acc = _acc_dtype(q.dtype)
    # Sampled tokens again (O(N d) pre-pass; cheaper than keeping them alive since forward).
    ks = _sample_tokens(k, c, align_corners)
    qs = _sample_tokens(q, c, align_corners) if sample == "qk" else q
    vs = v if sample == "qk" else _sample_tokens(v, c, align_corners)
    n_q = qs.shape[2]
    do = grad_out.to(q.dtype).contiguous()
    delta = (do.to(acc) * out.to(acc)).sum(-1).contiguous()  # rowsum(dO * O): (B, heads, Nq)
    lse = lse.contiguous()
    dks = torch.empty((batch, heads, n, d), device=q.device, dtype=acc)
    dvs = torch.empty_like(dks)
    dqs = torch.empty((batch, heads, n_q, d), device=q.device, dtype=acc)
    common = dict(ACC=_tl_acc(q.dtype), PRECISION=_precision(q.dtype), DOT_UPCAST=_dot_upcast(q.dtype),
                  BLOCK_D=_block_d(d))
    strides = (*qs.stride(), *ks.stride(), *vs.stride())
    cfg = launch_config("dkv", d, q.dtype)
    _attn_bwd_dkv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), batch * heads)](
        qs, ks, vs, do, lse, delta, dks, dvs, heads, n_q, n, d, *_split(scale), *strides,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **common,
    )
    cfg = launch_config("dq", d, q.dtype)
    _attn_bwd_dq_kernel[(triton.cdiv(n_q, cfg["BLOCK_M"]), batch * heads)](
        qs, ks, vs, do, lse, delta, dqs, heads, n_q, n, d, *_split(scale), *strides,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **common,
    )
    if sample == "qk":
        dq, dk, dc = _scatter_pair(q, dqs, k, dks, c, align_corners)
        dv = dvs
    else:
        dv, dk, dc = _scatter_pair(v, dvs, k, dks, c, align_corners)
        dq = dqs
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dc.to(coords.dtype)


# ---------------------------------------------------------------------------
# torch.library registration: torch.ops.coorkern.coor_attention[_backward]
# The schemas are also in csrc/coor_attention.cpp (a test checks they agree).

SCHEMAS = {
    "coor_attention": (
        "coor_attention(Tensor q, Tensor k, Tensor v, Tensor coords, str sample, float scale, bool align_corners) "
        "-> (Tensor, Tensor)"
    ),
    "coor_attention_backward": (
        "coor_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor coords, Tensor out, "
        "Tensor lse, str sample, float scale, bool align_corners) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
}


def _reference_forward(q, k, v, coords, sample, scale, align_corners):
    # Fallback CPU kernel when the C++ extension is missing.  The lse it returns is only
    # consumed by _reference_backward, which recomputes instead.
    out = reference.coor_attention(q, k, v, coords, sample=sample, scale=scale, align_corners=align_corners)
    return out, out.new_zeros(out.shape[:-1], dtype=_acc_dtype(q.dtype))


def _reference_backward(grad_out, q, k, v, coords, out, lse, sample, scale, align_corners):
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) for t in (q, k, v, coords)]
        res = reference.coor_attention(*inputs, sample=sample, scale=scale, align_corners=align_corners)
        grads = torch.autograd.grad(res, inputs, grad_out)
    return tuple(g.contiguous() for g in grads)


_op = define_op(SCHEMAS["coor_attention"], _reference_forward)
_bwd_op = define_op(SCHEMAS["coor_attention_backward"], _reference_backward)


@torch.library.register_kernel("coorkern::coor_attention", "cuda")
def _op_cuda(q, k, v, coords, sample, scale, align_corners):
    return _triton_forward(q, k, v, coords, sample, scale, align_corners)


@torch.library.register_kernel("coorkern::coor_attention_backward", "cuda")
def _bwd_op_cuda(grad_out, q, k, v, coords, out, lse, sample, scale, align_corners):
    return _triton_backward(grad_out, q, k, v, coords, out, lse, sample, scale, align_corners)


@torch.library.register_fake("coorkern::coor_attention")
def _op_fake(q, k, v, coords, sample, scale, align_corners):
    n_q = coords.shape[-2] if sample == "qk" else q.shape[2]
    out = q.new_empty((q.shape[0], q.shape[1], n_q, q.shape[-1]))
    return out, q.new_empty(out.shape[:-1], dtype=_acc_dtype(q.dtype))


@torch.library.register_fake("coorkern::coor_attention_backward")
def _bwd_op_fake(grad_out, q, k, v, coords, out, lse, sample, scale, align_corners):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, coords))


def _setup_context(ctx, inputs, output):
    q, k, v, coords, sample, scale, align_corners = inputs
    ctx.args = (sample, scale, align_corners)
    ctx.save_for_backward(q, k, v, coords, *output)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, coords, out, lse = ctx.saved_tensors
    grads = _bwd_op(grad_out, q, k, v, coords, out, lse, *ctx.args)
    return (*grads, None, None, None)


torch.library.register_autograd("coorkern::coor_attention", _backward, setup_context=_setup_context)


class _TritonOnCPU(torch.autograd.Function):
    """Autograd for the Triton kernels on CPU tensors (interpreter; tests only).

    On CUDA the same launchers run behind ``torch.ops.coorkern.*``; on CPU that dispatch
    key belongs to the C++ kernels, so the interpreter path is wired here.
    """

    @staticmethod
    def forward(ctx, q, k, v, coords, sample, scale, align_corners):
        out, lse = _triton_forward(q, k, v, coords, sample, scale, align_corners)
        ctx.args = (sample, scale, align_corners)
        ctx.save_for_backward(q, k, v, coords, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, coords, out, lse = ctx.saved_tensors
        grads = _triton_backward(grad_out, q, k, v, coords, out, lse, *ctx.args)
        return (*grads, None, None, None)


# ---------------------------------------------------------------------------
# Public API


def _validate(q, k, v, coords, sample, scale, align_corners):
    """Check the arguments; return ``(sample, scale, align_corners)`` normalized."""
    sample = check_choice("sample", sample, SAMPLE_MODES)
    for name, t in (("q", q), ("k", k), ("v", v), ("coords", coords)):
        check_tensor(name, t)
    check_same_device(q=q, k=k, v=v, coords=coords)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must have the same dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if sample == "qk":
        check_rank("q", q, 5, _MAP + " (a map sampled at coords when sample='qk')")
        check_rank("k", k, 5, _MAP + " (a map sampled at coords)")
        check_rank("v", v, 4, _TOKENS + " (tokens when sample='qk')")
    else:
        check_rank("q", q, 4, "(B, heads, Nq, d) (tokens when sample='kv')")
        check_rank("k", k, 5, _MAP + " (a map sampled at coords)")
        check_rank("v", v, 5, _MAP + " (a map sampled at coords when sample='kv')")
    batch, heads, d = q.shape[0], q.shape[1], q.shape[-1]
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != batch or t.shape[1] != heads or t.shape[-1] != d:
            raise ValueError(
                f"{name} must match q in batch, heads and d (B={batch}, heads={heads}, d={d}), "
                f"got {name} of shape {tuple(t.shape)}"
            )
    if coords.dim() not in (3, 4) or coords.shape[-1] != 2:
        raise ValueError(
            f"coords must have shape (B, N, 2) (shared by the heads) or (B, heads, N, 2), got {tuple(coords.shape)}"
        )
    if coords.shape[0] != batch or (coords.dim() == 4 and coords.shape[1] != heads):
        expected = f"(B={batch}, N, 2) or (B={batch}, heads={heads}, N, 2)"
        raise ValueError(f"coords must have shape {expected}, got {tuple(coords.shape)}")
    n = coords.shape[-2]
    if n < 1:
        raise ValueError(f"coords must hold at least one coordinate (N >= 1), got {tuple(coords.shape)}")
    if sample == "qk" and v.shape[2] != n:
        raise ValueError(f"v must have shape (B, heads, N={n}, d) with N the number of coords, got {tuple(v.shape)}")
    if sample == "kv" and q.shape[2] < 1:
        raise ValueError(f"q must hold at least one query token (B, heads, Nq >= 1, d), got {tuple(q.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.numel() == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if scale is None:
        scale = d ** -0.5
    else:
        scale = check_number("scale", scale)
    if not isinstance(align_corners, bool):
        raise TypeError(f"align_corners must be a bool, got {type(align_corners).__name__}")
    return sample, scale, align_corners


def coor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coords: torch.Tensor, *, sample: str = "qk",
                   scale: Optional[float] = None, align_corners: bool = True) -> torch.Tensor:
    """Coordinate-indexed attention ``softmax(Qs Ks^T * scale) Vs`` -> ``(B, heads, Nq, d)``.

    Args:
        q: ``sample="qk"``: map ``(B, heads, H, W, d)`` sampled at ``coords`` (Nq = N);
           ``sample="kv"``: tokens ``(B, heads, Nq, d)``.
        k: map ``(B, heads, Hk, Wk, d)``, always sampled at ``coords``.
        v: ``sample="qk"``: tokens ``(B, heads, N, d)``; ``sample="kv"``: map sampled at ``coords``.
        coords: ``(B, N, 2)`` shared by the heads or ``(B, heads, N, 2)``; normalized (x, y)
           in ``F.grid_sample``'s convention; outside [-1, 1] samples zeros (bilinear,
           zero padding).  Differentiable.
        scale: softmax scale, default ``d ** -0.5``.
        align_corners: as in ``F.grid_sample``.

    q, k, v share a floating dtype (fp32/fp16/bf16/fp64; fp32 accumulation); coords may
    have any floating dtype.  Gradients flow to all four tensors.  On CUDA, fp32 products
    use TF32 tensor cores when ``torch.get_float32_matmul_precision()`` is not "highest"
    (as torch's own matmuls); setting ``torch.use_deterministic_algorithms(True)`` makes
    the backward atomic-free and bitwise reproducible.  Extra memory is O(N d).
    """
    sample, scale, align_corners = _validate(q, k, v, coords, sample, scale, align_corners)
    device = q.device
    impl = _backend.resolve(device, "coor_attention")
    if impl == "reference":
        return reference.coor_attention(q, k, v, coords, sample=sample, scale=scale, align_corners=align_corners)
    if impl == "triton" and device.type == "cpu":
        return _TritonOnCPU.apply(q, k, v, coords, sample, scale, align_corners)[0]
    return _op(q, k, v, coords, sample, scale, align_corners)[0]


class CoorAttention(torch.nn.Module):
    """``nn.Module`` form of :func:`coor_attention` (no parameters): ``forward(q, k, v, coords)``."""

    def __init__(self, sample: str = "qk", scale: Optional[float] = None, align_corners: bool = True) -> None:
        super().__init__()
        self.sample = check_choice("sample", sample, SAMPLE_MODES)
        self.scale = None if scale is None else check_number("scale", scale)
        if not isinstance(align_corners, bool):
            raise TypeError(f"align_corners must be a bool, got {type(align_corners).__name__}")
        self.align_corners = align_corners

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        return coor_attention(q, k, v, coords, sample=self.sample, scale=self.scale, align_corners=self.align_corners)

    def extra_repr(self) -> str:
        return f"sample={self.sample!r}, scale={self.scale}, align_corners={self.align_corners}"
