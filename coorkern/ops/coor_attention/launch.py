"""Host side of the coordinate-attention kernels: launch configurations, CUDA autotuning,
and the passes that allocate the buffers and launch the kernels.

``launch_config`` is the hand-picked choice per (kernel, d, dtype, dot precision, arch);
``candidates`` adds a few alternatives for the attention passes, and ``pick`` times them
once per (kernel, d, dtype, precision, N bucket, arch) on CUDA -- never under the
interpreter, never during CUDA-graph capture, never with deterministic algorithms on (the
block sizes change the summation order) and not with ``COORKERN_AUTOTUNE=0``.  Every
candidate compiles spill-free for sm_80 and sm_90 (the AOT tests compile them).

``_triton_forward`` (3 launches: sample K, sample Q or V, attention) and ``_triton_backward``
(re-sample, delta, dK/dV, dQ, one scatter per sampled map) are the two passes; every launch
goes through ``_launch`` (wrap_triton inside the traced triton_op; the tests count launches
there).  Extra memory is O(N d), never N x N; the grid is 1-D.  The temporaries that no output
aliases (sampled tokens, delta, the fp32 gradients of sampled tokens before their scatter,
contiguous copies of strided inputs) come from ``host.scratch``: reused between eager calls.
"""

from __future__ import annotations

import os
import struct
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from .._runtime import backend as _backend
from .._runtime.host import HAS_TRITON_OP, capturing, cdiv, device_capability, launchable, next_power_of_2, scratch
from .kernels import (_attn_bwd_dkv_kernel, _attn_bwd_dq_kernel, _attn_fwd_kernel, _row_dot_kernel, _sample_kernel,
                      _scatter_kernel)

# ---------------------------------------------------------------------------
# Launch configurations and autotuning

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
    """10 major + minor of ``device`` (the current CUDA device by default; asked once per
    device with an index, ``host.device_capability``); 90 without CUDA."""
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        major, minor = torch.cuda.get_device_capability() if device is None else device_capability(device)
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
            and not capturing(device) and not tracing())


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


# ---------------------------------------------------------------------------
# Host passes: buffers and launches


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


def _launch(kernel, grid, *args, **meta):
    """Every kernel launch of this module goes through here: through ``wrap_triton`` on CUDA
    (inside the triton_op, torch.compile sees the kernels), plainly under the interpreter."""
    launchable(kernel, args[0].device, HAS_TRITON_OP)[grid](*args, **meta)


def _sample_tokens(fmap: torch.Tensor, coords: torch.Tensor, align_corners: bool,
                   role: str = "sampled") -> torch.Tensor:
    """Pre-pass: sample a (B, heads, H, W, d) map at coords -> contiguous (B, heads, N, d), a
    temporary of the call (``role``, see ``host.scratch``)."""
    batch, heads, height, width, d = fmap.shape
    n = coords.shape[-2]
    out = scratch(role, (batch, heads, n, d), fmap.dtype, fmap.device)
    cfg = launch_config("sample", d, fmap.dtype)
    _launch(
        _sample_kernel, _grid(n, cfg["BLOCK"], batch * heads),
        fmap, coords, out, heads, n, height, width, d, *fmap.stride(), *_grid_strides(coords),
        ALIGN=align_corners, ACC=_tl_acc(fmap.dtype), BLOCK=cfg["BLOCK"], BLOCK_D=block_d(d),
        num_warps=cfg["num_warps"],
    )
    return out


def _kernel_layout(t: torch.Tensor, role: str = "layout") -> torch.Tensor:
    """``t`` itself when the launcher will specialize it as 16-byte aligned with unit channel
    stride and multiple-of-16 strides -- the kernel variant the tests compile spill-free for
    sm_80/sm_90 -- else a contiguous copy in other storage (O(input), only for sliced or permuted
    inputs; a temporary of the call, ``role``).  Alignment from the storage offset (torch's
    allocators align storages to >= 64 B): fake tensors, which the triton_op is traced with,
    have no data pointer."""
    aligned = (t.storage_offset() * t.element_size() % 16 == 0 and t.stride(-1) == 1
               and all(s % 16 == 0 for s in t.stride()[:-1]))
    return t if aligned else scratch(role, t.shape, t.dtype, t.device).copy_(t)


