"""Ahead-of-time declarations of the coordinate-attention kernels (no GPU needed).

``aot_spec`` gives one kernel variant as the launchers run it on a GPU -- signature,
constexprs, launch config and the arguments Triton's launcher marks divisible by 16 --
for ``coorkern.ops._aot.compiler.compile_for_gpu`` (the tests' sm_80/sm_90 compiles) or an
ahead-of-time build for C++ callers; ``aot_variants`` lists every variant the launchers
can run.  Keep both in step with the launchers in ``launch``.
"""

from __future__ import annotations

import inspect
import re
from typing import Optional

import torch
import triton.language as tl

from . import kernels as kern
from .launch import TUNED_KINDS, block_d, candidates, launch_config

_TL_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
_UNIT_STRIDES = ("s_md", "s_qd", "s_kd", "s_vd", "s_ad", "s_bd", "s_cc")


def aot_spec(name: str, dtype, d: int, *, arch: int = 90, precision: Optional[str] = None,
             sample: str = "qk", deterministic: bool = False, align_corners: bool = True, add_dc: bool = False,
             config: Optional[dict] = None, aligned: bool = True):
    """``(kernel, signature, constexprs, config, divisible)`` of one kernel as the launchers
    run it on a GPU with contiguous inputs, for ``coorkern.ops._aot.compiler.compile_for_gpu``.

    ``precision`` (fp32 dots: "tf32" or "ieee"; default tf32) and ``sample`` (which of dQ/dV
    is written straight in the input dtype) select the variant; ``config`` overrides the
    launch config (autotuning candidates).  Unit channel/coordinate strides are constexpr 1
    and ``divisible`` names the arguments Triton's launcher marks divisible by 16 for
    16-byte aligned, contiguous inputs with d in {16, 32, 64, 128} (pointers, d, and the
    map/token strides, which are multiples of d): pass them to ``ASTSource`` as
    ``tt.divisibility`` attributes to compile the variant a GPU actually runs.  With
    ``aligned=False`` only the pointers are (any d, e.g. the CPU profile's d = 8).
    ``dtype`` is a torch dtype or its Triton name ("bf16", as ``AOT_VARIANTS`` has it).
    """
    if isinstance(dtype, str):
        dtype = {v: k for k, v in _TL_NAMES.items()}[dtype]

    kernels = {"fwd": kern._attn_fwd_kernel, "dkv": kern._attn_bwd_dkv_kernel, "dq": kern._attn_bwd_dq_kernel,
               "sample": kern._sample_kernel, "scatter": kern._scatter_kernel, "rowdot": kern._row_dot_kernel}
    fn = kernels[name]
    if precision is None:
        precision = "tf32" if dtype == torch.float32 else "ieee"
    cfg = dict(config or launch_config(name, d, dtype, precision, interpret=False, arch=arch))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
    constexprs = dict(ACC=tl.float64 if dtype == torch.float64 else tl.float32, BLOCK_D=block_d(d),
                      ALIGN=align_corners, DETERMINISTIC=deterministic,
                      ADD_DC=add_dc, PRECISION=precision, DOT_UPCAST=False, **blocks)
    constexprs.update({k: 1 for k in _UNIT_STRIDES})
    grad_dtype = {"dv_grad_ptr": dtype if sample == "qk" else acc, "dq_grad_ptr": acc if sample == "qk" else dtype}
    params = list(inspect.signature(fn.fn).parameters)  # JITFunction or the interpreter's
    signature = {}
    for p in params:
        if p in constexprs:
            signature[p] = "constexpr"
        elif p in grad_dtype:
            signature[p] = "*" + _TL_NAMES[grad_dtype[p]]
        elif p.endswith("_acc_ptr"):
            signature[p] = "*" + _TL_NAMES[acc]
        elif p.endswith("_idx_ptr"):
            signature[p] = "*i64"
        elif p.endswith("_ptr"):
            signature[p] = "*" + _TL_NAMES[dtype]
        elif p.startswith("scale"):
            signature[p] = "fp32"  # Python floats travel as fp32 (see _split)
        else:
            signature[p] = "i32"
    constexprs = {k: v for k, v in constexprs.items() if k in params}
    divisible = [p for p in params if p not in constexprs and (
        p.endswith("_ptr") or (aligned and (p == "d" or re.fullmatch(r"s_[mqkvab][bhyxn]", p))))]
    return fn, signature, constexprs, cfg, divisible


def aot_variants(arch: int = 90, head_dims=(16, 32, 64, 128)):
    """Every (name, dtype, d, options) the launchers can run on a GPU, for ``aot_spec(name,
    dtype, d, arch=arch, **options)``: what an ahead-of-time build must compile (autotuning
    candidates included as ``config``)."""
    for d in head_dims:
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            for align in (True, False):
                yield "sample", dtype, d, {"align_corners": align}
                for det in (False, True):
                    for add_dc in (False, True):
                        yield "scatter", dtype, d, {"align_corners": align, "deterministic": det, "add_dc": add_dc}
            yield "rowdot", dtype, d, {}
            for precision in (("tf32", "ieee") if dtype == torch.float32 else ("ieee",)):
                for name in TUNED_KINDS:
                    for sample in (("qk", "kv") if name != "fwd" else ("qk",)):
                        for cfg in candidates(name, d, dtype, precision, arch):
                            yield name, dtype, d, {"precision": precision, "sample": sample, "config": cfg}


def _cpp_variants() -> list:
    """The variants compiled into the C++ library (``coorkern.ops._aot.codegen``), launched by
    ``csrc/cuda/coor_attention_cuda.cpp`` with its launch configuration per arch (no
    autotuning): float32 (tf32 and ieee dots), float64, float16 and bfloat16; head widths
    that are multiples of 16 up to 128 (``aligned``: d and the strides divisible by 16, the
    variant a GPU runs from Python) and d < 16 (``aligned=0``: the CPU profile's d = 8).
    Not compiled: the deterministic scatter (C++ callers get a clear error; Python runs it
    through the JIT)."""
    variants = []
    for aligned, dims in ((True, (16, 32, 64, 128)), (False, (16,))):
        for d in dims:
            for dtype in ("fp32", "fp64", "fp16", "bf16"):
                base = dict(aligned=aligned, d=d, dtype=dtype)
                variants.append(dict(base, name="rowdot"))
                for align in (True, False):
                    variants.append(dict(base, name="sample", align_corners=align))
                    variants += [dict(base, name="scatter", align_corners=align, add_dc=add) for add in (False, True)]
                for precision in (("tf32", "ieee") if dtype == "fp32" else ("ieee",)):
                    variants.append(dict(base, name="fwd", precision=precision))
                    variants += [dict(base, name=name, precision=precision, sample=sample)
                                 for name in ("dkv", "dq") for sample in ("qk", "kv")]
    return variants


AOT_VARIANTS = _cpp_variants()
