"""The attention kernels' ahead-of-time variant lists against the launches that need them (CPU only).

``coor_attention.aot`` declares two lists: ``_cpp_variants()`` (``AOT_VARIANTS``), the variants the
C++ library compiles for its CUDA launcher (``csrc/cuda/coor_attention_cuda.cpp``), and
``aot_variants()``, every variant the Python (JIT) launchers can run on a GPU, autotuning
candidates included.  A variant missing from a list is a kernel a GPU user cannot get (the C++
launcher fails its lookup, an ahead-of-time build lacks it); an extra one is a compile nobody
launches.  So each list must equal, as a set, what its launcher asks for over its whole input
domain: the C++ launcher's requests are enumerated from its rules (and the rules checked in its
source), the JIT launches are recorded on meta tensors with the autotuner's candidates run.
"""

from __future__ import annotations

import itertools
import os
import re

import pytest
import torch

from coorkern.ops._aot.codegen import variant_key
from coorkern.ops.coor_attention import aot as _attention_aot, launch as _attention_launch
from test_coor_attention_launches import KINDS, _forward_backward, _inputs, launches  # noqa: F401 (fixture)
from support.paths import REPO_ROOT

ROOT = str(REPO_ROOT)
CPP_LAUNCHER = os.path.join(ROOT, "csrc", "cuda", "coor_attention_cuda.cpp")


# --------------------------------------------------------------------------------------------
# The C++ library's list


def _cpp_launcher_requests() -> set:
    """Every variant key ``coor_attention_cuda.cpp`` can ask for, call by call: each head width
    it accepts (1..128: below 16 or a multiple of 16), each dtype, torch's tf32 switch on and
    off, both samples and both align_corners, forward and backward."""
    requests = set()
    for d in range(1, 129):
        if not (d < 16 or d % 16 == 0):
            continue  # refused with "head widths ..." (test_cpp_library checks the message)
        block = 16 if d <= 16 else 32 if d <= 32 else 64 if d <= 64 else 128
        for dtype, tf32, sample, align in itertools.product(("fp32", "fp64", "fp16", "bf16"), (False, True), ("qk", "kv"),
                                                            (False, True)):
            base = dict(aligned=d % 16 == 0, d=block, dtype=dtype)
            precision = "tf32" if dtype == "fp32" and tf32 else "ieee"
            calls = [dict(base, name="sample", align_corners=align),  # both directions sample first
                     dict(base, name="fwd", precision=precision),  # forward
                     dict(base, name="rowdot"),  # backward: delta, the two passes, two scatters
                     *(dict(base, name=name, precision=precision, sample=sample) for name in ("dkv", "dq")),
                     *(dict(base, name="scatter", align_corners=align, add_dc=add_dc) for add_dc in (False, True))]
            requests |= {variant_key(call) for call in calls}
    return requests


def test_cpp_launcher_builds_the_keys_enumerated_here():
    """The rules ``_cpp_launcher_requests`` restates, read back from the launcher's source: the
    head-width check and its block width, the key fields, the kernel names and tf32 switch."""
    with open(CPP_LAUNCHER) as f:
        source = f.read()
    assert "d >= 1 && (d < 16 || (d % 16 == 0 && d <= 128))" in source
    assert "d <= 16 ? 16 : d <= 32 ? 32 : d <= 64 ? 64 : 128" in source
    assert 'std::string("aligned=") + (d % 16 == 0 ? "1" : "0") + ",d=" + std::to_string(block_d)' in source
    assert '",dtype=" + aot::triton_dtype(type)' in source
    assert set(re.findall(r'",name=(\w+)', source)) == {"sample", "fwd", "rowdot", "dkv", "dq", "scatter"}
    assert 'type == at::kFloat && at::globalContext().allowTF32CuBLAS() ? "tf32" : "ieee"' in source
    assert '",precision=" + precision(f.type) + ",sample=" + std::string(sample)' in source
    assert 'std::string("add_dc=") + (add_dc ? "1" : "0") + ",align_corners="' in source
    assert 'std::string("align_corners=") + (align ? "1," : "0,") + f.prefix + ",name=sample"' in source


def test_cpp_variants_are_exactly_what_the_cpp_launcher_asks_for():
    declared = [variant_key(v) for v in _attention_aot._cpp_variants()]
    assert len(declared) == len(set(declared))  # each compiled once
    assert set(declared) == _cpp_launcher_requests()
    assert [variant_key(v) for v in _attention_aot.AOT_VARIANTS] == declared


