"""Coordinate-indexed attention as an op: its ``torch.library`` schemas and registrations,
fake kernels, autograd, the eager ``autograd.Function``, and the public function.

::

    Qs = sample(q, coords)  Ks = sample(k, coords)  Vs = v          (sample="qk", the paper)
    Qs = q                  Ks = sample(k, coords)  Vs = sample(v)  (sample="kv", DAT / released code)
    out = softmax(Qs Ks^T * scale) Vs                               (B, heads, Nq, d)

``sample(m, coords)`` is ``F.grid_sample(mode="bilinear", padding_mode="zeros")`` of a
channels-last map ``m`` ``(B, heads, H, W, d)`` at normalized (x, y) coordinates
``(B, N, 2)`` (shared by the heads) or ``(B, heads, N, 2)``; tokens are ``(B, heads, N, d)``.

What runs is decided here: the eager oracle, ATen's ``grid_sample`` + SDPA (``auto`` on
CUDA, :func:`cuda_attention_path`), the Triton kernels (host side in ``launch``; call routes
in the package docstring) or the registered op (the C++ kernels on CPU).
``torch.ops.coorkern.coor_attention`` returns ``(out, lse)`` and ``coor_attention_backward``
is its autograd formula on every device.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ... import reference
from ..._checks import check_choice, check_number, check_rank, check_same_device, check_tensor
from .._runtime import backend as _backend
from .._runtime.host import HAS_TRITON_OP, device_guard, direct_launches, plain_eager
from .._runtime.library import define_op
from . import launch

__all__ = ["coor_attention", "CoorAttention"]

SAMPLE_MODES = ("qk", "kv")
_MAP = "(B, heads, H, W, d)"
_TOKENS = "(B, heads, N, d)"


# ---------------------------------------------------------------------------
# torch.library registration: torch.ops.coorkern.coor_attention[_backward]
# The schemas are also in csrc/ops/coor_attention.cpp (a test checks they agree).

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
    return out, out.new_zeros(out.shape[:-1], dtype=launch._acc_dtype(q.dtype))


def _reference_backward(grad_out, q, k, v, coords, out, lse, sample, scale, align_corners):
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) for t in (q, k, v, coords)]
        res = reference.coor_attention(*inputs, sample=sample, scale=scale, align_corners=align_corners)
        grads = torch.autograd.grad(res, inputs, grad_out)
    return tuple(g.contiguous() for g in grads)


_op = define_op(SCHEMAS["coor_attention"], _reference_forward)
_bwd_op = define_op(SCHEMAS["coor_attention_backward"], _reference_backward)


def _direct_forward(q, k, v, coords, sample, scale, align_corners):
    """The kernels on real tensors (the opaque op's CUDA kernel, the eager autograd.Function):
    launched directly, never through wrap_triton, on q's device -- Triton launches on the
    current device's current stream (tensors on cuda:1 while cuda:0 is current)."""
    with device_guard(q), direct_launches():
        return launch._triton_forward(q, k, v, coords, sample, scale, align_corners)


def _direct_backward(grad_out, q, k, v, coords, out, lse, sample, scale, align_corners):
    with device_guard(q), direct_launches():
        return launch._triton_backward(grad_out, q, k, v, coords, out, lse, sample, scale, align_corners)


torch.library.register_kernel("coorkern::coor_attention", "cuda", _direct_forward)
torch.library.register_kernel("coorkern::coor_attention_backward", "cuda", _direct_backward)


@torch.library.register_fake("coorkern::coor_attention")
def _op_fake(q, k, v, coords, sample, scale, align_corners):
    n_q = coords.shape[-2] if sample == "qk" else q.shape[2]
    out = q.new_empty((q.shape[0], q.shape[1], n_q, q.shape[-1]))
    return out, q.new_empty(out.shape[:-1], dtype=launch._acc_dtype(q.dtype))


@torch.library.register_fake("coorkern::coor_attention_backward")
def _bwd_op_fake(grad_out, q, k, v, coords, out, lse, sample, scale, align_corners):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, coords))


