"""Tests for gn_det.data: the synthetic shapes dataset, its registration and COCO file checks.

Polygons are checked against pycocotools' rasteriser (what detectron2 uses to build mask
targets), an implementation independent of the contour tracing that produced them.
"""

import dataclasses
import filecmp
import logging
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import gn_det.data as gdata
from gn_det.data import (
    BUILTIN_SHAPES,
    SHAPE_CLASSES,
    ShapesSpec,
    check_dataset_files,
    ensure_shapes_split,
    mask_to_polygons,
    register_shapes,
    render_shapes_image,
    shapes_split_files,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = ShapesSpec(image_size=(96, 128), num_train=6, num_val=4, seed=3)


def _rasterize(polygons, height, width):
    """Union of COCO polygons as a bool mask, by pycocotools."""
    rles = mask_utils.frPyObjects(polygons, height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _iou(a, b):
    return np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1)


@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    """The ``val`` split of SMALL, generated once for the module."""
    cache = tmp_path_factory.mktemp("cache")
    return ensure_shapes_split(SMALL, "val", cache)


# --- generation ------------------------------------------------------------------------------


def test_generation_is_deterministic(tmp_path, small_split):
    again = ensure_shapes_split(SMALL, "val", tmp_path)
    assert again.json_file != small_split.json_file
    assert filecmp.cmp(small_split.json_file, again.json_file, shallow=False)
    names = sorted(os.listdir(small_split.image_root))
    assert names == sorted(os.listdir(again.image_root)) and len(names) == SMALL.num_val
    _, mismatch, errors = filecmp.cmpfiles(
        small_split.image_root, again.image_root, names, shallow=False
    )
    assert not mismatch and not errors
    other_seed = render_shapes_image(ShapesSpec(image_size=(96, 128), seed=4), "val", 0)
    assert not np.array_equal(other_seed.image, render_shapes_image(SMALL, "val", 0).image)


def test_json_is_valid_coco(small_split):
    coco = COCO(small_split.json_file)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SMALL.classes)
    assert len(coco.getImgIds()) == SMALL.num_val
    height, width = SMALL.image_size
    for image_info in coco.loadImgs(coco.getImgIds()):
        with Image.open(os.path.join(small_split.image_root, image_info["file_name"])) as image:
            assert image.mode == "RGB" and image.size == (width, height)
        assert (image_info["height"], image_info["width"]) == (height, width)
    assert len(coco.getAnnIds()) >= SMALL.num_val
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert ann["iscrowd"] == 0 and ann["area"] > 0
        assert ann["segmentation"] and all(
            len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"]
        )
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
        mask = coco.annToMask(ann).astype(bool)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert abs(cols[0] - x) <= 1 and abs(rows[0] - y) <= 1
        assert abs(cols[-1] + 1 - (x + w)) <= 1 and abs(rows[-1] + 1 - (y + h)) <= 1


def test_polygons_match_rendered_image(small_split):
    coco = COCO(small_split.json_file)
    height, width = SMALL.image_size
    for index, image_id in enumerate(sorted(coco.getImgIds())):
        rendered = render_shapes_image(SMALL, "val", index)
        image_info = coco.loadImgs(image_id)[0]
        on_disk = np.asarray(Image.open(Path(small_split.image_root, image_info["file_name"])))
        np.testing.assert_array_equal(on_disk, rendered.image)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(anns) == len(rendered.instances)
        for ann, instance in zip(anns, rendered.instances):
            assert ann["category_id"] == instance.category_id
            polygon_mask = _rasterize(ann["segmentation"], height, width)
            assert _iou(polygon_mask, instance.mask) > 0.98
            assert ann["area"] == instance.mask.sum()


def test_overlapping_instances_are_annotated_by_visible_region():
    spec = ShapesSpec(image_size=(128, 128), seed=0)
    occluded = 0
    for index in range(12):
        rendered = render_shapes_image(spec, "train", index)
        masks = [inst.mask for inst in rendered.instances]
        for i, inst in enumerate(rendered.instances):
            assert inst.mask.sum() >= spec.min_visible_fraction * inst.full_area
            # Visible regions of one image never overlap.
            for other in masks[i + 1 :]:
                assert not np.logical_and(inst.mask, other).any()
            occluded += int(inst.mask.sum() < inst.full_area)
    assert occluded >= 5


