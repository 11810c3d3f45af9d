"""Central loss: Triton kernels, host launch, op registration and autograd.

Per element, with ``p = sigmoid(x)`` for logits ``x`` and target ``t`` in [0, 1]::

    CL(x, t) = -( t |t-p|^r log p + (1-t) |t-p|^r log(1-p) ) = w * bce
    w   = |t-p|^r                        (difference-modulating term; w = 1 when r = 0)
    bce = -(t log p + (1-t) log(1-p))    (log p, log(1-p) from log-sigmoid of x)
    dCL/dx = dw/dx * bce + w * (p - t),  dw/dx = -r sign(t-p) |t-p|^(r-1) p (1-p)

``dw/dx`` is evaluated as ``exp((r-1) log|t-p| + log p + log(1-p))`` so that the
large ``|t-p|^(r-1)`` (r < 1) and the small ``p(1-p)`` never overflow on their own;
at ``t == p`` it is taken as 0.

The target is either a tensor or, in the ``from_landmarks`` variant, a Gaussian
``exp(-((col-x)^2 + (row-y)^2) / (2 sigma^2))`` evaluated in registers from the
landmark coordinates, so no target heatmap is ever allocated.

Forward and backward are each one pass.  Backward recomputes the per-element
gradient instead of saving it from the forward; per element (n = numel, b bytes):

    target variant      save grad: fwd x,t -> g (3nb) + bwd g -> dx (2nb) = 5nb, +nb memory
                        recompute: fwd x,t (2nb)     + bwd x,t -> dx (3nb) = 5nb
    landmarks variant   save grad: fwd x -> g (2nb)   + bwd g -> dx (2nb)  = 4nb, +nb memory
                        recompute: fwd x (nb)         + bwd x -> dx (2nb)  = 3nb

so recomputing moves the same or fewer bytes and holds no extra n-sized buffer
between forward and backward (the math is ~30 FLOPs/element, far below the
H100's FLOP:byte balance).  Reductions write one partial sum per program and
finish in a one-program kernel that adds them in a fixed order, divides by numel for
"mean" and casts to the logits' dtype (no host sync, no atomics: deterministic).  A
forward is therefore 1 launch ("none") or 2, a backward 1 (plus copies of non-contiguous
inputs).  The grid is 1-D (B*L rows x chunks), so B*L is not bounded by the 65535 limit
of grid axes 1 and 2.  float scalars are fp64 kernel parameters (Triton's launcher would
pass plain Python floats as fp32) and launches run under the tensors' device guard.
On CUDA the launch configuration is autotuned (``TUNING_CONFIGS``, hand-picked one first;
never under the interpreter).  Eager calls on plain tensors launch the kernels from a
``torch.autograd.Function`` (the least host time); traced calls (torch.compile, export, fake
tensors) reach them, with torch >= 2.6, through ``torch.library.triton_op`` ops
(``coorkern::central_loss_triton[_backward]``, kernels wrapped by ``wrap_triton``) that
Inductor and torch.export can see into; the C++-schema ops ``coorkern::central_loss*`` keep
their opaque CUDA kernels for dispatcher callers, and torch 2.4/2.5 trace those.

SASS instructions per element of the loop body (fp32, r = 2, 8 warps; growth of the
static count from 4 to 8 elements per thread, ``test_sass_instructions_per_element``),
before -> after one reciprocal (no second division: log1p from log(u) and the exact
rounding error of u = 1 + e), 32-bit in-row offsets and a float32 row/column split:

    variant            pass      sm_80           sm_90
    from landmarks     forward   98.3 -> 74.3    100.8 -> 73.5
    from landmarks     backward  110.3 -> 81.8   116.8 -> 79.5
    target tensor      forward   73.3 -> 58.0    80.8 -> 57.5
    target tensor      backward  84.0 -> 65.0    99.8 -> 64.8

(triton 3.9, AOT compiles via ``coorkern._triton_aot``; nothing here ran on a GPU.  With
triton 3.7.1 the "after" counts are 80.5 / 85.0 / 59.5 / 68.0 on sm_80 and 80.5 / 85.8 /
61.5 / 67.8 on sm_90.)
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _backend, reference
from .._checks import check_choice, check_number, check_same_device, check_tensor
from .._library import define_op
from ._host import HAS_TRITON_OP, cdiv, device_guard, direct_launches, launchable, plain_eager

REDUCTIONS = ("mean", "sum", "none")

# Kernel modes (constexpr): what one pass writes.
_MODE_LOSS_NONE = 0  # per-element loss
_MODE_LOSS_SUM = 1  # one partial sum per program
_MODE_GRAD = 2  # per-element gradient scaled by grad_output


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
    # 8-12 bytes in fp32; memory bound on an H100 for integer r.  The grid is 1-D
    # (rows x chunks_per_row programs), so B*L is not limited to 65535 rows.
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


def integer_power(r: float) -> int:
    """The kernels' specialization of r: the integer itself for 0..4, else -1 (general)."""
    return int(r) if r in (0.0, 1.0, 2.0, 3.0, 4.0) else -1


