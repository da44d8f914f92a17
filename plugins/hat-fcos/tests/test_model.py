"""The FCOS model: pretrained weights, shapes, the deployable graph, the pluggable parts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.fx
from hat_fcos.efficientnet import EfficientNet, load_lite0
from hat_fcos.specs import BackboneSpec
from helpers import build
from torch import nn
from torch.nn import functional as F

from hatcore import hookimpl
from hatcore.errors import UserError
from hatcore.plugins import make_plugin_manager, set_plugins
from hatcore.quant import DeQuantStub, QuantStub, get_hints
from hatcore.recipe import spec

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_pretrained_lite0_classifies_chelsea_as_a_cat() -> None:
    skimage_data = pytest.importorskip("skimage.data")
    net = EfficientNet("b0", "relu6", include_top=True)
    load_lite0(net)
    img = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float()[None]
    img = F.interpolate(img, size=(224, 224), mode="bilinear", align_corners=False)
    with torch.no_grad():
        top5 = net.eval().classify((img - 128) / 128).topk(5).indices[0].tolist()
    assert CAT_CLASSES & set(top5), top5


def test_yuv_stem_sees_the_same_picture_as_the_rgb_stem() -> None:
    """input_colour = "yuv": on the same picture in YUV (the JFIF formula RGB -> YUV, the forward
    matrix; the loader uses its inverse) the converted stem gives the RGB stem's output, and the
    network still knows Chelsea."""
    skimage_data = pytest.importorskip("skimage.data")
    rgb_net, yuv_net = EfficientNet("b0", "relu6", include_top=True), \
        EfficientNet("b0", "relu6", include_top=True)
    load_lite0(rgb_net)
    load_lite0(yuv_net, input_colour="yuv")
    rgb = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).double()[None]
    rgb = F.interpolate(rgb, size=(224, 224), mode="bilinear", align_corners=False)
    jfif = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5],
                         [0.5, -0.418688, -0.081312]], dtype=torch.float64)
    # Y's row sums to 1 and U's, V's to 0 (their +128), so yuv - 128 = jfif · (rgb - 128)
    yuv = torch.einsum("jc,nchw->njhw", jfif, rgb - 128) + 128
    with torch.no_grad():
        a = rgb_net.eval().stem[0](((rgb - 128) / 128).float())
        b = yuv_net.eval().stem[0](((yuv - 128) / 128).float())
        assert (a - b).abs().max() < 1e-3 * a.abs().max()
        top5 = yuv_net.classify(((yuv - 128) / 128).float()).topk(5).indices[0].tolist()
    assert CAT_CLASSES & set(top5), top5
    assert not torch.equal(rgb_net.stem[0].weight, yuv_net.stem[0].weight)


def test_hook_build_model_gives_per_level_outputs_of_the_right_shape(fcos_plugins) -> None:
    model = build(fcos_plugins, num_classes=3, backbone={"model_type": "b0"})
    raw = model(torch.randn(2, 3, 256, 192))
    cls, bbox, ctr = raw
    sizes = [(256 // s, 192 // s) for s in (8, 16, 32, 64)] + [(2, 2)]
    assert [tuple(t.shape) for t in cls] == [(2, 3, h, w) for h, w in sizes]
    assert [tuple(t.shape) for t in bbox] == [(2, 4, h, w) for h, w in sizes]
    assert [tuple(t.shape) for t in ctr] == [(2, 1, h, w) for h, w in sizes]


@pytest.mark.parametrize("backbone", [{"type": "resnet", "depth": 18},
                                      {"model_type": "b1", "use_se_block": True,
                                       "activation": "swish"}])
def test_other_backbones_build_and_run(fcos_plugins, backbone) -> None:
    model = build(fcos_plugins, num_classes=2, backbone=backbone, neck={"stack": 1}).eval()
    cls, _, _ = model(torch.randn(1, 3, 128, 128))
    assert [t.shape[-1] for t in cls] == [16, 8, 4, 2, 1]


def test_forward_is_a_bpu_friendly_fx_graph(fcos_plugins) -> None:
    model = build(fcos_plugins, num_classes=3).eval()
    graph = torch.fx.symbolic_trace(model)
    mods = dict(graph.named_modules())
    kinds = {type(mods[n.target]) for n in graph.graph.nodes if n.op == "call_module"}
    assert kinds <= {nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Identity, QuantStub,
                     DeQuantStub}
    funcs = {getattr(n.target, "__name__", str(n.target)) for n in graph.graph.nodes
             if n.op in ("call_function", "call_method")}
    assert not funcs & {"sigmoid", "exp", "softmax"}, funcs
    assert model.quant.scale == 1 / 128
    outs = [model.head.cls_out, model.head.bbox_out, model.head.ctr_out]
    assert all(get_hints(m) == {"out_dtype": "int16"} for m in outs)
    x = torch.randn(1, 3, 128, 128)
    for a, b in zip(graph(x)[0], model(x)[0], strict=True):
        torch.testing.assert_close(a, b)


@spec
class TinySpec(BackboneSpec):
    width: int = 8


class TinyBackbone(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else width, width, 3, 2, 1)
                                   for i in range(5))
        self.out_channels = [width] * 5

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for conv in self.convs:
            x = conv(x)
            feats.append(x)
        return feats


class TinyPlugin:
    @hookimpl
    def hat_components(self, register) -> None:
        register("backbone", "tiny", TinySpec, "test backbone")

    @hookimpl
    def build_backbone(self, spec):
        return TinyBackbone(spec.width) if isinstance(spec, TinySpec) else None


def test_hook_build_backbone_lets_a_third_party_add_a_backbone() -> None:
    plugins = make_plugin_manager(only={"hat-fcos"}, extra=[("tiny", TinyPlugin())])
    set_plugins(plugins)
    try:
        model = build(plugins, num_classes=2, backbone={"type": "tiny", "width": 8})
        assert isinstance(model.backbone, TinyBackbone)
        assert model.neck.layers[0].td[0].resample[0].lateral[0].in_channels == 8  # finest input
        assert len(model.eval()(torch.randn(1, 3, 128, 128))[0]) == 5
    finally:
        set_plugins(None)


def test_hook_build_neck_and_head_follow_the_recipe(fcos_plugins) -> None:
    model = build(fcos_plugins, num_classes=4, neck={"out_channels": 32, "stack": 2},
                  head={"feat_channels": 16, "stacked_convs": 2, "int16_output": False})
    assert len(model.neck.layers) == 2 and model.neck.out_channels == 32
    assert model.head.cls_out.out_channels == 4 and model.head.cls_out.in_channels == 16
    assert get_hints(model.head.cls_out) == {}


def test_unknown_pretrained_weights_are_a_user_error(fcos_plugins) -> None:
    with pytest.raises(UserError, match="efficientnet-lite0"):
        build(fcos_plugins, backbone={"pretrained": "imagenet-b7"})
    with pytest.raises(UserError, match="b0"):
        build(fcos_plugins, backbone={"pretrained": "efficientnet-lite0", "model_type": "b2"})


def test_every_registered_fcos_part_builds_a_working_model(fcos_plugins) -> None:
    reg = fcos_plugins.registry
    for kind in ("backbone", "neck", "head"):
        for name in reg.names(kind):
            table = {"neck": {"type": "bifpn", "stack": 1}, kind: {"type": name}}
            model = build(fcos_plugins, num_classes=2, **table).eval()
            cls, bbox, ctr = model(torch.randn(1, 3, 128, 128))
            assert len(cls) == len(bbox) == len(ctr) == 5, (kind, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loss_and_postprocess_run_on_cuda(fcos_plugins) -> None:
    model = build(fcos_plugins, num_classes=2, neck={"stack": 1}).cuda()
    batch = {"img": torch.randn(2, 3, 128, 128, device="cuda"),
             "gt_boxes": [torch.tensor([[8.0, 8.0, 60.0, 70.0]], device="cuda"),
                          torch.zeros(0, 4, device="cuda")],
             "gt_labels": [torch.tensor([1], device="cuda"),
                           torch.zeros(0, dtype=torch.long, device="cuda")],
             "meta": [{"scale": (1.0, 1.0), "orig_size": (128, 128)}] * 2}
    losses = model.compute_loss(model(batch["img"]), batch)
    sum(losses.values()).backward()
    dets = model.eval().postprocess(model(batch["img"]), batch)
    assert dets[0]["boxes"].device.type == "cuda"


def test_docs_list_every_target_loss_and_decoder_key() -> None:
    import attrs
    from hat_fcos.specs import DecoderSpec, LossSpec, TargetSpec

    docs = Path(__file__).resolve().parents[3] / "docs" / "fcos.md"
    text = docs.read_text()
    for cls, table in ((TargetSpec, "target"), (LossSpec, "loss"), (DecoderSpec, "decoder")):
        for f in attrs.fields(cls):
            assert f"| `{table}.{f.name}` | `{f.default!r}` | {f.metadata['doc']} |" in text, (
                f"docs/fcos.md lacks or misdocuments {table}.{f.name}")
