"""Presets: shipped files load, errors name the bad key, --set overrides apply."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.config.presets import Preset, list_presets
from crosskd_cli.distill.preset_checks import load_preset
from crosskd_cli.errors import PresetError

REPO = Path(__file__).resolve().parent.parent


def test_every_shipped_preset_loads_into_typed_dataclasses():
    names = list_presets()
    assert {"gfl-r50", "gfl-r101", "gfl-r101-to-r50", "shapes-gfl-r50"} <= set(names)
    for name in names:
        preset = load_preset(name)
        assert isinstance(preset, Preset) and isinstance(preset.model, ModelSpec)
        assert preset.name == name
        if preset.is_pair:
            assert load_preset(preset.teacher.preset).model.family == preset.model.family


# docs/method.md §5, one row per pair preset:
# preset: (teacher backbone, student backbone, method, cross index, the paper's AP key, AP)
PAPER_PAIRS = {
    "gfl-r101-to-r50": ("resnet101", "resnet50", "crosskd", 3, "crosskd_coco_val_ap", 43.7),
    "gfl-r101-to-r50-pkd": (
        "resnet101", "resnet50", "crosskd+pkd", 3, "crosskd_pkd_coco_val_ap", 43.9
    ),
    "gfl-r50-to-r18": ("resnet50", "resnet18", "crosskd", 3, "crosskd_coco_val_ap", 38.7),
    "gfl-r101-to-r18": ("resnet101", "resnet18", "crosskd", 3, "crosskd_coco_val_ap", 39.2),
    "gfl-r101-to-r34": ("resnet101", "resnet34", "crosskd", 3, "crosskd_coco_val_ap", 42.4),
    "retinanet-r101-to-r50": ("resnet101", "resnet50", "crosskd", 3, "crosskd_coco_val_ap", 39.7),
    "retinanet-r101-to-r50-pkd": (
        "resnet101", "resnet50", "crosskd+pkd", 3, "crosskd_pkd_coco_val_ap", 39.8
    ),
    "retinanet-r50-to-r18": ("resnet50", "resnet18", "crosskd", 3, "crosskd_coco_val_ap", 36.7),
    "fcos-r101-to-r50": (
        "resnet101_caffe", "resnet50_caffe", "crosskd", 2, "crosskd_coco_val_ap", 41.3
    ),
    "fcos-r101-to-r50-pkd": (
        "resnet101_caffe", "resnet50_caffe", "crosskd+pkd", 2, "crosskd_pkd_coco_val_ap", 41.3
    ),
    "atss-r101-to-r50": ("resnet101", "resnet50", "crosskd", 3, "crosskd_coco_val_ap", 41.8),
    "atss-r101-to-r50-pkd": (
        "resnet101", "resnet50", "crosskd+pkd", 3, "crosskd_pkd_coco_val_ap", 41.8
    ),
    "retinanet-swint-to-r50": ("swin_t", "resnet50", "crosskd", 3, "crosskd_coco_val_ap", 38.0),
    "retinanet-r50-to-mbv2": (
        "resnet50", "mobilenet_v2", "crosskd", 3, "crosskd_coco_val_ap", 34.1
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PAPER_PAIRS))
def test_every_paper_pair_is_compatible_at_its_index_with_its_reference(name):
    from crosskd_cli.distill.pairing import pair_problems

    teacher_backbone, student_backbone, method, index, key, ap = PAPER_PAIRS[name]
    pair = load_preset(name)
    teacher = load_preset(pair.teacher.preset)
    assert (teacher.model.backbone, pair.model.backbone) == (teacher_backbone, student_backbone)
    assert (pair.distill.method, pair.distill.cross_index) == (method, index)
    assert pair_problems(teacher.model, pair.model, index) == []
    assert pair.reference[key] == ap
    assert pair.reference[key] > pair.reference.get("student_coco_val_ap", 0)  # R34: none
    assert pair.reference["teacher_coco_val_ap"] == teacher.reference["coco_val_ap"]
    assert "not a crosskd result" in pair.reference["source"]
    # teacher and student normalise the same way (caffe-style FCOS included)
    assert (teacher.model.pixel_mean, teacher.model.to_bgr) == (
        pair.model.pixel_mean,
        pair.model.to_bgr,
    )


def test_every_family_ships_a_cpu_quickstart_pair():
    for family in ("gfl", "retinanet", "atss", "fcos"):
        pair = load_preset(f"shapes-{family}-r34-to-r18")
        assert pair.model.family == family and pair.data.source == "builtin:shapes"
        assert load_preset(pair.teacher.preset).model.family == family


def test_fcos_presets_use_caffe_input_multi_scale_and_fcos_schedule():
    for name in ("fcos-r50-caffe-ms-2x", "fcos-r101-caffe-ms-2x", "fcos-r101-to-r50"):
        preset = load_preset(name)
        model, train = preset.model, preset.train
        assert model.to_bgr and model.pixel_std == (1.0, 1.0, 1.0)
        assert model.pixel_mean == (102.9801, 115.9465, 122.7717)
        assert model.relu_before_extra_convs and preset.data.train_short_sides == (640, 800)
        assert (train.warmup, train.bias_lr_factor, train.bias_decay_factor) == (
            "constant",
            2.0,
            0.0,
        )
        assert train.grad_clip == 35.0


def test_the_papers_gfl_teacher_trains_multi_scale_and_tests_at_one_scale():
    teacher = load_preset("gfl-r101")
    assert teacher.data.train_short_sides == (480, 800) and teacher.data.scale == (1333, 800)
    assert (teacher.train.epochs, teacher.train.milestones) == (24, (16, 22))


def test_pair_preset_records_the_papers_numbers_as_reference_only():
    preset = load_preset("gfl-r101-to-r50")
    assert preset.distill.cross_index == 3
    assert preset.reference["crosskd_coco_val_ap"] == 43.7
    assert "not a crosskd result" in preset.reference["source"]


def test_set_overrides_are_parsed_as_yaml_scalars():
    preset = load_preset(
        "gfl-r50",
        [
            "train.epochs=3",
            "data.scale=[640, 480]",
            "train.grad_clip=35",
            "model.backbone=resnet18",
            "model.backbone_init=torchvision://resnet18",  # the ImageNet file fits the backbone
        ],
    )
    assert preset.train.epochs == 3
    assert preset.data.scale == (640, 480)
    assert preset.train.grad_clip == 35.0 and isinstance(preset.train.grad_clip, float)
    assert preset.model.backbone == "resnet18"


def test_a_choice_that_yaml_reads_as_a_boolean_is_taken_as_written():
    """`--set train.mixed_precision=no` (Accelerate's spelling) reaches the parser as False."""
    for written in ("no", "No", "'no'"):
        assert (
            load_preset("gfl-r50", [f"train.mixed_precision={written}"]).train.mixed_precision
            == "no"
        )
    with pytest.raises(PresetError, match="must be one of 'no', 'fp16', 'bf16', 'auto', got True"):
        load_preset("gfl-r50", ["train.mixed_precision=yes"])  # no option reads as True
    with pytest.raises(PresetError, match="train.fast_step"):
        load_preset("gfl-r50", ["train.fast_step=fast"])  # a bool field still wants a bool


def test_unknown_key_names_the_dotted_path_and_suggests_the_close_match():
    with pytest.raises(PresetError) as info:
        load_preset("gfl-r50", ["train.epoch=3"])
    # the override is named, not the preset file, and the whole key is suggested
    assert info.value.message == "--set train.epoch=3: unknown key 'train.epoch'."
    assert info.value.hint == "Did you mean 'train.epochs'?"
    with pytest.raises(PresetError) as info:
        load_preset("gfl-r101-to-r50", ["xyz.q=1"])
    assert info.value.hint.startswith("Keys start with one of: name, description, model,")
    # a free mapping takes any key; an optional section (a pair's teacher) is walked into
    assert load_preset("gfl-r101-to-r50", ["reference.mine=1"]).reference["mine"] == 1
    assert load_preset("gfl-r101-to-r50", ["teacher.weights=t.safetensors"]).teacher.weights


def test_unknown_nested_key_in_a_preset_file_names_its_dotted_path_and_close_match(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  backbon: resnet34\n")
    with pytest.raises(PresetError) as info:
        load_preset(str(path))
    assert info.value.message == f"{path}: unknown key 'model.backbon'."
    assert info.value.hint == "Did you mean 'backbone'?"


def test_unknown_key_inside_an_optional_section_is_named_too():
    with pytest.raises(PresetError) as info:
        load_preset("gfl-r101-to-r50", ["teacher.wieghts=x.safetensors"])
    assert "unknown key 'teacher.wieghts'" in info.value.message
    assert info.value.hint == "Did you mean 'teacher.weights'?"


def test_wrong_type_names_the_path_the_expected_type_and_the_value():
    with pytest.raises(PresetError) as info:
        load_preset("gfl-r50", ["train.epochs=many"])
    assert "'train.epochs' must be int, got 'many'" in info.value.message


def test_malformed_override_shows_the_expected_form():
    with pytest.raises(PresetError, match="not of the form key=value"):
        load_preset("gfl-r50", ["train.epochs"])


def test_unknown_preset_name_suggests_the_closest_shipped_one():
    with pytest.raises(PresetError) as info:
        load_preset("gfl_r101_r50")
    assert info.value.message == "Preset 'gfl_r101_r50' not found."
    assert "Did you mean 'gfl-r101-to-r50'?" in info.value.hint


def test_preset_can_be_a_yaml_file_listing_only_what_differs(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  backbone: resnet34\n  num_classes: 3\ntrain:\n  epochs: 2\n")
    preset = load_preset(str(path))
    assert preset.name == "mine"
    assert preset.model.backbone == "resnet34" and preset.model.num_classes == 3
    assert preset.model.reg_max == 16 and preset.train.lr == 0.01  # defaults fill the rest


def test_missing_preset_file_is_a_clear_error(tmp_path):
    with pytest.raises(PresetError, match="does not exist"):
        load_preset(str(tmp_path / "nope.yaml"))


def test_presets_ship_inside_the_wheel(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("crosskd_cli-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("crosskd_cli/presets/")}
    assert {f"{name}.yaml" for name in list_presets()} <= shipped


def test_scientific_notation_is_a_number_on_the_command_line_and_in_presets(tmp_path):
    """YAML 1.1 would read 1e-3 as a string; learning rates are written that way."""
    assert load_preset("gfl-r50", ["train.lr=1e-3"]).train.lr == 0.001
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  lr: 2.5E-4\n  weight_decay: 5e-2\n")
    preset = load_preset(str(path))
    assert (preset.train.lr, preset.train.weight_decay) == (0.00025, 0.05)


def test_the_zoo_check_reads_its_tables_when_checking_so_later_entries_count(monkeypatch):
    """The parser takes any family name (it imports no torch); the check of every reader
    (`preset_checks`) asks the family table as it is then, a family registered later included."""
    from crosskd_cli.config.presets import read_preset
    from crosskd_cli.families import FAMILIES

    assert read_preset("gfl-r50", ["model.family=yolo"]).model.family == "yolo"
    with pytest.raises(PresetError) as info:
        load_preset("gfl-r50", ["model.family=gfll"])
    assert info.value.message.endswith(
        "gfl-r50.yaml: 'model.family' must be one of 'gfl', 'retinanet', 'atss', 'fcos', "
        "got 'gfll'."
    )
    assert info.value.hint.startswith("Did you mean 'gfl'?")
    monkeypatch.setitem(FAMILIES, "yolo", FAMILIES["gfl"])
    assert load_preset("gfl-r50", ["model.family=yolo"]).model.family == "yolo"
