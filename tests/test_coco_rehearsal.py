"""The COCO path rehearsed without COCO: a generated COCO-2017 folder, `teacher import` of an
MMDetection GFL R101 file, `distill --preset gfl-r101-to-r50` from an ImageNet-initialised R50,
stopped by SIGTERM and resumed, then `eval` (tiny images here; full size in
benchmarks/coco_rehearsal.py)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from typer.testing import CliRunner

from crosskd_cli.checkpoints.format import read_meta
from crosskd_cli.cli import app
from crosskd_cli.data import CocoDetection, resolve_data
from crosskd_cli.data.coco_layout import (
    COCO_CATEGORY_IDS,
    COCO_CLASSES,
    COCO_SIZES,
    write_coco_folder,
)
from crosskd_cli.distill.preset_checks import load_preset
from crosskd_cli.errors import DataError
from crosskd_cli.models import build_detector
from crosskd_cli.models.pretrained import BACKBONE_INITS, cache_path
from tests.test_import import mmdetection_layout
from tests.test_survive import crosskd

runner = CliRunner()
TINY_SIZES = ((96, 72), (72, 96))


def test_the_generated_folder_is_coco_2017_with_its_80_category_ids_names_and_image_sizes(
    tmp_path,
):
    root = write_coco_folder(tmp_path / "coco", train=3, val=2)
    source = resolve_data(str(root))  # the layout `--data FOLDER` expects
    assert source.train_ann == root / "annotations" / "instances_train2017.json"
    assert sorted(p.name for p in source.val_images.iterdir()) == [
        "000000000001.jpg",
        "000000000002.jpg",
    ]
    data = json.loads(source.train_ann.read_text())
    assert [c["id"] for c in data["categories"]] == list(COCO_CATEGORY_IDS)
    assert [c["name"] for c in data["categories"]] == list(COCO_CLASSES)
    assert len(COCO_CATEGORY_IDS) == 80 and COCO_CATEGORY_IDS[-1] == 90
    for k, info in enumerate(data["images"]):
        assert (info["width"], info["height"]) == COCO_SIZES[k]
        with Image.open(source.train_images / info["file_name"]) as image:
            assert image.format == "JPEG" and image.size == COCO_SIZES[k]
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        info = data["images"][ann["image_id"] - 1]
        assert 0 <= x and x + w <= info["width"] and 0 <= y and y + h <= info["height"]
        assert min(w, h) >= 8 * 0.6 and ann["iscrowd"] == 0
    dataset = CocoDetection(source.train_ann, source.train_images, train=True)
    assert dataset.category_ids == list(COCO_CATEGORY_IDS)
    assert len(dataset) == 3


def test_the_folder_is_the_same_for_a_seed_and_never_written_over(tmp_path):
    first = write_coco_folder(tmp_path / "a", train=2, val=1, sizes=TINY_SIZES, seed=5)
    again = write_coco_folder(tmp_path / "b", train=2, val=1, sizes=TINY_SIZES, seed=5)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = write_coco_folder(tmp_path / "c", train=2, val=1, sizes=TINY_SIZES, seed=6)
    assert (other / files[-1]).read_bytes() != (first / files[-1]).read_bytes()
    with pytest.raises(DataError, match="is not empty"):
        write_coco_folder(first, train=1, val=1)


def imagenet_resnet50(torch_home: Path) -> Path:
    """A random torchvision ResNet-50 state dict where torch hub keeps the ImageNet file."""
    path = cache_path(BACKBONE_INITS["torchvision://resnet50"])
    assert path == torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    path.parent.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


def test_a_coco_folder_rehearses_import_distill_stop_resume_and_eval(tmp_path, monkeypatch):
    torch_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    imagenet = imagenet_resnet50(torch_home)
    # 6 images make 3 steps an epoch, so the stop at step 2 falls mid-epoch
    root = write_coco_folder(tmp_path / "coco", train=6, val=2, sizes=TINY_SIZES)
    torch.manual_seed(0)
    mmdet_file = tmp_path / "gfl_r101_fpn_ms-2x_coco.pth"
    teacher_model = build_detector(load_preset("gfl-r101").model)
    state = {"meta": {"CLASSES": COCO_CLASSES}, "state_dict": mmdetection_layout(teacher_model)}
    torch.save(state, mmdet_file)
    del teacher_model, state

    teacher = tmp_path / "gfl_r101.safetensors"
    imported = runner.invoke(
        app, ["teacher", "import", str(mmdet_file), "--preset", "gfl-r101", "--data", str(root),
              "--out", str(teacher)],
    )  # fmt: skip
    assert imported.exit_code == 0, imported.output
    mmdet_file.unlink()  # 200 MB: the suite's temp disk is shared

    run = tmp_path / "run"
    tiny = ["--set", "data.scale=[128,96]", "--set", "train.max_iters=3",
            "--set", "data.num_workers=0", "--set", "train.log_interval=1"]  # fmt: skip
    stopped = crosskd(
        "distill", "--preset", "gfl-r101-to-r50", "--data", str(root), "--teacher", str(teacher),
        *tiny, "--out", str(run), action="sigterm", at=2,
    )  # fmt: skip
    assert stopped.returncode == 143, stopped.stderr
    assert f"student resnet50 (backbone from {imagenet})" in " ".join(stopped.stdout.split())
    assert "Stopped by SIGTERM at epoch 1, iteration 2" in stopped.stderr
    command = f"crosskd distill --resume --out {run}"
    assert stopped.stderr.splitlines()[-1] == f"Resume with: {command}"
    resumed = crosskd(*shlex.split(command)[1:])
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3]

    meta = read_meta(run / "best.safetensors")
    assert meta.kind == "student" and meta.model.backbone == "resnet50"
    assert meta.category_ids == list(COCO_CATEGORY_IDS) and meta.class_names == list(COCO_CLASSES)
    evaluated = runner.invoke(app, ["eval", str(run / "best.safetensors")])  # its val data
    assert evaluated.exit_code == 0, evaluated.output
    said = " ".join(evaluated.output.split())  # rich wraps long paths
    assert f"evaluating on the checkpoint's validation data {root}." in said
    assert "(2 images, faster, cpu)" in said
    metrics = json.loads((run / "eval-best" / "metrics.json").read_text())
    assert metrics["data"] == str(root) and 0 <= metrics["AP"] <= 100
    teacher.unlink()  # with the run and the hub cache, 800 MB: the suite's temp disk is shared
    shutil.rmtree(run)
    shutil.rmtree(torch_home)
