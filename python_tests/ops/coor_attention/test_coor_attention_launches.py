"""The attention's launches as a GPU would get them, recorded instead of run (CPU only).

Under the interpreter every kernel gets the same large blocks, so which config a launch asks
for, and on which device its buffers live, would go unchecked.  Here the interpreter is
switched off for the launch-config choice and the launches are recorded: each one must ask
``launch_config`` for its own kernel kind (sm_90, as on a machine without CUDA), cover its
rows with its grid, and get every tensor on the inputs' device (meta tensors, so a buffer
allocated on the default device shows).
"""
from __future__ import annotations

import inspect

import pytest
import torch

from coorkern.ops._runtime import backend as _backend
from coorkern.ops.coor_attention import aot as ca_aot, launch as ca_launch, op as ca

KINDS = {"_sample_kernel": "sample", "_scatter_kernel": "scatter", "_row_dot_kernel": "rowdot",
         "_attn_fwd_kernel": "fwd", "_attn_bwd_dkv_kernel": "dkv", "_attn_bwd_dq_kernel": "dq"}


@pytest.fixture
def launches(monkeypatch):
    log = []
    monkeypatch.setattr(_backend, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(ca_launch, "_launch", lambda kernel, grid, *args, **meta: log.append((kernel, grid, args, meta)))
    return log


def _inputs(sample, dtype, device, d=64, per_head=True):
    b, h, n, nq, hw = 2, 3, 70, 45, (6, 5)
    fmap = torch.empty(b, h, *hw, d, dtype=dtype, device=device)
    tokens = torch.empty(b, h, n if sample == "qk" else nq, d, dtype=dtype, device=device)
    q, k, v = (fmap, fmap.clone(), tokens) if sample == "qk" else (tokens, fmap, fmap.clone())
    # float64 coordinates: the kernels get them in the accumulation dtype, their gradient comes back in float64.
    coords = torch.empty(*((b, h) if per_head else (b,)), n, 2, dtype=torch.float64, device=device)
    return q, k, v, coords


def _forward_backward(q, k, v, coords, sample, deterministic=False, align_corners=True):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        out, lse = ca_launch._triton_forward(q, k, v, coords, sample, 0.125, align_corners)
        # A float32 incoming gradient whatever the inputs' dtype: the kernels get it cast.
        grad_out = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        return ca_launch._triton_backward(grad_out, q, k, v, coords, out, lse, sample, 0.125, align_corners)
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("sample", ["qk", "kv"])
@pytest.mark.parametrize("dtype,precision", [(torch.bfloat16, "ieee"), (torch.float32, "tf32"),
                                             (torch.float32, "ieee"), (torch.float64, "ieee")])
def test_every_launch_asks_for_its_kernels_config(launches, monkeypatch, sample, dtype, precision, deterministic):
    monkeypatch.setattr(ca_launch, "fp32_matmul_precision", lambda: precision)
    q, k, v, coords = _inputs(sample, dtype, "meta")  # no data: the launches are only recorded
    _forward_backward(q, k, v, coords, sample, deterministic)
    seen = set()
    for kernel, grid, args, meta in launches:
        kind = KINDS[kernel.fn.__name__]
        seen.add(kind)
        # The scatter accumulates in fp32 (fp64 for fp64 inputs); the others run in the inputs' dtype.
        kernel_dtype = torch.float32 if kind == "scatter" and dtype != torch.float64 else dtype
        expected = ca_launch.launch_config(kind, 64, kernel_dtype, precision, interpret=False, arch=90)
        # The attention passes take the whole config; the others its block and warps.
        keys = list(expected) if kind in ("fwd", "dkv", "dq") else ["BLOCK", "num_warps"]
        assert {key: meta.get(key) for key in keys} == {key: expected[key] for key in keys}, kind
    assert seen == set(KINDS.values())


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_every_buffer_is_on_the_inputs_device(launches, sample, per_head, deterministic):
    q, k, v, coords = _inputs(sample, torch.bfloat16, "meta", per_head=per_head)
    grads = _forward_backward(q, k, v, coords, sample, deterministic)
    assert launches
    for kernel, _, args, _ in launches:
        devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        assert devices == {"meta"}, (kernel.fn.__name__, devices)
    assert [(g.device.type, g.shape, g.dtype) for g in grads] == [
        ("meta", t.shape, t.dtype) for t in (q, k, v, coords)]


_TYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16,
          "i64": torch.int64}


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("sample", ["qk", "kv"])
@pytest.mark.parametrize("dtype,setting", [(torch.bfloat16, "tf32"), (torch.float16, "tf32"), (torch.float32, "tf32"),
                                           (torch.float32, "ieee"), (torch.float64, "tf32")])