def test_cpp_variants_are_valid_aot_specs():
    """Each entry is a complete ``aot_spec`` call (what ``_aot_codegen`` makes of it): the kernel
    its name says, ``aligned`` deciding which arguments are declared divisible by 16."""
    for variant in _attention_aot._cpp_variants():
        kernel, signature, constexprs, config, divisible = _attention_aot.aot_spec(**variant, arch=80)
        assert KINDS[kernel.fn.__name__] == variant["name"]
        assert ("d" in divisible) == variant["aligned"], variant
        assert {p for p in signature if p.endswith("_ptr")} <= set(divisible)


# --------------------------------------------------------------------------------------------
# The JIT launchers' list


def _as_variant(kind: str, dtype: torch.dtype, d: int, sample: str, meta: dict) -> tuple:
    """A recorded launch as an ``aot_variants`` entry (options hashable: the config sorted)."""
    if kind == "sample":
        options = {"align_corners": meta["ALIGN"]}
    elif kind == "scatter":
        options = {"align_corners": meta["ALIGN"], "deterministic": meta["DETERMINISTIC"], "add_dc": meta["ADD_DC"]}
    elif kind == "rowdot":
        options = {}
    else:
        config = {k: meta[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
        # The forward is one kernel for both samples: declared once, as "qk".
        options = {"precision": meta["PRECISION"], "sample": "qk" if kind == "fwd" else sample,
                   "config": tuple(sorted(config.items()))}
    return kind, dtype, d, tuple(sorted(options.items()))


def _declared(arch: int) -> list:
    return [(name, dtype, d, tuple(sorted((k, tuple(sorted(v.items())) if k == "config" else v)
                                          for k, v in options.items())))
            for name, dtype, d, options in _attention_aot.aot_variants(arch)]


def test_aot_variants_are_exactly_the_gpu_launches(launches, monkeypatch):
    """Forward and backward over the whole domain (d = 16/32/64/128, every dtype, fp32 with tf32
    and exact dots, both samples, align_corners, deterministic or not), with the GPU's launch
    configs (sm_90) and the autotuner's behaviour on CUDA (every candidate run once, then the
    first launched), launch every declared variant and nothing undeclared."""
    def autotune(kind, d, dtype, precision, n, device, run):
        options = _attention_launch.candidates(kind, d, dtype, precision, arch=90)
        for cfg in options:
            run(cfg)
        return options[0]

    monkeypatch.setattr(_attention_launch, "pick", autotune)
    launched = set()
    domain = itertools.product((16, 32, 64, 128), [(torch.bfloat16, "tf32"), (torch.float16, "tf32"),
                                                     (torch.float32, "tf32"), (torch.float32, "ieee"),
                                                     (torch.float64, "tf32")], ("qk", "kv"), (True, False),
                               (False, True))
    for d, (dtype, setting), sample, align, deterministic in domain:
        monkeypatch.setattr(_attention_launch, "fp32_matmul_precision", lambda setting=setting: setting)
        launches.clear()
        _forward_backward(*_inputs(sample, dtype, "meta", d=d), sample, deterministic, align)
        kinds = [KINDS[kernel.fn.__name__] for kernel, *_ in launches]
        assert set(kinds) == {"sample", "fwd", "rowdot", "dkv", "dq", "scatter"}, kinds
        launched |= {_as_variant(kind, dtype, d, sample, meta) for kind, (*_, meta) in zip(kinds, launches)}
    declared = _declared(90)
    assert len(declared) == len(set(declared))  # each compiled once
    undeclared = launched - set(declared)
    missing = set(declared) - launched
    assert not undeclared, sorted(undeclared, key=str)[:5]
    assert not missing, sorted(missing, key=str)[:5]


@pytest.mark.parametrize("arch", [80, 90])
def test_aot_variants_of_an_arch_use_its_launch_configs(arch):
    """The configs an sm_80 build compiles are sm_80's (the dK/dV fp32 d = 128 warps, the
    scatter block differ from sm_90's), and ``head_dims`` selects the widths."""
    for name, dtype, d, options in _attention_aot.aot_variants(arch, head_dims=(32, 128)):
        assert d in (32, 128)
        _, _, _, config, _ = _attention_aot.aot_spec(name, dtype, d, arch=arch, **options)
        precision = options.get("precision", "tf32" if dtype == torch.float32 else "ieee")
        if name in _attention_launch.TUNED_KINDS:
            assert config in _attention_launch.candidates(name, d, dtype, precision, arch), (name, dtype, d)
        else:
            assert config == _attention_launch.launch_config(name, d, dtype, precision, interpret=False, arch=arch)
    assert {d for _, _, d, _ in _attention_aot.aot_variants(arch, head_dims=(16,))} == {16}
