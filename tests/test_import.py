"""`crosskd teacher import`: MMDetection GFL checkpoints become crosskd teachers, safely."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from typer.testing import CliRunner

from crosskd_cli.checkpoints.format import load_checkpoint, load_state_into
from crosskd_cli.checkpoints.mmdet_import import COCO_CATEGORY_IDS, COCO_CLASSES
from crosskd_cli.cli import app
from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.models import build_detector

runner = CliRunner()
TINY = dict(backbone="resnet18", num_classes=80, fpn_channels=32, head_channels=32, norm_groups=8)


class TrainingLog:
    """Stands for the training metadata MMDetection 3.x pickles beside the weights."""

    def __init__(self):
        self.losses = [0.5, 0.4]


class Payload:
    """A pickle that would run a shell command if anything unpickled it for real."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# MMDetection's predictor names per family (its GFLHead, RetinaHead, ATSSHead, FCOSHead),
# written out here rather than read from crosskd, so the round trips test the importer's table
MMDET_PREDICTORS = {
    "gfl": {"cls_predictor": "gfl_cls", "box_predictor": "gfl_reg"},
    "retinanet": {"cls_predictor": "retina_cls", "box_predictor": "retina_reg"},
    "atss": {"cls_predictor": "atss_cls", "box_predictor": "atss_reg",
             "centerness_predictor": "atss_centerness"},
    "fcos": {"cls_predictor": "conv_cls", "box_predictor": "conv_reg",
             "centerness_predictor": "conv_centerness"},
}  # fmt: skip


def mmdetection_layout(model) -> dict[str, torch.Tensor]:
    """The model's weights under MMDetection's key names (docs/method.md §5)."""
    state = {}
    predictors = MMDET_PREDICTORS[model.spec.family]
    for key, value in model.state_dict().items():
        if key.startswith("backbone."):
            state[key] = value
        elif key.startswith("neck."):  # neck.fpn_convs.3.weight -> neck.fpn_convs.3.conv.weight
            group, index, param = key.split(".")[1:]
            state[f"neck.{group}.{index}.conv.{param}"] = value
        else:
            rest = key.removeprefix("head.")
            block = re.fullmatch(r"towers\.(cls|reg)\.(\d+)\.(conv|norm)\.(\w+)", rest)
            if block:
                tower, index, layer, param = block.groups()
                layer = "gn" if layer == "norm" else "conv"
                state[f"bbox_head.{tower}_convs.{index}.{layer}.{param}"] = value
            else:  # cls_predictor.* -> gfl_cls.*, ...; scales.K.scale
                name, param = rest.split(".", 1)
                state[f"bbox_head.{predictors.get(name, name)}.{param}"] = value
    if model.spec.family == "gfl":
        state["bbox_head.integral.project"] = torch.linspace(0, 16, 17)
    return state


@pytest.fixture
def tiny_preset(tmp_path):
    path = tmp_path / "tiny-gfl.yaml"
    path.write_text(json.dumps({"model": TINY, "data": {"scale": [96, 96]}}))
    return path


@pytest.fixture
def mmdet_file(tmp_path):
    torch.manual_seed(0)
    model = build_detector(ModelSpec(**TINY)).eval()
    path = tmp_path / "gfl_tiny.pth"
    meta = {"CLASSES": COCO_CLASSES, "message_hub": TrainingLog()}
    torch.save({"meta": meta, "state_dict": mmdetection_layout(model)}, path)
    return model, path


def run_import(*args):
    return runner.invoke(app, ["teacher", "import", *map(str, args)], catch_exceptions=False)


def test_an_imported_gfl_teacher_predicts_exactly_what_the_original_did(
    mmdet_file, tiny_preset, tmp_path
):
    model, path = mmdet_file
    result = run_import(path, "--preset", tiny_preset, "--out", tmp_path / "t.safetensors")
    assert result.exit_code == 0, result.output
    log_class = f"{TrainingLog.__module__}.TrainingLog"
    assert f"Not unpickled (training metadata, not weights): {log_class}" in result.output
    state, meta = load_checkpoint(tmp_path / "t.safetensors")
    assert meta.kind == "teacher" and meta.class_names == list(COCO_CLASSES)
    assert meta.category_ids == list(COCO_CATEGORY_IDS) and meta.category_ids[-1] == 90
    rebuilt = build_detector(meta.model).eval()
    load_state_into(rebuilt, state, source="t.safetensors")
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        before, after = model(images, [(64, 96), (50, 70)]), rebuilt(images, [(64, 96), (50, 70)])
    outputs_before = before.head.cls_logits + before.head.box_preds
    outputs_after = after.head.cls_logits + after.head.box_preds
    for a, b in zip(outputs_before, outputs_after, strict=True):
        assert torch.equal(a, b)


