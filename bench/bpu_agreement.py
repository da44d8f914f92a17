"""Fake quant as trained (exact_eval = false) vs the integer model, per quantized tensor, on the
seed FCOS-EfficientNet-B0 (ImageNet Lite0 backbone weights), calibrated on the demo's images.

    OMP_NUM_THREADS=2 nice .venv/bin/python bench/bpu_agreement.py [--size 320] [--calib 4]
        [--batch 4] [--compare 2] [--march bayes-e]

The model is built from recipes/fcos_efficientnetb0_mscoco.toml (the neck and head keep their
random init: no COCO-trained weights exist here), calibrated on ``--calib`` batches of the demo's
validation images (recipes/demo.toml's shapes set, validation transforms at ``--size``), then
every quantized tensor of the fake-quant model is compared with the int64 reference executing
the converted integer graph (``hat_bpu.ir.reference.run_ir``) on ``--compare`` images: % of
elements identical and the largest |difference| in LSB, per dtype. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hat_bpu.plugin import BpuTargetSpec, HorizonQuantizeSpec, quantize
from hat_bpu.quant.debug import compare_layers

from hatcore import quant
from hatcore.pipeline import Pipeline

ROOT = Path(__file__).parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--calib", type=int, default=4, help="calibration batches")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--compare", type=int, default=2, help="images compared")
    ap.add_argument("--march", default="bayes-e")
    ap.add_argument("--exact", action="store_true", help="exact_eval = true instead")
    args = ap.parse_args()
    torch.manual_seed(0)
    seed = Pipeline.load(ROOT / "recipes" / "fcos_efficientnetb0_mscoco.toml")
    net = seed.build_model().eval()
    s = args.size
    demo = Pipeline.load(ROOT / "recipes" / "demo.toml", [
        f"data.val.batch_size={args.batch}",
        f'data.val.transforms=[{{type="resize", img_scale=[{s}, {s}], keep_ratio=true}}, '
        f'{{type="pad", divisor={s}}}, {{type="to_tensor", to_yuv=true}}, '
        '{type="normalize", mean=[128.0, 128.0, 128.0], std=[128.0, 128.0, 128.0]}]'])
    batches = []
    for i, batch in enumerate(demo.loader("val")):
        if i >= args.calib:
            break
        batches.append(batch["img"])
    spec = HorizonQuantizeSpec(type="horizon", exact_eval=args.exact)
    target = BpuTargetSpec(type="bpu", march=args.march)
    q = quantize(model=net, spec=spec, stage="calibration", target=target)
    quant.set_mode(q, "observe")
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            q(x)
    quant.set_mode(q, "fake_quant")
    t_cal = time.perf_counter() - t0
    rows = compare_layers(q, [batches[0][:args.compare]], integer=True)
    per: dict[str, dict[str, float]] = {}
    for r in rows:
        if "int_identical" not in r:
            continue
        d = per.setdefault(r["dtype"], {"tensors": 0, "min_identical": 1.0, "max_lsb": 0.0,
                                        "tensors_below_99.9": 0})
        d["tensors"] += 1
        d["min_identical"] = min(d["min_identical"], r["int_identical"])
        d["max_lsb"] = max(d["max_lsb"], r["int_max_err_lsb"])
        d["tensors_below_99.9"] += r["int_identical"] < 0.999
        if r["int_identical"] < 1.0:
            print(json.dumps({"layer": r["layer"], "dtype": r["dtype"],
                              "identical": r["int_identical"], "max_lsb": r["int_max_err_lsb"]}))
    print(json.dumps({"march": args.march, "size": s, "exact_eval": args.exact,
                      "calib_batches": len(batches), "batch": args.batch,
                      "compared_images": args.compare, "calib_s": round(t_cal, 1),
                      "per_dtype": per,
                      "bias_saturated_convs": sum(1 for r in rows if r.get("bias_overflow"))}))


if __name__ == "__main__":
    main()
