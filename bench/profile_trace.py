"""A torch.profiler trace of one step, reduced to markdown: where the host time goes and what the GPU waits for.

    python bench/profile_trace.py TRACE.json[.gz] [--case NAME] [--step-name step]

``bench/gpu_check.py``'s trace stage records one step per case (CPU + CUDA activities, Python
stacks) in a chrome trace and prints this reduction of it, the window being the step's
``record_function`` range (``--step-name``; the whole trace without one):

* host time per layer: the exclusive time of every host event (Python functions, ATen ops,
  CUDA runtime/driver calls) inside the step, the Python functions grouped by where they live
  (:data:`LAYERS`: coorkern's op entry, its launch code, Triton's launcher, the model, the
  engine, torch);
* launches per step (runtime ``cudaLaunchKernel*``, driver ``cuLaunchKernel*`` as Triton
  launches, ``cudaGraphLaunch``) and GPU kernels, and the GPU's kernel time;
* the gap between a launch call and its kernel's start (matched by correlation id): large gaps
  mean a GPU queue ahead of the host, small ones a host that feeds an idle GPU;
* any synchronizing or allocating call inside the step (:data:`SYNC_CALLS`): each one is a place
  where the host waits for the device, or that a CUDA graph cannot hold.

A CPU-only trace (no CUDA activity) gives the host part and zeros for the rest: the dry run
of this code on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import statistics
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

# Python functions by file, first match wins: the layers between the user and the GPU.
LAYERS = (
    ("coorkern op entry (checks, routing, autograd.Function)",
     r"coorkern/(ops/[^/]+/op\.py|ops/_runtime/backend\.py|_checks\.py|losses\.py)"),
    ("coorkern launch (buffers, configs, autotuner)", r"coorkern/ops/([^/]+/launch\.py|_runtime/host\.py)"),
    ("Triton launcher", r"triton/"),
    ("coorkern model (Python)", r"coorkern/models/"),
    ("coorkern engine (the training step)", r"coorkern/engine/"),
    ("torch.optim", r"torch/optim/"),
    ("torch.nn modules", r"torch/nn/"),
    ("torch (autograd, wrappers)", r"torch/"),
    ("other Python", r""),
)
HOST_CATEGORIES = ("python_function", "cpu_op", "cuda_runtime", "cuda_driver")
LAUNCH = re.compile(r"^(cudaLaunchKernel|cudaLaunchKernelExC|cudaLaunchCooperativeKernel|cuLaunchKernel|"
                    r"cuLaunchKernelEx|cudaGraphLaunch)(_v\d+)?$")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cudaMemcpy2D", "cudaMalloc", "cudaFree", "cudaHostAlloc", "cudaMallocHost", "cudaFreeHost",
              "cuMemAlloc", "cuMemFree", "cuStreamSynchronize", "cuCtxSynchronize")
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def load_events(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _window(events: list[dict], step_name: str) -> tuple[float, float]:
    steps = [e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"
             and e.get("name") == step_name]
    if steps:
        step = max(steps, key=lambda e: e.get("dur", 0))
        return float(step["ts"]), float(step["ts"]) + float(step.get("dur", 0))
    spans = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events if e.get("ph") == "X"]
    return (min(s for s, _ in spans), max(t for _, t in spans)) if spans else (0.0, 0.0)


def layer_of(name: str) -> str:
    path = name.replace("\\", "/")
    for layer, pattern in LAYERS:
        if re.search(pattern, path):
            return layer
    return LAYERS[-1][0]


def _self_times(host: list[dict]) -> list[tuple[dict, float]]:
    """(event, exclusive microseconds) of host events nested per thread by their time ranges."""
    out = []
    by_thread = defaultdict(list)
    for e in host:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    for events in by_thread.values():
        events.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0))))
        stack: list[list] = []  # [event, end, child time]
        for e in events:
            start, end = float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))
            while stack and stack[-1][1] <= start:
                done = stack.pop()
                out.append((done[0], float(done[0].get("dur", 0)) - done[2]))
            if stack:
                stack[-1][2] += min(end, stack[-1][1]) - start
            stack.append([e, end, 0.0])
        out += [(e, float(e.get("dur", 0)) - child) for e, _, child in stack]
    return out


def reduce_trace(events: list[dict], step_name: str = "step") -> dict:
    """The numbers of one step (see the module docstring)."""
    start, end = _window(events, step_name)
    inside = [e for e in events if e.get("ph") == "X" and start <= float(e.get("ts", -1)) <= end]
    host = [e for e in inside if e.get("cat") in HOST_CATEGORIES]
    layers: dict[str, float] = defaultdict(float)
    for event, self_us in _self_times(host):
        cat = event.get("cat")
        if cat == "python_function":
            layers[layer_of(event.get("name", ""))] += self_us
        elif cat == "cpu_op":
            layers["ATen / torch ops (C++)"] += self_us
        else:
            layers["CUDA runtime + driver calls"] += self_us
    calls = [e for e in host if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    launches = [e for e in calls if LAUNCH.match(e.get("name", ""))]
    syncs: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for e in calls:
        name = e.get("name", "")
        if name in SYNC_CALLS:
            syncs[name][0] += 1
            syncs[name][1] += float(e.get("dur", 0))
    # GPU work of the step: what its launches started (the GPU clock lags the host's).
    correlation = {e.get("args", {}).get("correlation"): e for e in launches}
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES
           and e.get("args", {}).get("correlation") in correlation]
    kernels = [e for e in gpu if e.get("cat") == "kernel"]
    gaps = [float(k["ts"]) - float(correlation[k["args"]["correlation"]]["ts"]) for k in kernels]
    gpu_span = (max(float(e["ts"]) + float(e.get("dur", 0)) for e in gpu) - min(float(e["ts"]) for e in gpu)
                if gpu else 0.0)
    kernel_us = sum(float(k.get("dur", 0)) for k in kernels)
    return {
        "step_us": end - start, "host_us": sum(layers.values()), "layers": dict(layers),
        "launches": len(launches), "graph_launches": sum(e.get("name", "").startswith("cudaGraphLaunch")
                                                         for e in launches),
        "kernels": len(kernels), "kernel_us": kernel_us, "gpu_span_us": gpu_span,
        "gap_median_us": statistics.median(gaps) if gaps else float("nan"),
        "gap_max_us": max(gaps) if gaps else float("nan"),
        "syncs": {name: tuple(v) for name, v in syncs.items()},
    }


def _ms(us: float) -> str:
    return "-" if us != us else f"{us / 1e3:.3f}"


SUMMARY_HEADER = ["case", "wall ms", "traced step ms", "host ms", "launches", "GPU kernels", "kernel ms",
                  "GPU busy", "launch -> kernel us (median / max)", "syncs, copies, allocs in the step"]
LAYER_HEADER = ["case", "layer", "host ms (exclusive)", "share"]


def summary_row(case: str, summary: dict, wall_ms: float = float("nan")) -> list[str]:
    busy = summary["kernel_us"] / summary["gpu_span_us"] if summary["gpu_span_us"] else float("nan")
    syncs = ", ".join(f"{name} x{count} ({us:.0f} us)" for name, (count, us) in sorted(summary["syncs"].items()))
    gaps = ("-" if summary["gap_median_us"] != summary["gap_median_us"]
            else f"{summary['gap_median_us']:.0f} / {summary['gap_max_us']:.0f}")
    launches = str(summary["launches"]) + (f" ({summary['graph_launches']} graph)" if summary["graph_launches"] else "")
    return [case, "-" if wall_ms != wall_ms else f"{wall_ms:.3f}", _ms(summary["step_us"]), _ms(summary["host_us"]),
            launches, str(summary["kernels"]), _ms(summary["kernel_us"]),
            "-" if busy != busy else f"{100 * busy:.0f}%", gaps, syncs or "none"]


def layer_rows(case: str, summary: dict) -> list[list[str]]:
    total = summary["host_us"] or 1.0
    ordered = sorted(summary["layers"].items(), key=lambda kv: -kv[1])
    return [[case, layer, _ms(us), f"{100 * us / total:.0f}%"] for layer, us in ordered if us > 0]


def markdown(case: str, summary: dict, wall_ms: float = float("nan")) -> str:
    """The two tables of one case: the summary row, then host time per layer."""
    return (_common.markdown_table(SUMMARY_HEADER, [summary_row(case, summary, wall_ms)]) + "\n\n"
            + _common.markdown_table(LAYER_HEADER, layer_rows(case, summary)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", help="chrome trace of torch.profiler (export_chrome_trace), .json or .json.gz")
    parser.add_argument("--case", default="step", help="the name of the case in the tables")
    parser.add_argument("--step-name", default="step", help="record_function range of the step")
    args = parser.parse_args(argv)
    print(markdown(args.case, reduce_trace(load_events(args.trace), args.step_name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
