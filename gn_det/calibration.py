"""Data-driven calibration of converted GroupNorm layers against their BatchNorm teacher.

:func:`calibrate` fits each converted GN layer's per-channel affine (γ', β') by least squares on
real images, ``min Σ (γ'_c ĝ_c + β'_c − t_c)²`` over pixels (ĝ the student's group-normalised
input, t the teacher's target), in closed form from per-channel running sums: no activation map
is stored and nothing runs backward. The target is the teacher BN layer's output or, with
``objective="activation"``, what follows the layer where that is known (:func:`_consumers`): a
ReLU, or a residual block's output (one Gauss-Newton step per chunk of images). The backbone is
fitted in forward order on the student's own activations (:class:`_PairedNorm`), the layers
outside it (ROI heads) on the teacher's. The method and what it keeps: docs/transfer.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .inputs import (eval_mode, heads_run_on_features, input_items, is_detectron2_model,
                     replace_module, sampled_regions, teacher_regions)
from .layers import ConvertedGroupNorm
from .registry import NORM_SOURCES
from .standardization import WSConv2d, standardizable

__all__ = ["LayerFit", "calibrate"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LayerFit:
    """One calibrated layer: relative squared error of its fit against the teacher's target
    (``Σ(student − target)² / Σ(target − its channel's mean)²``, summed over pixels and channels;
    with the activation objective, over the pixels its fit uses), before and after."""

    name: str
    mode: str  # "sequential" or "local"
    error_before: float
    error_after: float


class _Moments:
    """Per-channel running sums for the least-squares fit of t ≈ a·s + b, in float64 on the
    device of the activations added (a model on a GPU is calibrated there)."""

    def __init__(self, channels: int):
        self.sums = torch.zeros(6, channels, dtype=torch.float64)  # n, Σs, Σt, Σs², Σst, Σt²

    def add(self, s: torch.Tensor, t: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Add the pixels of ``s`` and ``t`` (N, C, ...), or only those where ``mask`` is true:
        image by image in their own dtype (no float64 copy of an activation map)."""
        sums = self.sums = self.sums.to(s.device)
        for i, (s_i, t_i) in enumerate(zip(s, t)):
            s_i, t_i = s_i.reshape(s_i.shape[0], -1), t_i.reshape(t_i.shape[0], -1)
            if mask is None:
                sums[0] += s_i.shape[1]
            else:
                m = mask[i].reshape(s_i.shape[0], -1).to(s_i.dtype)
                sums[0] += m.sum(1).double()
                s_i, t_i = s_i * m, t_i * m
            sums[1] += s_i.sum(1).double()
            sums[2] += t_i.sum(1).double()
            sums[3] += (s_i * s_i).sum(1).double()
            sums[4] += (s_i * t_i).sum(1).double()
            sums[5] += (t_i * t_i).sum(1).double()

    def relative_error(self, a: torch.Tensor, b: torch.Tensor) -> float:
        # Pooled over channels, so that a channel whose target hardly varies cannot blow it up.
        n, s, t, ss, st, tt = self.sums
        sse = a * a * ss + 2 * a * b * s + n * b * b - 2 * a * st - 2 * b * t + tt
        spread = (tt - t * t / n.clamp_min(1)).clamp_min(0)
        return (sse.clamp_min(0).sum() / spread.sum().clamp_min(1e-12)).item()

    def solve(self, fallback_a: torch.Tensor, fallback_b: torch.Tensor):
        n, s, t, ss, st, _ = self.sums
        n = n.clamp_min(1)  # a channel no pixel of the active set reached keeps its fallback
        var_s = ss / n - (s / n) ** 2
        cov = st / n - (s / n) * (t / n)
        ok = var_s > 1e-10
        a = torch.where(ok, cov / var_s.clamp_min(1e-10), fallback_a)
        b = torch.where(ok, t / n - a * s / n, fallback_b)
        return a, b


def _normalised(gn: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return F.group_norm(x, gn.num_groups, None, None, gn.eps)


def _refit(gn: ConvertedGroupNorm, moments: _Moments, initial: tuple) -> tuple:
    """Set ``gn``'s affine to the least-squares fit of ``moments``; returns the errors of the
    ``initial`` affine and of the one now set, on those moments."""
    before = moments.relative_error(*initial)
    a, b = moments.solve(*initial)
    after = moments.relative_error(a, b)
    if after >= before:  # least squares cannot be worse on its own data; guard degenerate sums
        a, b, after = *initial, before
    gn.weight.copy_(a.to(gn.weight))  # under calibrate's no_grad
    gn.bias.copy_(b.to(gn.bias))
    return before, after


def _affine(gn: ConvertedGroupNorm) -> tuple:
    return gn.weight.detach().double().clone(), gn.bias.detach().double().clone()


def _apply_affine(gn: nn.GroupNorm, s: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (s.dim() - 2)
    return s * gn.weight.view(shape) + gn.bias.view(shape)


def _add_fit(moments: _Moments, gn: nn.GroupNorm, s: torch.Tensor, t: torch.Tensor,
             relu: bool) -> None:
    """Add the moments of the fit of ``gn``'s output to ``t`` or, if ``relu``, of the
    Gauss-Newton step for ``relu(γ'ĝ + β') ≈ relu(t)`` at ``gn``'s affine (over the pixels where
    the teacher or the student is active)."""
    if relu:
        moments.add(s, F.relu(t), (t > 0) | (_apply_affine(gn, s) > 0))
    else:
        moments.add(s, t)


class _PairedNorm(nn.Module):
    """A student GN's stand-in in the paired pass, whose batch is ``[x; x]``: the teacher norm
    runs on the first half, the student GN on the second, and the GN's affine is refitted from
    the moments of every chunk so far before the student half flows on (one chunk: the exact
    sequential fit). ``consumer``: what follows the layer (:func:`_consumers`), None to fit its
    output; a ``"residual"`` one is fitted by :func:`_fit_at_block_output`."""

    def __init__(self, name: str, teacher: nn.Module, student: ConvertedGroupNorm, order: List[str],
                 consumer: Optional[str] = None):
        super().__init__()
        self.name, self.teacher, self.student, self.order = name, teacher, student, order
        self.consumer = consumer
        self.moments = _Moments(student.num_channels)
        self.initial = _affine(student)
        self.errors = None
        self.pending = None  # "residual": this pass's ĝ, until the block's output is known

    def forward(self, x):
        half = x.shape[0] // 2
        t = self.teacher(x[:half])
        s = _normalised(self.student, x[half:])
        if self.name not in self.order:
            self.order.append(self.name)
        if self.consumer == "residual":
            self.pending = s
        else:
            _add_fit(self.moments, self.student, s, t, self.consumer == "relu")
            self.errors = _refit(self.student, self.moments, self.initial)
        return torch.cat([t, _apply_affine(self.student, s)])


def _fit_at_block_output(block: nn.Module, norm: _PairedNorm, shortcut: Optional[nn.Module],
                         stack: contextlib.ExitStack) -> None:
    """Hooks on a residual block and its shortcut module (None: the identity), removed when
    ``stack`` closes, that fit the block's last norm by a Gauss-Newton step for
    ``relu(γ'ĝ + β' + shortcut) ≈ t``: t the teacher's block output, the shortcut the student's."""
    captured = []
    if shortcut is not None:
        hook = shortcut.register_forward_hook(lambda module, args, output: captured.append(output))
        stack.callback(hook.remove)

    def block_hook(module, args, output):
        half = output.shape[0] // 2
        t, shortcut_output = output[:half], (captured.pop() if captured else args[0])[half:]
        s, norm.pending = norm.pending, None
        if s is None:  # the norm did not run in this pass: nothing to fit
            return output
        active = (t > 0) | (_apply_affine(norm.student, s) + shortcut_output > 0)
        norm.moments.add(s, t - shortcut_output, active)
        norm.errors = _refit(norm.student, norm.moments, norm.initial)
        return torch.cat([t, F.relu(_apply_affine(norm.student, s) + shortcut_output)])

    stack.callback(block.register_forward_hook(block_hook).remove)


def _consumers(model: nn.Module) -> Dict[str, tuple]:
    """What follows each norm layer whose successor is known, by the layer's name in ``model``:
    ``("relu",)``, or ``("residual", block, shortcut)`` for a residual block's last norm (block
    output ``relu(norm(...) + shortcut(x))``; ``shortcut`` is the shortcut module's name, None
    for the identity). Known: detectron2's ResNet stem and blocks and its ``Conv2d`` with a ReLU
    activation (heads), torchvision's ResNet and its blocks. Others are fitted at their output."""
    from detectron2.modeling.backbone import resnet as d2
    from torchvision.models import resnet as tv

    bottleneck = (("conv1.norm", "conv2.norm"), "conv3.norm", "shortcut")
    known = {  # module type: (its norms followed by a ReLU, its residual norm, its shortcut)
        d2.BasicStem: (("conv1.norm",), None, None),
        d2.BasicBlock: (("conv1.norm",), "conv2.norm", "shortcut"),
        d2.BottleneckBlock: bottleneck,
        d2.DeformBottleneckBlock: bottleneck,
        tv.ResNet: (("bn1",), None, None),
        tv.BasicBlock: (("bn1",), "bn2", "downsample"),
        tv.Bottleneck: (("bn1", "bn2"), "bn3", "downsample"),
    }
    found = {}
    for name, m in model.named_modules():
        at = f"{name}." if name else ""
        if standardizable(m) and m.norm is not None and (
                m.activation in (F.relu, F.relu_) or isinstance(m.activation, nn.ReLU)):
            found[f"{at}norm"] = ("relu",)
        elif type(m) in known:
            relus, last, shortcut = known[type(m)]
            found.update({f"{at}{norm}": ("relu",) for norm in relus})
            if last is not None:
                found[f"{at}{last}"] = ("residual", name, None if getattr(m, shortcut) is None
                                        else f"{at}{shortcut}")
    return found


def _converted_layers(student: nn.Module, teacher: nn.Module) -> Dict[str, tuple]:
    teacher_modules = dict(teacher.named_modules())
    pairs = {}
    for name, module in student.named_modules():
        if not isinstance(module, ConvertedGroupNorm) or not module.affine:
            continue
        source = teacher_modules.get(name)
        if source is None or NORM_SOURCES.lookup(source) is None:
            raise ValueError(f"student layer '{name}' has no BatchNorm-family counterpart in "
                             "the teacher; the teacher must be the model the student was "
                             "converted from")
        pairs[name] = (source, module)
    return pairs


def _check_same_weights(student: nn.Module, teacher: nn.Module, norm_names: Iterable[str]) -> None:
    prefixes = tuple(f"{n}." for n in norm_names)
    teacher_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        if key.startswith(prefixes):
            continue
        if key not in teacher_state or not torch.equal(teacher_state[key], value):
            raise ValueError(f"student and teacher differ at '{key}': calibration needs the "
                             "teacher to be the BN model the student was converted from (same "
                             "weights but the norms)")


def _local_moments(pairs: dict, relu_fits, student: nn.Module, teacher: nn.Module,
                   stack: contextlib.ExitStack) -> dict:
    """Hooks on the teacher's norms (removed when ``stack`` closes) that gather the moments of
    each pair's student GN on the teacher's own inputs to that layer (for a student conv that
    standardises its weight: the teacher conv's input, convolved as the student does)."""
    moments = {name: _Moments(gn.num_channels) for name, (_, gn) in pairs.items()}
    for name, (teacher_norm, student_norm) in pairs.items():
        conv_name = name[: -len(".norm")] if name.endswith(".norm") else None
        conv = student.get_submodule(conv_name) if conv_name else None
        inputs = []
        if isinstance(conv, WSConv2d):
            stack.callback(teacher.get_submodule(conv_name).register_forward_pre_hook(
                lambda module, args, inputs=inputs: inputs.append(args[0])).remove)

        def hook(module, args, output, name=name, gn=student_norm, conv=conv, inputs=inputs):
            x = args[0]
            if inputs:  # the student GN's input: the teacher conv's input, standardised conv
                x = F.conv2d(inputs.pop(), conv.standardized_weight(), conv.bias, conv.stride,
                             conv.padding, conv.dilation, conv.groups)
            _add_fit(moments[name], gn, _normalised(gn, x), output, name in relu_fits)

        stack.callback(teacher_norm.register_forward_hook(hook).remove)
    return moments


class _PairedWSConv2d(WSConv2d):
    """A student conv that standardises its weight, in the paired pass (batch ``[x; x]``): the
    teacher half convolves with the raw weight, as the BN model's conv does, the student half
    with the standardised one; then its (paired) norm and activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[0] // 2
        x = torch.cat([F.conv2d(part, weight, self.bias, self.stride, self.padding,
                                self.dilation, self.groups)
                       for part, weight in ((x[:half], self.weight),
                                            (x[half:], self.standardized_weight()))])
        if self.norm is not None:
            x = self.norm(x)
        return x if self.activation is None else self.activation(x)


def _pair_standardized_convs(body: nn.Module, stack: contextlib.ExitStack) -> None:
    """Every conv of ``body`` that standardises its weight runs paired until ``stack`` closes."""
    for module in body.modules():
        if isinstance(module, WSConv2d):
            stack.callback(setattr, module, "__class__", type(module))
            module.__class__ = _PairedWSConv2d


@torch.no_grad()
def calibrate(student: nn.Module, teacher: nn.Module, inputs: Iterable, *, sequential: bool = True,
              progress: bool = True, batch_size: int = 4, head_proposals: int = 100,
              head_detections: int = 16, objective: str = "activation") -> List[LayerFit]:
    """
    Fit every converted GN layer of ``student`` to the matching BN layer of ``teacher``.

    Args:
        student: a model converted by ``gn_det.convert_norm`` from ``teacher`` (same weights
            but the norms; checked).
        teacher: the BN model, used in eval mode; never modified (modes restored).
        inputs: what ``model(x)`` takes (:mod:`gn_det.inputs`), all of them used.
        sequential: fit the body (a detectron2 model's backbone, else the whole model) in
            forward order on the student's own activations; ``False`` fits every layer
            locally on the teacher's activations.
        progress: show a tqdm progress bar over images.
        batch_size: images per pass (the paired pass runs twice as many); bounds the memory.
        head_proposals, head_detections: the teacher's top RPN proposals and detections per
            image on which detectron2 ROI-head layers are fitted (uncapped, the heads would run
            on 1000 proposals and up to 100 detections, most of the cost).
        objective: ``"activation"`` fits a layer whose successor is known to what the
            teacher's activation becomes after it; ``"output"`` fits every layer's output.

    Returns:
        One :class:`LayerFit` per calibrated layer, in the order fitted, with its errors on all
        the inputs. ``requires_grad`` flags are left as they are. Deterministic for fixed
        inputs and ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if objective not in ("activation", "output"):
        raise ValueError(f"objective must be 'activation' or 'output', got {objective!r}")
    pairs = _converted_layers(student, teacher)
    if not pairs:
        raise ValueError("student has no layers converted by gn_det to calibrate")
    _check_same_weights(student, teacher, pairs)
    detectron2 = is_detectron2_model(student)
    items = input_items(student, inputs)
    if len(items) == 0:
        raise ValueError("calibrate needs at least one input image")
    body, prefix = (student.backbone, "backbone.") if detectron2 else (student, "")
    order: List[str] = []
    paired, local_pairs, residual_fits, relu_fits = _plan(
        student, pairs, prefix if sequential else None, objective, order)
    reuse_features = detectron2 and paired and local_pairs and heads_run_on_features(teacher)
    with contextlib.ExitStack() as stack:
        stack.enter_context(eval_mode(student, teacher))
        bar = stack.enter_context(tqdm(total=len(items), desc="calibrate", unit="image",
                                       disable=not progress))
        for name, norm in paired.items():
            stack.callback(replace_module, body, name, replace_module(body, name, norm))
        if paired:
            _pair_standardized_convs(body, stack)
        for block, shortcut, norm in residual_fits:
            _fit_at_block_output(student.get_submodule(block), norm,
                                 student.get_submodule(shortcut) if shortcut else None, stack)
        moments = _local_moments(local_pairs, relu_fits, student, teacher, stack)
        if detectron2:
            stack.enter_context(sampled_regions(teacher, head_proposals, head_detections))
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            _paired_pass(student, teacher, body, chunk, paired, local_pairs, reuse_features)
            bar.update(len(chunk))

    fits = [LayerFit(name, "sequential", *paired[name[len(prefix):]].errors) for name in order]
    fits += [LayerFit(name, "local", *_refit(gn, moments[name], _affine(gn)))
             for name, (_, gn) in local_pairs.items()
             if moments[name].sums[0, 0] > 0]  # else the teacher never ran it on these inputs
    if fits:
        logger.info("Calibrated %d GN layers: mean relative error %.4f -> %.4f.", len(fits),
                    sum(f.error_before for f in fits) / len(fits),
                    sum(f.error_after for f in fits) / len(fits))
    return fits


def _paired_pass(student, teacher, body, chunk, paired, local_pairs, reuse_features: bool) -> None:
    """One chunk through the paired body and, for the layers fitted locally, the teacher's heads:
    on the teacher half's backbone features if ``reuse_features``, else in a pass of its own."""
    if is_detectron2_model(student) and paired:
        images = student.preprocess_image(chunk)
        features = body(torch.cat([images.tensor, images.tensor]))
        if reuse_features:
            half = len(images)
            teacher_regions(teacher, images, {k: v[:half] for k, v in features.items()})
        elif local_pairs:
            teacher(chunk)
    elif paired:
        body(torch.cat([chunk, chunk]))
    else:
        teacher(chunk)


def _plan(student: nn.Module, pairs: dict, prefix: Optional[str], objective: str, order: List[str]):
    """Which layers are fitted in the paired pass of the body under ``prefix`` (None: none),
    which locally, and which against a ReLU's or a residual block's output."""
    in_body = {n: p for n, p in pairs.items() if prefix is not None and n.startswith(prefix)}
    local_pairs = {n: p for n, p in pairs.items() if n not in in_body}
    consumers = _consumers(student) if objective == "activation" else {}
    cut = len(prefix or "")
    paired = {n[cut:]: _PairedNorm(n, t, s, order, consumers.get(n, (None,))[0])
              for n, (t, s) in in_body.items()}
    residual_fits = [(c[1], c[2], paired[n[cut:]]) for n, c in consumers.items()
                     if c[0] == "residual" and n in in_body]  # (block, shortcut, its last norm)
    relu_fits = {n for n, c in consumers.items() if c[0] == "relu"}
    return paired, local_pairs, residual_fits, relu_fits
