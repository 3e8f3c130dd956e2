"""What a user sees of a run: results.png, the paper's Fig. 5 (prediction_gap.png) and Fig. 2
(`inspect --targets`): each picture is written, decodes as a PNG of the expected size, and
shows exactly the numbers of results.csv, log.jsonl or targets.json."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from crosskd_cli.checkpoints.format import load_checkpoint
from crosskd_cli.cli import app
from crosskd_cli.data import ClassList, CocoDetection, resolve_data
from crosskd_cli.data.collate import collate_by_shape
from crosskd_cli.distill.prediction_gap import COLUMNS, PredictionGap
from crosskd_cli.distill.preset_checks import load_preset
from crosskd_cli.distill.target_maps import compute_target_maps, draw_level
from crosskd_cli.families import build_criterion
from crosskd_cli.models import build_detector
from crosskd_cli.runs.jobs import load_teacher
from crosskd_cli.storage.run_folder import RunDir
from crosskd_cli.viz.plots import GAP_COLUMNS, plot_gap, plot_results
from tests.hostile.contract import refused

runner = CliRunner()
DATA = "builtin:shapes:images=24,val=8,size=96"
TINY = [
    "--data", DATA, "--set", "train.batch_size=4", "--set", "train.eval_batch_size=4",
    "--set", "data.num_workers=0", "--set", "data.scale=[96,96]", "--set", "train.warmup_iters=2",
    "--set", "train.log_interval=1", "--set", "train.eval_interval=1",
]  # fmt: skip
PAIR = ["--preset", "shapes-gfl-r50-to-r18", "--set", "model.backbone=resnet18"]
FIG2 = ["inspect", "--targets", "--preset", "shapes-gfl-r50-to-r18", "--set", "data.scale=[96,96]",
        "--data", DATA]  # fmt: skip
TWO_EPOCHS = ["--set", "train.max_iters=12"]  # 24 images in batches of 4: 6 per epoch


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # decodes every pixel: a truncated file raises
        return image.size


def csv_rows(path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("plots") / "teacher"
    invoke("teacher", "--preset", "shapes-gfl-r18", *TINY, *TWO_EPOCHS, "--out", out)
    return out


def other_teacher(teacher) -> list:
    return ["--other-teacher", "--teacher", teacher / "best.safetensors"]


@pytest.fixture(scope="module")
def student(teacher):
    out = teacher.parent / "student"
    # an R18 teacher for the pair's R50 one, on purpose (fast)
    result = invoke("distill", *PAIR, *TINY, *TWO_EPOCHS, *other_teacher(teacher), "--out", out)
    assert "results.png, prediction_gap.png" in result.output
    return out


def test_a_run_draws_results_png_of_its_log_and_its_evaluations(teacher):
    assert png_size(teacher / "results.png") == (864, 280)
    drawn = plot_results(RunDir(teacher))  # drawn again: the lines as matplotlib holds them
    records = [json.loads(line) for line in (teacher / "log.jsonl").read_text().splitlines()]
    iterations = [float(r["iteration"]) for r in records]
    assert iterations == [float(k) for k in range(1, 13)]
    losses = drawn["losses (per log interval)"]
    assert set(losses) == {"loss_qfl", "loss_dfl", "loss_giou", "total"}
    for name in ("loss_qfl", "loss_dfl", "loss_giou"):
        assert losses[name] == (iterations, [r[name] for r in records])
    total = [r["loss_qfl"] + r["loss_dfl"] + r["loss_giou"] for r in records]
    assert losses["total"][1] == pytest.approx(total, rel=1e-12)
    assert drawn["learning rate"]["lr"] == (iterations, [r["lr"] for r in records])
    rows = csv_rows(teacher / "results.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]  # evaluated after each epoch
    for key in ("AP", "AP50", "AP75"):
        assert drawn["validation AP"][key] == ([1.0, 2.0], [float(r[key]) for r in rows])


def test_distill_measures_the_papers_fig5_each_epoch_and_draws_it(teacher, student):
    rows = csv_rows(student / "results.csv")
    assert len(rows) == 2 and all(row[c] for row in rows for c in COLUMNS)
    assert png_size(student / "prediction_gap.png") == (1440, 280)
    drawn = plot_gap({"s": student / "results.csv"}, student / "again.png", "again")
    for column, title in GAP_COLUMNS.items():
        assert drawn[title]["s"] == ([1.0, 2.0], [float(r[column]) for r in rows])
    assert drawn["(c) validation AP"]["s"] == ([1.0, 2.0], [float(r["AP"]) for r in rows])

    # the last row is the final student, measured again here from its checkpoint
    teacher_model, _ = load_teacher(teacher / "best.safetensors")
    state, meta = load_checkpoint(student / "last.safetensors")
    model = build_detector(meta.model)
    model.load_state_dict(state)
    val = CocoDetection(
        resolve_data(DATA).val_ann, resolve_data(DATA).val_images, train=False, scale=(96, 96)
    )
    gap = PredictionGap(teacher_model.eval(), build_criterion(meta.model), val, 64, 4, "cpu")
    measured = gap(model.train())
    assert model.training  # the measurement hands the student back in the mode it found it
    for column in COLUMNS:
        assert float(rows[-1][column]) == pytest.approx(measured[column], rel=1e-5)
        assert math.isfinite(measured[column]) and measured[column] > 0


def test_the_fig5_measurement_changes_nothing_the_student_learns(teacher, student):
    out = student.parent / "student-without-gap"
    off = ["--set", "distill.gap_images=0"]
    invoke("distill", *PAIR, *TINY, *TWO_EPOCHS, *off, *other_teacher(teacher), "--out", out)
    with_gap, _ = load_checkpoint(student / "last.safetensors")
    without, _ = load_checkpoint(out / "last.safetensors")
    assert with_gap.keys() == without.keys()
    for key in with_gap:
        assert torch.equal(with_gap[key], without[key]), key
    same = [c for c in csv_rows(out / "results.csv")[0] if c not in ("seconds",)]
    for a, b in zip(csv_rows(student / "results.csv"), csv_rows(out / "results.csv"), strict=True):
        assert {c: a[c] for c in same} == {c: b[c] for c in same}
    assert not any(c in csv_rows(out / "results.csv")[0] for c in COLUMNS)
    assert not (out / "prediction_gap.png").exists()


def test_inspect_targets_draws_the_teachers_scores_beside_the_assigned_targets(teacher, tmp_path):
    teacher_file = teacher / "best.safetensors"
    out = tmp_path / "fig2"
    args = [*FIG2, "--image-id", "3", "--teacher", teacher_file]
    result = invoke(*args, "--out", out)
    levels = ["P3", "P4", "P5", "P6", "P7"]
    for level in levels:
        assert f"{level} (stride" in result.output
        assert png_size(out / f"targets_{level}.png") == (1024, 240)
    saved = json.loads((out / "targets.json").read_text())
    assert saved["image_id"] == 3 and [lv["level"] for lv in saved["levels"]] == levels

    # the teacher's scores and the assignment, computed here without target_maps
    model, meta = load_teacher(teacher_file)
    spec = load_preset("shapes-gfl-r50-to-r18", ["data.scale=[96,96]"]).model
    classes = ClassList(tuple(meta.category_ids), tuple(meta.class_names), "t", "")
    source = resolve_data(DATA)
    val = CocoDetection(
        source.val_ann, source.val_images, train=False, scale=(96, 96), classes=classes
    )
    (batch,) = collate_by_shape([val[val.image_ids.index(3)]])
    with torch.no_grad():
        head = model.eval()(batch.images, batch.image_sizes).head
    criterion = build_criterion(meta.model)
    flat = criterion.flatten(head, batch.image_sizes)
    targets = criterion.assign(flat, batch.targets)
    h, w = batch.image_sizes[0]
    p3 = saved["levels"][0]
    scores = head.cls_logits[0][0].sigmoid().amax(0)  # (H3, W3): one prior per location
    rows, cols = -(-h // 8), -(-w // 8)  # P3 locations inside the image
    expected = scores[:rows, :cols].numpy()
    assert np.asarray(p3["teacher"], dtype=float)[:rows, :cols] == pytest.approx(expected, abs=1e-6)
    assert all(v is None for row in p3["teacher"][rows:] for v in row)  # padding: no loss
    positives = targets.pos_mask[0].split(flat.anchors.num_per_level)
    assert [lv["positives"] for lv in saved["levels"]] == [int(p.sum()) for p in positives]
    assert sum(lv["positives"] for lv in saved["levels"]) > 0

    # the pictures show the numbers of targets.json
    maps = compute_target_maps(
        load_preset("shapes-gfl-r50-to-r18", ["data.scale=[96,96]"]), source, teacher_file, 3
    )
    drawn = draw_level(maps, maps.levels[0], tmp_path / "p3.png")
    for name in ("teacher", "target", "disagreement"):
        shown = np.asarray(p3[name], dtype=float)
        np.testing.assert_allclose(drawn[name], shown, atol=1e-6, equal_nan=True)
    assert spec.family == meta.model.family


def test_inspect_targets_refuses_an_unknown_image_and_an_existing_picture(teacher, tmp_path):
    teacher_file = teacher / "best.safetensors"
    args = [*FIG2, "--teacher", teacher_file, "--out", tmp_path]
    unknown = runner.invoke(app, [str(a) for a in [*args, "--image-id", "999"]])
    refused(unknown, "--image-id 999 is not an image of the validation split")
    invoke(*args)
    again = runner.invoke(app, [str(a) for a in args])
    refused(again, "targets_P3.png already exists", "--overwrite")
    invoke(*args, "--overwrite")


@pytest.mark.parametrize("family", ["gfl", "retinanet", "atss", "fcos"])
def test_the_fig5_distances_are_measured_for_every_head_family(family):
    preset = load_preset(f"shapes-{family}-r34-to-r18", ["data.scale=[96,96]"])
    source = resolve_data(DATA)
    val = CocoDetection(source.val_ann, source.val_images, train=False, scale=(96, 96))
    torch.manual_seed(0)
    teacher_model, student_model = build_detector(preset.model), build_detector(preset.model)
    gap = PredictionGap(teacher_model.eval(), build_criterion(preset.model), val, 3, 2, "cpu")
    measured = gap(student_model)
    assert set(measured) == set(COLUMNS)
    assert all(math.isfinite(v) and v > 0 for v in measured.values()), measured
    itself = gap(teacher_model)  # the teacher against itself
    assert itself["l1_to_teacher_cls"] == 0.0 and itself["l1_to_teacher_box"] == 0.0