# CUDA launch configurations (BLOCK, num_warps) autotuned per (mode, variant, r, dtype,
# arch); the hand-picked choice first; 8 elements per thread except in the 1024 x 4 one.
# CHUNK stays fixed so that the number of partial sums does not depend on the choice.
# float64 keeps to BLOCK <= 2048: 16 warps cap a thread at 128 registers and the general-r
# fp64 kernels then spill.  The interpreter (~1 ms per program instance) runs one large
# block per program and no autotuning.
TUNING_CONFIGS = ((2048, 8), (1024, 4), (4096, 16))
FLOAT64_MAX_BLOCK = 2048
CUDA_CHUNK = 8192
INTERPRETER_CHUNK = 16384
FINISH_BLOCK = 1024
FAST_ROW_PIXELS = 1 << 22  # below this, _pixel_row_col's float32 row is exact


def tuning_configs(float64: bool) -> list[tuple[int, int]]:
    """The (BLOCK, num_warps) choices the CUDA autotuner tries for a dtype."""
    return [(b, w) for b, w in TUNING_CONFIGS if not float64 or b <= FLOAT64_MAX_BLOCK]


def _prune_configs(configs, named_args, **kwargs):
    float64 = kwargs.get("ACC") == tl.float64
    allowed = tuning_configs(float64)
    return [c for c in configs if (c.kwargs["BLOCK"], c.num_warps) in allowed]


_tuned_kernel = None


def _cuda_kernel():
    global _tuned_kernel
    if _tuned_kernel is None:
        configs = [triton.Config({"BLOCK": block}, num_warps=warps) for block, warps in TUNING_CONFIGS]
        # Every constexpr but the tuned BLOCK, the fixed CHUNK and ACC (which follows the tensor
        # dtypes, part of every autotune key).
        key = ["MODE", "FROM_LANDMARKS", "HAS_RADIUS", "GRAD_OUT_SCALAR", "R_INT", "FAST_ROW", "ARCH"]
        _tuned_kernel = triton.autotune(configs=configs, key=key,
                                        prune_configs_by={"early_config_prune": _prune_configs})(_central_loss_kernel)
    return _tuned_kernel


def _launch(kernel, grid, *args, **meta):
    """Every kernel launch of this module goes through here (tests count them)."""
    launchable(kernel, args[0].device, HAS_TRITON_OP)[grid](*args, **meta)


