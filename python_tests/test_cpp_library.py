"""The C++ library for libtorch programs: libcoorkern_ops.so, its header and CMake package.

The example in ``examples/cpp`` is configured and built with CMake against this package
(once per test session, ~10 s) and run on CPU without Python; its printed checksums must
match the Python ops on the same inputs.  The CUDA kernels compiled ahead of time into
the library are checked for their archs (no GPU here to run them).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import coorkern
from coorkern import _extension
from coorkern.ops import _attention_aot as attention_aot
from coorkern.ops import central_loss as cl_module
from coorkern.ops import coor_attention as ca_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_DIR = os.path.join(ROOT, "examples", "cpp")
HEADER = os.path.join(_extension.include_dir(), "coorkern", "ops.h")

needs_library = pytest.mark.skipif(
    not _extension.cpp_available() or not os.path.exists(_extension.library_path()),
    reason=f"the C++ library is not built or not loaded ({_extension.load_error()}); "
    "build it with `pip install --no-build-isolation -e .`",
)


def _cmake() -> str | None:
    found = shutil.which("cmake")
    if found is None:
        try:
            import cmake  # the PyPI wheel

            found = os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
        except ImportError:
            pass
    return found


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="session")
def example_binary(tmp_path_factory) -> str:
    """Configure and build examples/cpp once per session; the path of the executable."""
    cmake, compiler = _cmake(), _compiler()
    if cmake is None:
        pytest.skip("CMake is not installed (pip install cmake)")
    if compiler is None:
        pytest.skip("no C++ compiler found (c++, g++, clang++ or $CXX)")
    if not _extension.cpp_available():
        pytest.skip(f"the C++ library is not built ({_extension.load_error()})")
    build = str(tmp_path_factory.mktemp("coorkern_cpp_example"))
    prefix = ";".join([torch.utils.cmake_prefix_path, coorkern.cmake_prefix_path()])
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    for cmd in ([cmake, "-S", EXAMPLE_DIR, "-B", build, *generator, f"-DCMAKE_PREFIX_PATH={prefix}",
                 f"-DCMAKE_CXX_COMPILER={compiler}", "-DCMAKE_BUILD_TYPE=Release"],
                [cmake, "--build", build]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return os.path.join(build, "coorkern_example")


def _pattern(shape, freq, phase):
    """sin(i * freq + phase) in element order, float64: main.cpp's pattern()."""
    n = 1
    for s in shape:
        n *= s
    return torch.arange(n, dtype=torch.float64).mul(freq).add(phase).sin().reshape(shape)


def _checksums(t: torch.Tensor) -> tuple[float, float]:
    t = t.detach().to(torch.float64)
    return t.sum().item(), t.mul(_pattern(t.shape, 0.7, 0.3)).sum().item()


def _python_results() -> dict[str, tuple[float, float]]:
    """The example's computations through the Python API (autograd for the gradients)."""
    results = {}
    logits = _pattern((2, 3, 9, 11), 0.37, 0.0).mul(4.0).requires_grad_(True)
    target = _pattern((2, 3, 9, 11), 0.11, 0.5).abs()
    landmarks = _pattern((2, 3, 2), 0.61, 0.0).add(1.0).mul(4.5)
    loss = coorkern.central_loss(logits, target, r=2.0, reduction="mean")
    (grad,) = torch.autograd.grad(loss, logits)
    results["central_loss"], results["central_loss_backward"] = _checksums(loss), _checksums(grad)

    loss = coorkern.central_loss_from_landmarks(logits, landmarks, sigma=2.0, r=1.5, reduction="none", radius=4.0)
    (grad,) = torch.autograd.grad(loss, logits, _pattern((2, 3, 9, 11), 0.23, 1.0))
    results["central_loss_from_landmarks"] = _checksums(loss)
    results["central_loss_from_landmarks_backward"] = _checksums(grad)

    q = _pattern((1, 2, 5, 6, 8), 0.29, 0.1).requires_grad_(True)
    k = _pattern((1, 2, 5, 6, 8), 0.17, 0.7).requires_grad_(True)
    v = _pattern((1, 2, 7, 8), 0.41, 0.2).requires_grad_(True)
    coords = _pattern((1, 7, 2), 0.83, 0.4).mul(0.9).requires_grad_(True)
    out = coorkern.coor_attention(q, k, v, coords, sample="qk")
    grads = torch.autograd.grad(out, (q, k, v, coords), _pattern((1, 2, 7, 8), 0.53, 0.9))
    results["coor_attention"] = _checksums(out)
    for name, g in zip(("dq", "dk", "dv", "dcoords"), grads):
        results[f"coor_attention_backward.{name}"] = _checksums(g)
    return results


