"""GPU truth in one command: CUDA tests, benchmarks and the detector's training step.

    python bench/gpu_check.py [--budget-min 9.5] [--json bench/gpu_check.json] [--no-results-md]
                              [--stages STAGE ...] [--trace-dir DIR]

On a CUDA machine, within a time box (9.5 minutes by default: a lent GPU has 15 minutes in
all and one device command at most 10), in this order:

1. prints the device, torch / triton / CUDA versions and the measured copy bandwidth;
2. runs the CUDA tests (``COORKERN_TEST_DEVICE=cuda pytest python_tests/cuda/``,
   real Triton compiler, no interpreter; one line per test, 120 s per test at most, on
   pytest-xdist workers where installed);
3. a host profile: ``bench/host_overhead.py`` (host microseconds per call of each layer
   between the user and the GPU, tiny inputs), then one forward + backward of each op
   (wall vs GPU kernel time, cProfile, torch.profiler) -- the H200 runs found both host-bound;
4. the C++ library's ahead-of-time CUDA kernels (``csrc/aot/``): built in place, then run
   from a process that loads only ``libcoorkern_ops.so`` (``test_cuda_cpp_aot.py``);
5. a training step of the detector (512 x 416, base 64, batch 2, bf16 autocast; the trainer's
   own step): step time and peak memory with the eager reference ops
   (``coorkern.backend("reference")``), coorkern (auto) and coorkern's Triton kernels forced,
   each op by op and replayed from a CUDA graph (``--cuda-graphs``), and with ``torch.compile``;
6. traces: one central-loss fwd+bwd (8 x 19 x 512 x 416), one attention fwd+bwd on the Triton
   path, one detector step eager and one graphed, each in a fresh process after its wall-clock
   timing, under torch.profiler (CPU + CUDA, Python stacks).  The gzipped chrome traces go to
   ``--trace-dir`` (default ``$OUT/traces`` when ``$OUT`` is set, else a temporary folder);
   ``bench/profile_trace.py`` reduces each to tables -- host time per layer, launches per step,
   the gap between a launch and its kernel, any synchronizing/copying/allocating CUDA call
   inside the step -- which the report keeps.  ``--stage trace --device cpu`` is its dry run;
7. ``bench/central_loss.py`` at the detector's shapes (2|8 x 19 x 512 x 416) and a
   64M-element case, fp32 and bf16 (GB/s against the minimum bytes, GPU kernel time);
8. ``bench/attention.py`` at N = 16384 / 13312 with d = 32 / 64 / 128 and the detector's
   sizes in bf16, then two sizes in fp32 (TFLOP/s, next to grid_sample + SDPA and eager;
   coorkern as ``auto`` runs it and its Triton kernels forced);

then checks the issue's targets on what it measured, writes everything to a JSON file and
replaces the GPU section of ``bench/RESULTS.md`` (between ``<!-- gpu_check -->`` markers),
naming the device.  Every stage runs in a subprocess with its share of the time box; a
stage cut off prints "stopped at <stage>" and the report says so (the benchmarks print
their tables row by row, so the rows measured before the cut are kept).  The stages' caps
add up to more than the default box: the last ones (the benchmarks, measured on two H200
runs already) go first when time is short.  ``--stages`` runs a subset, e.g. in a second
device command what the first did not reach (write its JSON elsewhere and pass
``--no-results-md`` to keep the first run's section).

On a machine without CUDA it prints that nothing ran and exits with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXIT_NO_CUDA = 2
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
MARK_START, MARK_END = "<!-- gpu_check:start -->", "<!-- gpu_check:end -->"

# Most telling first (the targets' size, then the detector's): a stage cut off by the time
# box keeps the rows it printed.  The second H200 run got through 2 of 3 loss shapes and 2 of
# 8 attention sizes in the time box: the lists are what fits.
CENTRAL_LOSS_SHAPES = ["8x19x512x416", "64x1x1024x1024", "2x19x512x416"]  # 64x1x1024x1024: 64M elements
ATTENTION_SIZES_BF16 = ["1x64x16384", "4x32x3328", "8x32x832", "2x128x13312", "2x32x13312"]
ATTENTION_SIZES_FP32 = ["1x64x16384", "4x32x3328"]
# Stage time caps in seconds at the default time box (each also bounded by what is left;
# a shorter box scales them all).  A lent GPU has 15 minutes in all and one device command
# at most 10: the default box, 9.5 minutes, fits one command with the machine's start.  The
# second H200 run: the CUDA tests one at a time reached 23% in 183 s (compiling dominates:
# they run on pytest-xdist workers where it is installed), the training step took ~100 s.
DEFAULT_BUDGET_MIN = 9.5
STAGE_CAPS = {"cuda tests": 150, "host profile": 35, "C++ CUDA kernels": 150, "training-step benchmark": 150,
              "traces": 120, "central loss benchmark": 55, "attention benchmark, bf16": 120,
              "attention benchmark, fp32": 60}
TABLE_KEYS = {"central loss benchmark": "central_loss_tables", "attention benchmark, bf16": "attention_tables",
              "attention benchmark, fp32": "attention_tables", "training-step benchmark": "train_step_tables",
              "traces": "trace_tables"}
ALL_TABLES = ("traces",)  # stages whose every table is kept (the others: their last, complete one)
TARGETS = {
    "central loss fwd+bwd >= 80% of copy bandwidth": 0.8,
    "central loss >= 1.3x torch.compile": 1.3,
    "central loss >= 5x eager": 5.0,
    "attention bf16 d=64 N=16384 forward >= 250 TFLOP/s": 250.0,
    "attention bf16 d=64 N=16384 backward >= 150 TFLOP/s": 150.0,
    "attention bf16 d=64 N=16384 fwd+bwd >= 1.0x grid+sdpa": 1.0,
    "training step >= 1.5x eager reference ops": 1.5,
    "graphed detector step >= 4x eager reference ops": 4.0,
    "coorkern graphed >= 1.2x reference ops graphed": 1.2,
    "Triton attention >= 1.0x grid_sample+SDPA in the graphed step": 1.0,
    "central loss fwd+bwd 8x19x512x416 <= 0.35 ms": 0.35,
}
LOWER_IS_BETTER = ("central loss fwd+bwd 8x19x512x416 <= 0.35 ms",)


# ----------------------------------------------------------------------------- stages


def run_stage(name: str, cmd: list[str], seconds: float, env: dict | None = None) -> dict:
    """Run ``cmd`` from the repository root, streaming its output, for at most ``seconds``."""
    print(f"\n=== {name}: {' '.join(cmd)} (at most {seconds:.0f} s)", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: "queue.Queue[str]" = queue.Queue()
    output: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status = None
    while True:
        remaining = seconds - (time.monotonic() - start)
        try:
            line = lines.get(timeout=max(remaining, 0.01))
        except queue.Empty:
            line = ""
        if line is None:
            break
        if line:
            output.append(line)
            print(line, end="", flush=True)
        if time.monotonic() - start > seconds:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage's own process group
            status = "stopped"
            print(f"\nstopped at {name}: time box of {seconds:.0f} s used", flush=True)
            break
    proc.wait()
    if status is None:
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    return {"name": name, "command": " ".join(cmd), "status": status, "seconds": round(time.monotonic() - start, 1),
            "output": "".join(output)}


def markdown_tables(text: str) -> list[str]:
    """The markdown tables in ``text``: a header line, a ``|---|`` line and the ``|`` rows after
    them.  Rows stay with their table across other lines: a stage's warnings (stderr, merged)
    land between the rows -- the second H200 run lost every target to that."""
    separator = re.compile(r"\|(\s*:?-+:?\s*\|)+")
    tables: list[list[str]] = []
    lines = [line.strip() for line in text.splitlines() if line.startswith("|")]
    for i, line in enumerate(lines):
        if i + 1 < len(lines) and separator.fullmatch(lines[i + 1]):
            tables.append([line])
        elif tables:
            tables[-1].append(line)
    return ["\n".join(t) for t in tables if len(t) > 2]


def table_rows(table: str) -> list[dict]:
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def number(text: str) -> float:
    match = re.match(r"-?[\d.]+", text or "")
    return float(match.group()) if match else float("nan")


# ----------------------------------------------------------------------------- training step


def _bench_run(device, size: tuple[int, int], base: int, compile_model: bool = False, graphed: bool = False):
    """A training run's parts for one benchmark row: the detector (batch 2, bf16 autocast), Adam
    (capturable when ``graphed``) with the cyclic schedule, the central loss as training computes
    it (``heatmap_loss``), one batch; and the trainer's step (``coorkern.engine.step``/``cuda_graphs``)."""
    from types import SimpleNamespace

    import torch

    from coorkern.engine import cuda_graphs
    from coorkern.engine.step import EagerStep
    from coorkern.losses import heatmap_loss
    from coorkern.models import CoorDetector

    height, width = size
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(2, 1, height, width, generator=gen).to(device),
             "landmarks": (torch.rand(2, 19, 2, generator=gen) * torch.tensor([width - 1.0, height - 1.0])).to(device)}
    torch.manual_seed(0)
    model = CoorDetector(base_channels=base, num_landmarks=19).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    cuda_graphs.set_capturable(optimizer, graphed)
    scheduler = torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=1e-4, max_lr=1e-3, step_size_up=1000,
                                                  cycle_momentum=False)
    run = SimpleNamespace(args=SimpleNamespace(amp="bf16", compile=compile_model), device=device, model=model,
                          train_model=torch.compile(model) if compile_model else model, optimizer=optimizer,
                          scheduler=scheduler, scaler=None, dist=SimpleNamespace(active=False),
                          loss=lambda logits, landmarks: heatmap_loss("central", logits, landmarks, 3.0, 2.0))
    step = cuda_graphs.GraphedStep(run, "on (benchmark)") if graphed else EagerStep(run)
    return run, step, batch


