"""``python -m gn_det.cli``: the ``gn-det`` command."""

import sys

from . import main

sys.exit(main())
