#!/usr/bin/env python
"""Plot losses, learning rate and AP of detectron2 runs (their metrics.json) in one PNG.

    tools/plot_metrics.py output/shapes_bn output/shapes_gn --labels BN GN --output curves.png

One panel per metric (total loss, each loss term, learning rate, box and mask AP at each
evaluation), runs overlaid. Truncated lines (a crashed run), missing keys and NaN are skipped.
See ``gn_det.cli.visualize``.
"""

import sys

from gn_det.cli.visualize import plot_metrics_main as main

if __name__ == "__main__":
    sys.exit(main())
