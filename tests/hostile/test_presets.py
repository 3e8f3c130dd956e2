"""Hostile presets and --set values: refused at load, naming the value, before any data exists."""

from __future__ import annotations

import time

import pytest

from crosskd_cli.data import cache_root
from tests.hostile.contract import QUICK, UNSEEN_DATA, digests, generated, invoke, refused

PRESET = "shapes-gfl-r18"


def teacher(tmp_path, *args: str):
    """`crosskd teacher` on data not generated yet; `args` come last, so they win."""
    return invoke("teacher", "--data", UNSEEN_DATA, *QUICK, "--out", tmp_path / "run", *args)


def assert_nothing_started(tmp_path) -> None:
    assert not (tmp_path / "run").exists()
    assert generated(cache_root()) == []


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        # choices that used to mean something else silently
        ("distill.cls_kd=kl", "'distill.cls_kd' must be one of 'qfl', 'bce', 'none', got 'kl'."),
        ("distill.region_weight=sotf", "'distill.region_weight' must be one of 'soft', 'hard'"),
        ("train.optimizer=adam", "'train.optimizer' must be one of 'sgd', 'adamw', got 'adam'."),
        ("train.warmup=lin", "'train.warmup' must be one of 'linear', 'constant', got 'lin'."),
        ("train.mixed_precision=fp8", "'train.mixed_precision' must be one of 'no', 'fp16'"),
        ("model.extra_convs_source=p6", "'model.extra_convs_source' must be one of 'p5_output'"),
        ("model.family=gfll", "'model.family' must be one of 'gfl', 'retinanet', 'atss', 'fcos'"),
        ("model.backbone=resnet5", "'model.backbone' must be one of 'resnet18', 'resnet34'"),
        # ranges
        ("train.batch_size=0", "'train.batch_size' must be >= 1, got 0."),
        ("train.eval_batch_size=-2", "'train.eval_batch_size' must be >= 1, got -2."),
        ("train.log_interval=0", "'train.log_interval' must be >= 1, got 0."),
        ("data.num_workers=-1", "'data.num_workers' must be >= 0, got -1."),
        ("data.flip_prob=1.5", "'data.flip_prob' must be in [0, 1], got 1.5."),
        ("data.scale=[96,8]", "'data.scale[1]' must be in [32, 8192], got 8."),
        ("data.train_short_sides=[16,96]", "'data.train_short_sides[0]' must be in [32, 8192]"),
        ("model.fpn_channels=1000000", "'model.fpn_channels' must be in [1, 4096], got 1000000."),
        ("model.num_classes=0", "'model.num_classes' must be in [1, 100000], got 0."),
        ("model.stacked_convs=17", "'model.stacked_convs' must be in [0, 16], got 17."),
        ("model.reg_max=0", "'model.reg_max' must be in [1, 64], got 0."),
        ("model.anchor_ratios=[1.0,-2]", "'model.anchor_ratios[1]' must be > 0, got -2.0."),
        ("model.pixel_std=[1,0,1]", "'model.pixel_std[1]' must be > 0, got 0.0."),
        ("train.seed=-1", "'train.seed' must be in [0, 4294967295], got -1."),
        ("train.epochs=0", "'train.epochs' must be >= 1, got 0."),
        ("train.max_iters=0", "'train.max_iters' must be >= 1, got 0."),
        ("train.lr=0", "'train.lr' must be > 0, got 0.0."),
        ("train.momentum=1", "'train.momentum' must be in [0, 1), got 1.0."),
        ("train.grad_clip=0", "'train.grad_clip' must be > 0, got 0.0."),
        ("train.milestones=[8,0]", "'train.milestones[1]' must be >= 1, got 0."),
        ("distill.temperature=0", "'distill.temperature' must be > 0, got 0.0."),
        ("distill.cls_weight=-1", "'distill.cls_weight' must be >= 0, got -1.0."),
        # YAML's non-finite floats, for every float field
        ("train.lr=.nan", "'train.lr' must be a finite number, got nan."),
        ("train.weight_decay=.inf", "'train.weight_decay' must be a finite number, got inf."),
        ("model.pixel_mean=[1,-.inf,1]", "'model.pixel_mean[1]' must be a finite number, got -inf"),
    ],
)
def test_a_bad_value_is_named_with_its_bound_before_any_data_is_generated(
    tmp_path, setting, message
):
    flat = refused(teacher(tmp_path, "--preset", PRESET, "--set", setting), message)
    assert f"--set {setting.split('=')[0]}=VALUE" in flat  # the hint says how to fix it
    assert_nothing_started(tmp_path)


def test_a_typo_in_a_choice_suggests_the_intended_value(tmp_path):
    flat = refused(teacher(tmp_path, "--set", "distill.region_weight=sotf"), "got 'sotf'")
    assert "Did you mean 'soft'?" in flat


def test_model_fields_that_do_not_fit_each_other_stop_the_run_at_load(tmp_path):
    result = teacher(tmp_path, "--preset", PRESET, "--set", "model.head_channels=100")
    refused(result, "head_channels=100 is not divisible by norm_groups=32")
    assert_nothing_started(tmp_path)


def billion_laughs() -> str:
    """A preset under 1 KB whose nine levels of nine aliases expand to 9^10 strings."""
    levels = ['lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for k in range(1, 10):
        aliases = ", ".join([f"*lol{k - 1}"] * 9)
        levels.append(f"lol{k}: &lol{k} [{aliases}]")
    return "\n".join(["model:", "  family: gfl", "reference:", *("  " + line for line in levels)])


def test_a_yaml_alias_bomb_is_refused_at_once_and_left_untouched(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs())
    assert bomb.stat().st_size < 2048
    before = digests(bomb)
    started = time.perf_counter()
    refused(teacher(tmp_path, "--preset", bomb), f"Preset file {bomb} uses the alias *lol0")
    assert time.perf_counter() - started < 1.0
    assert digests(bomb) == before
    assert_nothing_started(tmp_path)


def test_a_preset_nested_200000_deep_is_refused_without_a_recursion_error(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("reference:\n  x: " + "[" * 200_000 + "]" * 200_000 + "\n")
    refused(teacher(tmp_path, "--preset", deep), f"Preset file {deep} nested deeper than 32")
    assert_nothing_started(tmp_path)


def test_a_preset_file_too_large_to_be_a_preset_is_not_read(tmp_path):
    huge = tmp_path / "huge.yaml"
    huge.write_text("description: '" + "x" * (2 << 20) + "'\n")
    refused(teacher(tmp_path, "--preset", huge), "presets are at most 1 MiB")
    assert_nothing_started(tmp_path)


def test_an_alias_in_a_set_value_is_refused_too(tmp_path):
    setting = "reference={a: &a [1, 1], b: [*a, *a]}"
    refused(teacher(tmp_path, "--set", setting), "Override 'reference=", "uses the alias *a")
    assert_nothing_started(tmp_path)


def test_a_huge_bad_value_is_shown_cut_to_one_readable_line(tmp_path):
    result = teacher(tmp_path, "--set", "train.epochs=" + "9" * 5000 + "x")
    flat = refused(result, "'train.epochs' must be int, got '99999", "(5003 characters)")
    assert len(flat) < 600
