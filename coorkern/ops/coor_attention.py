"""Coordinate-indexed attention: the CoorTransformer core (paper Section IV.A), fused.

::

    Qs = sample(q, coords)  Ks = sample(k, coords)  Vs = v          (sample="qk", the paper)
    Qs = q                  Ks = sample(k, coords)  Vs = sample(v)  (sample="kv", DAT / released code)
    out = softmax(Qs Ks^T * scale) Vs                               (B, heads, Nq, d)

``sample(m, coords)`` is ``F.grid_sample(mode="bilinear", padding_mode="zeros")`` of a
channels-last map ``m`` ``(B, heads, H, W, d)`` at normalized (x, y) coordinates
``(B, N, 2)`` (shared by the heads) or ``(B, heads, N, 2)``; tokens are ``(B, heads, N, d)``.

The Triton kernels and their device helpers are in ``_attention_kernels`` (what each does, its
bytes and FLOPs, and the numerics); this module is their host side: buffers, launches,
autograd, the registered ops and the public API.

Forward (3 launches): sample K and Q ("qk") or V ("kv") -> attention.  Backward: re-sample
the two sampled tensors (an O(N d) pre-pass, cheaper than keeping them alive since the
forward), delta, dK/dV pass, dQ pass (the unsampled tensor's gradient is stored in its
dtype there), then one scatter per sampled map, the second adding its coordinate gradient
to the first's in-kernel; the heads' share of shared coords is summed by the host.
Launch counts are in ``_triton_backward``'s docstring (issue 13 cut them from 16-18).
Extra memory is O(N d): sampled tokens, fp32 gradient buffers and log-sum-exp (plus 4 N d
fp32 partials on the deterministic path); never N x N.  The grid is 1-D (no 65535 cap on
B heads); launch configs come from ``_attention_launch`` (autotuned on CUDA), the
kernels' ahead-of-time declarations (``aot_spec``, ``aot_variants``) from ``_attention_aot``.

Which implementation ``auto`` runs on CUDA is :func:`cuda_attention_path`'s rule: on the
first GPU that ran them (an H200, ``bench/RESULTS.md``) these kernels lost to ATen's
``grid_sample`` + SDPA (flash) at every size and dtype measured, so ``auto`` takes that
composition and keeps the kernels for what it cannot do (float64, deterministic mode);
``coorkern.backend("triton")`` or ``COORKERN_CUDA_ATTENTION=triton`` runs them anyway.

Eager calls on plain tensors launch these kernels from a ``torch.autograd.Function`` (the least
host time); traced calls reach them, with torch >= 2.6, through the ``torch.library.triton_op``
ops ``coorkern::coor_attention_triton[_backward]`` (launches wrapped by ``wrap_triton``, no
autotuning while traced), which torch.compile/Inductor and torch.export see into; the
C++-schema ops below keep an opaque CUDA kernel for dispatcher callers and torch 2.4/2.5.

CPU tensors normally run the C++ op (``csrc/coor_attention.cpp``: a hand-written kernel
with the sampling fused into the tiles where it measured faster, ATen's grid sampler + CPU
flash attention otherwise); ``torch.ops.coorkern.coor_attention`` returns ``(out, lse)`` and
``coor_attention_backward`` is its autograd formula on every device.
"""

from __future__ import annotations

import os
import struct
from typing import Optional

import torch
import triton.language as tl

from .. import _backend, reference
from .._checks import check_choice, check_number, check_rank, check_same_device, check_tensor
from .._library import define_op
from . import _attention_launch as _launch
from ._attention_kernels import (_attn_bwd_dkv_kernel, _attn_bwd_dq_kernel, _attn_fwd_kernel,
                                 _row_dot_kernel, _sample_kernel, _scatter_kernel)
from ._attention_aot import aot_spec, aot_variants  # noqa: F401  (public for AOT builds)
from ._attention_launch import block_d, launch_config
from ._host import HAS_TRITON_OP, cdiv, device_guard, direct_launches, launchable, plain_eager

__all__ = ["coor_attention", "CoorAttention"]

SAMPLE_MODES = ("qk", "kv")
_MAP = "(B, heads, H, W, d)"
_TOKENS = "(B, heads, N, d)"


