"""``python -m coorkern.models --summary``."""

from .summary import _main

_main()
