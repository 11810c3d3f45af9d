"""Central loss on CUDA tensors with the real Triton compiler, against coorkern.reference.

Run with ``COORKERN_TEST_DEVICE=cuda python -m pytest python_tests/cuda/test_cuda_central_loss.py``
(or ``python bench/gpu_check.py``).  Without a CUDA device every test is collected and
reports "skipped: no CUDA device" (the ``cuda_device`` fixture in conftest.py).

The oracle is the float64 reference evaluated on the CPU on the same (rounded) inputs,
so the GPU result is checked against an independent computation.  Tolerances as in
test_central_loss.py: float64 1e-12 (loss) / 1e-9 (gradient); float32 1e-5 / 1e-4 of the
largest entry (1e-2 for r < 1); float16/bfloat16 1e-2 / 2e-2.
"""

from __future__ import annotations

import pytest
import torch

import coorkern
from coorkern import reference
from coorkern.ops._runtime import host as _host
from coorkern.ops.central_loss import kernels as cl_kernels, launch as cl_launch, op as cl_module

REDUCTIONS = ["mean", "sum", "none"]
RS = [0.0, 0.5, 1.0, 2.0, 2.5, 4.0, 3.7]  # 4: its own specialization; 3.7: general r above 3
TOLS = {torch.float64: (1e-12, 1e-9), torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 1e-2),
        torch.bfloat16: (2e-2, 2e-2)}
VARIANTS = ["target", "landmarks"]


def weights_for(shape, dtype, device):
    """Fixed non-uniform grad_output (exercises the per-element "none" backward)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)


def loss_and_grad(fn, logits, *args, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kwargs)
    (loss * weights_for(loss.shape, loss.dtype, loss.device)).sum().backward()
    return loss.detach(), x.grad


def oracle(fn, logits, *args, **kwargs):
    """float64 reference on the CPU on the given inputs."""
    x = logits.detach().cpu().double().requires_grad_(True)
    args = [a.detach().cpu().double() if isinstance(a, torch.Tensor) else a for a in args]
    loss = fn(x, *args, **kwargs)
    (loss * weights_for(loss.shape, logits.dtype, "cpu").double()).sum().backward()
    return loss.detach(), x.grad


def assert_close(actual, expected, rtol, name):
    """Elementwise |actual - expected| <= rtol * max|expected| (float64 on the CPU)."""
    actual = actual.detach().cpu().double()
    assert actual.shape == expected.shape, name
    if expected.numel() == 0:
        return
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{name}: NaN pattern differs"
    finite = ~torch.isnan(expected)
    scale = expected[finite].abs().max().item() if finite.any() else 0.0
    err = (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    assert err <= rtol * scale + 1e-30, f"{name}: max error {err:.3g} > {rtol:g} x {scale:.3g}"


def make_case(variant, shape, dtype, device, seed=0):
    """(function, reference, logits, data, kwargs) for one variant on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=gen) * 3).to(device=device, dtype=dtype)
    if variant == "target":
        data = torch.rand(shape, generator=gen).to(device=device, dtype=dtype)
        return coorkern.central_loss, reference.central_loss, logits, data, {}
    height, width = shape[-2], shape[-1]
    scale = torch.tensor([width + 4.0, height + 4.0])
    landmarks = torch.rand(tuple(shape[:-2]) + (2,), generator=gen) * scale - 2.0  # some outside the map
    if landmarks.numel() >= 4:
        landmarks.view(-1, 2)[1] = float("nan")  # a missing landmark
    lm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return (coorkern.central_loss_from_landmarks, reference.central_loss_from_landmarks, logits,
            landmarks.to(device=device, dtype=lm_dtype), {"sigma": 2.5})


def check_against_reference(variant, shape, dtype, device, r=2.0, reductions=REDUCTIONS, transform=None, **extra):
    fn, ref_fn, logits, data, kwargs = make_case(variant, shape, dtype, device)
    kwargs.update(extra)
    if transform is not None:
        logits = transform(logits)
    rtol_loss, rtol_grad = TOLS[dtype]
    if r < 1 and dtype == torch.float32:
        rtol_grad = 1e-2
    for reduction in reductions:
        loss, grad = loss_and_grad(fn, logits, data, r=r, reduction=reduction, **kwargs)
        assert loss.device == logits.device and loss.dtype == dtype and grad.dtype == dtype
        ref_loss, ref_grad = oracle(ref_fn, logits, data, r=r, reduction=reduction, **kwargs)
        label = f"{variant} {tuple(shape)} {dtype} r={r} {reduction}"
        assert_close(loss, ref_loss, rtol_loss, label + " loss")
        assert_close(grad, ref_grad, rtol_grad, label + " grad")


