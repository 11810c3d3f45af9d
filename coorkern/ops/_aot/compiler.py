"""Compile a Triton kernel for an NVIDIA GPU target without a GPU, and inspect it.

Used by the tests (every kernel must compile for sm_80 and sm_90 with no
local-memory spills) and handy when tuning: ``cuobjdump`` from the triton wheel
reports registers, stack and LOCAL bytes and dumps the SASS.

Under ``TRITON_INTERPRET=1`` (the test suite) ``@triton.jit`` produces interpreter
objects that cannot be compiled, so the compilation then runs in a subprocess that
imports the kernel's module without the interpreter.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Mapping, Sequence

from .._runtime.backend import triton_interpreter_enabled


@dataclasses.dataclass
class KernelReport:
    arch: int
    registers: int
    local_bytes: int
    stack_bytes: int
    shared_bytes: int
    sass: str
    ptx: str = ""  # filled with the SASS (with_sass=True)

    def count(self, mnemonic: str) -> int:
        """Occurrences of a SASS instruction, e.g. ``count("HGMMA")``."""
        return len(re.findall(rf"\b{mnemonic}\b", self.sass))


@dataclasses.dataclass
class CompileRequest:
    fn: Any  # a @triton.jit kernel (possibly wrapped by autotune/heuristics)
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any]
    arch: int
    num_warps: int = 4
    num_stages: int = 3
    with_sass: bool = False
    # Arguments Triton's launcher would mark divisible by 16 (16-byte aligned pointers,
    # ints that are multiples of 16): compiling with them gives the variant a GPU runs.
    divisible: Sequence[str] = ()


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def _raw_function(fn: Any) -> Any:
    # JITFunction.fn / InterpretedFunction.fn is the Python function; Autotuner.fn and
    # Heuristics.fn are the wrapped kernel: follow the chain to the plain function.
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def compile_binary(req: CompileRequest) -> Any:
    """``triton.compile`` the request in this process (no interpreter): the CompiledKernel,
    whose ``asm["cubin"]``/``asm["ptx"]`` and ``metadata`` (name, shared, num_warps) an
    ahead-of-time build embeds (see ``coorkern.ops._aot.codegen``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    raw = _raw_function(req.fn)
    kernel = getattr(sys.modules[raw.__module__], raw.__name__)
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in req.divisible}
    source = ASTSource(fn=kernel, signature=dict(req.signature), constexprs=dict(req.constexprs), attrs=attrs)
    return triton.compile(
        source,
        target=GPUTarget("cuda", req.arch, 32),
        options={"num_warps": req.num_warps, "num_stages": req.num_stages},
    )


def _compile_in_process(req: CompileRequest) -> KernelReport:
    compiled = compile_binary(req)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = ""
        if req.with_sass:
            sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout

    def field(name: str) -> int:
        match = re.search(rf"\b{name}:(\d+)", usage)
        if match is None:
            raise RuntimeError(f"cuobjdump printed no {name} field:\n{usage}")
        return int(match.group(1))

    ptx = compiled.asm["ptx"] if req.with_sass else ""
    return KernelReport(req.arch, field("REG"), field("LOCAL"), field("STACK"), field("SHARED"), sass, ptx)


# ---- subprocess transport (JSON): triton dtypes travel as {"tl_dtype": name}


def _encode(value: Any) -> Any:
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    return value


def _decode(value: Any) -> Any:
    import triton.language as tl

    if isinstance(value, dict) and "tl_dtype" in value:
        return tl.dtype(value["tl_dtype"])
    return value


def _request_to_json(req: CompileRequest) -> dict:
    raw = _raw_function(req.fn)
    return {
        "module": raw.__module__, "name": raw.__name__, "signature": dict(req.signature),
        "constexprs": {k: _encode(v) for k, v in req.constexprs.items()}, "arch": req.arch,
        "num_warps": req.num_warps, "num_stages": req.num_stages, "with_sass": req.with_sass,
        "divisible": list(req.divisible),
    }


def _request_from_json(spec: dict) -> CompileRequest:
    import importlib

    module = importlib.import_module(spec["module"])
    return CompileRequest(
        getattr(module, spec["name"]), spec["signature"], {k: _decode(v) for k, v in spec["constexprs"].items()},
        spec["arch"], spec["num_warps"], spec["num_stages"], spec["with_sass"], spec["divisible"],
    )


def compile_many(requests: Sequence[CompileRequest]) -> list[KernelReport]:
    """Compile each request for its GPU target; raises if any fails to compile."""
    if not triton_interpreter_enabled():
        return [_compile_in_process(req) for req in requests]
    env = dict(os.environ, TRITON_INTERPRET="0")
    payload = json.dumps([_request_to_json(req) for req in requests])
    proc = subprocess.run([sys.executable, "-m", "coorkern.ops._aot.compiler"], input=payload, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"Triton GPU compilation failed:\n{proc.stderr[-6000:]}")
    return [KernelReport(**item) for item in json.loads(proc.stdout.strip().splitlines()[-1])]


def compile_for_gpu(
    fn: Any,
    signature: Mapping[str, str],
    constexprs: Mapping[str, Any],
    arch: int,
    num_warps: int = 4,
    num_stages: int = 3,
    with_sass: bool = False,
    divisible: Sequence[str] = (),
) -> KernelReport:
    """Compile ``fn`` (a ``@triton.jit`` kernel) for ``sm_{arch}`` and read its resources."""
    request = CompileRequest(fn, signature, constexprs, arch, num_warps, num_stages, with_sass, divisible)
    return compile_many([request])[0]


if __name__ == "__main__":  # subprocess side of compile_many
    reports = [_compile_in_process(_request_from_json(spec)) for spec in json.loads(sys.stdin.read())]
    print(json.dumps([dataclasses.asdict(r) for r in reports]))
