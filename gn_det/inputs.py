"""What gn_det's data-driven steps (calibrate, distill, fold) take as images, and how they run
a model on them: detectron2 input dicts (``{"image": (C, H, W) tensor}``), image tensors
(C, H, W) or batches (N, C, H, W), or lists of them; a plain ``nn.Module`` takes batch tensors
(N, C, ...). :func:`input_items` turns either into one sliceable sequence.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

__all__ = ["eval_mode", "forward_images", "heads_run_on_features", "input_items",
           "is_detectron2_model", "replace_module", "sampled_regions", "teacher_regions"]


def is_detectron2_model(model: nn.Module) -> bool:
    return hasattr(model, "backbone") and hasattr(model, "preprocess_image")


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Put ``models`` in eval mode for the block (their modes restored after)."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` in ``root`` at the dotted ``name``; returns the module it replaces."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


@contextlib.contextmanager
def sampled_regions(model: nn.Module, proposals: int, detections: int):
    """Cap a detectron2 model's test-time proposals and detections per image (restored after)."""
    changes = []  # (object, attribute, original value)
    rpn = getattr(model, "proposal_generator", None)
    if rpn is not None and isinstance(getattr(rpn, "post_nms_topk", None), dict):
        changes.append((rpn, "post_nms_topk", rpn.post_nms_topk))
        rpn.post_nms_topk = {**rpn.post_nms_topk, False: min(rpn.post_nms_topk[False], proposals)}
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    for p in predictor if isinstance(predictor, nn.ModuleList) else [predictor]:  # cascade: a list
        if p is not None and hasattr(p, "test_topk_per_image"):
            changes.append((p, "test_topk_per_image", p.test_topk_per_image))
            p.test_topk_per_image = min(p.test_topk_per_image, detections)
    try:
        yield
    finally:
        for obj, attribute, value in changes:
            setattr(obj, attribute, value)


def _what(item) -> str:
    return (f"a tensor of shape {tuple(item.shape)}" if isinstance(item, torch.Tensor)
            else type(item).__name__)


def _detectron2_images(item) -> list:
    if isinstance(item, dict):
        image = item.get("image")
        if not (isinstance(image, torch.Tensor) and image.dim() == 3):
            raise ValueError("a detectron2 input dict needs 'image': a (C, H, W) tensor; got "
                             + (f"shape {tuple(image.shape)}" if isinstance(image, torch.Tensor)
                                else type(image).__name__))
        return [item]
    if isinstance(item, torch.Tensor) and item.dim() in (3, 4):  # (C, H, W) or (N, C, H, W)
        return [{"image": image} for image in (item if item.dim() == 4 else [item])]
    if isinstance(item, (list, tuple)):
        return [d for element in item for d in _detectron2_images(element)]
    raise ValueError("detectron2 models take input dicts {'image': (C, H, W) tensor}, (C, H, W) "
                     f"or (N, C, H, W) tensors, or lists of them; got {_what(item)}")


def input_items(model: nn.Module, inputs: Iterable):
    """The inputs as one sliceable sequence of images: detectron2 input dicts for a detectron2
    model (which moves them to its device), else the tensors concatenated along the batch, on
    the model's device (empty if none). ``inputs`` may be one batch tensor (N, C, ...) or an
    iterable of them (of dicts, for detectron2 models)."""
    if is_detectron2_model(model):
        return _detectron2_images(inputs if isinstance(inputs, (torch.Tensor, dict))
                                  else list(inputs))
    tensors = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    for tensor in tensors:
        if not (isinstance(tensor, torch.Tensor) and tensor.dim() >= 2):
            raise ValueError("inputs of a plain module are batch tensors (N, C, ...) or a list of "
                             f"them; got {_what(tensor)}")
    if len({tensor.shape[1:] for tensor in tensors}) > 1:
        raise ValueError("input batches differ in their per-sample shape (C, ...): "
                         + ", ".join(str(tuple(tensor.shape)) for tensor in tensors))
    device = next((p.device for p in model.parameters()), None)
    return torch.cat(tensors).to(device) if tensors else []


def heads_run_on_features(model: nn.Module) -> bool:
    """Whether ``model``'s RPN and ROI heads can run on given backbone features
    (:func:`teacher_regions`): a detectron2 GeneralizedRCNN with a proposal generator."""
    from detectron2.modeling import GeneralizedRCNN

    return isinstance(model, GeneralizedRCNN) and model.proposal_generator is not None


@torch.no_grad()
def teacher_regions(teacher: nn.Module, images, features) -> tuple:
    """Run the teacher's RPN and ROI heads (inference, as capped by :func:`sampled_regions`)
    on its backbone ``features``; returns the regions its heads saw: the proposal boxes and
    the detection boxes per image."""
    proposals, _ = teacher.proposal_generator(images, features, None)
    detections, _ = teacher.roi_heads(images, features, proposals, None)
    return [p.proposal_boxes for p in proposals], [d.pred_boxes for d in detections]


@torch.no_grad()
def forward_images(model: nn.Module, images) -> None:
    """Run ``model`` in inference on ``images`` (as :func:`input_items` takes them), one by one."""
    items = input_items(model, images)
    for i in range(len(items)):
        model([items[i]] if is_detectron2_model(model) else items[i : i + 1])
