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
finish with a device-side ``sum`` (no host sync, no atomics: deterministic).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _backend, reference
from .._checks import check_choice, check_number, check_same_device, check_tensor
from .._library import define_op

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
    inv_u = 1.0 / u
    p = tl.where(x >= 0.0, inv_u, e * inv_u)  # sigmoid(x)
    q = tl.where(x >= 0.0, e * inv_u, inv_u)  # 1 - sigmoid(x), without cancellation
    # log(1 + e) without libdevice log1p: log(u) * e / (u - 1) cancels the rounding of
    # u = 1 + e (Goldberg's trick); u == 1 means e is below half an ulp.
    log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
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
        dw = tl.where(d != 0.0, tl.where(d > 0.0, -r, r) * mag, 0.0)  # taken as 0 at t == p
        grad = dw * bce + w * (p - t)
    return loss, grad


@triton.jit
def _central_loss_kernel(
    x_ptr,  # logits, contiguous, viewed as (outer, inner)
    t_ptr,  # target (same layout) -- unused when FROM_LANDMARKS
    lm_ptr,  # landmarks (outer, 2) as (x, y) -- used when FROM_LANDMARKS
    grad_out_ptr,  # MODE_GRAD: grad of the loss output (scalar or per element)
    out_ptr,  # MODE_LOSS_NONE: loss; MODE_LOSS_SUM: partials (outer, programs); MODE_GRAD: grad
    inner,  # elements per row of the (outer, inner) view; H*W for landmarks
    width,  # W (landmarks only)
    r,
    inv_two_sigma2,
    radius2,
    grad_scale,  # 1/numel for mean, 1 for sum/none
    MODE: tl.constexpr,
    FROM_LANDMARKS: tl.constexpr,
    HAS_RADIUS: tl.constexpr,
    GRAD_OUT_SCALAR: tl.constexpr,
    R_INT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Per element: read x (+ t), write loss or grad (+ read grad_out for "none"), i.e.
    # 8-12 bytes in fp32; ~35 FLOPs, 1 exp + 1 log + 2 div (+1 exp for the Gaussian,
    # +2-3 exp/log for non-integer r): memory bound on an H100 for integer r.
    pid_inner = tl.program_id(0)
    row_id = tl.program_id(1)
    local = pid_inner.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = local < inner
    offs = row_id.to(tl.int64) * inner + local  # int64: numel may exceed 2^31
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    if FROM_LANDMARKS:
        pix = local.to(tl.int32)  # H*W < 2^31 is checked on the host
        row = pix // width
        col = pix - row * width
        lx = tl.load(lm_ptr + row_id * 2).to(ACC)
        ly = tl.load(lm_ptr + row_id * 2 + 1).to(ACC)
        dx = col.to(ACC) - lx
        dy = row.to(ACC) - ly
        dist2 = dx * dx + dy * dy
        t = tl.exp(-dist2 * inv_two_sigma2)
        if HAS_RADIUS:
            t = tl.where(dist2 > radius2, 0.0, t)
        t = tl.where((lx == lx) & (ly == ly), t, 0.0)  # NaN landmark = missing: target 0
    else:
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(ACC)
    loss, grad = _central_loss_terms(x, t, r, R_INT, MODE == 2)
    if MODE == 0:
        tl.store(out_ptr + offs, loss.to(out_ptr.dtype.element_ty), mask=mask)
    elif MODE == 1:
        partial = tl.sum(tl.where(mask, loss, 0.0), axis=0)
        tl.store(out_ptr + row_id.to(tl.int64) * tl.num_programs(0) + pid_inner, partial)
    else:
        if GRAD_OUT_SCALAR:
            g_out = tl.load(grad_out_ptr).to(ACC) * grad_scale
        else:
            g_out = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + offs, (grad * g_out).to(out_ptr.dtype.element_ty), mask=mask)


