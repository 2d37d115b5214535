"""Feature-level weight-transfer study: how close does each BN -> GN transfer keep a network?

Used by ``lab/tools/transfer_study.py`` (lab/benchmarks.md, "Weight-transfer fidelity"): a
torchvision ResNet-18 whose BN population statistics are computed on its own smooth random
images; each transfer's student is compared with the BN teacher by the cosine of their stage
outputs on held-out images, in two regimes: images that share their statistics, and images that
each have their own brightness and contrast (which GN normalises away and BN keeps).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from gn_det import calibrate, convert_norm, distill

__all__ = [
    "DetectorRow",
    "FidelityRow",
    "bn_teacher",
    "detector_zero_shot",
    "smooth_images",
    "stage_cosines",
    "transfer_fidelity",
]

STAGES = ("layer1", "layer2", "layer3", "layer4")


@dataclasses.dataclass
class FidelityRow:
    regime: str  # "shared statistics" or "per-image photometrics"
    # "copy", "stats", "calibrate N", "calibrate N (output objective)", "calibrate N (local)",
    # "calibrate N + distill K"
    method: str
    cosines: Dict[str, float]  # stage -> mean cosine to the teacher on held-out images
    seconds: float  # time the transfer took (calibration included)


def smooth_images(n: int, size: int, *, per_image_photometrics: bool, seed: int) -> torch.Tensor:
    """Smooth random RGB images; optionally each with its own brightness and contrast."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(
        torch.rand(n, 3, size // 8, size // 8, generator=g),
        size=size,
        mode="bilinear",
        align_corners=False,
    )
    x = (x - 0.5) * 2
    if per_image_photometrics:
        x = x * (torch.rand(n, 1, 1, 1, generator=g) * 2.5 + 0.25)
        x = x + torch.randn(n, 1, 1, 1, generator=g)
    return x


def bn_teacher(images: torch.Tensor, seed: int = 0, batch: int = 32) -> nn.Module:
    """ResNet-18 (random conv weights) whose BN running statistics are the population
    statistics of ``images`` (cumulative average over batches)."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            with torch.no_grad():  # non-trivial affine, as trained models have
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    model.train()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            model(images[i : i + batch])
    return model.eval()


class _Stages(nn.Module):
    def __init__(self, resnet):
        super().__init__()
        self.resnet = resnet

    def forward(self, x):
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        out = {}
        for stage in STAGES:
            x = getattr(r, stage)(x)
            out[stage] = x
        return out


@torch.no_grad()
def stage_cosines(student: nn.Module, teacher: nn.Module, images: torch.Tensor) -> Dict[str, float]:
    """Mean over images of the cosine between the two models' stage outputs."""
    a, b = _Stages(student)(images), _Stages(teacher)(images)
    return {
        s: F.cosine_similarity(a[s].flatten(1), b[s].flatten(1), dim=1).mean().item()
        for s in STAGES
    }


def transfer_fidelity(
    *,
    size: int = 96,
    population: int = 256,
    held_out: int = 64,
    calibration_counts: Sequence[int] = (8, 32, 128),
    distill_steps: Sequence[int] = (100,),
    seed: int = 0,
) -> List[FidelityRow]:
    """Run the study (module doc) in both regimes; returns one row per (regime, method)."""
    import time

    rows = []
    for regime, photometric in (("shared statistics", False), ("per-image photometrics", True)):
        data = smooth_images(population, size, per_image_photometrics=photometric, seed=seed)
        test = smooth_images(held_out, size, per_image_photometrics=photometric, seed=seed + 1)
        teacher = bn_teacher(data, seed=seed)
        methods = [("copy", "copy", 0, True, 0, None), ("stats", "stats", 0, True, 0, None)]
        methods += [
            (f"calibrate {n}", "stats", n, True, 0, "activation") for n in calibration_counts
        ]
        methods += [
            (f"calibrate {n} (output objective)", "stats", n, True, 0, "output")
            for n in calibration_counts
        ]
        largest = max(calibration_counts)
        methods += [(f"calibrate {largest} (local)", "stats", largest, False, 0, "activation")]
        methods += [
            (f"calibrate {largest} + distill {k}", "stats", largest, True, k, "activation")
            for k in distill_steps
        ]
        for name, transfer, count, sequential, steps, objective in methods:
            start = time.perf_counter()
            student = convert_norm(copy.deepcopy(teacher), transfer=transfer)
            if count:
                calibration = smooth_images(
                    count, size, per_image_photometrics=photometric, seed=seed + 2
                )
                calibrate(
                    student,
                    teacher,
                    [calibration],
                    sequential=sequential,
                    objective=objective,
                    progress=False,
                )
                if steps:
                    distill(student, teacher, [calibration], steps=steps, progress=False)
            seconds = time.perf_counter() - start
            rows.append(FidelityRow(regime, name, stage_cosines(student, teacher, test), seconds))
    return rows


