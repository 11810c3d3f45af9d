"""CUDA tests of coorkern.coor_attention: CUDA tensors, the real Triton compiler.

Run on a GPU machine with ``COORKERN_TEST_DEVICE=cuda python -m pytest
python_tests/cuda/test_cuda_coor_attention.py`` (TRITON_INTERPRET unset; ``bench/gpu_check.py``
runs it).  Without a CUDA device every test is collected and reports "skipped: no CUDA
device".  The oracle is ``coorkern.reference`` evaluated in float64 on the same (rounded)
inputs, compared by ``test_coor_attention.assert_close_to_oracle`` (relative errors;
gradients that are exactly 0, as at N = 1, compared absolutely).

Compile-time budget: every distinct (kernel, dtype, d block, precision) compiles once
(~1-3 s), so the d x N cross product runs at one dtype and the dtype/precision matrix at
one shape.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import coorkern
from coorkern import reference
from coorkern.ops.coor_attention import launch as ca_launch, op as ca
from support.coor_attention_cases import assert_close_to_oracle, make_coords


# ---------------------------------------------------------------------------
# Inputs, oracle, precision settings

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, "tf32": 2e-2, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def make_inputs(device, sample, *, batch=2, heads=2, n=65, nq=None, d=32, hw=(13, 11), dtype=torch.float32,
                per_head=False, align_corners=True, where="inside"):
    """q, k, v, coords on ``device``; for sample="kv" Nq != N by default."""
    nq = n + 7 if nq is None else nq
    height, width = hw

    def fmap():
        return torch.randn(batch, heads, height, width, d, device=device).to(dtype)

    def tokens(m):
        return torch.randn(batch, heads, m, d, device=device).to(dtype)

    q, k, v = (fmap(), fmap(), tokens(n)) if sample == "qk" else (tokens(nq), fmap(), fmap())
    coords = make_coords(batch, heads, n, height, width, per_head=per_head, where=where,
                         align_corners=align_corners, dtype=torch.promote_types(dtype, torch.float32)).to(device)
    return q, k, v, coords


def forward_backward(q, k, v, coords, grad_out=None, *, oracle=False, **kw):
    """(out, grads of q, k, v, coords, grad_out) through coorkern's op (or the float64 oracle)."""
    if oracle:
        inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v, coords)]
        out = reference.coor_attention(*inputs, **kw)
    else:
        inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v, coords)]
        with coorkern.backend("triton"):
            out = coorkern.coor_attention(*inputs, **kw)
    if grad_out is None:
        grad_out = torch.randn(out.shape, device=out.device).to(q.dtype)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    return out, grads, grad_out


def check(q, k, v, coords, tol, **kw):
    out, grads, go = forward_backward(q, k, v, coords, **kw)
    ref, ref_grads, _ = forward_backward(q, k, v, coords, go, oracle=True, **kw)
    assert out.device == q.device
    assert_close_to_oracle(out, grads, ref, ref_grads, (q, k, v, coords), tol)


@contextlib.contextmanager
def fp32_precision(api: str, value: str):
    """Set torch's fp32 matmul precision through the legacy or the new API; restore after."""
    legacy = torch.get_float32_matmul_precision()
    new = getattr(torch.backends, "fp32_precision", None), getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    try:
        if api == "legacy":
            torch.set_float32_matmul_precision(value)
        elif new[1] is None:
            pytest.skip("this torch has no fp32_precision API")
        elif api == "new":
            torch.set_float32_matmul_precision("highest")
            torch.backends.cuda.matmul.fp32_precision = value
        else:  # "generic": torch.backends.fp32_precision, inherited by cuda.matmul
            torch.backends.cuda.matmul.fp32_precision = "none"
            torch.backends.fp32_precision = value
        yield
    finally:
        torch.set_float32_matmul_precision(legacy)
        if new[1] is not None:
            torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = new


@contextlib.contextmanager
def deterministic(flag: bool = True):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(flag)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


# ---------------------------------------------------------------------------
# Numerics against the oracle

PRECISIONS = [("legacy", "highest", torch.float32), ("legacy", "high", "tf32"), ("new", "ieee", torch.float32),
              ("new", "tf32", "tf32"), ("generic", "tf32", "tf32"), ("generic", "ieee", torch.float32)]


@pytest.mark.parametrize("api,value,tol_key", PRECISIONS)
@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_fp32_under_each_matmul_precision(cuda_device, sample, api, value, tol_key):
    inputs = make_inputs(cuda_device, sample, dtype=torch.float32, per_head=True)
    with fp32_precision(api, value):
        assert ca_launch._precision(torch.float32) == ("ieee" if tol_key is torch.float32 else "tf32")
        check(*inputs, TOL[tol_key], sample=sample)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("d", [16, 32, 48, 64, 128])
