"""Benchmark: central loss forward+backward, eager PyTorch vs torch.compile vs coorkern.

    python bench/central_loss.py [--shapes 2x19x512x416 8x19x512x416] [--dtypes fp32 bf16] [--reps 10]

On CUDA coorkern runs its Triton kernels and the table adds achieved GB/s against
the minimum traffic (logits read + grad write, + target read when a target tensor
is given).  On a CPU-only machine it runs the CPU comparison (coorkern = the C++
kernel) and says so.  "eager" is coorkern.reference (the oracle, written the way a
user would in PyTorch); the from-landmarks variants of eager and compile build the
Gaussian target tensor first, as a user without the fused kernel has to.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import coorkern  # noqa: E402
from coorkern import reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def eager_target(x, t):
    return reference.central_loss(x, t, 2.0, "mean")


def eager_landmarks(x, lm):
    return reference.central_loss_from_landmarks(x, lm, 3.0, 2.0, "mean")


def coorkern_target(x, t):
    return coorkern.central_loss(x, t, 2.0, "mean")


def coorkern_landmarks(x, lm):
    return coorkern.central_loss_from_landmarks(x, lm, 3.0, 2.0, "mean")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["2x19x512x416", "8x19x512x416"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    args = parser.parse_args()

    device = _common.default_device()
    compiled = {}
    if not args.no_compile:
        compiled = {"target": torch.compile(eager_target), "landmarks": torch.compile(eager_landmarks)}
    impls = {
        "target": {"eager": eager_target, "torch.compile": compiled.get("target"), "coorkern": coorkern_target},
        "landmarks": {"eager": eager_landmarks, "torch.compile": compiled.get("landmarks"),
                      "coorkern": coorkern_landmarks},
    }
    on_gpu = device.type == "cuda"
    print(f"device: {_common.device_name(device)} ({'Triton kernels' if on_gpu else 'CPU only: coorkern = C++ kernel'})")
    print(_common.threads_note())
    header = ["shape", "dtype", "variant", "impl", "fwd+bwd ms", "peak extra MiB", "vs eager", "vs compile"]
    if on_gpu:
        header += ["GB/s", "GPU kernel ms"]
    rows = []
    _common.start_table(header)
    for shape_text in args.shapes:
        shape = tuple(int(s) for s in shape_text.split("x"))
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            gen = torch.Generator(device="cpu").manual_seed(0)
            x = (torch.randn(shape, generator=gen) * 2).to(device=device, dtype=dtype).requires_grad_(True)
            t = torch.rand(shape, generator=gen).to(device=device, dtype=dtype)
            scale = torch.tensor([shape[-1], shape[-2]], dtype=torch.float32)
            lm = (torch.rand(shape[:-2] + (2,), generator=gen) * scale).to(device)
            for variant, data in (("target", t), ("landmarks", lm)):
                results, kernel_ms = {}, {}
                for impl_name, fn in impls[variant].items():
                    if fn is None:
                        continue

                    def step(fn=fn, data=data):
                        x.grad = None
                        fn(x, data).backward()

                    results[impl_name] = _common.measure(step, device, reps=args.reps)
                    kernel_ms[impl_name] = _common.gpu_kernel_ms(step, device)
                for impl_name, (sec, extra) in results.items():
                    row = [shape_text, dtype_name, variant, impl_name, f"{sec * 1e3:.2f}", f"{extra:.0f}",
                           f"{results['eager'][0] / sec:.2f}x",
                           f"{results['torch.compile'][0] / sec:.2f}x" if "torch.compile" in results else "-"]
                    if on_gpu:
                        elems = x.numel() * (3 if variant == "target" else 2)
                        row += [f"{elems * x.element_size() / sec / 1e9:.0f}", f"{kernel_ms[impl_name]:.3f}"]
                    _common.add_row(rows, row)
    print()
    print(_common.markdown_table(header, rows))


if __name__ == "__main__":
    main()
