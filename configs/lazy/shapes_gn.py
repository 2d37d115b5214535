# CPU-sized LazyConfig on the embedded shapes dataset: the new_baselines Mask R-CNN recipe
# (LSJ augmentation, from scratch, 4conv1fc head) with a ResNet-18 body at 256x256, 2 images per
# batch, converted to GroupNorm. For the demo and tests; not a tuned recipe.
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from fvcore.common.param_scheduler import MultiStepParamScheduler
from detectron2.solver import WarmupParamScheduler

from .mask_rcnn_R_50_FPN_100ep_LSJ_gn import dataloader, model, optimizer, train

body = model.model  # detectron2's model config, under the conversion wrapper
body.backbone.bottom_up.stages.depth = 18
del body.backbone.bottom_up.stages.stride_in_1x1  # BasicBlock (depth 18) has no such option
body.roi_heads.num_classes = 4
body.roi_heads.batch_size_per_image = 128
body.roi_heads.box_head.conv_dims = [128, 128]
body.roi_heads.mask_head.conv_dims = [128, 128]
body.proposal_generator.post_nms_topk = (500, 250)
body.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]

image_size = 256
dataloader.train.dataset.names = "shapes_train"
dataloader.test.dataset.names = "shapes_val"
dataloader.train.mapper.augmentations = [
    L(T.ResizeScale)(min_scale=0.5, max_scale=1.5, target_height=image_size,
                     target_width=image_size),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size)),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size)]
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 1
dataloader.test.num_workers = 1

train.device = "cpu"  # wherever it runs (train.device=cuda moves it to a GPU)
train.amp.enabled = False
train.ddp.fp16_compression = False
train.max_iter = 450
train.eval_period = 0
train.checkpointer.period = 100000
train.output_dir = "./output/lazy_shapes_gn"
optimizer.lr = 0.02
optimizer.weight_decay = 1e-4
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[350],
                                         num_updates=train.max_iter),
    warmup_length=100 / train.max_iter,
    warmup_factor=0.067,
)
