"""Op registration shared by every coorkern op (``torch.ops.coorkern.*``).

Schemas are defined once in C++ (``csrc/``, ``TORCH_LIBRARY_FRAGMENT(coorkern)``)
together with the CPU kernels, so libtorch projects can call them through the
dispatcher.  Python adds what C++ callers do not need to provide themselves: the
CUDA (Triton) kernels, the fake (meta) kernels for ``torch.compile`` and the
autograd formulas.  The C++ library may also hold CUDA kernels (Triton compiled ahead of
time, for libtorch programs); the Python (JIT) CUDA kernels replace them on import, on
purpose (:func:`python_cuda_kernels_take_over`).  When the C++ extension is unavailable the same schemas are
defined here and the CPU kernels are the eager reference.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator

import torch

from . import extension as _extension

NAMESPACE = "coorkern"
_python_lib = torch.library.Library(NAMESPACE, "FRAGMENT")


def define_op(schema: str, cpu_fallback: Callable) -> torch._ops.OpOverload:
    """Return ``torch.ops.coorkern.<name>.default``, defining it from Python if C++ did not.

    ``schema`` must be character-for-character the schema in ``csrc/`` (a test checks).
    ``cpu_fallback`` is the CPU kernel used only when the C++ extension is missing.
    """
    name = schema.split("(", 1)[0]
    namespace = getattr(torch.ops, NAMESPACE)
    if not hasattr(namespace, name):
        if _extension.cpp_available():  # e.g. an editable install whose _C predates this op
            warnings.warn(
                f"coorkern: the C++ extension does not define {NAMESPACE}::{name} (stale build?); "
                "its CPU kernel falls back to the eager reference. Rebuild with "
                "`pip install --no-build-isolation -e .`.",
                RuntimeWarning,
                stacklevel=3,
            )
        _python_lib.define(schema)
        _python_lib.impl(name, cpu_fallback, "CPU")
    return getattr(namespace, name).default


@contextlib.contextmanager
def python_cuda_kernels_take_over() -> Iterator[None]:
    """Register the op modules' CUDA kernels over the C++ library's ahead-of-time ones.

    From Python the JIT path wins: it specializes on every dtype and r, tunes launch
    configurations per GPU and runs on any arch Triton supports, while the C++ set is
    fixed at build time (sm_80/sm_90, float32/float64).  The dispatcher warns when a
    kernel is replaced; that warning is silenced for coorkern's CUDA kernels only.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"(?s).*Overriding a previously registered kernel.*operator: coorkern::.*dispatch key: CUDA\n",
            category=UserWarning,
        )
        yield
