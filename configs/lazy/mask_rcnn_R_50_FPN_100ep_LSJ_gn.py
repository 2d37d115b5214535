# detectron2's new_baselines R-50-FPN Mask R-CNN (100 epochs, large-scale jitter, from scratch,
# SyncBN everywhere at 64 images per batch) with every norm converted to GroupNorm(32), so it
# trains at any per-GPU batch without cross-GPU statistics. Only the norm changes.
from detectron2.model_zoo import get_config

from gn_det.lazy import with_norm_conversion

_base = get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")

dataloader = _base.dataloader
optimizer = _base.optimizer
lr_multiplier = _base.lr_multiplier
train = _base.train
model = with_norm_conversion(_base.model, target="GN")