@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_dtypes_and_head_dims(cuda_device, sample, d, dtype):
    check(*make_inputs(cuda_device, sample, d=d, dtype=dtype), TOL[dtype], sample=sample)


@pytest.mark.parametrize("n", [1, 17, 64, 65, 832, 3328])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_sequence_lengths(cuda_device, sample, dtype, n):
    # Nq = N + 7 for "kv"; maps large enough that the coordinates spread.
    inputs = make_inputs(cuda_device, sample, batch=1, n=n, d=64, hw=(52, 64), dtype=dtype, per_head=n % 2 == 1)
    check(*inputs, TOL[dtype], sample=sample)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_coords_layouts_and_align_corners(cuda_device, sample, align_corners, per_head):
    inputs = make_inputs(cuda_device, sample, per_head=per_head, align_corners=align_corners, dtype=torch.float64)
    check(*inputs, TOL[torch.float64], sample=sample, align_corners=align_corners)


@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_coordinates_on_border_outside_and_nan(cuda_device, sample):
    q, k, v, _ = make_inputs(cuda_device, sample, batch=1, heads=2, n=8, hw=(4, 5), dtype=torch.float64)
    xs = [-1.0, 1.0, -1.0, 1.0, 0.3, -1.1, 1e4, -3e5]
    ys = [-1.0, -1.0, 1.0, 1.0, 1.0, 0.2, 2.0, -7.0]
    coords = torch.tensor([xs, ys], dtype=torch.float64, device=cuda_device).t()[None]
    for align in (True, False):
        check(q, k, v, coords, TOL[torch.float64], sample=sample, align_corners=align)
    # NaN: as grid_sample, the sample is NaN -- a NaN key makes its whole head NaN.
    coords = coords[:, None].repeat(1, 2, 1, 1)  # per head
    coords[0, 1, 3, 0] = float("nan")
    with coorkern.backend("triton"):
        out = coorkern.coor_attention(q, k, v, coords, sample=sample)
    ref = reference.coor_attention(q, k, v, coords, sample=sample)  # float64: SDPA's math backend
    assert out[0, 1].isnan().all() and torch.isfinite(out[0, 0]).all()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_detector_permuted_views(cuda_device, sample):
    # CoorTransformer's layout: q, k, v are permuted views of one (B, H, W, 3, heads, d)
    # projection (models.py), never contiguous.
    batch, height, width, heads, d = 2, 9, 7, 4, 32
    qkv = torch.randn(batch, height, width, 3, heads, d, device=cuda_device, dtype=torch.bfloat16)
    q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)
    n = height * width
    if sample == "qk":
        v = v.reshape(batch, heads, n, d)
    else:
        q = q.reshape(batch, heads, n, d)
    coords = torch.rand(batch, heads, n, 2, device=cuda_device) * 2.2 - 1.1
    assert not q.is_contiguous() and not k.is_contiguous()
    check(q, k, v, coords, TOL[torch.bfloat16], sample=sample)


def test_grid_beyond_65535_batch_heads(cuda_device):
    # B * heads = 65600 > 65535: a 2-D grid with B * heads on axis 1 fails to launch.
    q, k, v, coords = make_inputs(cuda_device, "qk", batch=4100, heads=16, n=3, d=16, hw=(2, 2), per_head=True)
    check(q, k, v, coords, TOL[torch.float32], sample="qk")


@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_gradcheck_float64(cuda_device, sample):
    q, k, v, coords = make_inputs(cuda_device, sample, batch=1, heads=2, n=5, nq=3, d=16, hw=(3, 4),
                                  dtype=torch.float64, per_head=True)
    inputs = [t.double().requires_grad_(True) for t in (q, k, v, coords)]

    def fn(q, k, v, coords):
        with coorkern.backend("triton"):
            return coorkern.coor_attention(q, k, v, coords, sample=sample, scale=0.7)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


# ---------------------------------------------------------------------------
# Determinism, synchronization, streams, devices, graphs


