"""The board's side of deployment: NV12 input in training, one target, device-side filtering.

The NV12 tests compare hat-coco's ``to_tensor`` (numpy, its own code) with hat-bpu's runtime input
path (``device/nv12.py``, torch float64): two implementations that share no helper.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hat_bpu.device import nv12
from hat_coco.transforms import Normalize, ToTensor

from hatcore.errors import UserError


def _sample(rgb: np.ndarray) -> dict:
    return {"img": rgb, "gt_boxes": np.zeros((0, 4), np.float32),
            "gt_labels": np.zeros(0, np.int64), "meta": {}}


def _train_input(rgb: np.ndarray, board: str) -> torch.Tensor:
    """What training feeds the network: to_tensor (with ``board``) then normalize 128/128."""
    s = ToTensor(to_yuv=True, board_input=board)(_sample(rgb))
    return Normalize([128.0] * 3, [128.0] * 3)(s)["img"][None]


@pytest.mark.parametrize("hw", [(2, 2), (6, 10), (34, 18), (64, 64), (192, 130)])
def test_to_tensor_nv12_equals_the_runtime_input_path(hw: tuple[int, int]) -> None:
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    rgb = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    trained = _train_input(rgb, "nv12")
    # the runtime: the val batch (full YUV444 from to_tensor) through align_bpu's board input
    board = nv12.board_input(_train_input(rgb, "none"))
    assert torch.equal(trained, board)
    # and the frame a camera would deliver: hat-bpu's RGB -> NV12 -> YUV444 from the raw pixels
    t = torch.from_numpy(rgb).permute(2, 0, 1)[None].double()
    camera = (nv12.nv12_to_yuv444(*nv12.rgb_to_nv12(t)).float() - 128) / 128
    assert torch.equal(trained, camera)
    # the board's input stage leaves an image already through it unchanged
    assert torch.equal(nv12.board_input(trained), trained)
    # and the conversion is not the identity: chroma is really subsampled on random pixels
    assert not torch.equal(trained, _train_input(rgb, "none"))


def test_to_tensor_nv12_edge_values_and_batch_padding() -> None:
    # extreme colours (U, V at 0/255 and rounding ties of the 2x2 average) and zero padding
    rgb = np.zeros((4, 8, 3), np.uint8)
    rgb[:, :2] = [255, 0, 0]
    rgb[:, 2:4] = [0, 0, 255]
    rgb[0, 4], rgb[1, 5], rgb[:, 6:] = [255, 255, 255], [0, 255, 0], [17, 200, 99]
    a = _train_input(rgb, "nv12")
    batch = torch.zeros(1, 3, 8, 12)  # collate pads with 0 (= pixel 128) to the batch's size
    batch[..., :4, :8] = a
    out = nv12.board_input(batch)
    assert torch.equal(out, batch)


def test_to_tensor_nv12_refuses_odd_sizes_and_rgb() -> None:
    with pytest.raises(UserError, match="even image height and width.*3x4.*pad"):
        ToTensor(board_input="nv12")(_sample(np.zeros((3, 4, 3), np.uint8)))
    with pytest.raises(UserError, match="to_yuv = true"):
        ToTensor(to_yuv=False, board_input="nv12")
    with pytest.raises(UserError, match="board_input must be one of"):
        ToTensor(board_input="nv21")


# --------------------------------------------------------------------------- device-side filter

class TwoLevelHead(torch.nn.Module):
    """A dense head on two levels, FCOS's output layout: ([cls], [box], [ctr]) per level."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        from hatcore.quant import DeQuantStub, QuantStub, set_hint

        self.quant = QuantStub(scale=1 / 128)
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU())
        self.down = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, 2, 1), torch.nn.ReLU())
        self.cls = torch.nn.Conv2d(8, classes, 3, 1, 1)
        self.box = torch.nn.Conv2d(8, 4, 3, 1, 1)
        self.ctr = torch.nn.Conv2d(8, 1, 3, 1, 1)
        for m in (self.cls, self.box, self.ctr):
            set_hint(m, out_dtype="int16")
        torch.nn.init.constant_(self.cls.bias, -3.0)  # most points below the threshold
        self.dequant = DeQuantStub()

    def forward(self, img: torch.Tensor) -> tuple[list[torch.Tensor], ...]:
        feats = [self.stem(self.quant(img))]
        feats.append(self.down(feats[0]))
        return ([self.dequant(self.cls(f)) for f in feats],
                [self.dequant(self.box(f)) for f in feats],
                [self.dequant(self.ctr(f)) for f in feats])


