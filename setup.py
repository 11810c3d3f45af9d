"""Builds coorkern and its C++ extension ``coorkern._C`` (op schemas + CPU kernels).

The extension is optional: if it fails to compile, installation still succeeds with
a warning and coorkern runs its CPU ops through the eager reference.  Build with
``pip install --no-build-isolation -e .`` so the build uses the installed torch.
"""

import glob
import os
import sys

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # torch missing: install the pure-Python package only
    BuildExtension = CppExtension = None


def extension_modules():
    if CppExtension is None or os.environ.get("COORKERN_NO_EXTENSION") == "1":
        return [], {}
    # -fno-trapping-math lets GCC if-convert (and so vectorize) the selects in the loss math.
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-std=c++17"]
    ext = CppExtension(
        "coorkern._C",
        sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
        extra_compile_args={"cxx": flags},
        extra_link_args=["-fopenmp"],
    )

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler missing or failing: keep the Python package usable
                print(f"WARNING: coorkern C++ extension failed to build ({exc}); "
                      "CPU ops will use the eager reference.", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
