"""Tests of the hand-written CPU kernel of coor_attention (csrc/cpu/coor_attention_kernel.cpp).

Every check compares with the float64 eager oracle ``coorkern.reference.coor_attention``
(grid_sample + SDPA's math path), not with ATen's flash kernel that the C++ op falls back
to.  The op's rule runs the kernel's forward for d <= 128 and its backward for d <= 8;
these tests force the kernel in both directions (``COORKERN_CPU_ATTENTION=kernel``) except
where they test the rule itself; ``COORKERN_CPU_ISA`` picks one of the compiled variants.
"""

from __future__ import annotations

import pytest
import torch

import coorkern
from coorkern import reference
from support.coor_attention_cases import (gradcheck_backend, make_coords, make_inputs, opcheck_forward_and_backward, rel_err,
                                 run)

pytestmark = pytest.mark.skipif(not coorkern.cpp_available(), reason="C++ extension not built")


def check(q, k, v, coords, tol, **kw):
    """Kernel output and gradients (q, k, v, coords) against the oracle."""
    ref_out, ref_grads, go = run("oracle", q, k, v, coords, **kw)
    out, grads, _ = run("cpp", q, k, v, coords, go, **kw)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert rel_err(out, ref_out) < tol, ("out", rel_err(out, ref_out))
    for name, g, r in zip("q k v coords".split(), grads, ref_grads):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert rel_err(g, r) < tol, (name, rel_err(g, r))


@pytest.fixture(autouse=True)
def kernel_path(monkeypatch):
    monkeypatch.setenv("COORKERN_CPU_ATTENTION", "kernel")
    monkeypatch.delenv("COORKERN_CPU_ISA", raising=False)


# ---------------------------------------------------------------------------
# float64: exact against the oracle, gradcheck


@pytest.mark.parametrize("d", [8, 16, 24, 32, 64, 128])
@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_float64_every_head_dim(sample, d):
    # odd N and Nq, and more tokens than one lane block (64 fp32 / 32 fp64 lanes) and one
    # streamed block (64 rows)
    inputs = make_inputs(sample, batch=2, heads=2, n=71, nq=37, d=d, hw=(5, 7), per_head=d % 16 == 8)
    check(*inputs, 1e-10, sample=sample, align_corners=d != 32)


@pytest.mark.parametrize("n,nq", [(1, 1), (1, 3), (2, 1), (300, 5)])
@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_float64_token_counts(sample, n, nq):
    inputs = make_inputs(sample, heads=1, n=n, nq=nq, d=8, hw=(3, 2))
    check(*inputs, 1e-10, sample=sample, scale=0.37)


@pytest.mark.parametrize("sample,per_head,align_corners", [("qk", False, True), ("kv", True, False)])
def test_gradcheck(sample, per_head, align_corners):
    assert gradcheck_backend("cpp", sample, per_head, align_corners, d=8)


# ---------------------------------------------------------------------------
# Low precision (fp32 accumulation), coordinates, layouts


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_low_precision(sample, dtype, tol):
    inputs = make_inputs(sample, batch=2, heads=2, n=133, nq=67, d=16, hw=(9, 11), dtype=dtype)
    check(*inputs, tol, sample=sample)


@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_border_and_outside_coordinates(sample):
    q, k, v, _ = make_inputs(sample, batch=1, heads=2, n=8, d=8, hw=(4, 5))
    xs = torch.tensor([-1.0, 1.0, -1.0, 1.0, 0.3, -1.1, 1e4, -3e5], dtype=torch.float64)
    ys = torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0, 0.2, 2.0, -7.0], dtype=torch.float64)
    coords = torch.stack([xs, ys], -1)[None]
    for align in (True, False):
        check(q, k, v, coords, 1e-10, sample=sample, align_corners=align)
    far = make_coords(1, 2, 8, 4, 5, where="outside")
    check(q, k, v, far, 1e-10, sample=sample)


@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_nan_coordinates_give_nan_like_grid_sample(sample):
    # A NaN coordinate samples a NaN key (and, for "qk", a NaN query): every softmax row
    # sees the NaN key, so every output is NaN -- as in the oracle, except that SDPA's math
    # path maps the all-NaN score row of the NaN query to zeros, where the kernel keeps NaN.
    q, k, v, coords = make_inputs(sample, heads=2, n=9, nq=4, d=8, hw=(4, 5), dtype=torch.float32)
    coords[0, 3, 0] = float("nan")
    ref = reference.coor_attention(q, k, v, coords, sample=sample)
    with coorkern.backend("cpp"):
        out = coorkern.coor_attention(q, k, v, coords, sample=sample)
    expected = ref.isnan()
    if sample == "qk":
        expected[:, :, 3] = True
    assert expected.all() and torch.equal(out.isnan(), expected)
    # one NaN coordinate in another batch element leaves this one finite and exact
    q, k, v, coords = make_inputs(sample, batch=2, heads=2, n=9, nq=4, d=8, hw=(4, 5), dtype=torch.float32)
    coords[1, 3, 1] = float("nan")
    ref = reference.coor_attention(q, k, v, coords, sample=sample)
    with coorkern.backend("cpp"):
        out = coorkern.coor_attention(q, k, v, coords, sample=sample)
    assert out[1].isnan().all() and not out[0].isnan().any()
    torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-5)


