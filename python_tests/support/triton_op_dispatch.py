"""Launch counting through coorkern's triton_ops (a helper of the ops' launch-count tests), and
a pass-through dispatch mode (the ops' routing tests: a stand-in for tracing).

A ``TorchDispatchMode`` sees a triton_op as one opaque call; the launch-count tests want what
it runs -- the Triton kernels and the torch ops of its Python body -- so they run the body
under the mode instead.
"""
from __future__ import annotations

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from coorkern.ops._runtime import host as _host


class PassThroughMode(TorchDispatchMode):
    """A dispatch mode that changes nothing: under it coorkern's ops take their traced path
    (``coorkern.ops._runtime.host.plain_eager`` is false), as under make_fx or fake tensors."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def run_triton_op_body(mode, func, args, kwargs, bodies: dict):
    """``(True, result)`` after running ``bodies[name]`` under ``mode`` when ``func`` is the
    coorkern triton_op ``name``; ``(False, None)`` for every other op."""
    body = bodies.get(func.overloadpacket.__name__)
    if func.namespace != "coorkern" or body is None:
        return False, None
    with mode:  # count what the triton_op's implementation runs, not the op itself
        return True, body(*args, **(kwargs or {}))


def spy_routes(monkeypatch, op_module, launch_module, has_triton_op: bool):
    """Set an op's triton_op switch (in its ``op`` and ``launch`` modules) and record its routes:
    ``called`` gets "triton_op" / "function" per forward call, ``direct`` whether each launch
    through ``launch_module._launch`` was a direct one.  Skips when torch has no triton_op to
    switch on."""
    if has_triton_op and not op_module.HAS_TRITON_OP:
        pytest.skip("torch.library.triton_op needs torch >= 2.6")
    monkeypatch.setattr(op_module, "HAS_TRITON_OP", has_triton_op)
    monkeypatch.setattr(launch_module, "HAS_TRITON_OP", has_triton_op)
    called, direct = [], []
    op = getattr(op_module, "_triton_fwd_op", None)
    if has_triton_op:
        monkeypatch.setattr(op_module, "_triton_fwd_op", lambda *a: called.append("triton_op") or op(*a))
    apply = op_module._TritonEager.apply
    monkeypatch.setattr(op_module._TritonEager, "apply", lambda *a: called.append("function") or apply(*a))
    launch = launch_module._launch
    monkeypatch.setattr(launch_module, "_launch", lambda *a, **k: direct.append(_host._direct.active) or launch(*a, **k))
    return called, direct
