#!/usr/bin/env python
"""Train or evaluate a detectron2 model with gn_det's norm conversion.

    tools/train_net.py --config gn_mask_rcnn.yaml --num-gpus 8
    tools/train_net.py --config shapes/gn.yaml SOLVER.MAX_ITER 100     # CPU, embedded data
    tools/train_net.py --config-file my.yaml --eval-only MODEL.WEIGHTS model_final.pth

Flags are detectron2's (``--config-file --num-gpus --num-machines --machine-rank --dist-url
--resume --eval-only``, trailing ``KEY VALUE`` overrides) plus ``--config NAME`` (a config of
gn_det's ``configs/``, from any directory) and ``--allow-unsafe-yaml``.
"""

from gn_det.cli.train import launch_from_args

if __name__ == "__main__":
    launch_from_args()