def _head_hbm(tmp_path: Path, score_threshold: float | None = None, **compile_opts: object
              ) -> tuple[Path, Path]:
    from deploy_fixtures import calibrate, yuv_input
    from hat_bpu import plugin

    torch.manual_seed(0)
    x = yuv_input(4, 32, seed=1)
    net = TwoLevelHead().eval()
    if score_threshold is not None:  # hatcore.protocols.score_threshold (FCOS: the decoder's)
        net.score_threshold = score_threshold  # type: ignore[assignment]
    q = calibrate(net, x)
    art = tmp_path / "model.hbir"
    plugin.export(model=q, spec=plugin.HbirExportSpec(type="hbir"), path=art,
                  example_input=x[:1], target=None)
    spec = plugin.HbmCompileSpec(type="hbm", **compile_opts)  # type: ignore[arg-type]
    plugin.compile(artifact=art, spec=spec, out_dir=tmp_path / "compile", target=None)
    return art, tmp_path / "compile" / "model.hbm"


def _reference_keep(q: torch.Tensor, scale: float, thr: float) -> torch.Tensor:
    """Independent of filter.py: dequantize in float64, sigmoid, compare with the score."""
    return (torch.sigmoid(q.double() * scale) > thr).any(1)


@pytest.mark.parametrize("thr", [0.05, 0.3])
def test_filter_keeps_exactly_the_points_above_threshold(thr: float) -> None:
    from hat_bpu.device import filter as devfilter

    g = torch.Generator().manual_seed(3)
    scales = [0.00097, 0.0021]  # int16 logits in about +-32 and +-69
    q = [torch.randint(-32768, 32768, (2, 3, 8, 8), generator=g) // 8 - 1500,
         torch.randint(-32768, 32768, (2, 3, 4, 4), generator=g) // 8 - 1500]
    box = [torch.randint(-100, 100, (2, 4, 8, 8), generator=g),
           torch.randint(-100, 100, (2, 4, 4, 4), generator=g)]
    filt = {"score_thr": thr, "groups": [[0, 1], [2, 3]], "scale": scales + [0.01, 0.01],
            "dtype": ["int16"] * 4,
            "threshold": [devfilter.int_threshold(thr, s) for s in scales]}
    kept = devfilter.Survivors(q + box, filt)
    for lv, (where, values, _) in enumerate(kept.levels):
        ref = _reference_keep(q[lv], scales[lv], thr)
        got = torch.zeros_like(ref)
        got[where[:, 0], where[:, 1], where[:, 2]] = True
        assert torch.equal(got, ref)
        assert 0 < int(ref.sum()) < ref.numel()  # both kinds present: the test can fail
        assert torch.equal(values[0], q[lv].permute(0, 2, 3, 1)[ref])
        assert torch.equal(values[1], box[lv].permute(0, 2, 3, 1)[ref])
    # the boundary: T is dropped (sigmoid(T s) <= thr), T + 1 kept, in float64
    for s in scales:
        t = devfilter.int_threshold(thr, s)
        assert torch.sigmoid(torch.tensor(t * s, dtype=torch.float64)) <= thr
        assert torch.sigmoid(torch.tensor((t + 1) * s, dtype=torch.float64)) > thr
        edge = torch.full((1, 3, 1, 2), -30000)
        edge[0, 1, 0, 0], edge[0, 2, 0, 1] = t, t + 1
        assert devfilter.keep_mask(edge, t).tolist() == [[[False, True]]]
    assert abs(devfilter.logit(0.05) - (-2.944439)) < 1e-6


def test_filter_bytes_and_dense_view() -> None:
    from hat_bpu.device import filter as devfilter

    q_cls = torch.full((1, 2, 2, 2), -5000)
    q_cls[0, 1, 1, 0] = 100  # one survivor at (y=1, x=0)
    q_box = torch.arange(16).view(1, 4, 2, 2)
    filt = {"score_thr": 0.05, "groups": [[0], [1]], "scale": [0.001, 0.5],
            "dtype": ["int16", "int8"], "threshold": [devfilter.int_threshold(0.05, 0.001)]}
    kept = devfilter.Survivors([q_cls, q_box], filt)
    assert kept.count() == 1
    # one index (4 B) + 2 classes x 2 B + 4 box channels x 1 B; one count per image and level
    assert kept.nbytes() == 4 + 2 * 2 + 4 * 1 + 4
    assert devfilter.dense_nbytes([q_cls, q_box], filt) == 8 * 2 + 16 * 1
    cls, box = kept.to_dense()
    assert cls[0, :, 1, 0].tolist() == [-5.0, np.float32(0.1)] and torch.isinf(cls[0, :, 0, 0]).all()
    assert box[0, :, 1, 0].tolist() == [1.0, 3.0, 5.0, 7.0] and box[0, :, 0, 1].eq(0).all()


def test_align_bpu_runs_the_device_filter(tmp_path: Path) -> None:
    from deploy_fixtures import yuv_input
    from hat_bpu import plugin
    from hat_bpu.device import hbm
    from hat_bpu.device.runtime import board_runner
    from hat_fcos.decoder import FCOSDecoder

    _, path = _head_hbm(tmp_path)
    header, _ = hbm.load_hbm(path)
    filt = header["device_filter"]
    assert filt["score_thr"] == 0.05 and filt["groups"] == [[0, 1], [2, 3], [4, 5]]
    runner = plugin.load_deployed(path=path, stage="align_bpu")
    dense_runner = board_runner(path)
    x = yuv_input(3, 32, seed=7)
    out, dense = runner({"img": x}), dense_runner({"img": x})
    for lv in range(2):
        ref = _reference_keep(torch.round(dense[0][lv].double() / filt["scale"][lv]),
                              filt["scale"][lv], 0.05)
        kept = torch.isfinite(out[0][lv]).all(1)
        assert torch.equal(kept, ref) and 0 < int(ref.sum()) < ref.numel()
        for g in range(3):  # survivors reach the host unchanged
            a, b = out[g][lv].permute(0, 2, 3, 1)[ref], dense[g][lv].permute(0, 2, 3, 1)[ref]
            assert torch.equal(a, b)
    stats = runner.stats  # type: ignore[attr-defined]
    assert stats["images"] == 3 and 0 < stats["survivors"] < stats["points"]
    assert stats["filtered_bytes"] < stats["dense_bytes"]
    # the decoder drops the same points itself (score <= 0.05): detections are unchanged
    dec = FCOSDecoder(strides=[2, 4])
    batch = {"img": x, "meta": [{} for _ in range(3)]}
    for a, b in zip(dec(out, batch), dec(dense, batch), strict=True):
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(a[k], b[k])
    # off: the header says so and align_bpu is the plain board
    _, path_off = _head_hbm(tmp_path / "off", device_filter=False)
    assert hbm.load_hbm(path_off)[0]["device_filter"] is None
    plain = plugin.load_deployed(path=path_off, stage="align_bpu")
    assert not hasattr(plain, "stats")
    with pytest.raises(UserError, match="filter_score_thr"):
        _head_hbm(tmp_path / "bad", filter_score_thr=1.5)


def test_device_filter_follows_the_models_score_threshold(tmp_path: Path) -> None:
    from hat_bpu.device import hbm
    from hat_bpu.device.filter import int_threshold
    from hat_bpu.ir import hbir

    art, path = _head_hbm(tmp_path / "a", score_threshold=0.2)
    assert hbir.load_hbir(art).meta["score_threshold"] == 0.2
    filt = hbm.load_hbm(path)[0]["device_filter"]
    assert filt["score_thr"] == 0.2
    assert filt["threshold"][0] == int_threshold(0.2, filt["scale"][0])
    _, path = _head_hbm(tmp_path / "b", score_threshold=0.2, filter_score_thr=0.1)  # below: ok
    assert hbm.load_hbm(path)[0]["device_filter"]["score_thr"] == 0.1
    with pytest.raises(UserError, match=r"filter_score_thr = 0.3 is above the model's own score "
                                        r"threshold 0.2"):
        _head_hbm(tmp_path / "c", score_threshold=0.2, filter_score_thr=0.3)
    _, path = _head_hbm(tmp_path / "d", score_threshold=0.0)  # the decoder keeps every point
    assert hbm.load_hbm(path)[0]["device_filter"] is None
    _, path = _head_hbm(tmp_path / "e")  # a model that does not say: 0.05
    assert hbm.load_hbm(path)[0]["device_filter"]["score_thr"] == 0.05


def test_fcos_model_states_its_decoders_threshold() -> None:
    from hat_fcos.decoder import FCOSDecoder
    from hat_fcos.model import FCOS

    from hatcore.protocols import score_threshold

    model = FCOS.__new__(FCOS)
    torch.nn.Module.__init__(model)
    model.decoder = FCOSDecoder(strides=[8], score_thr=0.125)
    assert score_threshold(model) == 0.125
    model.decoder.score_thr = 1.5
    with pytest.raises(UserError, match="score_threshold must be a number in"):
        score_threshold(model)


# --------------------------------------------------------------------------- one target

def _hbir(tmp_path: Path, march: str) -> Path:
    from deploy_fixtures import small_model
    from hat_bpu import plugin
    from hat_bpu.device.march import get_march

    q, x = small_model(pow2=get_march(march).pow2_scales)
    art = tmp_path / f"{march}.hbir"
    plugin.export(model=q, spec=plugin.HbirExportSpec(type="hbir"), path=art,
                  example_input=x[:1], target=plugin.BpuTargetSpec(type="bpu", march=march))
    return art


def test_compile_refuses_a_hbir_of_another_march(tmp_path: Path) -> None:
    from hat_bpu import plugin

    art = _hbir(tmp_path, "bayes-e")
    spec = plugin.HbmCompileSpec(type="hbm")
    with pytest.raises(UserError, match="built for march 'bayes-e'.*\\[target\\] march is "
                       "'bernoulli2'"):
        plugin.compile(artifact=art, spec=spec, out_dir=tmp_path / "c",
                       target=plugin.BpuTargetSpec(type="bpu", march="bernoulli2"))
    assert not (tmp_path / "c" / "model.hbm").exists()
    res = plugin.compile(artifact=art, spec=spec, out_dir=tmp_path / "c",
                         target=plugin.BpuTargetSpec(type="bpu", march="bayes-e"))
    assert res is not None and res["march"] == "bayes-e"


def test_compile_refuses_a_hbir_of_another_scale_policy(tmp_path: Path) -> None:
    from hat_bpu import plugin
    from hat_bpu.ir import hbir

    # a graph that says bernoulli but holds multiplier scales (e.g. pow2_scales = false)
    graph = hbir.load_hbir(_hbir(tmp_path, "bayes-e"))
    graph.meta["march"] = "bernoulli"
    art = tmp_path / "forged.hbir"
    hbir.save_hbir(graph, art)
    with pytest.raises(UserError, match="scale policy 'multiplier'.*'bernoulli'.*scale policy "
                       "'pow2'"):
        plugin.compile(artifact=art, spec=plugin.HbmCompileSpec(type="hbm"),
                       out_dir=tmp_path / "c",
                       target=plugin.BpuTargetSpec(type="bpu", march="bernoulli"))


def test_target_is_read_by_quantize_export_and_compile(tmp_path: Path) -> None:
    from deploy_fixtures import yuv_input
    from example_net import SmallNet
    from hat_bpu import plugin
    from hat_bpu.device import hbm
    from hat_bpu.ir import hbir

    from hatcore import quant

    target = plugin.BpuTargetSpec(type="bpu", march="bernoulli", input_layout="yuv444")
    torch.manual_seed(0)
    q = plugin.quantize(model=SmallNet().eval(), spec=plugin.HorizonQuantizeSpec(
        type="horizon", observer="minmax"), stage="calibration", target=target)
    x = yuv_input(2, 32)
    quant.set_mode(q, "observe")
    with torch.no_grad():
        q(x)
    quant.set_mode(q, "fake_quant")
    art = tmp_path / "m.hbir"
    plugin.export(model=q, spec=plugin.HbirExportSpec(type="hbir"), path=art,
                  example_input=x[:1], target=target)
    meta = hbir.load_hbir(art).meta  # pow2_scales: the quantizer took bernoulli's policy
    assert (meta["march"], meta["pow2_scales"], meta["input_layout"]) == ("bernoulli", True,
                                                                          "yuv444")
    plugin.compile(artifact=art, spec=plugin.HbmCompileSpec(type="hbm"),
                   out_dir=tmp_path / "c", target=target)
    header, _ = hbm.load_hbm(tmp_path / "c" / "model.hbm")
    assert (header["march"], header["input_layout"]) == ("bernoulli", "yuv444")


@pytest.mark.parametrize(("table", "key"), [("quantize", "march"), ("export", "march"),
                                            ("export", "input_layout"), ("compile", "march"),
                                            ("compile", "input_layout")])
def test_old_target_keys_say_where_they_moved(tmp_path: Path, table: str, key: str) -> None:
    from hatcore.errors import RecipeError
    from hatcore.plugins import get_plugins
    from hatcore.recipe import load_recipe

    value = "yuv444" if key == "input_layout" else "bernoulli2"
    recipe = tmp_path / "r.toml"
    recipe.write_text('[task]\nname = "t"\nwork_dir = "w"\n[model]\ntype = "fcos"\n'
                      '[data.val]\ntype = "coco_lmdb"\npath = "x"\n'
                      f'[{table}]\n{key} = "{value}"\n')
    with pytest.raises(RecipeError, match=f"\\$.{table}.{key}: this key moved to "
                       f"\\[target\\] {key}"):
        load_recipe(recipe, get_plugins().registry)
    recipe.write_text(recipe.read_text().replace(f"[{table}]\n{key}", f"[target]\n{key}"))
    r, _ = load_recipe(recipe, get_plugins().registry)
    assert getattr(r.target, key) == value and r.target.type == "bpu"