def test_non_contiguous_views_of_one_projection():
    # The detector's layout: q, k, v are strided slices of one (B, H, W, 3, heads, d) tensor.
    b, heads, hh, ww, d = 2, 2, 5, 6, 8
    qkv = torch.randn(b, hh, ww, 3, heads, d, dtype=torch.float64)
    q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)
    v = v.reshape(b, heads, hh * ww, d)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    coords = make_coords(b, heads, hh * ww, hh, ww)
    check(q, k, v, coords, 1e-10, sample="qk")
    # channels-first storage (d not the innermost stride) and strided coordinates
    q2 = torch.randn(b, heads, d, hh, ww, dtype=torch.float64).permute(0, 1, 3, 4, 2)
    t = torch.randn(b, 11, heads, d, dtype=torch.float64).transpose(1, 2)
    c2 = make_coords(b, heads, hh * ww, hh, ww, per_head=True).transpose(1, 2).contiguous().transpose(1, 2)
    check(t, q2, q2.flip(2), c2, 1e-10, sample="kv")


# ---------------------------------------------------------------------------
# Determinism, ISA variants, the fallback rule


def test_results_independent_of_thread_count():
    inputs = make_inputs("qk", batch=2, heads=2, n=300, d=16, hw=(12, 13), dtype=torch.float32)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, grads, go = run("cpp", *inputs, results[0][2] if results else None)
            results.append((out, grads, go))
    finally:
        torch.set_num_threads(previous)
    (o1, g1, _), (o2, g2, _) = results
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_every_isa_variant(monkeypatch, isa):
    # a variant above what this CPU has runs the best one it has (never an illegal instruction)
    monkeypatch.setenv("COORKERN_CPU_ISA", isa)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        inputs = make_inputs("qk", batch=1, heads=2, n=77, d=16, hw=(6, 7), dtype=dtype, per_head=True)
        check(*inputs, tol, sample="qk")


def _paths(q, k, v, coords, **kw):
    """(forward, backward): whether each went through ATen's grid sampler (the fallback)."""
    inputs = [t.detach().requires_grad_(True) for t in (q, k, v, coords)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as fwd_prof:
        with coorkern.backend("cpp"):
            out = coorkern.coor_attention(*inputs, **kw)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as bwd_prof:
        out.sum().backward()
    fwd = {e.key for e in fwd_prof.key_averages()}
    bwd = {e.key for e in bwd_prof.key_averages()}
    assert "coorkern::coor_attention" in fwd and "coorkern::coor_attention_backward" in bwd
    return "aten::grid_sampler_2d" in fwd, "aten::grid_sampler_2d_backward" in bwd


def test_fallback_rule(monkeypatch):
    def inputs(d):
        return make_inputs("qk", heads=1, n=5, d=d, hw=(3, 3), dtype=torch.float32)

    monkeypatch.setenv("COORKERN_CPU_ATTENTION", "auto")
    assert _paths(*inputs(8)) == (False, False)  # the detector's CPU heads: kernel both ways
    assert _paths(*inputs(16)) == (False, True)  # forward kernel, backward ATen
    assert _paths(*inputs(128)) == (False, True)
    assert _paths(*inputs(136)) == (True, True)  # wider than the kernel covers
    for d in (16, 136):
        check(*inputs(d), 1e-4, sample="qk")  # mixed and fallback paths are right too
    monkeypatch.setenv("COORKERN_CPU_ATTENTION", "aten")
    assert _paths(*inputs(8)) == (True, True)
    monkeypatch.setenv("COORKERN_CPU_ATTENTION", "kernel")
    assert _paths(*inputs(136)) == (False, False)
    check(*inputs(136), 1e-4, sample="qk")
    monkeypatch.setenv("COORKERN_CPU_ATTENTION", "fast")
    with pytest.raises(RuntimeError, match="COORKERN_CPU_ATTENTION must be auto, kernel or aten"):
        _paths(*inputs(8))


# ---------------------------------------------------------------------------
# Registration: opcheck, torch.compile


@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_opcheck(sample):
    q, k, v, coords = [t.requires_grad_(True) for t in make_inputs(sample, heads=2, n=7, nq=5, d=8,
                                                                      dtype=torch.float32)]
    opcheck_forward_and_backward(q, k, v, coords, sample, align_corners=False)


def test_torch_compile_fullgraph_training_step():
    torch._dynamo.reset()
    q, k, v, coords = make_inputs("qk", heads=2, n=9, d=8, hw=(3, 3), dtype=torch.float32)
    coords.requires_grad_(True)
    proj = torch.nn.Linear(8, 8)
    params = list(proj.parameters()) + [coords]

    def loss_fn(attention):
        return lambda q, k, v, c: proj(attention(q, k, v, c, sample="qk")).square().mean()

    compiled = torch.compile(loss_fn(coorkern.coor_attention), fullgraph=True, backend="aot_eager")
    with coorkern.backend("cpp"):
        loss = compiled(q, k, v, coords)
        grads = torch.autograd.grad(loss, params)
    ref = loss_fn(reference.coor_attention)(q, k, v, coords)
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
