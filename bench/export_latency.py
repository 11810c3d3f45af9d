"""Benchmark: CPU latency of the exported detector, per export format, against eager PyTorch.

    python bench/export_latency.py [--cases paper512 cpu] [--threads 1 2] [--formats eager torchscript pt2 onnx]
                                   [--reps 10] [--out FILE.md]

Cases (the coor detector, 19 landmarks, random weights of seed 0, batch 1):

* ``paper512`` -- the paper's cephalogram input, 512 x 416, base width 64;
* ``cpu``      -- the ``cpu`` training profile's ISBI 2015 model (``coorkern.engine.profiles``):
                  256 x 208, base width 8.

Each case is exported once per format into a temporary folder (pt2: one AOTInductor compile,
a minute or two; the export time is printed), then every format runs the same seeded image
under ``torch.inference_mode`` at each ``--threads`` count: ``eager``, ``torchscript`` and
``pt2`` run :class:`coorkern.engine.export.DetectorForExport` (normalization, network,
heatmap decoding), ``onnx`` the network alone in onnxruntime (its CPU provider with
``intra_op_num_threads`` = the thread count; the fused attention lowered to standard
operators).  The pt2 package sizes its OpenMP buffers at run time (``cpp.dynamic_threads``),
so ``torch.set_num_threads`` governs it as it does eager.  The formats run round-robin
(:func:`interleaved_medians`: the machine is shared, and a load that changes midway must
not favour whichever format ran last); printed: the median milliseconds over ``--reps``
rounds after two warm-up rounds, and the speed-up over eager.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from coorkern.engine import export as exporter  # noqa: E402
from coorkern.engine.profiles import PROFILES  # noqa: E402
from coorkern.models import CoorDetector  # noqa: E402

CASES = {  # name: ((H, W), base channels)
    "paper512": ((512, 416), 64),
    "cpu": (tuple(PROFILES["cpu"].image_size["isbi2015"]), PROFILES["cpu"].base_channels),
}
FORMATS = ("eager", "torchscript", "pt2", "onnx")


def export_runners(case: str, formats, folder: str) -> dict:
    """``{format: run(image)}`` for the case's model, each export timed (printed)."""
    size, base = CASES[case]
    torch.manual_seed(0)
    model = CoorDetector(base_channels=base, num_landmarks=19, transformer="coor").eval()
    wrapper = exporter.DetectorForExport(model).eval()
    runners = {"eager": wrapper} if "eager" in formats else {}
    for fmt in formats:
        if fmt == "eager":
            continue
        path = os.path.join(folder, f"{case}.{fmt}")
        start = time.perf_counter()
        if fmt == "onnx":
            runners[fmt] = exporter.to_onnx(model, path, size)
        elif fmt == "torchscript":
            runners[fmt] = torch.jit.load(exporter.to_torchscript(model, path, size)["path"])
        else:
            runners[fmt] = torch._inductor.aoti_load_package(exporter.to_pt2(model, path, size)["path"])
        print(f"{case}: exported {fmt} in {time.perf_counter() - start:.0f} s", flush=True)
    return runners


def onnx_session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda image: session.run(None, {"images": image.numpy()})


def interleaved_medians(steps: dict, reps: int) -> dict:
    """Median seconds per step, the steps run round-robin (two warm-up rounds first) so that a change
    of load on a shared machine hits every format alike, rather than whichever ran last."""
    times = {name: [] for name in steps}
    for round_index in range(2 + reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if round_index >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    header = ["case", "threads", *(f"{fmt} ms" for fmt in args.formats)]
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as folder:
        for case in args.cases:
            runners = export_runners(case, args.formats, folder)
            size, base = CASES[case]
            image = torch.rand(1, 1, *size, generator=torch.Generator().manual_seed(0))
            for threads in args.threads:
                torch.set_num_threads(threads)
                steps = {}
                for fmt in args.formats:
                    run = onnx_session(runners[fmt], threads) if fmt == "onnx" else runners[fmt]

                    def step(run=run):
                        with torch.inference_mode():
                            run(image)

                    steps[fmt] = step
                medians = interleaved_medians(steps, args.reps)
                eager = medians.get("eager")
                cells = [f"{medians[fmt] * 1e3:.1f}" + (f" ({eager / medians[fmt]:.2f}x)" if eager and fmt != "eager"
                                                        else "") for fmt in args.formats]
                _common.add_row(rows, [f"{case} {size[0]}x{size[1]}, base {base}", str(threads), *cells])
    caption = (f"Exported detector latency on CPU ({_common.device_name(torch.device('cpu')).rsplit(',', 1)[0]}, "
               f"torch {torch.__version__}); median of {args.reps} interleaved runs, batch 1; (Nx) = speed-up "
               f"over eager")
    _common.report_table(caption, header, rows, args.out)


if __name__ == "__main__":
    main()
