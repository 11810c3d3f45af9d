"""The Triton kernels of the central loss (device code only).

Per element, with ``p = sigmoid(x)`` for logits ``x`` and target ``t`` in [0, 1]::

    CL(x, t) = w * bce,  w = |t-p|^r,  bce = -(t log p + (1-t) log(1-p))
    dCL/dx   = dw/dx * bce + w * (p - t),  dw/dx = -r sign(t-p) |t-p|^(r-1) p (1-p)

The target is a tensor or, in the ``from_landmarks`` variant, a Gaussian around a landmark
evaluated in registers, so no target heatmap is ever allocated.  ``_central_loss_kernel``
makes one pass per forward or backward (``MODE``); ``_finish_sum_kernel`` adds its partial
sums in a fixed order.  Launched by ``launch``; declared for ahead-of-time builds by ``aot``.
The derivation, memory traffic and SASS counts: ``docs/design/central_loss.md``.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Kernel modes (the MODE constexpr): what one pass writes.
MODE_LOSS_NONE = 0  # per-element loss
MODE_LOSS_SUM = 1  # one partial sum per program
MODE_GRAD = 2  # per-element gradient scaled by grad_output


@triton.jit
def _central_loss_terms(x, t, r, R_INT: tl.constexpr, NEED_GRAD: tl.constexpr):
    """Loss and d(loss)/dx per element, in the dtype of ``x`` (fp32 or fp64).

    ``R_INT >= 0``: r is that integer and ``|t-p|^r`` is multiplications (r = 1, 2 are
    the usual settings: 1 exp + 1 log per element instead of 3-4 transcendentals);
    ``R_INT = -1``: general r through exp/log.
    """
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    inv_u = 1.0 / u  # the only reciprocal per element
    pos = x >= 0.0
    e_inv_u = e * inv_u
    p = tl.where(pos, inv_u, e_inv_u)  # sigmoid(x)
    q = tl.where(pos, e_inv_u, inv_u)  # 1 - sigmoid(x), without cancellation
    # log(1 + e) = log(u) + log(1 + (1 + e - u) / u): the rounding error of u = fl(1 + e) is
    # exactly e - (u - 1) (u - 1 is exact for u in [1, 2]) and its log is its first-order
    # term (the next one is below 2^-46).  One FMA instead of libdevice log1p or a second
    # division (Goldberg's log(u) * e / (u - 1)); u == 1 gives e, as log1p does.
    log1p_e = tl.log(u) + (e - (u - 1.0)) * inv_u
    log_p = tl.minimum(x, 0.0) - log1p_e  # log sigmoid(x)
    log_q = -tl.maximum(x, 0.0) - log1p_e  # log(1 - sigmoid(x))
    bce = -(t * log_p + (1.0 - t) * log_q)
    d = t - p
    a = tl.abs(d)
    if R_INT >= 0:
        w = a * 0.0 + 1.0  # a^0 = 1, also at a = 0: r = 0 is exactly BCE
        for _ in tl.static_range(R_INT):
            w = w * a
        mag = p * q  # |d|^(r-1) p (1-p)
        for _ in tl.static_range(R_INT - 1 if R_INT >= 1 else 0):
            mag = mag * a
    else:
        log_a = tl.log(tl.where(d != 0.0, a, 1.0))
        w = tl.where(d != 0.0, tl.exp(r * log_a), 0.0)
        w = tl.where(r == 0.0, 1.0, w)
        # One exp for |d|^(r-1) p (1-p): the factors alone can overflow when r < 1.
        mag = tl.exp((r - 1.0) * log_a + log_p + log_q)
    loss = w * bce
    grad = loss
    if NEED_GRAD:
        dw = tl.where(d != 0.0, tl.where(d > 0.0, -mag, mag) * r, 0.0)  # taken as 0 at t == p
        grad = dw * bce + w * (p - t)
    return loss, grad


@triton.jit
def _pixel_row_col(pix, width, ACC: tl.constexpr, FAST_ROW: tl.constexpr):
    """Row and column (in ``ACC``) of flat pixel indices ``pix`` (int32) in maps ``width`` wide.

    ``FAST_ROW`` (maps of fewer than 2^22 pixels): ``floor((pix + 0.5) / width)`` in float32
    is exact -- the quotient lies at least 0.5/width from an integer and float32 rounding
    moves it by less than quotient * 2^-23 -- and costs 4 instructions instead of an
    integer division.
    """
    if FAST_ROW:
        # tl.cast, not width.to: the JIT specializes an int argument equal to 1 into a
        # Python int (a 1-pixel-wide map), which has no .to().
        width_f = tl.cast(width, tl.float32)
        pix_f = pix.to(tl.float32)
        row = tl.floor((pix_f + 0.5) * (1.0 / width_f))
        col = pix_f - row * width_f  # exact: integers below 2^24
        return row.to(ACC), col.to(ACC)
    row_i = pix // width
    return row_i.to(ACC), (pix - row_i * width).to(ACC)


@triton.jit
def _central_loss_kernel(
    x_ptr,  # logits, contiguous, viewed as (rows, inner)
    t_ptr,  # target (same layout) -- unused when FROM_LANDMARKS
    lm_ptr,  # landmarks (rows, 2) as (x, y) -- used when FROM_LANDMARKS
    grad_out_ptr,  # MODE_GRAD: grad of the loss output (scalar or per element)
    out_ptr,  # MODE_LOSS_NONE: loss; MODE_LOSS_SUM: one partial per program; MODE_GRAD: grad
    inner,  # elements per row: H*W (landmarks) or numel (target, one row)
    chunks_per_row,  # programs per row
    width,  # W (landmarks only)
    # float64 on purpose: Triton's launcher passes plain Python floats as fp32, which
    # would round r, 1/(2 sigma^2), radius^2 and 1/numel for float64 inputs.
    r: tl.float64,
    inv_two_sigma2: tl.float64,
    radius2: tl.float64,
    grad_scale: tl.float64,  # 1/numel for mean, 1 for sum/none
    MODE: tl.constexpr,
    FROM_LANDMARKS: tl.constexpr,
    HAS_RADIUS: tl.constexpr,
    GRAD_OUT_SCALAR: tl.constexpr,
    R_INT: tl.constexpr,
    ACC: tl.constexpr,
    FAST_ROW: tl.constexpr,
    CHUNK: tl.constexpr,  # elements per program (fixed: the partial-sum count must not depend on tuning)
    ARCH: tl.constexpr,  # compute capability (autotuning key only)
    BLOCK: tl.constexpr,  # elements per loop step (tuned)
):
    # Per element: read x (+ t), write loss or grad (+ read grad_out for "none"), i.e.
    # 8-12 bytes in fp32; ~30 FLOPs, memory bound on an H100 for integer r.  The gradient
    # pass recomputes the loss terms instead of reading a gradient saved by the forward:
    # with n elements of b bytes, the forward + backward move 2nb + 3nb (target) or nb + 2nb
    # (landmarks) against 3nb + 2nb or 2nb + 2nb saved, and hold no n-sized buffer between
    # them.  The grid is 1-D (rows x chunks_per_row programs), so B*L is not limited to
    # 65535 rows.  MODE_LOSS_SUM writes one partial per program (no atomics): the sum is
    # finished in a fixed order by _finish_sum_kernel, so the loss is deterministic.
    pid = tl.program_id(0)
    if FROM_LANDMARKS:
        row_id = pid // chunks_per_row
        chunk = pid - row_id * chunks_per_row
    else:
        row_id = pid * 0
        chunk = pid
    first = chunk.to(tl.int64) * CHUNK  # first element of this program within its row
    base = row_id.to(tl.int64) * inner + first  # int64 once per program; 32-bit offsets below
    count = tl.minimum(inner - first, CHUNK).to(tl.int32)
    if ACC != tl.float64:  # the float64 arguments in the fp32 compute dtype, once
        # (not through a helper: the interpreter passes Python floats, which a helper's
        # return or tl.cast would round through fp32 for float64 inputs too)
        r = tl.cast(r, ACC)
        inv_two_sigma2 = tl.cast(inv_two_sigma2, ACC)
        radius2 = tl.cast(radius2, ACC)
        grad_scale = tl.cast(grad_scale, ACC)
    if FROM_LANDMARKS:
        lx = tl.load(lm_ptr + row_id.to(tl.int64) * 2).to(ACC)
        ly = tl.load(lm_ptr + row_id.to(tl.int64) * 2 + 1).to(ACC)
        # A missing landmark (NaN) moves to infinity: its target exp(-inf) is 0 everywhere,
        # without a per-element select.
        missing = (lx != lx) | (ly != ly)
        lx = tl.where(missing, float("inf"), lx)
        ly = tl.where(missing, float("inf"), ly)
        pix0 = first.to(tl.int32)  # H*W < 2^31 is checked on the host
    if MODE == 2:
        if GRAD_OUT_SCALAR:
            g_scalar = tl.load(grad_out_ptr).to(ACC) * grad_scale
    acc = tl.zeros([BLOCK], dtype=ACC)
    x_row = x_ptr + base
    out_row = out_ptr + base
    for start in range(0, count, BLOCK):
        local = start + tl.arange(0, BLOCK)
        mask = local < count
        x = tl.load(x_row + local, mask=mask, other=0.0).to(ACC)
        if FROM_LANDMARKS:
            row, col = _pixel_row_col(pix0 + local, width, ACC, FAST_ROW)
            dx = col - lx
            dy = row - ly
            dist2 = dx * dx + dy * dy
            t = tl.exp(-dist2 * inv_two_sigma2)
            if HAS_RADIUS:
                t = tl.where(dist2 > radius2, 0.0, t)
        else:
            t = tl.load(t_ptr + base + local, mask=mask, other=0.0).to(ACC)
        loss, grad = _central_loss_terms(x, t, r, R_INT, MODE == 2)
        if MODE == 0:
            tl.store(out_row + local, loss.to(out_ptr.dtype.element_ty), mask=mask)
        elif MODE == 1:
            acc += tl.where(mask, loss, 0.0)
        else:
            if GRAD_OUT_SCALAR:
                g_out = g_scalar
            else:
                g_out = tl.load(grad_out_ptr + base + local, mask=mask, other=0.0).to(ACC)
            tl.store(out_row + local, (grad * g_out).to(out_ptr.dtype.element_ty), mask=mask)
    if MODE == 1:
        tl.store(out_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _finish_sum_kernel(partials_ptr, out_ptr, count, divisor: tl.float64, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One program: out = sum(partials) / divisor, in a fixed order, cast to out's dtype.

    Replaces the sum, divide and cast that followed the loss pass (3 launches).
    """
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, count, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partials_ptr + offs, mask=offs < count, other=0.0)
    if ACC != tl.float64:
        divisor = tl.cast(divisor, ACC)
    total = tl.sum(acc, axis=0) / divisor
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))
