"""``python -m SegExplainLib``: the ``segexplain`` command line."""

import sys

from .frontends.cli import main

sys.exit(main())
