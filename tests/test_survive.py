"""Runs that survive: SIGTERM, SIGKILL mid-save and diverging losses, in real `crosskd` processes.

Each run is a child process (a signal must hit a real process) started through a small driver
that installs one hook, then runs the CLI: SIGTERM to itself at a given training step, or
SIGKILL just before a given file-system step of a state save (`state_dir.on_step`). Each child
leads its own process group, as a job under Slurm or `timeout` does: a signal to the group
reaches its DataLoader workers too.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crosskd_cli.checkpoints.format import read_meta
from crosskd_cli.storage.state_dir import STEPS

ROOT = Path(__file__).parent.parent
DATA = "builtin:shapes:images=24,val=8,size=96"
TINY = [
    "--data", DATA, "--set", "train.batch_size=4", "--set", "train.eval_batch_size=4",
    "--set", "data.scale=[96,96]", "--set", "train.warmup_iters=2",
    "--set", "train.max_iters=9", "--set", "train.log_interval=1",
]  # fmt: skip  # 6 iterations per epoch: 9 iterations end inside the second epoch

DRIVER = textwrap.dedent(
    """
    import os, signal, subprocess, sys
    from crosskd_cli.engine import guards
    from crosskd_cli.storage import state_dir

    action, at, *args = sys.argv[1:]
    seen = {"steps": 0, "saves": 0}

    # whom a stop signal goes to: this process; its process group (the workers too, as
    # Slurm and Kubernetes send it), sent by another process, as theirs is; its parent, the
    # `timeout` command, which sends it on to the whole group as when its time is up
    def to_group(name):
        subprocess.run(["kill", "-s", name, "--", f"-{os.getpgid(0)}"])

    SEND = {
        "sigterm": lambda: os.kill(os.getpid(), signal.SIGTERM),
        "group-sigterm": lambda: to_group("TERM"),
        "group-sigint": lambda: to_group("INT"),
        "timeout-sigterm": lambda: os.kill(os.getppid(), signal.SIGTERM),
    }
    send, _, moment = action.partition("@")
    if send in SEND and not moment:  # at the start of training step `at` (1-based)
        check = guards.NonFiniteGuard.check
        def counting(self, losses, norm):
            seen["steps"] += 1
            if seen["steps"] == int(at):
                SEND[send]()
            return check(self, losses, norm)
        guards.NonFiniteGuard.check = counting
    elif send in SEND and moment == "eval":  # while the `at`-th evaluation predicts
        from crosskd_cli.inference import evaluate
        postprocess = evaluate.postprocess
        def signalling(*a, **k):
            seen["evals"] = seen.get("evals", 0) + 1
            if seen["evals"] == int(at):
                SEND[send]()
            return postprocess(*a, **k)
        evaluate.postprocess = signalling
    elif send in SEND and moment == "write":  # inside the `at`-th state save, before writing
        def hook(name):
            seen["saves"] += name == "write"
            if name == "write" and seen["saves"] == int(at):
                SEND[send]()
        state_dir.on_step = hook
    elif action.startswith("kill-before-"):  # the `at`-th save's step named after the prefix
        step = action.removeprefix("kill-before-")
        def hook(name):
            seen["saves"] += name == "write"
            if name == step and seen["saves"] == int(at):
                os.kill(os.getpid(), signal.SIGKILL)
        state_dir.on_step = hook

    from crosskd_cli.cli import app
    app(args, prog_name="crosskd")
    """
)


def crosskd(*args: str, action: str = "none", at: int = 0) -> subprocess.CompletedProcess:
    """The CLI in a child process leading its own process group; under the real `timeout`
    command (with a time it never reaches: the driver signals it) for `timeout-*` actions."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    command = [sys.executable, "-c", DRIVER, action, str(at), *args]
    if action.startswith("timeout-"):
        command = ["timeout", "-s", "TERM", "600", *command]
    return subprocess.run(
        command, env=env, capture_output=True, text=True, check=False, timeout=300,
        start_new_session=True,
    )  # fmt: skip


