import copy

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import BatchNorm2d as D2BatchNorm2d
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d

import gn_det
from gn_det import NORM_SOURCES, convert_norm, describe_norms
from reference import random_bn_state, stats_transfer_reference

C, G, EPS = 64, 32, 1e-5

SOURCES = {
    "BatchNorm1d": lambda: nn.BatchNorm1d(C),
    "BatchNorm2d": lambda: nn.BatchNorm2d(C),
    "BatchNorm3d": lambda: nn.BatchNorm3d(C),
    "SyncBatchNorm": lambda: nn.SyncBatchNorm(C),
    "detectron2.BatchNorm2d": lambda: D2BatchNorm2d(C),
    "NaiveSyncBatchNorm": lambda: NaiveSyncBatchNorm(C),
    "FrozenBatchNorm2d": lambda: FrozenBatchNorm2d(C),
    "torchvision.FrozenBatchNorm2d": lambda: TorchvisionFrozenBatchNorm2d(C),
}
INPUT_SHAPES = {"BatchNorm1d": (2, C, 9), "BatchNorm3d": (2, C, 3, 4, 5)}


def _with_state(norm, state):
    for name, value in state.items():
        getattr(norm, name).data.copy_(value)
    return norm.eval()


def _is_bn_family(module):
    return NORM_SOURCES.lookup(module) is not None


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("transfer", ["stats", "copy"])
def test_every_source_becomes_group_norm_with_the_transferred_affine(source, transfer):
    state = random_bn_state(C)
    norm = _with_state(SOURCES[source](), state)
    model = nn.Sequential(nn.Identity(), norm)
    converted = convert_norm(model, transfer=transfer)
    gn = converted[1]
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == G and gn.num_channels == C
    if transfer == "stats":
        ref_w, ref_b = stats_transfer_reference(*state.values(), num_groups=G, eps=EPS)
    else:
        ref_w, ref_b = state["weight"], state["bias"]
    torch.testing.assert_close(gn.weight.double(), ref_w.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gn.bias.double(), ref_b.double(), rtol=1e-5, atol=1e-6)
    x = torch.randn(INPUT_SHAPES.get(source, (2, C, 6, 6)))
    expected = F.group_norm(x, G, ref_w.float(), ref_b.float(), EPS)
    torch.testing.assert_close(converted(x), expected, rtol=1e-4, atol=1e-5)
    frozen = "Frozen" in source
    assert gn.weight.requires_grad is not frozen and gn.bias.requires_grad is not frozen


def test_the_root_itself_may_be_a_norm_layer():
    converted = convert_norm(nn.BatchNorm2d(C))
    assert isinstance(converted, nn.GroupNorm)


@pytest.mark.parametrize(
    "target, cls",
    [
        ("FrozenBN", FrozenBatchNorm2d),
        ("BN", nn.BatchNorm2d),
        ("SyncBN", nn.SyncBatchNorm),
        ("naiveSyncBN", NaiveSyncBatchNorm),
    ],
)
@pytest.mark.parametrize(
    "source", ["BatchNorm2d", "SyncBatchNorm", "FrozenBatchNorm2d", "torchvision.FrozenBatchNorm2d"]
)
def test_bn_family_targets_keep_the_eval_output(target, cls, source):
    state = random_bn_state(C)
    norm = _with_state(SOURCES[source](), state)
    x = torch.randn(2, C, 6, 6)
    expected = F.batch_norm(
        x,
        state["running_mean"],
        state["running_var"],
        state["weight"],
        state["bias"],
        training=False,
        eps=EPS,
    )
    converted = convert_norm(nn.Sequential(norm), target=target)
    assert type(converted[0]) is cls or (
        source.endswith("FrozenBatchNorm2d") and target == "FrozenBN"
    )
    torch.testing.assert_close(converted.eval()(x), expected, rtol=1e-5, atol=1e-5)
    frozen = "Frozen" in source
    for p in converted.parameters():
        assert p.requires_grad is not frozen


