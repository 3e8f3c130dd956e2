"""The quickstart: its teacher cache keyed on every setting that changes the teacher, and its
runs reused only when made with the same settings."""

from __future__ import annotations

from crosskd_cli.distill.preset_checks import load_preset
from crosskd_cli.runs.teachers import teacher_cache_dir
from tests.hostile.contract import invoke, refused

DATA = "builtin:shapes:images=24,val=8,size=96"
QUICK = [
    "--data", DATA, "--set", "data.num_workers=0", "--set", "data.scale=[96,96]",
    "--set", "train.batch_size=4", "--set", "train.eval_batch_size=4",
]  # fmt: skip


def cache_of(*overrides: str, data: str = DATA):
    return teacher_cache_dir(load_preset("shapes-gfl-r34", list(overrides)), data)


def test_the_teacher_cache_keys_on_every_setting_that_changes_the_teacher():
    plain = cache_of()
    assert cache_of() == plain  # stable
    changed = ["train.epochs=1", "train.max_iters=2", "train.seed=1", "train.lr=0.02",
               "model.backbone=resnet18", "model.fpn_channels=32", "data.scale=[96,96]",
               "data.flip_prob=0.0"]  # fmt: skip
    for setting in changed:
        assert cache_of(setting) != plain, setting
    assert cache_of(data="builtin:shapes") != plain
    neutral = ["data.num_workers=0", "train.log_interval=1", "train.state_interval=0",
               "train.max_nonfinite_steps=5", "distill.cross_index=2"]  # fmt: skip
    for setting in neutral:  # what changes nothing a teacher computes shares its cache
        assert cache_of(setting) == plain, setting


def test_a_quickstart_teacher_trained_otherwise_never_stands_in_for_the_pairs_teacher(tmp_path):
    out = tmp_path / "quickstart"
    short = [*QUICK, "--set", "train.max_iters=2", "--out", out]
    first = invoke("quickstart", *short)
    assert first.exit_code == 0, first.output
    assert "1/3 teacher" in first.output and "3/3 student" in first.output
    # every run leaves results.png, each student its Fig. 5, and the quickstart both side by side
    for run in ("none", "crosskd"):
        assert (out / run / "results.png").is_file() and (
            out / run / "prediction_gap.png"
        ).is_file()
    flat = "".join(first.output.split())  # rich wraps long paths
    assert "Pictures(" in flat and "".join(str(out / "prediction_gap.png").split()) in flat
    assert "/results.png" in flat
    again = invoke("quickstart", *short)  # the same settings: everything reused
    assert again.exit_code == 0, again.output
    assert "Reusing the cached teacher" in again.output
    assert "2/3 student" not in again.output and "3/3 student" not in again.output
    # `distill` without --teacher looks for the pair's teacher as its preset trains it: the
    # 2-iteration one does not stand in for it
    result = invoke("distill", "--preset", "shapes-gfl-r34-to-r18", *QUICK, "--out", tmp_path / "d")
    refused(result, "No teacher weights for preset 'shapes-gfl-r34-to-r18'")
    # the same --out with another schedule: the students there are not passed off as its own
    longer = invoke("quickstart", *QUICK, "--set", "train.max_iters=3", "--out", out)
    refused(
        longer,
        f"{out / 'none'} holds a student trained with other settings: --set train.max_iters=3 "
        "differs from the run's 2.",
    )
    assert "1/3 teacher" not in longer.output  # refused before any training
