# detectron2's new_baselines RegNetX-4GF-FPN Mask R-CNN (100 epochs, LSJ, SyncBN) with every
# norm converted to GroupNorm. RegNet widths (80, 240, 560, 1360) are not divisible by 32: they
# get the largest divisor below 32 (20, 30, 28, 20 groups), logged per layer.
from detectron2.model_zoo import get_config

from gn_det.lazy import with_norm_conversion

_base = get_config("new_baselines/mask_rcnn_regnetx_4gf_dds_FPN_100ep_LSJ.py")

dataloader = _base.dataloader
optimizer = _base.optimizer
lr_multiplier = _base.lr_multiplier
train = _base.train
model = with_norm_conversion(_base.model, target="GN")
