"""``python -m qft``: the same as the ``qft`` command."""

import sys

from qft.cli import main

sys.exit(main())
