"""The C++ library's CUDA part: the Triton kernels compiled ahead of time and their launchers.

An install compiles them into libcoorkern_ops.so only with a CUDA torch or when asked
(``COORKERN_AOT_CUDA=1``, see setup.py); CI's CPU-only install leaves them out.  So the
checks run on two libraries (no GPU here to run a kernel; ``python_tests/cuda/`` runs them):

* ``installed`` -- libcoorkern_ops.so as installed; skipped, with the reason, when it was
  built without the CUDA kernels.  Only it shows that every variant compiles for every arch.
* ``stand-in`` -- ``aot_stand_in.py``'s build in a temporary folder (about a minute, once per
  session): the launchers of ``csrc/cuda/`` with the generated kernel table of every variant,
  whose parameter types come from the ops' ``aot_spec`` as in a full build, and real cubins
  for the first variant of each kernel per arch.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import re
import subprocess
import sys

import pytest

from coorkern.ops._runtime import extension as _extension
from coorkern.ops.central_loss import launch as cl_launch
from support.paths import REPO_ROOT

ROOT = str(REPO_ROOT)
STAND_IN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aot_stand_in.py")
KERNEL_NAMES = {"central_loss": "central_loss", "finish_sum": "finish_sum", "fwd": "attn_fwd",
                "dkv": "attn_bwd_dkv", "dq": "attn_bwd_dq", "sample": "sample", "scatter": "scatter",
                "rowdot": "row_dot"}


def _installed_has_aot() -> bool:
    return re.search(r"cuda_aot=(?!none\b)", _extension.build_info()) is not None


@pytest.fixture(scope="session")
def stand_in(tmp_path_factory, library_path) -> str:
    try:
        from coorkern.ops._aot.codegen import cuda_include_dir

        cuda_include_dir()
    except Exception as exc:  # no triton, or one without its NVIDIA backend
        pytest.skip(f"cannot compile CUDA kernels here: {exc}")
    out = tmp_path_factory.mktemp("aot_stand_in")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DISABLE_LINE_INFO="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, STAND_IN_SCRIPT, str(out), library_path], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(params=["installed", "stand-in"])
def cuda_libraries(request, library_path) -> list[str]:
    """The libraries a libtorch process loads, in order, for the ops' C++ CUDA kernels; the
    last one holds the kernel table."""
    if request.param == "installed":
        if not _installed_has_aot():
            pytest.skip(f"the installed library was built without the CUDA kernels ({_extension.build_info()}): "
                        "a CPU-only torch leaves them out; COORKERN_AOT_CUDA=1 pip install "
                        "--no-build-isolation -e . builds them (the stand-in runs these checks meanwhile)")
        return [library_path]
    if _installed_has_aot():
        pytest.skip("the installed library holds the CUDA kernels: checked as 'installed'")
    return [library_path, request.getfixturevalue("stand_in")]


def test_build_info_says_whether_the_cuda_kernels_are_in(library_path):
    info = _extension.build_info()
    assert re.fullmatch(r"cpu;cuda_aot=(none|(\w+@sm_\d+x\d+)(,\w+@sm_\d+x\d+)*)", info), info
    assert hasattr(ctypes.CDLL(library_path), "coorkern_aot_kernel") == _installed_has_aot()


_TABLE_DUMP = r"""
import ctypes, json, os, sys, torch
*libraries, out = sys.argv[1:]
for library in libraries:
    torch.ops.load_library(library)
lib = ctypes.CDLL(libraries[-1])
op, variant, arch = ctypes.c_char_p(), ctypes.c_char_p(), ctypes.c_int()
cubin, size = ctypes.c_void_p(), ctypes.c_size_t()
rows, i = [], 0
while lib.coorkern_aot_kernel(ctypes.c_size_t(i), ctypes.byref(op), ctypes.byref(variant), ctypes.byref(arch),
                              ctypes.byref(cubin), ctypes.byref(size)):
    with open(os.path.join(out, f"{i}.cubin"), "wb") as f:
        f.write(ctypes.string_at(cubin, size.value))
    rows.append([op.value.decode(), variant.value.decode(), arch.value, size.value])
    i += 1