def integer_power(r: float) -> int:
    """The kernels' specialization of r: the integer itself for 0..4, else -1 (general)."""
    return int(r) if r in (0.0, 1.0, 2.0, 3.0, 4.0) else -1


_GPU_BLOCK, _GPU_WARPS = 2048, 8


def _launch_config() -> tuple[int, int]:
    # The interpreter costs ~1 ms per program instance: use few, large blocks there.
    if _backend.triton_interpreter_enabled():
        return 16384, 4
    return _GPU_BLOCK, _GPU_WARPS


# Ahead-of-time variants for the C++ library's CUDA kernels (coorkern._aot_codegen;
# launched by csrc/aot/central_loss_cuda.cpp, which picks R_INT 2 or the general -1 and
# computes half inputs in float32).  No radius runs as HAS_RADIUS with radius2 = inf.
AOT_VARIANTS = [
    dict(mode=mode, from_landmarks=lm, dtype=dtype, r_int=r_int, grad_out_scalar=scalar)
    for mode, scalar in ((_MODE_LOSS_NONE, True), (_MODE_LOSS_SUM, True), (_MODE_GRAD, True), (_MODE_GRAD, False))
    for lm in (False, True)
    for dtype in ("fp32", "fp64")
    for r_int in (2, -1)
]


def aot_spec(mode: int, from_landmarks: bool, dtype: str, r_int: int, grad_out_scalar: bool = True):
    """``(kernel, signature, constexprs, config, divisible)`` of ``_central_loss_kernel`` as
    the C++ launcher runs it (contiguous inputs, 16-byte aligned pointers), for
    ``coorkern._triton_aot.CompileRequest``; ``dtype`` is the Triton name of the logits'."""
    acc = "fp64" if dtype == "fp64" else "fp32"
    ptr = f"*{dtype}"
    signature = {
        "x_ptr": ptr, "t_ptr": ptr, "lm_ptr": f"*{acc}", "grad_out_ptr": ptr,
        "out_ptr": f"*{acc}" if mode == _MODE_LOSS_SUM else ptr, "inner": "i64", "width": "i32", "r": "fp32",
        "inv_two_sigma2": "fp32", "radius2": "fp32", "grad_scale": "fp32",
    }
    constexprs = {
        "MODE": mode, "FROM_LANDMARKS": from_landmarks, "HAS_RADIUS": from_landmarks,
        "GRAD_OUT_SCALAR": grad_out_scalar, "R_INT": r_int, "ACC": tl.float64 if acc == "fp64" else tl.float32,
        "BLOCK": _GPU_BLOCK,
    }
    divisible = [name for name, ty in signature.items() if ty.startswith("*")]
    return _central_loss_kernel, signature, constexprs, {"num_warps": _GPU_WARPS, "num_stages": 3}, divisible


