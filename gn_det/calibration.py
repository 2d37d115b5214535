"""Data-driven calibration of converted GroupNorm layers against their BatchNorm teacher.

The data-free ``stats`` transfer (``gn_det.transfer``) matches BN only when an image's group
statistics equal the population's. :func:`calibrate` fits each converted GN layer's per-channel
affine (γ', β') by least squares so that its output matches the teacher BN layer's output on
real inputs:

    min_{γ', β'}  Σ_{images, pixels} (γ'_c ĝ_c + β'_c − t_c)²

where ĝ is the student's group-normalised input and t the teacher's BN output. It has a closed
form per channel from five running sums (n, Σĝ, Σt, Σĝ², Σĝt), so no activation map is ever
stored: memory is that of the forward passes themselves.

**The activation objective** (default, ``objective="activation"``): what the next layer sees is
not a norm's output but what survives the nonlinearity after it, so where the successor is known
(:func:`_consumers`: detectron2's and torchvision's ResNet stems and blocks, detectron2
``Conv2d`` layers with a ReLU, as in the ROI heads) the fit is made there:

- a norm followed by a ReLU: ``relu(γ'ĝ + β') ≈ relu(t)``;
- a residual block's last norm: ``relu(γ'ĝ + β' + shortcut_student) ≈ the teacher's block
  output``, which also absorbs the drift of the student's shortcut.

Both are nonlinear least squares; each pass makes one Gauss-Newton step from the current affine
(the same five sums, over the pixels where the teacher's or the student's activation is
positive, with target relu(t), or the teacher's block output minus the student's shortcut), so
it stays closed-form, one forward, no backward. Other layers (FPN, shortcut norms) keep the
output objective. Measured on the feature-level study (docs/benchmarks.md): layer4 cosine 0.703
against 0.628 for the output objective and 0.595 for ``stats`` with per-image photometrics.

**Sequential** (default): layers are fitted in forward order *on the student's own activations*,
each after every layer before it has been calibrated, so drift accumulated through depth is
corrected. For the convolutional body (a detectron2 model's ``backbone``, or a whole plain
``nn.Module``) the images go through in chunks of ``batch_size``, each as a doubled batch
``[x; x]`` through the student's layers, with each GN layer temporarily paired with its teacher
BN: the first half runs the teacher's norm, the second half the student's; the GN's moments are
accumulated and its affine refitted on the spot from all chunks so far, before the student half
flows on. Memory is that of one forward pass of ``2 * batch_size`` images, whatever the number
of images. (With one chunk this is the exact sequential fit; with several, a chunk's moments
were gathered under the upstream fits of its time, which converge within the first chunk or
two, so the difference is small.)

Layers outside the backbone (detectron2's ROI box and mask heads, whose inputs are per-proposal
crops that differ between the two models) are fitted *locally*: on the teacher's own inputs to
that layer. The teacher half of the paired pass *is* the teacher's backbone output, so its RPN
and ROI heads run on those features, with no backbone pass of their own (GeneralizedRCNN;
other meta-architectures run the whole teacher). That pass is capped to a sample of regions
(``head_proposals`` top RPN proposals per image for the box head, ``head_detections`` top
detections for the mask head): inference would otherwise run the box head on 1000 proposals
and the mask head on up to 100 detections per image, most of the cost for little gain in a
per-channel fit (R-50-FPN 4conv1fc head: 4.9 s per image uncapped).

Cost: one backbone forward of 2 N images, plus (detectron2 models with converted head layers)
the teacher's capped RPN and ROI heads on N images; no backward.
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

from .inputs import (heads_run_on_features, input_items, is_detectron2_model, sampled_regions,
                     teacher_regions)
from .layers import ConvertedGroupNorm
from .registry import NORM_SOURCES

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
    """Per-channel running sums for the least-squares fit of t ≈ a·s + b."""

    def __init__(self, channels: int):
        self.channels = channels
        self._sums: Optional[torch.Tensor] = None  # n, s, t, ss, st, tt

    @property
    def sums(self) -> torch.Tensor:
        """(6, C) float64 sums, on the device of the activations added (CPU before any)."""
        if self._sums is None:
            return torch.zeros(6, self.channels, dtype=torch.float64)
        return self._sums

    def add(self, s: torch.Tensor, t: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Add the pixels of ``s`` and ``t`` (N, C, ...), or only those where ``mask`` is true.
        The sums live on the activations' device: a model on a GPU is calibrated there."""
        if self._sums is None:
            self._sums = torch.zeros(6, self.channels, dtype=torch.float64, device=s.device)
        # Image by image in the activations' own dtype (no float64 copies of whole activation
        # maps); each image's sums are accumulated in float64.
        for i, (s_i, t_i) in enumerate(zip(s, t)):
            s_i, t_i = s_i.reshape(s_i.shape[0], -1), t_i.reshape(t_i.shape[0], -1)
            sums = self._sums
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
        # Pooled over channels: a channel whose target hardly varies (a dead one, or one that the
        # activation objective's active set hardly reaches) cannot blow the ratio up.
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
    with torch.no_grad():
        gn.weight.copy_(a.to(gn.weight))
        gn.bias.copy_(b.to(gn.bias))
    return before, after


