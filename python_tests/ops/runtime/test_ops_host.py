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


# ---------------------------------------------------------------------------
# Device queries cached per device, scratch buffers, the central loss's capture guard


def test_device_capability_is_asked_once_per_indexed_cuda_device(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or (9, 0))
    monkeypatch.setattr(_host, "_capabilities", {})
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert _host.device_capability(cuda0) == (9, 0) == _host.device_capability(cuda0)
    assert _host.device_capability(cuda1) == (9, 0) and asked == [cuda0, cuda1]
    # the current device (no index) may change, a meta tensor's device is no GPU: asked each time
    for device in (torch.device("cuda"), torch.device("meta")):
        _host.device_capability(device)
        _host.device_capability(device)
    assert len(asked) == 6


def test_scratch_is_reused_only_by_direct_launches_outside_a_capture(monkeypatch):
    monkeypatch.setattr(_host, "_scratch", _host._Scratch())
    cpu = torch.device("cpu")
    outside = _host.scratch("r", (2, 3), torch.float32, cpu)
    assert _host.scratch("r", (2, 3), torch.float32, cpu) is not outside and _host._scratch.buffers == {}
    with direct_launches():
        first = _host.scratch("r", (2, 3), torch.float32, cpu)
        assert _host.scratch("r", (2, 3), torch.float32, cpu) is first  # the same tensor: no ATen call
        assert _host.scratch("r", (3, 2), torch.float32, cpu).data_ptr() == first.data_ptr()  # same buffer
        assert _host.scratch("other", (2, 3), torch.float32, cpu).data_ptr() != first.data_ptr()  # one per role
        assert _host.scratch("r", (2, 3), torch.float64, cpu).dtype == torch.float64
        grown = _host.scratch("r", (4, 4), torch.float32, cpu)  # larger: a new buffer, >= 1.25x the old
        assert grown.shape == (4, 4) and _host._scratch.buffers[("r", torch.float32, cpu, 0)][0].numel() == 16
        small = _host.scratch("r", (2, 3), torch.float32, cpu)
        assert small.data_ptr() == grown.data_ptr() and small is not first
        kept = dict(_host._scratch.buffers)
        monkeypatch.setattr(_host, "capturing", lambda device: True)
        assert _host.scratch("r", (2, 3), torch.float32, cpu).data_ptr() != grown.data_ptr()
        assert _host._scratch.buffers == kept  # nothing kept from a capture
    _host.release_scratch()
    assert _host._scratch.buffers == {}


def test_the_ops_reuse_their_scratch_and_stay_exact(monkeypatch):
    """Two eager calls of each op: the second takes the first's temporaries and gives the same
    results (the loss's partial sums; the attention's sampled tokens, delta, fp32 gradients)."""
    import coorkern

    monkeypatch.setattr(_host, "_scratch", _host._Scratch())
    logits = torch.randn(2, 3, 9, 11, requires_grad=True)
    landmarks = torch.rand(2, 3, 2) * 8
    q, k = (torch.randn(1, 2, 4, 5, 16, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 20, 16, requires_grad=True)
    coords = (torch.rand(1, 20, 2) * 2 - 1).requires_grad_(True)
    results = []
    with coorkern.backend("triton"):
        for _ in range(2):
            loss = coorkern.central_loss_from_landmarks(logits, landmarks, sigma=2.0)
            out = coorkern.coor_attention(q, k, v, coords)
            grads = torch.autograd.grad(loss + out.sum(), (logits, q, k, v, coords))
            results.append((loss.detach(), out.detach(), grads))
            if len(results) == 1:
                buffers = {key: entry[0].data_ptr() for key, entry in _host._scratch.buffers.items()}
    roles = {key[0] for key in buffers}
    assert {"central_loss.partials", "sampled_k", "sampled_qv", "delta", "grad_sampled_k",
            "grad_sampled_qv"} <= roles, roles
    assert {key: entry[0].data_ptr() for key, entry in _host._scratch.buffers.items()} == buffers
    (loss1, out1, grads1), (loss2, out2, grads2) = results
    assert torch.equal(loss1, loss2) and torch.equal(out1, out2)
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads2))


def test_central_loss_launches_untuned_when_a_capture_meets_a_new_key(monkeypatch):
    """Timing a config synchronizes, which a CUDA-graph capture refuses: a key the autotuner has not
    timed launches the hand-picked config inside a capture, and is tuned at its next call outside."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(_host, "_capabilities", {})
    monkeypatch.setattr(central_loss_launch, "_tuned_keys", set())
    monkeypatch.setattr(central_loss_launch, "_cuda_kernel", lambda: "autotuner")
    cuda = torch.device("cuda", 0)
    capturing = {"now": True}
    monkeypatch.setattr(central_loss_launch, "capturing", lambda device: capturing["now"])
    kernel, meta = central_loss_launch._kernel_and_meta(cuda, ("key",))
    block, warps = central_loss_launch.TUNING_CONFIGS[0]
    assert kernel is central_loss_launch._central_loss_kernel
    assert meta == {"ARCH": 90, "BLOCK": block, "num_warps": warps} and central_loss_launch._tuned_keys == set()
    capturing["now"] = False
    assert central_loss_launch._kernel_and_meta(cuda, ("key",)) == ("autotuner", {"ARCH": 90})
    capturing["now"] = True  # tuned before: the autotuner's cached choice, also in a capture
    assert central_loss_launch._kernel_and_meta(cuda, ("key",)) == ("autotuner", {"ARCH": 90})
    assert central_loss_launch._kernel_and_meta(cuda, ("other key",))[0] is central_loss_launch._central_loss_kernel