def _run_example(binary: str) -> tuple[str, dict[tuple[str, str], tuple[float, float]]]:
    # LD_BIND_NOW: resolve every symbol at load, as dlopen(RTLD_NOW) does, in a process
    # without Python.
    env = dict(os.environ, LD_BIND_NOW="1")
    proc = subprocess.run([binary], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    build = lines[0].split(" ", 1)[1]
    printed = {}
    for line in lines[1:]:
        fields = line.split()
        if len(fields) == 4:  # else a note, e.g. no CUDA kernel for an op
            printed[(fields[0], fields[1])] = (float(fields[2]), float(fields[3]))
    return build, printed


@needs_library
def test_cpp_example_matches_python_ops_on_cpu(example_binary):
    build, printed = _run_example(example_binary)
    assert build == _extension.build_info()
    expected = _python_results()
    assert {name for device, name in printed if device == "cpu"} == set(expected)
    for name, (total, weighted) in expected.items():
        got = printed[("cpu", name)]
        assert got == pytest.approx((total, weighted), rel=1e-9, abs=1e-12), name


@needs_library
def test_library_needs_no_python_symbols():
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    undefined = subprocess.run([nm, "-D", "--undefined-only", _extension.library_path()], capture_output=True,
                               text=True, check=True).stdout.split()
    python_symbols = [s for s in undefined if re.match(r"_?_?Py", s)]
    assert not python_symbols, python_symbols[:10]
    # ... while the Python extension does need them (the check above can fail).
    assert any(re.match(r"Py", s) for s in subprocess.run(
        [nm, "-D", "--undefined-only", sys.modules["coorkern._C"].__file__], capture_output=True, text=True,
        check=True).stdout.split())


@needs_library
def test_library_loads_with_rtld_now_without_torch_imported():
    code = ("import ctypes, os, sys; ctypes.CDLL(sys.argv[1], mode=os.RTLD_NOW | os.RTLD_GLOBAL); "
            "assert 'torch' not in sys.modules")
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.join(os.path.dirname(torch.__file__), "lib"))
    proc = subprocess.run([sys.executable, "-c", code, _extension.library_path()], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_header_declares_every_op():
    with open(HEADER) as f:
        header = f.read()
    for name in [*cl_module.SCHEMAS, *ca_module.SCHEMAS]:
        assert re.search(rf"COORKERN_API [^;]*\b{name}\(", header), f"{HEADER} does not declare {name}"


def test_cmake_prefix_path_holds_the_package_config():
    config = os.path.join(coorkern.cmake_prefix_path(), "coorkern", "coorkernConfig.cmake")
    with open(config) as f:
        assert "coorkern::ops" in f.read()


def _aot_expected() -> str | None:
    """Why the library should hold AOT CUDA kernels, or None when the build skips them."""
    if os.environ.get("COORKERN_NO_AOT_CUDA") == "1":
        return None
    try:
        from coorkern._aot_codegen import cuda_include_dir

        return cuda_include_dir()
    except Exception:
        return None


def _aot_kernels() -> list[tuple[str, str, int, bytes]]:
    lib = ctypes.CDLL(_extension.library_path())
    if not hasattr(lib, "coorkern_aot_kernel"):
        return []
    op, variant, arch = ctypes.c_char_p(), ctypes.c_char_p(), ctypes.c_int()
    cubin, size = ctypes.c_void_p(), ctypes.c_size_t()
    kernels, i = [], 0
    while lib.coorkern_aot_kernel(ctypes.c_size_t(i), ctypes.byref(op), ctypes.byref(variant), ctypes.byref(arch),
                                  ctypes.byref(cubin), ctypes.byref(size)):
        kernels.append((op.value.decode(), variant.value.decode(), arch.value, ctypes.string_at(cubin, size.value)))
        i += 1
    return kernels


@needs_library
def test_library_holds_aot_cuda_kernels_for_sm80_and_sm90(tmp_path):
    if _aot_expected() is None:
        pytest.skip("triton with its cuda.h is not installed (or COORKERN_NO_AOT_CUDA=1): "
                    "the build skips the CUDA kernels")
    from coorkern._aot_codegen import variant_key
    from coorkern._triton_aot import _cuobjdump

    kernels = _aot_kernels()
    for op, variants in (("central_loss", cl_module.AOT_VARIANTS), ("coor_attention", attention_aot.AOT_VARIANTS)):
        expected = {variant_key(v) for v in variants}
        for arch in (80, 90):
            assert {variant for o, variant, a, _ in kernels if o == op and a == arch} == expected, (op, arch)
        assert f"{op}@sm_80x{len(expected)}" in _extension.build_info()
    # One cubin per kernel and arch through cuobjdump: real SASS for that arch.
    first = {}
    for op, variant, arch, cubin in kernels:
        first.setdefault((re.search(r"(?:kernel|name)=(\w+)", variant).group(1), arch), cubin)
    kernel_names = {"central_loss": "central_loss", "finish_sum": "finish_sum", "fwd": "attn_fwd",
                    "dkv": "attn_bwd_dkv", "dq": "attn_bwd_dq", "sample": "sample", "scatter": "scatter",
                    "rowdot": "row_dot"}
    assert set(first) == {(k, a) for k in kernel_names for a in (80, 90)}
    for (kernel, arch), cubin in first.items():
        path = tmp_path / f"{kernel}{arch}.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([_cuobjdump(), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
        assert re.search(rf"code for sm_{arch}a?\b", sass), sass[:500]
        assert f"Function : _{kernel_names[kernel]}_kernel" in sass


def test_cpp_launcher_uses_the_python_fast_row_limit():
    with open(os.path.join(ROOT, "csrc", "aot", "central_loss_cuda.cpp")) as f:
        shift = re.search(r"kFastRowPixels = int64_t\{1\} << (\d+);", f.read()).group(1)
    assert 1 << int(shift) == cl_module.FAST_ROW_PIXELS


@needs_library
@pytest.mark.parametrize("op", ["central_loss", "coor_attention", "coor_attention_backward"])
def test_python_cuda_kernels_replace_the_cpp_ones_silently(op):
    code = f"import coorkern, torch; print(torch._C._dispatch_dump('coorkern::{op}'))"
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="0"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Overriding a previously registered kernel" not in proc.stderr
    active_cuda = re.search(r"^CUDA: registered at (\S+)", proc.stdout, re.M).group(1)
    assert "torch/library.py" in active_cuda  # the Python (Triton JIT) kernel
    if "cuda_aot=" in _extension.build_info():
        source = "central_loss_cuda.cpp" if op == "central_loss" else "coor_attention_cuda.cpp"
        assert re.search(rf"^CUDA \(inactive\): registered at \S+{source}", proc.stdout, re.M)


_HOST_CHECK = """
import itertools, sys, torch
torch.ops.load_library(sys.argv[1])  # without coorkern's Python registrations: the C++ CUDA kernels
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


@needs_library
def test_cuda_launchers_pass_the_compiled_signatures():
    """Each C++ CUDA entry point, called with CPU tensors, finds its AOT variants (the pass
    and, for mean/sum, the finishing sum) and passes arguments of the compiled types before
    it stops at the device check (no GPU here)."""
    if "cuda_aot=" not in _extension.build_info():
        pytest.skip("the library was built without the AOT CUDA kernels")
    proc = subprocess.run([sys.executable, "-c", _HOST_CHECK, _extension.library_path()], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split()[-1] == str(3 * 2 * 3 * 4 + 2)


_ATTENTION_HOST_CHECK = """
import itertools, sys, torch
torch.ops.load_library(sys.argv[1])  # without coorkern's Python registrations: the C++ CUDA kernels
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


@needs_library
def test_cuda_attention_launchers_pass_the_compiled_signatures():
    """The C++ CUDA coor_attention and its backward, called with CPU tensors, plan every
    launch (sample, attention, row-dot, dK/dV, dQ, scatter), find each AOT variant -- every
    dtype, both d families (d < 16 and multiples of 16), both samples, align_corners, shared
    and per-head coords, tf32 on and off -- and check the arguments against the compiled
    signatures before the first launch stops at the device check; unsupported inputs are
    refused with the reason."""
    if "cuda_aot=" not in _extension.build_info():
        pytest.skip("the library was built without the AOT CUDA kernels")
    proc = subprocess.run([sys.executable, "-c", _ATTENTION_HOST_CHECK, _extension.library_path()],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.splitlines()[0] == str(2 * (5 * 4 * 2 * 2 * 2)), proc.stdout  # (dtype, tf32) x d x ...
    assert "refused d = 24" in proc.stdout and "refused int" in proc.stdout and "refused deterministic" in proc.stdout


def test_a_checkout_without_the_built_extension_says_so(tmp_path):
    """A source checkout used from PYTHONPATH (as on the lent GPUs) has no _C module: the
    warning must say "not built", not Python's "partially initialized module ... circular
    import", and the ops must still run on the eager reference."""
    copy = tmp_path / "coorkern"
    shutil.copytree(os.path.dirname(coorkern.__file__), copy,
                    ignore=shutil.ignore_patterns("_C.*", "lib", "__pycache__"))
    code = ("import warnings, torch; warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    import coorkern\n"
            "print([str(w.message) for w in caught if 'C++ extension' in str(w.message)])\n"
            "x = torch.randn(1, 2, 6, 5, requires_grad=True)\n"
            "coorkern.central_loss_from_landmarks(x, torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])).backward()\n"
            "print('ran', torch.isfinite(x.grad).all().item())\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "is not built: no coorkern/_C extension module" in out.stdout, out.stdout
    assert "circular import" not in out.stdout + out.stderr and "ran True" in out.stdout


def _setup_module():
    """setup.py's namespace without running setup() (setuptools.setup replaced by a no-op)."""
    import runpy
    from unittest import mock

    with mock.patch("setuptools.setup"):
        return runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="coorkern_setup")


def test_build_skips_the_cuda_part_with_a_reason(tmp_path, monkeypatch, capsys):
    """A CPU machine without Triton's CUDA toolchain still builds the library: the AOT step
    returns nothing (the library is then built from csrc/*.cpp alone) and says why --
    asked for (COORKERN_NO_AOT_CUDA=1) or failed (here: a triton package that cannot compile)."""
    generate = _setup_module()["_generate_aot_sources"]
    monkeypatch.setenv("COORKERN_NO_AOT_CUDA", "1")
    assert generate(str(tmp_path / "a")) is None
    assert "COORKERN_NO_AOT_CUDA=1: building the C++ library without the CUDA" in capsys.readouterr().err
    monkeypatch.delenv("COORKERN_NO_AOT_CUDA")
    fake = tmp_path / "fake" / "triton"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0.0'\n")  # no triton.language, no NVIDIA backend
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "fake"), ROOT]))
    monkeypatch.chdir(ROOT)
    assert generate(str(tmp_path / "b")) is None
    err = capsys.readouterr().err
    assert "the CUDA (Triton AOT) kernels were not built, the C++ library gets CPU kernels only" in err
    assert "triton" in err.split("CPU kernels only", 1)[1]  # the reason, from the generator