def teacher_run(out: Path, *extra: str, action: str = "none", at: int = 0):
    return crosskd(
        "teacher", "--preset", "shapes-gfl-r18", *TINY, *extra, "--out", str(out),
        action=action, at=at,
    )  # fmt: skip


def same_weights(a: Path, b: Path) -> bool:
    first, second = load_file(str(a)), load_file(str(b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def epochs_in(results: Path) -> list[int]:
    with results.open(newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("survive") / "straight"
    done = teacher_run(out, "--set", "data.num_workers=0")
    assert done.returncode == 0, done.stderr
    return out


# 1: the CPU presets' persistent worker; 0 (slow): the resumed-row test below stops a run
# without workers and checks the same bit-identical ending
@pytest.mark.parametrize("workers", [pytest.param(0, marks=pytest.mark.slow), 1])
def test_sigterm_mid_epoch_saves_exits_143_and_the_resumed_run_ends_bit_identical(
    uninterrupted, tmp_path, workers
):
    out = tmp_path / "run"
    loader = ["--set", f"data.num_workers={workers}"]
    stopped = teacher_run(out, *loader, action="sigterm", at=4)
    assert stopped.returncode == 143, stopped.stderr
    assert "Interrupted: Stopped by SIGTERM at epoch 1, iteration 4" in stopped.stderr
    assert stopped.stderr.splitlines()[-1] == f"Resume with: crosskd teacher --resume --out {out}"
    assert "Traceback" not in stopped.stderr
    resumed = crosskd("teacher", "--resume", "--out", str(out))  # the folder knows the rest
    assert resumed.returncode == 0, resumed.stderr
    assert same_weights(out / "last.safetensors", uninterrupted / "last.safetensors")
    assert epochs_in(out / "results.csv") == [1, 2]


def stopped_then_resumed(command, out: Path, action: str, at: int, workers: int):
    """Run `command` (teacher_run or a distill runner) stopped by `action` at `at`, check the
    stop is the clean one (exit code, one message, no traceback) and resume it."""
    stopped = command(out, "--set", f"data.num_workers={workers}", action=action, at=at)
    signame = "SIGINT" if action.partition("@")[0].endswith("sigint") else "SIGTERM"
    assert stopped.returncode == (130 if signame == "SIGINT" else 143), stopped.stderr
    assert f"Interrupted: Stopped by {signame} at epoch" in stopped.stderr
    assert stopped.stderr.splitlines()[-1].startswith("Resume with: crosskd ")
    assert "Traceback" not in stopped.stderr and "DataLoader worker" not in stopped.stderr
    resumed = crosskd(*shlex.split(stopped.stderr.splitlines()[-1])[3:])
    assert resumed.returncode == 0, resumed.stderr
    return stopped


def test_a_sigterm_to_the_whole_process_group_with_workers_saves_and_resumes(
    uninterrupted, tmp_path
):
    """As Slurm, `timeout` and Kubernetes stop a job: every process gets the signal, the
    DataLoader workers too. They leave it to the main process, which stops as usual."""
    out = tmp_path / "run"
    stopped = stopped_then_resumed(teacher_run, out, "group-sigterm", 4, workers=2)
    assert "Stopped by SIGTERM at epoch 1, iteration 4" in stopped.stderr
    assert same_weights(out / "last.safetensors", uninterrupted / "last.safetensors")
    assert epochs_in(out / "results.csv") == [1, 2]


def distill_runner(teacher: Path):
    def distill(out: Path, *extra: str, action: str = "none", at: int = 0):
        return crosskd(
            "distill", "--preset", "shapes-gfl-r50-to-r18", *TINY,
            "--set", "model.backbone=resnet18",
            "--other-teacher", "--teacher", str(teacher), "--out", str(out),
            *extra, action=action, at=at,
        )  # fmt: skip

    return distill


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("action", ["group-sigterm", "timeout-sigterm", "group-sigint"])
@pytest.mark.parametrize("command", ["teacher", "distill"])
@pytest.mark.parametrize("moment", ["step", "eval", "write"])
def test_every_group_wide_stop_saves_and_resumes_bit_identical(
    uninterrupted, tmp_path, command, action, workers, moment
):
    """At step 4 (of 6 in epoch 1), during the first evaluation, during the first state save."""
    out = tmp_path / "run"
    if command == "teacher":
        run, straight = teacher_run, uninterrupted
    else:
        run, straight = distill_runner(uninterrupted / "best.safetensors"), tmp_path / "straight"
        assert run(straight, "--set", "data.num_workers=0").returncode == 0
    where = "" if moment == "step" else f"@{moment}"
    stopped = stopped_then_resumed(run, out, action + where, 4 if moment == "step" else 1, workers)
    if moment == "step":
        assert "at epoch 1, iteration 4; the state is saved" in stopped.stderr
    assert same_weights(out / "last.safetensors", straight / "last.safetensors")
    assert epochs_in(out / "results.csv") == [1, 2]


# train.fast_step, the default: a folded teacher and channels-last weights; the plain step
# (slow) is what the equivalence tests train with
@pytest.mark.parametrize("fast", [pytest.param(False, marks=pytest.mark.slow), True])
def test_a_distill_run_stopped_mid_epoch_resumes_bit_identical(uninterrupted, tmp_path, fast):
    teacher = str(uninterrupted / "best.safetensors")

    def distill(out: Path, *extra: str, action: str = "none", at: int = 0):
        return crosskd(
            "distill", "--preset", "shapes-gfl-r50-to-r18", *TINY, "--set", "data.num_workers=1",
            "--set", "model.backbone=resnet18", "--set", f"train.fast_step={str(fast).lower()}",
            "--other-teacher", "--teacher", teacher, "--out", str(out), *extra,
            action=action, at=at,
        )  # fmt: skip

    straight = distill(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    stopped = distill(tmp_path / "run", action="sigterm", at=8)
    assert stopped.returncode == 143  # in epoch 2
    command = f"crosskd distill --resume --out {tmp_path / 'run'}"
    assert stopped.stderr.splitlines()[-1] == f"Resume with: {command}"
    resumed = crosskd(*shlex.split(command)[1:])  # no --teacher, --data, --preset nor --set
    assert resumed.returncode == 0, resumed.stderr
    assert same_weights(
        tmp_path / "run" / "last.safetensors", tmp_path / "straight" / "last.safetensors"
    )
    # the AP the run recorded is the AP its checkpoint gives (evaluated in the file's layout)
    best = tmp_path / "run" / "best.safetensors"
    evaluated = crosskd("eval", str(best), "-o", str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stderr
    measured = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    recorded = read_meta(best).metrics
    assert measured["AP"] == recorded["AP"] and measured["AP50"] == recorded["AP50"]


def test_a_stopped_quickstart_prints_its_command_with_every_flag_and_it_resumes(tmp_path):
    out = tmp_path / "quickstart"
    flags = ["--set", "data.num_workers=0", "--set", "data.scale=[96,96]",
             "--set", "train.max_iters=3", "--set", "train.batch_size=4"]  # fmt: skip
    stopped = crosskd(
        "quickstart", "--data", DATA, *flags, "--out", str(out), action="sigterm", at=2
    )
    assert stopped.returncode == 143, stopped.stderr
    words = ["quickstart", "--preset", "shapes-gfl-r34-to-r18", "--data", DATA, *flags]
    command = shlex.join(["crosskd", *words, "--out", str(out)])  # quoted for a shell
    assert stopped.stderr.splitlines()[-1] == f"Resume with: {command}"
    resumed = crosskd(*shlex.split(command)[1:])
    assert resumed.returncode == 0, resumed.stderr
    assert "Reusing the cached teacher" not in resumed.stdout  # it was stopped: resumed instead


# retire (slow): the sweep over every step of a save below covers it too
@pytest.mark.parametrize("step", [pytest.param("retire", marks=pytest.mark.slow), "promote"])
def test_sigkill_inside_the_end_of_epoch_save_resumes_with_one_row_per_epoch(
    uninterrupted, tmp_path, step
):
    out = tmp_path / "run"
    killed = teacher_run(out, "--set", "data.num_workers=0", action=f"kill-before-{step}", at=1)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "last").exists() or step == "retire"  # mid-swap: last/ may be gone
    resumed = crosskd("teacher", "--resume", "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert epochs_in(out / "results.csv") == [1, 2]  # the epoch-1 row written once
    assert same_weights(out / "last.safetensors", uninterrupted / "last.safetensors")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("last", ".last"))) == [
        "last",
        "last.safetensors",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("save", [1, 2])  # the end of epoch 1; the end of the run
@pytest.mark.parametrize("step", STEPS)
def test_sigkill_before_every_step_of_a_save_resumes_from_the_folder_alone(
    uninterrupted, tmp_path, step, save, workers
):
    """Before the first save's marker there is nothing to resume: said in one line. Anywhere
    else the run resumes from its folder alone and ends bit-identical, one row per epoch."""
    out = tmp_path / "run"
    loader = ["--set", f"data.num_workers={workers}"]
    killed = teacher_run(out, *loader, action=f"kill-before-{step}", at=save)
    assert killed.returncode == -signal.SIGKILL
    resumed = crosskd("teacher", "--resume", "--out", str(out))
    if save == 1 and step in ("write", "mark"):
        assert resumed.returncode == 2 and "holds no resumable state" in resumed.stderr
        assert "Traceback" not in resumed.stderr
        return
    assert resumed.returncode == 0, resumed.stderr
    assert same_weights(out / "last.safetensors", uninterrupted / "last.safetensors")
    assert epochs_in(out / "results.csv") == [1, 2]
    assert not (out / ".lock").exists()


def test_a_diverging_run_skips_its_nan_steps_then_stops_naming_the_term(tmp_path):
    out = tmp_path / "run"
    done = teacher_run(
        out, "--set", "data.num_workers=0", "--set", "train.lr=1.0e+30",
        "--set", "train.max_nonfinite_steps=2",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Error: Training diverged:" in done.stderr and "loss_" in done.stderr
    assert "were skipped" in done.stderr and "Traceback" not in done.stderr
    assert not (out / "last.safetensors").exists()  # no checkpoint of NaN weights


def test_a_full_disk_during_a_save_keeps_the_previous_state(tmp_path, monkeypatch):
    import errno

    from accelerate import Accelerator
    from typer.testing import CliRunner

    from crosskd_cli.cli import app

    calls = {"saves": 0}
    save_state = Accelerator.save_state

    def full_disk_on_second_save(self, output_dir=None, **kwargs):
        calls["saves"] += 1
        if calls["saves"] == 2:
            Path(output_dir, "model.safetensors").write_bytes(b"half written")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_disk_on_second_save)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["teacher", "--preset", "shapes-gfl-r18", *TINY, "--set", "data.num_workers=0",
         "--out", str(out)],
        env={"COLUMNS": "300"},
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())  # rich wraps the long paths
    assert "No space left on device" in said and "Traceback" not in said
    assert f"The previous state in {out / 'last'} is kept (iteration 6)" in said
    assert json.loads((out / "last" / "trainer_state.json").read_text())["iteration"] == 6
    assert not (out / "last.tmp").exists()
    resumed = teacher_run(out, "--set", "data.num_workers=0", "--resume")
    assert resumed.returncode == 0, resumed.stderr  # and the kept state resumes


# ------------------------------------------------------------ runs that learned nothing


def test_a_run_that_skipped_most_of_its_steps_fails_naming_the_term_and_writes_no_checkpoint(
    tmp_path,
):
    """Fewer steps than train.max_nonfinite_steps (20): the streak guard never fires; the
    run used to end normally with an all-zero table and a `best`."""
    out = tmp_path / "run"
    done = teacher_run(out, "--set", "data.num_workers=0", "--set", "train.lr=1.0e+30",
                       "--set", "train.max_iters=4")  # fmt: skip
    assert done.returncode == 2, done.stderr
    message = " ".join(done.stderr.split())
    assert "Error: 3 of the run's 4 training steps were skipped (loss_" in message
    assert "more than the 50% a run may skip" in message and "Traceback" not in message
    assert not (out / "best.safetensors").exists() and not (out / "last.safetensors").exists()


def test_a_weight_exploding_while_finite_is_reported_once_with_its_layer(uninterrupted, tmp_path):
    """A student whose class bias starts at -2e4: finite losses, but the weight is far past
    WEIGHT_LIMIT; said once, with the layer, at the first log interval."""
    from crosskd_cli.checkpoints.format import load_checkpoint, save_checkpoint

    teacher = uninterrupted
    state, meta = load_checkpoint(teacher / "last.safetensors")
    state["head.cls_predictor.bias"] = torch.full_like(state["head.cls_predictor.bias"], -2e4)
    save_checkpoint(tmp_path / "student.safetensors", state, meta)
    done = crosskd("distill", "--preset", "shapes-gfl-r50-to-r18", *TINY,
                   "--set", "data.num_workers=0", "--set", "train.max_iters=3",
                   "--set", "model.backbone=resnet18", "--other-teacher",
                   "--teacher", str(teacher / "last.safetensors"),
                   "--student-weights", str(tmp_path / "student.safetensors"),
                   "--out", str(tmp_path / "student"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    output = " ".join(done.stdout.split())
    assert output.count("Warning: head.cls_predictor.bias's weights reach |w| = 2e+04") == 1
    assert "training is going unstable" in output


def test_distill_refuses_a_teacher_whose_predictions_are_not_finite(uninterrupted, tmp_path):
    from crosskd_cli.checkpoints.format import load_checkpoint, save_checkpoint

    state, meta = load_checkpoint(uninterrupted / "best.safetensors")
    state["neck.fpn_convs.4.weight"][0, 0, 0, 0] = float("nan")
    broken = tmp_path / "diverged.safetensors"
    save_checkpoint(broken, state, meta)
    done = distill_runner(broken)(tmp_path / "run", "--set", "data.num_workers=0")
    assert done.returncode == 2, done.stderr
    message = " ".join(done.stderr.split())
    assert f"Teacher {broken} predicts non-finite class logits on the first validation " \
           "image; its weights hold NaN/inf (neck.fpn_convs.4.weight): it cannot teach." \
           in message  # fmt: skip
    assert "Traceback" not in message


# ------------------------------------------------------------ resume bookkeeping


def rows(results: Path) -> list[dict[str, str]]:
    with results.open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_resumed_epochs_row_equals_the_uninterrupted_one_and_an_old_state_says_its_is_partial(
    uninterrupted, tmp_path
):
    """SIGTERM at iteration 8, in epoch 2 (iterations 7-9): the row of epoch 2 averages all
    three steps, two before the stop and one after (it averaged the one after only). The same
    state as crosskd 0.2 wrote it (no sums, no skipped count) still resumes, and says so."""
    out, old = tmp_path / "run", tmp_path / "old"
    assert teacher_run(out, "--set", "data.num_workers=0", action="sigterm",
                       at=8).returncode == 143  # fmt: skip
    shutil.copytree(out, old)
    marker = json.loads((out / "last" / "trainer_state.json").read_text())
    assert marker["epoch_kept"] == 2.0 and set(marker["epoch_sums"]) >= {"loss_qfl"}
    assert crosskd("teacher", "--resume", "--out", str(out)).returncode == 0
    assert same_weights(out / "last.safetensors", uninterrupted / "last.safetensors")
    got, want = rows(out / "results.csv"), rows(uninterrupted / "results.csv")
    assert [r["epoch"] for r in got] == ["1", "2"]
    for key in [k for k in want[1] if k.startswith("loss")]:
        assert float(got[1][key]) == pytest.approx(float(want[1][key]), rel=1e-5), key
    assert got[1]["skipped_steps"] == want[1]["skipped_steps"] == "0"
    for key in ("epoch_sums", "epoch_kept", "skipped", "decays"):
        del marker[key]
    (old / "last" / "trainer_state.json").write_text(json.dumps(marker))
    resumed = crosskd("teacher", "--resume", "--out", str(old))
    assert resumed.returncode == 0, resumed.stderr
    assert "holds no running loss sums: the results row of epoch 2 averages the steps after " \
           "this resume only." in " ".join(resumed.stdout.split())  # fmt: skip


def test_the_resume_message_names_the_state_recovery_keeps(tmp_path):
    """Killed inside the save of iteration 6, after its state was complete: last/ holds
    iteration 3, last.tmp iteration 6, which the resume continues from (and says so)."""
    out = tmp_path / "run"
    killed = teacher_run(out, "--set", "data.num_workers=0", "--set", "train.state_interval=3",
                         action="kill-before-retire", at=2)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    resumed = crosskd("teacher", "--resume", "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming {out} at iteration 6, from last.tmp" in " ".join(resumed.stdout.split())


# ------------------------------------------------------------ a failed start


def test_a_run_that_failed_before_its_first_save_is_started_again_in_its_folder(tmp_path):
    out = tmp_path / "run"
    killed = teacher_run(out, "--set", "data.num_workers=0", action="kill-before-write", at=1)
    assert killed.returncode == -signal.SIGKILL
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "preset.yaml"}
    resumed = crosskd("teacher", "--resume", "--out", str(out))
    assert resumed.returncode == 2 and "Start a new run without --resume" in resumed.stderr
    again = teacher_run(out, "--set", "data.num_workers=0", "--set", "train.max_iters=2")
    assert again.returncode == 0, again.stderr  # the same command, other flags, no --overwrite
    assert (out / "best.safetensors").exists()
    (out / "notes.txt").write_text("mine")  # a folder holding anything else stays protected
    refused = teacher_run(out, "--set", "data.num_workers=0")
    assert refused.returncode == 2 and "already exists and is not empty" in refused.stderr


# ------------------------------------------------------------ the teacher meant


def test_distill_names_its_teacher_and_refuses_one_other_than_the_pairs(uninterrupted, tmp_path):
    """The pair's teacher preset is shapes-gfl-r50 (ResNet-50); an R18 teacher run, or a file
    written as a student, is refused with both named unless --other-teacher says so."""
    import dataclasses

    from crosskd_cli.checkpoints.format import load_checkpoint, save_checkpoint

    teacher = uninterrupted / "best.safetensors"
    args = ["distill", "--preset", "shapes-gfl-r50-to-r18", *TINY, "--set", "data.num_workers=0",
            "--set", "model.backbone=resnet18", "--out", str(tmp_path / "run")]  # fmt: skip
    done = crosskd(*args, "--teacher", str(teacher))
    assert done.returncode == 2, done.stderr
    message = " ".join(done.stderr.split())
    assert "Error: Teacher best.safetensors is not the teacher of preset 'shapes-gfl-r50-to-r18'" \
           ": its backbone is resnet18, the preset's teacher 'shapes-gfl-r50''s is resnet50." \
           in message  # fmt: skip
    assert "add --other-teacher if this one is intended" in message
    output = " ".join(done.stdout.split())
    assert "Teacher best.safetensors: teacher of preset 'shapes-gfl-r18' (resnet18 gfl), " \
           f"evaluated on {DATA}, recorded AP" in output  # fmt: skip
    state, meta = load_checkpoint(teacher)
    student = tmp_path / "student.safetensors"
    save_checkpoint(student, state, dataclasses.replace(meta, kind="student", training={
        "command": "distill"}))  # fmt: skip
    done = crosskd(*args, "--teacher", str(student))
    assert done.returncode == 2
    assert "it was trained as a student (`crosskd distill` of preset 'shapes-gfl-r18')" in " ".join(
        done.stderr.split()
    )


def test_checking_the_teacher_leaves_the_random_state_and_so_the_students_init_alone(
    mixed_size_checkpoint,
):
    """The check runs before the student is built from the seeded random state: a loader's
    iterator draws a seed from it, which would have moved every distilled student (and the
    quickstart's table)."""
    from crosskd_cli.data import load_splits
    from crosskd_cli.distill.preset_checks import load_preset
    from crosskd_cli.runs.jobs import check_teacher_outputs, load_teacher

    data, checkpoint, _ = mixed_size_checkpoint
    teacher, _ = load_teacher(checkpoint)
    splits = load_splits(load_preset("shapes-gfl-r18", []).data, data)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    check_teacher_outputs(teacher.eval(), splits, checkpoint)
    assert torch.equal(torch.get_rng_state(), before)