STEP_IMPLS = (  # (row, coorkern backend on CUDA, graphed, torch.compile)
    ("eager reference ops", "reference", False, False), ("eager reference ops, graphed", "reference", True, False),
    ("coorkern", "auto", False, False), ("coorkern, graphed", "auto", True, False),
    ("coorkern, all Triton", "triton", False, False), ("coorkern, all Triton, graphed", "triton", True, False),
    ("torch.compile + coorkern", "auto", False, True),
)


def train_step_benchmark(reps: int, device: str = "cuda", size: tuple[int, int] = (512, 416), base: int = 64) -> None:
    """Stage 5 (run in a subprocess): prints a markdown table of the detector's training step.

    The trainer's own step (``coorkern.engine``: forward under bf16 autocast, the central loss,
    backward, Adam, the cyclic schedule, the loss kept on the device), op by op and replayed
    from a CUDA graph (``--cuda-graphs``), with the eager reference ops, coorkern (``auto``:
    Triton loss, grid_sample + SDPA attention on CUDA) and coorkern's Triton kernels forced.
    ``device``/``size``/``base`` other than the defaults only serve dry runs of this code on a
    CPU (``--stage train-step --device cpu --size 64 64 --base 4``: no graphed rows there).
    """
    import torch

    sys.path.insert(0, HERE)
    sys.path.insert(0, ROOT)
    import _common

    import coorkern
    from coorkern.engine.step import LossLog

    device = torch.device(device)
    height, width = size
    print(f"device: {_common.device_name(device)}; CoorDetector base {base}, batch 2, {height}x{width}, "
          "bf16 autocast, Adam + cyclic schedule (the trainer's step)", flush=True)
    _common.start_table(["impl", "step ms", "peak MiB", "peak extra MiB", "vs eager reference ops"])
    rows, times = [], {}
    # Rows print as measured (a cut-off stage keeps them); the eager reference comes first so
    # that every row can carry its ratio.
    def timed(backend, graphed, compiled):
        _, train_step, batch = _bench_run(device, size, base, compiled, graphed)
        log = LossLog(device)

        def step():
            with coorkern.backend(backend):
                train_step(batch, log)
            if log.due:
                log.read()

        step()  # compile / autotune / capture
        _common.sync(device)
        seconds, extra = _common.measure(step, device, warmup=2, reps=reps)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
        return seconds, extra, peak  # the run's memory goes with this frame

    for impl, backend, graphed, compiled in STEP_IMPLS:
        if graphed and device.type != "cuda":
            continue  # CPU: dry runs of this code only
        backend = backend if device.type == "cuda" or backend != "triton" else "auto"
        seconds, extra, peak = timed(backend, graphed, compiled)
        times[impl] = seconds
        _common.add_row(rows, [impl, f"{seconds * 1e3:.1f}", f"{peak:.0f}", f"{extra:.0f}",
                               f"{times['eager reference ops'] / seconds:.2f}x"])
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------- traces