# ------------------------------------------------------------------ accuracy


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", list(TOLS))
@pytest.mark.parametrize("r", RS)
def test_matches_reference(cuda_device, variant, dtype, r):
    check_against_reference(variant, (3, 7, 33, 65), dtype, cuda_device, r=r)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 1, 1, 5), (3, 5, 17, 9), (1, 2, 100, 131), (2, 3, 256, 311)])
def test_odd_sizes_and_single_element(cuda_device, variant, shape):
    for dtype in (torch.float64, torch.float32):
        check_against_reference(variant, shape, dtype, cuda_device)


@pytest.mark.parametrize("shape", [(1,), (5,), (40000,), (3, 9000, 7)])
def test_target_variant_any_shape(cuda_device, shape):
    check_against_reference("target", shape, torch.float64, cuda_device)


@pytest.mark.parametrize("variant", VARIANTS)
def test_empty(cuda_device, variant):
    fn, _, logits, data, kwargs = make_case(variant, (0, 3, 4, 5), torch.float32, cuda_device)
    for reduction, expected in (("none", None), ("sum", 0.0), ("mean", float("nan"))):
        loss, grad = loss_and_grad(fn, logits, data, reduction=reduction, **kwargs)
        assert grad.shape == logits.shape
        if expected is None:
            assert loss.shape == logits.shape
        else:
            torch.testing.assert_close(loss.cpu(), torch.tensor(expected), equal_nan=True)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_non_contiguous_logits(cuda_device, variant, layout):
    def transform(x):
        if layout == "channels_last":
            y = x.contiguous(memory_format=torch.channels_last)
        else:
            y = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not y.is_contiguous() and torch.equal(y, x)
        return y

    for dtype in (torch.float64, torch.bfloat16):
        check_against_reference(variant, (2, 5, 21, 34), dtype, cuda_device, transform=transform)


@pytest.mark.parametrize("radius", [None, 0.0, 4.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_radius_and_nan_landmarks(cuda_device, radius, dtype):
    check_against_reference("landmarks", (2, 5, 23, 31), dtype, cuda_device, radius=radius)
    logits = torch.randn(1, 2, 9, 8, device=cuda_device, dtype=dtype)
    landmarks = torch.tensor([[[float("nan"), float("nan")], [3.0, float("nan")]]], device=cuda_device)
    loss = coorkern.central_loss_from_landmarks(logits, landmarks, radius=radius, reduction="none")
    expected = reference.central_loss(logits.cpu().double(), torch.zeros(1, 2, 9, 8, dtype=torch.float64),
                                      reduction="none")  # missing landmark: target 0
    assert_close(loss, expected, TOLS[dtype][0], "NaN landmarks")


@pytest.mark.parametrize("variant", VARIANTS)
def test_more_rows_than_grid_axis_limit(cuda_device, variant):
    """B*L = 70,000 > 65,535 rows (the old grid put them on axis 1)."""
    check_against_reference(variant, (2, 35000, 3, 5), torch.float32, cuda_device, reductions=["sum", "none"])


def test_float64_scalars_are_not_rounded_to_float32(cuda_device):
    """r = 1/3, sigma = 0.3, radius = 2.7, mean over 3 x 7 x 33 x 65: all inexact in fp32."""
    check_against_reference("landmarks", (3, 7, 33, 65), torch.float64, cuda_device, r=1.0 / 3.0,
                            sigma=0.3, radius=2.7)


# ------------------------------------------------------------------ execution properties


def all_cases(device, shape=(2, 19, 64, 52)):
    for variant in VARIANTS:
        fn, _, logits, data, kwargs = make_case(variant, shape, torch.float32, device)
        for reduction in REDUCTIONS:
            yield fn, logits, data, dict(kwargs, reduction=reduction)


def step(fn, logits, data, kwargs):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, data, **kwargs)
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    return loss, grad


def test_no_host_sync(cuda_device):
    cases = list(all_cases(cuda_device))
    for case in cases:  # compile and autotune first (the autotuner's benchmarks do synchronize)
        step(*case)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for case in cases:
            step(*case)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_cuda_graph_capture_and_replay_equal_eager(cuda_device):
    for fn, logits, data, kwargs in all_cases(cuda_device):
        static_x = logits.detach().clone().requires_grad_(True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compile, autotune) outside the capture
            for _ in range(2):
                loss = fn(static_x, data, **kwargs)
                torch.autograd.grad(loss, static_x, torch.ones_like(loss))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = fn(static_x, data, **kwargs)
            (static_grad,) = torch.autograd.grad(static_loss, static_x, torch.ones_like(static_loss))
        for seed in (3, 4):
            fresh = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed)).to(cuda_device) * 3
            with torch.no_grad():
                static_x.copy_(fresh)
            graph.replay()
            eager_loss, eager_grad = step(fn, fresh, data, kwargs)
            torch.testing.assert_close(static_loss, eager_loss, rtol=0, atol=0)
            torch.testing.assert_close(static_grad, eager_grad, rtol=0, atol=0)


