"""Model families: every per-family fact in one table, read by the sparse-encoder converter, the recipe
defaults (``spark-pretrain``'s drop path, LAMB betas), the benchmarks and the tests.

A family is a row: the timm names it covers (a regular expression), the official SparK recipe values, the
timm block classes the converter may treat as containers (their ``forward`` was read and only composes
their children with zero-preserving tensor ops: add, concatenate, split, slice), the (conv, norm) children
a block applies back to back, and the models of the support matrix with a small configuration for the
float64 parity test. Adding a family is adding a row (plus sparse layers, if it brings
a layer the converter does not know).
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

RESNET_BETAS = (0.9, 0.95)      # LAMB betas of the official ResNet recipe, the default of every other family
CONVNEXT_BETAS = (0.9, 0.999)

@dataclass(frozen=True)
class MatrixModel:
    """A model of the support matrix and the small configuration its float64 parity test builds."""
    test_kwargs: Mapping[str, object] = field(default_factory=dict)   # keyword arguments of the factory
    # The factory, a dotted path called as factory(timm name, **test_kwargs, features_only=True,
    # pretrained=False): timm.create_model, or timm's own generator of the family where create_model fixes
    # the width (float64 grouped convs on CPU run one group at a time: full-width depthwise layers are slow).
    test_factory: str = "timm.create_model"
    test_size: Tuple[int, int] = (32, 64)                               # (height, width) of the test images


@dataclass(frozen=True)
class ModelFamily:
    name: str
    pattern: str                                    # matched against the timm name (re.match, lower case)
    lamb_betas: Tuple[float, float] = RESNET_BETAS
    drop_path_rates: Mapping[str, float] = field(default_factory=dict)   # official values by exact timm name
    containers: Tuple[str, ...] = ()                # qualified names of reviewed container blocks
    conv_then_norm: Mapping[str, Tuple[Tuple[str, str], ...]] = field(default_factory=dict)
    matrix: Mapping[str, MatrixModel] = field(default_factory=dict)
    # Op-benchmark shapes (python -m bench) by timm name: (channels, spatial size, SparK patch size in pixels at
    # that scale) of the stages whose sparse ops are measured, at 224 px.
    bench_stages: Mapping[str, Tuple[Tuple[int, int, int], ...]] = field(default_factory=dict)

    def matches(self, model_name: str) -> bool:
        return re.match(self.pattern, model_name) is not None


_RESNET = "timm.models.resnet."
_EFFNET = "timm.models._efficientnet_blocks."
_TINY_RESNET = MatrixModel(dict(layers=[1, 1, 1, 1]))


def _quarter_width(generator: str) -> MatrixModel:
    return MatrixModel(dict(channel_multiplier=0.25), generator)

FAMILIES: Tuple[ModelFamily, ...] = (
    ModelFamily(
        "resnet", r"(se|eca|)res(net|next)\d|wide_resnet",
        drop_path_rates={"resnet50": 0.05, "resnet101": 0.08, "resnet152": 0.10, "resnet200": 0.15},
        containers=(_RESNET + "BasicBlock", _RESNET + "Bottleneck"),
        conv_then_norm={_RESNET + "BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
                        _RESNET + "Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))},
        matrix={"resnet18": _TINY_RESNET, "resnet50": _TINY_RESNET, "resnext50_32x4d": _TINY_RESNET,
                "seresnet50": _TINY_RESNET, "ecaresnet50d": _TINY_RESNET, "resnet50_gn": _TINY_RESNET},
        bench_stages={"resnet50": ((256, 56, 8), (512, 28, 4), (1024, 14, 2), (2048, 7, 1))}),
    ModelFamily(
        "regnet", r"regnet",
        containers=("timm.models.regnet.Bottleneck", "timm.models.regnet.RegStage",
                    "timm.layers.conv_bn_act.ConvNormAct"),
        conv_then_norm={"timm.layers.conv_bn_act.ConvNormAct": (("conv", "bn"),)},
        matrix={"regnety_016": MatrixModel()}),
    ModelFamily(
        "res2net", r"res2ne(t|xt)",
        containers=("timm.models.res2net.Bottle2neck",),
        conv_then_norm={"timm.models.res2net.Bottle2neck": (("conv1", "bn1"), ("conv3", "bn3"))},
        matrix={"res2net50_26w_4s": _TINY_RESNET}),
    ModelFamily(
        "dla", r"dla\d",
        containers=("timm.models.dla.DlaBasic", "timm.models.dla.DlaRoot", "timm.models.dla.DlaTree"),
        conv_then_norm={"timm.models.dla.DlaBasic": (("conv1", "bn1"), ("conv2", "bn2")),
                        "timm.models.dla.DlaRoot": (("conv", "bn"),)},
        matrix={"dla34": MatrixModel(dict(levels=[1, 1, 1, 1, 1, 1], channels=[8, 16, 16, 32, 64, 128]))}),
    ModelFamily(
        "cspnet", r"csp",
        containers=("timm.models.cspnet.BottleneckBlock", "timm.models.cspnet.CrossStage",
                    "timm.layers.conv_bn_act.ConvNormAct"),
        conv_then_norm={"timm.layers.conv_bn_act.ConvNormAct": (("conv", "bn"),)},
        matrix={"cspresnet50": MatrixModel()}),
    ModelFamily(
        "densenet", r"densenet",
        containers=("timm.models.densenet.DenseBlock", "timm.models.densenet.DenseLayer",
                    "timm.models.densenet.DenseTransition"),
        conv_then_norm={"timm.models.densenet.DenseLayer": (("conv1", "norm2"),)},
        matrix={"densenet121": MatrixModel(dict(growth_rate=8, block_config=(1, 1, 1, 1)))}),
    ModelFamily(
        "efficientnet", r"(tf_)?(efficientnet|mobilenetv[23]|mnasnet)",
        containers=(_EFFNET + "DepthwiseSeparableConv", _EFFNET + "InvertedResidual", _EFFNET + "ConvBnAct",
                    "timm.models.efficientnet.EfficientNetFeatures",
                    "timm.models.mobilenetv3.MobileNetV3Features"),
        conv_then_norm={_EFFNET + "InvertedResidual": (("conv_s2d", "bn_s2d"), ("conv_pw", "bn1"),
                                                        ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
                        _EFFNET + "DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
                        _EFFNET + "ConvBnAct": (("conv", "bn1"),),
                        "timm.models.efficientnet.EfficientNetFeatures": (("conv_stem", "bn1"),),
                        "timm.models.mobilenetv3.MobileNetV3Features": (("conv_stem", "bn1"),)},
        matrix={"mobilenetv2_100": _quarter_width("timm.models.efficientnet._gen_mobilenet_v2"),
                "mobilenetv3_large_100": _quarter_width("timm.models.mobilenetv3._gen_mobilenet_v3"),
                "efficientnet_b0": _quarter_width("timm.models.efficientnet._gen_efficientnet")},
        # The inputs of EfficientNet-B0's depthwise convs (96@112 3x3/2, 144@56 5x5/2, 240@28 5x5 and 3x3/2,
        # 672@14 5x5 and 5x5/2, 1152@7 5x5), which also cover MobileNetV3-Large's 5x5 and strided ones.
        bench_stages={"efficientnet_b0": ((96, 112, 16), (144, 56, 8), (240, 28, 4), (672, 14, 2), (1152, 7, 1))}),
    ModelFamily(
        "ghostnet", r"ghostnet_",
        containers=("timm.models.ghostnet.GhostBottleneck", "timm.models.ghostnet.GhostModule"),
        conv_then_norm={"timm.models.ghostnet.GhostBottleneck": (("conv_dw", "bn_dw"),)},
        matrix={"ghostnet_100": MatrixModel(dict(width=0.25), "timm.models.ghostnet._create_ghostnet")}),
    ModelFamily(
        "convnext", r"convnext",   # ConvNeXt V1 and V2
        lamb_betas=CONVNEXT_BETAS,
        drop_path_rates={"convnext_small": 0.2, "convnext_base": 0.3, "convnext_large": 0.4},
        containers=("timm.models.convnext.ConvNeXtStage",),
        matrix={name: MatrixModel(dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)))
                for name in ("convnext_tiny", "convnextv2_tiny")},
        bench_stages={"convnext_tiny": ((96, 56, 8), (192, 28, 4), (384, 14, 2), (768, 7, 1))}),
)

# Containers of every model: torch's own and timm's feature-extraction wrappers (features_only=True).
GENERIC_CONTAINERS = ("torch.nn.modules.container.Sequential", "torch.nn.modules.container.ModuleList",
                      "torch.nn.modules.container.ModuleDict", "timm.models._features.FeatureListNet",
                      "timm.models._features.FeatureDictNet")


def base_name(model_name: str) -> str:
    """The architecture of a timm name: lower case, without a pretrained tag such as ".a1_in1k"."""
    return model_name.split(".")[0].lower()


def family_of(model_name: str) -> Optional[ModelFamily]:
    """The family of a timm model name, or None for a model outside the table."""
    name = base_name(model_name)
    return next((f for f in FAMILIES if f.matches(name)), None)


def reviewed_containers() -> Tuple[str, ...]:
    return GENERIC_CONTAINERS + tuple(c for f in FAMILIES for c in f.containers)


def conv_then_norm_pairs() -> Dict[str, Tuple[Tuple[str, str], ...]]:
    return {block: pairs for f in FAMILIES for block, pairs in f.conv_then_norm.items()}


def build_test_model(name: str):
    """The support-matrix model `name` in its small test configuration (timm features_only, random init)."""
    entry = matrix_models()[name]
    module, _, factory = entry.test_factory.rpartition(".")
    return getattr(importlib.import_module(module), factory)(name, features_only=True, pretrained=False,
                                                              **entry.test_kwargs)


def bench_stages() -> Dict[str, Tuple[Tuple[int, int, int], ...]]:
    """Op-benchmark stage shapes by timm name, over every family."""
    return {name: stages for f in FAMILIES for name, stages in f.bench_stages.items()}


def matrix_models() -> Dict[str, MatrixModel]:
    """The support matrix: timm name -> its parity-test configuration, in table order."""
    return {name: m for f in FAMILIES for name, m in f.matrix.items()}

