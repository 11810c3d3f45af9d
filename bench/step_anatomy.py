"""What one training step of the detector is made of: ATen ops per part, and FLOPs.

    python bench/step_anatomy.py [--size 512 416] [--base 64] [--batch 2]

The GPU runs measured the detector's training step (bf16 autocast, AdamW) at 0.90-1.07x of
the same model on the eager reference ops, against a 1.5x target, and torch.compile of the
whole model at 1.02-1.39x (``bench/RESULTS.md``).  This counts, on the CPU, the ATen ops one
step dispatches -- forward, backward, optimizer -- with coorkern's ops and with the eager
reference ops (``coorkern.backend("reference")``), and how many of the forward's run inside
coorkern's two ops.  On a GPU every ATen op is at least one kernel launch with its host
cost, so where the step is host-bound the ratio of op counts bounds what faster ops can give.
The op count does not depend on the image size (the same graph); it is taken at a small size
with bf16 autocast on the CPU and the optimizer in its multi-tensor (``foreach``) form, as on
CUDA; AdamW's per-parameter ``.item()`` of its CPU step counts is listed apart (no kernel).
On the CPU coorkern's ops are its C++ kernels (one ATen op per call); on CUDA ``auto`` runs the
attention as grid_sample + SDPA (a few ATen ops) and the loss as 2 + 1 Triton launches, so
the CUDA counts differ by a handful.  The FLOPs are counted on meta tensors at the requested
size (no memory, no time).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import _common  # noqa: E402

import coorkern  # noqa: E402
from coorkern import models  # noqa: E402

COUNT_SIZE = (64, 64)  # the op count's image size (any size gives the same graph)
COUNT_BASE = 8


class OpCounter(TorchDispatchMode):
    """Counts ATen ops, and separately those dispatched inside coorkern's ops (``inside``)."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self.inside = 0
        self.scalar_reads = 0  # .item() of CPU scalars (AdamW's step counts): no GPU kernel
        self.depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        self.inside += self.depth > 0
        self.scalar_reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def attributed(counter: OpCounter):
    """Ops dispatched inside the detector's calls of coorkern's ops count as ``inside``."""
    originals = {"coor_attention": models.attention.coor_attention, "loss": coorkern.central_loss_from_landmarks}

    def inside(fn):
        def call(*args, **kwargs):
            counter.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                counter.depth -= 1
        return call

    models.attention.coor_attention = inside(originals["coor_attention"])
    loss_fn = inside(originals["loss"])
    try:
        yield loss_fn
    finally:
        models.attention.coor_attention = originals["coor_attention"]


def count_ops(backend: str, batch: int, num_landmarks: int = 19) -> dict:
    """ATen ops of one training step (forward, backward, optimizer) under ``backend``."""
    torch.manual_seed(0)
    height, width = COUNT_SIZE
    model = models.CoorDetector(base_channels=COUNT_BASE, num_landmarks=num_landmarks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    images = torch.randn(batch, 1, height, width)
    landmarks = torch.rand(batch, num_landmarks, 2) * torch.tensor([width - 1.0, height - 1.0])
    counts = {}
    for attempt in ("warm-up", "counted"):
        counters = {part: OpCounter() for part in ("forward", "backward", "optimizer")}
        with attributed(counters["forward"]) as loss_fn:
            with counters["forward"], coorkern.backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model(images), landmarks, sigma=3.0)
        with counters["backward"]:
            loss.backward()
        with counters["optimizer"]:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        counts = {part: c.total - c.scalar_reads for part, c in counters.items()}
        counts["forward, inside coorkern's ops"] = counters["forward"].inside
        counts["optimizer scalar reads"] = counters["optimizer"].scalar_reads
    return counts


def step_flops(size, base: int, batch: int) -> dict:
    """FLOPs of one forward + backward at ``size`` (meta tensors), by ATen op."""
    from torch.utils.flop_counter import FlopCounterMode

    model = models.CoorDetector(base_channels=base, num_landmarks=19).to("meta")
    images = torch.randn(batch, 1, *size, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, coorkern.backend("reference"):
        model(images).float().sum().backward()
    by_op = {str(op).replace("aten.", ""): n for op, n in counter.get_flop_counts()["Global"].items()}
    return {"total": counter.get_total_flops(), **by_op}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", nargs=2, type=int, default=[512, 416], metavar=("H", "W"))
    parser.add_argument("--base", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"ATen ops per training step (CoorDetector, batch {args.batch}, bf16 autocast on the CPU, AdamW "
          f"foreach; the same at any size), torch {torch.__version__}", flush=True)
    header = ["ops", "forward", "forward, inside coorkern's ops", "backward", "optimizer", "step",
              "+ optimizer CPU scalar reads"]
    rows, steps = [], {}
    for backend, label in (("reference", "eager reference ops"), ("auto", "coorkern (auto)")):
        c = count_ops(backend, args.batch)
        steps[label] = c["forward"] + c["backward"] + c["optimizer"]
        rows.append([label, str(c["forward"]), str(c["forward, inside coorkern's ops"]), str(c["backward"]),
                     str(c["optimizer"]), str(steps[label]), str(c["optimizer scalar reads"])])
    print(_common.markdown_table(header, rows))
    ratio = steps["eager reference ops"] / steps["coorkern (auto)"]
    print(f"\nreference / coorkern ops per step: {ratio:.2f}x (the speed-up a host-bound step can get from "
          "coorkern's ops alone)")
    flops = step_flops(tuple(args.size), args.base, args.batch)
    top = sorted(((op, n) for op, n in flops.items() if op != "total"), key=lambda kv: -kv[1])[:5]
    print(f"\nFLOPs of one forward + backward at {args.size[0]}x{args.size[1]}, base {args.base}: "
          f"{flops['total'] / 1e9:.4g} GFLOP (" + ", ".join(f"{op} {n / 1e9:.4g}" for op, n in top) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
