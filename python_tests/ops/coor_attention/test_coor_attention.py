"""Tests of coorkern.coor_attention against the eager oracle.

Triton kernels run on CPU tensors under the interpreter (conftest sets
TRITON_INTERPRET=1); the C++ op is tested on CPU directly.  Shapes are small and
blocks large because the interpreter costs ~1 ms per program instance.  The GPU
compile checks run in a subprocess without the interpreter (triton.compile needs
real JIT functions), targeting sm_80 and sm_90 without a GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import coorkern
from coorkern import reference
from coorkern.ops._runtime import host as _host
from coorkern.ops.coor_attention import aot as ca_aot, launch as ca_launch, op as ca
from support.coor_attention_cases import (assert_close_to_oracle, assert_matches, gradcheck_backend, make_coords,
                                          make_inputs, opcheck_forward_and_backward, rel_err, run)
from support.triton_op_dispatch import PassThroughMode, run_triton_op_body, spy_routes

from support.paths import REPO_ROOT

ROOT = str(REPO_ROOT)


# ---------------------------------------------------------------------------
# Inputs


# ---------------------------------------------------------------------------
# Exactness in float64: every mode, both align_corners, shared / per-head coords


@pytest.mark.parametrize("impl", ["triton", "cpp"])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_float64_matches_reference(impl, sample, align_corners, per_head):
    if impl == "cpp" and not coorkern.cpp_available():
        pytest.skip("C++ extension not built")
    inputs = make_inputs(sample, batch=2, per_head=per_head, align_corners=align_corners)
    assert_matches(impl, *inputs, 1e-10, sample=sample, align_corners=align_corners)


@pytest.mark.parametrize("sample,per_head,align_corners", [("qk", False, True), ("qk", True, False),
                                                           ("kv", False, False), ("kv", True, True)])
def test_gradcheck_triton(sample, per_head, align_corners):
    assert gradcheck_backend("triton", sample, per_head, align_corners)


def test_gradcheck_coords_full_jacobian():
    # Coordinates only (few elements): the full Jacobian, not a random projection.  The
    # output is contracted with a fixed random vector over d to keep the backward count low.
    q, k, v, coords = make_inputs("qk", heads=2, n=4, hw=(3, 4), per_head=True)
    w = torch.randn(16, dtype=torch.float64)

    def fn(c):
        with coorkern.backend("triton"):
            return coorkern.coor_attention(q, k, v, c, sample="qk") @ w

    assert torch.autograd.gradcheck(fn, (coords.requires_grad_(True),), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------
# Low precision, any N, coordinate placements, layouts


@pytest.mark.parametrize(
    "n,sample,dtype",
    [(1, "qk", torch.float32), (7, "kv", torch.bfloat16), (64, "qk", torch.bfloat16),
     (129, "kv", torch.float32), (300, "qk", torch.float32), (300, "kv", torch.bfloat16),
     (129, "qk", torch.float16)],
)
def test_low_precision_any_n(n, sample, dtype):
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    inputs = make_inputs(sample, heads=2, n=n, nq=n // 2 + 3, d=32, hw=(9, 11), dtype=dtype, per_head=n % 2 == 1)
    assert_matches("triton", *inputs, tol, sample=sample)


@pytest.mark.parametrize("d", [16, 32, 64, 128, 24])
def test_head_dims(d):
    inputs = make_inputs("qk", heads=1, n=9, d=d)
    assert_matches("triton", *inputs, 1e-10, sample="qk")


@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_coordinates_on_border_and_far_outside(sample):
    q, k, v, _ = make_inputs(sample, batch=1, heads=2, n=8, hw=(4, 5))
    # exact corners / edges (pixel centers of the border), just outside, far outside
    xs = torch.tensor([-1.0, 1.0, -1.0, 1.0, 0.3, -1.1, 1e4, -3e5], dtype=torch.float64)
    ys = torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0, 0.2, 2.0, -7.0], dtype=torch.float64)
    coords = torch.stack([xs, ys], -1)[None]
    for align in (True, False):
        for impl in ("triton", "cpp"):
            if impl == "cpp" and not coorkern.cpp_available():
                continue
            assert_matches(impl, q, k, v, coords, 1e-10, sample=sample, align_corners=align)


def test_all_coordinates_outside_sample_zeros():
    q, k, v, coords = make_inputs("qk", heads=2, n=6, where="outside")
    out, grads, _ = run("triton", q, k, v, coords, sample="qk")
    # Qs = Ks = 0: uniform attention, the mean of v; no gradient reaches the maps or coords.
    torch.testing.assert_close(out, v.mean(2, keepdim=True).expand_as(out), rtol=1e-12, atol=1e-12)
    assert grads[0].abs().max() == 0 and grads[1].abs().max() == 0 and grads[3].abs().max() == 0
    assert_matches("triton", q, k, v, coords, 1e-10, sample="qk")


@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_non_contiguous_inputs(sample):
    b, h, hh, ww, d, n, nq = 2, 2, 5, 4, 16, 9, 6

    def fmap():  # channels-first storage viewed channels-last
        return torch.randn(b, h, d, hh, ww, dtype=torch.float64).permute(0, 1, 3, 4, 2)

    def tokens(m):  # (B, N, heads, d) storage viewed as (B, heads, N, d)
        return torch.randn(b, m, h, d, dtype=torch.float64).transpose(1, 2)

    q, k, v = (fmap(), fmap(), tokens(n)) if sample == "qk" else (tokens(nq), fmap(), fmap())
    coords = torch.cat([make_coords(b, h, n, hh, ww, per_head=True), torch.zeros(b, h, n, 2, dtype=torch.float64)],
                       -1)[..., :2].transpose(1, 2).contiguous().transpose(1, 2)  # strided (B, heads, N, 2)
    assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous() and coords.is_contiguous())
    for impl in ("triton", "cpp") if coorkern.cpp_available() else ("triton",):
        assert_matches(impl, q, k, v, coords, 1e-10, sample=sample)


def test_kv_nq_differs_from_n_and_maps_differ_in_size():
    q = torch.randn(1, 2, 11, 16, dtype=torch.float64)
    k = torch.randn(1, 2, 3, 7, 16, dtype=torch.float64)
    v = torch.randn(1, 2, 6, 2, 16, dtype=torch.float64)
    coords = torch.rand(1, 2, 4, 2, dtype=torch.float64) * 2.2 - 1.1
    assert_matches("triton", q, k, v, coords, 1e-10, sample="kv", align_corners=False)
    assert_matches("triton", q, k, v, coords, 1e-10, sample="kv", scale=0.3)


def test_coords_dtype_may_differ_and_keeps_its_grad_dtype():
    q, k, v, coords = make_inputs("qk", dtype=torch.float32)
    out, grads, _ = run("triton", q, k, v, coords.double(), sample="qk")
    assert out.dtype == torch.float32 and grads[3].dtype == torch.float64


def test_deterministic_backward_bit_identical():
    # Many coordinates on few pixels: the map gradients sum many colliding contributions.
    q, k, v, coords = make_inputs("qk", heads=2, n=150, d=16, hw=(3, 3))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out1, g1, go = run("triton", q, k, v, coords, sample="qk")
        out2, g2, _ = run("triton", q, k, v, coords, go, sample="qk")
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(out1, out2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    _, g_ref, _ = run("oracle", q, k, v, coords, go, sample="qk")
    for a, b in zip(g1, g_ref):
        assert rel_err(a, b) < 1e-10


def test_no_n_by_n_buffer():
    # Record every tensor the host code allocates (kernels' buffers included).
    n, nq, d = 300, 280, 16

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    q, k, v, coords = make_inputs("kv", heads=1, n=n, nq=nq, d=d, hw=(4, 4), dtype=torch.float32)
    inputs = [t.requires_grad_(True) for t in (q, k, v, coords)]
    for impl in ("triton", "cpp") if coorkern.cpp_available() else ("triton",):
        Largest.numel = 0
        with Largest(), coorkern.backend(impl):
            out = coorkern.coor_attention(*inputs, sample="kv")
            torch.autograd.grad(out.sum(), inputs)
        assert Largest.numel <= 4 * n * d + 64, (impl, Largest.numel)  # largest: per-corner partials
        assert Largest.numel < n * nq


# ---------------------------------------------------------------------------
# Backends, registration, torch.compile


def test_backend_selection_and_module():
    q, k, v, coords = make_inputs("qk", dtype=torch.float32)
    ref = reference.coor_attention(q, k, v, coords)
    with coorkern.backend("reference"):
        torch.testing.assert_close(coorkern.coor_attention(q, k, v, coords), ref)
    module = coorkern.CoorAttention(sample="qk")
    torch.testing.assert_close(module(q, k, v, coords), ref, rtol=1e-5, atol=1e-5)
    assert "sample='qk'" in repr(module)


def test_env_var_selects_triton(monkeypatch):
    q, k, v, coords = make_inputs("qk", dtype=torch.float64)
    monkeypatch.setenv("COORKERN_BACKEND", "triton")
    calls = []
    original = ca_launch._triton_forward
    monkeypatch.setattr(ca_launch, "_triton_forward", lambda *a: calls.append(1) or original(*a))
    coorkern.coor_attention(q, k, v, coords)
    assert calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_auto_rule(monkeypatch, dtype):
    """What ``auto`` runs on CUDA (cuda_attention_path): the H200 measurement's choice, and
    the two cases the grid_sample + SDPA composition cannot serve."""
    monkeypatch.delenv(ca.CUDA_ATTENTION_ENV, raising=False)
    assert ca.cuda_attention_path(dtype) == "aten"
    assert ca.cuda_attention_path(torch.float64) == "triton"  # SDPA's math kernel is N x N
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert ca.cuda_attention_path(dtype) == "triton"  # grid_sample's CUDA backward has atomics
    finally:
        torch.use_deterministic_algorithms(previous)
    for forced in ("triton", "aten", " Triton "):
        monkeypatch.setenv(ca.CUDA_ATTENTION_ENV, forced)
        assert ca.cuda_attention_path(torch.float64) == forced.strip().lower()
    monkeypatch.setenv(ca.CUDA_ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="COORKERN_CUDA_ATTENTION.*'flash'"):
        ca.cuda_attention_path(dtype)


def test_cuda_auto_rule_traces_without_graph_breaks():
    """torch.compile(fullgraph=True) of the CUDA auto path's Python: the rule (environment,
    deterministic flag) and the composition trace into one graph (dynamo only, on CPU)."""
    torch._dynamo.reset()
    q, k, v, coords = make_inputs("qk", dtype=torch.float32)

    def auto_path(q, k, v, coords):
        if ca.cuda_attention_path(q.dtype) == "aten":
            return reference.grid_sample_sdpa(q, k, v, coords, attention_dtype=q.dtype)
        return q.sum()

    out = torch.compile(auto_path, fullgraph=True, backend="eager")(q, k, v, coords)
    torch.testing.assert_close(out, reference.coor_attention(q, k, v, coords), rtol=0, atol=0)


@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_grid_sample_sdpa_in_half_precision(sample, monkeypatch):
    """The composition ``auto`` runs on CUDA: sampling in float32, attention in bf16, against
    the float64 oracle on the same rounded inputs; with its default dtype it is the oracle."""
    q, k, v, coords = make_inputs(sample, n=33, nq=21, d=16, hw=(6, 7), dtype=torch.bfloat16, per_head=True)
    coords = coords.float()

    def composition(*inputs, **kw):
        return reference.grid_sample_sdpa(*inputs, attention_dtype=torch.bfloat16, **kw)

    grid_dtypes, sdpa_dtypes = [], []
    grid_sample, sdpa = reference.F.grid_sample, reference.F.scaled_dot_product_attention
    monkeypatch.setattr(reference.F, "grid_sample", lambda x, grid, **kw: grid_dtypes.append(grid.dtype)
                        or grid_sample(x, grid, **kw))
    monkeypatch.setattr(reference.F, "scaled_dot_product_attention", lambda *t, **kw: sdpa_dtypes.append(
        {x.dtype for x in t}) or sdpa(*t, **kw))
    inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v, coords)]
    out = composition(*inputs, sample=sample)
    # A bf16 grid would move the sampling points (by half a pixel on a 128-wide map).
    assert grid_dtypes == [torch.float32, torch.float32] and sdpa_dtypes == [{torch.bfloat16}]
    monkeypatch.undo()
    go = torch.randn(out.shape, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, inputs, go)
    ref_out, ref_grads, _ = run("oracle", *(t.double() for t in (q, k, v, coords)), grad_out=go.double(),
                                sample=sample)
    assert_close_to_oracle(out, grads, ref_out, ref_grads, (q, k, v, coords), 3e-2)
    exact = [t.double() for t in (q, k, v, coords)]
    torch.testing.assert_close(reference.grid_sample_sdpa(*exact, sample=sample),
                               reference.coor_attention(*exact, sample=sample), rtol=0, atol=0)


def test_schemas_match_csrc():
    with open(os.path.join(ROOT, "csrc", "ops", "coor_attention.cpp")) as f:
        text = re.sub(r'"\s*\n\s*"', "", f.read())  # join adjacent C++ string literals
    for schema in ca.SCHEMAS.values():
        assert f'"{schema}"' in text, schema


def _op_args(sample):
    q, k, v, coords = make_inputs(sample, heads=2, n=7, nq=5, dtype=torch.float32)
    return [t.requires_grad_(True) for t in (q, k, v, coords)]


@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_opcheck(sample):
    opcheck_forward_and_backward(*_op_args(sample), sample, align_corners=True)


@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_torch_compile_fullgraph_cpp(sample):
    if not coorkern.cpp_available():
        pytest.skip("C++ extension not built: torch.compile traces the C++ op on CPU")
    torch._dynamo.reset()
    q, k, v, coords = _op_args(sample)

    def fn(q, k, v, coords):
        return coorkern.coor_attention(q, k, v, coords, sample=sample) * 2.0

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with coorkern.backend("cpp"):
        out = compiled(q, k, v, coords)
        grads = torch.autograd.grad(out.sum(), (q, k, v, coords))
    ref = reference.coor_attention(q, k, v, coords, sample=sample) * 2.0
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v, coords))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Bad input


def _bad_cases():
    q, k, v, c = make_inputs("qk", dtype=torch.float32)
    qt = torch.randn(1, 2, 5, 16)
    return [
        (dict(sample="qv"), ValueError, "sample must be one of"),
        (dict(q=q[0]), ValueError, r"q must have shape \(B, heads, H, W, d\)"),
        (dict(v=v[0]), ValueError, r"v must have shape \(B, heads, N, d\)"),
        (dict(k=torch.randn(1, 3, 4, 5, 16)), ValueError, "k must match q in batch, heads and d"),
        (dict(v=torch.randn(1, 2, 7, 8)), ValueError, "v must match q in batch, heads and d"),
        (dict(k=torch.randn(2, 2, 4, 5, 16)), ValueError, "k must match q"),
        (dict(coords=c[..., :1]), ValueError, r"coords must have shape \(B, N, 2\)"),
        (dict(coords=c[0]), ValueError, r"coords must have shape \(B, N, 2\)"),
        (dict(coords=torch.rand(1, 3, 7, 2)), ValueError, "coords must have shape"),
        (dict(coords=torch.rand(1, 6, 2)), ValueError, r"v must have shape \(B, heads, N=6, d\)"),
        (dict(coords=torch.zeros(1, 7, 2, dtype=torch.int64)), TypeError, "coords must have a floating dtype"),
        (dict(q=q.to(torch.int32)), TypeError, "q must have a floating dtype"),
        (dict(v=v.double()), TypeError, "q, k and v must have the same dtype"),
        (dict(k=k.tolist()), TypeError, "k must be a torch.Tensor"),
        (dict(coords=c.to("meta")), ValueError, "same device"),
        (dict(scale=float("nan")), ValueError, "scale must be finite"),
        (dict(align_corners=1), TypeError, "align_corners must be a bool"),
        (dict(sample="kv"), ValueError, r"q must have shape \(B, heads, Nq, d\)"),
        (dict(sample="kv", q=qt, v=v), ValueError, r"v must have shape \(B, heads, H, W, d\)"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input(case):
    q, k, v, c = make_inputs("qk", dtype=torch.float32)
    changes, exc, message = _bad_cases()[case]
    args = dict(q=q, k=k, v=v, coords=c, sample="qk", scale=None, align_corners=True)
    args.update(changes)
    with pytest.raises(exc, match=message):
        coorkern.coor_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("coords"), **args)


def test_module_rejects_bad_sample():
    with pytest.raises(ValueError, match="sample must be one of"):
        coorkern.CoorAttention(sample="q")


# ---------------------------------------------------------------------------
# GPU compilation (no GPU needed): sm_80 and sm_90, no LOCAL spills, HGMMA on sm_90

_COMPILE_SCRIPT = r"""
import json, re, sys
import torch
from coorkern.ops._aot.compiler import CompileRequest, compile_many
from coorkern.ops.coor_attention import aot as ca_aot, launch as ca_launch