def test_deterministic_backward_is_bitwise_repeatable(cuda_device):
    # Many coordinates on few pixels: thousands of colliding map-gradient contributions.
    q, k, v, coords = make_inputs(cuda_device, "qk", n=3000, d=64, hw=(3, 3), dtype=torch.float32)
    with deterministic():
        out1, g1, go = forward_backward(q, k, v, coords)
        out2, g2, _ = forward_backward(q, k, v, coords, go)
    assert torch.equal(out1, out2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("det", [False, True])
@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_no_host_synchronization(cuda_device, sample, det):
    inputs = make_inputs(cuda_device, sample, dtype=torch.bfloat16)
    with deterministic(det):
        forward_backward(*inputs, sample=sample)  # compile and autotune first (do_bench syncs)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            forward_backward(*inputs, sample=sample)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_cuda_graph_replay_equals_eager(cuda_device, sample):
    static = [t.requires_grad_(True) for t in make_inputs(cuda_device, sample, dtype=torch.bfloat16)]
    go = torch.randn_like(forward_backward(*static, sample=sample)[0])

    def step():
        with coorkern.backend("triton"):
            out = coorkern.coor_attention(*static, sample=sample)
        return (out, *torch.autograd.grad(out, static, go))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up (compile, autotune) outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):  # new values in the static inputs: the replay must follow them
        with torch.no_grad():
            for t in static:
                t.copy_(torch.randn_like(t) if t is not static[3] else torch.rand_like(t) * 2 - 1)
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        torch.testing.assert_close(captured[0], eager[0], rtol=0, atol=0)
        for a, b in zip(captured[1:], eager[1:]):  # map gradients: fp32 atomics in any order
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_side_stream(cuda_device, sample):
    inputs = make_inputs(cuda_device, sample, n=832, dtype=torch.bfloat16)
    expected, expected_grads, go = forward_backward(*inputs, sample=sample)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # inputs made on the side stream, consumed there before the default stream waits
        fresh = [t.clone() for t in inputs]
        out, grads, _ = forward_backward(*fresh, go, sample=sample)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for a, b in zip(grads, expected_grads):  # map gradients: fp32 atomics in any order
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_tensors_on_another_device(cuda_device):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    torch.cuda.set_device(0)
    inputs = make_inputs(torch.device("cuda:1"), "qk", dtype=torch.float32)
    with deterministic():
        out, grads, go = forward_backward(*inputs, sample="qk")
        ref, ref_grads, _ = forward_backward(*(t.to("cuda:0") for t in inputs), go.to("cuda:0"), sample="qk")
    assert out.device == torch.device("cuda:1") and torch.cuda.current_device() == 0
    torch.testing.assert_close(out.cpu(), ref.cpu(), rtol=0, atol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# What `auto` runs on CUDA (cuda_attention_path)


@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_auto_runs_grid_sample_sdpa_except_fp64_and_deterministic(cuda_device, sample, monkeypatch):
    monkeypatch.delenv(ca.CUDA_ATTENTION_ENV, raising=False)
    calls = []
    op = ca._op
    monkeypatch.setattr(ca, "_op", lambda *args: calls.append(args[0].dtype) or op(*args))
    q, k, v, coords = make_inputs(cuda_device, sample, n=300, d=64, dtype=torch.bfloat16)
    out = coorkern.coor_attention(q, k, v, coords, sample=sample)
    assert not calls  # no Triton kernel: the composition
    expected = reference.grid_sample_sdpa(q, k, v, coords, sample=sample, attention_dtype=torch.bfloat16)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    check(q, k, v, coords, TOL[torch.bfloat16], sample=sample)  # the kernels, forced, still right
    for dtype, det in ((torch.float64, False), (torch.float32, True)):
        with deterministic(det):
            inputs = [t.requires_grad_(True) for t in make_inputs(cuda_device, sample, n=40, d=16, dtype=dtype)]
            torch.autograd.grad(coorkern.coor_attention(*inputs, sample=sample).sum(), inputs)
        assert calls[-1] == dtype, (dtype, det)


# ---------------------------------------------------------------------------
# torch.library, torch.compile


@pytest.mark.parametrize("op", ["coor_attention", "coor_attention_triton"])
@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_opcheck(cuda_device, sample, op):
    # coor_attention: the registered CUDA kernel (dispatcher callers); coor_attention_triton:
    # the triton_op traced calls of the Python API take for the Triton kernels (torch >= 2.6).
    if op.endswith("_triton") and not ca.HAS_TRITON_OP:
        pytest.skip("torch.library.triton_op needs torch >= 2.6")
    forward = getattr(torch.ops.coorkern, op)
    backward = getattr(torch.ops.coorkern, op + "_backward")
    q, k, v, coords = (t.requires_grad_(True) for t in make_inputs(cuda_device, sample, n=17, d=16))
    args = (q, k, v, coords, sample, 0.25, True)
    torch.library.opcheck(forward.default, args)
    out, lse = forward(*args)
    assert out.requires_grad and not lse.requires_grad  # lse: saved state, marked non-differentiable
    bwd = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), coords.detach(), out.detach(),
           lse.detach(), sample, 0.25, True)
    torch.library.opcheck(backward.default, bwd)


