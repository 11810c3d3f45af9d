"""The ``coorkern`` command: ``coorkern {train,evaluate,predict,experiments,export,info} [options]``.

Each subcommand is the module of the same name (``coorkern train`` = ``python -m
coorkern.train``) with the same parser; its module is imported only when it runs, so
``coorkern info`` stays quick and a missing optional module fails only its own command.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import Optional, Sequence

from .engine.cli_args import console_script

__all__ = ["COMMANDS", "main"]

COMMANDS = {  # name: (module, one line for the overview)
    "train": ("coorkern.train", "train a landmark detector (synthetic or real data; --config FILE)"),
    "evaluate": ("coorkern.evaluate", "MRE/SDR and uncertainty coverage of a checkpoint on a data split"),
    "predict": ("coorkern.predict", "landmarks with uncertainty radii for image files, folders or globs"),
    "experiments": ("coorkern.experiments", "the paper's loss/r/transformer studies as sets of training runs"),
    "export": ("coorkern.export", "write a checkpoint's model as ONNX, TorchScript or a pt2 package"),
    "info": ("coorkern.info", "versions, usable backends, CPU features, the default training profile here"),
}


def _overview() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: coorkern COMMAND [options]    (coorkern COMMAND --help for its options)", "",
             "Fused kernels and a reference detector for heatmap-based anatomical landmark detection.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``coorkern COMMAND ...``; returns the exit code (errors exit through ``SystemExit``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_overview())
        return 0 if argv else 2
    if argv[0] == "--version":
        from . import __version__

        print(f"coorkern {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        sys.stderr.write(_overview() + f"\ncoorkern: error: unknown command '{name}'{hint}\n")
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as exc:
        if exc.name != COMMANDS[name][0]:
            raise
        sys.stderr.write(f"coorkern: error: the '{name}' command is not part of this coorkern installation\n")
        return 2
    with console_script():  # --help and errors name the command "coorkern NAME"
        module.main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