TRACE_CASES = {  # slug: what it traces
    "central-loss": "central loss fwd+bwd",
    "attention": "coor_attention fwd+bwd, Triton kernels",
    "detector-step": "detector training step, coorkern",
    "detector-step-graphed": "detector training step, coorkern, graphed",
}


def default_trace_dir() -> str:
    """``$OUT/traces`` where the device tool runs this (its files come back), else a temporary folder."""
    if os.environ.get("OUT"):
        return os.path.join(os.environ["OUT"], "traces")
    import tempfile

    return os.path.join(tempfile.gettempdir(), "coorkern-gpu-check-traces")


def _trace_case_step(case: str, device, size: tuple[int, int], base: int):
    """``(step, label)``: one call of ``step`` is what the case traces."""
    import torch

    import coorkern

    triton = "triton" if device.type == "cuda" else "auto"  # CPU dry runs: the C++ kernels
    gen = torch.Generator().manual_seed(0)
    if case == "central-loss":
        height, width = (512, 416) if device.type == "cuda" else size
        logits = torch.randn(8, 19, height, width, generator=gen).to(device).requires_grad_(True)
        landmarks = (torch.rand(8, 19, 2, generator=gen) * (min(height, width) - 1)).to(device)

        def step():
            logits.grad = None
            coorkern.central_loss_from_landmarks(logits, landmarks, sigma=3.0).backward()

        return step, f"{TRACE_CASES[case]}, 8x19x{height}x{width} fp32"
    if case == "attention":
        import attention as attention_bench

        dtype, n = (torch.bfloat16, 3328) if device.type == "cuda" else (torch.float32, 256)
        q, k, v, coords = attention_bench.make_inputs(4, 32, n, dtype, "qk", device)

        def step():
            with coorkern.backend(triton):
                torch.autograd.grad(coorkern.coor_attention(q, k, v, coords, sample="qk").sum(), (q, k, v, coords))

        kernels = "" if device.type == "cuda" else " (C++ kernels on a CPU: dry run)"
        return step, f"{TRACE_CASES[case]}{kernels}, B={attention_bench.BATCH} 4x32x{n} {str(dtype)[6:]}"
    from coorkern.engine.step import LossLog

    graphed = case == "detector-step-graphed"
    _, train_step, batch = _bench_run(device, size, base, graphed=graphed)
    log = LossLog(device)

    def step():
        train_step(batch, log)
        if log.due:
            log.read()

    return step, f"{TRACE_CASES[case]}, base {base}, 2x1x{size[0]}x{size[1]} bf16"


