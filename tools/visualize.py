#!/usr/bin/env python
"""Draw a trained model's predictions beside the ground truth, one PNG per image.

    tools/visualize.py --config shapes/gn.yaml --weights output/demo/model_final.pth
    tools/visualize.py --weights output/demo/model_final.pth --dataset shapes_val \
        --num-images 8 --score-threshold 0.3 --output-dir vis/ --force

The model is built from ``--config NAME`` / ``--config-file FILE`` (default: ``config.yaml``
beside the weights) with trailing ``KEY VALUE`` overrides; the PNGs (ground truth left,
prediction right) go to ``visualize/`` beside the weights unless ``--output-dir`` says otherwise,
and existing files are kept unless ``--force``. See ``gn_det.cli.visualize``.
"""

import sys

from gn_det.cli.visualize import visualize_main as main

if __name__ == "__main__":
    sys.exit(main())
