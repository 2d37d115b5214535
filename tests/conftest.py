import logging

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