def test_side_stream(cuda_device):
    for fn, logits, data, kwargs in all_cases(cuda_device):
        expected = step(fn, logits, data, kwargs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            # Produced on the side stream just before use: a kernel launched on another
            # stream would race with this and read garbage.
            big = torch.randn(4096, 4096, device=cuda_device)
            for _ in range(4):
                big = big @ big / 64
            x = logits * 1.0 + 0.0 * big[0, 0]
            loss, grad = step(fn, x, data, kwargs)
        side.synchronize()
        torch.testing.assert_close(loss, expected[0], rtol=0, atol=0)
        torch.testing.assert_close(grad, expected[1], rtol=0, atol=0)


def test_tensors_on_another_device_than_the_current_one(cuda_device):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    other = torch.device("cuda", 1)
    with torch.cuda.device(0):
        assert torch.cuda.current_device() == 0
        for variant in VARIANTS:
            check_against_reference(variant, (2, 5, 23, 31), torch.float32, other)


def test_deterministic_bitwise(cuda_device):
    for fn, logits, data, kwargs in all_cases(cuda_device, shape=(4, 19, 128, 104)):
        first = step(fn, logits, data, kwargs)
        for _ in range(3):
            again = step(fn, logits, data, kwargs)
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_kernel_launches_per_pass(cuda_device):
    """Forward: 1 kernel ("none") or 2 (loss pass + finishing sum with the mean scale and cast
    folded in); backward: 1."""
    from torch.profiler import ProfilerActivity, profile

    def kernels(fn):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            result = fn()
            torch.cuda.synchronize()
        return result, [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    for fn, logits, data, kwargs in all_cases(cuda_device):
        step(fn, logits, data, kwargs)  # warm-up
        x = logits.detach().clone().requires_grad_(True)
        loss, forward = kernels(lambda: fn(x, data, **kwargs))
        assert len(forward) == (1 if kwargs["reduction"] == "none" else 2), forward
        grad_out = torch.ones_like(loss)
        _, backward = kernels(lambda: torch.autograd.grad(loss, x, grad_out))
        assert len(backward) == 1, backward


def test_launched_kernels_do_not_spill(cuda_device):
    """Every compiled variant this process launched (all autotuning candidates included)."""
    for variant in VARIANTS:
        for dtype in TOLS:
            for r in (2.0, 2.5, 4.0):
                for reduction in REDUCTIONS:
                    fn, _, logits, data, kwargs = make_case(variant, (2, 3, 40, 33), dtype, cuda_device)
                    step(fn, logits, data, dict(kwargs, r=r, reduction=reduction))
    compiled = []
    for jit_fn in (cl_kernels._central_loss_kernel, cl_kernels._finish_sum_kernel):
        for cache in jit_fn.device_caches.values():
            compiled += list(cache[0].values())
    assert len(compiled) >= 2 * 4 * 3  # variants x dtypes x modes, at least
    # Report every offender with its constants: on the first H200 run this failed after the
    # whole file had run, with the message lost; every variant compiled for sm_90 here
    # (triton 3.6 and 3.9) has 0 spills, so the launched set holds something those miss.
    offenders = []
    for kernel in compiled:
        try:
            kernel._init_handles()
        except Exception as exc:  # noqa: BLE001 -- reported below with the kernel's constants
            offenders.append((kernel.name, f"{type(exc).__name__}: {exc}", _kernel_constants(kernel)))
            continue
        if kernel.n_spills:
            offenders.append((kernel.name, f"{kernel.n_regs} registers, {kernel.n_spills} spills",
                              _kernel_constants(kernel)))
    assert not offenders, offenders


def _kernel_constants(kernel):
    source = getattr(kernel, "src", None)
    return {str(k): str(v) for k, v in (getattr(source, "constants", None) or {}).items()}


# ------------------------------------------------------------------ torch.library / compile


# One case per (dtype, reduction): the whole set took over 40 s on an H200 (each opcheck
# traces the triton_op path through fake tensors), long enough to hit a per-test timeout.
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(cuda_device, dtype, reduction):
    logits = torch.randn(2, 3, 7, 5, dtype=dtype, device=cuda_device, requires_grad=True)
    target = torch.rand(2, 3, 7, 5, dtype=dtype, device=cuda_device)
    landmarks = torch.rand(2, 3, 2, dtype=dtype, device=cuda_device) * 6
    grad_out = torch.rand((), dtype=dtype, device=cuda_device) if reduction != "none" else \
        torch.rand_like(logits)
    torch.library.opcheck(torch.ops.coorkern.central_loss.default, (logits, target, 2.0, reduction))
    torch.library.opcheck(torch.ops.coorkern.central_loss_from_landmarks.default,
                          (logits, landmarks, 2.0, 1.0, reduction, 3.0))
    torch.library.opcheck(torch.ops.coorkern.central_loss_backward.default,
                          (grad_out, logits.detach(), target, 0.5, reduction))
    torch.library.opcheck(torch.ops.coorkern.central_loss_from_landmarks_backward.default,
                          (grad_out, logits.detach(), landmarks, 2.0, 2.0, reduction, None))
    if cl_module.HAS_TRITON_OP:  # the triton_op path the Python API takes on CUDA when traced
        for data, from_landmarks in ((target, False), (landmarks, True)):
            torch.library.opcheck(torch.ops.coorkern.central_loss_triton.default,
                                  (logits, data, 2.0, 2.5, reduction, 3.0, from_landmarks))
            torch.library.opcheck(torch.ops.coorkern.central_loss_triton_backward.default,
                                  (grad_out, logits.detach(), data, 2.0, 1.0, reduction, None,
                                   from_landmarks))


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_torch_compile_fullgraph(cuda_device, mode):
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(1, 3, 3, padding=1).to(cuda_device)
    params = list(conv.parameters())
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 1, 24, 20, generator=gen).to(cuda_device)
    landmarks = (torch.rand(2, 3, 2, generator=gen) * 19).to(cuda_device)
    target = reference.gaussian_heatmaps(landmarks, 24, 20, sigma=2.0)

    def loss_fn(images, landmarks, target):
        logits = conv(images)
        return coorkern.central_loss_from_landmarks(logits, landmarks, sigma=2.0) + coorkern.central_loss(
            logits, target, r=1.0, reduction="sum")

    eager_loss = loss_fn(images, landmarks, target)
    eager_grads = torch.autograd.grad(eager_loss, params)
    compiled = torch.compile(loss_fn, fullgraph=True, mode=mode)
    for _ in range(3):  # reduce-overhead records its CUDA graph after warm-up runs
        loss = compiled(images, landmarks, target)
        grads = torch.autograd.grad(loss, params)
        torch.testing.assert_close(loss, eager_loss)
        for g, e in zip(grads, eager_grads):
            torch.testing.assert_close(g, e)


# ------------------------------------------------------------------ mixed-precision training step


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_detector_training_step_mixed_precision(cuda_device, amp):
    from coorkern.models import CoorDetector

    torch.manual_seed(0)
    model = CoorDetector(base_channels=16, num_landmarks=5).to(cuda_device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    images = torch.randn(2, 1, 128, 96, device=cuda_device)
    landmarks = torch.rand(2, 5, 2, device=cuda_device) * torch.tensor([95.0, 127.0], device=cuda_device)
    for _ in range(3):  # as coorkern.train does it
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            logits = model(images)
            loss = coorkern.central_loss_from_landmarks(logits, landmarks, sigma=3.0)
        assert torch.isfinite(loss)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)  # skips a step with inf/NaN gradients and lowers the scale
            scaler.update()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)  # the last step's (unscaled) gradients


