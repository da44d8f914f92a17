"""``hat infer``: one image through a recipe's val transforms, a trained stage and the drawer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import torch

from hat_coco.decode import DecodeError, decode_rgb
from hat_coco.draw import draw
from hatcore.errors import UserError


def infer_image(run: Any, image: Path, out: Path, stage: str = "float",
                score_thr: float = 0.3) -> int:
    """Detect in ``image`` with ``stage`` of ``run`` (the recipe's run context, from
    ``HatContext.load``); write the drawing to ``out``.

    :returns: the number of detections drawn.
    """
    try:
        img = decode_rgb(image.read_bytes())
    except OSError as exc:
        raise UserError(f"{image}: cannot read ({exc.strerror})") from None
    except DecodeError as exc:
        raise UserError(f"{image}: {exc}") from None
    pipe = run
    class_names = list(getattr(pipe.build_dataset("val"), "class_names", []))
    h, w = img.shape[:2]
    sample = {"img": img, "gt_boxes": torch.zeros(0, 4).numpy(),
              "gt_labels": torch.zeros(0, dtype=torch.int64).numpy(),
              "meta": {"image_id": 0, "file_name": image.name, "orig_size": (h, w),
                       "img_shape": (h, w), "pad_shape": (h, w), "scale": (1.0, 1.0),
                       "flip": False, "source": {"path": str(image)}}}
    for t in pipe.build_transforms("val"):
        sample = t(sample)
    from hat_coco.transforms import collate

    batch = collate([sample])
    model, runner = pipe.predictor(stage)
    device = pipe.predict_device(stage)
    [(_, dets)] = pipe.predictions(model.to(device), runner, [batch], device, "infer")
    det = {k: v.detach().cpu() for k, v in dets[0].items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), draw(img, det, class_names, score_thr)):
        raise UserError(f"{out}: cannot write the PNG")
    return int((det["scores"] >= score_thr).sum())
