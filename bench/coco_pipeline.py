"""Train-pipeline throughput of hat-coco: decode + transforms + collate, LMDB vs JPEG folder.

    OMP_NUM_THREADS=1 .venv/bin/python bench/coco_pipeline.py [--num-images 192] [--batches 12]
        [--train-step recipes/fcos_efficientnetb0_mscoco.toml]

Data: the shapes generator at 640 x 640 (JPEG q90), packed with `hat pack`'s code; transforms:
the COCO recipe's train list at 512 x 512. Reports img/s for 0, 1 and 2 DataLoader workers, the
single-thread decoders on one image, and (with --train-step) the float model's train step.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from hat_coco import transforms as T
from hat_coco.datasets import CocoDataset
from hat_coco.lmdb_store import CocoLmdbDataset, pack_dataset
from hat_coco.shapes import generate
from torch.utils.data import DataLoader


def train_transforms(size: int) -> list:
    return [T.Resize([size, size], [0.5, 2.0], True), T.RandomCrop([size, size]), T.Pad(size),
            T.RandomFlip(0.5, 0.0), T.AugmentHSV(0.015, 0.7, 0.4), T.ToTensor(True),
            T.Normalize([128.0] * 3, [128.0] * 3)]


def loader_rate(ds: torch.utils.data.Dataset, workers: int, batch: int, batches: int) -> float:
    dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                    collate_fn=ds.collate_fn, generator=torch.Generator().manual_seed(0),
                    persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    it = iter(dl)
    next(it)  # start-up (worker fork, first decode) is not throughput
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            it = iter(dl)
            b = next(it)
        n += b["img"].shape[0]
    return n / (time.perf_counter() - t0)


def decode_rates(path: Path, reps: int = 200) -> dict[str, float]:
    import simplejpeg
    from PIL import Image

    data = path.read_bytes()
    fns = {"simplejpeg": lambda: simplejpeg.decode_jpeg(data, colorspace="RGB"),
           "opencv": lambda: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
           "pil": lambda: np.asarray(Image.open(__import__("io").BytesIO(data)).convert("RGB"))}
    out = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out[name] = reps / (time.perf_counter() - t0)
    return out


def train_step_rate(recipe: str, ds: torch.utils.data.Dataset, batch: int, steps: int) -> float:
    from hatcore.pipeline import Pipeline

    pipe = Pipeline.load(recipe, ["model.num_classes=4", "model.backbone.pretrained=\"\""])
    model = pipe.build_model().train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    b = ds.collate_fn([ds[i] for i in range(batch)])
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = sum(model.compute_loss(model(b["img"]), b).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return batch / float(np.median(times[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="tmp_data/bench_shapes640")
    ap.add_argument("--num-images", type=int, default=192)
    ap.add_argument("--image-size", type=int, default=640)
    ap.add_argument("--size", type=int, default=512, help="network input side")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-step", default=None, help="a recipe whose float model is timed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # one thread per process: workers are the only parallelism measured
    root = Path(args.root)
    t0 = time.perf_counter()
    ann = generate(root, "train", args.num_images, args.image_size, 0)
    print(f"shapes: {args.num_images} images of {args.image_size} px ready in "
          f"{time.perf_counter() - t0:.1f} s")
    folder = CocoDataset(ann, root / "train2017", train_transforms(args.size))
    lmdb_path = root / "train_lmdb"
    if not lmdb_path.exists():
        t0 = time.perf_counter()
        pack_dataset(folder, lmdb_path)
        print(f"packed in {time.perf_counter() - t0:.1f} s")
    packed = CocoLmdbDataset(lmdb_path, train_transforms(args.size))
    rates = decode_rates(root / "train2017" / folder.records[0]["file_name"])
    print("decode one thread, img/s: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))
    print(f"\n| source | workers | img/s (decode + transforms + collate, {args.size} px) |")
    print("|---|---|---|")
    for workers in args.workers:
        for name, ds in (("JPEG folder", folder), ("LMDB", packed)):
            rate = loader_rate(ds, workers, args.batch_size, args.batches)
            print(f"| {name} | {workers} | {rate:.1f} |", flush=True)
    if args.train_step:
        rate = train_step_rate(args.train_step, packed, args.batch_size, 2)
        print(f"\nfloat train step ({args.train_step}, batch {args.batch_size}, "
              f"{torch.get_num_threads()} thread): {rate:.2f} img/s")


if __name__ == "__main__":
    main()
