"""Shared fixtures: a private cache for every test and a tiny COCO folder factory."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Rich wraps at the terminal width; a wide one keeps asserted CLI messages on one line.
os.environ["COLUMNS"] = "200"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """No test writes to the user's cache; built-in data is generated once per session."""
    monkeypatch.setenv("CROSSKD_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@contextlib.contextmanager
def one_thread():
    """Run torch on one intra-op thread: the number of threads changes the summation order of
    reductions (convolution backward among them), so frozen reference numbers are computed and
    checked on one, whatever the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_image(path: Path, size=(40, 30), mode="RGB", seed=0) -> None:
    """Random pixels of `size` (w, h) in `mode`, in the format the suffix names."""
    rng = np.random.default_rng(seed)
    w, h = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 255, (h, w, channels), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode=mode).save(path)


def make_coco(root: Path, images: list[dict], annotations: list[dict], categories=None) -> Path:
    """A COCO-layout folder whose train and val splits are the same images and json.

    An image dict with "_missing": True is listed in the json but not written.
    """
    categories = categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    missing = [info.pop("_missing", False) for info in images]
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for k, info in enumerate(images):
            if not missing[k]:
                size = (info["width"], info["height"])
                write_image(root / split / info["file_name"], size, seed=k)
    (root / "annotations").mkdir(exist_ok=True)
    payload = json.dumps({"images": images, "annotations": annotations, "categories": categories})
    for split in ("train", "val"):
        (root / "annotations" / f"instances_{split}2017.json").write_text(payload)
    return root


@pytest.fixture
def tiny_coco(tmp_path):
    """Two 40x30 images, b.png without boxes. a.png has a cat box, a dog box reaching past the
    image edge, a crowd cat box and a zero-width dog box; category ids 3 and 7 (not 0, 1)."""
    images = [
        {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
    ]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 8], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [30, 20, 20, 20], "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10], "iscrowd": 1},
        {"id": 4, "image_id": 1, "category_id": 7, "bbox": [8, 8, 0, 5], "iscrowd": 0},
    ]
    return make_coco(tmp_path / "coco", images, annotations)
