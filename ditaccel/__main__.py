"""``python -m ditaccel``: the ``ditaccel`` command line."""

import sys

from .cli import main

sys.exit(main())