def trace_case(case: str, reps: int, device: str, trace_dir: str, size: tuple[int, int], base: int) -> None:
    """One case of the trace stage, in its own process: wall-clock time first, then one step under
    torch.profiler (CPU + CUDA, Python stacks), its chrome trace gzipped into ``trace_dir`` and
    reduced (``bench/profile_trace.py``) to markdown, printed and written next to it."""
    import gzip
    import shutil

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    sys.path.insert(0, HERE)
    sys.path.insert(0, ROOT)
    import _common
    import profile_trace

    device = torch.device(device)
    step, label = _trace_case_step(case, device, size, base)
    step()  # compile / autotune / capture
    seconds, _ = _common.measure(step, device, warmup=2, reps=reps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, with_stack=True) as prof:
        with record_function("step"):
            step()
        _common.sync(device)
    os.makedirs(trace_dir, exist_ok=True)
    raw = os.path.join(trace_dir, f"trace_{case}.json")
    prof.export_chrome_trace(raw)
    summary = profile_trace.reduce_trace(profile_trace.load_events(raw))
    with open(raw, "rb") as src, gzip.open(raw + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(raw)
    text = profile_trace.markdown(label, summary, seconds * 1e3)
    print(f"device: {_common.device_name(device)}; trace {raw}.gz\n\n{text}\n", flush=True)
    with open(os.path.join(trace_dir, f"trace_{case}.md"), "w") as f:
        f.write(f"{label}: `{os.path.basename(raw)}.gz` on {_common.device_name(device)}\n\n{text}\n")


def trace_stage(reps: int, device: str, trace_dir: str, size: tuple[int, int], base: int,
                seconds_per_case: float = 120.0) -> int:
    """The trace stage: every case of :data:`TRACE_CASES` in a fresh process (no state, caches or
    allocator pools carried from one to the next); returns the number of cases that failed."""
    failed = 0
    cases = [c for c in TRACE_CASES if device == "cuda" or not c.endswith("graphed")]
    for case in cases:
        cmd = [sys.executable, os.path.abspath(__file__), "--stage", "trace-case", "--case", case, "--reps",
               str(reps), "--device", device, "--trace-dir", trace_dir, "--size", *map(str, size), "--base", str(base)]
        try:
            done = subprocess.run(cmd, cwd=ROOT, timeout=seconds_per_case)
            failed += done.returncode != 0
        except subprocess.TimeoutExpired:
            print(f"stopped at trace {case}: {seconds_per_case:.0f} s", flush=True)
            failed += 1
    return failed


# ----------------------------------------------------------------------------- host profile


def host_profile(reps: int, device: str = "cuda") -> None:
    """Stage 2 (run in a subprocess): where a coorkern forward + backward spends its time.

    The first H200 run found both ops host-bound at the detector's sizes (central loss
    0.7-1.1 ms per fwd+bwd whatever the size, attention backward 1.4 ms at 8 x 32 x 832):
    this prints, per op, the wall time against the GPU kernel time of a step, the Python
    functions that take the host time (cProfile, by own time) and the kernels
    (torch.profiler), so the next GPU session can see what to cut.
    """
    import cProfile
    import pstats

    import torch

    sys.path.insert(0, HERE)
    sys.path.insert(0, ROOT)
    import _common
    import attention as attention_bench
    import host_overhead

    import coorkern

    # First the layers' host cost on tiny inputs (bench/host_overhead.py), with real and with
    # stubbed launches (their difference is what the launches cost), then the profiles.
    host_overhead.main(["--device", device, "--iters", "50"])
    host_overhead.main(["--device", device, "--iters", "50", "--stub-launches"])
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 19, 512, 416, generator=gen).to(device, torch.bfloat16).requires_grad_(True)
    landmarks = (torch.rand(2, 19, 2, generator=gen) * 400).to(device)
    q, k, v, coords = attention_bench.make_inputs(4, 32, 3328, torch.bfloat16, "qk", device)

    def loss_step():
        logits.grad = None
        coorkern.central_loss_from_landmarks(logits, landmarks, sigma=3.0).backward()

    def attention_step():
        torch.autograd.grad(coorkern.coor_attention(q, k, v, coords, sample="qk").sum(), (q, k, v, coords))

    def attention_triton_step():
        with coorkern.backend("triton" if device.type == "cuda" else "auto"):
            attention_step()

    for name, step in (("central loss from landmarks, 2x19x512x416 bf16", loss_step),
                       ("coor_attention qk (auto), B=2 4x32x3328 bf16", attention_step),
                       ("coor_attention qk (Triton kernels), B=2 4x32x3328 bf16", attention_triton_step)):
        wall, _ = _common.measure(step, device, reps=reps)
        kernel_ms = _common.gpu_kernel_ms(step, device)
        print(f"\n--- {name}: wall {wall * 1e3:.3f} ms per fwd+bwd, GPU kernels {kernel_ms:.3f} ms")
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(reps):
            step()
        _common.sync(device)
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(20)
        if device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                _common.sync(device)
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=20))


