"""Host helpers of the ops: launch grids, block widths, which route a call takes (the eager
autograd.Function or the traced triton_op), wrapping launches for torch.library, the device
queries they need (cached per device) and the scratch buffers they reuse between calls.

The integer helpers replace ``triton.cdiv`` / ``triton.next_power_of_2``, which are
``ConstexprFunction`` wrappers (triton 3.6-3.9) about a hundred times slower to call from
Python: at the detector's sizes the ops' host path, not their kernels, is the bottleneck
(measurements: ``docs/design/coor_attention.md``).
"""

from __future__ import annotations

import contextlib
import math
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


# ---------------------------------------------------------------------------
# Device queries, cached per device: a capability query costs a driver call (microseconds)
# on every launch otherwise, and a device's capability never changes.

_capabilities: dict = {}


def device_capability(device: torch.device) -> tuple[int, int]:
    """``torch.cuda.get_device_capability(device)``, asked once per CUDA device with an index.

    A device without an index (the current one, which can change) and non-CUDA devices (the
    tests' meta tensors) are asked every time."""
    cached = _capabilities.get(device) if device.type == "cuda" and device.index is not None else None
    if cached is None:
        cached = tuple(torch.cuda.get_device_capability(device))
        if device.type == "cuda" and device.index is not None:
            _capabilities[device] = cached
    return cached


def capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph: no timing, no host reads,
    and no allocation that outlives the capture then."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# ---------------------------------------------------------------------------
# Scratch buffers: the temporaries of one call (sampled tokens, partial sums) that no output
# aliases and no autograd context keeps.  A direct (eager) launch takes them from a buffer
# kept per thread, stream, device, dtype and role, grown as needed, instead of a fresh
# allocation per call: the kernels of one stream run in order, so the next call's writes
# come after this call's reads.  Not during a graph capture (the graph's own pool holds its
# temporaries; a kept buffer that later grew would be freed under the graph) and not when
# traced (fake tensors).


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.buffers: dict = {}


_scratch = _Scratch()


def _stream_key(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch._C._cuda_getCurrentRawStream(index)


def scratch(role: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized ``shape`` tensor for a temporary that dies with the call (see above).

    ``role`` names the temporary: two temporaries alive at once in one call need two roles.
    A shape seen before gets the same tensor object back (no ATen call at all)."""
    if not getattr(_direct, "active", False) or capturing(device):
        return torch.empty(shape, device=device, dtype=dtype)
    key = (role, dtype, device, _stream_key(device))
    entry = _scratch.buffers.get(key)  # [buffer, {shape: view of it}]
    if entry is not None:
        view = entry[1].get(shape)
        if view is not None:
            return view
    numel = math.prod(shape)
    if entry is None or entry[0].numel() < numel:
        # Grown by at least a quarter, so that slowly growing sizes do not reallocate each call.
        size = numel if entry is None else max(numel, entry[0].numel() + entry[0].numel() // 4)
        entry = [torch.empty(size, device=device, dtype=dtype), {}]
        _scratch.buffers[key] = entry
    view = entry[0][:numel].view(shape)
    entry[1][tuple(shape)] = view
    return view


def release_scratch() -> None:
    """Drop this thread's scratch buffers (their memory goes back to torch's allocator)."""
    _scratch.buffers.clear()