def test_images_vary_in_brightness_and_contrast():
    spec = ShapesSpec(image_size=(64, 64))
    images = [render_shapes_image(spec, "train", i).image.astype(np.float64) for i in range(16)]
    means = [im.mean() for im in images]
    stds = [im.std() for im in images]
    assert np.std(means) > 15 and np.std(stds) > 5


def test_mask_to_polygons_with_holes_and_pieces():
    mask = np.zeros((40, 50), dtype=bool)
    mask[5:30, 5:35] = True
    mask[10:15, 10:15] = False  # two holes
    mask[18:25, 20:30] = False
    mask[33:38, 40:49] = True  # a second piece
    mask[0, 49] = True  # a single pixel at the border
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 3 and all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)
    decoded = _rasterize(polygons, 40, 50)
    assert _iou(decoded, mask) > 0.99
    assert not decoded[11:14, 11:14].any() and not decoded[19:24, 21:29].any()
    assert mask_to_polygons(np.zeros((8, 8), dtype=bool)) == []


def test_high_resolution_image():
    spec = BUILTIN_SHAPES["shapes_hr"]
    assert min(spec.image_size) >= 1200
    rendered = render_shapes_image(spec, "val", 0)
    assert rendered.image.shape == (*spec.image_size, 3)
    assert rendered.instances
    for instance in rendered.instances:
        polygons = mask_to_polygons(instance.mask)
        assert _iou(_rasterize(polygons, *spec.image_size), instance.mask) > 0.98


def test_spec_validation():
    with pytest.raises(ValueError, match="classes"):
        ShapesSpec(classes=("hexagon",))
    with pytest.raises(ValueError, match="min_instances"):
        ShapesSpec(min_instances=3, max_instances=2)
    as_list, as_tuple = ShapesSpec(image_size=[64, 64]), ShapesSpec(image_size=(64, 64))
    assert as_list.render_key() == as_tuple.render_key()
    # The split sizes are not part of the content key: the first images do not depend on them.
    assert ShapesSpec(num_train=5).render_key() == ShapesSpec().render_key()


# --- concurrency ------------------------------------------------------------------------------


def _generate_in_child(cache_dir, barrier, results):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("gn_det.data.shapes")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        barrier.wait(timeout=60)
        files = ensure_shapes_split(SMALL, "train", cache_dir)
        generated = any(r.getMessage().startswith("Generating") for r in records)
        results.put((tuple(files), generated))
    except BaseException as e:  # report instead of leaving the parent waiting
        results.put((repr(e), None))
        raise


def test_concurrent_first_use_generates_once(tmp_path):
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    num_processes = 3
    barrier, results = context.Barrier(num_processes), context.Queue()
    processes = [
        context.Process(target=_generate_in_child, args=(str(tmp_path), barrier, results))
        for _ in range(num_processes)
    ]
    for p in processes:
        p.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for p in processes:
        p.join(timeout=60)
    files = shapes_split_files(SMALL, "train", tmp_path)
    assert [f for f, _ in outcomes] == [tuple(files)] * num_processes, outcomes
    assert [p.exitcode for p in processes] == [0] * num_processes
    assert sum(generated for _, generated in outcomes) == 1
    dataset_dir = Path(files.json_file).parents[1]
    entries = sorted(p.name for p in dataset_dir.iterdir())
    assert [e for e in entries if not e.endswith(".lock")] == [f"train{SMALL.num_train}"]
    coco = COCO(files.json_file)
    assert len(coco.getImgIds()) == SMALL.num_train == len(os.listdir(files.image_root))
    umask = os.umask(0)
    os.umask(umask)
    # The cache may be shared: the split folder has the usual permissions, not a temp dir's 0700.
    assert Path(files.image_root).parent.stat().st_mode & 0o777 == 0o777 & ~umask


def test_leftovers_of_an_interrupted_run_are_replaced(tmp_path):
    files = shapes_split_files(SMALL, "val", tmp_path)
    split_dir = Path(files.json_file).parent
    split_dir.mkdir(parents=True)
    (split_dir / "instances.json").write_text("{")  # half-written, no completion marker
    stale_tmp = split_dir.parent / f".tmp-{split_dir.name}-dead"
    stale_tmp.mkdir()
    ensure_shapes_split(SMALL, "val", tmp_path)
    assert not stale_tmp.exists()
    assert len(COCO(files.json_file).getImgIds()) == SMALL.num_val


# --- detectron2 registration ------------------------------------------------------------------