def test_frozen_bn_from_a_1d_batch_norm_fails_early_and_names_the_layer():
    with pytest.raises(ValueError, match="'head.0'.*2d only"):
        convert_norm(nn.ModuleDict({"head": nn.Sequential(nn.BatchNorm1d(C))}), target="FrozenBN")


def _tiny_net():
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(64, 48, 3, padding=1), nn.BatchNorm2d(48)),
        nn.Sequential(nn.Conv2d(48, 40, 1), FrozenBatchNorm2d(40)),
    )


def test_channel_counts_48_and_40_use_the_documented_fallback(gn_det_logs):
    model = convert_norm(_tiny_net())
    assert [model[1].num_groups, model[3][1].num_groups, model[4][1].num_groups] == [32, 24, 20]
    warnings = [r.getMessage() for r in gn_det_logs.records if r.levelname == "WARNING"]
    assert warnings == ["GroupNorm: 2 layers have channels that num_groups=32 does not split; "
                        "they use 20, 24 groups, the largest divisor below (first: 3.1, 4.1; "
                        "each at DEBUG)."]
    model(torch.randn(1, 3, 8, 8)).sum().backward()


def test_dim_per_group_overrides_num_groups():
    model = convert_norm(_tiny_net(), dim_per_group=16)
    assert [model[1].num_groups, model[3][1].num_groups, model[4][1].num_groups] == [4, 3, 2]


def test_eps_is_kept_or_overridden():
    model = nn.Sequential(nn.BatchNorm2d(C, eps=1e-3))
    assert convert_norm(copy.deepcopy(model))[0].eps == 1e-3
    assert convert_norm(model, eps=1e-6)[0].eps == 1e-6


def test_include_and_exclude_are_module_name_prefixes():
    def net():
        return nn.ModuleDict(
            {
                "backbone": nn.Sequential(nn.BatchNorm2d(C), nn.BatchNorm2d(C)),
                "backbone_extra": nn.Sequential(nn.BatchNorm2d(C)),
                "head": nn.Sequential(nn.BatchNorm2d(C)),
            }
        )

    def gn_layers(model):
        return sorted(n for n, m in model.named_modules() if isinstance(m, nn.GroupNorm))

    assert gn_layers(convert_norm(net(), include="backbone")) == ["backbone.0", "backbone.1"]
    assert gn_layers(convert_norm(net(), include=["head", "backbone.1"])) == [
        "backbone.1",
        "head.0",
    ]
    assert gn_layers(convert_norm(net(), exclude="backbone")) == ["backbone_extra.0", "head.0"]
    assert gn_layers(convert_norm(net(), include="backbone", exclude="backbone.0")) == [
        "backbone.1"
    ]


def test_sources_selects_the_types_to_convert():
    model = convert_norm(_tiny_net(), sources=["FrozenBatchNorm2d"])
    assert isinstance(model[4][1], nn.GroupNorm) and isinstance(model[1], nn.BatchNorm2d)


def test_frozen_stays_frozen_and_trainable_stays_trainable():
    model = _tiny_net()
    model[3][1].requires_grad_(False)  # a BN frozen by hand
    model = convert_norm(model)
    assert model[1].weight.requires_grad and model[1].bias.requires_grad
    for frozen in (model[3][1], model[4][1]):
        assert not frozen.weight.requires_grad and not frozen.bias.requires_grad


@pytest.mark.parametrize("training", [True, False])
def test_training_mode_is_preserved(training):
    model = convert_norm(_tiny_net().train(training))
    assert all(m.training is training for m in model.modules())


