"""A program that calls coorkern's ops only through the dispatcher, by name
(``examples/cpp/dispatcher``): it references no symbol of libcoorkern_ops.so, so a linker
with ``--as-needed`` (Debian's and Ubuntu's default) drops the library unless the CMake
target ``coorkern::ops`` keeps it -- and then the op has no schema at run time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch

import coorkern
from support.paths import REPO_ROOT

DISPATCHER_DIR = os.path.join(str(REPO_ROOT), "examples", "cpp", "dispatcher")
MISSING_SCHEMA = "Could not find schema for coorkern::central_loss"


@pytest.fixture(scope="module")
def dispatcher_build(cmake_build) -> str:
    return cmake_build(DISPATCHER_DIR)


def _linked(binary: str) -> str:
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("ldd is not installed")
    return subprocess.run([ldd, binary], capture_output=True, text=True, check=True).stdout


def test_the_cmake_target_keeps_the_library_linked(dispatcher_build, library_path):
    linked = _linked(os.path.join(dispatcher_build, "coorkern_dispatcher"))
    found = re.search(r"^\s*libcoorkern_ops\.so => (\S+)", linked, re.M)
    assert found and os.path.realpath(found.group(1)) == os.path.realpath(library_path), linked


def test_calls_central_loss_by_name(dispatcher_build):
    proc = subprocess.run([os.path.join(dispatcher_build, "coorkern_dispatcher")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    name, value = proc.stdout.split()
    n = 2 * 3 * 9 * 11  # main.cpp's inputs
    logits = torch.arange(n, dtype=torch.float64).mul(0.37).sin().mul(4.0).reshape(2, 3, 9, 11)
    target = torch.arange(n, dtype=torch.float64).mul(0.11).add(0.5).sin().abs().reshape(2, 3, 9, 11)
    expected = coorkern.reference.central_loss(logits, target, 2.0, "mean").item()
    assert name == "central_loss" and float(value) == pytest.approx(expected, rel=1e-12)


def test_a_plain_as_needed_link_drops_the_library(dispatcher_build, library_path, tmp_path):
    """The failure the target prevents, on the same object file: listed plainly after
    --as-needed, libcoorkern_ops.so is dropped and the program cannot find the schema (so
    main.cpp indeed references nothing of the library)."""
    obj = os.path.join(dispatcher_build, "CMakeFiles", "coorkern_dispatcher.dir", "main.cpp.o")
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    binary = str(tmp_path / "plain")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    subprocess.run([cxx, obj, "-o", binary, "-Wl,--as-needed", library_path, f"-L{torch_lib}", "-ltorch",
                    "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{os.path.dirname(library_path)}:{torch_lib}"], check=True,
                   capture_output=True, text=True)
    assert "libcoorkern_ops.so" not in _linked(binary)
    proc = subprocess.run([binary], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and MISSING_SCHEMA in proc.stderr, proc.stderr[-2000:]