_device_guard = device_guard  # a module global: tests replace it


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ---------------------------------------------------------------------------
# Ahead-of-time variants for the C++ library's CUDA kernels (coorkern._aot_codegen), launched
# by csrc/aot/central_loss_cuda.cpp exactly as _triton_pass launches them: same arguments
# (fp64 scalars), 1-D grid of rows x chunks (CHUNK = CUDA_CHUNK), _finish_sum_kernel for
# mean/sum.  What C++ fixes at build time instead: the hand-picked launch configuration
# (no autotuning), float32/float64 kernels (float16/bfloat16 are computed in float32), R_INT
# 2 or the general -1, ``inner`` as i64 (any size, one variant), and no radius run as
# HAS_RADIUS with radius2 = inf (same values).  FAST_ROW matters to the landmark kernels
# only: both settings are compiled for them.
AOT_CONFIG = TUNING_CONFIGS[0]  # (BLOCK, num_warps)
AOT_VARIANTS = [
    dict(kernel="central_loss", mode=mode, from_landmarks=lm, fast_row=fast_row, dtype=dtype, r_int=r_int,
         grad_out_scalar=scalar)
    for mode, scalar in ((_MODE_LOSS_NONE, True), (_MODE_LOSS_SUM, True), (_MODE_GRAD, True), (_MODE_GRAD, False))
    for lm, fast_row in ((False, True), (True, True), (True, False))
    for dtype in ("fp32", "fp64")
    for r_int in (2, -1)
] + [dict(kernel="finish_sum", dtype=dtype) for dtype in ("fp32", "fp64")]


def aot_spec(kernel: str, dtype: str, arch: int, mode: int = _MODE_LOSS_NONE, from_landmarks: bool = False,
             fast_row: bool = True, r_int: int = 2, grad_out_scalar: bool = True):
    """``(kernel, signature, constexprs, config, divisible)`` of one ``AOT_VARIANTS`` entry for
    ``arch`` as the C++ launcher runs it (contiguous inputs, 16-byte aligned pointers), for
    ``coorkern._triton_aot.CompileRequest``; ``dtype`` is the Triton name of the logits' (and
    the compute dtype: the launcher converts float16/bfloat16 first)."""
    acc = tl.float64 if dtype == "fp64" else tl.float32
    ptr = f"*{dtype}"
    if kernel == "finish_sum":  # the partial sums -> the loss, both in the compute dtype
        signature = {"partials_ptr": ptr, "out_ptr": ptr, "count": "i32", "divisor": "fp64"}
        return (_finish_sum_kernel, signature, {"ACC": acc, "BLOCK": FINISH_BLOCK},
                {"num_warps": 4, "num_stages": 3}, ["partials_ptr", "out_ptr"])
    signature = {
        "x_ptr": ptr, "t_ptr": ptr, "lm_ptr": ptr, "grad_out_ptr": ptr, "out_ptr": ptr,
        "inner": "i64", "chunks_per_row": "i32", "width": "i32",
        "r": "fp64", "inv_two_sigma2": "fp64", "radius2": "fp64", "grad_scale": "fp64",
    }
    block, num_warps = AOT_CONFIG
    constexprs = {
        "MODE": mode, "FROM_LANDMARKS": from_landmarks, "HAS_RADIUS": from_landmarks,
        "GRAD_OUT_SCALAR": grad_out_scalar, "R_INT": r_int, "ACC": acc, "FAST_ROW": fast_row,
        "CHUNK": CUDA_CHUNK, "ARCH": arch, "BLOCK": block,
    }
    divisible = [name for name, ty in signature.items() if ty.startswith("*")]
    return _central_loss_kernel, signature, constexprs, {"num_warps": num_warps, "num_stages": 3}, divisible


