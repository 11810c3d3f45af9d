"""Op registration shared by every coorkern op (``torch.ops.coorkern.*``).

Schemas are defined once in C++ (``csrc/``, ``TORCH_LIBRARY_FRAGMENT(coorkern)``)
together with the CPU kernels, so libtorch projects can call them through the
dispatcher.  Python adds what C++ callers do not need to provide themselves: the
CUDA (Triton) kernels, the fake (meta) kernels for ``torch.compile`` and the
autograd formulas.  When the C++ extension is unavailable the same schemas are
defined here and the CPU kernels are the eager reference.
"""

from __future__ import annotations

from typing import Callable

import warnings

import torch

from . import _extension

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
