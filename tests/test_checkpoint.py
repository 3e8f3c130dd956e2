"""Checkpoints: weights and metadata round-trip, writes are atomic, bad files fail clearly."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from crosskd_cli.checkpoints.format import (
    CheckpointMeta,
    load_checkpoint,
    load_state_into,
    read_meta,
    save_checkpoint,
)
from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.errors import CheckpointError


class TinyNet(nn.Module):
    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width)  # buffers (running stats) must round-trip too
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.conv(x)).relu().mean(dim=(2, 3)))


def make_meta(**changes) -> CheckpointMeta:
    meta = CheckpointMeta(
        model=ModelSpec(backbone="resnet18", num_classes=2, fpn_channels=64, strides=(8, 16, 32)),
        class_names=["circle", "square"],
        category_ids=[3, 7],
        preset="shapes-gfl-r18",
        val_data="builtin:shapes",
        image_scale=(192, 128),
        eval_batch_size=8,
        crosskd_version="0.1.0",
        kind="student",
        training={"method": "crosskd", "cross_index": 3, "epochs": 12, "seconds": 81.5},
        metrics={"AP": 41.25, "AP50": 60.5, "APs": -1.0},
    )
    return dataclasses.replace(meta, **changes)


def trained_net(seed: int) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet()
    net.norm.running_mean.uniform_(-1, 1)
    net.norm.running_var.uniform_(0.5, 2)
    return net.eval()


def meta_json_without(field: str) -> str:
    data = json.loads(make_meta().to_json())
    if "." in field:
        outer, inner = field.split(".")
        del data[outer][inner]
    else:
        del data[field]
    return json.dumps(data)


def write_raw(path: Path, metadata: dict[str, str] | None) -> Path:
    save_file({"w": torch.zeros(2)}, str(path), metadata=metadata)
    return path


def test_saved_weights_reload_into_a_fresh_model_with_identical_outputs(tmp_path):
    source = trained_net(seed=0)
    save_checkpoint(tmp_path / "best.safetensors", source.state_dict(), make_meta())
    state_dict, _ = load_checkpoint(tmp_path / "best.safetensors")
    fresh = trained_net(seed=1)
    load_state_into(fresh, state_dict, source="best.safetensors")
    x = torch.randn(2, 3, 16, 16)
    assert not torch.equal(trained_net(seed=1)(x), source(x))
    assert torch.equal(fresh(x), source(x))


def test_metadata_round_trips_with_tuples_restored(tmp_path):
    meta = make_meta()
    save_checkpoint(tmp_path / "ckpt.safetensors", trained_net(0).state_dict(), meta)
    loaded = read_meta(tmp_path / "ckpt.safetensors")
    assert loaded == meta
    assert loaded.model.strides == (8, 16, 32)
    assert loaded.model.pixel_mean == (123.675, 116.28, 103.53)
    assert loaded.image_scale == (192, 128)
    assert load_checkpoint(tmp_path / "ckpt.safetensors")[1] == meta


def test_tied_and_non_contiguous_tensors_are_saved_as_plain_copies(tmp_path):
    shared = torch.randn(3, 4)
    state = {"a.weight": shared, "b.weight": shared, "t": torch.randn(4, 5).t()}
    save_checkpoint(tmp_path / "tied.safetensors", state, make_meta())
    loaded, _ = load_checkpoint(tmp_path / "tied.safetensors")
    assert torch.equal(loaded["a.weight"], shared) and torch.equal(loaded["b.weight"], shared)
    assert torch.equal(loaded["t"], state["t"])
    assert loaded["t"].is_contiguous()


def test_a_successful_save_leaves_no_temporary_file(tmp_path):
    save_checkpoint(
        tmp_path / "runs" / "last.safetensors", trained_net(0).state_dict(), make_meta()
    )
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["last.safetensors"]


def test_a_failed_rename_keeps_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "best.safetensors"
    save_checkpoint(path, trained_net(0).state_dict(), make_meta())
    before = path.read_bytes()

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(CheckpointError, match="Could not write checkpoint .*best.safetensors"):
        save_checkpoint(path, trained_net(1).state_dict(), make_meta(kind="teacher"))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]


def test_a_state_dict_with_a_non_tensor_is_refused_before_touching_the_file(tmp_path):
    path = tmp_path / "best.safetensors"
    save_checkpoint(path, trained_net(0).state_dict(), make_meta())
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="'step' is a int, not a tensor"):
        save_checkpoint(path, {"w": torch.ones(2), "step": 3}, make_meta())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]


def test_metadata_that_could_not_be_read_back_is_never_written(tmp_path):
    with pytest.raises(CheckpointError, match="field 'kind' should be 'teacher' or 'student'"):
        save_checkpoint(tmp_path / "x.safetensors", {"w": torch.ones(1)}, make_meta(kind="pupil"))
    assert list(tmp_path.iterdir()) == []


def test_a_truncated_file_is_reported_by_name(tmp_path):
    path = tmp_path / "best.safetensors"
    save_checkpoint(path, trained_net(0).state_dict(), make_meta())
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="best.safetensors' is not a crosskd checkpoint"):
        load_checkpoint(path)


def test_a_pickle_is_never_unpickled_and_points_to_teacher_import(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "gfl_r101.pth"
    path.write_bytes(pickle.dumps({"state_dict": Payload()}))
    with pytest.raises(CheckpointError, match="gfl_r101.pth' is not a crosskd checkpoint") as info:
        load_checkpoint(path)
    assert "crosskd teacher import" in info.value.hint
    assert not marker.exists()


def test_a_safetensors_file_without_crosskd_metadata_suggests_teacher_import(tmp_path):
    path = write_raw(tmp_path / "foreign.safetensors", {"format": "pt"})
    with pytest.raises(CheckpointError, match="foreign.safetensors' is a safetensors file without"):
        read_meta(path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert info.value.hint.startswith("Convert foreign weights with `crosskd teacher import")


def test_a_missing_file_is_named_with_a_hint(tmp_path):
    with pytest.raises(CheckpointError, match="'.*nope.safetensors' does not exist") as info:
        load_checkpoint(tmp_path / "nope.safetensors")
    assert "best.safetensors" in info.value.hint


def test_a_run_folder_passed_as_checkpoint_suggests_its_best_file(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder, not a file") as info:
        read_meta(tmp_path)
    assert info.value.hint == f"Pass a .safetensors file, e.g. {tmp_path / 'best.safetensors'}."


@pytest.mark.parametrize("field", ["val_data", "category_ids", "model.strides"])
def test_a_missing_metadata_field_is_named_with_the_file(tmp_path, field):
    path = write_raw(tmp_path / "old.safetensors", {"crosskd": meta_json_without(field)})
    with pytest.raises(
        CheckpointError, match=f"old.safetensors' metadata lacks the field '{field}'"
    ):
        read_meta(path)


def test_metadata_from_an_older_crosskd_without_defaulted_fields_loads_with_their_defaults():
    data = json.loads(make_meta().to_json())
    del data["training"], data["metrics"]
    meta = CheckpointMeta.from_json(json.dumps(data), source="old")
    assert meta.training == {} and meta.metrics == {}
    assert meta.model == make_meta().model and meta.image_scale == (192, 128)


def test_metadata_without_the_model_spec_fails_naming_it(tmp_path):
    path = write_raw(tmp_path / "old.safetensors", {"crosskd": meta_json_without("model")})
    with pytest.raises(CheckpointError) as info:
        read_meta(path)
    assert info.value.message == f"Checkpoint '{path}' metadata lacks the field 'model'."
    assert "re-save it or import the weights" in info.value.hint


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("eval_batch_size", "8", "field 'eval_batch_size' should be int, got '8'"),
        ("eval_batch_size", True, "field 'eval_batch_size' should be int, got True"),
        ("image_scale", [192, 128, 3], "field 'image_scale' should be tuple\\[int, int\\]"),
        ("category_ids", [3, "7"], "field 'category_ids\\[1\\]' should be int, got '7'"),
        ("training", [], "field 'training' should be an object, got \\[\\]"),
    ],
)
def test_an_ill_typed_metadata_field_is_named_with_the_value(tmp_path, field, value, message):
    data = json.loads(make_meta().to_json()) | {field: value}
    path = write_raw(tmp_path / "bad.safetensors", {"crosskd": json.dumps(data)})
    with pytest.raises(CheckpointError, match=message):
        read_meta(path)


def test_an_ill_typed_model_spec_field_is_named_by_its_dotted_path():
    data = json.loads(make_meta().to_json())
    data["model"]["norm_eval"] = 1
    with pytest.raises(CheckpointError, match="'ck' metadata field 'model.norm_eval' should be b"):
        CheckpointMeta.from_json(json.dumps(data), source="ck")


def test_class_lists_that_disagree_with_the_model_are_refused():
    data = json.loads(make_meta().to_json()) | {"class_names": ["circle"]}
    with pytest.raises(CheckpointError, match="1 class_names, 2 category_ids, model.num_classes 2"):
        CheckpointMeta.from_json(json.dumps(data), source="ck")


def test_metadata_from_a_newer_crosskd_loads_and_says_so():
    data = json.loads(make_meta().to_json()) | {"crosskd_version": "3.2.0", "new_field": [1]}
    meta = CheckpointMeta.from_json(json.dumps(data))
    assert meta.crosskd_version == "3.2.0"
    assert meta.from_newer_crosskd
    assert not make_meta().from_newer_crosskd


def test_load_state_into_names_a_shape_mismatch_with_both_shapes():
    state = TinyNet(classes=3).state_dict()
    with pytest.raises(CheckpointError) as info:
        load_state_into(TinyNet(classes=5), state, source="best.safetensors")
    assert info.value.message == (
        "Weights from 'best.safetensors' do not fit the model: 2 shape mismatches: "
        "fc.weight (model (5, 4), checkpoint (3, 4)), fc.bias (model (5,), checkpoint (3,))."
    )


def test_load_state_into_lists_missing_and_unexpected_keys_with_counts():
    state = TinyNet().state_dict()
    del state["fc.bias"]
    state |= {f"extra.{i}": torch.zeros(1) for i in range(7)}
    with pytest.raises(CheckpointError) as info:
        load_state_into(TinyNet(), state, source="ck")
    assert info.value.message == (
        "Weights from 'ck' do not fit the model: 1 missing keys: fc.bias; 7 unexpected keys: "
        "extra.0, extra.1, extra.2, extra.3, extra.4, ... (2 more)."
    )


def test_numpy_and_torch_scalars_in_metrics_are_stored_as_plain_numbers():
    meta = make_meta(metrics={"AP": np.float64(41.5)}, training={"loss": torch.tensor(0.25)})
    loaded = CheckpointMeta.from_json(meta.to_json())
    assert loaded.metrics == {"AP": 41.5} and loaded.training == {"loss": 0.25}
    with pytest.raises(CheckpointError, match="cannot hold a Tensor"):
        make_meta(training={"curve": torch.ones(3)}).to_json()


def test_an_unwritable_destination_is_a_checkpoint_error(tmp_path):
    (tmp_path / "runs").write_text("a file where a folder should be")
    with pytest.raises(CheckpointError, match="Could not write checkpoint .*runs/best"):
        save_checkpoint(tmp_path / "runs" / "best.safetensors", {"w": torch.ones(1)}, make_meta())


def test_a_detector_survives_the_checkpoint_round_trip_with_identical_outputs(tmp_path):
    from crosskd_cli.models import build_detector

    spec = ModelSpec(
        backbone="resnet18", num_classes=3, fpn_channels=32, head_channels=32, norm_groups=8
    )
    torch.manual_seed(0)
    model = build_detector(spec).eval()
    meta = make_meta(model=spec, class_names=["a", "b", "c"], category_ids=[1, 5, 9])
    save_checkpoint(tmp_path / "d.safetensors", model.state_dict(), meta)
    state, loaded_meta = load_checkpoint(tmp_path / "d.safetensors")
    torch.manual_seed(1)
    rebuilt = build_detector(loaded_meta.model).eval()
    load_state_into(rebuilt, state, source="d.safetensors")
    images = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        a, b = model(images), rebuilt(images)
    for x, y in zip(
        a.head.cls_logits + a.head.box_preds, b.head.cls_logits + b.head.box_preds, strict=True
    ):
        assert torch.equal(x, y)


def test_a_checkpoint_gets_the_runs_file_mode_and_stale_temporaries_are_cleared(tmp_path):
    path = tmp_path / "best.safetensors"
    # writes a kill interrupted: crosskd 0.2's temporary name, and today's (suffix kept)
    stale = [
        tmp_path / ".best.safetensors.abc123.tmp",
        tmp_path / ".best.safetensors.x9.tmp.safetensors",
    ]
    for path_ in stale:
        path_.write_bytes(b"half a checkpoint")
    other = tmp_path / ".last.safetensors.abc123.tmp"  # another file's: not ours to clear
    other.write_bytes(b"")
    previous = os.umask(0o022)
    try:
        save_checkpoint(path, nn.Linear(2, 2).state_dict(), make_meta())
    finally:
        os.umask(previous)
    assert not any(p.exists() for p in stale) and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, path.name]
    assert path.stat().st_mode & 0o777 == 0o644  # as config.yaml and results.csv, not 0600


def test_data_fits_only_with_the_same_classes_in_the_same_order():
    meta = make_meta()
    assert meta.class_mismatch(["circle", "square"], [3, 7], "/data") is None
    assert meta.class_mismatch(["square", "circle"], [7, 3], "/data") == (
        "The checkpoint predicts 2 classes (circle, square...) but data '/data' has 2 "
        "(square, circle...)."
    )