def _triton_pass(mode, logits, target, landmarks, sigma, r, reduction, radius, grad_output=None):
    """One kernel pass over ``logits`` (+ the finishing sum); returns loss or gradient."""
    x = logits.contiguous()
    numel = x.numel()
    if landmarks is not None:
        width = x.shape[-1]
        inner = x.shape[-2] * width
        rows = numel // inner if inner else 0
        t = data = landmarks.contiguous()  # any float dtype: the kernel converts on load
    else:
        width, inner, rows = 1, numel, 1
        t = data = target.contiguous()
    interpreted = x.device.type == "cpu"
    chunk = INTERPRETER_CHUNK if interpreted else CUDA_CHUNK
    chunks_per_row = cdiv(inner, chunk)
    programs = rows * chunks_per_row
    acc_dtype = _compute_dtype(x.dtype)

    if mode == _MODE_LOSS_SUM:
        out = torch.empty(max(programs, 1), device=x.device, dtype=acc_dtype)
    else:
        out = torch.empty_like(x)
    scalar_grad = reduction != "none"
    g_out = x  # unused pointer slot unless MODE_GRAD
    if mode == _MODE_GRAD:
        g_out = grad_output if scalar_grad else grad_output.expand_as(x).contiguous()
    if interpreted:
        kernel, meta = _central_loss_kernel, {"BLOCK": chunk, "ARCH": 0}
    else:
        major, minor = torch.cuda.get_device_capability(x.device)
        kernel, meta = _cuda_kernel(), {"ARCH": 10 * major + minor}
    with _device_guard(x):
        if programs > 0:
            _launch(
                kernel, (programs,),
                x, t, data, g_out, out,
                inner, chunks_per_row, width, float(r),
                1.0 / (2.0 * sigma * sigma), float(radius) ** 2 if radius is not None else 0.0,
                1.0 / numel if reduction == "mean" else 1.0,
                MODE=mode, FROM_LANDMARKS=landmarks is not None, HAS_RADIUS=radius is not None,
                GRAD_OUT_SCALAR=scalar_grad, R_INT=integer_power(r), ACC=_tl_dtype(x.dtype),
                FAST_ROW=inner < FAST_ROW_PIXELS, CHUNK=chunk, **meta,
            )
        if mode == _MODE_LOSS_SUM:
            total = torch.empty((), device=x.device, dtype=logits.dtype)
            _launch(_finish_sum_kernel, (1,), out, total, programs, float(numel) if reduction == "mean" else 1.0,
                    ACC=_tl_dtype(x.dtype), BLOCK=FINISH_BLOCK)
            return total
    return out.view(logits.shape)


def _triton_loss(logits, target, landmarks, sigma, r, reduction, radius):
    mode = _MODE_LOSS_NONE if reduction == "none" else _MODE_LOSS_SUM
    return _triton_pass(mode, logits, target, landmarks, sigma, r, reduction, radius)


def _triton_grad(grad_output, logits, target, landmarks, sigma, r, reduction, radius):
    return _triton_pass(_MODE_GRAD, logits, target, landmarks, sigma, r, reduction, radius, grad_output)


# ---------------------------------------------------------------------------
# torch.library registration: torch.ops.coorkern.central_loss[_from_landmarks][_backward]
# The schemas are also in csrc/central_loss.cpp (a test checks they agree).

SCHEMAS = {
    "central_loss": "central_loss(Tensor logits, Tensor target, float r, str reduction) -> Tensor",
    "central_loss_backward": (
        "central_loss_backward(Tensor grad_output, Tensor logits, Tensor target, float r, str reduction) -> Tensor"
    ),
    "central_loss_from_landmarks": (
        "central_loss_from_landmarks(Tensor logits, Tensor landmarks, float sigma, float r, str reduction, "
        "float? radius) -> Tensor"
    ),
    "central_loss_from_landmarks_backward": (
        "central_loss_from_landmarks_backward(Tensor grad_output, Tensor logits, Tensor landmarks, float sigma, "
        "float r, str reduction, float? radius) -> Tensor"
    ),
}


def _reference_vjp(loss_fn, grad_output, logits, *args):
    """grad_output^T d loss_fn(logits, *args) / d logits, by autograd of the eager reference."""
    with torch.enable_grad():
        x = logits.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x, *args), x, grad_output)
    return grad


def _reference_grad(grad_output, logits, target, r, reduction):
    return _reference_vjp(reference.central_loss, grad_output, logits, target, r, reduction)


def _reference_landmarks_grad(grad_output, logits, landmarks, sigma, r, reduction, radius):
    # The backward of the fallback forward below (the target is not rounded to logits' dtype).
    return _reference_vjp(reference.central_loss_from_landmarks, grad_output, logits, landmarks, sigma, r,
                          reduction, radius)


