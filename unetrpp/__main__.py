"""`python -m unetrpp COMMAND ...`: see `unetrpp.cli`."""

import sys

from .cli import main

sys.exit(main())
