"""align_bpu's AP on a finished run under two board input paths, same program, same val set:

* ``nv12``: the batch's YUV444 straight to NV12 and back (``hat_bpu.device.nv12.board_input``,
  what align_bpu runs since 2026-12-02);
* ``rgb-round-trip``: the path before it, YUV444 → RGB → NV12 → YUV444 (a second colour
  conversion the board does not do), rebuilt here from the module's own functions.

    python bench/board_input.py RECIPE [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hat_bpu.device import nv12
from hat_bpu.device.runtime import Runtime

from hatcore.pipeline import Pipeline


def rgb_round_trip(img: torch.Tensor) -> torch.Tensor:
    """The old input path: normalised YUV444 → pixels → RGB → NV12 → YUV444, normalised."""
    pix = torch.round(img.detach().cpu().double() * 128 + 128).clamp_(0, 255)
    y, uv = nv12.rgb_to_nv12(nv12.yuv_to_rgb(pix))
    return (nv12.nv12_to_yuv444(y, uv).float() - 128) / 128


def runner(path: Path, convert: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Any], Any]:
    rt = Runtime(path)
    return lambda batch: rt(convert(batch["img"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("recipe")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    pipe = Pipeline.load(args.recipe, args.overrides)
    path = pipe.artifact("compile")
    model = pipe.build_model().eval()
    rows = {}
    for name, convert in (("nv12", nv12.board_input), ("rgb-round-trip", rgb_round_trip)):
        res = pipe.evaluate(model, runner(path, convert), device=torch.device("cpu"))
        rows[name] = {"AP": res["bbox"]["AP"], "AP50": res["bbox"]["AP50"]}
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