_cl_op = define_op(SCHEMAS["central_loss"], lambda x, t, r, red: reference.central_loss(x, t, r, red))
_cl_bwd_op = define_op(SCHEMAS["central_loss_backward"], _reference_grad)
_lm_op = define_op(
    SCHEMAS["central_loss_from_landmarks"],
    lambda x, lm, s, r, red, rad: reference.central_loss_from_landmarks(x, lm, s, r, red, rad),
)
_lm_bwd_op = define_op(SCHEMAS["central_loss_from_landmarks_backward"], _reference_landmarks_grad)


def _direct_forward(logits, data, sigma, r, reduction, radius, from_landmarks):
    """The kernels on real tensors (the opaque ops' CUDA kernels, the eager autograd.Function),
    with the triton_op's arguments: launched directly, never through wrap_triton (whose
    wrapper is for the traced triton_op)."""
    with direct_launches():
        return _triton_op_forward(logits, data, sigma, r, reduction, radius, from_landmarks)


def _direct_backward(grad_output, logits, data, sigma, r, reduction, radius, from_landmarks):
    with direct_launches():
        return _triton_op_backward(grad_output, logits, data, sigma, r, reduction, radius, from_landmarks)


def _cl_cuda(logits, target, r, reduction):
    return _direct_forward(logits, target, 1.0, r, reduction, None, False)


def _cl_bwd_cuda(grad_output, logits, target, r, reduction):
    return _direct_backward(grad_output, logits, target, 1.0, r, reduction, None, False)


def _lm_cuda(logits, landmarks, sigma, r, reduction, radius):
    return _direct_forward(logits, landmarks, sigma, r, reduction, radius, True)


def _lm_bwd_cuda(grad_output, logits, landmarks, sigma, r, reduction, radius):
    return _direct_backward(grad_output, logits, landmarks, sigma, r, reduction, radius, True)


# (Registered by call: register_kernel as a decorator returns None, not the function.)
torch.library.register_kernel("coorkern::central_loss", "cuda", _cl_cuda)
torch.library.register_kernel("coorkern::central_loss_backward", "cuda", _cl_bwd_cuda)
torch.library.register_kernel("coorkern::central_loss_from_landmarks", "cuda", _lm_cuda)
torch.library.register_kernel("coorkern::central_loss_from_landmarks_backward", "cuda", _lm_bwd_cuda)


@torch.library.register_fake("coorkern::central_loss")
def _fake_loss(logits, target, r, reduction):
    return logits.new_empty(logits.shape if reduction == "none" else ())


@torch.library.register_fake("coorkern::central_loss_from_landmarks")
def _fake_landmarks_loss(logits, landmarks, sigma, r, reduction, radius):
    return _fake_loss(logits, None, r, reduction)


def _fake_grad(grad_output, logits, *params):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


torch.library.register_fake("coorkern::central_loss_backward")(_fake_grad)
torch.library.register_fake("coorkern::central_loss_from_landmarks_backward")(_fake_grad)


def _setup_context(ctx, inputs, output):
    # logits and target/landmarks are saved by reference (no copy); the rest are scalars.
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.params = inputs[2:]


def _cl_backward(ctx, grad_output):
    logits, target = ctx.saved_tensors
    return _cl_bwd_op(grad_output, logits, target, *ctx.params), None, None, None


def _lm_backward(ctx, grad_output):
    logits, landmarks = ctx.saved_tensors
    return _lm_bwd_op(grad_output, logits, landmarks, *ctx.params), None, None, None, None, None


torch.library.register_autograd("coorkern::central_loss", _cl_backward, setup_context=_setup_context)
torch.library.register_autograd("coorkern::central_loss_from_landmarks", _lm_backward, setup_context=_setup_context)


