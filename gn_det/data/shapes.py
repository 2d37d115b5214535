"""The embedded synthetic instance-segmentation dataset "shapes".

Each image shows several instances of a few shape classes (circle, triangle, square, star) on a
textured background. Shapes are drawn in order, so later shapes occlude earlier ones; an
instance's annotation is its *visible* region, traced from the raster into COCO polygons, and an
instance hidden almost entirely is dropped. Scale, colour, fill texture, background and the
per-image brightness/contrast vary, so batch statistics differ from image to image — the regime
where BatchNorm's small-batch estimates suffer and GroupNorm does not.

A split is generated on first use into a cache folder (``$GN_DET_CACHE`` or ``~/.cache/gn_det``),
in a subfolder keyed by a hash of the generation parameters, as PNG images and a COCO-format json.
Generation is a pure function of the parameters (same parameters, byte-identical files) and is
safe under concurrent first use: one process generates into a temporary folder under a file lock
and renames it into place atomically; the others wait for the lock and reuse the result.

Datasets are registered with detectron2 lazily by :func:`register_shapes`: nothing is generated
until ``DatasetCatalog.get(name)`` is first called.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPE_CLASSES",
    "SPLITS",
    "ShapeInstance",
    "ShapesImage",
    "ShapesSpec",
    "ShapesSplitFiles",
    "default_cache_dir",
    "ensure_shapes_split",
    "mask_to_polygons",
    "register_shapes",
    "render_shapes_image",
    "shapes_split_files",
]

logger = logging.getLogger(__name__)

SHAPE_CLASSES: tuple[str, ...] = ("circle", "triangle", "square", "star")
"""Every shape class the generator can draw; a spec may use any non-empty subset."""

SPLITS: tuple[str, ...] = ("train", "val", "test")

# Bump when the rendering changes, so caches made by older code are not reused.
GENERATOR_VERSION = 1

_SPLIT_SEED = {"train": 0, "val": 1, "test": 2}
_COMPLETE_MARKER = ".complete"
_TMP_PREFIX = ".tmp-"
# Fixed colours per class for detectron2's Visualizer (``thing_colors``).
_CLASS_COLORS = {
    "circle": (220, 60, 60),
    "triangle": (60, 180, 75),
    "square": (65, 105, 225),
    "star": (240, 200, 40),
}


@dataclass(frozen=True)
class ShapesSpec:
    """Parameters of a shapes dataset; the files are a pure function of them.

    Args:
        image_size: ``(height, width)`` of every image, in pixels.
        num_train: number of images in the ``train`` split.
        num_val: number of images in the ``val`` split (choosing recipes).
        num_test: number of images in the ``test`` split (reporting only: never used to
            choose anything).
        seed: base random seed; image ``i`` of a split has its own generator seeded by
            ``(seed, split, i)``, so the first ``n`` images do not depend on the split's size.
        classes: shape classes to draw (a subset of :data:`SHAPE_CLASSES`); COCO category ids
            are ``1..len(classes)`` in this order.
        min_instances: fewest shapes drawn per image (before occluded ones are dropped).
        max_instances: most shapes drawn per image.
        min_scale: smallest shape diameter, as a fraction of the image's short side.
        max_scale: largest shape diameter, as a fraction of the image's short side. Diameters
            are drawn log-uniformly in between, so small shapes are as common as large ones.
        min_visible_fraction: an instance whose visible area is below this fraction of its
            unoccluded (in-image) area is dropped from the annotations.
        min_visible_area: an instance whose visible area is below this fraction of the image
            area is dropped too (keeps crumbs out of the annotations at every resolution).
        max_clutter_lines: up to this many unannotated lines are drawn on the background.
    """

    image_size: tuple[int, int] = (256, 256)
    num_train: int = 200
    num_val: int = 50
    num_test: int = 50
    seed: int = 0
    classes: tuple[str, ...] = SHAPE_CLASSES
    min_instances: int = 2
    max_instances: int = 8
    min_scale: float = 0.12
    max_scale: float = 0.45
    min_visible_fraction: float = 0.2
    min_visible_area: float = 0.0008
    max_clutter_lines: int = 4

    def __post_init__(self) -> None:
        height, width = self.image_size
        if height < 16 or width < 16:
            raise ValueError(f"image_size must be at least 16x16 pixels, got {self.image_size}")
        if min(self.num_train, self.num_val, self.num_test) < 0:
            raise ValueError(
                f"image counts must be >= 0, got {self.num_train}, {self.num_val}, {self.num_test}"
            )
        unknown = [c for c in self.classes if c not in SHAPE_CLASSES]
        if not self.classes or unknown or len(set(self.classes)) != len(self.classes):
            raise ValueError(
                f"classes must be distinct names from {SHAPE_CLASSES}, got {self.classes}"
            )
        if not 1 <= self.min_instances <= self.max_instances:
            raise ValueError(
                "need 1 <= min_instances <= max_instances, "
                f"got {self.min_instances}, {self.max_instances}"
            )
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(
                f"need 0 < min_scale <= max_scale, got {self.min_scale}, {self.max_scale}"
            )
        # Normalise list inputs (e.g. from a config) so equal specs hash equally.
        object.__setattr__(self, "image_size", (int(height), int(width)))
        object.__setattr__(self, "classes", tuple(self.classes))

    def num_images(self, split: str) -> int:
        """Number of images in ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        _check_split(split)
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]

    def render_key(self) -> str:
        """Short hash of everything that decides an image's content (not the split sizes)."""
        fields = dataclasses.asdict(self)
        del fields["num_train"], fields["num_val"], fields["num_test"]
        fields["generator_version"] = GENERATOR_VERSION
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def folder_name(self) -> str:
        """Cache subfolder of this spec, e.g. ``shapes-256x256-1a2b3c4d5e6f``."""
        height, width = self.image_size
        return f"shapes-{height}x{width}-{self.render_key()}"


