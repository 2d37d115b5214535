"""Weights named by URL: detectron2's download cache, and one line when it cannot be filled."""

import pickle
import urllib.error

import numpy as np
import pytest

from gn_det.checkpoint.io import CheckpointError
from gn_det.checkpoint.remote import cache_path, local_weights_path
from gn_det.checkpoint.weights import read_weights

URL = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty download cache (``$FVCORE_CACHE``) and no network: every download fails."""
    import iopath.common.download

    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    attempts = []

    def no_network(url, folder, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(iopath.common.download, "download", no_network)
    return attempts


def test_the_cache_path_is_where_detectron2_puts_the_download(offline, tmp_path):
    assert cache_path(URL) == str(
        tmp_path / "cache" / "detectron2" / "ImageNetPretrained" / "MSRA" / "R-50.pkl"
    )
    assert cache_path("https://example.org/models/x/model_final.pth") == str(
        tmp_path / "cache" / "models" / "x" / "model_final.pth"
    )
    # catalog:// names resolve through detectron2's ModelCatalog (Detectron's URLs).
    assert cache_path("catalog://ImageNetPretrained/FAIR/R-50-GN").endswith(
        "/ImageNetPretrained/47261647/R-50-GN.pkl"
    )


def test_a_file_put_in_the_cache_is_read_without_any_download(offline):
    path = cache_path(URL)
    import os

    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        pickle.dump(
            {
                "model": {"stem.conv1.weight": np.ones((64, 3, 7, 7), np.float32)},
                "__author__": "Detectron2 Model Zoo",
            },
            f,
        )
    weights = read_weights(URL)
    assert weights.kind == "detectron2-model-zoo" and list(weights.state) == ["stem.conv1.weight"]
    assert local_weights_path(URL) == path and offline == []


def test_offline_a_url_is_one_line_naming_it_and_where_to_put_the_file(offline):
    with pytest.raises(CheckpointError) as error:
        read_weights(URL)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{URL}: could not download it (")
    assert f"put the file at {cache_path(URL)}" in message
    assert offline == ["https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-50.pkl"]
    with pytest.raises(CheckpointError, match="not a URL detectron2 can fetch"):
        local_weights_path("catalog://ImageNetPretrained/FAIR/NO-SUCH-MODEL")


def test_convert_and_train_take_urls_through_the_cache(offline, capsys, monkeypatch, tmp_path):
    from gn_det.cli import main
    from gn_det.cli.train import launch_from_args

    assert main(["convert", "--weights", URL, "--output", str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and f"gn-det convert: error: {URL}: could not download it" in err
    )

    launched = []
    monkeypatch.setattr("gn_det.cli.train.launch", lambda *a, **k: launched.append(a))
    with pytest.raises(SystemExit) as exit_:
        launch_from_args(["--config", "shapes/gn.yaml", "MODEL.WEIGHTS", URL], prog="gn-det train")
    assert exit_.value.code == 2 and not launched
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"MODEL.WEIGHTS: {URL}: could not download it" in err
    assert cache_path(URL) in err
