"""gn_det as a user installs it: a wheel in an environment that never sees this checkout, and the
Docker image's layout (non-editable install, the repository as working directory)."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def test_the_package_list_names_every_package_folder():
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    folders = {
        ".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "gn_det").rglob("__init__.py")
    }
    assert listed == folders | {"gn_det.configs"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A clean copy of this checkout: pip builds in the source tree, and a checkout's stale
    build/ would put files in the wheel that the source no longer has."""
    import shutil

    source = tmp_path_factory.mktemp("source") / "gn_det"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "output*", "datasets"
        ),
    )
    return source


def test_the_sdist_holds_no_lab(source, tmp_path):
    import tarfile

    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from setuptools import build_meta; build_meta.build_sdist({str(tmp_path)!r})",
        ],
        check=True,
        capture_output=True,
        cwd=source,
    )
    (sdist,) = tmp_path.glob("gn_det-*.tar.gz")
    names = [name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name]
    assert "gn_det/folding.py" in names and "configs/gn_mask_rcnn.yaml" in names
    assert not [name for name in names if name.startswith(("lab/", "gn_det/studies"))]


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory):
    """The wheel built from :func:`source`."""
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-q",
            "-w",
            str(wheels),
            str(source),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path_factory.mktemp("build"),
    )
    (found,) = wheels.glob("gn_det-*.whl")
    return found


