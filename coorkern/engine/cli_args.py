"""What the commands' argument parsers share: argparse types, the ``--help`` formatter and program name.

Each command (``coorkern train``, ``evaluate``, ...) builds its own parser from these so
that bad values are rejected with the same messages everywhere, and ``--help`` names the
command the way it was started: ``coorkern train`` under the console script,
``python -m coorkern.train`` otherwise (:func:`console_script` switches it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from typing import Iterator

__all__ = ["HelpFormatter", "positive_int", "positive_float", "fraction", "key_value", "prog", "description",
           "console_script"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with defaults shown, except the empty ones (None/False: nothing to show)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1 (a coverage)."""
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def key_value(text: str) -> tuple:
    """argparse type: ``KEY=VALUE`` with VALUE parsed as JSON when it is (numbers, lists, true/false), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


_INVOCATION = {"console_script": False}  # set by console_script() while coorkern.cli runs a subcommand


@contextlib.contextmanager
def console_script() -> Iterator[None]:
    """While active, :func:`prog` names commands as the ``coorkern`` console script does."""
    _INVOCATION["console_script"] = True
    try:
        yield
    finally:
        _INVOCATION["console_script"] = False


def prog(command: str) -> str:
    """The command name for ``--help``: ``coorkern <command>`` under the console script, else ``python -m``."""
    return f"coorkern {command}" if _INVOCATION["console_script"] else f"python -m coorkern.{command}"


def description(doc: str) -> str:
    """The first paragraph of a module docstring, without reST markup, for ``--help``."""
    return doc.split("\n\n")[0].replace("``", "")
