# High-resolution variant of mask_rcnn_R_50_FPN_100ep_LSJ_gn.py: LSJ crops of 1536x1536 at
# 1 image per GPU on 16 GPUs (GN does not care about the per-GPU batch); learning rate scaled
# linearly with the total batch (0.1 at 64 images -> 0.025 at 16).
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from .mask_rcnn_R_50_FPN_100ep_LSJ_gn import (  # noqa: F401  (the config's sections)
    dataloader, lr_multiplier, model, optimizer, train)

image_size = 1536
dataloader.train.mapper.augmentations = [
    L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=image_size,
                     target_width=image_size),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size)),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 16
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=1400, max_size=2333)]
optimizer.lr = 0.025
model.recompute = True  # activation memory at 1536^2 (lab/benchmarks.md)
