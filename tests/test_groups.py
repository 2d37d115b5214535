import logging

import pytest
from torch import nn

from gn_det import convert_norm, resolve_num_groups


@pytest.mark.parametrize(
    "channels, expected",
    [(32, 32), (64, 32), (256, 32), (2048, 32), (48, 24), (40, 20), (80, 20), (240, 30)],
)
def test_32_groups_or_the_largest_divisor_below(channels, expected):
    assert resolve_num_groups(channels) == expected
    assert channels % expected == 0


def test_exact_split_does_not_warn(gn_det_logs):
    resolve_num_groups(256, layer_name="backbone.res2.0.conv1.norm")
    assert not gn_det_logs.records


def test_fallback_is_logged_at_debug_naming_the_layer(caplog):
    caplog.set_level(logging.DEBUG, logger="gn_det")
    assert resolve_num_groups(48, layer_name="roi_heads.box_head.conv1.norm") == 24
    (record,) = caplog.records
    assert record.levelname == "DEBUG"
    assert "roi_heads.box_head.conv1.norm" in record.getMessage()
    assert "48 channels" in record.getMessage()
    assert "24 groups" in record.getMessage()


def test_convert_norm_sums_the_fallbacks_up_in_one_warning(caplog):
    """EfficientNet and MobileNet widths (16, 24, 40, 80, ...) are not multiples of 32: one
    warning line for the conversion, not one per layer."""
    caplog.set_level(logging.DEBUG, logger="gn_det")
    widths = [48, 64, 40, 80, 24, 96, 16]
    net = nn.Sequential(*[nn.BatchNorm2d(c) for c in widths])
    convert_norm(net)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "GroupNorm: 5 layers have channels that num_groups=32 does not split; they use 16, 20, "
        "24 groups, the largest divisor below (first: 0, 2, 3 (+2 more); each at DEBUG)."
    ]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert [m.split("'")[1] for m in debug if "cannot be split" in m] == ["0", "2", "3", "4", "6"]
    assert [m.num_groups for m in net] == [24, 32, 20, 20, 24, 32, 16]


@pytest.mark.parametrize(
    "channels, dim_per_group, expected",
    [(256, 16, 16), (64, 16, 4), (48, 16, 3), (2048, 16, 128), (40, 16, 2), (8, 16, 1)],
)
def test_dim_per_group_overrides_num_groups(channels, dim_per_group, expected):
    assert resolve_num_groups(channels, num_groups=32, dim_per_group=dim_per_group) == expected


def test_more_groups_than_channels_is_capped(caplog):
    caplog.set_level(logging.DEBUG, logger="gn_det")
    assert resolve_num_groups(16, 32) == 16
    assert "16 channels cannot be split as num_groups=32" in caplog.text


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(channels=0),
        dict(channels=-4),
        dict(channels=64, num_groups=0),
        dict(channels=64, num_groups=2.0),
        dict(channels=64, num_groups=True),
        dict(channels=64, dim_per_group=0),
        dict(channels=64.0),
    ],
)
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError, match="positive integer"):
        resolve_num_groups(**kwargs)
