"""Benchmark: coordinate-indexed attention, forward / backward / forward+backward.

    python bench/attention.py [--sizes 8x32x832 4x32x3328 ...] [--dtypes fp32 bf16]
                              [--samples qk kv] [--reps 10] [--no-compile]
                              [--impls grid+sdpa coorkern] [--threads 1] [--peak-gflops 232]

Sizes are heads x d x N with B = 2 (the detector's: 8x32x832, 4x32x3328, 2x32x13312,
2x64x13312 and the long case 1x64x16384); maps are H x W = N (W = 13 N / 16 rows of the
detector's 512 x 416 input scaled, else the nearest factorization) and the N coords
sample them (Nq = N in both modes).  Columns:

* eager          -- F.grid_sample per sampled tensor + matmul / softmax / matmul
* grid+sdpa      -- F.grid_sample + F.scaled_dot_product_attention, in the inputs' dtype
* torch.compile  -- torch.compile of the eager version
* coorkern       -- coorkern.coor_attention as ``auto`` runs it: on CUDA grid_sample (float32
                    grid) + SDPA for fp32/bf16/fp16 (``cuda_attention_path``), on CPU the C++
                    op (the hand-written kernel for d <= 128)
* coorkern-triton -- CUDA: coorkern's Triton kernels, forced (``coorkern.backend("triton")``)
* coorkern-aten  -- CPU only: the C++ op forced onto ATen's grid sampler + flash attention
                    (COORKERN_CPU_ATTENTION=aten; what the op did before the kernel)
* coorkern-kernel -- CPU only: the C++ op forced onto the kernel, backward included (the
                    default rule runs ATen's backward for d > 8)

Median (GPU) or minimum (CPU, a shared machine: ``--stat``) time in ms, peak extra
memory (MiB) of the step, and forward throughput counted as 4 B heads Nq N d FLOPs
(TFLOP/s on a GPU with 2.5x that for backward; on a CPU GFLOP/s and the percentage of
``--peak-gflops``, one core's fp32 FMA peak, with ``--threads`` threads).  "fwd" is a training forward
(inputs require grad), "bwd" the backward alone (a fresh untimed forward before each),
"fwd+bwd" one training step; the memory column is the step's.  On a CPU-only
machine the default sizes are the ones an N x N eager baseline fits and finishes in
reasonable time (the first two detector sizes), and the output says so.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import coorkern  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_SIZES = ["8x32x832", "4x32x3328", "2x32x13312", "2x64x13312", "1x64x16384"]
CPU_SIZES = ["8x8x832", "4x8x3328", "8x16x832", "4x16x3328", "8x32x832", "4x32x3328", "2x64x3328"]
CPU_IMPLS = ["grid+sdpa", "coorkern-aten", "coorkern-kernel", "coorkern"]
GPU_IMPLS = ["eager", "grid+sdpa", "torch.compile", "coorkern", "coorkern-triton"]
BATCH = 2


def map_shape(n: int) -> tuple[int, int]:
    """H x W = n with the detector's 4:3.25 aspect (832 = 32 x 26, 13312 = 128 x 104)."""
    for h in range(int(math.sqrt(n * 16 / 13)), 0, -1):
        if n % h == 0 and abs(n // h * 16 - h * 13) <= h:
            return h, n // h
    h = int(math.sqrt(n))
    while n % h:
        h -= 1
    return h, n // h


def _sample(fmap, grid):
    b, h, hh, ww, d = fmap.shape
    x = fmap.permute(0, 1, 4, 2, 3).reshape(b * h, d, hh, ww)
    s = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return s.reshape(b, h, d, -1).transpose(-1, -2).contiguous()  # contiguous: SDPA's fused kernels need it


def _sampled_tokens(q, k, v, coords, sample):
    """Qs, Ks, Vs in the inputs' dtype (no N x N tensor yet)."""
    b, heads = q.shape[:2]
    grid = coords.unsqueeze(1).expand(b, heads, -1, 2).reshape(b * heads, 1, -1, 2).to(q.dtype)
    if sample == "qk":
        return _sample(q, grid), _sample(k, grid), v
    return q, _sample(k, grid), _sample(v, grid)


def eager(q, k, v, coords, sample):
    """What a user writes without the fused kernel: sampled tensors and the N x N scores."""
    qs, ks, vs = _sampled_tokens(q, k, v, coords, sample)
    attn = torch.softmax(qs @ ks.transpose(-1, -2) * qs.shape[-1] ** -0.5, dim=-1)
    return attn @ vs


def grid_sdpa(q, k, v, coords, sample):
    """grid_sample + F.scaled_dot_product_attention in the inputs' dtype (flash/efficient kernels)."""
    return F.scaled_dot_product_attention(*_sampled_tokens(q, k, v, coords, sample))


def fused(q, k, v, coords, sample):
    return coorkern.coor_attention(q, k, v, coords, sample=sample)


def fused_triton(q, k, v, coords, sample):
    with coorkern.backend("triton"):
        return coorkern.coor_attention(q, k, v, coords, sample=sample)


@contextlib.contextmanager
def cpu_path(name):
    """CPU only: "coorkern-aten" / "coorkern-kernel" force the C++ op's ATen fallback (the op
    before the hand-written kernel) or its kernel, forward and backward, for the block."""
    path = {"coorkern-aten": "aten", "coorkern-kernel": "kernel"}.get(name)
    if path is None:
        yield
        return
    os.environ["COORKERN_CPU_ATTENTION"] = path
    try:
        yield
    finally:
        os.environ.pop("COORKERN_CPU_ATTENTION", None)


def make_inputs(heads, d, n, dtype, sample, device):
    h, w = map_shape(n)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)

    fmap = lambda: rand(BATCH, heads, h, w, d)  # noqa: E731
    if sample == "qk":
        q, k, v = fmap(), fmap(), rand(BATCH, heads, n, d)
    else:
        q, k, v = rand(BATCH, heads, n, d), fmap(), fmap()
    coords = (torch.rand(BATCH, n, 2, generator=gen) * 2.2 - 1.1).to(device).requires_grad_(True)
    return q, k, v, coords