class ShapeInstance(NamedTuple):
    """One annotated instance of a rendered image."""

    category_id: int
    """COCO category id, ``1..len(spec.classes)``."""
    mask: np.ndarray
    """Visible region, bool array of shape ``(height, width)``."""
    full_area: int
    """Pixels the shape would cover in the image without occlusion."""


class ShapesImage(NamedTuple):
    """A rendered image with its annotated instances, in drawing order."""

    image: np.ndarray
    """uint8 RGB array of shape ``(height, width, 3)``."""
    instances: list[ShapeInstance]


class ShapesSplitFiles(NamedTuple):
    """Where a split lives on disk, in the form ``load_coco_json`` takes."""

    json_file: str
    image_root: str


# ---------------------------------------------------------------------------------------------
# Rendering


def _check_split(split: str) -> None:
    if split not in _SPLIT_SEED:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _linear_ramp(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A ramp from 0 to 1 along a random direction, shape ``(height, width, 1)``."""
    angle = rng.uniform(0, 2 * np.pi)
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    ramp = np.cos(angle) * xs + np.sin(angle) * ys
    ramp -= ramp.min()
    ramp /= max(float(ramp.max()), 1.0)
    return ramp[..., None]


def _stripes(rng: np.random.Generator, height: int, width: int, period: float) -> np.ndarray:
    """Binary stripes (or a checkerboard) of the given period, shape ``(height, width, 1)``."""
    angle = rng.uniform(0, np.pi)
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    u = np.cos(angle) * xs + np.sin(angle) * ys
    pattern = np.floor(u / period) % 2
    if rng.random() < 0.4:
        v = -np.sin(angle) * xs + np.cos(angle) * ys
        pattern = (pattern + np.floor(v / period)) % 2
    return pattern.astype(np.float32)[..., None]


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency colour noise in [0, 255]: a coarse random grid, bilinearly upsampled."""
    grid = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
    field = Image.fromarray(grid).resize((width, height), Image.BILINEAR)
    return np.asarray(field, dtype=np.float32)


def _texture(
    rng: np.random.Generator, height: int, width: int, base: np.ndarray, short_side: int
) -> np.ndarray:
    """A textured fill around colour ``base``, float32 ``(height, width, 3)``.

    One of: flat colour, a gradient to a second colour, stripes/checks of two colours, or
    colour noise; each with fine pixel noise of random strength on top.
    """
    kind = rng.integers(4)
    if kind == 0:
        out = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    elif kind == 1:
        other = np.clip(base + rng.uniform(-90, 90, size=3), 0, 255).astype(np.float32)
        ramp = _linear_ramp(rng, height, width)
        out = base * (1 - ramp) + other * ramp
    elif kind == 2:
        other = np.clip(base + rng.uniform(-80, 80, size=3), 0, 255).astype(np.float32)
        period = short_side * rng.uniform(0.01, 0.04) + 1.5
        mix = _stripes(rng, height, width, period)
        out = base * (1 - mix) + other * mix
    else:
        cells = int(rng.integers(3, 8))
        noise = _smooth_noise(rng, height, width, cells)
        out = base + (noise - 128.0) * rng.uniform(0.2, 0.5)
    sigma = rng.uniform(0, 18)
    if sigma > 1:
        out = out + rng.standard_normal((height, width, 3), dtype=np.float32) * sigma
    return out


def _shape_vertices(
    rng: np.random.Generator, name: str, cx: float, cy: float, radius: float
) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of circumradius ``radius`` centred at ``(cx, cy)``."""
    theta = rng.uniform(0, 2 * np.pi)
    if name == "triangle":
        # Near-equilateral: jitter each vertex's angle and radius a little.
        angles = theta + np.arange(3) * (2 * np.pi / 3) + rng.uniform(-0.25, 0.25, size=3)
        radii = radius * rng.uniform(0.85, 1.0, size=3)
    elif name == "square":
        angles = theta + np.arange(4) * (np.pi / 2)
        radii = np.full(4, radius)
    elif name == "star":
        angles = theta + np.arange(10) * (np.pi / 5)
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * rng.uniform(0.38, 0.5))
    else:
        raise ValueError(f"not a polygonal shape: {name}")
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii)]


def _draw_clutter(rng: np.random.Generator, image: np.ndarray, spec: ShapesSpec) -> None:
    """Draw a few unannotated lines on the background, in place."""
    height, width = spec.image_size
    num_lines = int(rng.integers(spec.max_clutter_lines + 1))
    if num_lines == 0:
        return
    short_side = min(height, width)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for k in range(num_lines):
        x0, x1 = rng.uniform(0, width, size=2)
        y0, y1 = rng.uniform(0, height, size=2)
        line_width = max(1, int(round(short_side * rng.uniform(0.003, 0.012))))
        draw.line([(x0, y0), (x1, y1)], fill=k + 1, width=line_width)
    labels = np.asarray(canvas)
    for k in range(num_lines):
        image[labels == k + 1] = _random_color(rng)


def _photometric(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Per-image contrast, brightness, colour balance and sensor noise; returns uint8."""
    mean = image.mean(axis=(0, 1), keepdims=True)
    contrast = rng.uniform(0.5, 1.5)
    brightness = rng.uniform(-50, 50)
    gains = rng.uniform(0.8, 1.2, size=3).astype(np.float32)
    out = ((image - mean) * contrast + mean + brightness) * gains
    sigma = rng.uniform(0, 10)
    if sigma > 1:
        out += rng.standard_normal(out.shape, dtype=np.float32) * sigma
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_shapes_image(spec: ShapesSpec, split: str, index: int) -> ShapesImage:
    """Render image ``index`` of ``split`` with its visible instance masks.

    This is the raster ground truth the dataset's polygons are traced from; it is deterministic
    in ``(spec, split, index)``.
    """
    _check_split(split)
    height, width = spec.image_size
    short_side = min(height, width)
    rng = np.random.default_rng([spec.seed, _SPLIT_SEED[split], index])

    # Background: smooth colour noise, a gradient or a two-colour pattern, always textured.
    kind = rng.integers(3)
    if kind == 0:
        image = _smooth_noise(rng, height, width, int(rng.integers(2, 6)))
    else:
        image = _texture(rng, height, width, _random_color(rng), short_side)
        if kind == 2:
            image = 0.5 * image + 0.5 * _smooth_noise(rng, height, width, 3)
    image = np.ascontiguousarray(image, dtype=np.float32)
    _draw_clutter(rng, image, spec)

    # Shapes, back to front; ``owner`` holds the index of the shape that is visible per pixel.
    owner = np.full((height, width), -1, dtype=np.int16)
    drawn: list[tuple[int, tuple[int, int, int, int], int]] = []  # (class, window, full area)
    num_shapes = int(rng.integers(spec.min_instances, spec.max_instances + 1))
    for _ in range(num_shapes):
        class_index = int(rng.integers(len(spec.classes)))
        name = spec.classes[class_index]
        diameter = short_side * np.exp(rng.uniform(np.log(spec.min_scale), np.log(spec.max_scale)))
        radius = diameter / 2
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        x0, y0 = max(int(np.floor(cx - radius)) - 1, 0), max(int(np.floor(cy - radius)) - 1, 0)
        x1 = min(int(np.ceil(cx + radius)) + 2, width)
        y1 = min(int(np.ceil(cy + radius)) + 2, height)
        canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
        draw = ImageDraw.Draw(canvas)
        if name == "circle":
            left, top = cx - radius - x0, cy - radius - y0
            draw.ellipse([left, top, left + diameter, top + diameter], fill=1)
        else:
            vertices = _shape_vertices(rng, name, cx - x0, cy - y0, radius)
            draw.polygon(vertices, fill=1)
        mask = np.asarray(canvas, dtype=bool)
        fill = _texture(rng, y1 - y0, x1 - x0, _random_color(rng), short_side)
        full_area = int(mask.sum())
        if full_area == 0:
            continue
        image[y0:y1, x0:x1][mask] = fill[mask]
        owner[y0:y1, x0:x1][mask] = len(drawn)
        drawn.append((class_index, (x0, y0, x1, y1), full_area))

    image_uint8 = _photometric(rng, image)

    min_area = spec.min_visible_area * height * width
    instances = []
    for shape_index, (class_index, (x0, y0, x1, y1), full_area) in enumerate(drawn):
        visible = owner[y0:y1, x0:x1] == shape_index
        area = int(visible.sum())
        if area < min_area or area < spec.min_visible_fraction * full_area:
            continue
        mask = np.zeros((height, width), dtype=bool)
        mask[y0:y1, x0:x1] = visible
        instances.append(ShapeInstance(class_index + 1, mask, full_area))
    return ShapesImage(image_uint8, instances)


# ---------------------------------------------------------------------------------------------
# Raster mask -> COCO polygons


def _simplify_open(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Ramer-Douglas-Peucker on an open polyline; keeps both end points."""
    keep = np.zeros(len(points), dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, len(points) - 1)]
    while stack:
        start, end = stack.pop()
        if end - start < 2:
            continue
        segment = points[end] - points[start]
        rel = points[start + 1 : end] - points[start]
        length = float(np.hypot(*segment))
        if length == 0.0:
            dist = np.hypot(rel[:, 0], rel[:, 1])
        else:
            dist = np.abs(segment[0] * rel[:, 1] - segment[1] * rel[:, 0]) / length
        worst = int(np.argmax(dist))
        if dist[worst] > tolerance:
            split = start + 1 + worst
            keep[split] = True
            stack.append((start, split))
            stack.append((split, end))
    return points[keep]


def _simplify_ring(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """Simplify a closed ring (no repeated end point); falls back to the input if degenerate."""
    if len(ring) <= 4 or tolerance <= 0:
        return ring
    far = int(np.argmax(np.hypot(*(ring - ring[0]).T)))
    first = _simplify_open(ring[: far + 1], tolerance)
    second = _simplify_open(np.concatenate([ring[far:], ring[:1]]), tolerance)
    simplified = np.concatenate([first, second[1:-1]])
    return simplified if len(simplified) >= 3 else ring


def _bridge_holes(outer: np.ndarray, holes: list[np.ndarray]) -> np.ndarray:
    """Merge holes into the outer ring through zero-width slits.

    COCO polygons of one instance are unioned, so a hole cannot be a polygon of its own. A ring
    that walks out along a slit, around the hole and back along the same slit encloses the hole
    with even-odd parity, which is how pycocotools (and so detectron2) rasterises polygons.
    """
    ring = outer
    for hole in sorted(holes, key=lambda h: float(h[:, 0].min())):
        dist = np.hypot(
            ring[:, None, 0] - hole[None, :, 0], ring[:, None, 1] - hole[None, :, 1]
        )
        i, j = np.unravel_index(int(np.argmin(dist)), dist.shape)
        loop = np.concatenate([hole[j:], hole[: j + 1]])
        ring = np.concatenate([ring[: i + 1], loop, ring[i:]])
    return ring


def mask_to_polygons(mask: np.ndarray, tolerance: float = 0.25) -> list[list[float]]:
    """Trace a binary mask into COCO polygons ``[[x0, y0, x1, y1, ...], ...]``.

    Coordinates are in COCO's convention (pixel ``(row, col)`` covers ``[col, col + 1] x
    [row, row + 1]``). Each connected component gives one polygon; its holes are joined to it by
    slits (see :func:`_bridge_holes`). Rings are simplified by Ramer-Douglas-Peucker with
    ``tolerance`` pixels; every polygon has at least 3 points. At the default 0.25 the polygons
    rasterise (by pycocotools, as detectron2 does) back to exactly the input mask on the shapes
    data, with about a third of the traced points.
    """
    import contourpy

    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return []
    # Trace only the mask's bounding box (much faster for small instances in large images).
    y0, x0 = int(rows[0]), int(cols[0])
    crop = mask[y0 : int(rows[-1]) + 1, x0 : int(cols[-1]) + 1]
    padded = np.pad(crop.astype(np.float32), 1)
    generator = contourpy.contour_generator(
        z=padded, fill_type=contourpy.FillType.OuterOffset, corner_mask=False
    )
    points_per_outer, offsets_per_outer = generator.filled(0.5, 1.5)
    polygons = []
    for points, offsets in zip(points_per_outer, offsets_per_outer):
        # Padding shifts by one pixel; contourpy works in pixel-centre coordinates (+0.5).
        points = points + np.array([x0 - 0.5, y0 - 0.5])
        rings = []
        for start, end in zip(offsets[:-1], offsets[1:]):
            ring = points[start : end - 1]  # drop the repeated closing point
            if len(ring) >= 3:
                rings.append(_simplify_ring(ring, tolerance))
        if not rings:
            continue
        ring = _bridge_holes(rings[0], rings[1:])
        polygons.append([round(float(v), 2) for v in ring.reshape(-1)])
    return polygons


# ---------------------------------------------------------------------------------------------
# Files on disk


def default_cache_dir() -> Path:
    """``$GN_DET_CACHE`` if set, else ``~/.cache/gn_det``."""
    return Path(os.environ.get("GN_DET_CACHE") or "~/.cache/gn_det").expanduser()


def _split_dir(spec: ShapesSpec, split: str, cache_dir: str | os.PathLike | None) -> Path:
    _check_split(split)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root.absolute() / spec.folder_name() / f"{split}{spec.num_images(split)}"


def shapes_split_files(
    spec: ShapesSpec, split: str, cache_dir: str | os.PathLike | None = None
) -> ShapesSplitFiles:
    """Paths of a split's json and image folder; generates nothing."""
    folder = _split_dir(spec, split, cache_dir)
    return ShapesSplitFiles(str(folder / "instances.json"), str(folder / "images"))


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive, blocking inter-process lock on ``path`` (released if the holder dies)."""
    import portalocker

    with open(path, "a") as handle:
        portalocker.lock(handle, portalocker.LockFlags.EXCLUSIVE)
        try:
            yield
        finally:
            portalocker.unlock(handle)


def _write_split(spec: ShapesSpec, split: str, folder: Path) -> None:
    """Render every image of ``split`` into ``folder`` (PNG files and ``instances.json``)."""
    from tqdm import tqdm

    height, width = spec.image_size
    image_dir = folder / "images"
    image_dir.mkdir(parents=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    count = spec.num_images(split)
    for index in tqdm(range(count), desc=f"shapes {split}", unit="img", disable=None):
        rendered = render_shapes_image(spec, split, index)
        file_name = f"{index:06d}.png"
        Image.fromarray(rendered.image).save(image_dir / file_name, compress_level=1)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for instance in rendered.instances:
            rows = np.flatnonzero(instance.mask.any(axis=1))
            cols = np.flatnonzero(instance.mask.any(axis=0))
            x0, y0 = int(cols[0]), int(rows[0])
            bbox = [x0, y0, int(cols[-1]) + 1 - x0, int(rows[-1]) + 1 - y0]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": instance.category_id,
                    "segmentation": mask_to_polygons(instance.mask),
                    "area": int(instance.mask.sum()),
                    "bbox": bbox,
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {
            "description": f"gn_det synthetic shapes, {split} split",
            "version": str(GENERATOR_VERSION),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(spec.classes)
        ],
    }
    with open(folder / "instances.json", "w") as f:
        json.dump(coco, f, separators=(",", ":"))
    params = dataclasses.asdict(spec) | {"split": split, "generator_version": GENERATOR_VERSION}
    with open(folder / "params.json", "w") as f:
        json.dump(params, f, indent=2, sort_keys=True)
    # Written last: a folder without it is never taken as a dataset.
    (folder / _COMPLETE_MARKER).write_text("")


def ensure_shapes_split(
    spec: ShapesSpec, split: str, cache_dir: str | os.PathLike | None = None
) -> ShapesSplitFiles:
    """Return a split's files, generating them first if the cache does not hold them yet.

    Safe under concurrent calls from several processes: the first to take the split's lock
    generates into a temporary folder next to the target and renames it into place; the others
    block on the lock and then find the finished split. A target folder without its completion
    marker (not written by this code) and temporary folders left by a killed process are
    removed before generating.
    """
    target = _split_dir(spec, split, cache_dir)
    files = shapes_split_files(spec, split, cache_dir)
    if _is_complete(target):
        return files
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(parent / f".{target.name}.lock"):
        if _is_complete(target):
            return files
        for stale in parent.glob(f"{_TMP_PREFIX}{target.name}-*"):
            logger.warning("Removing a temporary folder left by an interrupted run: %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            logger.warning("Removing incomplete dataset folder %s", target)
            shutil.rmtree(target)
        count = spec.num_images(split)
        logger.info(
            "Generating %d shapes images (%dx%d, %s) into %s",
            count, spec.image_size[0], spec.image_size[1], split, target,
        )  # fmt: skip
        start = time.perf_counter()
        # Not tempfile.mkdtemp: its folder is private (0700), and it becomes the shared cache.
        tmp = parent / f"{_TMP_PREFIX}{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _write_split(spec, split, tmp)
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            # Only reachable where file locks do not work (some network file systems): another
            # process renamed its copy into place first, and the two copies are identical.
            if not _is_complete(target):
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("Generated %s in %.1f s", target, time.perf_counter() - start)
    return files


# ---------------------------------------------------------------------------------------------
# detectron2 registration


def _load_split(
    spec: ShapesSpec, split: str, cache_dir: str, dataset_name: str
) -> list[dict[str, Any]]:
    from detectron2.data.datasets import load_coco_json

    files = ensure_shapes_split(spec, split, cache_dir)
    return load_coco_json(files.json_file, files.image_root, dataset_name)


def register_shapes(
    prefix: str = "shapes",
    spec: ShapesSpec | None = None,
    cache_dir: str | os.PathLike | None = None,
    **overrides: Any,
) -> list[str]:
    """Register ``{prefix}_train``, ``{prefix}_val`` and ``{prefix}_test`` with detectron2, lazily.

    The splits are generated when first fetched with ``DatasetCatalog.get``; the metadata
    (``json_file``, ``image_root``, ``thing_classes``, ``evaluator_type="coco"``) is set now, so
    detectron2's ``COCOEvaluator`` works once the split has been fetched (``DefaultTrainer``
    builds the test loader before the evaluator). Metadata ``generated_on_use=True`` marks the
    files as made on demand.

    Calling it again with the same parameters does nothing; with different parameters under a
    name already registered it raises ``ValueError``.

    Args:
        prefix: dataset name prefix.
        spec: generation parameters; defaults to ``ShapesSpec()``.
        cache_dir: cache root; defaults to :func:`default_cache_dir`, resolved now.
        overrides: ``ShapesSpec`` fields replacing those of ``spec`` (e.g. ``num_train=50``).

    Returns:
        The registered dataset names.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    spec = dataclasses.replace(spec or ShapesSpec(), **overrides)
    root = str((Path(cache_dir).expanduser() if cache_dir else default_cache_dir()).absolute())
    names = []
    for split in SPLITS:
        name = f"{prefix}_{split}"
        files = shapes_split_files(spec, split, root)
        metadata = {
            "json_file": files.json_file,
            "image_root": files.image_root,
            "evaluator_type": "coco",
            "thing_classes": list(spec.classes),
            "thing_colors": [_CLASS_COLORS[c] for c in spec.classes],
            "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(len(spec.classes))},
            "generated_on_use": True,
            "shapes_spec": dataclasses.asdict(spec),
        }
        if name in DatasetCatalog.list():
            existing = MetadataCatalog.get(name)
            same = all(existing.get(k) == metadata[k] for k in ("shapes_spec", "json_file"))
            if not same:
                raise ValueError(
                    f"Dataset {name!r} is already registered with other parameters "
                    f"(json_file={existing.get('json_file')!r}); register under another prefix."
                )
        else:
            loader = functools.partial(_load_split, spec, split, root, name)
            DatasetCatalog.register(name, loader)
            MetadataCatalog.get(name).set(**metadata)
        names.append(name)
    return names
