"""``python -m SegExplainLib``: the ``segexplain`` command line.

Run as a background job of Slicer or the review app, it first ties itself to that process (see ``_parent_watch``).
"""

import sys

from ._parent_watch import end_with_parent
from .cli import main

end_with_parent()
sys.exit(main())