TY = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
requests, labels = [], []
for name, dtype, d, extra in json.loads(sys.argv[1]):
    all_candidates = extra.pop("candidates", False)
    for arch in (80, 90):
        configs = [None]
        if all_candidates:  # every autotuning candidate of this variant
            configs = ca_launch.candidates(name, d, TY[dtype], extra.get("precision", "tf32"), arch)
        for config in configs:
            # aot_spec names the arguments a launch with contiguous inputs marks divisible by
            # 16 (tt.divisibility), so this compiles the variant a GPU runs.
            fn, signature, constexprs, cfg, divisible = ca_aot.aot_spec(name, TY[dtype], d, arch=arch, config=config,
                                                                    **extra)
            requests.append(CompileRequest(fn, signature, constexprs, arch, cfg["num_warps"], cfg["num_stages"],
                                           with_sass=True, divisible=divisible))
            labels.append(dict(name=name, dtype=dtype, d=d, extra=extra, arch=arch, config=cfg))
results = []
for label, rep in zip(labels, compile_many(requests)):
    minmax = re.findall(r"\b(?:max|min)(?:\.\w+)*\.f(?:32|64)\b", rep.ptx)
    results.append(dict(label, registers=rep.registers, local=rep.local_bytes, stack=rep.stack_bytes,
                        hgmma=rep.count("HGMMA"), hmma=rep.count("HMMA"), dmma=rep.count("DMMA"),
                        ffma=rep.count("FFMA"), minmax=sorted(set(minmax)),
                        setp_nan=len(re.findall(r"setp\.nan", rep.ptx))))
