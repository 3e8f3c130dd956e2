"""Checkpoints written by crosskd 0.1.0 keep loading and keep computing the same numbers.

`tests/fixtures/v0_1_0/` holds one tiny checkpoint per head family, written once by crosskd
0.1.0's own checkpoint writer (`make_fixtures.py` there: a real `crosskd teacher` / `crosskd
distill` run, weights then replaced so the file compresses), gzip-compressed, and beside each
the fixed input and everything 0.1.0 computed from it: FPN features, raw head outputs per
level, post-processed detections. The files are frozen: never regenerate them.

These tests load each file the way `crosskd eval` does (`load_checkpoint`, then
`build_detector(meta.model)`, then `load_state_into`, as `evaluate_checkpoint`), run it, and
compare by meaning: `DetectorOutput.features`, `HeadOutput.cls_logits` / `box_preds` /
`centerness`, `Detections.boxes` / `scores` / `labels`, against the stored `features.{level}`,
`cls_logits.{level}`, ... tensors. A refactor that renames modules (predictors, towers) may
change only how 0.1.0 state-dict keys are mapped on load, never the numbers: if one of these
tests fails, the refactor changed what old checkpoints compute.

What the fixtures guarantee, on any CPU: the same detections (labels equal; scores and boxes
within `OUTPUT_RTOL` (conftest) of the largest score and of the largest box coordinate), and
every raw output within OUTPUT_RTOL of its tensor's largest magnitude. The outputs were
computed once, in float32 on one CPU; another CPU's convolution kernels add in another order
(measured 2026-12-05, as a share of each tensor's largest magnitude: up to 1.6e-6 for
features and logits and 7.5e-6 for centerness with oneDNN held to AVX2 or SSE4.1, or without
oneDNN; float64 from the same weights is within 2.4e-6), so exact or elementwise-relative
comparisons hold on one kind of CPU only. A refactor that changes the function moves outputs
by far more.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from crosskd_cli.checkpoints.format import (
    CheckpointMeta,
    load_checkpoint,
    load_state_into,
    read_meta,
)
from crosskd_cli.cli import app
from crosskd_cli.inference.postprocess import postprocess
from crosskd_cli.models import Detector, build_detector
from tests.conftest import assert_close_to_scale, one_thread

FIXTURES = Path(__file__).parent / "fixtures" / "v0_1_0"
FAMILIES = ("gfl", "retinanet", "atss", "fcos")
DATA = "builtin:shapes:images=4,val=2,size=64"  # the data the runs trained and evaluated on
CLASS_NAMES = [
    "red_circle", "blue_circle", "green_square", "red_square", "blue_triangle",
    "yellow_triangle", "yellow_cross", "purple_cross", "purple_diamond", "green_diamond",
]  # fmt: skip
CATEGORY_IDS = [1, 2, 3, 5, 7, 8, 11, 13, 17, 19]
# family -> (kind, preset, training command, cross index of the distill run or None)
WRITTEN_BY = {
    "gfl": ("student", "shapes-gfl-r34-to-r18", "distill", 3),
    "retinanet": ("teacher", "shapes-retinanet-r34", "teacher", None),
    "atss": ("teacher", "shapes-atss-r34", "teacher", None),
    "fcos": ("student", "shapes-fcos-r34-to-r18", "distill", 2),
}
OUTPUT_FIELDS = ("features", "cls_logits", "box_preds", "centerness")


def unpack(family: str, folder: Path) -> Path:
    """The family's 0.1.0 checkpoint, decompressed into `folder`."""
    path = folder / f"{family}.safetensors"
    path.write_bytes(gzip.decompress((FIXTURES / f"{family}.safetensors.gz").read_bytes()))
    return path


def load_like_eval(path: Path) -> tuple[Detector, CheckpointMeta]:
    """Rebuild the model from the checkpoint alone, as `evaluate_checkpoint` does."""
    state_dict, meta = load_checkpoint(path)
    model = build_detector(meta.model)
    load_state_into(model, state_dict, source=str(path))
    return model.eval(), meta


def stored(family: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / f"{family}_outputs.safetensors"))


def levels(expected: dict[str, torch.Tensor], field: str) -> list[torch.Tensor]:
    count = sum(1 for key in expected if key.startswith(f"{field}."))
    return [expected[f"{field}.{level}"] for level in range(count)]


