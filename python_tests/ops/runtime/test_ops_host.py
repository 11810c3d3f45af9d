"""The ops' host helpers (coorkern/ops/_runtime/host.py): integer helpers against Triton's own, and
the kernel launches of both ops going through wrap_triton on CUDA only (not from the eager
autograd.Functions), and the rule for which calls are plain eager ones."""

from __future__ import annotations

import pytest
import torch
import triton

from coorkern.ops.central_loss import launch as central_loss_launch
from coorkern.ops.coor_attention import launch as coor_attention_launch
from coorkern.ops._runtime import host as _host
from coorkern.ops._runtime.host import cdiv, direct_launches, next_power_of_2, plain_eager
from support.triton_op_dispatch import PassThroughMode


def test_cdiv_and_next_power_of_2_agree_with_triton():
    for a in list(range(0, 600)) + [2**31 - 1, 2**31, 2**40 + 3]:
        for b in (1, 2, 3, 16, 64, 1000, 2**20):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    for n in list(range(1, 3000)) + [2**31 - 1, 2**31, 2**31 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


@pytest.mark.parametrize("module", [central_loss_launch, coor_attention_launch])
def test_cuda_launches_go_through_wrap_triton(monkeypatch, module):
    """On CUDA every launch is wrapped by torch.library.wrap_triton (torch.compile then sees the
    kernels inside the triton_op); the interpreter's CPU launches are not."""
    wrapped, launched = [], []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append(grid)

    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: wrapped.append(kernel) or kernel)
    monkeypatch.setattr(module, "HAS_TRITON_OP", True)
    launch, kernel = module._launch, Kernel()
    cuda_tensor = type("CudaTensor", (), {"device": torch.device("cuda", 0)})()
    launch(kernel, (3,), cuda_tensor, 1.0, BLOCK=8)
    assert wrapped == [kernel] and launched == [(3,)]
    launch(kernel, (5,), torch.zeros(1), 1.0, BLOCK=8)
    assert wrapped == [kernel] and launched == [(3,), (5,)]
    monkeypatch.setattr(module, "HAS_TRITON_OP", False)  # torch 2.4/2.5: nothing to wrap with
    launch(kernel, (7,), cuda_tensor, 1.0, BLOCK=8)
    assert wrapped == [kernel] and launched == [(3,), (5,), (7,)]
    monkeypatch.setattr(module, "HAS_TRITON_OP", True)
    with direct_launches():  # the eager autograd.Functions: the kernel itself
        with direct_launches():
            launch(kernel, (9,), cuda_tensor, 1.0, BLOCK=8)
        launch(kernel, (10,), cuda_tensor, 1.0, BLOCK=8)  # still inside the outer block
    assert wrapped == [kernel] and launched == [(3,), (5,), (7,), (9,), (10,)]
    launch(kernel, (11,), cuda_tensor, 1.0, BLOCK=8)
    assert wrapped == [kernel, kernel] and launched[-1] == (11,)
    with pytest.raises(KeyError), direct_launches():
        raise KeyError  # an exception inside leaves the launches wrapped again
    assert _host._direct.active is False


def test_direct_launches_are_per_thread(monkeypatch):
    """The switch is thread-local and off in a thread that never touched it (an autograd
    engine thread runs a backward outside the forward's block)."""
    import threading

    wrapped = []
    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: wrapped.append(kernel) or kernel)
    cuda = torch.device("cuda", 0)
    seen = {}

    def fresh_thread():
        seen["fresh"] = _host.launchable("k1", cuda, True)
        with direct_launches():
            seen["inside"] = _host.launchable("k2", cuda, True)
        seen["after"] = _host._direct.active

    with direct_launches():
        worker = threading.Thread(target=fresh_thread)
        worker.start()
        worker.join()
    assert seen == {"fresh": "k1", "inside": "k2", "after": False} and wrapped == ["k1"]


class _Subclass(torch.Tensor):
    pass


def test_plain_eager_calls(monkeypatch):
    """Plain CPU/CUDA tensors (and parameters) outside compile and dispatch modes are plain eager
    calls; fake, meta, subclass and torch.func-wrapped tensors, a dispatch mode on the stack
    and torch.compile are not (those go to the triton_op)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.zeros(3)
    assert plain_eager(x) and plain_eager(x, torch.nn.Parameter(torch.ones(2)))
    assert not plain_eager(x, torch.empty(2, device="meta"))
    assert not plain_eager(x, x.as_subclass(_Subclass))
    with PassThroughMode():
        assert not plain_eager(x)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    assert not plain_eager(fake)
    seen = []
    torch.func.grad(lambda t: seen.append(plain_eager(t)) or t.sum())(x)
    torch.func.vmap(lambda t: seen.append(plain_eager(t)) or t)(torch.zeros(2, 3))
    assert seen == [False, False] and plain_eager(x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # what Dynamo makes it
    assert not plain_eager(x)


def test_plain_eager_is_false_under_torch_compile():
    compiled = torch.compile(lambda t: t + 1 if plain_eager(t) else t - 1, backend="eager", fullgraph=True)
    x = torch.zeros(3)
    assert torch.equal(compiled(x), x - 1) and plain_eager(x)
