#!/usr/bin/env python
"""Plot losses, learning rate and AP of detectron2 runs (their metrics.json) in one PNG.

    lab/tools/plot_metrics.py output/shapes_bn output/shapes_gn --labels BN GN --output curves.png

One panel per metric (total loss, each loss term, learning rate, box and mask AP at each
evaluation), runs overlaid. Truncated lines (a crashed run), missing keys and NaN are skipped.
See ``gn_det_lab.curves``.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from gn_det_lab.curves import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
