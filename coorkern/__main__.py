"""``python -m coorkern COMMAND ...``: the ``coorkern`` console script without installing it."""

import sys

from .cli import main

sys.exit(main())