# ---------------------------------------------------------------------------
# Host side: launchers


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def fp32_matmul_precision() -> str:
    """"ieee" or "tf32": how torch runs fp32 matmuls on CUDA right now.

    Reads the ``fp32_precision`` API first (``torch.backends.cuda.matmul.fp32_precision``,
    which inherits ``torch.backends.fp32_precision``): once a user sets it, torch >= 2.9's
    ``get_float32_matmul_precision()`` raises.  "none" there means not set: the legacy
    ``torch.get_float32_matmul_precision()`` ("highest" -> ieee, else tf32) decides.
    """
    matmul = getattr(getattr(torch.backends, "cuda", None), "matmul", None)
    value = getattr(matmul, "fp32_precision", "none")
    if value in ("none", None):
        value = getattr(torch.backends, "fp32_precision", "none")
    if value not in ("none", None):
        return "ieee" if value == "ieee" else "tf32"
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # mixed legacy/new settings: torch itself refuses to answer
        return "ieee"
    return "ieee" if legacy == "highest" else "tf32"


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 follows torch's fp32 matmul setting; others exact."""
    return fp32_matmul_precision() if dtype == torch.float32 else "ieee"


def _dot_upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _backend.triton_interpreter_enabled()


def _split(x: float) -> tuple[float, float]:
    """x as fp32 hi + lo: Triton's launcher passes Python floats as fp32 (the interpreter
    keeps fp64), so fp64 kernels get the softmax scale as two fp32 halves and add them
    (``_scale_of``): hi + lo carries ~48 bits, exact to the fp64 oracle at 1e-14."""
    hi = _to_fp32(x)
    return hi, _to_fp32(x - hi)


def _to_fp32(x: float) -> float:
    """x rounded to fp32, on the host without a torch op (no dispatch, no device)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _grid_strides(coords: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides (b, h, n, c) of coords; h stride 0 when shared by the heads."""
    if coords.dim() == 3:
        return coords.stride(0), 0, coords.stride(1), coords.stride(2)
    return tuple(coords.stride())


def _grid(n: int, block: int, batch_heads: int) -> tuple[int]:
    """1-D grid of ``_program``: the row blocks of every (batch, head)."""
    return (cdiv(n, block) * batch_heads,)


def _launch_triton(kernel, grid, *args, **meta):
    """Every kernel launch of this module goes through here: through ``wrap_triton`` on CUDA
    (inside the triton_op, torch.compile sees the kernels), plainly under the interpreter."""
    launchable(kernel, args[0].device, HAS_TRITON_OP)[grid](*args, **meta)