FAMILIES = {
    "retinanet": {
        "family": "retinanet",
        "norm_groups": None,
        "octave_base_scale": 4,
        "scales_per_octave": 3,
        "anchor_ratios": [0.5, 1.0, 2.0],
        "extra_convs_source": "c5",
    },
    "atss": {"family": "atss"},
    "fcos": {"family": "fcos", "relu_before_extra_convs": True},
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_imports_to_identical_raw_outputs(family, tmp_path):
    """RetinaNet (C5-fed P6, no head norm, biased tower convs), ATSS and FCOS (centerness)."""
    model_cfg = {**TINY, **FAMILIES[family]}
    preset = tmp_path / f"tiny-{family}.yaml"
    preset.write_text(json.dumps({"model": model_cfg, "data": {"scale": [96, 96]}}))
    torch.manual_seed(0)
    spec_fields = {k: tuple(v) if isinstance(v, list) else v for k, v in model_cfg.items()}
    model = build_detector(ModelSpec(**spec_fields)).eval()
    path = tmp_path / f"{family}.pth"
    torch.save({"meta": {"CLASSES": COCO_CLASSES}, "state_dict": mmdetection_layout(model)}, path)
    result = run_import(path, "--preset", preset, "--out", tmp_path / "t.safetensors")
    assert result.exit_code == 0, result.output
    state, meta = load_checkpoint(tmp_path / "t.safetensors")
    assert meta.model.family == family
    rebuilt = build_detector(meta.model).eval()
    load_state_into(rebuilt, state, source="t.safetensors")
    images = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        before, after = model(images).head, rebuilt(images).head
    assert len(before.centerness) == (0 if family == "retinanet" else 5)
    for a, b in zip(
        before.cls_logits + before.box_preds + before.centerness,
        after.cls_logits + after.box_preds + after.centerness,
        strict=True,
    ):
        assert torch.equal(a, b)


def test_pickled_code_in_the_metadata_never_runs(tmp_path, tiny_preset):
    torch.manual_seed(0)
    model = build_detector(ModelSpec(**TINY))
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"meta": {"hook": Payload(marker)}, "state_dict": mmdetection_layout(model)}, path)
    result = run_import(path, "--preset", tiny_preset, "--out", tmp_path / "t.safetensors")
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    assert re.search(r"Not unpickled .*(posix|os)\.system", result.output)


def test_an_object_among_the_weights_is_refused_by_its_class_name(tmp_path, tiny_preset):
    path = tmp_path / "odd.pth"
    torch.save({"state_dict": {"backbone.conv1.weight": TrainingLog()}}, path)
    result = run_import(path, "--preset", tiny_preset)
    assert result.exit_code == 2
    log_class = f"{TrainingLog.__module__}.TrainingLog"
    assert f"stores objects of {log_class} among its weights" in result.output


def test_every_key_that_does_not_fit_is_named_and_partial_loads_need_asking(
    mmdet_file, tiny_preset, tmp_path
):
    _, path = mmdet_file
    saved = torch.load(path, weights_only=False)
    weights = saved["state_dict"]
    weights["bbox_head.dcn_offset.weight"] = torch.zeros(1, 32, 3, 3)
    del weights["bbox_head.scales.4.scale"]
    torch.save({"state_dict": weights}, path)

    result = run_import(path, "--preset", tiny_preset, "--out", tmp_path / "t.safetensors")
    assert result.exit_code == 2
    assert "1 not an MMDetection key crosskd knows, 1 missing from the file" in result.output
    assert "bbox_head.dcn_offset.weight" in result.output
    assert "head.scales.4.scale" in result.output
    assert not (tmp_path / "t.safetensors").exists()

    partial = run_import(
        path, "--preset", tiny_preset, "--out", tmp_path / "t.safetensors", "--allow-partial"
    )
    assert partial.exit_code == 0, partial.output
    assert load_checkpoint(tmp_path / "t.safetensors")[1].training["partial"] is True


def test_a_file_of_another_architecture_names_each_misshapen_key(mmdet_file, tmp_path):
    _, path = mmdet_file
    wide = tmp_path / "wide.yaml"
    wide.write_text(json.dumps({"model": {**TINY, "head_channels": 64}}))
    result = run_import(path, "--preset", wide)
    assert result.exit_code == 2
    assert "does not fit preset 'wide' (gfl resnet18)" in result.output
    assert "bbox_head.cls_convs.0.conv.weight: file (32, 32, 3, 3) vs model (64, 32, 3, 3)" in (
        result.output
    )
    # every tower weight mismatches: the table shows the first of them and counts the rest
    rows = [line for line in result.output.splitlines() if line.startswith("│ shape differs")]
    assert len(rows) == 9 and rows[-1].split("│")[2].strip() == "... and 18 more"
    assert "26 shape differs" in result.output  # the error counts them all


