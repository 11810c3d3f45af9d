"""Ahead-of-time declarations of the central-loss kernels (no GPU needed).

``AOT_VARIANTS`` lists the kernel variants compiled into the C++ library's CUDA path
(``coorkern.ops._aot.codegen``), and ``aot_spec`` gives one of them as
``csrc/cuda/central_loss_cuda.cpp`` launches it -- exactly as ``launch._triton_pass`` does:
the same arguments (fp64 scalars), 1-D grid of rows x chunks (``CHUNK = CUDA_CHUNK``), and
``_finish_sum_kernel`` for mean/sum.  What C++ fixes at build time instead: the hand-picked
launch configuration (no autotuning), float32/float64 kernels (float16/bfloat16 are
computed in float32), ``R_INT`` 2 or the general -1, ``inner`` as i64 (any size, one
variant), and no radius run as ``HAS_RADIUS`` with ``radius2 = inf`` (same values).
``FAST_ROW`` matters to the landmark kernels only: both settings are compiled for them.
Keep both in step with ``launch``.
"""

from __future__ import annotations

import triton.language as tl

from .kernels import MODE_GRAD, MODE_LOSS_NONE, MODE_LOSS_SUM, _central_loss_kernel, _finish_sum_kernel
from .launch import CUDA_CHUNK, FINISH_BLOCK, TUNING_CONFIGS

AOT_CONFIG = TUNING_CONFIGS[0]  # (BLOCK, num_warps)
AOT_VARIANTS = [
    dict(kernel="central_loss", mode=mode, from_landmarks=lm, fast_row=fast_row, dtype=dtype, r_int=r_int,
         grad_out_scalar=scalar)
    for mode, scalar in ((MODE_LOSS_NONE, True), (MODE_LOSS_SUM, True), (MODE_GRAD, True), (MODE_GRAD, False))
    for lm, fast_row in ((False, True), (True, True), (True, False))
    for dtype in ("fp32", "fp64")
    for r_int in (2, -1)
] + [dict(kernel="finish_sum", dtype=dtype) for dtype in ("fp32", "fp64")]


def aot_spec(kernel: str, dtype: str, arch: int, mode: int = MODE_LOSS_NONE, from_landmarks: bool = False,
             fast_row: bool = True, r_int: int = 2, grad_out_scalar: bool = True):
    """``(kernel, signature, constexprs, config, divisible)`` of one ``AOT_VARIANTS`` entry for
    ``arch`` as the C++ launcher runs it (contiguous inputs, 16-byte aligned pointers), for
    ``coorkern.ops._aot.compiler.CompileRequest``; ``dtype`` is the Triton name of the logits' (and
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
