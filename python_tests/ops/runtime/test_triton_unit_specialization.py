"""Every Triton kernel compiles when its integer arguments equal 1.

On a GPU, Triton's JIT specializes an integer argument whose value is 1 into a
compile-time constant: inside the kernel it is then a Python ``int``, and code such as
``width.to(tl.float32)`` fails to compile (seen on an H200 with a 1-pixel-wide map).
The interpreter the rest of the suite runs under does not specialize, so this test
compiles each kernel for sm_90 (no GPU needed) with *all* its integer arguments made
constexpr 1 -- every combination the JIT can produce is a subset of that one.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from coorkern.ops._aot.compiler import CompileRequest, compile_many  # noqa: E402
from coorkern.ops.central_loss import aot as cl_aot  # noqa: E402
from coorkern.ops.coor_attention import aot as ca_aot  # noqa: E402


def _integers_as_one(spec, arch=90):
    fn, signature, constexprs, config, divisible = spec
    signature, constexprs = dict(signature), dict(constexprs)
    for name, ty in signature.items():
        if ty in ("i32", "i64"):
            signature[name], constexprs[name] = "constexpr", 1
    divisible = [name for name in divisible if signature[name] != "constexpr"]
    return CompileRequest(fn, signature, constexprs, arch, config["num_warps"], config.get("num_stages", 3),
                          divisible=divisible)


def _specs():
    for mode in (0, 1, 2):
        for from_landmarks in (False, True):
            yield f"central_loss mode={mode} landmarks={from_landmarks}", cl_aot.aot_spec(
                "central_loss", "fp32", 90, mode=mode, from_landmarks=from_landmarks)
    yield "central_loss row division", cl_aot.aot_spec("central_loss", "fp32", 90, mode=2, from_landmarks=True,
                                                  fast_row=False)
    yield "finish_sum", cl_aot.aot_spec("finish_sum", "fp32", 90)
    for name in ("fwd", "dkv", "dq", "sample", "scatter", "rowdot"):
        for sample in ("qk", "kv") if name in ("dkv", "dq") else ("qk",):
            yield f"attention {name} {sample}", ca_aot.aot_spec(name, torch.bfloat16, 32, arch=90, sample=sample)


def test_every_kernel_compiles_with_its_integer_arguments_equal_to_one():
    labels, specs = zip(*_specs())
    requests = [_integers_as_one(spec) for spec in specs]
    assert all("constexpr" in r.signature.values() for r in requests)
    reports = compile_many(requests)  # raises, naming the kernel source line, if one fails
    assert len(reports) == len(labels)
    for label, report in zip(labels, reports):
        assert report.registers > 0, label
