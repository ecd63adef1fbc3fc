"""``python -m bnfix``: see :mod:`bnfix.cli`."""

import sys

from bnfix.cli import main

sys.exit(main())