print(json.dumps(rows))
"""


def test_library_holds_aot_cuda_kernels_for_sm80_and_sm90(cuda_libraries, tmp_path):
    """The kernel table holds every declared variant for sm_80 and sm_90, and the first
    cubin of each kernel and arch is that kernel's SASS for that arch (cuobjdump)."""
    from coorkern.ops._aot.codegen import AOT_OPS, variant_key
    from coorkern.ops._aot.compiler import _cuobjdump

    # In a subprocess: loading a library registers its CUDA kernels, over this process's.
    proc = subprocess.run([sys.executable, "-c", _TABLE_DUMP, *cuda_libraries, str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kernels = json.loads(proc.stdout.strip().splitlines()[-1])
    for op, module in AOT_OPS.items():
        expected = {variant_key(v) for v in importlib.import_module(module).AOT_VARIANTS}
        for arch in (80, 90):
            assert {variant for o, variant, a, _ in kernels if o == op and a == arch} == expected, (op, arch)
        if cuda_libraries[-1] == _extension.library_path():
            assert f"{op}@sm_80x{len(expected)}" in _extension.build_info()
    first = {}
    for i, (op, variant, arch, size) in enumerate(kernels):
        first.setdefault((re.search(r"(?:kernel|name)=(\w+)", variant).group(1), arch), (i, size))
    assert set(first) == {(k, a) for k in KERNEL_NAMES for a in (80, 90)}
    for (kernel, arch), (i, size) in first.items():
        assert size > 0, (kernel, arch)
        sass = subprocess.run([_cuobjdump(), "-sass", str(tmp_path / f"{i}.cubin")], capture_output=True, text=True,
                              check=True).stdout
        assert re.search(rf"code for sm_{arch}a?\b", sass), sass[:500]
        assert f"Function : _{KERNEL_NAMES[kernel]}_kernel" in sass


def test_cpp_launcher_uses_the_python_fast_row_limit():
    with open(os.path.join(ROOT, "csrc", "cuda", "central_loss_cuda.cpp")) as f:
        shift = re.search(r"kFastRowPixels = int64_t\{1\} << (\d+);", f.read()).group(1)
    assert 1 << int(shift) == cl_launch.FAST_ROW_PIXELS


@pytest.mark.parametrize("op", ["central_loss", "coor_attention", "coor_attention_backward"])
def test_python_cuda_kernels_replace_the_cpp_ones_silently(op, request, library_path):
    """Importing coorkern registers its Python (Triton JIT) CUDA kernels over the C++ ones of a
    library loaded before (the installed library's when it has them, else the stand-in's)."""
    preload = [library_path] if _installed_has_aot() else [library_path, request.getfixturevalue("stand_in")]
    code = ("import sys, torch\n"
            "for library in sys.argv[1:]: torch.ops.load_library(library)\n"
            f"import coorkern; print(torch._C._dispatch_dump('coorkern::{op}'))")
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code, *preload], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Overriding a previously registered kernel" not in proc.stderr
    active_cuda = re.search(r"^CUDA: registered at (\S+)", proc.stdout, re.M).group(1)
    assert "torch/library.py" in active_cuda  # the Python (Triton JIT) kernel
    source = "central_loss_cuda.cpp" if op == "central_loss" else "coor_attention_cuda.cpp"
    assert re.search(rf"^CUDA \(inactive\): registered at \S*csrc/cuda/{source}", proc.stdout, re.M), proc.stdout


_LOAD_LIBRARIES = """
import sys, torch
for library in sys.argv[1:]:  # without coorkern's Python registrations: the C++ CUDA kernels
    torch.ops.load_library(library)
"""

_HOST_CHECK = _LOAD_LIBRARIES + """
import itertools
ops = torch.ops.coorkern
cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
calls = 0
for dtype, r, red in itertools.product((torch.float32, torch.float64, torch.float16), (2.0, 1.5), ("mean", "sum", "none")):
    x = torch.randn(2, 3, 5, 7, dtype=dtype)
    t = torch.rand(2, 3, 5, 7, dtype=dtype)
    lm = torch.rand(2, 3, 2, dtype=dtype) * 5
    g = torch.ones((), dtype=dtype) if red != "none" else torch.randn_like(x)
    for op, args in ((ops.central_loss, (x, t, r, red)), (ops.central_loss_backward, (g, x, t, r, red)),
                     (ops.central_loss_from_landmarks, (x, lm, 2.0, r, red, None)),
                     (ops.central_loss_from_landmarks_backward, (g, x, lm, 2.0, r, red, 3.0))):
        try:
            op.default.redispatch(cuda, *args)
        except RuntimeError as exc:
            assert "need CUDA tensors, got cpu" in str(exc), (op, dtype, r, red, str(exc))
            calls += 1
# maps of 2^22 pixels: the landmark kernels compiled without FAST_ROW
x = torch.zeros(1, 1, 2048, 2048)
lm = torch.ones(1, 1, 2)
for op, args in ((ops.central_loss_from_landmarks, (x, lm, 2.0, 2.0, "sum", None)),
                 (ops.central_loss_from_landmarks_backward, (x, x, lm, 2.0, 1.5, "none", 3.0))):
    try:
        op.default.redispatch(cuda, *args)
    except RuntimeError as exc:
        assert "need CUDA tensors, got cpu" in str(exc), (op, str(exc))
        calls += 1
print(calls)
"""


def test_cuda_launchers_pass_the_compiled_signatures(cuda_libraries):
    """Each C++ CUDA entry point, called with CPU tensors, finds its AOT variants (the pass
    and, for mean/sum, the finishing sum) and passes arguments of the compiled types before
    it stops at the device check (no GPU here)."""
    proc = subprocess.run([sys.executable, "-c", _HOST_CHECK, *cuda_libraries], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split()[-1] == str(3 * 2 * 3 * 4 + 2)


_ATTENTION_HOST_CHECK = _LOAD_LIBRARIES + """
import itertools
ops = torch.ops.coorkern
cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
calls = 0

def expect_device_error(op, args, label):
    global calls
    try:
        op.default.redispatch(cuda, *args)
    except RuntimeError as exc:
        assert "need CUDA tensors, got cpu" in str(exc), (label, str(exc))
        calls += 1
    else:
        raise AssertionError(("launched on CPU tensors", label))

for dtype, d, sample, align, per_head, tf32 in itertools.product(
        (torch.float32, torch.float64, torch.float16, torch.bfloat16), (8, 16, 48, 128), ("qk", "kv"),
        (True, False), (False, True), (False, True)):
    if tf32 and dtype != torch.float32:
        continue
    torch.backends.cuda.matmul.allow_tf32 = tf32
    b, heads, h, w, n = 2, 3, 5, 6, 7
    fmap = lambda: torch.randn(b, heads, h, w, d, dtype=dtype)
    tokens = lambda: torch.randn(b, heads, n, d, dtype=dtype)
    q, k, v = (fmap(), fmap(), tokens()) if sample == "qk" else (tokens(), fmap(), fmap())
    coords = torch.rand(b, heads, n, 2) * 2 - 1 if per_head else torch.rand(b, n, 2) * 2 - 1
    label = (dtype, d, sample, align, per_head, tf32)
    expect_device_error(ops.coor_attention, (q, k, v, coords, sample, 0.3, align), label)
    out, lse = tokens(), torch.randn(b, heads, n, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    expect_device_error(ops.coor_attention_backward, (tokens(), q, k, v, coords, out, lse, sample, 0.3, align), label)
print(calls)
for label, args, message in (
        ("d = 24", (torch.randn(1, 1, 3, 3, 24),) * 2 + (torch.randn(1, 1, 4, 24), torch.rand(1, 4, 2)), "head widths"),
        ("int", (torch.ones(1, 1, 3, 3, 8, dtype=torch.int32),) * 2 + (torch.ones(1, 1, 4, 8, dtype=torch.int32),
                                                                         torch.rand(1, 4, 2)), "must be float32")):
    try:
        ops.coor_attention.default.redispatch(cuda, *args, "qk", 0.3, True)
    except RuntimeError as exc:
        assert message in str(exc), (label, str(exc))
        print("refused", label)
torch.use_deterministic_algorithms(True)
try:
    ops.coor_attention.default.redispatch(cuda, torch.randn(1, 1, 3, 3, 8), torch.randn(1, 1, 3, 3, 8),
                                          torch.randn(1, 1, 4, 8), torch.rand(1, 4, 2), "qk", 0.3, True)
except RuntimeError as exc:
    assert "no deterministic backward" in str(exc), str(exc)
    print("refused deterministic")
"""


def test_cuda_attention_launchers_pass_the_compiled_signatures(cuda_libraries):
    """The C++ CUDA coor_attention and its backward, called with CPU tensors, plan every
    launch (sample, attention, row-dot, dK/dV, dQ, scatter), find each AOT variant -- every
    dtype, both d families (d < 16 and multiples of 16), both samples, align_corners, shared
    and per-head coords, tf32 on and off -- and check the arguments against the compiled
    signatures before the first launch stops at the device check; unsupported inputs are
    refused with the reason."""
    proc = subprocess.run([sys.executable, "-c", _ATTENTION_HOST_CHECK, *cuda_libraries], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.splitlines()[0] == str(2 * (5 * 4 * 2 * 2 * 2)), proc.stdout  # (dtype, tf32) x d x ...
    assert "refused d = 24" in proc.stdout and "refused int" in proc.stdout and "refused deterministic" in proc.stdout


def _setup_module():
    """setup.py's namespace without running setup() (setuptools.setup replaced by a no-op)."""
    import runpy
    from unittest import mock

    with mock.patch("setuptools.setup"):
        return runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="coorkern_setup")


@pytest.mark.parametrize("env, torch_cuda, build, reason", [
    ({}, None, False, "the installed torch is CPU-only (torch.version.cuda is None); build them with "
                      "COORKERN_AOT_CUDA=1 pip install --no-build-isolation -e ."),
    ({}, "12.8", True, "the installed torch has CUDA 12.8"),
    ({"COORKERN_AOT_CUDA": "1"}, None, True, "asked for with COORKERN_AOT_CUDA=1"),
    ({"COORKERN_AOT_CUDA": "0"}, "12.8", False, "left out as asked"),
    ({"COORKERN_NO_AOT_CUDA": "1"}, "12.8", False, "left out as asked"),
    ({"COORKERN_NO_AOT_CUDA": "1", "COORKERN_AOT_CUDA": "1"}, None, False, "left out as asked"),
])
def test_build_compiles_the_cuda_kernels_for_a_cuda_torch_or_when_asked(env, torch_cuda, build, reason, monkeypatch):
    import torch

    choice = _setup_module()["aot_cuda_choice"]
    for name in ("COORKERN_AOT_CUDA", "COORKERN_NO_AOT_CUDA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    got_build, got_reason = choice()
    assert got_build == build and got_reason.startswith(reason), (got_build, got_reason)


def test_build_skips_the_cuda_part_with_a_reason(tmp_path, monkeypatch, capsys):
    """A machine without the CUDA kernels still builds the library: the AOT step returns
    nothing (the library is then built from csrc/ops/ and csrc/cpu/ alone) and says why --
    not asked for (a CPU-only torch), left out (COORKERN_NO_AOT_CUDA=1) or failed (here: a
    triton package that cannot compile)."""
    import torch

    generate = _setup_module()["_generate_aot_sources"]
    monkeypatch.delenv("COORKERN_AOT_CUDA", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert generate(str(tmp_path / "a")) is None
    err = capsys.readouterr().err
    assert "without the CUDA (Triton AOT) kernels" in err and "COORKERN_AOT_CUDA=1 pip install" in err
    monkeypatch.setenv("COORKERN_NO_AOT_CUDA", "1")
    assert generate(str(tmp_path / "b")) is None
    assert "left out as asked (COORKERN_NO_AOT_CUDA=1" in capsys.readouterr().err
    monkeypatch.delenv("COORKERN_NO_AOT_CUDA")
    monkeypatch.setenv("COORKERN_AOT_CUDA", "1")
    fake = tmp_path / "fake" / "triton"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0.0'\n")  # no triton.language, no NVIDIA backend
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "fake"), ROOT]))
    monkeypatch.chdir(ROOT)
    assert generate(str(tmp_path / "c")) is None
    err = capsys.readouterr().err
    assert "compiling the CUDA (Triton AOT) kernels into the C++ library (asked for with COORKERN_AOT_CUDA=1" in err
    assert "the CUDA (Triton AOT) kernels were not built, the C++ library gets CPU kernels only" in err
    assert "triton" in err.split("CPU kernels only", 1)[1]  # the reason, from the generator
