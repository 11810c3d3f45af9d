"""Host cost of a Triton launch, measured without a GPU.

    python bench/launch_overhead.py [--iters 2000]

The GPU runs found the central loss host-bound: ~0.8 ms of wall clock per forward + backward
beyond its 0.05-0.22 ms of kernels (``bench/RESULTS.md``).  ``host_overhead.py
--stub-launches`` times coorkern's own Python on a CPU; this times the rest of the host path
up to the driver: Triton's ``JITFunction.run`` (argument binding, specialization key, cache
lookup, launcher call) and the autotuner in front of it.  A stand-in CUDA driver reports
device 0, stream 0 and an sm_90 target; the kernels are compiled for sm_90 as for a GPU, and
only the final launcher (``cuLaunchKernel`` in Triton's C launcher) is a no-op -- so the
numbers miss that C call and nothing else of the Python side.  Needs Triton's NVIDIA backend
(the CUDA toolchain in the wheel compiles); no GPU, no interpreter (unset TRITON_INTERPRET).

This leans on Triton internals (``driver.set_active``, ``CompiledKernel._init_handles``),
checked with triton 3.6.0, 3.7.1 and 3.9.0: a benchmark, not library code.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import _common  # noqa: E402


def install_stand_in_driver():
    """Make Triton believe in an sm_90 device whose launches do nothing."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.driver import driver

    class StandInDriver(CudaDriver):
        def __init__(self):  # no libcuda: nothing to load
            pass

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    def no_module(self):  # instead of loading the cubin: a launcher that does nothing
        self._run = lambda *args: None
        self.module = "stand-in"

    driver.set_active(StandInDriver())
    CompiledKernel._init_handles = no_module


def per_call_us(fn, iters: int) -> float:
    """Best of 5 rounds, microseconds per call."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - start) / iters * 1e6)
    return best


def rows(iters: int) -> list[list[str]]:
    import triton.language as tl

    from coorkern.ops.central_loss import kernels as cl_kernels, launch as cl_launch, op as cl

    x = torch.randn(2, 19, 64, 52)
    landmarks = torch.rand(2, 19, 2) * 50
    partials = torch.empty(64)
    args = (x, x, landmarks, x, partials, 64 * 52, 1, 52, 2.0, 0.05, 0.0, 1.0)
    meta = dict(MODE=1, FROM_LANDMARKS=True, HAS_RADIUS=False, GRAD_OUT_SCALAR=True, R_INT=2, ACC=tl.float32,
                FAST_ROW=True, CHUNK=cl_launch.CUDA_CHUNK, ARCH=90)
    block, warps = cl_launch.TUNING_CONFIGS[0]
    kernel = cl_kernels._central_loss_kernel
    tuned = cl_launch._cuda_kernel()  # the autotuner the CUDA path launches
    tuned.do_bench = lambda *a, **k: 1.0  # the first call "times" the configs; later calls hit the cache
    grid = (38,)

    def direct():
        kernel[grid](*args, **meta, BLOCK=block, num_warps=warps)

    def autotuned():
        tuned[grid](*args, **meta)

    def loss_pass():  # coorkern's launcher code around it (allocation, arguments, guard): one forward pass
        cl._direct_forward(x, landmarks, 3.0, 2.0, "mean", None, True)

    return [
        ["central loss kernel (12 arguments, 10 constexprs), `kernel[grid](...)`", f"{per_call_us(direct, iters):.1f}"],
        ["  the same through coorkern's `triton.autotune` (key cached)", f"{per_call_us(autotuned, iters):.1f}"],
        ["coorkern's `_direct_forward`, loss (2 launches + allocations, no autotuner)", f"{per_call_us(loss_pass, iters):.1f}"],
        ["`torch.empty` (1 KiB), for scale", f"{per_call_us(lambda: torch.empty(256), iters):.1f}"],
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=2000)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("launch_overhead: unset TRITON_INTERPRET (it measures the compiled-kernel launch path)", file=sys.stderr)
        return 2
    import triton

    install_stand_in_driver()
    print(f"host: {_common.device_name(torch.device('cpu'))}; triton {triton.__version__}, torch "
          f"{torch.__version__}; stand-in sm_90 driver, final launch a no-op; best of 5 rounds of {args.iters}")
    print(_common.markdown_table(["launch", "host us per call"], rows(args.iters)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
