"""The attention kernels' launch configurations and their CUDA autotuner (CPU only, no compile).

``launch_config``'s docstring and comments state the rules its hand-picked tables follow
(tensor-core dots with an M of a multiple of 64, 4 or 8 warps; a fixed number of tile
elements per thread for the gather/scatter kernels; fp64 tiles at half the elements; FMA
tiles several times smaller and unpipelined).  These tests check every table entry against
those rules, for every kernel kind, head dim bucket, dtype, dot precision and arch; whether
an entry compiles without spills is the AOT compile tests' job (test_coor_attention.py).
The autotuner (``pick``) is run against a faked CUDA device: which configs it times, what
it caches under which key, and when it must not tune.
"""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from coorkern.ops._runtime import host as _host
from coorkern.ops.coor_attention import launch

ATTENTION_KINDS = ("fwd", "dkv", "dq")
GATHER_KINDS = ("sample", "scatter", "rowdot")
TENSOR_CORE = [(torch.bfloat16, "tf32"), (torch.float16, "tf32"), (torch.float32, "tf32"),
               (torch.bfloat16, "ieee"), (torch.float16, "ieee")]
FMA = [(torch.float32, "ieee"), (torch.float64, "ieee"), (torch.float64, "tf32")]
HEAD_DIMS = (1, 16, 17, 32, 48, 64, 65, 128)
ARCHS = (80, 86, 90)
# The dots' M dimension (the rows each warp group multiplies): the queries in the forward
# and dQ passes, the keys in the dK/dV pass (it computes S^T = K Q^T and dK, dV from it).
DOT_M = {"fwd": "BLOCK_M", "dq": "BLOCK_M", "dkv": "BLOCK_N"}


def gpu_config(kind, d, dtype, precision="tf32", arch=90):
    return launch.launch_config(kind, d, dtype, precision, interpret=False, arch=arch)


def area(cfg):
    return cfg["BLOCK_M"] * cfg["BLOCK_N"]


def _is_power_of_2(x):
    return x >= 1 and x & (x - 1) == 0


def all_configs():
    for kind, d, (dtype, precision), arch in itertools.product(ATTENTION_KINDS + GATHER_KINDS, HEAD_DIMS,
                                                               TENSOR_CORE + FMA, ARCHS):
        yield (kind, d, dtype, precision, arch), gpu_config(kind, d, dtype, precision, arch)


def test_every_config_is_launchable():
    for key, cfg in all_configs():
        blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
        expected = {"BLOCK"} if key[0] in GATHER_KINDS else {"BLOCK_M", "BLOCK_N"}
        assert set(blocks) == expected and set(cfg) == expected | {"num_warps", "num_stages"}, (key, cfg)
        # tl.arange needs powers of two; tl.dot needs every dimension >= 16
        assert all(_is_power_of_2(b) for b in blocks.values()), (key, cfg)
        if key[0] in ATTENTION_KINDS:
            assert min(blocks.values()) >= 16, (key, cfg)
        assert cfg["num_warps"] in (4, 8) and 1 <= cfg["num_stages"] <= 3, (key, cfg)


def test_block_d_is_the_padded_head_dim():
    assert [launch.block_d(d) for d in (1, 15, 16, 17, 32, 33, 64, 65, 128, 129)] == [
        16, 16, 16, 32, 32, 64, 64, 128, 128, 256]


