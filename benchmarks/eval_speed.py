"""How fast does evaluation run? Images per second of `crosskd eval`'s prediction pass.

Times the evaluation path itself (`build_eval_loader` -> decode and resize -> the detector
in fp32 -> post-processing -> COCO results, as `evaluate.predict` runs it; not the COCO
metric, which is a fixed cost of a few seconds on COCO val) for two random-weight models:

- `student-160`: the quickstart student (`shapes-gfl-r18`: GFL, ResNet-18, 64-channel FPN and
  head, 10 classes) on 160x160 images, the built-in data's size;
- `gfl-r50-1333`: a COCO-sized GFL ResNet-50 (`gfl-r50`: 256 channels, 80 classes) on
  1333x800 images, MMDetection's test scale.

The images are random pixels written once into a temporary COCO folder (all one size, so
every batch is full). Random weights put fewer candidates past the score threshold than a
trained model, so post-processing is a little cheaper than on real data; the backbone, FPN
and head dominate anyway. One warm-up batch is run and not timed; each row is the best of
--repeats passes over the images.

    python -m benchmarks.eval_speed                          # both models, batch 1 and 2 (+8)
    python -m benchmarks.eval_speed --device cuda --r50-images 32
    python -m benchmarks.eval_speed --threads 1 --only student-160

Prints a markdown table: model, image size, batch size, device, threads, images/second and
milliseconds per image.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import machine
from crosskd_cli.data import CocoDetection, build_eval_loader
from crosskd_cli.distill.preset_checks import load_preset
from crosskd_cli.engine.devices import resolve_device
from crosskd_cli.inference.evaluate import predict
from crosskd_cli.models import build_detector


@dataclass(frozen=True)
class Case:
    name: str
    preset: str
    width: int
    height: int
    scale: tuple[int, int]
    batch_sizes: tuple[int, ...]


CASES = (
    Case("student-160", "shapes-gfl-r18", 160, 160, (160, 160), (1, 2, 8)),
    Case("gfl-r50-1333", "gfl-r50", 1333, 800, (1333, 800), (1, 2)),
)


def write_images(root: Path, count: int, width: int, height: int) -> Path:
    """A COCO-layout val split of `count` random-pixel PNGs, one box each."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for k in range(count):
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "val2017" / f"{k}.png", compress_level=1)
        images.append({"id": k + 1, "file_name": f"{k}.png", "width": width, "height": height})
        box = [width / 4, height / 4, width / 3, height / 3]
        annotations.append({"id": k + 1, "image_id": k + 1, "category_id": 1, "bbox": box})
    payload = {"images": images, "annotations": annotations,
               "categories": [{"id": 1, "name": "thing"}]}  # fmt: skip
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(payload))
    return root


def images_per_second(case: Case, count: int, device: torch.device, repeats: int, tmp: Path):
    """[(batch size, images/second)] of `case` over `count` images on `device`."""
    root = write_images(tmp / case.name, count, case.width, case.height)
    dataset = CocoDetection(
        root / "annotations" / "instances_val2017.json",
        root / "val2017",
        train=False,
        scale=case.scale,
    )
    spec = load_preset(case.preset, []).model
    torch.manual_seed(0)
    model = build_detector(spec).to(device).eval()
    category_ids = list(range(1, spec.num_classes + 1))
    rows = []
    for batch_size in case.batch_sizes:
        with torch.inference_mode():  # warm-up: one batch, untimed
            for batch in next(iter(build_eval_loader(dataset, batch_size=batch_size))):
                batch = batch.to(device)
                model(batch.images, batch.image_sizes)
        best = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            predict(model, build_eval_loader(dataset, batch_size=batch_size), category_ids)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        rows.append((batch_size, count / best))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--student-images", type=int, default=64)
    parser.add_argument("--r50-images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma-separated case names")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    counts = {"student-160": args.student_images, "gfl-r50-1333": args.r50_images}
    chosen = [c for c in CASES if args.only is None or c.name in args.only.split(",")]
    cpu = machine()["cpu"]
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, {cpu}\n")
    print("| model | images | batch | device | threads | images/s | ms/image |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for case in chosen:
            count = counts[case.name]
            for batch_size, speed in images_per_second(
                case, count, device, args.repeats, Path(tmp)
            ):
                print(
                    f"| {case.name} | {count} x {case.width}x{case.height} | {batch_size} | "
                    f"{device} | {torch.get_num_threads()} | {speed:.2f} | {1000 / speed:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