# ----------------------------------------------------------------------------- report


def check_targets(results: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for every target the measured tables allow to judge."""
    checks = []

    def add(name, values):
        values = [v for v in values if v == v]
        if not values:
            checks.append((name, "not measured", "-"))
            return
        higher = name not in LOWER_IS_BETTER
        worst = min(values) if higher else max(values)
        met = worst >= TARGETS[name] if higher else worst <= TARGETS[name]
        checks.append((name, f"{worst:.2f} (worst of {len(values)})", "met" if met else "NOT met"))

    bandwidth = results.get("copy_gbps") or float("nan")
    loss_rows = [r for t in results.get("central_loss_tables", []) for r in table_rows(t) if r.get("impl") == "coorkern"]
    add("central loss fwd+bwd >= 80% of copy bandwidth", [number(r.get("GB/s")) / bandwidth for r in loss_rows])
    add("central loss >= 1.3x torch.compile", [number(r.get("vs compile")) for r in loss_rows])
    add("central loss >= 5x eager", [number(r.get("vs eager")) for r in loss_rows])
    # The kernels' targets: the Triton rows ("coorkern-triton"; "coorkern" in runs made
    # before auto took grid_sample + SDPA on CUDA).
    att_all = [r for t in results.get("attention_tables", []) for r in table_rows(t)
               if r.get("dtype") == "bf16" and r.get("heads x d x N", "").endswith("x64x16384")]
    kernel_impl = "coorkern-triton" if any(r.get("impl") == "coorkern-triton" for r in att_all) else "coorkern"
    att_rows = [r for r in att_all if r.get("impl") == kernel_impl]
    add("attention bf16 d=64 N=16384 forward >= 250 TFLOP/s", [number(r.get("fwd TFLOP/s")) for r in att_rows])
    add("attention bf16 d=64 N=16384 backward >= 150 TFLOP/s", [number(r.get("bwd TFLOP/s")) for r in att_rows])
    add("attention bf16 d=64 N=16384 fwd+bwd >= 1.0x grid+sdpa", [number(r.get("vs grid+sdpa")) for r in att_rows])
    all_step_rows = [r for t in results.get("train_step_tables", []) for r in table_rows(t)]
    step_rows = [r for r in all_step_rows if r.get("impl") == "coorkern"]
    add("training step >= 1.5x eager reference ops", [number(r.get("vs eager reference ops")) for r in step_rows])
    graphed = [r for r in all_step_rows if r.get("impl") == "coorkern, graphed"]
    add("graphed detector step >= 4x eager reference ops", [number(r.get("vs eager reference ops")) for r in graphed])

    def step_ms(impl):
        return [number(r.get("step ms")) for r in all_step_rows if r.get("impl") == impl]

    add("coorkern graphed >= 1.2x reference ops graphed",
        [a / b for a, b in zip(step_ms("eager reference ops, graphed"), step_ms("coorkern, graphed"))])
    add("Triton attention >= 1.0x grid_sample+SDPA in the graphed step",
        [a / b for a, b in zip(step_ms("coorkern, graphed"), step_ms("coorkern, all Triton, graphed"))])
    add("central loss fwd+bwd 8x19x512x416 <= 0.35 ms", [number(r.get("fwd+bwd ms")) for r in loss_rows
                                                         if r.get("shape") == "8x19x512x416"
                                                         and r.get("variant", "landmarks") == "landmarks"])
    return checks


def results_markdown(results: dict) -> str:
    lines = [MARK_START, f"## GPU: {results['device']} ({results['date']})", "",
             f"`python bench/gpu_check.py`: torch {results['torch']}, triton {results['triton']}, "
             f"CUDA {results['cuda']}; device-to-device copy {results['copy_gbps']:.0f} GB/s "
             f"(read + write, 1 GiB). Time box {results['budget_s']:.0f} s, used {results['elapsed_s']:.0f} s.", ""]
    for stage in results["stages"]:
        lines.append(f"* {stage['name']}: {stage['status']} in {stage['seconds']:.0f} s"
                     + (f" -- {stage['summary']}" if stage.get("summary") else ""))
    if results.get("stopped_at"):
        lines.append(f"* stopped at: {results['stopped_at']}")
    for title, key in (("Central loss, forward + backward", "central_loss_tables"),
                       ("Coordinate attention", "attention_tables"),
                       ("Detector training step", "train_step_tables"),
                       ("Profiler traces (bench/profile_trace.py)", "trace_tables")):
        for table in results.get(key, []):
            lines += ["", f"### {title}", "", table]
    lines += ["", "### Targets (issues 13, 26)", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in results["targets"]]
    lines.append(MARK_END)
    return "\n".join(lines) + "\n"


def write_results_md(section: str, path: str = RESULTS_MD) -> None:
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        text = head + section + rest.split(MARK_END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)


def copy_bandwidth_gbps() -> float:
    import torch

    src = torch.empty(2**28, device="cuda")  # 1 GiB of float32
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    gbps = 2 * src.numel() * src.element_size() / best / 1e9
    del src, dst
    torch.cuda.empty_cache()  # the stages run in subprocesses: leave them the memory
    return gbps


# ----------------------------------------------------------------------------- main


def stage_env() -> dict:
    """The stages' environment: the real Triton compiler (no interpreter), and coorkern
    importable from this checkout even when it is not installed -- ``python bench/x.py``
    puts bench/ on sys.path, not the root (the first H200 run lost both benchmarks to that)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


def stage_commands(py: str, reps: str, base_env: dict, trace_dir: str = "") -> list[tuple[str, list[str], dict]]:
    """(name, command, environment) of every stage, in the order they run."""
    # One line per test (a stage cut off still shows where), a per-test time limit where
    # pytest-timeout is installed (one slow test fails instead of eating the stage), and
    # pytest-xdist workers where it is installed: the tests are bound by Triton's compiler,
    # which runs on the host's cores.
    pytest_flags = ["-v", "-p", "no:cacheprovider", "-rfEs", "--durations=10"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        pytest_flags += ["--timeout", "120"]
    if importlib.util.find_spec("xdist") is not None:
        pytest_flags += ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
    tests = sorted(os.path.join("python_tests", "cuda", f) for f in os.listdir(os.path.join(ROOT, "python_tests", "cuda"))
                   if f.startswith("test_cuda_") and f.endswith(".py"))
    attention = [py, "bench/attention.py", "--reps", reps, "--sizes"]
    return [
        ("cuda tests", [py, "-m", "pytest", *tests, *pytest_flags], dict(base_env, COORKERN_TEST_DEVICE="cuda")),
        ("host profile", [py, "bench/gpu_check.py", "--stage", "host-profile", "--reps", reps], base_env),
        # The C++ library's AOT kernels as a libtorch program runs them: build it in place (the
        # checkout on a lent GPU is not installed), then compare with the reference.
        ("C++ CUDA kernels", ["bash", "-c", f"{py} setup.py build_ext --inplace > build_ext.log 2>&1; "
                              "grep -h 'compiled\\|WARNING' build_ext.log; tail -n 3 build_ext.log; "
                              f"{py} -m pytest python_tests/cuda/test_cuda_cpp_aot.py -v -rs -p no:cacheprovider"],
         dict(base_env, COORKERN_TEST_DEVICE="cuda")),
        ("training-step benchmark", [py, "bench/gpu_check.py", "--stage", "train-step", "--reps", reps], base_env),
        ("traces", [py, "bench/gpu_check.py", "--stage", "trace", "--reps", reps, "--trace-dir", trace_dir],
         base_env),
        ("central loss benchmark", [py, "bench/central_loss.py", "--shapes", *CENTRAL_LOSS_SHAPES,
                                    "--dtypes", "fp32", "bf16", "--reps", reps], base_env),
        ("attention benchmark, bf16", [*attention, *ATTENTION_SIZES_BF16, "--dtypes", "bf16"], base_env),
        ("attention benchmark, fp32", [*attention, *ATTENTION_SIZES_FP32, "--dtypes", "fp32"], base_env),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-min", type=float, default=DEFAULT_BUDGET_MIN,
                        help="time box for everything (minutes)")
    parser.add_argument("--json", default=os.path.join(HERE, "gpu_check.json"), help="where to write the results")
    parser.add_argument("--no-results-md", action="store_true", help="do not rewrite the GPU section of RESULTS.md")
    parser.add_argument("--stage", choices=["train-step", "host-profile", "trace", "trace-case"],
                        help=argparse.SUPPRESS)  # subprocess entries (trace --device cpu: its dry run)
    parser.add_argument("--case", choices=list(TRACE_CASES), help=argparse.SUPPRESS)  # trace-case
    parser.add_argument("--trace-dir", default=None,
                        help="where the traces' raw chrome traces (gzipped) and tables go (default: $OUT/traces when "
                             "$OUT is set, else a temporary folder)")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # dry runs only
    parser.add_argument("--size", type=int, nargs=2, default=(512, 416), help=argparse.SUPPRESS)
    parser.add_argument("--base", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per benchmark case")
    parser.add_argument("--stages", nargs="+", default=list(STAGE_CAPS), choices=list(STAGE_CAPS), metavar="STAGE",
                        help="run only these stages (default: all; e.g. the ones a first call did not reach: "
                             "'attention benchmark, fp32')")
    args = parser.parse_args(argv)
    if args.stage == "train-step":
        train_step_benchmark(args.reps, args.device, tuple(args.size), args.base)
        return 0
    if args.stage == "host-profile":
        host_profile(args.reps, args.device)
        return 0
    trace_dir = os.path.abspath(args.trace_dir or default_trace_dir())
    if args.stage == "trace-case":
        trace_case(args.case, args.reps, args.device, trace_dir, tuple(args.size), args.base)
        return 0
    if args.stage == "trace":
        return 1 if trace_stage(args.reps, args.device, trace_dir, tuple(args.size), args.base) else 0

    import torch
    import triton

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing ran, no numbers recorded.")
        return EXIT_NO_CUDA
    start = time.monotonic()
    budget = args.budget_min * 60
    device = torch.cuda.get_device_name(0)
    results = {
        "device": device, "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "device_count": torch.cuda.device_count(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "budget_s": budget, "stages": [], "stopped_at": None, "trace_dir": trace_dir,
    }
    results["copy_gbps"] = copy_bandwidth_gbps()
    print(f"device: {device} (sm_{results['capability'].replace('.', '')}, {results['device_count']} visible)")
    print(f"torch {results['torch']}, triton {results['triton']}, CUDA {results['cuda']}")
    print(f"device-to-device copy: {results['copy_gbps']:.0f} GB/s (read + write)")

    base_env = stage_env()
    py, reps = sys.executable, str(args.reps)
    stages = [(name, cmd, env) for name, cmd, env in stage_commands(py, reps, base_env, trace_dir)
              if name in args.stages]
    for name, cmd, env_for_stage in stages:
        left = budget - (time.monotonic() - start)
        if left < 10:
            results["stopped_at"] = f"{name} (not started: the {args.budget_min:g}-minute time box is used up)"
            print(f"\nstopped at {name}: the {args.budget_min:g}-minute time box is used up")
            break
        # A shorter time box shrinks every stage's cap alike, so the later stages still run.
        cap = STAGE_CAPS[name] * min(1.0, budget / (DEFAULT_BUDGET_MIN * 60))
        stage = run_stage(name, cmd, min(cap, left), env_for_stage)
        if stage["status"] == "stopped" and results["stopped_at"] is None:
            results["stopped_at"] = f"{name} (cut off after {stage['seconds']:.0f} s)"
        tables = markdown_tables(stage["output"])
        if name == "cuda tests":
            summary = [line for line in stage["output"].splitlines() if re.search(r"\d+ (passed|failed|skipped)", line)]
            stage["summary"] = summary[-1].strip("= ") if summary else ""
        elif tables and name in TABLE_KEYS:
            results.setdefault(TABLE_KEYS[name], []).extend(tables if name in ALL_TABLES else tables[-1:])
        results["stages"].append(stage)

    results["elapsed_s"] = time.monotonic() - start
    results["targets"] = check_targets(results)
    print("\n=== targets")
    for target, measured, verdict in results["targets"]:
        print(f"{verdict:>8}  {target}: {measured}")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.json}")
    if not args.no_results_md:
        write_results_md(results_markdown(results))
        print(f"wrote the GPU section of {RESULTS_MD}")
    if results["stopped_at"]:
        print(f"stopped at {results['stopped_at']}")
    failed = [s["name"] for s in results["stages"] if s["status"] != "ok"]
    return 1 if failed or results["stopped_at"] else 0


if __name__ == "__main__":
    sys.exit(main())
