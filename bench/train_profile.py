"""Time training steps per transformer kind and extrapolate to one run of a training profile.

    python bench/train_profile.py                       # the cpu profile, every kind, 1 thread
    python bench/train_profile.py --image-size 320 256 --base-channels 16 --kinds coor none

Per kind: a few Adam steps of the detector with the central loss on random images of
the profile's size (the cost does not depend on the pixels), then inference on a
validation-sized batch; the run time is extrapolated as ``epochs x (train images /
batch x step + validation images x inference per image)``.  Data loading is left out
(the cpu profile caches the resized images, so it is paid once).  Both the wall time
and the process CPU time are taken (min over repeats): on a machine shared with other
jobs the wall time grows with the load, while the CPU time of a 1-thread run stays
close to what an idle machine's wall time would be.  Prints a Markdown table; say which
machine and how loaded it was next to the numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from coorkern.engine import profiles  # noqa: E402
from coorkern.models import TRANSFORMER_KINDS, CoorDetector  # noqa: E402
from coorkern.losses import heatmap_loss as compute_loss  # noqa: E402


def _timed(fn, count: int, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds per call of ``fn``, each the min over ``repeats`` rounds of ``count`` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(count):
            fn()
        wall.append((time.perf_counter() - t0) / count)
        cpu.append((time.process_time() - c0) / count)
    return min(wall), min(cpu)


def time_kind(kind: str, image_size, base: int, batch: int, steps: int, repeats: int) -> dict:
    """Wall and CPU seconds per training step and per validation image (min over ``repeats``)."""
    torch.manual_seed(0)
    model = CoorDetector(base_channels=base, transformer=kind)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 1, *image_size)
    landmarks = torch.rand(batch, 19, 2) * torch.tensor([image_size[1] - 1.0, image_size[0] - 1.0])

    def step():
        loss = compute_loss("central", model(images), landmarks, sigma=2.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.train()
    step()  # warm-up
    step_wall, step_cpu = _timed(step, steps, repeats)
    model.eval()
    with torch.no_grad():
        model(images)
        infer_wall, infer_cpu = _timed(lambda: model(images), 1, repeats)
    return {"wall": (step_wall, infer_wall / batch), "cpu": (step_cpu, infer_cpu / batch)}


def main(argv=None) -> None:
    cpu = profiles.PROFILES["cpu"]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, nargs=2, default=cpu.image_size["isbi2015"])
    p.add_argument("--base-channels", type=int, default=cpu.base_channels)
    p.add_argument("--batch-size", type=int, default=cpu.batch_size)
    p.add_argument("--epochs", type=int, default=cpu.epochs["isbi2015"])
    p.add_argument("--train-images", type=int, default=100, help="ISBI 2015 protocol here: 100 train")
    p.add_argument("--val-images", type=int, default=50, help="... and 50 held out (validated every epoch)")
    p.add_argument("--kinds", nargs="+", default=list(TRANSFORMER_KINDS), choices=TRANSFORMER_KINDS)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = tuple(args.image_size)
    print(f"image {size[0]}x{size[1]}, base {args.base_channels}, batch {args.batch_size}, {args.epochs} epochs of "
          f"{args.train_images} train + {args.val_images} validation images, {args.threads} thread(s), "
          f"torch {torch.__version__}\n")
    print("| kind | clock | train step (s) | train img/s | inference img/s | extrapolated run (min) |")
    print("|---|---|---|---|---|---|")
    for kind in args.kinds:
        timings = time_kind(kind, size, args.base_channels, args.batch_size, args.steps, args.repeats)
        for clock, (step_s, infer_s) in timings.items():
            epoch_s = args.train_images // args.batch_size * step_s + args.val_images * infer_s
            run_min = (args.epochs * epoch_s + args.val_images * infer_s) / 60
            print(f"| {kind} | {clock} | {step_s:.3f} | {args.batch_size / step_s:.1f} | {1 / infer_s:.1f} | "
                  f"{run_min:.1f} |", flush=True)


if __name__ == "__main__":
    main()
