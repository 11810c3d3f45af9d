"""Fixtures of the C++ library tests: the installed libcoorkern_ops.so, and CMake builds of
the programs in examples/cpp, configured and built once per session against the installed
package (CMake from PATH, else the ``cmake`` pip package of the test extra).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

import coorkern
from coorkern.ops._runtime import extension as _extension


def find_cmake() -> str | None:
    found = shutil.which("cmake")
    if found is None:
        try:
            import cmake  # the PyPI wheel

            found = os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
        except ImportError:
            pass
    return found


def find_compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="session")
def library_path() -> str:
    """The installed libcoorkern_ops.so; skips the test when it is not built or not loaded."""
    if not _extension.cpp_available() or not os.path.exists(_extension.library_path()):
        pytest.skip(f"the C++ library is not built or not loaded ({_extension.load_error()}); "
                    "build it with `pip install --no-build-isolation -e .`")
    return _extension.library_path()


@pytest.fixture(scope="session")
def cmake_build(tmp_path_factory, library_path):
    """``build(source_dir)``: configures and builds a CMake project that uses
    ``find_package(coorkern)`` (once per session per project) and returns its build folder."""
    cmake, compiler = find_cmake(), find_compiler()
    if cmake is None:
        pytest.skip("CMake is not installed (pip install cmake)")
    if compiler is None:
        pytest.skip("no C++ compiler found (c++, g++, clang++ or $CXX)")
    prefix = ";".join([torch.utils.cmake_prefix_path, coorkern.cmake_prefix_path()])
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    built: dict[str, str] = {}

    def build(source_dir: str) -> str:
        if source_dir not in built:
            folder = str(tmp_path_factory.mktemp(f"cmake_{os.path.basename(source_dir)}"))
            for cmd in ([cmake, "-S", source_dir, "-B", folder, *generator, f"-DCMAKE_PREFIX_PATH={prefix}",
                         f"-DCMAKE_CXX_COMPILER={compiler}", "-DCMAKE_BUILD_TYPE=Release"],
                        [cmake, "--build", folder]):
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            built[source_dir] = folder
        return built[source_dir]

    return build