def _setup_context(ctx, inputs, output):
    q, k, v, coords, sample, scale, align_corners = inputs
    ctx.args = (sample, scale, align_corners)
    ctx.save_for_backward(q, k, v, coords, *output)
    # lse is saved state, not a result to differentiate (and no zero-filled grad for it).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _input_grads(backward, ctx, grad_out) -> tuple:
    """Gradients of the 7 forward inputs by ``backward`` (one of the three backward paths)."""
    if grad_out is None:  # no gradient reached out (grads are not materialized)
        return (None,) * 7
    q, k, v, coords, out, lse = ctx.saved_tensors
    return (*backward(grad_out, q, k, v, coords, out, lse, *ctx.args), None, None, None)


def _backward(ctx, grad_out, _grad_lse):
    return _input_grads(_bwd_op, ctx, grad_out)


torch.library.register_autograd("coorkern::coor_attention", _backward, setup_context=_setup_context)


# torch.library.triton_op (torch >= 2.6): coorkern::coor_attention_triton[_backward], the
# Python API's way to the Triton kernels (CUDA; CPU tensors under the interpreter, eagerly).
# Their launches go through wrap_triton on CUDA, so torch.compile / Inductor and
# torch.export see the kernels (AOTInductor embeds them) where coorkern::coor_attention's
# CUDA kernel is opaque.  The C++-schema ops keep that kernel for dispatcher callers, and
# torch 2.4/2.5 (no triton_op) use it from Python too.  The two bodies are kept out of
# mutation testing, as central_loss's (bench/mutation.py).
_Outputs = tuple[torch.Tensor, torch.Tensor]  # out, lse
_Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # dq, dk, dv, dcoords


def _triton_op_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coords: torch.Tensor, sample: str,
                       scale: float, align_corners: bool) -> _Outputs:  # pragma: no mutate block
    with device_guard(q):
        return launch._triton_forward(q, k, v, coords, sample, scale, align_corners)


def _triton_op_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        coords: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sample: str, scale: float,
                        align_corners: bool) -> _Grads:  # pragma: no mutate block
    with device_guard(q):
        return launch._triton_backward(grad_out, q, k, v, coords, out, lse, sample, scale, align_corners)


if HAS_TRITON_OP:
    # (torch infers the schemas from the annotations.)
    _triton_fwd_op = torch.library.triton_op("coorkern::coor_attention_triton", _triton_op_forward, mutates_args=())
    _triton_bwd_op = torch.library.triton_op("coorkern::coor_attention_triton_backward", _triton_op_backward,
                                             mutates_args=())

    def _triton_op_autograd(ctx, grad_out, _grad_lse):
        return _input_grads(_triton_bwd_op, ctx, grad_out)

    # The same context as the opaque op's: lse marked non-differentiable, grads not materialized.
    _triton_fwd_op.register_autograd(_triton_op_autograd, setup_context=_setup_context)


def _triton_apply(q, k, v, coords, sample, scale, align_corners):
    """The Triton kernels with autograd -> (out, lse).  Eager calls on plain tensors take the
    autograd.Function (``plain_eager``: less host time than the custom-op dispatch); traced
    ones the triton_op where torch has it (Inductor sees its kernels), else the opaque CUDA op
    (torch 2.4/2.5; the interpreter's CPU tensors keep the autograd.Function)."""
    if plain_eager(q, k, v, coords):
        return _TritonEager.apply(q, k, v, coords, sample, scale, align_corners)
    if HAS_TRITON_OP:
        return _triton_fwd_op(q, k, v, coords, sample, scale, align_corners)
    if q.device.type == "cpu":
        return _TritonEager.apply(q, k, v, coords, sample, scale, align_corners)
    return _op(q, k, v, coords, sample, scale, align_corners)