def _prepare_coords(coords: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return coords.detach().to(_acc_dtype(dtype))  # tiny (N x 2); keeps its strides if no cast


def _attention_pass(kind, kernel, n_rows, batch_heads, d, dtype, device, args, rows_block):
    """Launch one attention pass (fwd/dkv/dq) with its (possibly autotuned) config."""
    precision = _precision(dtype)

    def run(cfg):
        _launch(
            kernel, _grid(n_rows, cfg[rows_block], batch_heads),
            *args, ACC=_tl_acc(dtype), PRECISION=precision, DOT_UPCAST=_dot_upcast(dtype),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d(d),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    run(pick(kind, d, dtype, precision, n_rows, device, run))


def _triton_forward(q, k, v, coords, sample, scale, align_corners):
    """Returns (out, lse): out (B, heads, Nq, d) in q's dtype, lse (B, heads, Nq) fp32.

    Launches: sample K, sample Q ("qk") or V ("kv"), attention -- 3 (+1 coords cast when
    coords are not in the accumulation dtype)."""
    q, k, v = (_kernel_layout(t, f"layout_{name}") for t, name in ((q, "q"), (k, "k"), (v, "v")))
    c = _prepare_coords(coords, q.dtype)
    batch, heads, d = q.shape[0], q.shape[1], q.shape[-1]
    n = c.shape[-2]
    ks = _sample_tokens(k, c, align_corners, "sampled_k")
    if sample == "qk":
        qs, vs = _sample_tokens(q, c, align_corners, "sampled_qv"), v
    else:
        qs, vs = q, _sample_tokens(v, c, align_corners, "sampled_qv")
    n_q = qs.shape[2]
    out = torch.empty((batch, heads, n_q, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, heads, n_q), device=q.device, dtype=_acc_dtype(q.dtype))
    args = (qs, ks, vs, out, lse, heads, n_q, n, d, *_split(scale), *qs.stride(), *ks.stride(), *vs.stride())
    _attention_pass("fwd", _attn_fwd_kernel, n_q, batch * heads, d, q.dtype, q.device, args, "BLOCK_M")
    return out, lse


def _row_dot(a: torch.Tensor, b: torch.Tensor, role: str = "row_dot") -> torch.Tensor:
    """sum over the last dim of a * b in the accumulation dtype, one launch (contiguous inputs),
    into a temporary of the call (``role``)."""
    a, b = a.contiguous(), b.contiguous()
    d = a.shape[-1]
    out = scratch(role, a.shape[:-1], _acc_dtype(a.dtype), a.device)
    cfg = launch_config("rowdot", d, a.dtype)
    _launch(
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
    _launch(
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
    q, k, v = (_kernel_layout(t, f"layout_{name}") for t, name in ((q, "q"), (k, "k"), (v, "v")))
    c = _prepare_coords(coords, q.dtype)
    batch, heads, d = q.shape[0], q.shape[1], q.shape[-1]
    n = c.shape[-2]
    acc = _acc_dtype(q.dtype)
    # Sampled tokens again (O(N d) pre-pass; cheaper than keeping them alive since forward).
    ks = _sample_tokens(k, c, align_corners, "sampled_k")
    qs = _sample_tokens(q, c, align_corners, "sampled_qv") if sample == "qk" else q
    vs = v if sample == "qk" else _sample_tokens(v, c, align_corners, "sampled_qv")
    n_q = qs.shape[2]
    do = grad_out.to(q.dtype).contiguous()
    delta = _row_dot(do, out, "delta")  # rowsum(dO * O): (B, heads, Nq)
    lse = lse.contiguous()
    # Gradients of sampled tensors stay fp32 for the scatter (temporaries); the others are final.
    dks = scratch("grad_sampled_k", (batch, heads, n, d), acc, q.device)
    if sample == "qk":
        dvs = torch.empty((batch, heads, n, d), device=q.device, dtype=v.dtype)
        dqs = scratch("grad_sampled_qv", (batch, heads, n_q, d), acc, q.device)
    else:
        dvs = scratch("grad_sampled_qv", (batch, heads, n, d), acc, q.device)
        dqs = torch.empty((batch, heads, n_q, d), device=q.device, dtype=q.dtype)
    strides = (*qs.stride(), *ks.stride(), *vs.stride())
    common = (heads, n_q, n, d, *_split(scale), *strides)
    _attention_pass("dkv", _attn_bwd_dkv_kernel, n, batch * heads, d, q.dtype, q.device,
                    (qs, ks, vs, do, lse, delta, dks, dvs, *common), "BLOCK_N")
    _attention_pass("dq", _attn_bwd_dq_kernel, n_q, batch * heads, d, q.dtype, q.device,
                    (qs, ks, vs, do, lse, delta, dqs, *common), "BLOCK_M")
    dc = torch.empty((batch, heads, n, 2), device=q.device, dtype=acc)
    if tracing():
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
