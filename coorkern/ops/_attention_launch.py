"""Launch configurations of the coordinate-attention kernels, and their CUDA autotuning.

``launch_config`` is the hand-picked choice per (kernel, d, dtype, dot precision, arch);
``candidates`` adds a few alternatives for the attention passes, and ``pick`` times them
once per (kernel, d, dtype, precision, N bucket, arch) on CUDA -- never under the
interpreter, never during CUDA-graph capture, never with deterministic algorithms on (the
block sizes change the summation order) and not with ``COORKERN_AUTOTUNE=0``.  Every
candidate compiles spill-free for sm_80 and sm_90 (the AOT tests compile them).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import triton

from .. import _backend
from ._host import next_power_of_2

AUTOTUNE_ENV = "COORKERN_AUTOTUNE"
PRECISIONS = ("tf32", "ieee")  # tl.dot input precision of fp32 dots (others are exact: "ieee")
TUNED_KINDS = ("fwd", "dkv", "dq")
# do_bench's budget per candidate (ms): a key is timed once per process, so its first launch
# costs up to 3 x 13 ms; a longer run only narrows the timing noise between close configs.
BENCH_WARMUP_MS = 3
BENCH_REP_MS = 10
_cache: dict = {}


def block_d(d: int) -> int:
    return max(16, next_power_of_2(d))


def uses_fma(dtype: torch.dtype, precision: str) -> bool:
    """Dots that run on the FMA units: fp64, and fp32 at "ieee" (torch's "highest")."""
    return dtype == torch.float64 or (dtype == torch.float32 and precision == "ieee")


def device_arch(device: Optional[torch.device] = None) -> int:
    """10 major + minor of ``device`` (the current CUDA device by default); 90 without CUDA."""
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def launch_config(kind: str, d: int, dtype: torch.dtype, precision: str = "tf32", interpret: Optional[bool] = None,
                  arch: Optional[int] = None) -> dict:
    """Block sizes, warps and stages of one kernel, chosen by hand per (d, dtype, precision, arch).

    Tensor cores (bf16/fp16, fp32 as tf32): every dot has an M dimension that is a multiple
    of 64 with 4 or 8 warps, so sm_90 uses wgmma (HGMMA); d = 128 and fp32 (twice the bytes
    per tile) get smaller tiles.  FMA dots (fp64, fp32 "ieee") hold whole operand tiles in
    registers per thread, so they get 4x-8x smaller tiles.  Every choice compiles with zero
    LOCAL and STACK bytes for sm_80 and sm_90 (triton 3.7.1 and 3.9; checked by the tests).
    The interpreter costs ~1 ms per program instance, so it gets large blocks.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if interpret is None:
        interpret = _backend.triton_interpreter_enabled()
    bd = block_d(d)
    if interpret:
        return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK": 128, "num_warps": 4, "num_stages": 1}
    if arch is None:
        arch = device_arch()
    wide_elems = 2 if dtype == torch.float64 else 1  # fp64 tiles take 2 registers per element
    if kind == "scatter":  # 8-16 tile elements per thread: sm_80 has no vector fp32 atomics
        return {"BLOCK": (2048 if arch >= 90 else 1024) // bd // wide_elems, "num_warps": 4, "num_stages": 1}
    if kind == "sample":  # 4 gathered corner tiles of 32 elements per thread
        return {"BLOCK": 4096 // bd // wide_elems, "num_warps": 4, "num_stages": 1}
    if kind == "rowdot":
        return {"BLOCK": max(4096 // bd // wide_elems, 16), "num_warps": 4, "num_stages": 1}
    if uses_fma(dtype, precision):
        return _fma_config(kind, bd, dtype)
    fp32 = dtype == torch.float32
    wide = bd >= 128 or fp32
    if kind == "fwd":  # the fp32 O accumulator: halve BLOCK_M at fp32 d=128
        if fp32 and bd >= 128:  # 2 stages spill 16 B on sm_80 (triton 3.9): 1 there
            return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2 if arch >= 90 else 1}
        return {"BLOCK_M": 128, "BLOCK_N": 32 if wide else 64, "num_warps": 8, "num_stages": 2 if wide else 3}
    if kind == "dkv":  # M of every dot is BLOCK_N (keys); K, V, dK, dV stay in registers
        if fp32:
            return {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 8 if bd >= 128 and arch < 90 else 4, "num_stages": 2}
        return {"BLOCK_M": 32, "BLOCK_N": 64 if wide else 128, "num_warps": 4 if wide else 8, "num_stages": 2}
    if kind == "dq":
        if fp32 and bd >= 64:  # BLOCK_N = 32 spills: d=128 32 B (triton 3.7.1), d=64 8 B on sm_80
            return {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2}
        return {"BLOCK_M": 64 if wide else 128, "BLOCK_N": 32, "num_warps": 4 if wide else 8, "num_stages": 2}
    raise ValueError(f"unknown kernel kind {kind!r}")


def _fma_config(kind: str, bd: int, dtype: torch.dtype) -> dict:
    """FMA tiles (fp32 "ieee": FFMA; fp64: DMMA on sm_80/sm_90).  ptxas's register allocation
    is far from monotonic in the tile size here (fp32 dK/dV d=64 at 16 x 32 and 4 warps
    spills 8 B on sm_80 while 8 warps do not; fwd fp32 d=128 at 32 x 16 spills 168 B on
    sm_90 with 4 warps, 0 with 8; fp64 dK/dV d=128 spills 80 B on sm_90 with triton 3.7.1
    at 4 warps), so these are the spill-free picks of an AOT sweep (both triton versions)."""
    if dtype == torch.float64:
        if kind == "fwd":
            return {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
        if kind in ("dkv", "dq"):
            return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 8 if bd >= 128 else 4, "num_stages": 1}
    elif kind == "fwd":
        return {"BLOCK_M": 32, "BLOCK_N": 16 if bd >= 128 else 32, "num_warps": 8, "num_stages": 1}
    elif kind == "dkv":
        return {"BLOCK_M": 16, "BLOCK_N": 16 if bd >= 128 else 32, "num_warps": 8, "num_stages": 1}
    elif kind == "dq":
        return {"BLOCK_M": 16 if bd >= 128 else 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    raise ValueError(f"unknown kernel kind {kind!r}")


def candidates(kind: str, d: int, dtype: torch.dtype, precision: str = "tf32", arch: Optional[int] = None) -> list:
    """Configs ``pick`` may time: ``launch_config`` first, then alternatives for the bf16/fp16
    attention passes at d <= 64 (at d = 128 and in fp32 larger tiles spill or fall off wgmma
    shapes; the FMA tiles of fp64 and fp32 "ieee" are the spill-free picks of a sweep)."""
    first = launch_config(kind, d, dtype, precision, interpret=False, arch=arch)
    if kind not in TUNED_KINDS or dtype not in (torch.bfloat16, torch.float16) or d > 64:
        return [first]
    alternatives = {
        "fwd": [{"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}],
        "dkv": [{"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}],
        "dq": [{"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}],
    }[kind]
    return [first] + [c for c in alternatives if c != first]


def n_bucket(n: int) -> int:
    """Power-of-4 bucket of a sequence length (tuning key): 1, 4, 16, ..., capped at 4^8."""
    bucket = 1
    while bucket < n and bucket < 4 ** 8:
        bucket *= 4
    return bucket


def tracing() -> bool:
    """Whether the launches are being traced (torch.compile / export of the triton_op, with fake
    tensors): there is nothing to time then, and the traced graph keeps the config chosen."""
    from torch._guards import detect_fake_mode

    return torch.compiler.is_compiling() or detect_fake_mode() is not None


def autotune_allowed(device: torch.device) -> bool:
    return (device.type == "cuda" and not _backend.triton_interpreter_enabled()
            and os.environ.get(AUTOTUNE_ENV) != "0" and not torch.are_deterministic_algorithms_enabled()
            and not torch.cuda.is_current_stream_capturing() and not tracing())


def pick(kind: str, d: int, dtype: torch.dtype, precision: str, n: int, device: torch.device,
         run: Callable[[dict], None]) -> dict:
    """The config to launch ``kind`` with.  ``run(cfg)`` launches it once with config ``cfg``
    (outputs are overwritten, so re-running is harmless); timed with ``triton.testing.do_bench``
    the first time a key is seen.  Without tuning: the cached choice, else ``launch_config``."""
    arch = device_arch(device) if device.type == "cuda" else None
    key = (kind, block_d(d), dtype, precision, n_bucket(n), arch)
    if key in _cache:  # before building the candidates: this is every call after the first
        return _cache[key]
    options = candidates(kind, d, dtype, precision, arch) if device.type == "cuda" else [
        launch_config(kind, d, dtype, precision)]
    if len(options) == 1 or not autotune_allowed(device):
        return options[0]
    times = [triton.testing.do_bench(lambda cfg=cfg: run(cfg), warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS)
             for cfg in options]
    _cache[key] = options[min(range(len(options)), key=times.__getitem__)]
    return _cache[key]