class _TritonEager(torch.autograd.Function):
    """Autograd for the Triton kernels called eagerly (CUDA, and CPU tensors under the
    interpreter), launched directly: no custom-op dispatch, no ``wrap_triton``.  The same
    saved context as the ops' (``_setup_context``)."""

    @staticmethod
    def forward(ctx, q, k, v, coords, sample, scale, align_corners):
        outputs = _direct_forward(q, k, v, coords, sample, scale, align_corners)
        _setup_context(ctx, (q, k, v, coords, sample, scale, align_corners), outputs)
        return outputs

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        return _input_grads(_direct_backward, ctx, grad_out)


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


CUDA_ATTENTION_ENV = "COORKERN_CUDA_ATTENTION"
CUDA_ATTENTION_PATHS = ("aten", "triton")


def cuda_attention_path(dtype: torch.dtype) -> str:
    """What ``auto`` runs for CUDA tensors of ``dtype``: ``"aten"`` or ``"triton"``.

    ``"aten"`` is ``grid_sample`` (in float32) + ``F.scaled_dot_product_attention`` in the
    inputs' dtype (flash / memory-efficient kernels, O(N d) memory), which beat these Triton
    kernels at every size and dtype measured on the GPUs tried (``docs/backends.md``).  So
    ``auto`` takes the composition, except for

    * float64: SDPA has only its math kernel there, which materializes N x N scores;
    * ``torch.use_deterministic_algorithms(True)``: ``grid_sample``'s CUDA backward has no
      deterministic implementation (torch refuses it); the kernels' deterministic path runs.

    ``COORKERN_CUDA_ATTENTION=aten|triton`` forces one (ignored by an explicit
    ``coorkern.backend(...)``, which always wins).
    """
    forced = os.environ.get(CUDA_ATTENTION_ENV, "").strip().lower()
    if forced:
        if forced not in CUDA_ATTENTION_PATHS:
            raise ValueError(f"{CUDA_ATTENTION_ENV} must be one of {CUDA_ATTENTION_PATHS}, got {forced!r}")
        return forced
    if dtype == torch.float64 or torch.are_deterministic_algorithms_enabled():
        return "triton"
    return "aten"


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
    have any floating dtype.  Gradients flow to all four tensors.  On CUDA, ``auto`` runs
    ATen's grid_sample + SDPA except in float64 and deterministic mode (:func:`cuda_attention_path`).
    In the Triton kernels, fp32 products use TF32 tensor cores when torch's fp32 matmul precision allows it
    (``torch.backends.cuda.matmul.fp32_precision``, else ``torch.get_float32_matmul_precision()``
    is not "highest"), as torch's own matmuls, and exact fp32 FMA otherwise.  NaN
    coordinates give NaN, as ``grid_sample``.  Setting ``torch.use_deterministic_algorithms(True)`` makes
    the backward atomic-free and bitwise reproducible.  Extra memory is O(N d).
    """
    sample, scale, align_corners = _validate(q, k, v, coords, sample, scale, align_corners)
    route = _route(_backend.resolve(q.device, "coor_attention"), q.device, q.dtype)
    if route == "reference":
        return reference.coor_attention(q, k, v, coords, sample=sample, scale=scale, align_corners=align_corners)
    if route == "aten":
        return reference.grid_sample_sdpa(q, k, v, coords, sample=sample, scale=scale, align_corners=align_corners,
                                          attention_dtype=q.dtype)
    if route == "triton":
        return _triton_apply(q, k, v, coords, sample, scale, align_corners)[0]
    return _op(q, k, v, coords, sample, scale, align_corners)[0]


def _route(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """What runs for backend ``impl`` (resolved): "reference" (the eager oracle), "aten"
    (grid_sample + SDPA: ``auto`` on CUDA, see :func:`cuda_attention_path`), "triton" (the
    Triton kernels) or "op" (the registered op: the C++ kernels on CPU)."""
    if impl == "reference":
        return "reference"
    if impl != "triton":
        return "op"
    auto = _backend.requested_backend() == "auto"
    return "aten" if device.type == "cuda" and auto and cuda_attention_path(dtype) == "aten" else "triton"


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
