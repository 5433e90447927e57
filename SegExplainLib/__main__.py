"""``python -m SegExplainLib``: the ``segexplain`` command line."""

import sys

from .cli import main

sys.exit(main())
