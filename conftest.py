import logging
import os

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist (``make test``: one worker per core), torch in each worker and in the
    processes it starts runs on one thread, so that the workers do not fight over the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def gn_det_logs(caplog):
    """Capture gn_det's log records (detectron2's logger setup may disable propagation)."""
    caplog.set_level(logging.INFO, logger="gn_det")
    return caplog


#: In a process started with ``tiny_env`` and this variable set to N, torch reports N CUDA GPUs
#: (``torch.cuda.is_available()`` True) unless ``CUDA_VISIBLE_DEVICES`` is empty: a GPU host,
#: as far as the choices of detectron2 and gn_det go (nothing can run on those GPUs).
FAKE_GPUS = "GN_DET_TEST_FAKE_GPUS"


@pytest.fixture(scope="session")
def tiny_env(tmp_path_factory):
    """Environment in which a fresh process registers a 6-image shapes set (via sitecustomize)
    and, with ``FAKE_GPUS`` set, believes it is on a GPU host."""
    cache = tmp_path_factory.mktemp("cache")
    hook = tmp_path_factory.mktemp("hook")
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        f"if os.environ.get({FAKE_GPUS!r}) and os.environ.get('CUDA_VISIBLE_DEVICES') != '':\n"
        "    import torch\n"
        "    torch.cuda.is_available = lambda: True\n"
        f"    torch.cuda.device_count = lambda: int(os.environ[{FAKE_GPUS!r}])\n"
        "from gn_det.data import register_shapes\n"
        f"register_shapes('shapes_tiny', cache_dir={str(cache)!r}, image_size=(128, 128), "
        "num_train=4, num_val=2)\n"
    )
    from gn_det.data import register_shapes

    register_shapes("shapes_tiny", cache_dir=cache, image_size=(128, 128), num_train=4, num_val=2)
    env = dict(os.environ, PYTHONPATH=f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("LOCAL_RANK", None)
    env.pop(FAKE_GPUS, None)
    return env


@pytest.fixture
def gpu_host(tiny_env, monkeypatch):
    """``tiny_env`` on a pretend host with 2 GPUs, also for processes this one spawns."""
    monkeypatch.setenv("PYTHONPATH", tiny_env["PYTHONPATH"])
    monkeypatch.setenv(FAKE_GPUS, "2")
    return dict(tiny_env, **{FAKE_GPUS: "2"})