def test_every_launch_matches_its_ahead_of_time_declaration(launches, monkeypatch, sample, dtype, setting,
                                                            deterministic):
    """The JIT launches pass what ``aot_spec`` declares (the signatures the C++ library's kernels
    and the spill tests are compiled with): a tensor of the declared dtype in every pointer
    slot (an unused slot still gets a tensor), ints and the fp32 scale halves, the constexprs.
    torch's fp32 matmul setting ("tf32" allowed) applies to fp32 dots only."""
    monkeypatch.setattr(ca_launch, "fp32_matmul_precision", lambda: setting)
    precision = setting if dtype == torch.float32 else "ieee"
    q, k, v, coords = _inputs(sample, dtype, "meta")
    _forward_backward(q, k, v, coords, sample, deterministic)
    for kernel, _, args, meta in launches:
        kind = KINDS[kernel.fn.__name__]
        call = {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")}
        bound = inspect.signature(kernel.fn).bind(*args, **call).arguments
        _, signature, constexprs, _, _ = ca_aot.aot_spec(
            kind, dtype, 64, precision=precision, sample=sample, deterministic=deterministic,
            align_corners=True, add_dc=bool(meta.get("ADD_DC", False)),
            config={k: v for k, v in meta.items() if k.startswith("BLOCK") and k != "BLOCK_D"})
        unused = ({"part_acc_ptr", "idx_idx_ptr"} if not deterministic else {"dm_acc_ptr"}) if kind == "scatter" else set()
        for name, declared in signature.items():
            value = bound[name]
            if declared.startswith("*"):
                assert isinstance(value, torch.Tensor), (kind, name, value)
                if name not in unused:
                    assert value.dtype == _TYPES[declared[1:]], (kind, name, value.dtype, declared)
            elif declared == "i32":
                assert isinstance(value, int) and not isinstance(value, bool), (kind, name, value)
            elif declared == "fp32":
                assert isinstance(value, float), (kind, name, value)
            else:  # every other slot is a constexpr, declared with the launch's value
                assert declared == "constexpr" and name in constexprs, (kind, name, declared)
                assert value == constexprs[name], (kind, name, value, constexprs[name])


def test_input_grads_without_an_incoming_gradient():
    """No gradient reached ``out`` (gradients are not materialized): none for the 7 inputs,
    and the backward is not run."""
    assert ca._input_grads(lambda *args: pytest.fail("backward ran"), None, None) == (None,) * 7


@pytest.mark.parametrize("sample", ["qk", "kv"])
def test_backward_while_traced_equals_eager(monkeypatch, sample):
    """Under torch.compile the backward hands the scatter a copy of the coordinates (see
    test_triton_op_tracing.py); the gradients are the same (interpreter, float64)."""
    from support.coor_attention_cases import make_inputs

    q, k, v, coords = make_inputs(sample, per_head=True)
    out, lse = ca_launch._triton_forward(q, k, v, coords, sample, 0.3, True)
    grad_out = torch.randn_like(out)
    eager = ca_launch._triton_backward(grad_out, q, k, v, coords, out, lse, sample, 0.3, True)
    monkeypatch.setattr(ca_launch, "tracing", lambda: True)
    traced = ca_launch._triton_backward(grad_out, q, k, v, coords, out, lse, sample, 0.3, True)
    for name, a, b in zip("qkvc", traced, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13, msg=name)


def test_attention_passes_ask_pick_with_their_key_and_launcher(launches, monkeypatch):
    """Each attention pass asks ``_launch.pick`` (the autotuner on CUDA) with its kind, d,
    dtype, precision and row count, and ``run(cfg)`` launches the pass with that config."""
    asked = []

    def pick(kind, d, dtype, precision, n, device, run):
        asked.append((kind, d, dtype, precision, n, device.type))
        cfg = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 2, "num_stages": 5}
        before = len(launches)
        run(cfg)  # what autotuning does with each candidate
        kernel, _, _, meta = launches[before]
        assert {k: meta[k] for k in cfg} == cfg and KINDS[kernel.fn.__name__] == kind
        return cfg

    monkeypatch.setattr(ca_launch, "pick", pick)
    monkeypatch.setattr(ca_launch, "fp32_matmul_precision", lambda: "ieee")
    q, k, v, coords = _inputs("kv", torch.float32, "meta")
    _forward_backward(q, k, v, coords, "kv")
    assert asked == [("fwd", 64, torch.float32, "ieee", 45, "meta"), ("dkv", 64, torch.float32, "ieee", 70, "meta"),
                     ("dq", 64, torch.float32, "ieee", 45, "meta")]


