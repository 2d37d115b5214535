"""Folders of images as calibrate, distill, fold and verify take them (gn_det.load_images): odd
files skipped in one warning, every PIL mode a user's folder may hold read as the model reads
a photograph, and the input device of a plain module's batches."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from gn_det import get_cfg, load_images
from gn_det.inputs import input_items


@pytest.fixture
def cfg():
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 8, 8  # the images' own size: no resize
    cfg.INPUT.FORMAT = "RGB"
    return cfg


def _pixels(cfg, folder, count=1):
    return [d["image"].permute(1, 2, 0).numpy() for d in load_images(cfg, folder, count)]


def test_every_image_mode_is_read_as_8_bit_rgb(cfg, tmp_path):
    """Grayscale, RGBA, palette and 16-bit PNGs: 16-bit values scaled to 0-255 (65535 -> 255),
    where PIL's conversion clips everything above 255 (a photograph turns white)."""
    g = np.random.default_rng(0)
    rgb = g.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    deep = g.integers(0, 65536, (8, 8), dtype=np.uint16)
    modes = {
        "gray.png": (Image.fromarray(rgb[..., 0]), np.repeat(rgb[..., :1], 3, axis=2)),
        "rgba.png": (Image.fromarray(np.dstack([rgb, rgb[..., :1]])), rgb),
        "palette.png": (Image.fromarray(rgb).quantize(16), None),
        "deep.png": (Image.fromarray(deep), np.repeat(np.round(deep / 257)[..., None], 3, 2)),
    }
    for name, (image, expected) in modes.items():
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        image.save(folder / name)
        if name == "deep.png":
            assert Image.open(folder / name).mode in ("I;16", "I")
        if expected is None:  # the palette's colours, as PIL maps them
            expected = np.asarray(image.convert("RGB"))
        np.testing.assert_array_equal(_pixels(cfg, folder)[0], expected.astype(np.float32))


def test_unreadable_files_are_skipped_in_one_warning_and_the_rest_used(cfg, tmp_path, caplog):
    """A truncated JPEG and a text file named .jpg are skipped and named once, in one warning;
    the next readable images take their places; a folder with none readable is refused."""
    g = np.random.default_rng(1)
    for name in ("a.jpg", "c.png", "e.png"):
        Image.fromarray(g.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / name)
    full = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "b.jpg").write_bytes(full[: len(full) // 2])
    (tmp_path / "d.jpg").write_text("not an image")
    caplog.set_level(logging.WARNING, logger="gn_det")
    images = load_images(cfg, tmp_path, 3)
    assert [d["file_name"].rsplit("/", 1)[1] for d in images] == ["a.jpg", "c.png", "e.png"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Skipped 2 unreadable file(s)" in warnings[0]
    assert "b.jpg: cannot be read" in warnings[0] and "d.jpg: cannot be read" in warnings[0]
    assert len(load_images(cfg, tmp_path, 10)) == 3  # no more readable: fewer, not an error
    caplog.clear()
    assert len(load_images(cfg, tmp_path, 1)) == 1 and not caplog.records  # a.jpg is enough
    for name in ("a.jpg", "c.png", "e.png"):
        (tmp_path / name).unlink()
    with pytest.raises(ValueError, match="no readable image: .*b.jpg: cannot be read as an image"):
        load_images(cfg, tmp_path, 3)


def test_a_plain_modules_batches_go_to_its_device():
    """calibrate, distill and fold take a plain module's batches where its parameters are (a
    module on a GPU is given CPU tensors by most data loaders)."""
    on_meta = nn.Linear(2, 2, device="meta")
    assert input_items(on_meta, [torch.zeros(3, 2), torch.ones(1, 2)]).device.type == "meta"
    assert input_items(nn.Linear(2, 2), torch.zeros(3, 2)).device.type == "cpu"