def _triton_pass(mode, logits, target, landmarks, sigma, r, reduction, radius, grad_output=None):
    """One kernel pass over ``logits``; returns loss, partial sums or the gradient."""
    x = logits.contiguous()
    numel = x.numel()
    if landmarks is not None:
        height, width = x.shape[-2], x.shape[-1]
        inner, outer = height * width, numel // max(height * width, 1)
        data = landmarks.to(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        data = data.contiguous()
        t = data  # unused pointer slot
    else:
        width, inner, outer = 1, numel, 1
        t = target.contiguous()
        data = t  # unused pointer slot
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    block, num_warps = _launch_config()
    programs = triton.cdiv(inner, block)

    if mode == _MODE_LOSS_SUM:
        out = torch.empty((outer, programs), device=x.device, dtype=acc_dtype)
    else:
        out = torch.empty_like(x)
    g_out = grad_output
    scalar_grad = reduction != "none"
    if mode == _MODE_GRAD:
        g_out = grad_output if scalar_grad else grad_output.expand_as(x).contiguous()
    if numel > 0:
        _central_loss_kernel[(programs, outer)](
            x, t, data, g_out if g_out is not None else x, out,
            inner, width, float(r),
            1.0 / (2.0 * sigma * sigma), float(radius) ** 2 if radius is not None else 0.0,
            1.0 / numel if reduction == "mean" else 1.0,
            MODE=mode, FROM_LANDMARKS=landmarks is not None, HAS_RADIUS=radius is not None,
            GRAD_OUT_SCALAR=scalar_grad, R_INT=integer_power(r), ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
            BLOCK=block, num_warps=num_warps,
        )
    if mode == _MODE_LOSS_SUM:
        total = out.sum()
        return (total / numel if reduction == "mean" else total).to(logits.dtype)
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


def _reference_grad(grad_output, logits, target, r, reduction):
    with torch.enable_grad():
        x = logits.detach().requires_grad_(True)
        loss = reference.central_loss(x, target, r, reduction)
        (grad,) = torch.autograd.grad(loss, x, grad_output)
    return grad


def _reference_landmarks_grad(grad_output, logits, landmarks, sigma, r, reduction, radius):
    target = reference.gaussian_heatmaps(landmarks, logits.shape[-2], logits.shape[-1], sigma, radius)
    return _reference_grad(grad_output, logits, target.to(logits.dtype), r, reduction)


_cl_op = define_op(SCHEMAS["central_loss"], lambda x, t, r, red: reference.central_loss(x, t, r, red))
_cl_bwd_op = define_op(SCHEMAS["central_loss_backward"], _reference_grad)
_lm_op = define_op(
    SCHEMAS["central_loss_from_landmarks"],
    lambda x, lm, s, r, red, rad: reference.central_loss_from_landmarks(x, lm, s, r, red, rad),
)
_lm_bwd_op = define_op(SCHEMAS["central_loss_from_landmarks_backward"], _reference_landmarks_grad)


@torch.library.register_kernel("coorkern::central_loss", "cuda")
def _cl_cuda(logits, target, r, reduction):
    return _triton_loss(logits, target, None, 1.0, r, reduction, None)


@torch.library.register_kernel("coorkern::central_loss_backward", "cuda")
def _cl_bwd_cuda(grad_output, logits, target, r, reduction):
    return _triton_grad(grad_output, logits, target, None, 1.0, r, reduction, None)


@torch.library.register_kernel("coorkern::central_loss_from_landmarks", "cuda")
def _lm_cuda(logits, landmarks, sigma, r, reduction, radius):
    return _triton_loss(logits, None, landmarks, sigma, r, reduction, radius)


@torch.library.register_kernel("coorkern::central_loss_from_landmarks_backward", "cuda")
def _lm_bwd_cuda(grad_output, logits, landmarks, sigma, r, reduction, radius):
    return _triton_grad(grad_output, logits, None, landmarks, sigma, r, reduction, radius)


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


class _TritonOnCPU(torch.autograd.Function):
    """Autograd for the Triton kernels on CPU tensors (interpreter; tests only).

    On CUDA the same launchers run behind ``torch.ops.coorkern.*``; on CPU that
    dispatch key belongs to the C++ kernels, so the interpreter path is wired here.
    """

    @staticmethod
    def forward(ctx, logits, target, landmarks, sigma, r, reduction, radius):
        ctx.args = (sigma, r, reduction, radius)
        ctx.save_for_backward(logits, target, landmarks)
        return _triton_loss(logits, target, landmarks, sigma, r, reduction, radius)

    @staticmethod
    def backward(ctx, grad_output):
        logits, target, landmarks = ctx.saved_tensors
        grad = _triton_grad(grad_output, logits, target, landmarks, *ctx.args)
        return grad, None, None, None, None, None, None


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
    if impl == "triton" and device.type == "cpu":
        return _TritonOnCPU.apply(logits, target, None, 1.0, r, reduction, None)
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
    if impl == "triton" and device.type == "cpu":
        return _TritonOnCPU.apply(logits, None, landmarks, sigma, r, reduction, radius)
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