def test_converting_twice_changes_nothing():
    once = convert_norm(_tiny_net())
    layers = {n: m for n, m in once.named_modules()}
    state = {k: v.clone() for k, v in once.state_dict().items()}
    twice = convert_norm(once)
    assert twice is once
    assert {n: m for n, m in twice.named_modules()} == layers
    for key, value in twice.state_dict().items():
        assert torch.equal(value, state[key])
    for target in ("FrozenBN", "BN", "SyncBN"):
        bn_model = convert_norm(_tiny_net(), target=target)
        modules = list(bn_model.modules())
        assert list(convert_norm(bn_model, target=target).modules()) == modules


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_is_preserved(dtype):
    model = convert_norm(_tiny_net().to(dtype))
    for module in (model[1], model[3][1], model[4][1]):
        assert module.weight.dtype == dtype
    assert model(torch.randn(1, 3, 8, 8, dtype=dtype)).dtype == dtype


def test_device_is_preserved():
    model = convert_norm(_tiny_net().to("meta"))
    assert all(t.device.type == "meta" for t in model.state_dict().values())


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid targets: GN, FrozenBN, BN, SyncBN, naiveSyncBN"):
        convert_norm(_tiny_net(), target="LN")
    with pytest.raises(ValueError, match="valid transfers: copy, stats"):
        convert_norm(_tiny_net(), transfer="magic")
    with pytest.raises(ValueError, match="valid sources: .*BatchNorm2d.*FrozenBatchNorm2d"):
        convert_norm(_tiny_net(), sources=["InstanceNorm2d"])
    with pytest.raises(ValueError, match="positive integer"):
        convert_norm(_tiny_net(), num_groups=0)
    with pytest.raises(ValueError, match="eps"):
        convert_norm(_tiny_net(), eps=-1.0)
    with pytest.raises(ValueError, match="prefixes"):
        convert_norm(_tiny_net(), include=[1])


def test_a_lazy_batch_norm_is_a_clear_error():
    with pytest.raises(ValueError, match="lazy module"):
        convert_norm(nn.Sequential(nn.LazyBatchNorm2d()))


def test_subclasses_convert_and_users_register_their_own_norms():
    class MyBN(nn.BatchNorm2d):
        pass

    class ScaleShift(nn.Module):  # a norm type gn_det has never heard of
        def __init__(self, c):
            super().__init__()
            self.scale = nn.Parameter(torch.rand(c) + 0.5)
            self.shift = nn.Parameter(torch.randn(c))

    model = convert_norm(nn.Sequential(MyBN(C), ScaleShift(C)))
    assert isinstance(model[0], nn.GroupNorm) and isinstance(model[1], ScaleShift)

    @NORM_SOURCES.register(ScaleShift)
    def _read(module):
        return gn_det.NormState(
            num_features=module.scale.numel(),
            eps=1e-5,
            weight=module.scale,
            bias=module.shift,
            running_mean=None,
            running_var=None,
        )

    try:
        model = convert_norm(model)
        assert isinstance(model[1], nn.GroupNorm)
        torch.testing.assert_close(model[1].weight, model[1].weight.detach())
        assert "ScaleShift" in NORM_SOURCES.names()
    finally:
        NORM_SOURCES.unregister(ScaleShift)
    assert "ScaleShift" not in NORM_SOURCES.names()


def test_describe_norms_reports_what_changed():
    model = convert_norm(_tiny_net(), transfer="copy")
    rows = describe_norms(model)
    assert [
        (r.name, r.type, r.channels, r.groups, r.source, r.transfer, r.trainable) for r in rows
    ] == [
        ("1", "ConvertedGroupNorm", 64, 32, "BatchNorm2d", "copy", True),
        ("3.1", "ConvertedGroupNorm", 48, 24, "BatchNorm2d", "copy", True),
        ("4.1", "ConvertedGroupNorm", 40, 20, "FrozenBatchNorm2d", "copy", False),
    ]
    table = gn_det.format_norm_table(rows)
    assert "ConvertedGroupNorm" in table and "3.1" in table and "FrozenBatchNorm2d" in table


def test_conversion_logs_a_summary(gn_det_logs):
    convert_norm(_tiny_net())
    assert any("Converted 3 norm layers" in r.getMessage() for r in gn_det_logs.records)