def test_register_shapes_is_lazy_and_idempotent(tmp_path):
    names = register_shapes("gn_det_test_shapes", cache_dir=tmp_path, image_size=(64, 80),
                            num_train=3, num_val=2)  # fmt: skip
    assert names == [
        "gn_det_test_shapes_train",
        "gn_det_test_shapes_val",
        "gn_det_test_shapes_test",
    ]
    assert not any(tmp_path.iterdir())  # nothing generated yet
    assert register_shapes("gn_det_test_shapes", cache_dir=tmp_path, image_size=(64, 80),
                           num_train=3, num_val=2) == names  # fmt: skip
    with pytest.raises(ValueError, match="already registered"):
        register_shapes("gn_det_test_shapes", cache_dir=tmp_path, num_train=3, num_val=2)

    dicts = DatasetCatalog.get("gn_det_test_shapes_val")
    assert len(dicts) == 2 and all(d["annotations"] for d in dicts)
    assert (dicts[0]["height"], dicts[0]["width"]) == (64, 80)
    assert os.path.isfile(dicts[0]["file_name"])
    ann = dicts[0]["annotations"][0]
    assert 0 <= ann["category_id"] < len(SHAPE_CLASSES) and ann["segmentation"]
    metadata = MetadataCatalog.get("gn_det_test_shapes_val")
    assert metadata.thing_classes == list(SHAPE_CLASSES)
    assert metadata.evaluator_type == "coco" and os.path.isfile(metadata.json_file)
    assert not (tmp_path / Path(metadata.json_file).parents[1].name / "train3").exists()
    check_dataset_files("gn_det_test_shapes_train")  # generated on use: no error


def test_builtin_shapes_registered():
    for name in [
        "shapes_train",
        "shapes_val",
        "shapes_test",
        "shapes_hr_train",
        "shapes_hr_val",
        "shapes_hr_test",
    ]:
        assert name in DatasetCatalog.list()
        metadata = MetadataCatalog.get(name)
        assert metadata.thing_classes == list(SHAPE_CLASSES)
        assert metadata.evaluator_type == "coco"
    assert gdata.register_all_shapes() == [
        "shapes_train", "shapes_val", "shapes_test",
        "shapes_hr_train", "shapes_hr_val", "shapes_hr_test",
        "shapes_large_train", "shapes_large_val", "shapes_large_test",
        "shapes_hr_large_train", "shapes_hr_large_val", "shapes_hr_large_test",
    ]  # fmt: skip
    # The larger test splits: their own seed, so no image of them is one of shapes_test's.
    large, test = gdata.BUILTIN_SHAPES["shapes_large"], gdata.BUILTIN_SHAPES["shapes"]
    assert (large.num_test, large.seed, large.image_size) == (
        500,
        1,
        test.image_size,
    ) and large.seed != test.seed
    assert gdata.BUILTIN_SHAPES["shapes_hr_large"].num_test == 50


def test_fetch_builtin_shapes_val_in_fresh_process(tmp_path):
    code = (
        "import os, sys\n"
        "import gn_det.data\n"
        "from detectron2.data import DatasetCatalog, MetadataCatalog\n"
        "assert not os.listdir(sys.argv[1]), 'generated at import'\n"
        "dicts = DatasetCatalog.get('shapes_val')\n"
        "assert len(dicts) == 50 and sum(len(d['annotations']) for d in dicts) > 50\n"
        "assert MetadataCatalog.get('shapes_val').json_file.startswith(sys.argv[1])\n"
    )
    env = dict(os.environ, GN_DET_CACHE=str(tmp_path))
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, cwd=REPO, check=True,
                   timeout=300)  # fmt: skip


# --- COCO file checks -------------------------------------------------------------------------


def test_missing_coco_files_name_the_expected_path(tmp_path):
    json_file = tmp_path / "coco" / "annotations" / "instances_val2017.json"
    image_root = tmp_path / "coco" / "val2017"
    name = "gn_det_test_missing_coco"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(json_file), str(image_root))
    with pytest.raises(FileNotFoundError, match="DETECTRON2_DATASETS") as info:
        check_dataset_files(name)
    assert str(json_file) in str(info.value)

    json_file.parent.mkdir(parents=True)
    json_file.write_text("{}")
    with pytest.raises(FileNotFoundError) as info:
        check_dataset_files(name)
    assert str(image_root) in str(info.value)
    image_root.mkdir()
    check_dataset_files(name)

    with pytest.raises(KeyError, match="not registered"):
        check_dataset_files("gn_det_no_such_dataset")