def test_interpreter_gets_large_blocks_whatever_the_kernel():
    # ~1 ms per program instance under the interpreter: the fewest instances, same for every kernel.
    for kind, dtype in itertools.product(ATTENTION_KINDS + GATHER_KINDS, (torch.float32, torch.float64)):
        cfg = launch.launch_config(kind, 64, dtype, "ieee", interpret=True, arch=80)
        assert cfg == {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK": 128, "num_warps": 4, "num_stages": 1}


def test_interpret_defaults_to_the_backends_setting(monkeypatch):
    monkeypatch.setattr(launch._backend, "triton_interpreter_enabled", lambda: True)
    assert launch.launch_config("fwd", 64, torch.bfloat16)["BLOCK"] == 128
    monkeypatch.setattr(launch._backend, "triton_interpreter_enabled", lambda: False)
    assert launch.launch_config("fwd", 64, torch.bfloat16, arch=90) == gpu_config("fwd", 64, torch.bfloat16)
    monkeypatch.setattr(launch, "device_arch", lambda device=None: 80)  # arch=None: the current device's
    assert launch.launch_config("scatter", 64, torch.float32) == gpu_config("scatter", 64, torch.float32, arch=80)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_tensor_core_dots_have_wgmma_shapes(kind):
    """bf16/fp16 and fp32 as tf32: every dot's M is a multiple of 64 (one warp group per 64
    rows), 4 or 8 warps, so sm_90 emits wgmma (HGMMA) and sm_80 mma.sync."""
    for d, (dtype, precision), arch in itertools.product(HEAD_DIMS, TENSOR_CORE, ARCHS):
        cfg = gpu_config(kind, d, dtype, precision, arch)
        assert cfg[DOT_M[kind]] % 64 == 0, (kind, d, dtype, precision, arch, cfg)
        # the other operand tile: at least the 16 rows of an mma, below the M tile
        other = "BLOCK_N" if DOT_M[kind] == "BLOCK_M" else "BLOCK_M"
        assert 16 <= cfg[other] <= cfg[DOT_M[kind]], (kind, d, dtype, arch, cfg)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_wide_tiles_are_never_larger(kind):
    """d = 128 and fp32 (twice the bytes per tile) get smaller tiles than d <= 64 in bf16/fp16,
    and the forward pass fewer stages too (its O accumulator is BLOCK_M x d in fp32)."""
    for arch in ARCHS:
        narrow = gpu_config(kind, 64, torch.bfloat16, arch=arch)
        assert gpu_config(kind, 64, torch.float16, arch=arch) == narrow  # same bytes, same tiles
        for d in (16, 32, 48):
            assert gpu_config(kind, d, torch.bfloat16, arch=arch) == narrow
        for wide in (gpu_config(kind, 128, torch.bfloat16, arch=arch), gpu_config(kind, 64, torch.float32, arch=arch),
                     gpu_config(kind, 128, torch.float32, arch=arch)):
            assert area(wide) < area(narrow), (kind, arch, wide, narrow)
            assert wide["num_stages"] <= narrow["num_stages"], (kind, arch, wide, narrow)
            if kind == "fwd":  # and a shallower K/V pipeline
                assert wide["num_stages"] < narrow["num_stages"], (arch, wide, narrow)
        assert area(gpu_config(kind, 128, torch.float32, arch=arch)) <= area(gpu_config(kind, 64, torch.float32, arch=arch))


@pytest.mark.parametrize("kind", ("dkv", "dq"))
def test_backward_warps_share_the_score_tile_evenly(kind):
    """The backward passes split their BLOCK_M x BLOCK_N score tile (S, P, dP, dS) over the
    warps: 1 KB per warp in bf16/fp16 (4 warps for the d = 128 tiles, 8 for the narrow ones),
    at most 2 KB in fp32; fp32 dK/dV at d = 128 on sm_80 takes 8 warps (4 spill there)."""
    for d, (dtype, precision), arch in itertools.product(HEAD_DIMS, TENSOR_CORE, ARCHS):
        cfg = gpu_config(kind, d, dtype, precision, arch)
        per_warp = area(cfg) * dtype.itemsize // cfg["num_warps"]
        if dtype == torch.float32:
            assert per_warp <= 2048, (kind, d, arch, cfg)
            if kind == "dkv":
                assert cfg["num_warps"] == (8 if d > 64 and arch < 90 else 4), (d, arch, cfg)
        else:
            assert per_warp == 1024, (kind, d, dtype, arch, cfg)


def test_launch_config_refuses_an_unknown_precision():
    for interpret in (True, False):
        with pytest.raises(ValueError, match=r"^precision must be one of \('tf32', 'ieee'\), got 'highest'$"):
            launch.launch_config("fwd", 64, torch.float32, "highest", interpret=interpret, arch=90)
    assert launch.launch_config("fwd", 64, torch.float32, interpret=False, arch=90) == gpu_config(
        "fwd", 64, torch.float32, "tf32")  # the default: tf32


def test_tensor_core_configs_pipeline_their_loads():
    """Tensor-core passes overlap the next tile's loads with the dots: at least 2 stages.  The
    one exception: the fp32 forward at d = 128 on sm_80, where 2 stages spill (16 B)."""
    for kind, d, (dtype, precision), arch in itertools.product(ATTENTION_KINDS, HEAD_DIMS, TENSOR_CORE, ARCHS):
        cfg = gpu_config(kind, d, dtype, precision, arch)
        exception = kind == "fwd" and dtype == torch.float32 and d > 64 and arch < 90
        assert cfg["num_stages"] == 1 if exception else cfg["num_stages"] >= 2, (kind, d, dtype, arch, cfg)


def test_fp32_tensor_core_configs_halve_the_wide_ones():
    """The fp32 O accumulator: at d = 128 the forward halves BLOCK_M; the fp32 dQ pass at
    d >= 64 halves BLOCK_N (BLOCK_N = 32 spilled); fp32 dK/dV keeps 16 query rows."""
    for arch in ARCHS:
        assert gpu_config("fwd", 128, torch.float32, arch=arch)["BLOCK_M"] * 2 == gpu_config(
            "fwd", 128, torch.bfloat16, arch=arch)["BLOCK_M"]
        for d in (64, 128):
            assert gpu_config("dq", d, torch.float32, arch=arch)["BLOCK_N"] * 2 == gpu_config(
                "dq", d, torch.bfloat16, arch=arch)["BLOCK_N"]
        assert gpu_config("dq", 32, torch.float32, arch=arch)["BLOCK_N"] == gpu_config("dq", 32, torch.bfloat16,
                                                                                         arch=arch)["BLOCK_N"]
        for d in (16, 64, 128):
            assert gpu_config("dkv", d, torch.float32, arch=arch)["BLOCK_M"] == 16


def test_gather_kernels_give_each_thread_a_fixed_number_of_elements():
    """scatter: 16 tile elements per thread on sm_90 (vector fp32 atomics), 8 on sm_80;
    sample: 4 corner tiles of 32 elements; rowdot: 32 (with a 16-row floor).  fp64 tiles
    take two registers per element, so fp64 gets half the rows."""
    for d, dtype, arch in itertools.product(HEAD_DIMS, (torch.bfloat16, torch.float32, torch.float64), ARCHS):
        wide = 2 if dtype == torch.float64 else 1
        per_thread = {}
        for kind in GATHER_KINDS:
            cfg = gpu_config(kind, d, dtype, "ieee", arch)
            assert cfg["num_warps"] == 4 and cfg["num_stages"] == 1, (kind, cfg)
            per_thread[kind] = cfg["BLOCK"] * launch.block_d(d) * wide // (32 * cfg["num_warps"])
        assert per_thread["scatter"] == (16 if arch >= 90 else 8), (d, dtype, arch, per_thread)
        assert per_thread["sample"] == 32, (d, dtype, arch, per_thread)
        rowdot = gpu_config("rowdot", d, dtype, "ieee", arch)["BLOCK"]
        assert per_thread["rowdot"] == 32 or rowdot == 16, (d, dtype, arch, per_thread)
    assert gpu_config("rowdot", 256, torch.float64)["BLOCK"] == 16  # 4096 // 256 // 2 = 8: the floor


def test_uses_fma_only_for_fp64_and_ieee_fp32():
    assert launch.uses_fma(torch.float64, "tf32") and launch.uses_fma(torch.float64, "ieee")
    assert launch.uses_fma(torch.float32, "ieee") and not launch.uses_fma(torch.float32, "tf32")
    for dtype in (torch.bfloat16, torch.float16):
        assert not launch.uses_fma(dtype, "ieee") and not launch.uses_fma(dtype, "tf32")


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_fma_tiles_are_smaller_and_unpipelined(kind):
    """FMA dots hold whole operand tiles in registers per thread: tiles at most half of the
    tensor-core tile of the same dtype and d, one stage (no cp.async ring to hold)."""
    for d, (dtype, precision), arch in itertools.product(HEAD_DIMS, FMA, ARCHS):
        cfg = gpu_config(kind, d, dtype, precision, arch)
        assert cfg["num_stages"] == 1 and 16 <= cfg["BLOCK_M"] <= 32 and 16 <= cfg["BLOCK_N"] <= 32, (
            kind, d, dtype, arch, cfg)
        assert cfg == gpu_config(kind, d, dtype, precision, 80)  # no arch-specific FMA picks
        if dtype == torch.float32:
            assert 2 * area(cfg) <= area(gpu_config(kind, d, torch.float32, "tf32", arch)), (kind, d, arch, cfg)
        # twice the registers per element at d = 128 (fp64, or a 128-wide fp32 row): never a larger tile
        assert area(gpu_config(kind, 128, dtype, precision, arch)) <= area(gpu_config(kind, 64, dtype, precision, arch))
    # per-thread register work: fp64 tiles never exceed the fp32 ones of the same d
    for d in (16, 64, 128):
        assert area(gpu_config(kind, d, torch.float64)) <= area(gpu_config(kind, d, torch.float32, "ieee"))


def test_fp32_fma_tiles_keep_the_registers_per_thread():
    """A thread of an FFMA dot holds its share of whole operand rows: the tile is the same for
    every d up to 64 and halves at d = 128 (rows twice as long), with the same warps."""
    for kind, arch in itertools.product(ATTENTION_KINDS, ARCHS):
        at64 = gpu_config(kind, 64, torch.float32, "ieee", arch)
        for d in (1, 16, 32, 48):
            assert gpu_config(kind, d, torch.float32, "ieee", arch) == at64
        at128 = gpu_config(kind, 128, torch.float32, "ieee", arch)
        assert 2 * area(at128) == area(at64) and at128["num_warps"] == at64["num_warps"], (kind, at64, at128)


def test_fma_picks_differ_where_the_sweep_found_spills():
    """The AOT sweep's spill-free picks the docstring of ``_fma_config`` names: fp32 dK/dV at
    d = 64 needs 8 warps (4 spill on sm_80), fp32 forward at d = 128 needs 8 warps with a
    16-key tile, fp64 dK/dV at d = 128 needs 8 warps (4 spill with triton 3.7.1)."""
    assert gpu_config("dkv", 64, torch.float32, "ieee")["num_warps"] == 8
    assert gpu_config("fwd", 128, torch.float32, "ieee")["num_warps"] == 8
    assert gpu_config("fwd", 128, torch.float32, "ieee")["BLOCK_N"] == 16
    assert gpu_config("dkv", 128, torch.float64)["num_warps"] == 8
    assert gpu_config("dkv", 64, torch.float64)["num_warps"] == 4  # the smaller tile does not need them


def test_unknown_kernel_kind_is_refused():
    for dtype, precision in (TENSOR_CORE[0], FMA[0], FMA[1]):
        with pytest.raises(ValueError, match=r"^unknown kernel kind 'bwd'$"):
            gpu_config("bwd", 64, dtype, precision)
    with pytest.raises(ValueError, match=r"^unknown kernel kind 'bwd'$"):
        launch._fma_config("bwd", 64, torch.float64)


# ---------------------------------------------------------------------------
# Autotuning candidates


def test_candidates_start_with_the_hand_picked_config_and_are_distinct():
    for kind, d, (dtype, precision), arch in itertools.product(ATTENTION_KINDS + GATHER_KINDS, HEAD_DIMS,
                                                               TENSOR_CORE + FMA, ARCHS):
        options = launch.candidates(kind, d, dtype, precision, arch)
        assert options[0] == gpu_config(kind, d, dtype, precision, arch), (kind, d, dtype, arch)
        assert len(options) == len({json.dumps(o, sort_keys=True) for o in options}), options
        tuned = (kind in launch.TUNED_KINDS and not launch.uses_fma(dtype, precision) and launch.block_d(d) <= 64
                 and dtype != torch.float32)
        assert (len(options) > 1) == tuned, (kind, d, dtype, precision, arch, options)
        for cfg in options:  # the alternatives follow the tensor-core rules too
            if tuned:
                assert set(cfg) == {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}, cfg
                assert cfg[DOT_M[kind]] % 64 == 0 and cfg["num_warps"] in (4, 8), cfg
                assert 16 <= min(cfg["BLOCK_M"], cfg["BLOCK_N"]) and _is_power_of_2(area(cfg)), cfg
                assert 2 <= cfg["num_stages"] <= 3, cfg


def test_candidates_offer_smaller_and_larger_forward_tiles():
    """The forward pass is the one that pays for its tile choice at large N: the tuner may go
    to a smaller (64 x 64, 4 warps) and a larger (128 x 128, 8 warps) tile than the pick."""
    for d, dtype in itertools.product((16, 32, 64), (torch.bfloat16, torch.float16)):
        options = launch.candidates("fwd", d, dtype, "tf32", 90)
        assert len(options) == 3
        areas = sorted(area(c) for c in options)
        assert areas[0] < area(options[0]) < areas[-1], options
        assert {c["num_warps"] for c in options} == {4, 8}
        for kind in ("dkv", "dq"):  # one alternative with 4 warps each
            backward = launch.candidates(kind, d, dtype, "tf32", 90)
            assert len(backward) == 2 and backward[1]["num_warps"] == 4, backward


def test_candidates_leave_out_an_alternative_equal_to_the_pick(monkeypatch):
    # No hand-picked config at d <= 64 equals an alternative today: check the de-duplication
    # with a pick that does (dq's alternative, 64 x 32 with 4 warps).
    alternative = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    monkeypatch.setattr(launch, "launch_config", lambda *a, **k: dict(alternative))
    assert launch.candidates("dq", 64, torch.bfloat16, "tf32", 90) == [alternative]


def test_n_bucket_is_a_capped_power_of_4():
    assert [launch.n_bucket(n) for n in (0, 1, 2, 4, 5, 16, 17, 832, 1024, 1025)] == [
        1, 1, 4, 4, 16, 16, 64, 1024, 1024, 4096]
    assert launch.n_bucket(4 ** 8) == launch.n_bucket(10 ** 9) == 4 ** 8


# ---------------------------------------------------------------------------
# The autotuner on a faked CUDA device


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA device of capability (9, 0) as far as ``_attention_launch`` asks, tuning allowed,
    an empty cache, and ``do_bench`` replaced by a table of times per config."""
    state = {"capability": (9, 0), "capabilities": {}, "asked": [], "timed": [], "times": {}, "budgets": []}

    def capability(device=None):
        state["asked"].append(device)
        return state["capabilities"].get(device, state["capability"])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(launch._backend, "triton_interpreter_enabled", lambda: False)
    monkeypatch.delenv(launch.AUTOTUNE_ENV, raising=False)
    monkeypatch.setattr(launch, "_cache", {})
    monkeypatch.setattr(_host, "_capabilities", {})  # asked once per device: not from an earlier test

    def do_bench(fn, warmup, rep):
        state["budgets"].append((warmup, rep))
        before = len(state["timed"])
        fn()
        assert len(state["timed"]) == before + 1, "do_bench must time one launch of its config"
        return state["times"].get(json.dumps(state["timed"][-1], sort_keys=True), 1.0)

    monkeypatch.setattr(launch.triton.testing, "do_bench", do_bench)
    return state


def _run(state):
    return lambda cfg: state["timed"].append(cfg)


def test_device_arch_reads_the_devices_capability(fake_cuda):
    cuda1 = torch.device("cuda", 1)
    fake_cuda["capability"] = (8, 6)
    assert launch.device_arch(cuda1) == 86 and fake_cuda["asked"] == [cuda1]
    fake_cuda["capability"] = (10, 0)
    assert launch.device_arch() == 100 and fake_cuda["asked"][-1] is None  # the current device
    assert launch.device_arch(torch.device("cpu")) == 90 and len(fake_cuda["asked"]) == 2  # never asked for a CPU


def test_device_arch_without_cuda_is_sm90(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: pytest.fail("asked without CUDA"))
    assert launch.device_arch() == 90 and launch.device_arch(torch.device("cuda", 0)) == 90


def test_autotune_allowed_needs_every_condition(fake_cuda, monkeypatch):
    cuda = torch.device("cuda", 0)
    assert launch.autotune_allowed(cuda)
    assert not launch.autotune_allowed(torch.device("cpu")) and not launch.autotune_allowed(torch.device("meta"))
    for value, allowed in (("0", False), ("1", True), ("", True), ("yes", True)):
        monkeypatch.setenv(launch.AUTOTUNE_ENV, value)
        assert launch.autotune_allowed(cuda) == allowed, value
    monkeypatch.delenv(launch.AUTOTUNE_ENV)
    # deterministic algorithms: the block sizes change the summation order
    for name, target in (("triton_interpreter_enabled", launch._backend), ("is_current_stream_capturing", torch.cuda),
                         ("tracing", launch), ("are_deterministic_algorithms_enabled", torch)):
        with monkeypatch.context() as m:
            m.setattr(target, name, lambda: True)
            assert not launch.autotune_allowed(cuda), name
    assert launch.autotune_allowed(cuda)


def test_pick_times_every_candidate_once_and_caches_the_fastest(fake_cuda):
    cuda = torch.device("cuda", 0)
    options = launch.candidates("fwd", 64, torch.bfloat16, "tf32", 90)
    fake_cuda["times"] = {json.dumps(c, sort_keys=True): t for c, t in zip(options, (3.0, 1.0, 2.0))}
    chosen = launch.pick("fwd", 64, torch.bfloat16, "tf32", 3000, cuda, _run(fake_cuda))
    assert chosen == options[1] and fake_cuda["timed"] == options
    assert launch._cache == {("fwd", 64, torch.bfloat16, "tf32", 4096, 90): options[1]}
    # the same key (same N bucket, d bucket): cached, nothing timed
    assert launch.pick("fwd", 48, torch.bfloat16, "tf32", 4000, cuda, _run(fake_cuda)) == options[1]
    assert len(fake_cuda["timed"]) == 3
    # another N bucket is timed again; a tie keeps the first (hand-picked) config
    fake_cuda["times"] = {}
    assert launch.pick("fwd", 64, torch.bfloat16, "tf32", 5000, cuda, _run(fake_cuda)) == options[0]
    assert len(fake_cuda["timed"]) == 6 and len(launch._cache) == 2
    assert fake_cuda["budgets"] == [(launch.BENCH_WARMUP_MS, launch.BENCH_REP_MS)] * 6


def test_autotuning_a_key_stays_within_its_time_budget():
    """The first launch of a new key times every candidate: at most 50 ms of GPU time per key
    (a training run meets ~10 keys), with a warm-up and several repetitions each."""
    assert 1 <= launch.BENCH_WARMUP_MS < launch.BENCH_REP_MS
    most = max(len(launch.candidates(kind, d, dtype, "tf32", arch)) for kind in launch.TUNED_KINDS
               for d in (16, 32, 64, 128) for dtype in (torch.bfloat16, torch.float16, torch.float32)
               for arch in (80, 90))
    assert most * (launch.BENCH_WARMUP_MS + launch.BENCH_REP_MS) <= 50


def test_pick_keys_on_kind_dtype_precision_and_arch(fake_cuda):
    cuda = torch.device("cuda", 0)
    for kind, dtype, precision in (("dkv", torch.bfloat16, "tf32"), ("dq", torch.float16, "tf32"),
                                   ("dq", torch.bfloat16, "ieee"), ("fwd", torch.float16, "ieee")):
        launch.pick(kind, 32, dtype, precision, 100, cuda, _run(fake_cuda))
    cuda1 = torch.device("cuda", 1)  # a second device, of another capability
    fake_cuda["capabilities"][cuda1] = (8, 0)
    launch.pick("dq", 32, torch.float16, "tf32", 100, cuda1, _run(fake_cuda))
    assert sorted(launch._cache, key=str) == sorted([
        ("dkv", 32, torch.bfloat16, "tf32", 256, 90), ("dq", 32, torch.float16, "tf32", 256, 90),
        ("dq", 32, torch.bfloat16, "ieee", 256, 90), ("fwd", 32, torch.float16, "ieee", 256, 90),
        ("dq", 32, torch.float16, "tf32", 256, 80)], key=str)
    assert len(fake_cuda["timed"]) == 2 + 2 + 2 + 3 + 2


def test_pick_uses_the_inputs_devices_arch_for_its_configs(fake_cuda):
    # the inputs on an sm_80 cuda:1 while the current device is an sm_90
    cuda1 = torch.device("cuda", 1)
    fake_cuda["capabilities"][cuda1] = (8, 0)
    # fp32 dK/dV at d = 128: 8 warps on sm_80, 4 on sm_90 (a single candidate: nothing timed)
    cfg = launch.pick("dkv", 128, torch.float32, "tf32", 100, cuda1, _run(fake_cuda))
    assert cfg == gpu_config("dkv", 128, torch.float32, arch=80) != gpu_config("dkv", 128, torch.float32, arch=90)
    assert fake_cuda["timed"] == [] and launch._cache == {} and None not in fake_cuda["asked"]
    # tuned: the key holds the device's arch
    launch.pick("dq", 64, torch.bfloat16, "tf32", 100, cuda1, _run(fake_cuda))
    assert list(launch._cache) == [("dq", 64, torch.bfloat16, "tf32", 256, 80)]


def test_pick_passes_the_dot_precision_on(fake_cuda):
    # fp32 at "ieee" runs FMA tiles, at "tf32" tensor-core tiles (single candidates: nothing timed)
    cuda = torch.device("cuda", 0)
    for precision in ("ieee", "tf32"):
        for kind in ATTENTION_KINDS:
            cfg = launch.pick(kind, 64, torch.float32, precision, 100, cuda, _run(fake_cuda))
            assert cfg == gpu_config(kind, 64, torch.float32, precision), (kind, precision)
    assert gpu_config("fwd", 64, torch.float32, "ieee") != gpu_config("fwd", 64, torch.float32, "tf32")


def test_pick_without_tuning_returns_the_cached_or_hand_picked_config(fake_cuda, monkeypatch):
    cuda = torch.device("cuda", 0)
    options = launch.candidates("dq", 64, torch.bfloat16, "tf32", 90)
    monkeypatch.setenv(launch.AUTOTUNE_ENV, "0")
    assert launch.pick("dq", 64, torch.bfloat16, "tf32", 100, cuda, _run(fake_cuda)) == options[0]
    assert fake_cuda["timed"] == [] and launch._cache == {}
    launch._cache[("dq", 64, torch.bfloat16, "tf32", 256, 90)] = options[1]  # tuned earlier
    assert launch.pick("dq", 64, torch.bfloat16, "tf32", 100, cuda, _run(fake_cuda)) == options[1]
    assert fake_cuda["timed"] == []


def test_pick_on_cpu_is_the_launch_config_of_the_current_mode(fake_cuda, monkeypatch):
    # Launches recorded on CPU/meta tensors with the interpreter off: the current device's config.
    cpu = torch.device("cpu")
    assert launch.pick("fwd", 64, torch.bfloat16, "tf32", 100, cpu, _run(fake_cuda)) == gpu_config(
        "fwd", 64, torch.bfloat16, arch=90)
    assert fake_cuda["asked"] == [None] and fake_cuda["timed"] == [] and launch._cache == {}
    # The interpreter's launches (CPU tensors): its large blocks, never the GPU's candidates.
    monkeypatch.setattr(launch._backend, "triton_interpreter_enabled", lambda: True)
    assert launch.pick("fwd", 64, torch.bfloat16, "tf32", 100, cpu, _run(fake_cuda))["BLOCK_N"] == 128
    assert fake_cuda["timed"] == [] and launch._cache == {}


def test_no_autotuning_while_traced(fake_cuda, monkeypatch):
    """Under torch.compile / export the launches see fake tensors: nothing can be timed, so
    autotuning is off there (the graph keeps the cached or hand-picked config)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cuda = torch.device("cuda", 0)
    assert not launch.tracing() and launch.autotune_allowed(cuda)
    with FakeTensorMode():
        assert launch.tracing() and not launch.autotune_allowed(cuda)
    assert not launch.tracing()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert launch.tracing() and not launch.autotune_allowed(cuda)


def test_candidates_default_to_tf32_on_the_current_device(fake_cuda):
    fake_cuda["capability"] = (8, 0)
    assert launch.candidates("dkv", 128, torch.float32) == launch.candidates("dkv", 128, torch.float32, "tf32", 80)
    assert launch.candidates("fwd", 64, torch.bfloat16)[0] == gpu_config("fwd", 64, torch.bfloat16, arch=80)


def test_pick_on_cpu_never_returns_a_config_tuned_on_cuda(fake_cuda, monkeypatch):
    # A CUDA choice cached for this key must not leak into the interpreter's launches: the
    # CPU key has no arch.
    tuned = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    launch._cache[("fwd", 64, torch.bfloat16, "tf32", 256, 90)] = tuned
    assert launch.pick("fwd", 64, torch.bfloat16, "tf32", 100, torch.device("cuda", 0), _run(fake_cuda)) == tuned
    monkeypatch.setattr(launch._backend, "triton_interpreter_enabled", lambda: True)
    cfg = launch.pick("fwd", 64, torch.bfloat16, "tf32", 100, torch.device("cpu"), _run(fake_cuda))
    assert cfg == launch.launch_config("fwd", 64, torch.bfloat16, "tf32", interpret=True) != tuned
