"""`crosskd predict` and the Python API: one's own images in, detections and pictures out."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from crosskd_cli.api import Predictor
from crosskd_cli.checkpoints.format import load_checkpoint, save_checkpoint
from crosskd_cli.cli import app
from crosskd_cli.data import read_image
from crosskd_cli.inference.predict import draw_results
from crosskd_cli.viz.drawing import GAP, TITLE_HEIGHT, draw_detections, read_png, xywh_to_xyxy
from tests.conftest import SIZES, assert_close_to_scale, write_image

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def two_checkpoints(mixed_size_checkpoint):
    """The mixed-size teacher and a 'CrossKD student' (the same model, other class weights):
    (images folder, [teacher, student] checkpoints, data source)."""
    source, teacher, _ = mixed_size_checkpoint
    state_dict, meta = load_checkpoint(teacher)
    torch.manual_seed(1)
    weight = state_dict["head.cls_predictor.weight"]
    state_dict["head.cls_predictor.weight"] = weight + 0.1 * torch.randn_like(weight)
    student_meta = dataclasses.replace(
        meta, kind="student", training={"method": "crosskd", "cross_index": 3}
    )
    student = teacher.parent / "student.safetensors"
    save_checkpoint(student, state_dict, student_meta)
    return source.val_images, [teacher, student], source


def test_predict_writes_json_and_pictures_drawn_from_the_json_numbers(two_checkpoints, tmp_path):
    images, checkpoints, _ = two_checkpoints
    result = invoke("predict", "--source", images, *checkpoints, "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    assert "student (crosskd, i=3):" in result.output
    files = sorted(images.iterdir())
    panels = []
    for checkpoint in checkpoints:
        records = json.loads((tmp_path / "p" / f"{checkpoint.stem}.json").read_text())
        assert len(records) > 13  # random weights with zero class bias detect plenty
        assert set(records[0]) == {
            "image_id", "file_name", "category_id", "class_name", "bbox", "score",
        }  # fmt: skip
        assert {(r["category_id"], r["class_name"]) for r in records} <= {(3, "cat"), (7, "dog")}
        assert all(r["score"] >= 0.3 for r in records)
        assert {(r["image_id"], r["file_name"]) for r in records} <= {
            (k + 1, f.name) for k, f in enumerate(files)
        }
        predictor = Predictor.load(checkpoint, "cpu")
        for image_id, path in enumerate(files, start=1):
            picture = read_png(tmp_path / "p" / checkpoint.stem / f"{path.stem}.png")
            image = read_image(path)
            assert picture.shape == image.shape  # the image's own size
            mine = [r for r in records if r["image_id"] == image_id]
            assert torch.equal(picture, draw_results(image, mine, predictor))
        panels.append(read_png(tmp_path / "p" / checkpoint.stem / "3.png"))
    both = read_png(tmp_path / "p" / "side_by_side" / "3.png")
    height, width = SIZES[3][1], SIZES[3][0]
    assert both.shape == (3, TITLE_HEIGHT + height, 2 * width + GAP)
    assert torch.equal(both[:, TITLE_HEIGHT:, :width], panels[0])
    assert torch.equal(both[:, TITLE_HEIGHT:, width + GAP :], panels[1])


def test_predict_detections_equal_evals_for_the_same_images(
    two_checkpoints, tmp_path, same_kernels_at_any_batch_size
):
    """Bit for bit, with predict batching 3 images and eval 1 (`same_kernels_at_any_batch_size`)."""
    images, checkpoints, source = two_checkpoints
    evaluated = tmp_path / "eval"
    assert invoke("eval", checkpoints[0], "--batch-size", "1", "--out", evaluated).exit_code == 0
    options = ["--score-thr", "0", "--batch-size", "3", "--out", tmp_path / "p"]
    assert invoke("predict", "--source", images, checkpoints[0], *options).exit_code == 0
    coco = json.loads(source.val_ann.read_text())
    file_of = {info["id"]: info["file_name"] for info in coco["images"]}

    def of_file(records, file_name, key):
        return [(r["category_id"], r["bbox"], r["score"]) for r in records if key(r) == file_name]

    expected = json.loads((evaluated / "predictions.json").read_text())
    got = json.loads((tmp_path / "p" / f"{checkpoints[0].stem}.json").read_text())
    assert len(got) == len(expected) > 50
    for file_name in file_of.values():
        assert of_file(got, file_name, lambda r: r["file_name"]) == of_file(
            expected, file_name, lambda r: file_of[r["image_id"]]
        )


def test_the_api_takes_paths_tensors_pil_images_and_arrays_alike(two_checkpoints):
    images, checkpoints, _ = two_checkpoints
    model = Predictor.load(checkpoints[1], device="cpu")
    path = images / "3.png"
    tensor = read_image(path)
    found = model.predict(
        [path, tensor, Image.open(path), np.asarray(Image.open(path))], score_thr=0.3
    )
    assert found[0].source == str(path) and found[1].source is None
    for other in found[1:]:
        assert torch.equal(other.boxes, found[0].boxes)
        assert torch.equal(other.scores, found[0].scores)
    first = found[0]
    assert first.image_size == (SIZES[3][1], SIZES[3][0])
    assert len(first) > 0 and (first.scores >= 0.3).all()
    assert first.names == [["cat", "dog"][k] for k in first.labels.tolist()]
    assert first.category_ids == [[3, 7][k] for k in first.labels.tolist()]
    assert (first.boxes[:, 2:] <= torch.tensor([SIZES[3][0], SIZES[3][1]])).all()
    assert model.predict(path, score_thr=0.3)[0].scores.tolist() == first.scores.tolist()


def test_unreadable_files_are_named_and_skipped_and_an_empty_folder_is_refused(
    two_checkpoints, tmp_path
):
    _, checkpoints, _ = two_checkpoints
    folder = tmp_path / "mine"
    folder.mkdir()
    assert "holds no images" in invoke("predict", "--source", folder, checkpoints[0]).output
    write_image(folder / "good.jpg", (50, 40))
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image")
    result = invoke("predict", "--source", folder, checkpoints[0], "--out", tmp_path / "p")
    assert result.exit_code == 0
    assert "Skipped" in result.output and "broken.png" in result.output
    records = json.loads((tmp_path / "p" / "model.json").read_text())
    assert {r["file_name"] for r in records} == {"good.jpg"}
    assert sorted(p.name for p in (tmp_path / "p" / "model").iterdir()) == ["good.png"]
    again = invoke("predict", "--source", folder, checkpoints[0], "--out", tmp_path / "p")
    assert again.exit_code == 2 and "already exists" in again.output


@pytest.mark.parametrize(
    "option,message",
    [(["--score-thr", "1.5"], "--score-thr must be between 0 and 1"),
     (["--device", "tpu"], "--device 'tpu' is not known")],
)  # fmt: skip
def test_bad_options_are_refused_before_any_work(two_checkpoints, option, message):
    images, checkpoints, _ = two_checkpoints
    result = invoke("predict", "--source", images, checkpoints[0], *option)
    assert result.exit_code == 2 and message in result.output


def test_without_out_predict_numbers_a_fresh_folder(two_checkpoints, tmp_path, monkeypatch):
    images, checkpoints, _ = two_checkpoints
    monkeypatch.chdir(tmp_path)
    single = images / "0.png"
    for _ in range(2):
        assert invoke("predict", "--source", single, checkpoints[0]).exit_code == 0
    assert Path("runs/predict/model.json").exists() and Path("runs/predict-2/model.json").exists()


def test_eval_save_vis_draws_ground_truth_beside_the_predictions_json(two_checkpoints, tmp_path):
    _, checkpoints, source = two_checkpoints
    out = tmp_path / "eval"
    result = invoke("eval", checkpoints[0], "--save-vis", "3", "--per-class", "--out", out)
    assert result.exit_code == 0, result.output
    assert "Drew 3 images" in result.output
    coco = json.loads(source.val_ann.read_text())
    predictions = json.loads((out / "predictions.json").read_text())
    assert sorted(p.name for p in (out / "vis").iterdir()) == ["0-1.png", "1-2.png", "2-3.png"]
    for info in coco["images"][:3]:
        picture = read_png(out / "vis" / f"{Path(info['file_name']).stem}-{info['id']}.png")
        width, height = info["width"], info["height"]
        assert picture.shape == (3, TITLE_HEIGHT + height, 2 * width + GAP)
        image = read_image(source.val_images / info["file_name"])
        truth = [a for a in coco["annotations"] if a["image_id"] == info["id"]]
        shown = [p for p in predictions if p["image_id"] == info["id"] and p["score"] >= 0.3]
        assert shown  # the right panel shows detections
        expected = [
            draw_detections(
                image,
                xywh_to_xyxy([a["bbox"] for a in truth]),
                [[3, 7].index(a["category_id"]) for a in truth],
                ["cat", "dog"],
            ),
            draw_detections(
                image,
                xywh_to_xyxy([p["bbox"] for p in shown]),
                [[3, 7].index(p["category_id"]) for p in shown],
                ["cat", "dog"],
                [p["score"] for p in shown],
            ),
        ]
        assert torch.equal(picture[:, TITLE_HEIGHT:, :width], expected[0])
        assert torch.equal(picture[:, TITLE_HEIGHT:, width + GAP :], expected[1])


def test_eval_per_class_prints_and_writes_id_name_instances_and_ap(two_checkpoints, tmp_path):
    _, checkpoints, _ = two_checkpoints
    result = invoke("eval", checkpoints[0], "--per-class", "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())["per_class"]
    # 13 images, one box each, alternating cat (3) and dog (7)
    assert [(r["category_id"], r["name"], r["instances"]) for r in rows] == [
        (3, "cat", 7),
        (7, "dog", 6),
    ]
    assert all(0.0 <= r["AP"] <= r["AP50"] <= 100.0 for r in rows)
    for row in rows:
        cells = ["3" if row["name"] == "cat" else "7", row["name"], str(row["instances"])]
        cells += [f"{row[key]:.1f}" for key in ("AP", "AP50", "AP75")]
        assert any(
            [cell.strip() for cell in line.split("│")[1:-1]] == cells
            for line in result.output.splitlines()
        )


def _has(*packages: str) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in packages)


@pytest.mark.parametrize(
    "fmt",
    [
        "pt2",
        pytest.param(
            "onnx",
            marks=pytest.mark.skipif(
                not _has("onnx", "onnxscript", "onnxruntime"),
                reason="onnx, onnxscript and onnxruntime are not installed: "
                "pip install 'crosskd-cli[export]'",
            ),
        ),
    ],
)
def test_export_writes_a_file_whose_raw_outputs_equal_the_models(two_checkpoints, tmp_path, fmt):
    _, checkpoints, _ = two_checkpoints
    out = tmp_path / f"student.{fmt}"
    result = invoke("export", checkpoints[1], "--format", fmt, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"Wrote {out}" in result.output and "max abs diff to PyTorch" in result.output
    assert "[torch.onnx]" not in result.output  # the exporter's progress lines stay out
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["class_names"] == ["cat", "dog"] and sidecar["category_ids"] == [3, 7]
    assert sidecar["outputs"] == [f"{kind}_p{k}" for kind in ("cls", "box") for k in range(3, 8)]
    # Run the written file here too, at another batch size and image size than the export's
    # check, against the model as evaluation runs it (padding masked by image sizes).
    predictor = Predictor.load(checkpoints[1], "cpu")
    images = torch.rand(3, 3, 192, 256, generator=torch.Generator().manual_seed(5)) * 255
    sizes = [(192, 256), (180, 200), (170, 256)]
    for k, (h, w) in enumerate(sizes):
        images[k, :, h:], images[k, :, :, w:] = 0, 0
    with torch.no_grad():
        head = predictor.model(images, sizes).head
    expected = [*head.cls_logits, *head.box_preds]
    if fmt == "pt2":
        got = torch.export.load(out).module()(images, torch.tensor(sizes))
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        feed = {"images": images.numpy(), "image_sizes": torch.tensor(sizes).numpy()}
        got = [torch.from_numpy(a) for a in session.run(None, feed)]
    for k, (mine, theirs) in enumerate(zip(got, expected, strict=True)):
        assert_close_to_scale(mine, theirs, sidecar["outputs"][k])
    again = invoke("export", checkpoints[1], "--format", fmt, "--out", out)
    assert again.exit_code == 2 and "already exists" in again.output


def test_export_refuses_an_unknown_format(two_checkpoints):
    result = invoke("export", two_checkpoints[1][1], "--format", "torchscript")
    assert result.exit_code == 2 and "--format 'torchscript' is not known" in result.output


def test_onnx_without_its_packages_says_which_extra_to_install(two_checkpoints, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name)
    )
    result = invoke("export", two_checkpoints[1][1], "--format", "onnx")
    assert result.exit_code == 2
    assert "--format onnx needs the package(s) onnxruntime" in result.output
    assert "pip install 'crosskd-cli[export]'" in result.output
