"""Builds coorkern and its two C++ libraries.

* ``coorkern/lib/libcoorkern_ops.so`` -- Python-free: the op schemas and typed entry points
  (``csrc/ops/``) and the CPU kernels (``csrc/cpu/``); with the CUDA kernels (below) also
  the Triton kernels compiled ahead of time for sm_80/sm_90 and their CUDA launchers
  (``csrc/cuda/``, generated sources from ``coorkern.ops._aot.codegen``).  C++ projects link
  it through ``coorkern.cmake_prefix_path()`` (CMake target ``coorkern::ops``).
* ``coorkern._C`` -- the Python extension: only the module init (``csrc/python/``),
  linked against the library with an ``$ORIGIN``-relative rpath.

The CUDA kernels (some 600 Triton compiles, most of a build's time) are built when the
installed torch has CUDA, or when ``COORKERN_AOT_CUDA=1`` asks for them; ``COORKERN_NO_AOT_CUDA=1``
(or ``COORKERN_AOT_CUDA=0``) leaves them out.  They serve C++ programs only: Python runs
its own Triton kernels on CUDA.  The build says which it did and why.

Both libraries are optional: if the library fails to compile, installation still succeeds
with a warning and coorkern runs its CPU ops through the eager reference; if only the CUDA
part fails (or Triton is missing), the library is built without it and the build says why.
Build with ``pip install --no-build-isolation -e .`` so the build uses the installed torch.
"""

import glob
import os
import subprocess
import sys

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # torch missing: install the pure-Python package only
    BuildExtension = CppExtension = None

OPS_LIB = "coorkern.lib.libcoorkern_ops"
PY_EXT = "coorkern._C"
# -fno-trapping-math lets GCC if-convert (and so vectorize) the selects in the loss math.
FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-std=c++17"]


def _warn(message):
    print(f"WARNING: coorkern: {message}", file=sys.stderr)


def _note(message):
    print(f"coorkern: {message}", file=sys.stderr)


def aot_cuda_choice():
    """``(build, reason)``: whether to compile the CUDA (Triton AOT) kernels into the library."""
    if os.environ.get("COORKERN_NO_AOT_CUDA") == "1" or os.environ.get("COORKERN_AOT_CUDA") == "0":
        return False, "left out as asked (COORKERN_NO_AOT_CUDA=1 or COORKERN_AOT_CUDA=0)"
    if os.environ.get("COORKERN_AOT_CUDA") == "1":
        return True, "asked for with COORKERN_AOT_CUDA=1"
    import torch

    if torch.version.cuda is not None:
        return True, f"the installed torch has CUDA {torch.version.cuda}"
    return False, ("the installed torch is CPU-only (torch.version.cuda is None); build them with "
                   "COORKERN_AOT_CUDA=1 pip install --no-build-isolation -e .")


def _generate_aot_sources(build_temp):
    """Compile the Triton kernels for sm_80/sm_90 into C++ sources; ``(sources, include_dirs)`` or None."""
    build, reason = aot_cuda_choice()
    if not build:
        _note(f"building the C++ library without the CUDA (Triton AOT) kernels for C++ programs: {reason}")
        return None
    _note(f"compiling the CUDA (Triton AOT) kernels into the C++ library ({reason}; "
          "COORKERN_NO_AOT_CUDA=1 leaves them out).")
    out_dir = os.path.abspath(os.path.join(build_temp, "coorkern_aot"))
    env = dict(os.environ, TRITON_INTERPRET="0", COORKERN_DISABLE_CPP="1")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its notice
    # No line tables in the embedded cubins/PTX: a third of the size (the library held 95 MB
    # with them once the attention kernels joined); only debug information is dropped.
    env.setdefault("TRITON_DISABLE_LINE_INFO", "1")
    proc = subprocess.run([sys.executable, "-m", "coorkern.ops._aot.codegen", out_dir], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        _warn("the CUDA (Triton AOT) kernels were not built, the C++ library gets CPU kernels only:\n"
              + proc.stderr.strip()[-3000:])
        return None
    print(proc.stdout.strip(), file=sys.stderr)
    lines = dict(line.split("=", 1) for line in proc.stdout.strip().splitlines() if "=" in line)
    return _sources("cuda") + lines["sources"].split(os.pathsep), [lines["cuda_include"]]


def _sources(folder):
    return sorted(glob.glob(os.path.join("csrc", folder, "*.cpp")))


def extension_modules():
    if CppExtension is None or os.environ.get("COORKERN_NO_EXTENSION") == "1":
        return [], {}
    ops = CppExtension(
        OPS_LIB,
        _sources("ops") + _sources("cpu"),
        include_dirs=[os.path.abspath(os.path.join("coorkern", "include")), os.path.abspath("csrc")],
        extra_compile_args={"cxx": FLAGS},
        # $ORIGIN/../../torch/lib: an installed wheel finds torch's libraries without Python.
        extra_link_args=["-fopenmp", "-Wl,-soname,libcoorkern_ops.so", "-Wl,-rpath,$ORIGIN/../../torch/lib"],
    )
    ops.libraries = [lib for lib in ops.libraries if lib != "torch_python"]  # Python-free
    py_ext = CppExtension(PY_EXT, [os.path.join("csrc", "python", "module.cpp")],
                          libraries=["coorkern_ops"], extra_link_args=["-Wl,-rpath,$ORIGIN/lib"])
    for ext in (ops, py_ext):
        ext.optional = True  # editable installs copy only what was built

    class CoorkernBuildExtension(BuildExtension):
        failed = set()

        def get_ext_filename(self, fullname):
            # distutils asks with the full dotted name or only its last part
            if OPS_LIB.endswith(fullname):  # a plain shared library, not a Python module
                return os.path.join(*fullname.split(".")) + ".so"
            return super().get_ext_filename(fullname)

        def _build_ops_library(self, ext):
            aot = _generate_aot_sources(self.build_temp)
            if aot is not None:
                cpu = (list(ext.sources), list(ext.include_dirs), list(ext.define_macros), list(ext.libraries))
                ext.sources = cpu[0] + aot[0]
                ext.include_dirs = cpu[1] + aot[1]
                ext.define_macros = cpu[2] + [("COORKERN_WITH_AOT_CUDA", "1")]
                ext.libraries = cpu[3] + ["dl"]  # dlopen("libcuda.so.1"): no link against libcuda
                try:
                    return super().build_extension(ext)
                except Exception as exc:
                    _warn(f"the CUDA (Triton AOT) part failed to compile ({exc}); "
                          "building the C++ library with CPU kernels only.")
                    ext.sources, ext.include_dirs, ext.define_macros, ext.libraries = cpu
            return super().build_extension(ext)

        def build_extensions(self):
            try:  # torch checks the compiler (and its ABI) here, before building anything
                super().build_extensions()
            except Exception as exc:
                _warn(f"the C++ libraries were not built ({exc}); CPU ops will use the eager reference.")

        def build_extension(self, ext):
            try:
                if ext.name == OPS_LIB:
                    return self._build_ops_library(ext)
                if OPS_LIB in self.failed:
                    raise RuntimeError("libcoorkern_ops.so was not built")
                ext.library_dirs.append(os.path.dirname(self.get_ext_fullpath(OPS_LIB)))
                return super().build_extension(ext)
            except Exception as exc:  # compiler missing or failing: keep the Python package usable
                self.failed.add(ext.name)
                _warn(f"C++ extension {ext.name} failed to build ({exc}); CPU ops will use the eager reference.")

    return [ops, py_ext], {"build_ext": CoorkernBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
