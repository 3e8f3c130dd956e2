"""The lr schedule means what it says: epoch milestones under train.max_iters in proportion,
iteration milestones as written, the schedule printed and recorded, and kept on resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from crosskd_cli.cli import app
from crosskd_cli.config.presets import TrainConfig
from crosskd_cli.engine.schedule import build_schedule


def test_warmup_is_linear_from_the_ratio_and_decay_happens_at_epoch_milestones():
    cfg = TrainConfig(warmup_iters=500, warmup_ratio=0.001, milestones=(8, 11), gamma=0.1)
    schedule = build_schedule(cfg, iters_per_epoch=100)
    assert schedule.total == 1200 and schedule.decays == (800, 1100)
    factor = schedule.factor
    assert factor(0) == pytest.approx(0.001)
    assert factor(250) == pytest.approx(0.001 + 0.999 * 0.5)
    assert factor(500) == 1.0 and factor(799) == 1.0
    assert factor(800) == pytest.approx(0.1) and factor(1100) == pytest.approx(0.01)


def test_epoch_milestones_under_max_iters_decay_at_their_share_of_the_run():
    """The 1x schedule's 8 and 11 of 12 epochs: after 8/12 and 11/12 of 6000 iterations."""
    cfg = TrainConfig(max_iters=6000, epochs=12, milestones=(8, 11), warmup_iters=500)
    schedule = build_schedule(cfg, iters_per_epoch=7330)
    assert schedule.total == 6000 and schedule.decays == (4000, 5500)
    assert schedule.factor(3999) == 1.0 and schedule.factor(4000) == pytest.approx(0.1)
    assert schedule.notes() == []


def test_iteration_milestones_act_as_written_with_epochs_or_iterations():
    for cfg in (
        TrainConfig(max_iters=300, warmup_iters=0, milestones=(200,), milestone_unit="iterations"),
        TrainConfig(epochs=3, warmup_iters=0, milestones=(200,), milestone_unit="iterations"),
    ):
        schedule = build_schedule(cfg, iters_per_epoch=100)
        assert schedule.decays == (200,)
        assert schedule.factor(199) == 1.0 and schedule.factor(200) == pytest.approx(0.1)


def test_a_milestone_that_cannot_act_is_named_not_refused():
    """The suite's short runs: 2 iterations, warm-up 2, the preset's epoch milestones."""
    cfg = TrainConfig(max_iters=2, epochs=12, milestones=(8, 11), warmup_iters=2)
    schedule = build_schedule(cfg, iters_per_epoch=5)
    assert schedule.decays == (1, 1)
    assert schedule.notes() == [
        "milestone 8 epochs (iteration 1) falls inside the warm-up (2 iterations): the warm-up "
        "ramps to the decayed lr",
        "milestone 11 epochs (iteration 1) falls inside the warm-up (2 iterations): the warm-up "
        "ramps to the decayed lr",
    ]
    past = build_schedule(TrainConfig(epochs=3, milestones=(3, 5)), iters_per_epoch=10)
    assert [note.split(" is ")[0] for note in past.notes()] == [
        "milestone 3 epochs (iteration 30)",
        "milestone 5 epochs (iteration 50)",
    ]
    assert "never lowers the lr" in past.notes()[0]


def test_an_extension_keeps_the_decay_points_already_passed_and_moves_those_ahead():
    """8/12 of 6000 = 4000 passed at iteration 4500; extended to 12000: 11/12 moves to 11000,
    the passed one stays at 4000 (the lr never rises again)."""
    short = build_schedule(TrainConfig(max_iters=6000, warmup_iters=0), iters_per_epoch=100)
    long = build_schedule(
        TrainConfig(max_iters=12000, warmup_iters=0), 100, passed=short.decays, at=4500
    )
    assert long.decays == (4000, 11000)
    assert long.factor(4500) == pytest.approx(0.1) and long.factor(11000) == pytest.approx(0.01)
    assert build_schedule(TrainConfig(max_iters=12000), 100, passed=(), at=4500).decays == (
        8000,
        11000,
    )  # no record (a 0.2 state): the new length's points