print("RESULTS" + json.dumps(results))
"""

COMPILE_CASES = [  # every kernel; the register-heaviest variants (d = 128, fp32, fp64) included
    ("fwd", "bf16", 64, {"candidates": True}),
    ("fwd", "bf16", 128, {}),
    ("fwd", "fp16", 32, {}),
    ("fwd", "fp32", 128, {}),
    ("fwd", "fp32", 64, {"precision": "ieee"}),
    ("fwd", "fp32", 128, {"precision": "ieee"}),
    ("fwd", "fp64", 128, {}),
    ("dkv", "bf16", 64, {"candidates": True}),
    ("dkv", "bf16", 128, {}),
    ("dkv", "fp32", 128, {"sample": "kv"}),
    ("dkv", "fp32", 64, {"precision": "ieee"}),
    ("dkv", "fp32", 128, {"precision": "ieee"}),
    ("dkv", "fp64", 128, {}),
    ("dq", "bf16", 64, {"candidates": True}),
    ("dq", "fp16", 128, {"sample": "kv"}),
    ("dq", "fp32", 128, {}),
    ("dq", "fp32", 64, {}),
    ("dq", "fp32", 128, {"precision": "ieee"}),
    ("dq", "fp64", 128, {}),
    ("sample", "bf16", 128, {}),
    ("sample", "fp32", 128, {}),
    ("sample", "fp64", 64, {}),
    ("scatter", "fp32", 64, {"deterministic": False}),
    ("scatter", "bf16", 128, {"deterministic": False, "add_dc": True}),
    ("scatter", "fp32", 32, {"deterministic": True}),
    ("scatter", "fp64", 128, {"align_corners": False}),
    ("rowdot", "bf16", 128, {}),
    ("rowdot", "fp64", 128, {}),
]


@pytest.fixture(scope="module")
def compiled_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(COMPILE_CASES)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS")][-1]
    return json.loads(line[len("RESULTS"):])


def test_every_kernel_compiles_for_sm80_sm90_without_spills(compiled_kernels):
    assert {r["name"] for r in compiled_kernels} == {"fwd", "dkv", "dq", "sample", "scatter", "rowdot"}
    assert len(compiled_kernels) >= 2 * len(COMPILE_CASES)
    assert {(r["dtype"], r["extra"].get("precision")) for r in compiled_kernels if r["name"] == "dq"} >= {
        ("fp32", "ieee"), ("fp32", None), ("fp64", None), ("bf16", None)}
    for r in compiled_kernels:
        # cuobjdump reports register spills of Triton kernels under STACK (LOCAL stays 0)
        assert r["local"] == 0 and r["stack"] == 0, r
        assert 0 < r["registers"] <= 255, r


def test_coordinate_clamp_keeps_nan_in_ptx(compiled_kernels):
    # NaN coordinates must survive the clamp: min.f32/max.f32 return the other operand for
    # a NaN (the GPU would sample zeros); min.NaN/max.NaN propagate it.  fp64 has no .NaN
    # variant: Triton selects NaN explicitly (setp.nan).
    for r in compiled_kernels:
        if r["name"] in ("sample", "scatter"):
            if r["dtype"] == "fp64":
                assert r["setp_nan"] > 0, r
            else:
                assert r["minmax"] and all(".NaN." in op for op in r["minmax"]), r


def test_dot_kernels_use_tensor_cores(compiled_kernels):
    for r in compiled_kernels:
        if r["name"] not in ("fwd", "dkv", "dq"):
            continue
        if r["dtype"] == "fp64":
            assert r["dmma"] > 0, r  # fp64 tensor cores on sm_80 and sm_90
        elif r["extra"].get("precision") == "ieee":
            assert r["ffma"] > 0 and r["hgmma"] == r["hmma"] == 0, r  # exact fp32: FMA units
        elif r["arch"] == 90:
            assert r["hgmma"] > 0, r
        else:
            assert r["hmma"] > 0, r  # sm_80: mma.sync tensor cores


# ---------------------------------------------------------------------------
# NaN coordinates, the fp32 precision API, launch geometry and count, the
# deterministic path.  (The same checks on a GPU: test_cuda_coor_attention.py.)


def _kernels():
    return [name for name in dir(ca_launch) if name.endswith("_kernel")]


class _KernelSpy:
    """Stands in for a @triton.jit kernel: records (name, grid, constexpr kwargs) of each
    launch, then launches the real kernel (``launch=False``: records only)."""

    def __init__(self, name, kernel, log, launch=True):
        self.name, self.kernel, self.log, self.launch = name, kernel, log, launch

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, tuple(grid), kwargs))
            if self.launch:
                with _disable_current_modes():
                    self.kernel[grid](*args, **kwargs)
        return launch


def _spy_kernels(monkeypatch, launch=True):
    log = []
    for name in _kernels():
        monkeypatch.setattr(ca_launch, name, _KernelSpy(name, getattr(ca_launch, name), log, launch))
    return log


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on NaN arithmetic
@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_nan_coordinates_give_nan_like_grid_sample(sample):
    # grid_sample samples NaN at a NaN coordinate; a NaN key poisons its head's softmax.
    # A clamp that drops NaN (min/max without NaN propagation) samples zeros instead.
    q, k, v, coords = make_inputs(sample, heads=3, n=6, nq=4, per_head=True, dtype=torch.float32)
    coords[0, 1, 2, 0] = float("nan")  # head 1: one NaN x
    coords[0, 2, 4, 1] = float("nan")  # head 2: one NaN y
    with coorkern.backend("triton"):
        out = coorkern.coor_attention(q, k, v, coords, sample=sample)
    # float64: SDPA's math backend (its fused CPU kernel turns an all-NaN row into zeros)
    ref = reference.coor_attention(q.double(), k.double(), v.double(), coords.double(), sample=sample)
    assert ref[0, 1:].isnan().all() and not ref[0, 0].isnan().any()
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-5, equal_nan=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("align_corners", [True, False])
def test_sample_kernel_nan_matches_grid_sample(align_corners):
    fmap = torch.randn(1, 2, 4, 5, 8, dtype=torch.float64)
    # (inf is left out: grid_sample's CPU kernel gives NaN there, while this kernel clamps it
    # outside the map and samples zeros; its CUDA kernel's answer was not checked)
    coords = torch.tensor([[[float("nan"), 0.2], [0.1, float("nan")], [0.3, -0.4], [float("nan")] * 2,
                            [1.0, 1.0], [5.0, -0.5]]], dtype=torch.float64)
    out = ca_launch._sample_tokens(fmap, coords, align_corners)
    grid = coords[:, None].expand(1, 1, 6, 2)
    for h in range(2):
        ref = torch.nn.functional.grid_sample(fmap[:, h].permute(0, 3, 1, 2), grid, align_corners=align_corners)
        ref = ref[0, :, 0].t()  # (N, d)
        torch.testing.assert_close(out[0, h], ref, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert out[0, :, :2].isnan().all() and out[0, :, 3].isnan().all()


_NEW_PRECISION_API = hasattr(torch.backends, "fp32_precision") and hasattr(torch.backends.cuda.matmul, "fp32_precision")


@pytest.mark.skipif(not _NEW_PRECISION_API, reason="this torch has no fp32_precision API")
def test_fp32_precision_api_is_read_first():
    legacy = torch.get_float32_matmul_precision()
    saved = torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    q, k, v, coords = make_inputs("qk", dtype=torch.float32)
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # the new API after the legacy one
        assert ca_launch._precision(torch.float32) == "tf32"
        with coorkern.backend("triton"):  # once raised in _precision
            out = coorkern.coor_attention(q, k, v, coords)
        torch.testing.assert_close(out, reference.coor_attention(q, k, v, coords), rtol=1e-4, atol=1e-5)
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert ca_launch._precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.fp32_precision = "none"  # inherits the generic setting
        torch.backends.fp32_precision = "tf32"
        assert ca_launch._precision(torch.float32) == "tf32"
        torch.backends.fp32_precision = "none"
        torch.set_float32_matmul_precision("high")  # legacy only
        assert ca_launch._precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert ca_launch._precision(torch.float32) == "ieee"
        assert ca_launch._precision(torch.bfloat16) == ca_launch._precision(torch.float64) == "ieee"
    finally:
        torch.set_float32_matmul_precision(legacy)
        torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


def test_scale_travels_as_two_fp32_halves():
    # Triton's launcher passes Python floats as fp32: fp64 kernels rebuild the scale from
    # two fp32 values; both must be exactly representable and sum to the scale to ~2^-48.
    import struct

    for scale in (48 ** -0.5, 0.7, 1 / 3, 1e-3 / 7):
        hi, lo = ca_launch._split(scale)
        for part in (hi, lo):
            assert struct.unpack("f", struct.pack("f", part))[0] == part
        assert abs((hi + lo) - scale) <= 2.0 ** -47 * scale
    _, signature, _, _, _ = ca_aot.aot_spec("fwd", torch.float64, 64)
    assert signature["scale_hi"] == signature["scale_lo"] == "fp32"


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_path_is_taken_only_when_asked(monkeypatch, deterministic):
    # The interpreter runs atomics one at a time, so bit-identical reruns cannot tell the
    # two scatter paths apart: check which one the launcher takes.
    log = _spy_kernels(monkeypatch)
    q, k, v, coords = make_inputs("qk", heads=2, n=9, d=16, hw=(3, 3))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        assert_matches("triton", q, k, v, coords, 1e-10, sample="qk")
    finally:
        torch.use_deterministic_algorithms(previous)
    flags = [kw["DETERMINISTIC"] for name, _, kw in log if name == "_scatter_kernel"]
    assert flags == [deterministic, deterministic]


@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_grid_is_one_dimensional_beyond_65535_heads(monkeypatch, sample):
    # B * heads = 70000 > 65535 (CUDA's cap on grid axes 1 and 2): every launch, forward
    # and backward, must put all programs on axis 0.  Launches are recorded, not run.
    log = _spy_kernels(monkeypatch, launch=False)
    batch, heads, n, d = 7000, 10, 3, 16
    q, k, v, coords = make_inputs(sample, batch=batch, heads=heads, n=n, nq=2, d=d, hw=(1, 2),
                                  dtype=torch.float32)
    out, lse = ca_launch._triton_forward(q, k, v, coords, sample, 0.25, True)
    ca_launch._triton_backward(torch.ones_like(out), q, k, v, coords, out, lse, sample, 0.25, True)
    assert {name for name, _, _ in log} == set(_kernels())
    for name, grid, kw in log:
        assert len(grid) == 1 and 0 < grid[0] < 2 ** 31, (name, grid)
        if name in ("_sample_kernel", "_scatter_kernel"):
            assert grid[0] == batch * heads * -(-n // kw["BLOCK"]), (name, grid)


def _count_launches(monkeypatch, fn):
    """(triton kernels, torch ops that launch a kernel) run by fn()."""
    log = _spy_kernels(monkeypatch)
    free = {"empty", "empty_strided", "empty_like", "view", "_unsafe_view", "as_strided", "detach", "alias", "t",
            "transpose", "permute", "expand", "slice", "select", "unsqueeze", "squeeze", "reshape", "lift_fresh"}

    class Ops(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            bodies = {"coor_attention_triton": ca._triton_op_forward,
                      "coor_attention_triton_backward": ca._triton_op_backward}
            handled, result = run_triton_op_body(self, func, args, kwargs, bodies)
            if handled:
                return result
            name = func.overloadpacket.__name__
            result = func(*args, **(kwargs or {}))
            # (Inside the triton_op, "to" reaches the mode undecomposed; a no-op one returns self.)
            if name not in free and not (name == "to" and result is args[0]):
                Ops.ops.append(name)
            return result

    Ops.ops = []
    with Ops():
        fn()
    return [name for name, _, _ in log], Ops.ops


@pytest.mark.parametrize("dtype,per_head,deterministic,fwd,bwd", [
    (torch.bfloat16, True, False, 3, 11), (torch.float32, True, False, 3, 9),
    (torch.float32, False, False, 3, 10), (torch.bfloat16, True, True, 3, 13),
])
def test_launch_counts(monkeypatch, dtype, per_head, deterministic, fwd, bwd):
    # The backward was once 16-17 launches (bf16; 22-23 deterministic): delta
    # from 4 torch ops, a zero-filled map buffer on the deterministic path, casts, adds,
    # the grad of lse materialized.  Counted on the interpreter: triton kernels + torch ops.
    q, k, v, coords = make_inputs("qk", heads=2, n=9, d=16, dtype=dtype, per_head=per_head)
    coords = coords.float()
    inputs = [t.requires_grad_(True) for t in (q, k, v, coords)]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        with coorkern.backend("triton"):
            result = {}
            kernels, ops = _count_launches(monkeypatch, lambda: result.setdefault(
                "out", coorkern.coor_attention(*inputs, sample="qk")))
            assert kernels == ["_sample_kernel", "_sample_kernel", "_attn_fwd_kernel"] and not ops
            assert len(kernels) + len(ops) == fwd
            go = torch.randn_like(result["out"])
            kernels, ops = _count_launches(monkeypatch, lambda: torch.autograd.grad(result["out"], inputs, go))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert "_row_dot_kernel" in kernels and "_local_scalar_dense" not in ops, (kernels, ops)
    assert len(kernels) + len(ops) == bwd, (kernels, ops)


@pytest.mark.parametrize("sample,align_corners", [("kv", True), ("qk", False)])
def test_cuda_entry_points_enter_the_tensors_device(monkeypatch, sample, align_corners):
    # Triton launches on the current device: the CUDA kernels of both ops must make the
    # inputs' device current (cuda:1 tensors while cuda:0 is current).  Recorded here with
    # CPU tensors through the interpreter; the CUDA test runs it on two GPUs.  And they run
    # the attention asked for (float64 against the oracle).
    # The opaque ops' CUDA kernels and the triton_op bodies alike.
    entered = []

    @contextlib.contextmanager
    def guard(tensor):
        entered.append(tensor.device)
        yield

    monkeypatch.setattr(ca, "device_guard", guard)
    direct = []
    launch = ca_launch._launch
    monkeypatch.setattr(ca_launch, "_launch", lambda *a, **k: direct.append(_host._direct.active) or launch(*a, **k))
    q, k, v, coords = make_inputs(sample, align_corners=align_corners)
    inputs = [t.detach().requires_grad_(True) for t in (q, k, v, coords)]
    expected = reference.coor_attention(*inputs, sample=sample, scale=0.25, align_corners=align_corners)
    for forward, backward in ((ca._direct_forward, ca._direct_backward), (ca._triton_op_forward, ca._triton_op_backward)):
        entered.clear()
        direct.clear()
        out, lse = forward(q, k, v, coords, sample, 0.25, align_corners)
        go = torch.randn_like(out)
        grads = backward(go, q, k, v, coords, out, lse, sample, 0.25, align_corners)
        assert entered == [q.device, q.device]
        # Directly launched outside the triton_op (real tensors only), by wrap_triton's rule inside.
        assert set(direct) == {forward is ca._direct_forward}, direct
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
        for name, actual, want in zip("qkvc", grads, torch.autograd.grad(expected, inputs, go, retain_graph=True)):
            torch.testing.assert_close(actual, want, rtol=1e-9, atol=1e-11, msg=name)


def test_device_guard_enters_cuda_devices_only(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda dev: entered.append(dev) or contextlib.nullcontext())
    with ca.device_guard(torch.zeros(1)):
        pass
    assert entered == []
    cuda_tensor = type("CudaTensor", (), {"device": torch.device("cuda", 1)})()
    with ca.device_guard(cuda_tensor):
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.parametrize("api,legacy,expected", [
    ({}, "highest", "ieee"),  # torch < 2.9: no fp32_precision anywhere (nor torch.backends.cuda)
    ({}, "high", "tf32"),
    ({"cuda": {}}, "highest", "ieee"),  # torch.backends.cuda without matmul
    ({"cuda": {"matmul": {}}}, "medium", "tf32"),  # matmul without fp32_precision
    ({"cuda": {"matmul": {"fp32_precision": "none"}}, "fp32_precision": "none"}, "highest", "ieee"),  # not set
    ({"cuda": {"matmul": {"fp32_precision": None}}}, "high", "tf32"),
    ({"cuda": {"matmul": {"fp32_precision": "none"}}, "fp32_precision": "ieee"}, "high", "ieee"),  # global only
    ({"cuda": {"matmul": {"fp32_precision": "none"}}, "fp32_precision": "tf32"}, "highest", "tf32"),
    ({"cuda": {"matmul": {"fp32_precision": "ieee"}}, "fp32_precision": "tf32"}, "high", "ieee"),  # matmul wins
    ({"cuda": {"matmul": {"fp32_precision": "tf32"}}}, "highest", "tf32"),
    ({"cuda": {"matmul": {"fp32_precision": "none"}}}, RuntimeError, "ieee"),  # mixed settings: torch refuses
])
def test_fp32_matmul_precision_on_every_torch_api(monkeypatch, api, legacy, expected):
    """The new API (torch.backends[.cuda.matmul].fp32_precision) where set, else the legacy
    setting, on torch versions with and without each attribute (a stand-in torch module)."""
    from types import SimpleNamespace

    def namespace(attrs):
        return SimpleNamespace(**{k: namespace(v) if isinstance(v, dict) else v for k, v in attrs.items()})

    def get_legacy():
        if legacy is RuntimeError:
            raise RuntimeError("mixed legacy and new fp32 precision settings")
        return legacy

    monkeypatch.setattr(ca_launch, "torch", SimpleNamespace(backends=namespace(api), get_float32_matmul_precision=get_legacy))
    assert ca_launch.fp32_matmul_precision() == expected


@pytest.mark.parametrize("sample,align_corners", [("qk", True), ("kv", False)])
def test_fallback_kernels_match_the_cpp_ops(sample, align_corners):
    """The ops' CPU kernels without the C++ extension (the eager reference and its autograd)
    give the C++ ops' output and gradients; their lse has the C++ lse's shape and dtype (it is
    not used: the fallback backward recomputes)."""
    if not coorkern.cpp_available():
        pytest.skip("C++ extension not built")
    q, k, v, coords = make_inputs(sample, align_corners=align_corners, per_head=True)
    out, lse = torch.ops.coorkern.coor_attention(q, k, v, coords, sample, 0.3, align_corners)
    ref_out, ref_lse = ca._reference_forward(q, k, v, coords, sample, 0.3, align_corners)
    torch.testing.assert_close(ref_out, out, rtol=1e-10, atol=1e-12)
    assert (ref_lse.shape, ref_lse.dtype) == (lse.shape, lse.dtype)
    go = torch.randn_like(out)
    expected = torch.ops.coorkern.coor_attention_backward(go, q, k, v, coords, out, lse, sample, 0.3, align_corners)
    actual = ca._reference_backward(go, q, k, v, coords, ref_out, ref_lse, sample, 0.3, align_corners)
    for name, a, e in zip("qkvc", actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11, msg=name)
        assert a.is_contiguous(), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fallback_lse_has_the_declared_dtype(dtype):
    """The fallback forward's lse is in the accumulation dtype (fp32 for bf16 inputs), as the
    op's fake kernel declares -- not the inputs' dtype."""
    q, k, v, coords = make_inputs("qk", dtype=dtype)
    _, lse = ca._reference_forward(q, k, v, coords, "qk", 0.3, True)
    _, declared = torch.ops.coorkern.coor_attention(*(t.to("meta") for t in (q, k, v, coords)), "qk", 0.3, True)
    assert lse.dtype == declared.dtype == torch.float32 and lse.shape == declared.shape


# ---------------------------------------------------------------------------
# torch.library.triton_op path: the Python API's way to the Triton kernels


def _oracle_and_grads(q, k, v, coords, go, sample, scale, align_corners):
    inputs = [t.detach().requires_grad_(True) for t in (q, k, v, coords)]
    out = reference.coor_attention(*inputs, sample=sample, scale=scale, align_corners=align_corners)
    return out, torch.autograd.grad(out, inputs, go)


@pytest.mark.skipif(not ca.HAS_TRITON_OP, reason="torch.library.triton_op needs torch >= 2.6")
@pytest.mark.parametrize("sample,per_head", [("qk", False), ("kv", True)])
def test_triton_op_schema_autograd_and_values(sample, per_head):
    """coorkern::coor_attention_triton[_backward] have the opaque ops' schemas, run the kernels
    (interpreter), mark lse non-differentiable and give the oracle's values and gradients."""
    for name, op in (("coor_attention", torch.ops.coorkern.coor_attention_triton),
                     ("coor_attention_backward", torch.ops.coorkern.coor_attention_triton_backward)):
        assert str(op.default._schema).split("(", 1)[1] == ca.SCHEMAS[name].split("(", 1)[1]  # arguments, returns
    q, k, v, coords = (t.requires_grad_(True) for t in make_inputs(sample, per_head=per_head, n=9, nq=6))
    launched = []
    with _spied_launches(launched):
        out, lse = torch.ops.coorkern.coor_attention_triton(q, k, v, coords, sample, 0.3, False)
    assert out.requires_grad and not lse.requires_grad
    go = torch.randn_like(out)
    with _spied_launches(launched):
        grads = torch.autograd.grad(out, (q, k, v, coords), go, retain_graph=True)
    assert "_attn_fwd_kernel" in launched and "_attn_bwd_dq_kernel" in launched
    expected, expected_grads = _oracle_and_grads(q, k, v, coords, go, sample, 0.3, False)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for label, actual, want in zip("qkvc", grads, expected_grads):
        torch.testing.assert_close(actual, want, rtol=1e-9, atol=1e-11, msg=label)
    # Only the saved lse is non-differentiable: a loss on out alone needs no grad of it.
    assert torch.autograd.grad(out.sum(), q)[0].shape == q.shape


