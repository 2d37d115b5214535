"""gn_det's config keys, detectron2's stock build_model honouring them, and configs/."""

from pathlib import Path

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg as d2_get_cfg
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, build_model
from torch import nn

import gn_det
from gn_det.cli.config_files import (
    CONFIGS_DIR,
    UnsafeConfigError,
    load_config,
    merge_overrides,
    resolve_config_name,
)
from gn_det.config import ConfigError


def _native_gn_model():
    cfg = d2_get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("Misc/mask_rcnn_R_50_FPN_3x_gn.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg)


def _signature(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_keys_and_defaults():
    cfg = gn_det.get_cfg()
    node = cfg.MODEL.NORM_CONVERSION
    assert (
        node.ENABLED,
        node.TARGET,
        node.NUM_GROUPS,
        node.DIM_PER_GROUP,
        node.EPS,
        node.TRANSFER,
        node.INCLUDE,
        node.EXCLUDE,
    ) == (False, "GN", 32, 0, 0.0, "stats", [], [])
    assert gn_det.norm_spec_from_config(cfg) is None


def test_a_wrong_key_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  NORM_CONVERSION:\n    GROUPS: 16\n")
    with pytest.raises(
        ConfigError,
        match=f"{bad}: unknown config key MODEL.NORM_CONVERSION.GROUPS; "
        "did you mean MODEL.NORM_CONVERSION.NUM_GROUPS\\? MODEL.NORM_CONVERSION has: "
        "DIM_PER_GROUP, ENABLED, EPS",
    ):
        load_config(bad)
    bad.write_text("MODEL:\n  NORM_CONVERSION:\n    ENABLED: True\n    TARGET: LN\n")
    with pytest.raises(ConfigError, match="MODEL.NORM_CONVERSION.TARGET = 'LN': .*valid targets"):
        load_config(bad)


@pytest.mark.parametrize(
    "opts, message",
    [
        (
            ["MODEL.NORM_CONVERSION.TARGTE", "GN"],
            "unknown config key MODEL.NORM_CONVERSION.TARGTE; "
            "did you mean MODEL.NORM_CONVERSION.TARGET?",
        ),
        (
            ["SOLVERR.BASE_LR", "0.1"],
            "unknown config key SOLVERR.BASE_LR; did you mean SOLVER? the config has: ",
        ),
        (
            ["MODEL.NORM_CONVERSION.TARGET", "LN"],
            "MODEL.NORM_CONVERSION.TARGET = 'LN': Unknown norm target",
        ),
        (
            ["MODEL.NORM_CONVERSION.NUM_GROUPS", "0"],
            "MODEL.NORM_CONVERSION.NUM_GROUPS = 0: num_groups must be",
        ),
        (
            ["MODEL.NORM_CONVERSION.DIM_PER_GROUP", "-16"],
            "MODEL.NORM_CONVERSION.DIM_PER_GROUP = -16",
        ),
        (["MODEL.NORM_CONVERSION.TRANSFER", "mean"], "valid transfers: copy, stats"),
        (
            ["MODEL.NORM_CONVERSION.EPS", "-1.0"],
            "MODEL.NORM_CONVERSION.EPS = -1.0: must be a positive number",
        ),
        (
            ["MODEL.NORM_CONVERSION.NUM_GROUPS", "many"],
            "for config key: MODEL.NORM_CONVERSION.NUM_GROUPS",
        ),
        (["SOLVER.MAX_ITER"], "odd length"),
        (["SOLVER.OPTIMIZER", "Adam"], "SOLVER.OPTIMIZER = 'Adam': valid optimizers: SGD, AdamW"),
    ],
)
def test_bad_overrides_are_one_line_config_errors_naming_the_key(opts, message):
    cfg = load_config(resolve_config_name("gn_mask_rcnn.yaml"))
    with pytest.raises(ConfigError) as error:
        merge_overrides(cfg, opts)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_good_overrides_merge():
    cfg = merge_overrides(
        load_config(resolve_config_name("gn_mask_rcnn.yaml")),
        ["MODEL.NORM_CONVERSION.DIM_PER_GROUP", "16", "SOLVER.BASE_LR", "0.01"],
    )
    assert cfg.MODEL.NORM_CONVERSION.DIM_PER_GROUP == 16 and cfg.SOLVER.BASE_LR == 0.01
    assert gn_det.norm_spec_from_config(cfg).dim_per_group == 16


def test_gn_mask_rcnn_yaml_builds_the_native_gn_model_key_for_key():
    cfg = load_config(resolve_config_name("gn_mask_rcnn.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)  # detectron2's own build_model
    native = _native_gn_model()
    assert _signature(model) == _signature(native)
    types = {
        n: (nn.GroupNorm if isinstance(m, nn.GroupNorm) else type(m))
        for n, m in model.named_modules()
    }
    assert types == {n: type(m) for n, m in native.named_modules()}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {
        n: p.requires_grad for n, p in native.named_parameters()
    }
    assert model.backbone.bottom_up.res2[0].conv1.stride == (1, 1)  # STRIDE_IN_1X1 False
    assert model.backbone.bottom_up.res3[0].conv2.stride == (2, 2)


def test_disabled_conversion_builds_exactly_detectron2s_model():
    cfg = load_config(resolve_config_name("mask_rcnn_R_50_FPN_bn.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert not any(isinstance(m, nn.GroupNorm) for m in model.modules())


def test_user_registered_meta_architectures_convert_too():
    @META_ARCH_REGISTRY.register()
    class TinyBNArchOfThisTest(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64))

    cfg = gn_det.get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "TinyBNArchOfThisTest"
    cfg.MODEL.DEVICE = "cpu"
    assert type(build_model(cfg).body[1]) is nn.BatchNorm2d
    cfg.MODEL.NORM_CONVERSION.ENABLED = True
    cfg.MODEL.NORM_CONVERSION.DIM_PER_GROUP = 16
    for model in (gn_det.build_model(cfg), build_model(gn_det.route_meta_architecture(cfg))):
        assert isinstance(model.body[1], nn.GroupNorm) and model.body[1].num_groups == 4
        assert isinstance(model, TinyBNArchOfThisTest)
    assert cfg.MODEL.META_ARCHITECTURE == "NormConverted"
    assert cfg.MODEL.NORM_CONVERSION.META_ARCHITECTURE == "TinyBNArchOfThisTest"
    gn_det.route_meta_architecture(cfg)  # routing twice changes nothing
    assert cfg.MODEL.NORM_CONVERSION.META_ARCHITECTURE == "TinyBNArchOfThisTest"


def test_detectron2s_registry_returns_detectron2s_own_classes_after_import():
    """Importing gn_det registers a part; it replaces nothing of detectron2's."""
    arch = META_ARCH_REGISTRY.get("GeneralizedRCNN")
    assert arch is GeneralizedRCNN and issubclass(arch, nn.Module) and callable(arch.from_config)
    assert dict(META_ARCH_REGISTRY)["GeneralizedRCNN"] is GeneralizedRCNN
    assert META_ARCH_REGISTRY.get("NormConverted") is gn_det.NormConverted
    with pytest.raises(KeyError, match="No object named 'NoSuchArch'"):
        META_ARCH_REGISTRY.get("NoSuchArch")


def test_the_switch_converts_through_detectron2s_build_model_and_default_predictor():
    from detectron2.engine import DefaultPredictor

    cfg = load_config(resolve_config_name("shapes/gn.yaml"))
    assert cfg.MODEL.META_ARCHITECTURE == "NormConverted"
    plain = d2_get_cfg()  # detectron2's own route: get_cfg, add_gn_det_config, merge_from_file
    gn_det.add_gn_det_config(plain)
    plain.merge_from_file(str(resolve_config_name("shapes/gn.yaml")))
    for config in (cfg, plain):
        model = build_model(config)
        assert type(model) is GeneralizedRCNN
        assert (
            gn_det.count_norms(model)["ConvertedGroupNorm"] > 0
            and not gn_det.count_norms(model)["BatchNorm2d"]
        )
    predictor = DefaultPredictor(plain)
    assert type(predictor.model) is GeneralizedRCNN
    assert any(isinstance(m, nn.GroupNorm) for m in predictor.model.modules())
    outputs = predictor(torch.zeros(64, 64, 3, dtype=torch.uint8).numpy())
    assert "instances" in outputs


def test_include_and_exclude_from_config():
    cfg = load_config(resolve_config_name("gn_mask_rcnn.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.NORM_CONVERSION.INCLUDE = ["backbone"]
    cfg.MODEL.NORM_CONVERSION.EXCLUDE = ["backbone.fpn_output2"]
    model = build_model(cfg)
    assert isinstance(model.backbone.fpn_lateral2.norm, nn.GroupNorm)
    assert type(model.backbone.fpn_output2.norm) is nn.BatchNorm2d
    assert type(model.roi_heads.mask_head.mask_fcn1.norm) is nn.BatchNorm2d


def _all_configs():
    return sorted(
        str(p.relative_to(CONFIGS_DIR))
        for p in CONFIGS_DIR.rglob("*.yaml")
        if not p.name.startswith("Base-")
    )


@pytest.mark.parametrize("name", _all_configs())
def test_every_config_loads_safely_and_states_its_norm(name):
    cfg = load_config(resolve_config_name(name))
    norms = {cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM}
    if "gn" in name.split("/")[-1]:
        assert cfg.MODEL.NORM_CONVERSION.ENABLED and cfg.MODEL.NORM_CONVERSION.TARGET == "GN"
    else:
        assert not cfg.MODEL.NORM_CONVERSION.ENABLED
    assert norms & {"FrozenBN", "BN", "SyncBN", "naiveSyncBN", ""}


def test_variant_files_state_only_what_differs():
    import yaml

    for name in _all_configs():
        text = yaml.safe_load((CONFIGS_DIR / name).read_text())
        assert "_BASE_" in text, name


def test_config_names_resolve_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_name("gn_mask_rcnn.yaml") == CONFIGS_DIR / "gn_mask_rcnn.yaml"
    assert resolve_config_name("gn_mask_rcnn") == CONFIGS_DIR / "gn_mask_rcnn.yaml"
    with pytest.raises(
        FileNotFoundError,
        match="nor in detectron2's model zoo .* Available in gn_det: .*gn_mask_rcnn.yaml",
    ):
        resolve_config_name("gn_mask_rcnn_typo.yaml")
    # A name that is neither a file nor one of gn_det's: detectron2's model zoo, .yaml optional.
    zoo = Path(model_zoo.get_config_file("Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml"))
    assert resolve_config_name("Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml") == zoo
    assert resolve_config_name("Misc/mask_rcnn_R_50_FPN_3x_syncbn") == zoo
    assert resolve_config_name("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py").is_file()


def test_unsafe_yaml_is_refused_unless_allowed(tmp_path):
    base = tmp_path / "Base-unsafe.yaml"
    base.write_text(
        "MODEL:\n  ANCHOR_GENERATOR:\n"
        '    SIZES: !!python/object/apply:eval ["[[x] for x in [32, 64, 128, 256, 512]]"]\n'
    )
    child = tmp_path / "child.yaml"
    child.write_text('_BASE_: "Base-unsafe.yaml"\nMODEL:\n  MASK_ON: True\n')
    with pytest.raises(
        UnsafeConfigError, match="Base-unsafe.yaml needs unsafe YAML.*--allow-unsafe-yaml"
    ):
        load_config(child)
    cfg = load_config(child, allow_unsafe_yaml=True)
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES == [[32], [64], [128], [256], [512]]


#: The files detectron2's model zoo publishes under detectron2:// (https://dl.fbaipublicfiles.com/
#: detectron2/...) for ImageNet backbones: MODEL_ZOO.md, "ImageNet Pretrained Models", at the
#: detectron2 commit gn_det installs (a59f05630a8f205756064244bf5beb8661f96180). Trained COCO
#: models are checked against detectron2.model_zoo's own table.
MODEL_ZOO_IMAGENET = {
    "ImageNetPretrained/MSRA/R-50.pkl",
    "ImageNetPretrained/MSRA/R-101.pkl",
    "ImageNetPretrained/FAIR/X-101-32x8d.pkl",
    "ImageNetPretrained/torchvision/R-50.pkl",
}


def _config_weights():
    """(config, weights) for every config gn_det ships: YAML MODEL.WEIGHTS, LazyConfig
    train.init_checkpoint."""
    from detectron2.config import LazyConfig

    for path in sorted(CONFIGS_DIR.rglob("*")):
        name = str(path.relative_to(CONFIGS_DIR))
        if path.suffix == ".yaml":
            yield name, load_config(path).MODEL.WEIGHTS
        elif path.suffix == ".py" and not path.name.startswith("_"):
            yield name, LazyConfig.load(str(path)).train.get("init_checkpoint") or ""


def test_every_detectron2_url_in_the_configs_is_a_file_the_model_zoo_publishes():
    from detectron2.checkpoint.catalog import ModelCatalog
    from detectron2.model_zoo.model_zoo import _ModelZooUrls

    trained = set(_ModelZooUrls.CONFIG_PATH_TO_URL_SUFFIX.values())
    checked = {}
    for name, weights in _config_weights():
        if weights.startswith("detectron2://"):
            path = weights[len("detectron2://") :]
            assert path in MODEL_ZOO_IMAGENET or any(path.endswith(s) for s in trained), (
                name,
                weights,
            )
        elif weights.startswith("catalog://"):
            assert (
                weights[len("catalog://ImageNetPretrained/") :] in ModelCatalog.C2_IMAGENET_MODELS
            ), (name, weights)
        else:
            assert "://" not in weights, (name, weights)  # a URL of another site: not expected here
        checked[name] = weights
    assert checked["gn_mask_rcnn_R_101.yaml"] == "detectron2://ImageNetPretrained/MSRA/R-101.pkl"
    assert (
        checked["mask_rcnn_R_50_FPN_bn.yaml"]
        == "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
    )


def test_the_r101_config_has_the_input_settings_of_msra_weights():
    """MSRA's ImageNet ResNets: BGR, 0-255 minus the mean (std 1), stride in the 1x1 conv;
    torchvision's (the R-50 configs): RGB, divided by the std, stride in the 3x3."""
    msra = load_config(resolve_config_name("gn_mask_rcnn_R_101.yaml"))
    assert (msra.INPUT.FORMAT, msra.MODEL.RESNETS.STRIDE_IN_1X1, msra.MODEL.RESNETS.DEPTH) == (
        "BGR",
        True,
        101,
    )
    assert msra.MODEL.PIXEL_STD == [1.0, 1.0, 1.0] and msra.MODEL.PIXEL_MEAN == [
        103.530,
        116.280,
        123.675,
    ]
    torchvision = load_config(resolve_config_name("gn_mask_rcnn.yaml"))
    assert (torchvision.INPUT.FORMAT, torchvision.MODEL.RESNETS.STRIDE_IN_1X1) == ("RGB", False)


def test_folded_on_a_model_without_group_norm_is_a_one_line_config_error():
    """FOLDED folds GroupNorm: a BN config without conversion to GN is refused when the model is
    built (it used to build the BN model, unfolded, without a word); detectron2's native GN
    config folds without ENABLED."""
    cfg = load_config(resolve_config_name("shapes/bn.yaml"))
    merge_overrides(cfg, ["MODEL.NORM_CONVERSION.FOLDED", "True"])
    with pytest.raises(ConfigError, match="FOLDED True folds GroupNorm layers, but this model has "
                       "none: set MODEL.NORM_CONVERSION.ENABLED True"):
        gn_det.build_model(cfg)
    merge_overrides(cfg, ["MODEL.NORM_CONVERSION.ENABLED", "True"])
    assert not any(isinstance(m, nn.GroupNorm) for m in gn_det.build_model(cfg).modules())
    native = load_config(model_zoo.get_config_file("Misc/mask_rcnn_R_50_FPN_3x_gn.yaml"))
    merge_overrides(native, ["MODEL.NORM_CONVERSION.FOLDED", "True", "MODEL.DEVICE", "cpu"])
    assert gn_det.build_model(native).fold_plan.endswith("FOLDED_EXCLUDE []")
