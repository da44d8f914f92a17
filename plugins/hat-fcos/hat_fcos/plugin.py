"""hat-fcos's hook implementations: type names, builders, and ``hat calops``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import click
import pluggy
from torch import nn

from hat_fcos import hookspecs
from hat_fcos.bifpn import BiFPN
from hat_fcos.calops import count_ops
from hat_fcos.decoder import FCOSDecoder
from hat_fcos.efficientnet import EfficientNet, load_lite0
from hat_fcos.head import FCOSHead
from hat_fcos.model import FCOS
from hat_fcos.resnet import ResNet
from hat_fcos.specs import (
    BackboneSpec,
    BiFPNSpec,
    EfficientNetSpec,
    FCOSHeadSpec,
    FCOSSpec,
    HeadSpec,
    NeckSpec,
    ResNetSpec,
)
from hatcore import hookimpl
from hatcore.context import HatContext, pass_hat
from hatcore.errors import UserError
from hatcore.plugins import Plugins
from hatcore.recipe import ModelSpec
from hatcore.registry import Register


@hookimpl
def hat_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


@hookimpl
def hat_components(register: Register) -> None:
    register("model", "fcos", FCOSSpec, "FCOS detector: backbone, neck, head")
    register("backbone", "efficientnet", EfficientNetSpec, "EfficientNet B0-B3 (Lite0 weights)")
    register("backbone", "resnet", ResNetSpec, "ResNet-18/50")
    register("neck", "bifpn", BiFPNSpec, "BiFPN with plain-sum fusion")
    register("head", "fcos_head", FCOSHeadSpec, "shared FCOS head (cls, box, centerness)")


@hookimpl
def build_backbone(spec: BackboneSpec) -> nn.Module | None:
    if isinstance(spec, EfficientNetSpec):
        net = EfficientNet(spec.model_type, spec.activation, spec.use_se_block, spec.include_top)
        if spec.pretrained == "efficientnet-lite0":
            if spec.model_type != "b0" or spec.use_se_block:
                raise UserError('[model.backbone] pretrained = "efficientnet-lite0" needs '
                                f'model_type = "b0" and use_se_block = false, got '
                                f"{spec.model_type!r}, {spec.use_se_block}")
            load_lite0(net, input_colour=spec.input_colour)
        elif spec.pretrained:
            raise UserError(f"[model.backbone] pretrained: unknown weights {spec.pretrained!r}; "
                            'known: "efficientnet-lite0" (or "" for none)')
        return net
    if isinstance(spec, ResNetSpec):
        return ResNet(spec.depth)
    return None


@hookimpl
def build_neck(spec: NeckSpec, in_channels: list[int]) -> nn.Module | None:
    if isinstance(spec, BiFPNSpec):
        if len(spec.in_strides) != len(in_channels):
            raise UserError(f"[model.neck] in_strides {spec.in_strides} name "
                            f"{len(spec.in_strides)} features; the backbone gives "
                            f"{len(in_channels)}")
        return BiFPN(spec.in_strides, in_channels, spec.out_strides, spec.out_channels,
                     spec.stack)
    return None


@hookimpl
def build_head(spec: HeadSpec, in_channels: int, num_classes: int,
               strides: list[int]) -> nn.Module | None:
    if isinstance(spec, FCOSHeadSpec):
        return FCOSHead(in_channels, num_classes, len(strides), spec.feat_channels,
                        spec.stacked_convs, spec.int16_output)
    return None


def _need(obj: Any, kind: str, name: str) -> Any:
    if obj is None:
        raise UserError(f"[model.{kind}] type {name!r}: no installed plugin builds it")
    return obj


@hookimpl
def build_model(spec: ModelSpec, plugins: Plugins) -> nn.Module | None:
    if not isinstance(spec, FCOSSpec):
        return None
    hook = plugins.hook  # the manager this call runs under, so a test's own one is honoured
    backbone = _need(hook.build_backbone(spec=spec.backbone), "backbone", spec.backbone.type)
    neck = _need(hook.build_neck(spec=spec.neck, in_channels=list(backbone.out_channels)),
                 "neck", spec.neck.type)
    strides = list(neck.out_strides)
    head = _need(hook.build_head(spec=spec.head, in_channels=neck_channels(neck),
                                 num_classes=spec.num_classes, strides=strides),
                 "head", spec.head.type)
    upscale = getattr(spec.head, "upscale_bbox_pred", True)
    d, t, lo = spec.decoder, spec.target, spec.loss
    decoder = FCOSDecoder(strides, upscale, d.score_thr, d.nms_pre, d.nms_iou, d.max_per_img,
                          d.nms_use_centerness, d.nms_sqrt)
    return FCOS(backbone, neck, head, strides, spec.num_classes, decoder, upscale, t.topK,
                t.center_sampling, t.center_sampling_radius, t.cls_cost_weight,
                t.reg_cost_weight, lo.focal_alpha, lo.focal_gamma,
                lo.cls_weight, lo.giou_weight, lo.centerness_weight)


def neck_channels(neck: nn.Module) -> int:
    """A neck's output width (``out_channels`` attribute)."""
    return int(cast(int, neck.out_channels))


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(calops_cmd)


@click.command("calops")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--input-shape", default=None, metavar="N,C,H,W",
              help="Input shape (default: the recipe's [export] input_shape, else 1,3,512,512).")
@click.option("--top", type=int, default=None, help="Show only the N layers with most FLOPs.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value (TOML syntax; repeatable).")
@pass_hat
def calops_cmd(hat: HatContext, recipe: Path, input_shape: str | None, top: int | None,
               overrides: tuple[str, ...]) -> None:
    """Count FLOPs, MACs and parameters of RECIPE's model, per layer and in total."""
    run = hat.load(recipe, overrides)
    rec = run.recipe
    if input_shape is not None:
        try:
            shape = [int(v) for v in input_shape.split(",")]
        except ValueError:
            shape = []
        if len(shape) != 4 or min(shape) < 1:
            raise UserError(f"--input-shape: expected N,C,H,W positive integers, got "
                            f"{input_shape!r}")
    else:
        shape = list(rec.export.input_shape) if rec.export is not None else [1, 3, 512, 512]
    model = run.build_model()
    click.echo(count_ops(model, shape).table(top))
