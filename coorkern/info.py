"""What coorkern can use on this machine: ``coorkern info`` (or ``python -m coorkern.info``).

Prints the versions of coorkern, torch and triton; which backends are usable here (the
C++ extension, Triton on CUDA or through the interpreter, CUDA devices); the CPU's vector
features; and the training profile ``coorkern train`` picks by default on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Optional, Sequence

import torch

from .engine import profiles
from .engine.cli_args import HelpFormatter, description, prog

__all__ = ["collect", "build_parser", "main"]

# The x86/Arm flags that decide which kernels run fast (torch's CPU capability names the one it dispatches to).
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2")


def _cpu_flags() -> list:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in VECTOR_FLAGS if flag in present]
    except OSError:
        pass
    return []


def _triton() -> dict:
    from .ops._runtime.backend import triton_interpreter_enabled

    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install
        return {"installed": False, "error": f"{type(exc).__name__}: {exc}"}
    where = "CUDA" if torch.cuda.is_available() else ("CPU via TRITON_INTERPRET=1" if triton_interpreter_enabled()
                                                      else None)
    return {"installed": True, "version": triton.__version__, "usable": where is not None, "runs_on": where}


def _cuda() -> list:
    if not torch.cuda.is_available():
        return []
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                        "memory_gib": round(props.total_memory / 2**30, 1)})
    return devices


def default_training_profile() -> dict:
    """What ``coorkern train`` uses here without options: the device's defaults for synthetic data
    (:data:`coorkern.engine.profiles.SYNTHETIC_DEFAULTS`) and the profile ``--profile auto`` picks for
    real data."""
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    name = profiles.resolve_profile("auto", "isbi2015", kind)
    return {"name": name, "source": f"--profile auto for real data on a {kind.upper()} machine; synthetic data: "
                                    "the device's defaults",
            "synthetic": dict(profiles.SYNTHETIC_DEFAULTS[kind]),
            "real_data_isbi2015": profiles.PROFILES[name].options("isbi2015")}


def collect() -> dict:
    """Everything ``coorkern info`` prints, as a JSON-able dict."""
    from . import __version__
    from .ops._runtime.extension import cpp_available, load_error

    return {
        "versions": {"coorkern": __version__, "torch": torch.__version__, "triton": _triton().get("version"),
                     "python": platform.python_version()},
        "backends": {"cpp_extension": {"usable": cpp_available(), "error": load_error()}, "triton": _triton(),
                     "cuda": {"usable": torch.cuda.is_available(), "devices": _cuda()}},
        "cpu": {"machine": platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "torch_capability": torch.backends.cpu.get_cpu_capability(), "vector_flags": _cpu_flags()},
        "default_training_profile": default_training_profile(),
    }


def format_info(info: dict) -> str:
    v, b, cpu = info["versions"], info["backends"], info["cpu"]
    cpp = b["cpp_extension"]
    tri = b["triton"]
    lines = [f"coorkern {v['coorkern']}, torch {v['torch']}, triton {v['triton'] or 'not installed'}, "
             f"python {v['python']}", "backends:",
             f"  C++ extension : {'usable' if cpp['usable'] else 'unavailable (' + str(cpp['error']) + ')'}",
             "  Triton        : " + (f"usable on {tri['runs_on']}" if tri.get("usable") else
                                      "installed, no CUDA device (tests run it with TRITON_INTERPRET=1)"
                                      if tri["installed"] else f"not installed ({tri['error']})")]
    devices = b["cuda"]["devices"]
    lines.append("  CUDA          : " + ("; ".join(f"{d['index']}: {d['name']} (sm_{d['capability'].replace('.', '')}, "
                                                  f"{d['memory_gib']} GiB)" for d in devices) if devices else "none"))
    lines.append(f"CPU: {cpu['machine']}, {cpu['cores']} cores ({cpu['torch_threads']} torch threads), torch kernels "
                 f"{cpu['torch_capability']}; vector features: {' '.join(cpu['vector_flags']) or 'unknown'}")
    profile = dict(info["default_training_profile"])
    lines.append(f"default training profile: {profile.pop('name')} ({profile.pop('source')})")
    for what, options in profile.items():
        lines.append(f"  {what}: " + ", ".join(f"{k}={v}" for k, v in options.items()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("info"), description=description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--json", action="store_true", help="print the information as JSON")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return info


if __name__ == "__main__":
    main(sys.argv[1:])
