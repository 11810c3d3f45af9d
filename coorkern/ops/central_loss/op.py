"""The central loss as an op: its ``torch.library`` schemas and registrations, fake kernels,
autograd, the eager ``autograd.Function``, and the public functions.

The call routes of the Triton kernels (eager Function, traced triton_op, C++-schema op) are
listed in the package docstring; the kernels' host side is ``launch``, the fallbacks without
Triton are the eager oracles of ``coorkern.reference``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ... import reference
from ..._checks import check_choice, check_number, check_same_device, check_tensor
from .._runtime import backend as _backend
from .._runtime.host import HAS_TRITON_OP, direct_launches, plain_eager
from .._runtime.library import define_op
from . import launch

REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------------------
# torch.library registration: torch.ops.coorkern.central_loss[_from_landmarks][_backward]
# The schemas are also in csrc/ops/central_loss.cpp (a test checks they agree).

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
    return launch._triton_loss(logits, target, landmarks, sigma, r, reduction, radius)


def _triton_op_backward(grad_output: torch.Tensor, logits: torch.Tensor, data: torch.Tensor, sigma: float, r: float,
                        reduction: str, radius: Optional[float],
                        from_landmarks: bool) -> torch.Tensor:  # pragma: no mutate block
    target, landmarks = (None, data) if from_landmarks else (data, None)
    return launch._triton_grad(grad_output, logits, target, landmarks, sigma, r, reduction, radius)


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
