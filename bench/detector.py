"""Benchmark: the detector's CPU training step and CPU inference, per transformer kind.

    python bench/detector.py [--cases train128 train256 infer512] [--transformers none vanilla coor]
                             [--attention kernel aten] [--threads 1] [--reps 3]

Cases (the CPU defaults of ``coorkern train`` (``coorkern.engine.profiles``) and the paper's inference size):

* ``train128`` -- 128 x 128 images, base 8 (every head d = 8), batch 8: forward, central
                  loss, backward, Adam step;
* ``train256`` -- the same at 256 x 208;
* ``infer512`` -- 512 x 416, base 64 (d = 64), batch 1, forward under ``torch.inference_mode``.

``--attention`` runs the coor detector's CPU attention through the hand-written kernel
(``kernel``, the default rule) and/or ATen's grid sampler + flash attention (``aten``,
forced with ``COORKERN_CPU_ATTENTION=aten``: what the op did before the kernel), in the
same process so that the ratio compares like with like; ``free`` replaces the attention
by a copy of its value tokens (no sampling, no scores, and no gradient to q, k or the
coordinates): no kernel can make the step faster than that, so ``free`` bounds what any
attention kernel could gain (Amdahl).  Prints the minimum step time over ``--reps`` steps
(after one warm-up; wall clock, or ``--clock process``) and the step's peak extra memory
(resident-set high-water mark, see ``bench/_common.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from coorkern import models  # noqa: E402
from coorkern.models import CoorDetector  # noqa: E402
from coorkern.losses import heatmap_loss as compute_loss  # noqa: E402

CASES = {  # name: (training?, (H, W), base channels, batch)
    "train128": (True, (128, 128), 8, 8),
    "train256": (True, (256, 208), 8, 8),
    "infer512": (False, (512, 416), 64, 1),
}


def make_step(case: str, transformer: str):
    training, (height, width), base, batch = CASES[case]
    torch.manual_seed(0)
    model = CoorDetector(base_channels=base, transformer=transformer)
    images = torch.randn(batch, 1, height, width)
    if not training:
        model.eval()

        def infer():
            with torch.inference_mode():
                model(images)

        return infer
    model.train()
    landmarks = torch.rand(batch, model.num_landmarks, 2) * torch.tensor([width - 1.0, height - 1.0])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train():
        optimizer.zero_grad(set_to_none=True)
        loss = compute_loss("central", model(images), landmarks, sigma=2.0)
        loss.backward()
        optimizer.step()

    return train


def _free_attention(q, k, v, coords, sample="qk", **_):
    """The attention's output shape at the cost of a copy: v's tokens (qk) or q's (kv)."""
    return (v if sample == "qk" else q).clone()


@contextlib.contextmanager
def attention_impl(impl: str):
    """Run the coor detector's attention as ``impl``: kernel / aten (the C++ op's two CPU
    paths) or free (no attention work at all)."""
    saved = models.attention.coor_attention
    if impl in ("kernel", "aten"):
        os.environ["COORKERN_CPU_ATTENTION"] = impl
    elif impl == "free":
        models.attention.coor_attention = _free_attention
    try:
        yield
    finally:
        os.environ.pop("COORKERN_CPU_ATTENTION", None)
        models.attention.coor_attention = saved


def time_min(step, reps: int, clock=time.perf_counter) -> float:
    step()  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = clock()
        step()
        best = min(best, clock() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--transformers", nargs="+", default=["none", "vanilla", "coor"],
                        choices=["none", "vanilla", "coor"])
    parser.add_argument("--attention", nargs="+", default=["kernel", "aten"], choices=["kernel", "aten", "free"],
                        help="CPU attention of the coor detector: the hand-written kernel and/or ATen's composition; "
                             "free: none at all (the bound on any kernel's gain)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process: CPU seconds of this process (all threads), robust to other jobs on a shared "
                             "machine; compare with 1 thread")
    parser.add_argument("--markdown", default=None, help="also write the markdown table to this file")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "process" else time.perf_counter
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print(f"device: {_common.device_name(device)}")
    print(_common.threads_note())

    header = ["case", "transformer", "attention", "step ms (min)", "peak extra MiB", "vs none", "coor kernel vs aten",
              "kernel / free (max gain)"]
    rows = []
    _common.start_table(header)
    for case in args.cases:
        times = {}
        for transformer in args.transformers:
            impls = args.attention if transformer == "coor" else ["-"]
            for impl in impls:
                with attention_impl(impl):
                    step = make_step(case, transformer)
                    seconds = time_min(step, args.reps, clock)
                    _, mem = _common.measure(step, device, warmup=0, reps=1)
                times[(transformer, impl)] = seconds
                base = times.get(("none", "-"))
                vs_none = f"{seconds / base:.2f}x" if base else "-"
                kernel = times.get(("coor", "kernel"))
                speedup = f"{seconds / kernel:.2f}x" if impl == "aten" and kernel else "-"
                bound = f"{kernel / seconds:.2f}x" if impl == "free" and kernel else "-"
                row = [case, transformer, impl, f"{seconds * 1e3:.0f}", f"{mem:.0f}", vs_none, speedup, bound]
                _common.add_row(rows, row)
    _common.report_table(f"Machine: {_common.device_name(device)}; min over {args.reps} steps after one warm-up, "
                         f"{args.clock} clock", header, rows, args.markdown)


if __name__ == "__main__":
    main()
