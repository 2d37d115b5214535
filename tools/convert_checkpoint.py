#!/usr/bin/env python
"""Convert a BN-trained checkpoint into a GN checkpoint: ``gn-det convert`` (see its --help).

tools/convert_checkpoint.py --weights R-50.pkl --output R-50-GN.pkl
"""

import sys

from gn_det.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
