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

# float32 outputs of one model computed by other kernels (another CPU's instruction set, ONNX
# Runtime, torch.export) agree to this share of each tensor's largest magnitude, ~800 float32
# ulps of it: seen up to 7.5e-6 (tests/test_v010_checkpoints.py says where).
OUTPUT_RTOL = 1e-4


def assert_close_to_scale(
    mine: torch.Tensor, theirs: torch.Tensor, name: str, rtol: float = OUTPUT_RTOL
) -> None:
    """Same shape and dtype, every element within `rtol` of `theirs`' largest magnitude: the
    comparison float32 rounding across kernels allows, where an elementwise relative one
    fails on near-zero elements and an absolute one depends on the tensor's scale."""
    assert mine.shape == theirs.shape and mine.dtype == theirs.dtype, name
    scale = theirs.abs().max().item() if theirs.numel() else 0.0
    apart = (mine - theirs).abs().max().item() if theirs.numel() else 0.0
    assert apart <= rtol * scale, f"{name}: apart by {apart:.3g}, largest {scale:.3g}"


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


@pytest.fixture
def same_kernels_at_any_batch_size():
    """oneDNN picks other convolution kernels for other batch sizes, which differ in the last
    bits; torch's own CPU kernels on one thread compute each image alike in any batch, so
    detections of different batchings compare exactly."""
    import warnings

    with warnings.catch_warnings(), one_thread():
        warnings.simplefilter("ignore", UserWarning)  # torch notes that TF32 is for Intel GPUs
        with torch.backends.mkldnn.flags(enabled=False):
            yield


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


# (width, height): at data.scale [96, 96] these pad to 96x96, 96x64, 64x96, 96x32, 32x96
SIZES = [(40, 30), (64, 48), (30, 40), (100, 60), (33, 33), (40, 30), (70, 20), (20, 70),
         (50, 50), (48, 64), (31, 29), (90, 91), (96, 40)]  # fmt: skip


@pytest.fixture(scope="module")
def mixed_size_checkpoint(tmp_path_factory):
    """A COCO folder of 13 images of mixed sizes, one box each, and a random-weight GFL
    checkpoint whose class bias is 0, so that it detects plenty (scores around 0.5): (data
    source, checkpoint path, the model)."""
    import dataclasses

    from crosskd_cli.checkpoints.format import make_meta, save_checkpoint
    from crosskd_cli.data import resolve_data
    from crosskd_cli.distill.preset_checks import load_preset
    from crosskd_cli.models import build_detector

    root = tmp_path_factory.mktemp("mixed")
    images = [
        {"id": k + 1, "file_name": f"{k}.png", "width": w, "height": h}
        for k, (w, h) in enumerate(SIZES)
    ]
    annotations = [
        {"id": k + 1, "image_id": k + 1, "category_id": (3, 7)[k % 2], "bbox": [2, 3, w / 2, h / 2]}
        for k, (w, h) in enumerate(SIZES)
    ]
    make_coco(root / "coco", images, annotations)
    preset = load_preset("shapes-gfl-r18", ["data.scale=[96,96]"])
    spec = dataclasses.replace(preset.model, num_classes=2)
    torch.manual_seed(0)
    model = build_detector(spec)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.cls_predictor.weight, std=0.3)
        model.head.cls_predictor.bias.zero_()
    meta = make_meta(
        preset, spec, "teacher", class_names=["cat", "dog"], category_ids=[3, 7],
        val_data=str(root / "coco"), training={},
    )  # fmt: skip
    save_checkpoint(root / "model.safetensors", model.state_dict(), meta)
    return resolve_data(str(root / "coco")), root / "model.safetensors", model
