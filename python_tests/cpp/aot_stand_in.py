"""Builds a stand-in for the CUDA part of libcoorkern_ops.so, for tests on machines whose
install leaves the CUDA (Triton AOT) kernels out (a CPU-only torch: CI's default).

``python aot_stand_in.py OUT_DIR LIBRARY`` (with ``TRITON_INTERPRET=0``) writes
``OUT_DIR/libcoorkern_aot_stand_in.so``: the CUDA launchers of ``csrc/cuda/`` and the kernel
table of ``coorkern.ops._aot.codegen`` with every declared variant of every arch, as the full
build has.  Only the first variant of each kernel per arch is compiled by Triton (a real
cubin and PTX); every other row gets what codegen derives from the op's ``aot_spec`` without
compiling -- the variant key, the constexprs and the parameter types the launchers are
checked against -- and an empty cubin.  So the launchers' variant lookups and signature
checks run over the whole set, and cuobjdump reads real cubins embedded by the real
generated source, in about a minute instead of the full build's several.  Nothing here runs
a kernel (no GPU).  LIBRARY, the installed libcoorkern_ops.so, is loaded before coorkern is
imported: it defines the schemas that the launchers register kernels for (coorkern would
define them from Python otherwise).  Prints the library's path last.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re
import sys
import types

import torch

if __name__ == "__main__":
    torch.ops.load_library(sys.argv[2])

from torch.utils import cpp_extension  # noqa: E402

from coorkern.ops._aot import codegen, compiler  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAME = "coorkern_aot_stand_in"
_real_compile = compiler.compile_binary


def kernel_of(variant_key: str) -> str:
    """The kernel a variant key compiles ("central_loss", "fwd", ...)."""
    return re.search(r"(?:kernel|name)=(\w+)", variant_key).group(1)


def _signature_only(req: compiler.CompileRequest):
    """What codegen reads of a compiled kernel, with no code: an empty cubin and PTX."""
    _signature_only.called = True
    meta = types.SimpleNamespace(name="not_compiled", shared=0, num_warps=req.num_warps)
    return types.SimpleNamespace(metadata=meta, asm={"cubin": b"", "ptx": ""})


def _table_row(job_and_compile: tuple) -> dict:
    job, compile_it = job_and_compile
    _signature_only.called = False
    compiler.compile_binary = _real_compile if compile_it else _signature_only
    try:
        row = codegen._compile(job)
    finally:
        compiler.compile_binary = _real_compile
    if not compile_it and not _signature_only.called:  # else this would compile everything, slowly
        raise RuntimeError("coorkern.ops._aot.codegen no longer compiles through compiler.compile_binary: "
                           "update python_tests/cpp/aot_stand_in.py")
    return row


def table(out_dir: str) -> str:
    """Writes the generated kernel table into out_dir; its source path."""
    jobs = codegen._jobs()
    seen, work = set(), []
    for job in jobs:
        key = (kernel_of(codegen.variant_key(job[2])), job[3])
        work.append((job, key not in seen))
        seen.add(key)
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count() or 1,
                                                mp_context=multiprocessing.get_context("fork")) as pool:
        rows = list(pool.map(_table_row, work))
    os.makedirs(out_dir, exist_ok=True)
    source = os.path.join(out_dir, codegen.SOURCE_NAME)
    with open(source, "w") as f:
        f.write(codegen.render(rows, out_dir))
    print(f"{len(rows)} table rows, {len(seen)} compiled", file=sys.stderr)
    return source


def build(out_dir: str) -> str:
    source = table(os.path.join(out_dir, "table"))
    build_dir = os.path.join(out_dir, "build")
    os.makedirs(build_dir, exist_ok=True)
    cuda_sources = sorted(os.path.join(ROOT, "csrc", "cuda", f) for f in os.listdir(os.path.join(ROOT, "csrc", "cuda"))
                          if f.endswith(".cpp"))
    # is_python_module=False: a plain shared library, loaded here with torch.ops.load_library,
    # which shows that its registrations find their schemas.
    cpp_extension.load(NAME, cuda_sources + [source], extra_cflags=["-DCOORKERN_WITH_AOT_CUDA=1"],
                       extra_include_paths=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "coorkern", "include"),
                                            codegen.cuda_include_dir()],
                       extra_ldflags=["-ldl"], build_directory=build_dir, is_python_module=False)
    return os.path.join(build_dir, f"{NAME}.so")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python aot_stand_in.py OUT_DIR LIBRARY")
    print(build(sys.argv[1]))
