"""Host helpers of the ops: launch grids, block widths, which route a call takes (the eager
autograd.Function or the traced triton_op), and wrapping launches for torch.library.

The integer helpers replace ``triton.cdiv`` / ``triton.next_power_of_2``, which are
``ConstexprFunction`` wrappers (triton 3.6-3.9) about a hundred times slower to call from
Python: at the detector's sizes the ops' host path, not their kernels, is the bottleneck
(measurements: ``docs/design/coor_attention.md``).
"""

from __future__ import annotations

import contextlib
import threading

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


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_direct = threading.local()


def plain_eager(*tensors: torch.Tensor) -> bool:
    """Whether an op call may run its kernels through a plain ``torch.autograd.Function``
    instead of its ``triton_op``: eager execution (not torch.compile; no dispatch mode, such as
    FakeTensorMode, make_fx's proxy mode or functionalization, on the stack) on plain CUDA or
    CPU tensors (no subclass, no torch.func wrapper).

    The triton_op is there for tracing (Inductor and torch.export see its kernels); called
    eagerly, its custom-op dispatch and autograd wrapper cost as much Python host time as
    everything else in the call (``bench/host_overhead.py --stub-launches``; the numbers are
    in ``docs/backends.md``).
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    return all(type(t) in _PLAIN_TENSOR_TYPES and t.device.type in ("cuda", "cpu")
               and not torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


@contextlib.contextmanager
def direct_launches():
    """Inside (the eager autograd.Functions): ``launchable`` hands out the kernels themselves.
    Outside a triton_op, ``wrap_triton``'s wrapper would launch through the
    ``triton_kernel_wrapper_mutation`` higher-order op, slow in eager (torch's own comment on
    ``set_wrap_triton_enabled``: "~1ms")."""
    previous = getattr(_direct, "active", False)
    _direct.active = True
    try:
        yield
    finally:
        _direct.active = previous


def launchable(kernel, device: torch.device, wrap: bool):
    """``kernel`` wrapped by ``torch.library.wrap_triton`` for a CUDA launch when ``wrap`` (the
    op module's ``HAS_TRITON_OP``) outside :func:`direct_launches`; the interpreter's CPU
    launches cannot be wrapped."""
    if wrap and device.type == "cuda" and not getattr(_direct, "active", False):
        return torch.library.wrap_triton(kernel)
    return kernel


def device_guard(tensor: torch.Tensor):
    """Launch on the tensor's device (and its current stream), not the current device."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()
