"""The C++ library for libtorch programs: libcoorkern_ops.so, its header and CMake package.

The example in ``examples/cpp`` is configured and built with CMake against this package
(once per test session, ~10 s) and run on CPU without Python; its printed checksums must
match the Python ops on the same inputs.  The library's CUDA part is tested in
test_cpp_aot.py, the dispatcher-only consumer in test_cpp_dispatcher.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import coorkern
from coorkern.ops._runtime import extension as _extension
from coorkern.ops.central_loss import op as cl_module
from coorkern.ops.coor_attention import op as ca_module
from support.paths import REPO_ROOT

ROOT = str(REPO_ROOT)
EXAMPLE_DIR = os.path.join(ROOT, "examples", "cpp")
HEADER = os.path.join(_extension.include_dir(), "coorkern", "ops.h")


@pytest.fixture(scope="module")
def example_binary(cmake_build) -> str:
    return os.path.join(cmake_build(EXAMPLE_DIR), "coorkern_example")


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


def test_cpp_example_matches_python_ops_on_cpu(example_binary):
    build, printed = _run_example(example_binary)
    assert build == _extension.build_info()
    expected = _python_results()
    assert {name for device, name in printed if device == "cpu"} == set(expected)
    for name, (total, weighted) in expected.items():
        got = printed[("cpu", name)]
        assert got == pytest.approx((total, weighted), rel=1e-9, abs=1e-12), name


def test_library_needs_no_python_symbols(library_path):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    undefined = subprocess.run([nm, "-D", "--undefined-only", library_path], capture_output=True,
                               text=True, check=True).stdout.split()
    python_symbols = [s for s in undefined if re.match(r"_?_?Py", s)]
    assert not python_symbols, python_symbols[:10]
    # ... while the Python extension does need them (the check above can fail).
    assert any(re.match(r"Py", s) for s in subprocess.run(
        [nm, "-D", "--undefined-only", sys.modules["coorkern._C"].__file__], capture_output=True, text=True,
        check=True).stdout.split())


def test_library_loads_with_rtld_now_without_torch_imported(library_path):
    code = ("import ctypes, os, sys; ctypes.CDLL(sys.argv[1], mode=os.RTLD_NOW | os.RTLD_GLOBAL); "
            "assert 'torch' not in sys.modules")
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.join(os.path.dirname(torch.__file__), "lib"))
    proc = subprocess.run([sys.executable, "-c", code, library_path], capture_output=True, text=True,
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
