import logging
import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def gn_det_logs(caplog):
    """Capture gn_det's log records (detectron2's logger setup may disable propagation)."""
    caplog.set_level(logging.INFO, logger="gn_det")
    return caplog


@pytest.fixture(scope="session")
def tiny_env(tmp_path_factory):
    """Environment in which a fresh process registers a 6-image shapes set (via sitecustomize)."""
    cache = tmp_path_factory.mktemp("cache")
    hook = tmp_path_factory.mktemp("hook")
    (hook / "sitecustomize.py").write_text(
        "from gn_det.data import register_shapes\n"
        f"register_shapes('shapes_tiny', cache_dir={str(cache)!r}, image_size=(128, 128), num_train=4, num_val=2)\n"
    )
    from gn_det.data import register_shapes

    register_shapes("shapes_tiny", cache_dir=cache, image_size=(128, 128), num_train=4, num_val=2)
    env = dict(os.environ, PYTHONPATH=f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("LOCAL_RANK", None)
    return env
