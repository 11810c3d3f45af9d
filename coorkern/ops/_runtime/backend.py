"""Backend selection shared by every coorkern op.

Each op has three implementations:

* ``triton``    -- hand-written Triton kernels; CUDA tensors, or CPU tensors when
                   ``TRITON_INTERPRET=1`` (the interpreter, used by the tests);
* ``cpp``       -- the C++ CPU kernels compiled from ``csrc/`` (``coorkern._C``);
* ``reference`` -- eager PyTorch (``coorkern.reference``), the test oracle.

``auto`` (the default) picks ``triton`` on CUDA and ``cpp`` on CPU, and falls back
to ``reference`` on CPU when the C++ extension did not build.  (``coor_attention`` refines
``auto`` on CUDA: ``coorkern.ops.coor_attention.op.cuda_attention_path``; all the switches are
listed in ``docs/backends.md``.)  The choice is forced
by ``COORKERN_BACKEND`` or, with priority, by ``with coorkern.backend(name):``.  A
forced choice that cannot run on the given device raises
:class:`BackendUnavailableError` instead of silently running something else.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

import torch

from . import extension as _extension

BACKENDS = ("auto", "triton", "cpp", "reference")
ENV_VAR = "COORKERN_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run the op on the given tensors."""


class _State(threading.local):
    def __init__(self) -> None:
        self.stack: list[str] = []


_state = _State()


def _check_name(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name.lower()


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force the implementation used by coorkern ops inside the ``with`` block."""
    _state.stack.append(_check_name(name, "backend"))
    try:
        yield
    finally:
        _state.stack.pop()


def requested_backend() -> str:
    """The backend asked for: innermost ``backend(...)`` block, else the env var, else auto."""
    if _state.stack:
        return _state.stack[-1]
    return _check_name(os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR)


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(device: torch.device, op: str) -> str:
    """Return the concrete backend (``triton``/``cpp``/``reference``) for ``op`` on ``device``."""
    name = requested_backend()
    if name == "reference":
        return name
    if name == "auto":
        if device.type == "cuda":
            name = "triton"
        elif device.type == "cpu":
            return "cpp" if _extension.cpp_available() else "reference"
        else:
            return "reference"
    if name == "triton":
        if device.type == "cuda":
            return name
        if device.type == "cpu" and triton_interpreter_enabled():
            return name
        raise BackendUnavailableError(
            f"coorkern.{op}: backend 'triton' needs CUDA tensors (got {device.type}); CPU tensors run "
            "through Triton only with TRITON_INTERPRET=1 set before coorkern is imported"
        )
    # name == "cpp"
    if device.type != "cpu":
        raise BackendUnavailableError(f"coorkern.{op}: backend 'cpp' runs on CPU tensors only (got {device.type})")
    if not _extension.cpp_available():
        raise BackendUnavailableError(
            f"coorkern.{op}: backend 'cpp' requested but the C++ extension is unavailable "
            f"({_extension.load_error()})"
        )
    return name