# ---------------------------------------------------------------------------------------------
# Detector level: a BN-trained Mask R-CNN converted to GN, evaluated without training
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DetectorRow:
    method: str  # "BN teacher", "copy", "stats", "calibrate N", "calibrate N + distill K", ...
    box_ap: float
    mask_ap: float
    cosines: Dict[str, float]  # FPN level -> mean cosine to the teacher's on held-out images
    seconds: float  # the transfer (calibration included)
    weights: str  # where this model's weights were written ("" for the teacher)


def detector_zero_shot(
    teacher_weights: str,
    output_dir: str,
    *,
    teacher_config: str = "shapes/bn.yaml",
    student_config: str = "shapes/gn.yaml",
    calibration_counts: Sequence[int] = (8, 32, 128),
    distill_steps: Sequence[int] = (),
    distill_images: int = 32,
    calibration_dataset: str = "shapes_train",
    cosine_images: int = 16,
    opts: Sequence[str] = (),
    methods: Optional[Sequence[str]] = None,
) -> List[DetectorRow]:
    """Convert a BN-trained detectron2 model to GN by each transfer; evaluate each unchanged.

    The teacher (``teacher_config`` + ``teacher_weights``, BN in eval mode) and one student per
    method (``student_config``, which converts to GN, loading the same weights with the
    ``copy`` or ``stats`` transfer, then ``calibrate`` on the first N images of
    ``calibration_dataset``; ``calibrate`` with the output objective on ``distill_images``
    images; and, for each of ``distill_steps``, ``calibrate`` on ``distill_images`` images
    followed by that many steps of ``distill`` on them, and the same steps straight from
    ``stats``, once training the GN affine alone and once the ROI heads' weights too) are
    evaluated by COCO AP on the config's ``DATASETS.TEST`` and compared by the cosine of their
    FPN outputs on its first ``cosine_images`` images. Each student's weights are written to
    ``output_dir/<method>.pth`` (for fine-tuning). ``methods``: the names of the rows to run
    (default all).
    """
    import os
    import time

    from detectron2.modeling import build_model

    from gn_det import load_images
    from gn_det.checkpoint import Checkpointer
    from gn_det.checkpoint.io import save_checkpoint_file
    from gn_det.cli.config_files import load_config, resolve_config_name
    from gn_det.engine import Trainer
    from gn_det.report import backbone_cosines

    def config(name, method=None):
        cfg = load_config(resolve_config_name(name))
        cfg.merge_from_list(list(opts))
        cfg.MODEL.DEVICE = "cpu"
        cfg.MODEL.WEIGHTS = ""
        if method is not None:
            cfg.MODEL.NORM_CONVERSION.TRANSFER = method
        cfg.OUTPUT_DIR = os.path.join(output_dir, (method or "teacher").replace(" ", "_"))
        return cfg

    def evaluate(cfg, model):
        results = Trainer.test(cfg, model)
        return (
            float(results["bbox"]["AP"]),
            float(results.get("segm", {}).get("AP", float("nan"))),
        )

    teacher_cfg = config(teacher_config)
    teacher = build_model(teacher_cfg)
    Checkpointer(teacher).load_weights(teacher_weights)
    teacher.eval()
    held_out = load_images(teacher_cfg, teacher_cfg.DATASETS.TEST[0], cosine_images)
    rows = [
        DetectorRow(
            "BN teacher",
            *evaluate(teacher_cfg, teacher),
            backbone_cosines(teacher, teacher, held_out),
            0.0,
            "",
        )
    ]
    wanted = None if methods is None else set(methods)
    methods = [("copy", "copy", 0, 0, None, None), ("stats", "stats", 0, 0, None, None)]
    methods += [(f"calibrate {n}", "stats", n, 0, "activation", None) for n in calibration_counts]
    methods += [
        (
            f"calibrate {distill_images} (output objective)",
            "stats",
            distill_images,
            0,
            "output",
            None,
        )
    ]
    methods += [
        (
            f"calibrate {distill_images} + distill {k}",
            "stats",
            distill_images,
            k,
            "activation",
            "weights",
        )
        for k in distill_steps
    ]
    methods += [
        (f"stats + distill {k} (GN affine only)", "stats", 0, k, None, "norms")
        for k in distill_steps
    ]
    methods += [(f"stats + distill {k}", "stats", 0, k, None, "weights") for k in distill_steps]
    for name, transfer, count, steps, objective, heads in methods:
        if wanted is not None and name not in wanted:
            continue
        cfg = config(student_config, transfer)
        start = time.perf_counter()
        student = build_model(cfg)
        Checkpointer(student).load_weights(teacher_weights)  # the transfer happens on load
        images = (
            load_images(teacher_cfg, calibration_dataset, count or distill_images)
            if count or steps
            else []
        )
        if count:
            calibrate(student, teacher, images, objective=objective, progress=False)
        if steps:
            distill(student, teacher, images, steps=steps, heads=heads, progress=False)
        seconds = time.perf_counter() - start
        student.eval()
        path = os.path.join(output_dir, name.replace(" ", "_") + ".pth")
        save_checkpoint_file(
            {"model": student.state_dict()}, path, file_format="pth", overwrite=True
        )
        rows.append(
            DetectorRow(
                name,
                *evaluate(cfg, student),
                backbone_cosines(teacher, student, held_out),
                seconds,
                path,
            )
        )
    return rows
