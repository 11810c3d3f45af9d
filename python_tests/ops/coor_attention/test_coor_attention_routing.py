"""What coorkern.coor_attention runs for each backend, device and dtype (CPU only: CUDA
devices are passed as ``torch.device`` objects to the routing rule; the routes themselves run
on CPU tensors and are compared with the float64 oracle at non-default arguments)."""
from __future__ import annotations

import pytest
import torch

import coorkern
from coorkern import reference
from coorkern.ops._runtime import backend as _backend
from coorkern.ops.coor_attention import op as ca

from support.coor_attention_cases import make_inputs

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.mark.parametrize("requested,impl,device,dtype,route", [
    ("auto", "triton", CUDA, torch.bfloat16, "aten"),  # CUDA auto: grid_sample + SDPA ...
    ("auto", "triton", CUDA, torch.float32, "aten"),
    ("auto", "triton", CUDA, torch.float64, "triton"),  # ... except where they cannot serve
    ("triton", "triton", CUDA, torch.bfloat16, "triton"),  # forced
    ("auto", "triton", CPU, torch.float32, "triton"),  # the interpreter on CPU tensors
    ("auto", "cpp", CPU, torch.float32, "op"),
    ("cpp", "cpp", CPU, torch.bfloat16, "op"),
    ("reference", "reference", CUDA, torch.bfloat16, "reference"),
    ("auto", "reference", CPU, torch.float32, "reference"),  # no C++ extension
])
def test_route(monkeypatch, requested, impl, device, dtype, route):
    monkeypatch.delenv(ca.CUDA_ATTENTION_ENV, raising=False)
    with coorkern.backend(requested):
        assert ca._route(impl, device, dtype) == route


def test_route_follows_the_cuda_attention_switch(monkeypatch):
    monkeypatch.setenv(ca.CUDA_ATTENTION_ENV, "triton")
    assert ca._route("triton", CUDA, torch.bfloat16) == "triton"
    monkeypatch.setenv(ca.CUDA_ATTENTION_ENV, "aten")
    assert ca._route("triton", CUDA, torch.float64) == "aten"


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("route,target", [
    ("reference", (reference, "coor_attention")),
    ("aten", (reference, "grid_sample_sdpa")),
    ("triton", (ca, "_triton_apply")),
    ("op", (ca, "_op")),
])
def test_each_route_runs_its_implementation_with_every_argument(monkeypatch, route, target, align_corners):
    """Each route calls its implementation -- and only it -- with sample, scale and
    align_corners passed on ("kv", scale 0.3), against the oracle; the rule gets the inputs'
    device and dtype."""
    q, k, v, coords = make_inputs("kv", per_head=True, align_corners=align_corners)
    expected = reference.coor_attention(q, k, v, coords, sample="kv", scale=0.3, align_corners=align_corners)
    asked = []
    monkeypatch.setattr(ca, "_route", lambda impl, device, dtype: asked.append((device, dtype)) or route)
    called = []
    for module, name in [(reference, "coor_attention"), (reference, "grid_sample_sdpa"), (ca, "_triton_apply"),
                         (ca, "_op")]:
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original, _n=name, **kw: called.append(_n) or _o(*a, **kw))
    out = ca.coor_attention(q, k, v, coords, sample="kv", scale=0.3, align_corners=align_corners)
    assert asked == [(q.device, q.dtype)]
    assert called[0] == target[1]
    # The oracle runs grid_sample + SDPA inside (and is the op's fallback without the C++ extension).
    inner = {"reference": {"grid_sample_sdpa"},
             "op": set() if coorkern.cpp_available() else {"coor_attention", "grid_sample_sdpa"}}.get(route, set())
    assert set(called) - {target[1]} <= inner, called
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_an_unavailable_backend_names_the_op(monkeypatch):
    monkeypatch.setattr(_backend, "triton_interpreter_enabled", lambda: False)
    q, k, v, coords = make_inputs("qk")
    with coorkern.backend("triton"), pytest.raises(_backend.BackendUnavailableError,
                                                   match=r"^coorkern\.coor_attention: backend 'triton' needs CUDA"):
        coorkern.coor_attention(q, k, v, coords)


def test_the_aten_route_runs_sdpa_in_the_inputs_dtype(monkeypatch):
    """CUDA ``auto`` in bf16: grid_sample in float32, SDPA in bf16 (its flash kernel) -- not the
    float32 oracle's attention."""
    q, k, v, coords = make_inputs("qk", dtype=torch.bfloat16)
    monkeypatch.setattr(ca, "_route", lambda impl, device, dtype: "aten")
    out = ca.coor_attention(q, k, v, coords, scale=0.3)
    in_bf16 = reference.grid_sample_sdpa(q, k, v, coords, scale=0.3, attention_dtype=torch.bfloat16)
    in_fp32 = reference.grid_sample_sdpa(q, k, v, coords, scale=0.3)
    assert torch.equal(out, in_bf16) and not torch.equal(in_bf16.to(in_fp32.dtype), in_fp32)