def test_classes_that_are_not_cocos_need_the_data_to_know_their_ids(tmp_path):
    spec = {**TINY, "num_classes": 3}
    torch.manual_seed(0)
    model = build_detector(ModelSpec(**spec))
    path = tmp_path / "three.pth"
    torch.save(
        {"meta": {"CLASSES": ("a", "b", "c")}, "state_dict": mmdetection_layout(model)}, path
    )
    preset = tmp_path / "three.yaml"
    preset.write_text(json.dumps({"model": spec}))
    result = run_import(path, "--preset", preset)
    assert result.exit_code == 2
    assert "records 3 classes that are not COCO's, so their category ids are unknown" in (
        result.output
    )
    assert "--data" in result.output


def test_an_existing_output_is_not_overwritten_unless_asked(mmdet_file, tiny_preset, tmp_path):
    _, path = mmdet_file
    out = tmp_path / "t.safetensors"
    out.write_text("precious")
    result = run_import(path, "--preset", tiny_preset, "--out", out)
    assert result.exit_code == 2 and out.read_text() == "precious"
    assert run_import(path, "--preset", tiny_preset, "--out", out, "--overwrite").exit_code == 0


def test_a_checkpoint_without_recorded_data_asks_eval_for_it(mmdet_file, tiny_preset, tmp_path):
    _, path = mmdet_file
    run_import(path, "--preset", tiny_preset, "--out", tmp_path / "t.safetensors")
    result = runner.invoke(app, ["eval", str(tmp_path / "t.safetensors")])
    assert result.exit_code == 2
    assert "records no validation data" in result.output and "--data" in result.output


def test_the_legacy_torch_format_is_read_through_the_same_restrictions(tmp_path, tiny_preset):
    torch.manual_seed(0)
    model = build_detector(ModelSpec(**TINY))
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.pth"
    payload = {"meta": {"hook": Payload(marker)}, "state_dict": mmdetection_layout(model)}
    torch.save(payload, path, _use_new_zipfile_serialization=False)
    result = run_import(path, "--preset", tiny_preset, "--out", tmp_path / "t.safetensors")
    assert result.exit_code == 0, result.output
    assert not marker.exists()


def test_a_file_that_is_one_malicious_pickle_is_refused_without_running_it(tmp_path, tiny_preset):
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "header.pth"
    path.write_bytes(pickle.dumps(Payload(marker), protocol=2) + b"not a checkpoint")
    result = run_import(path, "--preset", tiny_preset)
    assert result.exit_code == 2
    assert "cannot be read as a PyTorch checkpoint" in result.output
    assert not marker.exists()


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "swin_t"])
def test_mmdetection_mobilenet_and_swin_backbones_import_through_their_converters(
    backbone, tmp_path
):
    """A RetinaNet file whose backbone carries MMDetection's own MobileNetV2 / Swin-T names
    (not torchvision's) imports completely, every backbone tensor converted."""
    from crosskd_cli.models.backbone_import import convert_mmdet_backbone
    from tests.test_backbones import mmdet_mobilenet_v2_state, mmdet_swin_state

    model_cfg = {**TINY, **FAMILIES["retinanet"], "backbone": backbone}
    preset = tmp_path / "tiny.yaml"
    preset.write_text(json.dumps({"model": model_cfg, "data": {"scale": [96, 96]}}))
    spec_fields = {k: tuple(v) if isinstance(v, list) else v for k, v in model_cfg.items()}
    model = build_detector(ModelSpec(**spec_fields))
    if backbone == "swin_t":
        mmdet_backbone = mmdet_swin_state(96, (2, 2, 6, 2), (3, 6, 12, 24))
    else:
        mmdet_backbone = mmdet_mobilenet_v2_state()
    mmdet_backbone = {
        k: v.float() if v.is_floating_point() else v for k, v in mmdet_backbone.items()
    }
    state = {k: v for k, v in mmdetection_layout(model).items() if not k.startswith("backbone.")}
    state.update({f"backbone.{k}": v for k, v in mmdet_backbone.items()})
    path = tmp_path / f"retinanet_{backbone}.pth"
    torch.save({"meta": {"CLASSES": COCO_CLASSES}, "state_dict": state}, path)

    result = run_import(path, "--preset", preset, "--out", tmp_path / "t.safetensors")
    assert result.exit_code == 0, result.output
    if backbone == "mobilenet_v2":  # MMDetection always builds (and saves) the unused conv2
        expected = "Not imported (6 tensors MMDetection stores but its detector never runs): "
        assert expected + "backbone.conv2.conv.weight" in result.output.replace("\n", "")
    imported, _ = load_checkpoint(tmp_path / "t.safetensors")
    converted, _ = convert_mmdet_backbone(backbone, mmdet_backbone)
    for key, value in converted.items():
        assert torch.equal(imported[f"backbone.{key}"], value.to(imported[f"backbone.{key}"].dtype))
    backbone_keys = {k for k in imported if k.startswith("backbone.")}
    assert backbone_keys == {f"backbone.{k}" for k in converted}