def test_the_wheel_holds_the_plugin_and_no_study_code(wheel):
    """The lab (lab/: the studies, their harness gn_det_lab, scripts and tests) is never
    installed: the wheel is the gn_det package, its configs and its metadata."""
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {
        "gn_det",
        wheel.name.split("-py")[0] + ".dist-info",
    }
    assert "gn_det/configs/gn_mask_rcnn.yaml" in names
    for name in names:
        assert not name.startswith(("gn_det/studies/", "gn_det/lab/", "gn_det_lab/")), name
        assert "study" not in name and "benchmark" not in name, name


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """The wheel built from this checkout, installed with pip into a folder of its own."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    return site


def _env(site, tiny_env, **extra):
    """``tiny_env`` (registers ``shapes_tiny``) with the installed wheel first on the path."""
    return dict(tiny_env, PYTHONPATH=f"{site}{os.pathsep}{tiny_env['PYTHONPATH']}", **extra)


def test_wheel_carries_the_configs_and_finds_them_outside_a_checkout(installed, tiny_env, tmp_path):
    env = _env(installed, tiny_env)
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import gn_det, gn_det.config as c; print(gn_det.__file__); print(c.CONFIGS_DIR)",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    module, configs = where.stdout.split()
    assert (
        Path(module).is_relative_to(installed) and Path(configs) == installed / "gn_det" / "configs"
    )
    for name in ("gn_mask_rcnn.yaml", "shapes/gn.yaml", "lazy/shapes_gn.py"):
        assert (Path(configs) / name).read_bytes() == (REPO / "configs" / name).read_bytes()

    gn_det_script = [str(installed / "bin" / "gn-det")]
    result = subprocess.run(
        [*gn_det_script, "inspect", "--config-file", "gn_mask_rcnn.yaml"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    # Every norm converted, the 11 frozen ones (stem, res2) included: nothing else is counted.
    assert result.stdout.rstrip().endswith("-------\nConvertedGroupNorm       69")

    result = subprocess.run(
        [*gn_det_script, "train", "--help"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0 and "usage: gn-det train" in result.stdout
    assert "--num-machines" in result.stdout and "--config NAME" in result.stdout

    from models import TINY

    out = tmp_path / "out"
    result = subprocess.run(
        [
            *gn_det_script,
            "train",
            "--config",
            "shapes/gn.yaml",
            *TINY,
            "SOLVER.MAX_ITER",
            "1",
            "OUTPUT_DIR",
            str(out),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ConvertedGroupNorm x" in (out / "log.txt").read_text()
    assert (out / "model_final.pth").is_file()


def _fake_coco(root: Path) -> None:
    """A 2-image COCO in detectron2's builtin layout (``coco/annotations``, ``coco/train2017``)."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    for split in ("train2017", "val2017"):
        (root / "coco" / split).mkdir(parents=True)
        images, annotations = [], []
        for i in (1, 2):
            Image.new("RGB", (160, 128), (40 * i, 90, 160)).save(
                root / "coco" / split / f"{i:012d}.jpg"
            )
            images.append({"id": i, "file_name": f"{i:012d}.jpg", "height": 128, "width": 160})
            annotations.append(
                {
                    "id": i,
                    "image_id": i,
                    "category_id": 1,
                    "iscrowd": 0,
                    "area": 1600.0,
                    "bbox": [30.0, 20.0, 40.0, 40.0],
                    "segmentation": [[30, 20, 70, 20, 70, 60, 30, 60]],
                }
            )
        (root / "coco" / "annotations").mkdir(exist_ok=True)
        (root / "coco" / "annotations" / f"instances_{split}.json").write_text(
            json.dumps(
                {
                    "images": images,
                    "annotations": annotations,
                    "categories": [
                        {"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]
                    ],
                }
            )
        )


def test_docker_layout_trains_gn_mask_rcnn_from_the_image_entrypoint(installed, tiny_env, tmp_path):
    """As in the image: gn_det installed non-editable, the repository as working directory,
    ``python tools/train_net.py --config gn_mask_rcnn.yaml``; with no COCO mounted it stops at
    the missing files, with a (tiny, fake) COCO it trains and evaluates (without the ImageNet
    weights, which it would download)."""
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    env = _env(installed, tiny_env, DETECTRON2_DATASETS=str(datasets))
    entrypoint = [sys.executable, "tools/train_net.py", "--config", "gn_mask_rcnn.yaml"]
    result = subprocess.run(entrypoint, env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"train_net.py: error: Dataset 'coco_2017_train': annotation file not found at "
        f"{datasets}/coco/annotations/instances_train2017.json. "
        + result.stderr.split(". ", 1)[1].strip()
    ]

    _fake_coco(datasets)
    out = tmp_path / "out"
    small = [
        "SOLVER.MAX_ITER",
        "1",
        "SOLVER.IMS_PER_BATCH",
        "1",
        "INPUT.MIN_SIZE_TRAIN",
        "(128,)",
        "INPUT.MAX_SIZE_TRAIN",
        "160",
        "INPUT.MIN_SIZE_TEST",
        "128",
        "INPUT.MAX_SIZE_TEST",
        "160",
        "DATALOADER.NUM_WORKERS",
        "0",
        "MODEL.RPN.POST_NMS_TOPK_TEST",
        "50",
        "TEST.DETECTIONS_PER_IMAGE",
        "5",
        "MODEL.WEIGHTS",
        "",
        "MODEL.DEVICE",
        "cpu",
        "OUTPUT_DIR",
        str(out),
    ]
    result = subprocess.run(
        [*entrypoint, *small], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert f"args.config_file={installed / 'gn_det' / 'configs' / 'gn_mask_rcnn.yaml'}" in log
    assert "ConvertedGroupNorm x" in log
    assert any(
        "bbox/AP" in json.loads(line) for line in (out / "metrics.json").read_text().splitlines()
    )


def test_detectron2_names_work_from_the_installed_wheel_outside_the_checkout(
    installed, tiny_env, tmp_path
):
    """A detectron2 user's first commands, with the wheel installed, from an unrelated folder:
    model-zoo config names for inspect and train, a model-zoo URL for convert (offline, or a
    file the server does not have: one line saying where the file can be put)."""
    env = _env(
        installed,
        tiny_env,
        DETECTRON2_DATASETS=str(tmp_path / "datasets"),
        FVCORE_CACHE=str(tmp_path / "cache"),
    )
    gn_det_script = str(installed / "bin" / "gn-det")

    def run(*args):
        return subprocess.run(
            [gn_det_script, *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )

    result = run(
        "inspect",
        "--config-file",
        "Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml",
        "MODEL.NORM_CONVERSION.ENABLED",
        "True",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("ConvertedGroupNorm       69")

    result = run("train", "--config", "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Dataset 'coco_2017_train': annotation file not found" in result.stderr

    url = "detectron2://gn_det-tests/no-such-checkpoint.pkl"
    result = run(
        "convert",
        "--config",
        "Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml",
        "--weights",
        url,
        "--output",
        "out.pth",
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{url}: could not download it" in result.stderr
    assert (
        str(tmp_path / "cache" / "detectron2" / "gn_det-tests" / "no-such-checkpoint.pkl")
        in result.stderr
    )
    assert not (tmp_path / "out.pth").exists()