def test_builtin_coco_points_at_detectron2_datasets():
    expected = os.path.abspath(MetadataCatalog.get("coco_2017_val").json_file)
    if os.path.exists(expected):
        pytest.skip("COCO is installed here")
    with pytest.raises(FileNotFoundError, match="DETECTRON2_DATASETS") as info:
        check_dataset_files("coco_2017_val")
    assert expected in str(info.value)


def test_the_test_split_has_images_of_its_own():
    spec = ShapesSpec(image_size=(96, 128), num_train=3, num_val=3, num_test=3, seed=3)
    images = {
        split: [render_shapes_image(spec, split, i).image for i in range(3)]
        for split in ("train", "val", "test")
    }
    for i in range(3):
        assert not any(
            np.array_equal(images["test"][i], other) for other in images["train"] + images["val"]
        )
        assert np.array_equal(images["test"][i], render_shapes_image(spec, "test", i).image)
    assert spec.num_images("test") == 3
    # Adding the split changed nothing that decides the other splits' files (their cache stays
    # valid).
    assert spec.render_key() == dataclasses.replace(spec, num_test=50).render_key()


def _write_image_folder(root: Path) -> dict:
    """A folder of images as a user has them: nested, JPEG and PNG, upper-case suffixes, and
    files that are not images. Returns {relative path: RGB array}."""
    rng = np.random.default_rng(0)
    written = {}
    for relative, size in [
        ("b/02.JPG", (40, 60)),
        ("a.png", (60, 30)),
        ("b/01.jpeg", (20, 20)),
        ("c/d/z.png", (30, 50)),
    ]:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        array = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(array).save(
            path, quality=100
        ) if path.suffix.lower() != ".png" else Image.fromarray(array).save(path)
        written[relative] = array
    (root / "notes.txt").write_text("not an image")
    (root / "c" / "labels.json").write_text("{}")
    return written


def test_load_images_from_a_folder_recursive_sorted_resized_in_the_configs_channel_order(tmp_path):
    import torch
    from gn_det import get_cfg, load_images

    written = _write_image_folder(tmp_path / "images")
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 40, 100
    inputs = load_images(cfg, tmp_path / "images", 10)
    # Sorted by path relative to the folder, recursively; only JPEG / PNG.
    assert [Path(d["file_name"]).relative_to(tmp_path / "images").as_posix() for d in inputs] == [
        "a.png",
        "b/01.jpeg",
        "b/02.JPG",
        "c/d/z.png",
    ]
    a = inputs[0]
    assert (a["height"], a["width"]) == (60, 30) and tuple(a["image"].shape) == (
        3,
        80,
        40,
    )  # short side 40
    assert tuple(inputs[1]["image"].shape) == (3, 40, 40)
    assert [d["file_name"] for d in load_images(cfg, str(tmp_path / "images"), 2)] == [
        d["file_name"] for d in inputs[:2]
    ]  # a str path is a folder too
    # BGR (detectron2's default FORMAT) is the PNG's RGB reversed; RGB keeps it.
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 60, 60  # the PNG's own size: no resize
    rgb = written["a.png"].transpose(2, 0, 1).astype("float32")
    bgr_input = load_images(cfg, tmp_path / "images", 1)[0]["image"]
    assert cfg.INPUT.FORMAT == "BGR" and torch.equal(bgr_input, torch.from_numpy(rgb[::-1].copy()))
    cfg.INPUT.FORMAT = "RGB"
    assert torch.equal(load_images(cfg, tmp_path / "images", 1)[0]["image"], torch.from_numpy(rgb))


def test_load_images_refuses_what_is_not_a_folder_of_images(tmp_path):
    from gn_det import get_cfg, load_images

    cfg = get_cfg()
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.md").write_text("no images")
    with pytest.raises(ValueError, match="no JPEG or PNG images"):
        load_images(cfg, tmp_path / "empty", 4)
    with pytest.raises(ValueError, match="not a folder of images"):
        load_images(cfg, tmp_path / "missing", 4)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg: cannot be read as an image"):
        load_images(cfg, tmp_path / "bad", 4)
    with pytest.raises(ValueError, match="at least 1"):
        load_images(cfg, tmp_path / "bad", 0)
    with pytest.raises(KeyError):
        load_images(cfg, "no_such_dataset", 1)
