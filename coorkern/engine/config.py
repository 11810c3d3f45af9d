"""Config files for the commands: ``--config run.yaml`` (YAML or JSON) under any argparse parser.

A config file is a mapping from option names (``image_size`` or ``image-size``) to
values; every option of the command may come from it, the command line overrides it,
and an unknown key is an error naming the key.  Values are validated by the option's
own argparse ``type`` and ``choices``, so a file is checked exactly like a command line.
:func:`write_config` writes the resolved options of a run the same way, so a run
folder's ``config.yaml`` reproduces the run.
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .files import atomic_write_bytes

__all__ = ["add_config_option", "load_config_file", "config_defaults", "parse_with_config", "plain_options",
           "write_config", "ConfigError"]

_FLAG_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)


class ConfigError(ValueError):
    """A config file that cannot be read or holds an unknown key or a bad value."""


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="YAML or JSON file of options (keys as the long options, e.g. image_size: [64, 64]); "
                             "the command line overrides it; a run folder's config.yaml reproduces that run")


def load_config_file(path) -> dict:
    """The mapping in a ``.yaml``/``.yml``/``.json`` file (YAML otherwise; JSON is YAML too)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"--config {path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} "
                          f"({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values, got "
                          f"{type(data).__name__}")
    return data


def _options_by_dest(parser: argparse.ArgumentParser, skip: Iterable[str]) -> dict:
    skip = set(skip) | {"help", "config"}
    return {a.dest: a for a in parser._actions if a.dest not in skip and a.dest != argparse.SUPPRESS}


def _convert_one(action: argparse.Action, value, where: str):
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{where}: expected a single value, got {value!r}")
    if isinstance(value, bool) and action.type not in (None, str):
        raise ConfigError(f"{where}: expected a {getattr(action.type, '__name__', 'value')}, got {value!r}")
    converted = value
    if action.type is not None:
        try:
            converted = action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    elif not isinstance(value, str):
        converted = str(value)
    if action.choices is not None and converted not in action.choices:
        raise ConfigError(f"{where}: {converted!r} is not one of {list(action.choices)}")
    return converted


def _convert(action: argparse.Action, value, where: str):
    if isinstance(action, _FLAG_ACTIONS):
        if value is None and isinstance(action, argparse.BooleanOptionalAction):
            return None
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if value is None:
        return None
    if isinstance(action, argparse._AppendAction):
        if isinstance(value, dict):  # KEY=VALUE options written as a mapping
            for key in value:
                if not isinstance(key, str) or not key.isidentifier():
                    raise ConfigError(f"{where}: {key!r} is not a valid option name")
            return list(value.items())
        items = value if isinstance(value, list) else [value]
        return [_convert_one(action, v, where) for v in items]
    if action.nargs is None or action.nargs == "?":
        return _convert_one(action, value, where)
    items = value if isinstance(value, list) else [value]
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise ConfigError(f"{where}: expected a list of {action.nargs} values, got {value!r}")
    if action.nargs == "+" and not items:
        raise ConfigError(f"{where}: expected at least one value")
    return [_convert_one(action, v, where) for v in items]


def config_defaults(parser: argparse.ArgumentParser, options: dict, source: str = "config",
                    skip: Sequence[str] = ()) -> dict:
    """``options`` (a loaded file) validated and converted to ``{dest: value}`` for ``parser``.

    Keys may use dashes or underscores.  ``skip`` names options a file may not set.
    """
    actions = _options_by_dest(parser, skip)
    converted = {}
    for key, value in options.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            close = difflib.get_close_matches(dest, list(actions), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{key}'{hint}")
        converted[dest] = _convert(actions[dest], value, f"{source}: {key}")
    return converted


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str],
                      skip: Sequence[str] = ()) -> tuple[argparse.Namespace, dict]:
    """Parse ``argv`` with the options of its ``--config FILE`` as defaults.

    Returns ``(args, from_file)``: ``from_file`` holds the converted options of the file
    (empty without ``--config``).  A bad file is reported through ``parser.error``.
    """
    pre = argparse.ArgumentParser(prog=parser.prog, add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(list(argv))
    from_file: dict = {}
    if known.config:
        try:
            from_file = config_defaults(parser, load_config_file(known.config), f"--config {known.config}", skip)
        except ConfigError as exc:
            parser.error(str(exc))
        parser.set_defaults(**from_file)
    return parser.parse_args(list(argv)), from_file


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value):
            return {k: _plain(v) for k, v in value}  # KEY=VALUE pairs
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def plain_options(options: dict, exclude: Iterable[str] = ()) -> dict:
    """``options`` with tuples as lists and KEY=VALUE pairs as mappings, ``exclude``/``config`` left out."""
    exclude = set(exclude) | {"config"}
    return {k: _plain(v) for k, v in options.items() if k not in exclude}


def write_config(path, options: dict, header: Optional[str] = None) -> Path:
    """Write ``options`` (plain values) as YAML, atomically; ``header`` becomes a comment on top."""
    import yaml

    text = yaml.safe_dump(options, sort_keys=False, default_flow_style=None, width=100)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    return atomic_write_bytes(path, text.encode())
