"""`crosskd export --nms`: a graph that returns evaluation's final detections, not raw outputs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

from crosskd_cli.api import Predictor
from crosskd_cli.cli import app
from crosskd_cli.inference.postprocess import postprocess, postprocess_padded
from tests.conftest import assert_close_to_scale

runner = CliRunner()
needs_onnx = pytest.mark.skipif(
    not all(importlib.util.find_spec(n) for n in ("onnx", "onnxscript", "onnxruntime")),
    reason="onnx, onnxscript and onnxruntime are not installed: pip install 'crosskd-cli[export]'",
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One random-weight checkpoint per family (ResNet-18, 2 classes), class bias 0 so that
    every image has plenty of detections (dozens to hundreds), final scores not tied at a
    saturated 1.0 (equal scores may come in either order): {family: path}."""
    from crosskd_cli.checkpoints.format import make_meta, save_checkpoint
    from crosskd_cli.distill.preset_checks import load_preset
    from crosskd_cli.models import build_detector

    root = tmp_path_factory.mktemp("export-nms")
    paths = {}
    for family in ("gfl", "atss", "fcos", "retinanet"):
        preset = load_preset(f"shapes-{family}-r34", ["data.scale=[96,96]"])
        spec = dataclasses.replace(preset.model, backbone="resnet18", num_classes=2)
        torch.manual_seed(0)
        model = build_detector(spec)
        with torch.no_grad():
            # at 0.3 RetinaNet's class scores here saturate at 1.0
            std = 0.03 if family == "retinanet" else 0.3
            torch.nn.init.normal_(model.head.cls_predictor.weight, std=std)
            model.head.cls_predictor.bias.zero_()
        meta = make_meta(
            preset, spec, "student", class_names=["cat", "dog"], category_ids=[3, 7],
            val_data="builtin:shapes", training={},
        )  # fmt: skip
        paths[family] = root / f"{family}.safetensors"
        save_checkpoint(paths[family], model.state_dict(), meta)
    return paths


def other_images():
    """3 images (the export's check used 2) padded to 192x256 (it used 160x160), two of them
    smaller than the padding."""
    images = torch.rand(3, 3, 192, 256, generator=torch.Generator().manual_seed(5)) * 255
    sizes = [(192, 256), (180, 200), (170, 256)]
    for k, (h, w) in enumerate(sizes):
        images[k, :, h:], images[k, :, :, w:] = 0, 0
    return images, sizes


def run_exported(path, fmt, images, sizes):
    if fmt == "pt2":
        return torch.export.load(path).module()(images, torch.tensor(sizes))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"images": images.numpy(), "image_sizes": torch.tensor(sizes).numpy()}
    return [torch.from_numpy(a) for a in session.run(None, feed)]


def export_and_compare(checkpoint, fmt, tmp_path):
    """Export with --nms, run the file on `other_images` and compare with `postprocess` on
    the PyTorch model as evaluation runs it: the same detections (labels equal, boxes and
    scores within `OUTPUT_RTOL` of the largest, as other convolution kernels round: ONNX
    Runtime's, or torch's on another CPU). -> (detections per image, the exported file)."""
    out = tmp_path / f"{checkpoint.stem}.{fmt}"
    result = runner.invoke(
        app, ["export", str(checkpoint), "--format", fmt, "--nms", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "detections' max abs diff to PyTorch" in " ".join(result.output.split())
    predictor = Predictor.load(checkpoint, "cpu")
    images, sizes = other_images()
    with torch.no_grad():
        expected = postprocess(predictor.model(images, sizes).head, sizes, predictor.model.spec)
    boxes, scores, labels, counts = run_exported(out, fmt, images, sizes)
    assert boxes.shape == (3, 100, 4) and scores.shape == labels.shape == (3, 100)
    assert labels.dtype == counts.dtype == torch.int64
    assert counts.tolist() == [len(d.labels) for d in expected]
    for k, dets in enumerate(expected):
        n = len(dets.labels)
        assert torch.equal(labels[k, :n], dets.labels)
        assert_close_to_scale(boxes[k, :n], dets.boxes, f"boxes of image {k}")
        assert_close_to_scale(scores[k, :n], dets.scores, f"scores of image {k}")
        # the rows past an image's detections are padding
        assert (labels[k, n:] == -1).all() and (scores[k, n:] == 0).all()
        assert (boxes[k, n:] == 0).all()
    return counts.tolist(), out


@pytest.mark.parametrize(
    ("family", "fmt"),
    [
        # all slow (25 s each): the default suite exports RetinaNet to pt2 in the next test,
        # and test_predict.py exports every format without --nms
        pytest.param("gfl", "pt2", marks=pytest.mark.slow),
        pytest.param("atss", "pt2", marks=pytest.mark.slow),
        pytest.param("fcos", "pt2", marks=pytest.mark.slow),
        pytest.param("gfl", "onnx", marks=[needs_onnx, pytest.mark.slow]),
        pytest.param("atss", "onnx", marks=[needs_onnx, pytest.mark.slow]),
        pytest.param("fcos", "onnx", marks=[needs_onnx, pytest.mark.slow]),
        pytest.param("retinanet", "onnx", marks=[needs_onnx, pytest.mark.slow]),
    ],
)  # RetinaNet pt2: the next test
def test_export_with_nms_gives_evaluations_detections_at_other_batch_and_image_sizes(
    checkpoints, tmp_path, family, fmt
):
    counts, _ = export_and_compare(checkpoints[family], fmt, tmp_path)
    assert min(counts) > 10  # detections to compare in every image


def test_export_with_nms_keeps_at_most_100_detections_per_image(checkpoints, tmp_path):
    # RetinaNet's 9 anchors per location, all scoring about 0.5, survive NMS in the hundreds
    counts, out = export_and_compare(checkpoints["retinanet"], "pt2", tmp_path)
    assert counts == [100, 100, 100]
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["outputs"] == ["boxes", "scores", "labels", "num_detections"]
    assert sidecar["postprocess"] == {
        "score_thr": 0.05, "pre_nms_top_k": 1000, "nms_iou": 0.5, "max_per_image": 100,
    }  # fmt: skip


@pytest.mark.parametrize("score_thr", [0.05, 0.99, 1.0])
def test_the_padded_post_processing_equals_postprocess_image_by_image(checkpoints, score_thr):
    """The code the --nms graph runs, here in eager PyTorch, down to images left with no
    detection (a class score is never above 1.0)."""
    predictor = Predictor.load(checkpoints["atss"], "cpu")
    images, sizes = other_images()
    spec = predictor.model.spec
    with torch.no_grad():
        head = predictor.model(images, sizes).head
        expected = postprocess(head, sizes, spec, score_thr=score_thr)
        boxes, scores, labels, counts = postprocess_padded(
            head, torch.tensor(sizes), spec, score_thr=score_thr
        )
    assert counts.tolist() == [len(d.labels) for d in expected]
    for k, dets in enumerate(expected):
        n = len(dets.labels)
        assert torch.equal(boxes[k, :n], dets.boxes) and torch.equal(scores[k, :n], dets.scores)
        assert torch.equal(labels[k, :n], dets.labels) and (labels[k, n:] == -1).all()
    assert (counts == 0).all() if score_thr == 1.0 else (counts > 0).all()
