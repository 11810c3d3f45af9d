"""Loads coorkern's C++ libraries and says where they are for C++ projects.

``coorkern/lib/libcoorkern_ops.so`` (Python-free: op schemas, CPU kernels and, when
built with them, the ahead-of-time compiled CUDA kernels) is loaded by importing the
thin extension ``coorkern._C``, which links it.  Both are built by ``pip install``
(see ``setup.py``).  When they are missing or fail to load, coorkern still imports:
the op schemas are defined from Python, CPU calls run the eager reference, and one
warning says why.  :func:`cmake_prefix_path` points CMake at ``coorkernConfig.cmake``.
"""

from __future__ import annotations

import os
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # coorkern/
_loaded = False
_error: str | None = None
_build_info = ""


def _load() -> None:
    global _loaded, _error, _build_info
    if os.environ.get("COORKERN_DISABLE_CPP", "0") not in ("", "0"):
        _error = "disabled by COORKERN_DISABLE_CPP"
        return
    if not any(name.startswith("_C.") and name.endswith((".so", ".pyd")) for name in os.listdir(_PACKAGE_DIR)):
        # Without this, Python's message for the missing module is "cannot import name '_C'
        # from partially initialized module 'coorkern' (most likely due to a circular
        # import)": misleading for a checkout used from PYTHONPATH (the GPU runs do that).
        _error = f"not built: no coorkern/_C extension module in {_PACKAGE_DIR}"
        warnings.warn(f"coorkern: the C++ extension is {_error}; CPU ops fall back to the eager PyTorch "
                      "reference. Install with `pip install --no-build-isolation -e .` to build it.",
                      RuntimeWarning, stacklevel=3)
        return
    try:
        from ... import _C  # loads libcoorkern_ops.so: registers TORCH_LIBRARY(coorkern, ...)
    except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
        _error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "coorkern: the C++ extension coorkern._C could not be loaded "
            f"({_error}); CPU ops fall back to the eager PyTorch reference. "
            "Reinstall with `pip install --no-build-isolation -e .` to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
    else:
        _loaded = True
        _build_info = _C.build_info


def cpp_available() -> bool:
    return _loaded


def load_error() -> str | None:
    return _error


def build_info() -> str:
    """What the loaded C++ library holds, e.g. ``"cpu;cuda_aot=..."``; ``""`` when not loaded."""
    return _build_info


def library_path() -> str:
    """Path of the Python-free C++ library ``libcoorkern_ops.so`` (it may not exist: see ``cpp_available``)."""
    return os.path.join(_PACKAGE_DIR, "lib", "libcoorkern_ops.so")


def include_dir() -> str:
    """Directory holding the public header ``coorkern/ops.h``."""
    return os.path.join(_PACKAGE_DIR, "include")


def cmake_prefix_path() -> str:
    """Add to ``CMAKE_PREFIX_PATH`` so that ``find_package(coorkern)`` defines ``coorkern::ops``.

    Like ``torch.utils.cmake_prefix_path`` (which CMake also needs, for ``find_package(Torch)``).
    """
    return os.path.join(_PACKAGE_DIR, "share", "cmake")


_load()