def _sample_tokens(fmap: torch.Tensor, coords: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """Pre-pass: sample a (B, heads, H, W, d) map at coords -> contiguous (B, heads, N, d)."""
    batch, heads, height, width, d = fmap.shape
    n = coords.shape[-2]
    out = torch.empty((batch, heads, n, d), device=fmap.device, dtype=fmap.dtype)
    cfg = launch_config("sample", d, fmap.dtype)
    _launch_triton(
        _sample_kernel, _grid(n, cfg["BLOCK"], batch * heads),
        fmap, coords, out, heads, n, height, width, d, *fmap.stride(), *_grid_strides(coords),
        ALIGN=align_corners, ACC=_tl_acc(fmap.dtype), BLOCK=cfg["BLOCK"], BLOCK_D=block_d(d),
        num_warps=cfg["num_warps"],
    )
    return out


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when the launcher will specialize it as 16-byte aligned with unit channel
    stride and multiple-of-16 strides -- the kernel variant the tests compile spill-free for
    sm_80/sm_90 -- else a contiguous copy in new storage (O(input), only for sliced or permuted
    inputs).  Alignment from the storage offset (torch's allocators align storages to >= 64 B):
    fake tensors, which the triton_op is traced with, have no data pointer."""
    aligned = (t.storage_offset() * t.element_size() % 16 == 0 and t.stride(-1) == 1
               and all(s % 16 == 0 for s in t.stride()[:-1]))
    return t if aligned else t.clone(memory_format=torch.contiguous_format)


def _prepare_coords(coords: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return coords.detach().to(_acc_dtype(dtype))  # tiny (N x 2); keeps its strides if no cast


def _attention_pass(kind, kernel, n_rows, batch_heads, d, dtype, device, args, rows_block):
    """Launch one attention pass (fwd/dkv/dq) with its (possibly autotuned) config."""
    precision = _precision(dtype)

    def run(cfg):
        _launch_triton(
            kernel, _grid(n_rows, cfg[rows_block], batch_heads),
            *args, ACC=_tl_acc(dtype), PRECISION=precision, DOT_UPCAST=_dot_upcast(dtype),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d(d),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    run(_launch.pick(kind, d, dtype, precision, n_rows, device, run))


def _triton_forward(q, k, v, coords, sample, scale, align_corners):
    """Returns (out, lse): out (B, heads, Nq, d) in q's dtype, lse (B, heads, Nq) fp32.

    Launches: sample K, sample Q ("qk") or V ("kv"), attention -- 3 (+1 coords cast when
    coords are not in the accumulation dtype)."""
    q, k, v = (_kernel_layout(t) for t in (q, k, v))
    c = _prepare_coords(coords, q.dtype)
    batch, heads, d = q.shape[0], q.shape[1], q.shape[-1]
    n = c.shape[-2]
    ks = _sample_tokens(k, c, align_corners)
    if sample == "qk":
        qs, vs = _sample_tokens(q, c, align_corners), v
    else:
        qs, vs = q, _sample_tokens(v, c, align_corners)
    n_q = qs.shape[2]
    out = torch.empty((batch, heads, n_q, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, heads, n_q), device=q.device, dtype=_acc_dtype(q.dtype))
    args = (qs, ks, vs, out, lse, heads, n_q, n, d, *_split(scale), *qs.stride(), *ks.stride(), *vs.stride())
    _attention_pass("fwd", _attn_fwd_kernel, n_q, batch * heads, d, q.dtype, q.device, args, "BLOCK_M")
    return out, lse


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over the last dim of a * b in the accumulation dtype, one launch (contiguous inputs)."""
    a, b = a.contiguous(), b.contiguous()
    d = a.shape[-1]
    out = torch.empty(a.shape[:-1], device=a.device, dtype=_acc_dtype(a.dtype))
    cfg = launch_config("rowdot", d, a.dtype)
    _launch_triton(
        _row_dot_kernel, (cdiv(out.numel(), cfg["BLOCK"]),),
        a, b, out, out.numel(), d, ACC=_tl_acc(a.dtype), BLOCK=cfg["BLOCK"], BLOCK_D=block_d(d),
        num_warps=cfg["num_warps"],
    )
    return out


def _scatter(fmap, grad, coords, dcoords, align_corners, add_dc):
    """Gradient of ``_sample_tokens`` into a map gradient in fmap's dtype; writes (or, with
    ``add_dc``, adds) the coordinate gradient (B, heads, N, 2) into ``dcoords`` (fp32).

    Launches: memset + scatter (+ a cast for fp16/bf16 maps: the atomics accumulate in fp32);
    deterministic: scatter + index_put_ (sort-based) + cast, and no zero-filled map buffer."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    batch, heads, n, d = grad.shape
    acc = grad.dtype
    n_pix = fmap.numel() // d
    if deterministic:
        part = torch.empty((batch, heads, n, 4, d), device=fmap.device, dtype=acc)
        idx = torch.empty((batch, heads, n, 4), device=fmap.device, dtype=torch.int64)
        dmap = part  # unused pointer slot
    else:
        dmap = torch.zeros(fmap.shape, device=fmap.device, dtype=acc)
        part, idx = dmap, dmap  # unused pointer slots
    cfg = launch_config("scatter", d, acc)
    _launch_triton(
        _scatter_kernel, _grid(n, cfg["BLOCK"], batch * heads),
        fmap, grad, dmap, part, idx, coords, dcoords, heads, n, fmap.shape[2], fmap.shape[3], d, n_pix,
        *fmap.stride(), *_grid_strides(coords),
        ALIGN=align_corners, DETERMINISTIC=deterministic, ADD_DC=add_dc, ACC=_tl_acc(acc),
        BLOCK=cfg["BLOCK"], BLOCK_D=block_d(d), num_warps=cfg["num_warps"],
    )
    if deterministic:
        # Ordered reduction of the per-corner partials: index_put_ with accumulate is
        # sort-based and deterministic under torch.use_deterministic_algorithms (row n_pix
        # collects the corners outside the map and is dropped).
        flat = part.new_zeros((n_pix + 1, d))
        flat.index_put_((idx.view(-1),), part.view(-1, d), accumulate=True)
        dmap = flat[:-1].view(fmap.shape)
    return dmap.to(fmap.dtype)


def _triton_backward(grad_out, q, k, v, coords, out, lse, sample, scale, align_corners):
    """Gradients (q, k, v, coords).  Launches (bf16, per-head coords in the accumulation
    dtype): sample K and Q|V, delta, dK/dV, dQ, 2 x (memset, scatter, cast) = 11; fp32: 9;
    shared coords add one head sum, a coords dtype other than fp32/fp64 one cast."""
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
    delta = _row_dot(do, out)  # rowsum(dO * O): (B, heads, Nq)
    lse = lse.contiguous()
    # Gradients of sampled tensors stay fp32 for the scatter; the others are final.
    dks = torch.empty((batch, heads, n, d), device=q.device, dtype=acc)
    dvs = torch.empty((batch, heads, n, d), device=q.device, dtype=v.dtype if sample == "qk" else acc)
    dqs = torch.empty((batch, heads, n_q, d), device=q.device, dtype=acc if sample == "qk" else q.dtype)
    strides = (*qs.stride(), *ks.stride(), *vs.stride())
    common = (heads, n_q, n, d, *_split(scale), *strides)
    _attention_pass("dkv", _attn_bwd_dkv_kernel, n, batch * heads, d, q.dtype, q.device,
                    (qs, ks, vs, do, lse, delta, dks, dvs, *common), "BLOCK_N")
    _attention_pass("dq", _attn_bwd_dq_kernel, n_q, batch * heads, d, q.dtype, q.device,
                    (qs, ks, vs, do, lse, delta, dqs, *common), "BLOCK_M")
    dc = torch.empty((batch, heads, n, 2), device=q.device, dtype=acc)
    if _launch.tracing():
        # torch's TTIR analysis (torch.compile / export of the triton_op) counts every pointer a
        # store's address depends on as written: the scatter's atomic addresses depend on the
        # loaded coords, so the op's own coords would read as mutated and functionalization would
        # copy into the caller's leaf tensor (H100, torch 2.11: "a leaf Variable that requires
        # grad is being used in an in-place operation").  A copy (N x 2) keeps that off the input.
        c = c.clone()
    dk = _scatter(k, dks, c, dc, align_corners, add_dc=False)
    if sample == "qk":
        dq, dv = _scatter(q, dqs, c, dc, align_corners, add_dc=True), dvs
    else:
        dq, dv = dqs, _scatter(v, dvs, c, dc, align_corners, add_dc=True)
    if coords.dim() == 3:
        dc = dc.sum(1)  # shared by the heads
    return dq, dk, dv, dc.to(coords.dtype)


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


def _direct_forward(q, k, v, coords, sample, scale, align_corners):
    """The kernels on real tensors (the opaque op's CUDA kernel, the eager autograd.Function):
    launched directly, never through wrap_triton, on q's device -- Triton launches on the
    current device's current stream (tensors on cuda:1 while cuda:0 is current)."""
    with device_guard(q), direct_launches():
        return _triton_forward(q, k, v, coords, sample, scale, align_corners)


def _direct_backward(grad_out, q, k, v, coords, out, lse, sample, scale, align_corners):
    with device_guard(q), direct_launches():
        return _triton_backward(grad_out, q, k, v, coords, out, lse, sample, scale, align_corners)


torch.library.register_kernel("coorkern::coor_attention", "cuda", _direct_forward)
torch.library.register_kernel("coorkern::coor_attention_backward", "cuda", _direct_backward)


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
        return _triton_forward(q, k, v, coords, sample, scale, align_corners)


def _triton_op_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        coords: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sample: str, scale: float,
                        align_corners: bool) -> _Grads:  # pragma: no mutate block
    with device_guard(q):
        return _triton_backward(grad_out, q, k, v, coords, out, lse, sample, scale, align_corners)


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
    inputs' dtype (flash / memory-efficient kernels, O(N d) memory).  Measured on an H200
    (torch 2.11, triton 3.6; ``bench/RESULTS.md``), forward + backward, B = 2, heads x d x N
    from 8 x 32 x 832 to 1 x 128 x 16384: these Triton kernels ran at 0.39-0.79x the speed
    of grid_sample + SDPA in bf16 and 0.09-0.44x in fp32 (that benchmark sampled with a
    bf16 grid; here the grid stays float32).  So ``auto`` takes the composition, except for

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
