"""Shared benchmark plumbing: timing, peak extra memory, device naming, markdown tables.

Peak extra memory is what a step allocates beyond the tensors alive before it:
on CUDA from the caching allocator's peak statistics, on CPU from the process's
resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) with
glibc forced to return large blocks to the OS so that RSS follows live tensors.
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import time
from typing import Callable

import torch


def _force_mmap_for_large_blocks() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB (also disables its dynamic growth)
        libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
    except OSError:
        pass


_force_mmap_for_large_blocks()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(step: Callable[[], object], device: torch.device, warmup: int = 2, reps: int = 10) -> tuple[float, float]:
    """Median seconds per ``step()`` and peak extra memory in MiB over one step."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        extra = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        base = _rss_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            step()
            extra = max(_rss_kib("VmHWM") - base, 0) / 1024
        except OSError:
            step()
            extra = float("nan")
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), extra


def gpu_kernel_ms(step: Callable[[], object], device: torch.device) -> float:
    """Milliseconds the GPU spends in kernels during one ``step()`` (torch.profiler); NaN off CUDA.

    Next to the wall-clock time it separates a host-bound step (Python, dispatch and launch
    overhead: the GPU idles between kernels) from slow kernels.  NaN, with a note, if the
    profiler gives no kernel events.
    """
    if device.type != "cuda":
        return float("nan")
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    sync(device)
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            sync(device)
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        if kernels:
            return sum(e.time_range.elapsed_us() for e in kernels) / 1e3
        print("gpu_kernel_ms: the profiler recorded no CUDA kernels", flush=True)
    except Exception as exc:  # a profiler problem must not cost the benchmark's other numbers
        print(f"gpu_kernel_ms: profiler failed ({type(exc).__name__}: {exc})", flush=True)
    return float("nan")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def start_table(header: list[str]) -> None:
    """Print a markdown table's header; the rows follow as ``add_row`` measures them, so a
    run cut off midway (``bench/gpu_check.py``'s time box) still leaves a readable table."""
    print(markdown_table(header, []), flush=True)


def add_row(rows: list[list[str]], row: list[str]) -> None:
    """Append a table row and print it at once as a markdown row (progress as it goes)."""
    rows.append(row)
    print("| " + " | ".join(row) + " |", flush=True)


def report_table(caption: str, header: list[str], rows: list[list[str]], markdown_path=None) -> str:
    """Print ``caption`` and the markdown table; also write both to ``markdown_path`` if given."""
    table = markdown_table(header, rows)
    print()
    print(caption)
    print()
    print(table)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(f"{caption}\n\n{table}\n")
    return table


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def threads_note() -> str:
    return f"torch threads: {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