def test_the_banner_says_warmup_each_decay_and_the_final_lr():
    cfg = TrainConfig(max_iters=6000, warmup_iters=500, warmup_ratio=0.001)
    assert build_schedule(cfg, iters_per_epoch=1000).line(0.02) == (
        "Schedule over 6000 iterations: warm-up 500 iterations (linear from 0.001 x lr), "
        "x0.1 at iteration 4000 (epoch 4; 8 epochs), x0.1 at iteration 5500 (epoch 5.5; "
        "11 epochs), final lr 0.0002."
    )


# ------------------------------------------------------------------ through the real CLI

RUN = [
    "teacher", "--preset", "shapes-gfl-r18", "--data", "builtin:shapes:images=16,val=4,size=64",
    "--set", "data.scale=[64,64]", "--set", "data.num_workers=0", "--set", "train.batch_size=4",
    "--set", "train.warmup_iters=1", "--set", "train.log_interval=1",
    "--set", "train.mixed_precision='no'",
]  # fmt: skip  # 4 iterations per epoch; the preset: 12 epochs, milestones 8 and 11


def crosskd(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def lrs(run: Path) -> dict[int, float]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return {r["iteration"]: r["lr"] for r in map(json.loads, lines)}


def test_a_short_run_of_a_preset_decays_in_proportion_and_says_so(tmp_path):
    """12 iterations of a 12-epoch preset: x0.1 after 8 and after 11 (was after iteration 8
    and 11 only by chance: epochs read as iterations)."""
    out = tmp_path / "run"
    output = crosskd(*RUN, "--set", "train.max_iters=6", "--out", str(out))
    assert "Schedule over 6 iterations: warm-up 1 iteration (linear from 0.001 x lr), x0.1 " \
           "at iteration 4 (epoch 1; 8 epochs), x0.1 at iteration 5 (epoch 1.25; 11 epochs), " \
           "final lr 2.5e-05." in output  # fmt: skip
    lr = lrs(out)
    assert lr[4] == pytest.approx(0.0025 * 0.1) and lr[5] == pytest.approx(0.0025 * 0.01)
    assert lr[3] == pytest.approx(0.0025)
    recorded = yaml.safe_load((out / "config.yaml").read_text())["schedule"]
    assert recorded["decay_iterations"] == [4, 5] and recorded["milestone_unit"] == "epochs"


def test_iteration_milestones_and_a_milestone_past_the_end_are_printed(tmp_path):
    out = tmp_path / "run"
    output = crosskd(*RUN, "--set", "train.max_iters=4", "--set", "train.milestone_unit=iterations",
                     "--set", "train.milestones=[2,9]", "--out", str(out))  # fmt: skip
    assert "x0.1 at iteration 2 (epoch 0.5; 2 iterations)" in output
    assert "Note: milestone 9 iterations (iteration 9) is not before the end of the run (4): " \
           "it never lowers the lr." in output  # fmt: skip
    assert lrs(out)[2] == pytest.approx(0.00025) and lrs(out)[4] == pytest.approx(0.00025)


def test_an_extended_run_keeps_its_passed_decay_and_a_0_2_run_keeps_its_milestones(tmp_path):
    out = tmp_path / "run"
    crosskd(*RUN, "--set", "train.max_iters=6", "--out", str(out))
    output = crosskd("teacher", "--resume", "--out", str(out), "--set", "train.max_iters=12")
    # 8/12 of 6 passed at 4; 11/12 of 12 is 11 (5 in the 6-iteration run: passed too)
    assert "x0.1 at iteration 4 (epoch 1; 8 epochs), x0.1 at iteration 5" in output
    assert lrs(out)[12] == pytest.approx(0.0025 * 0.01)
    # A run folder of 0.2: no milestone_unit, no recorded decays; 0.2 read the milestones as
    # iterations under max_iters, and so does the resume
    old = tmp_path / "old"
    crosskd(*RUN, "--set", "train.max_iters=4", "--out", str(old))
    preset = (old / "preset.yaml").read_text()
    (old / "preset.yaml").write_text(preset.replace("  milestone_unit: epochs\n", ""))
    marker = json.loads((old / "last" / "trainer_state.json").read_text())
    del marker["decays"]
    (old / "last" / "trainer_state.json").write_text(json.dumps(marker))
    output = crosskd("teacher", "--resume", "--out", str(old), "--set", "train.max_iters=12")
    assert "x0.1 at iteration 8 (epoch 2; 8 iterations), x0.1 at iteration 11" in output