# The two triton_op bodies are kept out of mutation testing (bench/mutation.py): torch infers
# their schema from the annotations, which mutmut's trampoline wrapper cannot resolve.
def _triton_op_forward(logits: torch.Tensor, data: torch.Tensor, sigma: float, r: float, reduction: str,
                       radius: Optional[float], from_landmarks: bool) -> torch.Tensor:  # pragma: no mutate block
    target, landmarks = (None, data) if from_landmarks else (data, None)
    return _triton_loss(logits, target, landmarks, sigma, r, reduction, radius)


def _triton_op_backward(grad_output: torch.Tensor, logits: torch.Tensor, data: torch.Tensor, sigma: float, r: float,
                        reduction: str, radius: Optional[float],
                        from_landmarks: bool) -> torch.Tensor:  # pragma: no mutate block
    target, landmarks = (None, data) if from_landmarks else (data, None)
    return _triton_grad(grad_output, logits, target, landmarks, sigma, r, reduction, radius)


_TRITON_OP_SCHEMAS = {
    "central_loss_triton": "(Tensor logits, Tensor data, float sigma, float r, str reduction, float? radius, "
                           "bool from_landmarks) -> Tensor",
    "central_loss_triton_backward": "(Tensor grad_output, Tensor logits, Tensor data, float sigma, float r, "
                                    "str reduction, float? radius, bool from_landmarks) -> Tensor",
}

if HAS_TRITON_OP:
    _triton_fwd_op = torch.library.triton_op("coorkern::central_loss_triton", _triton_op_forward, mutates_args=(),
                                             schema=_TRITON_OP_SCHEMAS["central_loss_triton"])
    _triton_bwd_op = torch.library.triton_op("coorkern::central_loss_triton_backward", _triton_op_backward,
                                             mutates_args=(),
                                             schema=_TRITON_OP_SCHEMAS["central_loss_triton_backward"])

    def _triton_op_autograd(ctx, grad_output):
        return _logits_grad(_triton_bwd_op, ctx, grad_output)

    _triton_fwd_op.register_autograd(_triton_op_autograd, setup_context=_setup_context)


def _logits_grad(backward, ctx, grad_output) -> tuple:
    """Gradients of the 7 triton_op-style inputs (only logits gets one) by ``backward``, one of
    the two backward paths (the triton_op's, the eager Function's), from ``_setup_context``'s
    saved state."""
    logits, data = ctx.saved_tensors
    return (backward(grad_output, logits, data, *ctx.params),) + (None,) * 6


def _triton_apply(logits, target, landmarks, sigma, r, reduction, radius):
    """The Triton kernels with autograd.  Eager calls on plain tensors take the
    autograd.Function (``plain_eager``: less host time than the custom-op dispatch); traced
    ones the triton_op where torch has it (Inductor sees its kernels), else the opaque
    registered ops (torch 2.4/2.5; the interpreter's CPU tensors keep the autograd.Function)."""
    from_landmarks = landmarks is not None
    data = landmarks if from_landmarks else target
    if plain_eager(logits, data):
        return _TritonEager.apply(logits, data, sigma, r, reduction, radius, from_landmarks)
    if HAS_TRITON_OP:
        return _triton_fwd_op(logits, data, sigma, r, reduction, radius, from_landmarks)
    if logits.device.type == "cpu":
        return _TritonEager.apply(logits, data, sigma, r, reduction, radius, from_landmarks)
    if from_landmarks:
        return _lm_op(logits, landmarks, sigma, r, reduction, radius)
    return _cl_op(logits, target, r, reduction)


class _TritonEager(torch.autograd.Function):
    """Autograd for the Triton kernels called eagerly (CUDA, and CPU tensors under the
    interpreter), launched directly: no custom-op dispatch, no ``wrap_triton``.  The
    triton_op's arguments and saved context."""

    @staticmethod
    def forward(ctx, logits, data, sigma, r, reduction, radius, from_landmarks):
        _setup_context(ctx, (logits, data, sigma, r, reduction, radius, from_landmarks), None)
        return _direct_forward(logits, data, sigma, r, reduction, radius, from_landmarks)

    @staticmethod
    def backward(ctx, grad_output):
        return _logits_grad(_direct_backward, ctx, grad_output)


