"""Host side of the central-loss kernels: launch configurations, CUDA autotuning, and the
passes that allocate the outputs and launch the kernels.

``_triton_pass`` runs one forward (1 launch for "none", 2 for "mean"/"sum": the loss pass and
the finishing sum) or backward pass (1 launch), plus copies of non-contiguous inputs.  Float
scalars travel as fp64 kernel parameters, launches run under the tensors' device guard, and
on CUDA the block size and warps are autotuned (``TUNING_CONFIGS``, the hand-picked one first;
never under the interpreter).  A key first seen during a CUDA-graph capture is not timed (the
timing synchronizes, which a capture refuses): it launches the hand-picked config, untuned, and
is timed on its first call outside a capture.  The partial sums of "mean"/"sum" live in a
scratch buffer reused between eager calls (``host.scratch``).  Every launch goes through
``_launch`` (wrap_triton inside the traced triton_op; the tests count launches there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime.host import HAS_TRITON_OP, capturing, cdiv, device_capability, device_guard, launchable, scratch
from .kernels import MODE_GRAD, MODE_LOSS_NONE, MODE_LOSS_SUM, _central_loss_kernel, _finish_sum_kernel


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


# Autotuner keys (ours, at least as fine as triton.autotune's: its key values plus every tensor
# argument's dtype) of the calls launched through the autotuner outside a capture.
_tuned_keys: set = set()


def _kernel_and_meta(device: torch.device, tune_key: tuple):
    """The kernel to launch on a CUDA ``device`` and its meta-parameters beyond the call's own:
    the autotuner, except during a CUDA-graph capture for a key it has not timed yet (the hand-
    picked config then, untuned; the key is timed at its next call outside a capture)."""
    major, minor = device_capability(device)
    arch = 10 * major + minor
    if capturing(device) and (tune_key, arch) not in _tuned_keys:
        block, warps = TUNING_CONFIGS[0]
        return _central_loss_kernel, {"ARCH": arch, "BLOCK": block, "num_warps": warps}
    _tuned_keys.add((tune_key, arch))
    return _cuda_kernel(), {"ARCH": arch}


def _launch(kernel, grid, *args, **meta):
    """Every kernel launch of this module goes through here (tests count them)."""
    launchable(kernel, args[0].device, HAS_TRITON_OP)[grid](*args, **meta)


_device_guard = device_guard  # a module global: tests replace it


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


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

    if mode == MODE_LOSS_SUM:  # partial sums: read by the finishing sum only
        out = scratch("central_loss.partials", (max(programs, 1),), acc_dtype, x.device)
    else:
        out = torch.empty_like(x)
    scalar_grad = reduction != "none"
    g_out = x  # unused pointer slot unless MODE_GRAD
    if mode == MODE_GRAD:
        g_out = grad_output if scalar_grad else grad_output.expand_as(x).contiguous()
    constexprs = dict(MODE=mode, FROM_LANDMARKS=landmarks is not None, HAS_RADIUS=radius is not None,
                      GRAD_OUT_SCALAR=scalar_grad, R_INT=integer_power(r), FAST_ROW=inner < FAST_ROW_PIXELS)
    if interpreted:
        kernel, meta = _central_loss_kernel, {"BLOCK": chunk, "ARCH": 0}
    else:
        tune_key = (*constexprs.values(), x.dtype, t.dtype, g_out.dtype, out.dtype)
        kernel, meta = _kernel_and_meta(x.device, tune_key)
    with _device_guard(x):
        if programs > 0:
            _launch(
                kernel, (programs,),
                x, t, data, g_out, out,
                inner, chunks_per_row, width, float(r),
                1.0 / (2.0 * sigma * sigma), float(radius) ** 2 if radius is not None else 0.0,
                1.0 / numel if reduction == "mean" else 1.0,
                **constexprs, ACC=_tl_dtype(x.dtype), CHUNK=chunk, **meta,
            )
        if mode == MODE_LOSS_SUM:
            total = torch.empty((), device=x.device, dtype=logits.dtype)
            _launch(_finish_sum_kernel, (1,), out, total, programs, float(numel) if reduction == "mean" else 1.0,
                    ACC=_tl_dtype(x.dtype), BLOCK=FINISH_BLOCK)
            return total
    return out.view(logits.shape)


def _triton_loss(logits, target, landmarks, sigma, r, reduction, radius):
    mode = MODE_LOSS_NONE if reduction == "none" else MODE_LOSS_SUM
    return _triton_pass(mode, logits, target, landmarks, sigma, r, reduction, radius)


def _triton_grad(grad_output, logits, target, landmarks, sigma, r, reduction, radius):
    return _triton_pass(MODE_GRAD, logits, target, landmarks, sigma, r, reduction, radius, grad_output)
