"""A COCO-format set whose JPEGs cost what photos cost to decode, for issue 18's loader rows.

    .venv/bin/python bench/photo_set.py OUT --train 400 --val 100 --size 400 --noise 15

There is no photo set on this machine and nothing may be downloaded, so this one is made: the
``dense`` shapes preset (10-60 occluding objects among clutter on a texture, hat_coco.shapes)
at ``--size`` px, then every image gets sensor-like noise (Gaussian, ``--noise`` grey levels,
per pixel and channel, plus a 1/f-spectrum grain) and is stored again as a quality-90 JPEG.
The noise is what makes a JPEG of a photo large: its entropy decoding, not its pixel count,
is what a loader pays for (a 640x480 COCO JPEG is about 160 KB, ~4.2 bits per pixel; the
dense preset alone stores ~2.6, noise 15 brings it to ~4.3). The script prints the bits per
pixel it reached and the decode time per image (cv2.imdecode, one thread) beside a COCO-sized
figure, so the rows it feeds say how photo-like the set was. The boxes are the preset's (the
noise moves no object).

Then pack it as a user would:

    hat pack coco --ann-file OUT/annotations/instances_train2017.json \\
        --img-dir OUT/train2017 --target-data-dir OUT/lmdb --split-name train
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
from hat_coco.shapes import generate


def grain(g: np.random.Generator, size: int) -> np.ndarray:
    """A 1/f-spectrum noise field (mean 0, std 1): the fine texture of a photographed surface."""
    f = np.fft.fftfreq(size)
    r = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    r[0, 0] = 1.0
    spec = (g.standard_normal((size, size)) + 1j * g.standard_normal((size, size))) / r
    out = np.fft.ifft2(spec).real
    return (out - out.mean()) / (out.std() + 1e-9)


def roughen(path: Path, g: np.random.Generator, noise: float) -> None:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR).astype(np.float32)
    h, w = img.shape[:2]
    img += noise * g.standard_normal(img.shape, dtype=np.float32)
    img += (noise * grain(g, max(h, w))[:h, :w, None]).astype(np.float32)
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    cv2.imwrite(str(path), out, [cv2.IMWRITE_JPEG_QUALITY, 90])


def decode_ms(paths: list[Path]) -> float:
    cv2.setNumThreads(1)
    blobs = [p.read_bytes() for p in paths]
    times = []
    for b in blobs:
        t = time.perf_counter()
        cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--size", type=int, default=400)
    ap.add_argument("--noise", type=float, default=15.0, help="grey levels of noise (std)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    root = Path(args.out)
    for split, n in (("train", args.train), ("val", args.val)):
        marker = root / f".{split}.roughened"
        ann = generate(root, split, n, args.size, args.seed, preset="dense")
        if marker.is_file():
            continue
        before = sum(p.stat().st_size for p in (root / f"{split}2017").glob("*.jpg"))
        g = np.random.default_rng([args.seed, 7, len(split)])
        for p in sorted((root / f"{split}2017").glob("*.jpg")):
            roughen(p, g, args.noise)
        marker.write_text(json.dumps({"noise": args.noise}))
        after = sum(p.stat().st_size for p in (root / f"{split}2017").glob("*.jpg"))
        px = n * args.size * args.size
        boxes = len(json.loads(ann.read_text())["annotations"])
        print(f"{split}: {n} images, {boxes} boxes; {8 * before / px:.2f} -> {8 * after / px:.2f}"
              f" bits per pixel ({after / n / 1024:.0f} KB per image)")
    paths = sorted((root / "train2017").glob("*.jpg"))[:50]
    ms = decode_ms(paths)
    print(f"decode: {ms:.2f} ms per {args.size}x{args.size} image on one thread "
          f"({ms / (args.size * args.size) * 640 * 480:.2f} ms scaled to a 640x480 COCO image's "
          "pixels)")


if __name__ == "__main__":
    main()