# ---------------------------------------------------------------------------
# Public API


def _check_common(logits, r, reduction):
    check_tensor("logits", logits)
    r = check_number("r", r, minimum=0.0)
    check_choice("reduction", reduction, REDUCTIONS)
    return r


def central_loss(logits: torch.Tensor, target: torch.Tensor, r: float = 2.0, reduction: str = "mean") -> torch.Tensor:
    """Central loss between ``logits`` and a probability ``target`` of the same shape.

    Args:
        logits: any shape, typically ``(B, L, H, W)``; float32/float16/bfloat16/float64.
        target: same shape, values in [0, 1]; cast to ``logits.dtype`` if it differs.
        r: exponent of the difference-modulating term ``|t - p|^r`` (r >= 0; 0 is BCE).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Gradients flow to ``logits`` only; the target is data.
    """
    r = _check_common(logits, r, reduction)
    check_tensor("target", target)
    if target.shape != logits.shape:
        raise ValueError(
            f"target must have the shape of logits {tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    device = check_same_device(logits=logits, target=target)
    target = target.detach().to(logits.dtype)
    impl = _backend.resolve(device, "central_loss")
    if impl == "reference":
        return reference.central_loss(logits, target, r, reduction)
    if impl == "triton":
        return _triton_apply(logits, target, None, 1.0, r, reduction, None)
    return _cl_op(logits, target, r, reduction)


def central_loss_from_landmarks(
    logits: torch.Tensor,
    landmarks: torch.Tensor,
    sigma: float = 3.0,
    r: float = 2.0,
    reduction: str = "mean",
    radius: Optional[float] = None,
) -> torch.Tensor:
    """Central loss against Gaussian targets built inside the kernel from landmarks.

    Args:
        logits: ``(B, L, H, W)`` (any leading dims ``(*, H, W)``).
        landmarks: ``(B, L, 2)`` (``(*, 2)``) pixel coordinates (x = column, y = row) in
            the heatmap's grid; a NaN coordinate marks a missing landmark (target 0).
        sigma: Gaussian standard deviation in pixels (> 0); the peak value is 1.
        radius: if given, the target is 0 farther than ``radius`` pixels from the landmark.
    """
    r = _check_common(logits, r, reduction)
    sigma = check_number("sigma", sigma, minimum=0.0, strict=True)
    if radius is not None:
        radius = check_number("radius", radius, minimum=0.0)
    check_tensor("landmarks", landmarks)
    if logits.dim() < 3:
        raise ValueError(f"logits must have shape (B, L, H, W) (at least 3-D), got {tuple(logits.shape)}")
    expected = tuple(logits.shape[:-2]) + (2,)
    if tuple(landmarks.shape) != expected:
        raise ValueError(
            f"landmarks must have shape {expected} (logits' leading dims, then x, y), got {tuple(landmarks.shape)}"
        )
    if logits.shape[-2] * logits.shape[-1] >= 2**31:
        raise ValueError(f"logits heatmaps must have fewer than 2^31 pixels, got {tuple(logits.shape[-2:])}")
    device = check_same_device(logits=logits, landmarks=landmarks)
    landmarks = landmarks.detach()
    impl = _backend.resolve(device, "central_loss_from_landmarks")
    if impl == "reference":
        return reference.central_loss_from_landmarks(logits, landmarks, sigma, r, reduction, radius)
    if impl == "triton":
        return _triton_apply(logits, None, landmarks, sigma, r, reduction, radius)
    return _lm_op(logits, landmarks, sigma, r, reduction, radius)


class CentralLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`central_loss` (``forward(logits, target)``)."""

    def __init__(self, r: float = 2.0, reduction: str = "mean") -> None:
        super().__init__()
        self.r = check_number("r", r, minimum=0.0)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return central_loss(logits, target, self.r, self.reduction)

    def extra_repr(self) -> str:
        return f"r={self.r}, reduction={self.reduction!r}"