@pytest.mark.skipif(not ca.HAS_TRITON_OP, reason="torch.library.triton_op needs torch >= 2.6")
def test_inductor_sees_the_triton_kernels(cuda_device):
    # Under torch.compile the forced Triton path is not an opaque op: the
    # generated code launches the kernels themselves, forward and backward.
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    inputs = [t.requires_grad_(True) for t in make_inputs(cuda_device, "qk", dtype=torch.bfloat16)]

    def forward(q, k, v, coords):
        return coorkern.coor_attention(q, k, v, coords, sample="qk")

    def step(fn):  # forward and backward (AOTAutograd compiles the backward at its first call)
        return torch.autograd.grad(fn(*inputs).float().square().sum(), inputs)

    with coorkern.backend("triton"):
        grads, code = run_and_get_code(step, torch.compile(forward, fullgraph=True))
        expected = step(forward)
    source = "\n".join(code)
    for kernel in ("_sample_kernel", "_attn_fwd_kernel", "_attn_bwd_dkv_kernel", "_attn_bwd_dq_kernel",
                   "_scatter_kernel"):
        assert kernel in source, kernel
    assert "torch.ops.coorkern.coor_attention_triton" not in source  # decomposed, not an opaque call
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_torch_compile_fullgraph(cuda_device, sample, mode):
    torch._dynamo.reset()
    inputs = [t.requires_grad_(True) for t in make_inputs(cuda_device, sample, dtype=torch.bfloat16)]

    def fn(q, k, v, coords):
        return coorkern.coor_attention(q, k, v, coords, sample=sample) * 2.0

    compiled = torch.compile(fn, fullgraph=True, mode=mode)
    expected = fn(*inputs)
    go = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, inputs, go)
    for _ in range(3):  # reduce-overhead: record, then replay the CUDA graph
        out = compiled(*inputs)
        grads = torch.autograd.grad(out, inputs, go)
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------
# Resources of what actually ran


def _compiled_variants():
    """Every compiled kernel of the module's @triton.jit functions: (name, CompiledKernel)."""
    for name in dir(ca_launch):
        fn = getattr(ca_launch, name)
        caches = getattr(fn, "device_caches", None)
        if not name.endswith("_kernel") or caches is None:
            continue
        for entry in caches.values():
            for kernel in entry[0].values():  # (kernel_cache, key cache, target, backend, binder)
                yield name, kernel


def test_every_launched_variant_has_zero_spills(cuda_device):
    cases = [(dtype, d, sample) for dtype in (torch.bfloat16, torch.float16, torch.float64) for d in (32, 128)
             for sample in ("qk", "kv")]
    for dtype, d, sample in cases:
        forward_backward(*make_inputs(cuda_device, sample, d=d, dtype=dtype), sample=sample)
    for value in ("ieee", "tf32"):
        with fp32_precision("new", value):
            for d in (32, 128):
                forward_backward(*make_inputs(cuda_device, "qk", d=d), sample="qk")
    with deterministic():
        forward_backward(*make_inputs(cuda_device, "kv", d=64), sample="kv")
    torch.cuda.synchronize()
    seen = {}
    for name, kernel in _compiled_variants():
        kernel._init_handles()
        seen[name] = seen.get(name, 0) + 1
        assert kernel.n_spills == 0, (name, kernel.n_spills, kernel.n_regs)
    assert set(seen) == {"_sample_kernel", "_attn_fwd_kernel", "_attn_bwd_dkv_kernel", "_attn_bwd_dq_kernel",
                         "_scatter_kernel", "_row_dot_kernel"}, seen


def test_peak_memory_is_linear_in_n(cuda_device):
    # fwd + bwd at N = 16384 (bf16, d = 64): an N x N score matrix would be 512 MiB.
    def peak(n):
        inputs = make_inputs(cuda_device, "qk", batch=1, heads=1, n=n, d=64, hw=(128, 128), dtype=torch.bfloat16)
        forward_backward(*inputs)  # compile, autotune
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward_backward(*inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    small, large = peak(8192), peak(16384)
    n, d = 16384, 64
    assert large < 64 * n * d * 4, large  # O(N d): far below N^2 elements
    assert large < 2.6 * max(small, 1), (small, large)  # doubles with N, does not quadruple