def test_the_tolerance_tells_a_changed_function_from_rounding(tmp_path):
    """A model whose last stage differs by a 1% change of one convolution's weights (what a
    refactor that changes the function looks like) fails; rounding passes."""
    model, _ = load_like_eval(unpack("gfl", tmp_path))
    expected = stored("gfl")
    images = expected["input.images"]
    sizes = [tuple(size) for size in expected["input.image_sizes"].tolist()]
    with torch.no_grad():
        model.neck.fpn_convs[0].weight.mul_(1.01)
        features = model(images, sizes).features
    with pytest.raises(AssertionError, match="features.0: apart by"):
        assert_close_to_scale(features[0], expected["features.0"], "features.0")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fixtures_were_written_by_crosskd_0_1_0(family):
    with safe_open(str(FIXTURES / f"{family}_outputs.safetensors"), framework="pt") as f:
        info = f.metadata()
    assert info["crosskd_version"] == "0.1.0" and info["family"] == family


@pytest.mark.parametrize("family", FAMILIES)
def test_a_v010_checkpoint_computes_the_outputs_v010_computed(family, tmp_path):
    model, meta = load_like_eval(unpack(family, tmp_path))
    expected = stored(family)
    images = expected["input.images"]
    sizes = [tuple(size) for size in expected["input.image_sizes"].tolist()]
    with one_thread(), torch.no_grad():
        out = model(images, sizes)
        detections = postprocess(out.head, sizes, model.spec)
    got = {
        "features": out.features,
        "cls_logits": out.head.cls_logits,
        "box_preds": out.head.box_preds,
        "centerness": out.head.centerness,
    }
    for field in OUTPUT_FIELDS:
        want = levels(expected, field)
        assert len(got[field]) == len(want), field
        for level, (mine, theirs) in enumerate(zip(got[field], want, strict=True)):
            assert_close_to_scale(mine, theirs, f"{field}.{level}")
    assert len(got["centerness"]) == (5 if family in ("atss", "fcos") else 0)
    assert len(detections) == len(sizes)
    for i, dets in enumerate(detections):
        assert torch.equal(dets.labels, expected[f"detections.{i}.labels"])
        assert_close_to_scale(dets.scores, expected[f"detections.{i}.scores"], f"scores {i}")
        assert_close_to_scale(dets.boxes, expected[f"detections.{i}.boxes"], f"boxes {i}")
    assert sum(len(d.scores) for d in detections) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_v010_metadata_reads_back_field_by_field(family, tmp_path):
    meta = read_meta(unpack(family, tmp_path))
    kind, preset, command, cross_index = WRITTEN_BY[family]
    assert meta.crosskd_version == "0.1.0"
    assert not meta.from_newer_crosskd
    assert (meta.kind, meta.preset, meta.val_data) == (kind, preset, DATA)
    assert meta.class_names == CLASS_NAMES and meta.category_ids == CATEGORY_IDS
    assert meta.image_scale == (96, 64) and meta.eval_batch_size == 2
    spec = meta.model
    assert (spec.family, spec.backbone, spec.num_classes) == (family, "resnet18", 10)
    assert (spec.fpn_channels, spec.head_channels, spec.stacked_convs) == (16, 16, 4)
    assert spec.norm_groups == (None if family == "retinanet" else 8)
    assert spec.strides == (8, 16, 32, 64, 128)
    assert meta.training["command"] == command and meta.training["iterations"] == 1
    if cross_index is not None:
        assert meta.training["method"] == "crosskd"
        assert meta.training["cross_index"] == cross_index
    assert set(meta.metrics) >= {"AP", "AP50", "AP75"}


@pytest.mark.parametrize("family", FAMILIES)
def test_crosskd_eval_and_inspect_take_a_v010_checkpoint(family, tmp_path):
    path = unpack(family, tmp_path)
    runner = CliRunner()
    out = tmp_path / "eval"
    # No --data: evaluates on the validation data the checkpoint records (built-in, generated)
    result = runner.invoke(app, ["eval", str(path), "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == DATA and metrics["batch_size"] == 2 and "AP" in metrics
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions and {p["category_id"] for p in predictions} <= set(CATEGORY_IDS)
    result = runner.invoke(app, ["inspect", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert family in result.output.lower()