@contextlib.contextmanager
def _spied_launches(names):
    launch = ca_launch._launch

    def spy(kernel, grid, *args, **meta):
        names.append(kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel))
        return launch(kernel, grid, *args, **meta)

    ca_launch._launch = spy
    try:
        yield
    finally:
        ca_launch._launch = launch


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("has_triton_op", [True, False])
def test_python_api_reaches_the_kernels(monkeypatch, has_triton_op, traced):
    """Eager calls on plain tensors take the autograd.Function (launches not wrapped); under a
    dispatch mode (tracing) the triton_op where torch has it (torch >= 2.6), else the
    autograd.Function on CPU -- the Triton kernels every way, equal to the oracle."""
    called, direct = spy_routes(monkeypatch, ca, ca_launch, has_triton_op)
    q, k, v, coords = (t.requires_grad_(True) for t in make_inputs("qk", n=6))
    launched = []
    with coorkern.backend("triton"), _spied_launches(launched), (PassThroughMode() if traced else contextlib.nullcontext()):
        out = coorkern.coor_attention(q, k, v, coords, sample="qk", scale=0.5)
        grads = torch.autograd.grad(out, (q, k, v, coords), torch.ones_like(out))
    assert called == (["triton_op"] if traced and has_triton_op else ["function"])
    assert set(direct) == {called == ["function"]}, direct  # the Function's launches are direct
    assert {"_sample_kernel", "_attn_fwd_kernel", "_attn_bwd_dkv_kernel", "_scatter_kernel"} <= set(launched)
    expected, expected_grads = _oracle_and_grads(q, k, v, coords, torch.ones_like(out), "qk", 0.5, True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for label, actual, want in zip("qkvc", grads, expected_grads):
        torch.testing.assert_close(actual, want, rtol=1e-9, atol=1e-11, msg=label)


@pytest.mark.parametrize("not_plain", ["q", "k", "v", "coords"])
def test_route_needs_every_tensor_plain(monkeypatch, not_plain):
    """One tensor that is not a plain CPU/CUDA tensor (a meta one here) sends the call to the
    traced path (the triton_op), whichever argument it is."""
    calls = []
    monkeypatch.setattr(ca._TritonEager, "apply", lambda *a: calls.append("function"))
    monkeypatch.setattr(ca, "HAS_TRITON_OP", True)
    monkeypatch.setattr(ca, "_triton_fwd_op", lambda *a: calls.append(("triton_op", a)), raising=False)
    plain = dict(zip(("q", "k", "v", "coords"), make_inputs("kv")))
    tensors = {name: t.to("meta") if name == not_plain else t for name, t in plain.items()}
    ca._triton_apply(*tensors.values(), "kv", 0.7, False)
    assert calls == [("triton_op", (*tensors.values(), "kv", 0.7, False))]
    calls.clear()
    ca._triton_apply(*plain.values(), "kv", 0.7, False)
    assert calls == ["function"]


def test_cuda_path_without_triton_op_calls_the_registered_op(monkeypatch):
    """torch 2.4/2.5 on a GPU: coorkern::coor_attention (whose CUDA kernel launches the Triton
    kernels) gets every argument; meta tensors stand in for CUDA ones."""
    monkeypatch.setattr(ca, "HAS_TRITON_OP", False)
    calls = []
    monkeypatch.setattr(ca, "_op", lambda *args: calls.append(args) or (args[0], args[0]))
    q, k, v, coords = (t.to("meta") for t in make_inputs("kv"))
    ca._triton_apply(q, k, v, coords, "kv", 0.7, False)
    assert calls == [(q, k, v, coords, "kv", 0.7, False)]


def test_kernel_layout_reads_alignment_without_a_data_pointer():
    """The triton_op is traced with fake tensors (no data pointer): alignment comes from the
    storage offset -- 16-byte aligned views are kept, others copied."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    base = torch.randn(3, 40, 16)
    assert ca_launch._kernel_layout(base[1:]) is base[1:] or ca_launch._kernel_layout(base[1:]).data_ptr() == base[1:].data_ptr()
    shifted = base.view(-1)[1:1 + 2 * 40 * 16].view(2, 40, 16)  # contiguous, 4 bytes off alignment
    copy = ca_launch._kernel_layout(shifted)
    assert shifted.data_ptr() % 16 and copy.data_ptr() % 16 == 0 and torch.equal(copy, shifted)
    narrow = base[:, :, :8]  # unit channel stride, but a row stride of 16 elements is kept...
    assert ca_launch._kernel_layout(narrow).data_ptr() == narrow.data_ptr()
    odd = torch.randn(3, 40, 12)[:, :, :8]  # ...and one of 12 copied
    assert ca_launch._kernel_layout(odd).stride() == (320, 8, 1)
    aligned = base.view(-1)[4:4 + 640].view(1, 40, 16)  # 4 float32 = 16 bytes in: kept
    assert ca_launch._kernel_layout(aligned).data_ptr() == aligned.data_ptr()
    permuted = torch.randn(3, 8, 40).transpose(1, 2)  # dense, channel stride 40: copied contiguous
    assert ca_launch._kernel_layout(permuted).stride() == (320, 8, 1) and torch.equal(ca_launch._kernel_layout(permuted), permuted)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(base)
        assert ca_launch._kernel_layout(fake[1:]).storage_offset() == 640
        assert ca_launch._kernel_layout(fake.view(-1)[1:1 + 640].view(1, 40, 16)).storage_offset() == 0