def _affine(gn: ConvertedGroupNorm) -> tuple:
    return gn.weight.detach().double().clone(), gn.bias.detach().double().clone()


def _apply_affine(gn: nn.GroupNorm, s: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (s.dim() - 2)
    return s * gn.weight.view(shape) + gn.bias.view(shape)


def _add_relu_fit(moments: _Moments, gn: nn.GroupNorm, s: torch.Tensor, t: torch.Tensor) -> None:
    """Moments of the Gauss-Newton step for ``relu(γ'ĝ + β') ≈ relu(t)`` at ``gn``'s affine: the
    pixels where the teacher or the student is active, with target relu(t)."""
    moments.add(s, F.relu(t), (t > 0) | (_apply_affine(gn, s) > 0))


class _PairedNorm(nn.Module):
    """Teacher norm on the first half of the batch, student GN on the second; refits the GN on
    the spot from the moments of every batch seen so far (see module doc). ``consumer`` is what
    follows the layer (:func:`_consumers`): None (fit the output), ``"relu"``, or
    ``"residual"`` (fitted by the block's :class:`_ResidualFit` once the shortcut is known)."""

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
            if self.consumer == "relu":
                _add_relu_fit(self.moments, self.student, s, t)
            else:
                self.moments.add(s, t)
            self.errors = _refit(self.student, self.moments, self.initial)
        return torch.cat([t, _apply_affine(self.student, s)])

    def fit_residual(self, teacher_output: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """Fit ``relu(γ'ĝ + β' + shortcut) ≈ teacher_output`` (the teacher's block output, the
        student's own shortcut) by a Gauss-Newton step; returns the student's block output."""
        s, self.pending = self.pending, None
        active = (teacher_output > 0) | (_apply_affine(self.student, s) + shortcut > 0)
        self.moments.add(s, teacher_output - shortcut, active)
        self.errors = _refit(self.student, self.moments, self.initial)
        return F.relu(_apply_affine(self.student, s) + shortcut)


class _ResidualFit:
    """Forward hooks on a residual block (and its shortcut module, if any) that fit the block's
    last norm against the block's output: ``relu(norm(...) + shortcut)``."""

    def __init__(self, block: nn.Module, norm: _PairedNorm, shortcut: Optional[nn.Module]):
        self.norm, self.captured = norm, None
        self.handles = [block.register_forward_hook(self._block)]
        if shortcut is not None:
            self.handles.append(shortcut.register_forward_hook(self._shortcut))

    def _shortcut(self, module, args, output):
        self.captured = output

    def _block(self, module, args, output):
        shortcut = args[0] if self.captured is None else self.captured
        self.captured = None
        if self.norm.pending is None:  # the norm did not run in this pass: nothing to fit
            return output
        half = output.shape[0] // 2
        return torch.cat([output[:half], self.norm.fit_residual(output[:half], shortcut[half:])])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _consumers(model: nn.Module) -> Dict[str, tuple]:
    """What follows each norm layer whose successor is known, by the layer's name in ``model``:
    ``("relu",)``, or ``("residual", block, shortcut)`` for a residual block's last norm (block
    output ``relu(norm(...) + shortcut(x))``; ``shortcut`` is the shortcut module's name, None
    for the identity). Known: detectron2's ResNet stem and blocks and its ``Conv2d`` with a ReLU
    activation (heads), torchvision's ResNet and its blocks. Others are fitted at their output."""
    from detectron2.layers import Conv2d
    from detectron2.modeling.backbone import resnet as d2
    from torchvision.models import resnet as tv

    relu = ("relu",)
    found = {}
    for name, m in model.named_modules():
        at = f"{name}." if name else ""
        kind = type(m)
        if kind is Conv2d and m.norm is not None and (
                m.activation in (F.relu, F.relu_) or isinstance(m.activation, nn.ReLU)):
            found[f"{at}norm"] = relu
        elif kind is d2.BasicStem:
            found[f"{at}conv1.norm"] = relu
        elif kind in (d2.BasicBlock, d2.BottleneckBlock, d2.DeformBottleneckBlock):
            last = "conv2" if kind is d2.BasicBlock else "conv3"
            found.update({f"{at}conv1.norm": relu, f"{at}conv2.norm": relu})
            found[f"{at}{last}.norm"] = ("residual", name,
                                         f"{at}shortcut" if m.shortcut is not None else None)
        elif kind is tv.ResNet:
            found[f"{at}bn1"] = relu
        elif kind in (tv.BasicBlock, tv.Bottleneck):
            last = "bn2" if kind is tv.BasicBlock else "bn3"
            found.update({f"{at}bn1": relu, f"{at}bn2": relu})
            found[f"{at}{last}"] = ("residual", name,
                                    f"{at}downsample" if m.downsample is not None else None)
    return found


def _converted_layers(student: nn.Module, teacher: nn.Module, prefix: str = "") -> Dict[str, tuple]:
    teacher_modules = dict(teacher.named_modules())
    pairs = {}
    for name, module in student.named_modules():
        if not isinstance(module, ConvertedGroupNorm) or not module.affine:
            continue
        source = teacher_modules.get(name)
        if source is None or NORM_SOURCES.lookup(source) is None:
            raise ValueError(
                f"student layer '{prefix}{name}' has no BatchNorm-family counterpart in the "
                "teacher; the teacher must be the model the student was converted from"
            )
        pairs[name] = (source, module)
    return pairs


def _check_same_weights(student: nn.Module, teacher: nn.Module, norm_names: Iterable[str]) -> None:
    prefixes = tuple(f"{n}." for n in norm_names)
    teacher_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        if key.startswith(prefixes):
            continue
        if key not in teacher_state or not torch.equal(teacher_state[key], value):
            raise ValueError(
                f"student and teacher differ at '{key}': calibration needs the teacher to be "
                "the BN model the student was converted from (same weights but the norms)"
            )


@contextlib.contextmanager
def _swapped(root: nn.Module, replacements: Dict[str, nn.Module]):
    originals = {}
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        originals[name] = (parent, child, getattr(parent, child))
        setattr(parent, child, new)
    try:
        yield
    finally:
        for parent, child, old in originals.values():
            setattr(parent, child, old)


@contextlib.contextmanager
def _local_moments(pairs, relu_fits=()):
    """Collect, while the teacher runs, the moments of each pair's student GN on the teacher's
    own inputs to that layer (hooks on the teacher's norms, removed after); the layers named in
    ``relu_fits`` are fitted after their ReLU."""
    moments = {name: _Moments(gn.num_channels) for name, (_, gn) in pairs.items()}
    handles = []
    for name, (teacher_norm, student_norm) in pairs.items():
        def hook(module, args, output, name=name, gn=student_norm):
            if name in relu_fits:
                _add_relu_fit(moments[name], gn, _normalised(gn, args[0]), output)
            else:
                moments[name].add(_normalised(gn, args[0]), output)

        handles.append(teacher_norm.register_forward_hook(hook))
    try:
        yield moments
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def calibrate(
    student: nn.Module,
    teacher: nn.Module,
    inputs: Iterable,
    *,
    sequential: bool = True,
    progress: bool = True,
    batch_size: int = 4,
    head_proposals: int = 100,
    head_detections: int = 16,
    objective: str = "activation",
) -> List[LayerFit]:
    """
    Fit every converted GN layer of ``student`` to the matching BN layer of ``teacher``.

    Args:
        student: a model converted by ``gn_det.convert_norm`` from ``teacher`` (same weights
            but the norms; checked).
        teacher: the BN model, used in eval mode; never modified (modes restored).
        inputs: what ``model(x)`` takes (:mod:`gn_det.inputs`), all of them used.
        sequential: fit the backbone in forward order on the student's own activations
            (module doc); ``False`` fits every layer locally on the teacher's activations.
        progress: show a tqdm progress bar over images.
        batch_size: images per pass (the paired pass runs twice as many); bounds the memory.
        head_proposals, head_detections: regions per image on which detectron2 ROI-head
            layers are fitted (module doc).
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
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    body, prefix = (student.backbone, "backbone.") if detectron2 else (student, "")
    order: List[str] = []
    paired, local_pairs, residual_fits, relu_fits = _plan(
        student, pairs, prefix if sequential else None, objective, order)
    reuse_features = detectron2 and paired and local_pairs and heads_run_on_features(teacher)

    modes = student.training, teacher.training
    student.eval(), teacher.eval()
    bar = tqdm(total=len(items), desc="calibrate", unit="image", disable=not progress)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_swapped(body, paired))
            for block, shortcut, norm in residual_fits:
                fit = _ResidualFit(student.get_submodule(block), norm,
                                   student.get_submodule(shortcut) if shortcut else None)
                stack.callback(fit.remove)
            moments = stack.enter_context(_local_moments(local_pairs, relu_fits))
            if detectron2:
                stack.enter_context(sampled_regions(teacher, head_proposals, head_detections))
            for chunk in chunks:
                _paired_pass(student, teacher, body, chunk, paired, local_pairs, reuse_features)
                bar.update(len(chunk))
    finally:
        bar.close()
        student.train(modes[0]), teacher.train(modes[1])

    fits = [LayerFit(name, "sequential", *paired[name[len(prefix):]].errors) for name in order]
    fits += _local_fits(local_pairs, moments)
    if fits:
        logger.info("Calibrated %d GN layers: mean relative error %.4f -> %.4f.", len(fits),
                    sum(f.error_before for f in fits) / len(fits),
                    sum(f.error_after for f in fits) / len(fits))
    return fits


def _paired_pass(student, teacher, body, chunk, paired, local_pairs, reuse_features: bool) -> None:
    """One chunk of images through the paired body (teacher half, student half) and, for the
    locally fitted layers, through the teacher's heads (module doc)."""
    if is_detectron2_model(student) and paired:
        images = student.preprocess_image(chunk)
        features = body(torch.cat([images.tensor, images.tensor]))
        if reuse_features:  # the teacher half of the paired pass is its backbone's
            half = len(images)
            teacher_regions(teacher, images, {k: v[:half] for k, v in features.items()})
        elif local_pairs:
            teacher(chunk)
    elif paired:
        body(torch.cat([chunk, chunk]))
    else:
        teacher(chunk)


def _local_fits(local_pairs: dict, moments: dict) -> List[LayerFit]:
    """Fit the layers outside the sequential body from their accumulated moments."""
    fits = []
    for name, (_, gn) in local_pairs.items():
        if moments[name].sums[0, 0] > 0:  # else the teacher never ran this layer on these inputs
            fits.append(LayerFit(name, "local", *_refit(gn, moments[name], _affine(gn))))
    return fits


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
