"""Launch counting through coorkern's triton_ops (a helper of the ops' launch-count tests).

A ``TorchDispatchMode`` sees a triton_op as one opaque call; the launch-count tests want what
it runs -- the Triton kernels and the torch ops of its Python body -- so they run the body
under the mode instead.
"""
from __future__ import annotations


def run_triton_op_body(mode, func, args, kwargs, bodies: dict):
    """``(True, result)`` after running ``bodies[name]`` under ``mode`` when ``func`` is the
    coorkern triton_op ``name``; ``(False, None)`` for every other op."""
    body = bodies.get(func.overloadpacket.__name__)
    if func.namespace != "coorkern" or body is None:
        return False, None
    with mode:  # count what the triton_op's implementation runs, not the op itself
        return True, body(*args, **(kwargs or {}))
