import pytest

from gn_det import resolve_num_groups


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


def test_fallback_warns_and_names_the_layer(gn_det_logs):
    assert resolve_num_groups(48, layer_name="roi_heads.box_head.conv1.norm") == 24
    (record,) = gn_det_logs.records
    assert record.levelname == "WARNING"
    assert "roi_heads.box_head.conv1.norm" in record.getMessage()
    assert "48 channels" in record.getMessage()
    assert "24 groups" in record.getMessage()


@pytest.mark.parametrize(
    "channels, dim_per_group, expected",
    [(256, 16, 16), (64, 16, 4), (48, 16, 3), (2048, 16, 128), (40, 16, 2), (8, 16, 1)],
)
def test_dim_per_group_overrides_num_groups(channels, dim_per_group, expected):
    assert resolve_num_groups(channels, num_groups=32, dim_per_group=dim_per_group) == expected


def test_more_groups_than_channels_is_capped(gn_det_logs):
    assert resolve_num_groups(16, 32) == 16
    assert gn_det_logs.records


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