_clock = time.perf_counter  # --clock process: time.process_time (CPU seconds of this process)


def _stat(times, stat):
    return min(times) if stat == "min" else statistics.median(times)


def time_step(step, device, reps, stat):
    """Seconds per ``step()`` (``stat`` over ``reps`` runs after one warm-up)."""
    step()
    times = []
    for _ in range(reps):
        _common.sync(device)
        start = _clock()
        step()
        _common.sync(device)
        times.append(_clock() - start)
    return _stat(times, stat)


def time_backward(fwd, inputs, grad, device, reps, stat):
    """Seconds of the backward alone (a fresh forward before each, not timed);
    retain_graph is avoided because torch.compile's backward donates its buffers."""
    times = []
    for i in range(reps + 1):
        out = fwd()
        _common.sync(device)
        start = _clock()
        torch.autograd.grad(out, inputs, grad)
        _common.sync(device)
        if i:  # the first one is warm-up
            times.append(_clock() - start)
        del out
    return _stat(times, stat)


def bench_one(fn, inputs, sample, device, reps, stat):
    """(fwd s, bwd s, fwd+bwd s, fwd+bwd peak extra MiB, fwd+bwd GPU kernel ms (NaN on CPU));
    None where it ran out of memory."""
    q, k, v, coords = inputs

    def fwd():
        return fn(q, k, v, coords, sample)

    try:
        out = fwd()
        grad = torch.randn_like(out)
        del out
        t_fwd = time_step(fwd, device, reps, stat)
        t_bwd = time_backward(fwd, inputs, grad, device, reps, stat)

        def step():
            torch.autograd.grad(fwd(), inputs, grad)

        t_step = time_step(step, device, reps, stat)
        _, mem = _common.measure(step, device, warmup=0, reps=1)
        kernel_ms = _common.gpu_kernel_ms(step, device)
    except (torch.OutOfMemoryError, RuntimeError) as exc:  # eager N x N at the long sizes
        if not isinstance(exc, torch.OutOfMemoryError) and "out of memory" not in str(exc).lower():
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None
    return t_fwd, t_bwd, t_step, mem, kernel_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=None, help="heads x d x N (B = 2)")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES))
    parser.add_argument("--samples", nargs="+", default=["qk", "kv"], choices=["qk", "kv"])
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--markdown", default=None, help="also write the markdown table to this file")
    parser.add_argument("--impls", nargs="+", default=None, choices=GPU_IMPLS + ["coorkern-aten", "coorkern-kernel"],
                        help=f"default: {' '.join(GPU_IMPLS)} on a GPU, {' '.join(CPU_IMPLS)} on a CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--stat", choices=["min", "median"], default=None,
                        help="time statistic over --reps (default: median on a GPU, min on a CPU)")
    parser.add_argument("--peak-gflops", type=float, default=232.0,
                        help="one CPU core's fp32 FMA peak (GFLOP/s) for the %%-of-peak column; default: "
                             "2 AVX-512 FMA/cycle measured on the 2-core Xeon VM of bench/RESULTS.md")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process: CPU seconds of this process (all its threads), which a shared machine's "
                             "other jobs do not inflate; compare with 1 thread")
    args = parser.parse_args()
    global _clock
    if args.clock == "process":
        _clock = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)

    device = _common.default_device()
    on_gpu = device.type == "cuda"
    sizes = args.sizes or (GPU_SIZES if on_gpu else CPU_SIZES)
    dtypes = args.dtypes or (["fp32", "bf16"] if on_gpu else ["fp32"])
    reps = args.reps or (20 if on_gpu else 3)
    stat = args.stat or ("median" if on_gpu else "min")
    note = ("coorkern = auto (grid_sample + SDPA for fp32/bf16/fp16), coorkern-triton = the Triton kernels"
            if on_gpu else
            "CPU: coorkern = the C++ op (hand-written kernel: forward d <= 128, backward d <= 8), coorkern-aten / "
            "coorkern-kernel = the same op forced onto ATen / the kernel; fp32 only by default")
    print(f"device: {_common.device_name(device)} ({note})")
    print(_common.threads_note())

    names = args.impls or (GPU_IMPLS if on_gpu else CPU_IMPLS)
    if args.no_compile and "torch.compile" in names:
        names = [n for n in names if n != "torch.compile"]
    factories = {"eager": lambda: eager, "grid+sdpa": lambda: grid_sdpa, "torch.compile": lambda: torch.compile(eager),
                 "coorkern": lambda: fused, "coorkern-triton": lambda: fused_triton, "coorkern-aten": lambda: fused,
                 "coorkern-kernel": lambda: fused}
    impls = {name: factories[name]() for name in names}

    header = ["heads x d x N", "dtype", "sample", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "peak extra MiB",
              "fwd+bwd vs eager", "vs grid+sdpa", "fwd vs grid+sdpa"]
    if on_gpu:
        header += ["fwd TFLOP/s", "bwd TFLOP/s", "fwd+bwd GPU kernel ms"]
    else:
        header += ["fwd GFLOP/s", "fwd % peak"]
    rows = []
    _common.start_table(header)
    for size in sizes:
        heads, d, n = (int(x) for x in size.split("x"))
        for dtype_name in dtypes:
            for sample in args.samples:
                inputs = make_inputs(heads, d, n, DTYPES[dtype_name], sample, device)
                results = {}
                for name, fn in impls.items():
                    with cpu_path(name):
                        results[name] = bench_one(fn, inputs, sample, device, reps, stat)
                flops = 4 * BATCH * heads * n * n * d
                for name, res in results.items():
                    if res is None:
                        row = [size, dtype_name, sample, name, "OOM", "OOM", "OOM", "-", "-", "-", "-"]
                        rows.append(row + ["-", "-"] + (["-"] if on_gpu else []))
                        continue
                    t_f, t_b, t_s, mem, kernel_ms = res

                    def ratio(base, index=2):
                        other = results.get(base)
                        return f"{other[index] / res[index]:.2f}x" if other else "-"

                    row = [size, dtype_name, sample, name, f"{t_f * 1e3:.2f}", f"{t_b * 1e3:.2f}",
                           f"{t_s * 1e3:.2f}", f"{mem:.0f}", ratio("eager"), ratio("grid+sdpa"),
                           ratio("grid+sdpa", 0)]
                    if on_gpu:
                        row += [f"{flops / t_f / 1e12:.1f}", f"{2.5 * flops / t_b / 1e12:.1f}", f"{kernel_ms:.3f}"]
                    else:
                        gflops = flops / t_f / 1e9
                        row += [f"{gflops:.1f}", f"{100 * gflops / (args.peak_gflops * torch.get_num_threads()):.0f}%"]
                    _common.add_row(rows, row)
    _common.report_table(f"Machine: {_common.device_name(device)}; B = {BATCH}; {stat} of {reps} runs, "
                         f"{args.clock} clock; {note}", header, rows, args.markdown)


if __name__ == "__main__":
    main()