def test_every_launch_goes_through_launchable(monkeypatch):
    """The launcher asks ``launchable`` (wrap_triton on CUDA) with the inputs' device and the
    module's triton_op switch."""
    from support.coor_attention_cases import make_inputs

    calls = []
    original = ca_launch.launchable
    monkeypatch.setattr(ca_launch, "launchable", lambda kernel, device, wrap: calls.append((device, wrap)) or original(
        kernel, device, wrap))
    q, k, v, coords = make_inputs("qk", n=3)
    ca_launch._triton_forward(q, k, v, coords, "qk", 0.3, True)
    assert len(calls) == 3 and set(calls) == {(q.device, ca_launch.HAS_TRITON_OP)}


@pytest.mark.parametrize("name", ["fwd", "dq", "scatter", "sample"])
def test_aot_spec_defaults_and_dtype_names(name):
    """``aot_spec``'s defaults are the variant a GPU runs from Python (sm_90, "qk", not
    deterministic, align_corners, no added dcoords, 16-byte aligned; fp32 dots in tf32,
    others ieee), and a Triton dtype name means its torch dtype."""
    explicit = dict(arch=90, sample="qk", deterministic=False, align_corners=True, add_dc=False, aligned=True)

    def comparable(spec):
        kernel, signature, constexprs, config, divisible = spec
        return kernel, signature, {k: str(v) for k, v in constexprs.items()}, config, divisible

    for dtype, precision in ((torch.float32, "tf32"), (torch.bfloat16, "ieee")):
        default = comparable(ca_aot.aot_spec(name, dtype, 64))
        assert default == comparable(ca_aot.aot_spec(name, dtype, 64, precision=precision, **explicit))
        assert default == comparable(ca_aot.aot_spec(name, {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype], 64))
    *_, divisible = ca_aot.aot_spec(name, torch.float32, 64)
    *_, unaligned = ca_aot.aot_spec(name, torch.float32, 8, aligned=False)
    kernel, signature, *_ = ca_aot.aot_spec(name, torch.float32, 64)
    pointers = {p for p, t in signature.items() if t.startswith("*")}
    # The map and token strides are multiples of d; the coordinates' (s_c*) are not.
    strides = {p for p, t in signature.items() if t == "i32" and p.startswith("s_") and p[-1] != "d"
               and not p.startswith("s_c")}
    assert pointers and strides and set(unaligned) == pointers  # unaligned: the pointers only
    assert set(divisible) == pointers | strides | {"d"}  # aligned: d and the map/token strides too


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name", ["fwd", "dkv", "scatter", "rowdot"])
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float64, "ieee"),
                                             (torch.bfloat16, "ieee")])
def test_aot_spec_config_is_the_gpu_launch_config(name, dtype, precision, arch):
    _, _, constexprs, config, _ = ca_aot.aot_spec(name, dtype, 64, precision=precision, arch=arch)
    expected = ca_launch.launch_config(name, 64, dtype, precision, interpret=False, arch=arch)
    assert config == expected
    blocks = {k: v for k, v in expected.items() if k.startswith("BLOCK")}
    assert {k: constexprs[k] for k in blocks} == blocks and constexprs["BLOCK_D"] == 64