def test_eager_calls_take_the_autograd_function_with_direct_launches(cuda_device, monkeypatch):
    """Eager CUDA calls on plain tensors skip the triton_op (its custom-op dispatch was most of
    the Python host time) and launch the kernels directly, not through wrap_triton's HOP."""
    assert _host.plain_eager(torch.zeros(1, device=cuda_device))
    called, direct = [], []
    apply = cl_module._TritonEager.apply
    monkeypatch.setattr(cl_module._TritonEager, "apply", lambda *a: called.append("function") or apply(*a))
    launch = cl_launch._launch
    monkeypatch.setattr(cl_launch, "_launch", lambda *a, **k: direct.append(_host._direct.active) or launch(*a, **k))
    logits = torch.randn(2, 3, 9, 8, device=cuda_device)
    landmarks = torch.rand(2, 3, 2, device=cuda_device) * 7
    loss, grad = loss_and_grad(coorkern.central_loss_from_landmarks, logits, landmarks, 2.0, 2.0, "mean")
    assert called == ["function"] and direct == [True] * 3
    want_loss, want_grad = oracle(reference.central_loss_from_landmarks, logits, landmarks, 2.0, 2.0, "mean")
    assert_close(loss, want_loss, 1e-5, "loss")
    assert_close(grad, want_grad, 1e-4, "grad")
