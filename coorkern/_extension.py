"""Loads the compiled C++ extension ``coorkern._C`` (op schemas + CPU kernels).

The extension is built by ``pip install`` (see ``setup.py``).  When it is missing or
fails to load, coorkern still imports: the op schemas are defined from Python, CPU
calls run the eager reference, and one warning says why.
"""

from __future__ import annotations

import os
import warnings

_loaded = False
_error: str | None = None


def _load() -> None:
    global _loaded, _error
    if os.environ.get("COORKERN_DISABLE_CPP", "0") not in ("", "0"):
        _error = "disabled by COORKERN_DISABLE_CPP"
        return
    try:
        from . import _C  # noqa: F401  (registers TORCH_LIBRARY(coorkern, ...))
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


def cpp_available() -> bool:
    return _loaded


def load_error() -> str | None:
    return _error


_load()
