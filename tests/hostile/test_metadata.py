"""Hostile checkpoint metadata and eval options: `crosskd eval` refuses them before it builds a
model, resolves (generates) data or predicts, naming the field and the value."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from crosskd_cli import __version__
from crosskd_cli.checkpoints.format import CheckpointMeta
from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.data import cache_root
from crosskd_cli.data.builtin import CATEGORY_IDS, CLASS_NAMES
from tests.hostile.contract import UNSEEN_DATA, digests, generated, invoke, refused


def metadata() -> dict:
    """Valid metadata of a tiny detector, as the plain dict its header holds."""
    meta = CheckpointMeta(
        model=ModelSpec(
            backbone="resnet18", num_classes=10, fpn_channels=16, head_channels=16, norm_groups=8
        ),
        class_names=list(CLASS_NAMES),
        category_ids=list(CATEGORY_IDS),
        preset="shapes-gfl-r18",
        val_data=UNSEEN_DATA,
        image_scale=(96, 96),
        eval_batch_size=4,
        crosskd_version=__version__,
        kind="teacher",
    )
    return json.loads(meta.to_json())


def checkpoint(tmp_path, text: str):
    """A .safetensors file whose crosskd header entry is `text`; the weights never matter,
    as every refusal comes before they are read."""
    path = tmp_path / "hostile.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"crosskd": text})
    return path


def evaluate(tmp_path, path, *args: str):
    """`crosskd eval` on `path`, asserting afterwards that neither the file nor the cache
    changed and that no output folder appeared."""
    before = digests(path)
    result = invoke("eval", path, *args)
    assert digests(path) == before
    assert not (tmp_path / f"eval-{path.stem}").exists()
    assert generated(cache_root()) == []
    return result


def edited(**changes) -> str:
    data = metadata()
    for dotted, value in changes.items():
        node, *path, key = [data, *dotted.split("__")]
        for part in path:
            node = node[part]
        node[key] = value
    return json.dumps(data)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model__fpn_channels": 10**6}, "field 'model.fpn_channels' should be in [1, 4096]"),
        ({"model__head_channels": 0}, "field 'model.head_channels' should be in [1, 4096], got 0"),
        ({"image_scale": [100000, 96]}, "field 'image_scale[0]' should be in [32, 8192]"),
        ({"eval_batch_size": 0}, "field 'eval_batch_size' should be >= 1, got 0."),
        ({"model__reg_max": 10**9}, "field 'model.reg_max' should be in [1, 64]"),
        ({"model__family": "gfll"}, "field 'model.family' should be one of 'gfl', 'retinanet'"),
        ({"model__backbone": "resnet1001"}, "field 'model.backbone' should be one of 'resnet18'"),
        ({"model__pixel_std": [1, float("nan"), 1]}, "'model.pixel_std[1]' should be a finite"),
        ({"model__anchor_ratios": [1.0] * 1000}, "anchor_ratios (count)=1000 is too large"),
        ({"model__head_channels": 12}, "head_channels=12 is not divisible by norm_groups=8"),
    ],
)
def test_metadata_sizes_and_names_are_checked_before_anything_is_built(tmp_path, changes, message):
    path = checkpoint(tmp_path, edited(**changes))
    refused(evaluate(tmp_path, path), f"Checkpoint '{path}'", message)


def test_a_recorded_data_spec_asking_for_days_of_generation_is_refused(tmp_path):
    path = checkpoint(tmp_path, edited(val_data="builtin:shapes:images=1000000,size=4096"))
    refused(evaluate(tmp_path, path), "images=1000000 is out of range 1..200000")


def test_metadata_nested_200000_deep_is_refused_without_a_recursion_error(tmp_path):
    path = checkpoint(tmp_path, "[" * 200_000 + "]" * 200_000)
    refused(evaluate(tmp_path, path), "unreadable crosskd metadata: nested deeper than 32 levels")


def test_a_deep_value_inside_a_free_form_field_is_refused_too(tmp_path):
    path = checkpoint(tmp_path, edited(training=json.loads('{"a": ' + "[" * 40 + "]" * 40 + "}")))
    refused(evaluate(tmp_path, path), "nested deeper than 32 levels")


def test_a_recorded_data_spec_too_long_to_be_one_is_cut_short(tmp_path):
    path = checkpoint(tmp_path, edited(val_data="custom:" + "[" * 200_000))
    flat = refused(evaluate(tmp_path, path), "field 'val_data' should be at most 20000 characters")
    assert "(200009 characters)" in flat and len(flat) < 600


def test_a_recorded_custom_spec_nested_deep_is_named_in_one_short_line(tmp_path):
    path = checkpoint(tmp_path, edited(val_data="custom:" + "[" * 5000))
    flat = refused(evaluate(tmp_path, path), "is not a valid recorded custom data set")
    assert "(5007 characters)" in flat


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "-1"], "--batch-size must be at least 1, got -1."),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0."),
        (["--backend", "bogus"], "COCO evaluation backend 'bogus' is not known."),
    ],
)
def test_bad_eval_options_are_refused_before_the_checkpoint_is_even_read(tmp_path, args, message):
    path = checkpoint(tmp_path, json.dumps(metadata()))
    refused(evaluate(tmp_path, path, *args), message)


def test_a_misspelt_backend_suggests_the_real_one(tmp_path):
    path = checkpoint(tmp_path, json.dumps(metadata()))
    assert "Did you mean 'faster'?" in refused(evaluate(tmp_path, path, "--backend", "fastr"))


def test_a_state_dict_with_integer_keys_is_refused_and_nothing_is_written(tmp_path):
    source = tmp_path / "weights.pth"
    torch.save({"state_dict": {0: torch.zeros(2), 1: torch.zeros(3)}}, source)
    before = digests(source)
    result = invoke("teacher", "import", source, "--preset", "shapes-gfl-r18")
    refused(result, "2 state dict keys are not parameter names but ints, e.g. 0.")
    assert digests(source) == before
    assert not source.with_suffix(".safetensors").exists()
