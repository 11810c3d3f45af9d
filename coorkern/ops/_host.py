"""Host helpers of the ops: launch grids, block widths, and wrapping launches for torch.library.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``ConstexprFunction`` wrappers (triton
3.6-3.9): ~1.8 us per call from Python on this machine, against ~0.02 us for the plain
arithmetic -- and the attention backward made 23 such calls per step.  The H200 runs found
the ops' Python host path, not their kernels, the bottleneck at the detector's sizes.
"""

from __future__ import annotations

import contextlib

import torch

# torch.library.triton_op / wrap_triton (torch >= 2.6): CUDA kernels launched through
# wrap_triton inside a triton_op are visible to torch.compile/Inductor and torch.export
# (AOTInductor embeds them).  torch 2.4/2.5 keep the opaque register_kernel paths.
HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def launchable(kernel, device: torch.device, wrap: bool):
    """``kernel`` wrapped by ``torch.library.wrap_triton`` for a CUDA launch when ``wrap`` (the
    op module's ``HAS_TRITON_OP``); the interpreter's CPU launches cannot be wrapped."""
    return torch.library.wrap_triton(kernel) if wrap and device.type == "cuda" else kernel


def device_guard(tensor: torch.Tensor):
    """Launch on the tensor's device (and its current stream), not the current device."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()
