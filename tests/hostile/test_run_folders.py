"""Run folders: resumed from the folder alone, refused when anything given again differs, locked
against a second run, and every bad --out or damaged state refused in one line, changing nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from crosskd_cli.data import cache_root
from crosskd_cli.distill.preset_checks import load_preset
from crosskd_cli.storage.files import file_digest
from crosskd_cli.storage.run_folder import claim_run_dir
from tests.hostile.contract import QUICK, UNSEEN_DATA, digests, generated, invoke, refused

ROOT = Path(__file__).parent.parent.parent
DATA = "builtin:shapes:images=24,val=8,size=96"
RUN = ["--data", DATA, *QUICK]  # 2 iterations
PAIR = ["--preset", "shapes-gfl-r50-to-r18", "--set", "model.backbone=resnet18"]


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """The session's private cache, for module fixtures (set up before `private_cache`)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CROSSKD_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        yield


@pytest.fixture(scope="module")
def finished(tmp_path_factory, module_cache) -> dict[str, Path]:
    """A finished teacher run and a finished distill run from it."""
    root = tmp_path_factory.mktemp("run-folders")
    teacher, student = root / "teacher", root / "student"
    done = invoke("teacher", "--preset", "shapes-gfl-r18", *RUN, "--out", teacher)
    assert done.exit_code == 0, done.output
    done = invoke(
        "distill",
        *PAIR,
        *RUN,
        "--other-teacher",
        "--teacher",
        teacher / "best.safetensors",
        "--out",
        student,
    )
    assert done.exit_code == 0, done.output
    return {"teacher": teacher, "student": student}


@pytest.fixture
def runs(finished, tmp_path) -> dict[str, Path]:
    """Copies of the finished runs, free to resume or damage."""
    copies = {}
    for name, run in finished.items():
        copies[name] = tmp_path / name
        shutil.copytree(run, copies[name])
    return copies


def resume(command: str, run: Path, *args: str):
    return invoke(command, "--resume", "--out", run, *args)


def record(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def edit_record(run: Path, **changes) -> None:
    (run / "config.yaml").write_text(yaml.safe_dump({**record(run), **changes}))


# ---------------------------------------------------------------------------- resuming


def test_the_folder_records_a_plain_preset_and_the_runs_inputs_with_the_teachers_sha256(
    finished,
):
    preset = load_preset(str(finished["student"] / "preset.yaml"))  # a preset like any other
    assert preset.name == "shapes-gfl-r50-to-r18" and preset.model.backbone == "resnet18"
    assert preset.distill.cls_weight is not None  # the family's KD weights, resolved
    teacher = finished["teacher"] / "best.safetensors"
    inputs = record(finished["student"])
    schedule = inputs.pop("schedule")  # for the reader; a resume computes it again
    assert inputs == {
        "command": "distill",
        "data": DATA,
        "teacher": {"path": str(teacher.resolve()), "sha256": file_digest(teacher)},
        "backbone_weights": None,
        "student_weights": None,
    }
    assert set(schedule) == {
        "iterations", "iterations_per_epoch", "warmup_iters", "decay_iterations", "gamma",
        "milestones", "milestone_unit",
    }  # fmt: skip
    assert record(finished["teacher"])["command"] == "teacher"


def test_a_run_resumes_from_its_folder_alone_extending_its_schedule(runs):
    result = resume("distill", runs["student"], "--set", "train.max_iters=3")
    assert result.exit_code == 0, result.output
    assert "Extending the schedule from 2 to 3 iterations." in result.output
    state = json.loads((runs["student"] / "last" / "trainer_state.json").read_text())
    assert state["iteration"] == 3
    assert load_preset(str(runs["student"] / "preset.yaml")).train.max_iters == 3
    assert not (runs["student"] / ".lock").exists()  # released with the run


def test_settings_that_change_no_result_may_change_on_resume_and_are_said(runs):
    result = resume(
        "teacher", runs["teacher"], "--set", "train.max_iters=3", "--set", "data.num_workers=1"
    )
    assert result.exit_code == 0, result.output
    assert "Resuming with data.num_workers=1 (was 0): the results stay the same." in (
        " ".join(result.output.split())
    )


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("teacher", ["--set", "model.fpn_channels=32"],
         "--set model.fpn_channels=32 differs from the run's 64; a resumed run keeps its "
         "settings."),
        ("distill", ["--cross-index", "2"],
         "--set distill.cross_index=2 differs from the run's 3; a resumed run keeps its "
         "settings."),
        ("distill", ["--method", "none"], "--set distill.method=none differs from the run's "
         "crosskd"),
        ("teacher", ["--set", "train.max_iters=1"],
         "--set train.max_iters=1 differs from the run's 2 (a resume may extend the schedule, "
         "not shorten it)"),
        ("teacher", ["--set", "train.max_iters=null"],
         "--set train.max_iters=null differs from the run's 2 (switching between epochs and "
         "iterations would move the lr milestones)"),
        ("teacher", ["--preset", "shapes-gfl-r34"],
         "--preset shapes-gfl-r34 is not the run's preset 'shapes-gfl-r18'; a resumed run "
         "keeps its preset."),
        ("teacher", ["--preset", "shapes-gfl-r18"],
         "data.scale=[160, 160] of --preset shapes-gfl-r18 differs from the run's [96, 96]"),
        ("teacher", ["--data", "builtin:shapes:images=30,val=8,size=96"],
         "--data builtin:shapes:images=30,val=8,size=96 differs from the run's "
         f"{DATA}; a resumed run keeps its data."),
        ("distill", ["--student-weights", "teacher/best.safetensors"],
         "--student-weights teacher/best.safetensors differs from the run's none"),
        ("distill", [], "is a run of `crosskd teacher`, not of `crosskd distill`"),
        ("teacher", ["--overwrite"], "--resume continues a run and --overwrite replaces it"),
    ],
)  # fmt: skip
def test_a_resume_refuses_what_would_change_the_run_naming_it(
    runs, monkeypatch, command, args, message
):
    run = runs["student"] if command == "distill" and args else runs["teacher"]
    before = digests(run.parent)
    monkeypatch.chdir(run.parent)  # --student-weights teacher/... is relative
    result = resume(command, run, *args)
    refused(result, message)
    assert digests(run.parent) == before
    assert generated(cache_root(), "images30") == []  # refused before any data was made


def test_a_refused_resume_says_the_exact_command_that_resumes(runs):
    flat = refused(resume("teacher", runs["teacher"], "--set", "model.fpn_channels=32"))
    assert f"Resume with `crosskd teacher --resume --out {runs['teacher']}` alone" in flat


def test_a_resumed_distillation_refuses_another_teacher_naming_both(runs, finished):
    other = finished["teacher"] / "last.safetensors"  # same model, other weights
    recorded = record(runs["student"])["teacher"]
    before = digests(runs["student"])
    flat = refused(resume("distill", runs["student"], "--teacher", other))
    assert f"Teacher {other} (sha256 {file_digest(other)[:16]}...) is not the run's teacher" in flat
    assert f"{recorded['path']} (sha256 {recorded['sha256'][:16]}...)" in flat
    assert digests(runs["student"]) == before


def test_a_teacher_file_changed_since_the_run_started_is_refused(runs, tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(record(runs["student"])["teacher"]["path"], teacher)
    edit_record(
        runs["student"], teacher={**record(runs["student"])["teacher"], "path": str(teacher)}
    )
    data = bytearray(teacher.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    teacher.write_bytes(bytes(data))
    refused(
        resume("distill", runs["student"]),
        f"Teacher {teacher} changed since the run started: sha256 {file_digest(teacher)[:16]}",
    )


def test_a_moved_teacher_is_asked_for_and_once_given_again_recorded(runs, tmp_path):
    moved = tmp_path / "moved.safetensors"
    teacher = record(runs["student"])["teacher"]
    shutil.copy(teacher["path"], moved)
    gone = tmp_path / "gone.safetensors"
    edit_record(runs["student"], teacher={**teacher, "path": str(gone)})
    refused(
        resume("distill", runs["student"]),
        f"Teacher checkpoint {gone} does not exist (any more).",
        f"--teacher FILE (sha256 {teacher['sha256'][:16]}...)",
    )
    result = resume("distill", runs["student"], "--teacher", moved, "--set", "train.max_iters=3")
    assert result.exit_code == 0, result.output
    assert record(runs["student"])["teacher"] == {"path": str(moved), "sha256": teacher["sha256"]}


def test_a_run_folder_of_an_older_crosskd_with_the_preset_inside_config_yaml_resumes(runs):
    run = runs["teacher"]
    preset = yaml.safe_load((run / "preset.yaml").read_text())
    (run / "preset.yaml").unlink()
    old = {"command": "teacher", "data": DATA, "backbone_weights": "", "preset": preset}
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    result = resume("teacher", run, "--set", "train.max_iters=3")
    assert result.exit_code == 0, result.output
    assert load_preset(str(run / "preset.yaml")).train.max_iters == 3  # written the new way


# ---------------------------------------------------------------------------- damaged folders


class RunsCode:
    """Pickled into optimizer.bin: loading it with pickle's full powers would run a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


DAMAGE = {
    "bad-json": (lambda last: (last / "trainer_state.json").write_text("{not json"),
                 "trainer_state.json is not valid JSON"),
    "no-marker": (lambda last: (last / "trainer_state.json").unlink(),
                  "trainer_state.json is missing"),
    "bad-field": (lambda last: (last / "trainer_state.json").write_text(
                      '{"iteration": 2, "epoch": "one"}'),
                  "trainer_state.json: 'epoch' is 'one', not of type int"),
    "no-optimizer": (lambda last: (last / "optimizer.bin").unlink(), "optimizer.bin is missing"),
    "corrupt-optimizer": (lambda last: (last / "optimizer.bin").write_bytes(os.urandom(5000)),
                          "optimizer.bin is truncated or not a file torch wrote"),
    "refused-optimizer": (lambda last: torch.save({"state": RunsCode(last / "ran")},
                                                  last / "optimizer.bin"),
                          "a file holds pickled objects other than tensors (refused, not loaded)"),
    "truncated-model": (lambda last: os.truncate(last / "model.safetensors", 20_000),
                        "model.safetensors is truncated or not a safetensors file"),
    "truncated-rng": (lambda last: os.truncate(last / "random_states_0.pkl", 100),
                      "random_states_0.pkl is truncated or not a file torch wrote"),
}  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_state_is_one_line_saying_so_and_what_to_do_changing_nothing(runs, damage):
    run = runs["teacher"]
    spoil, detail = DAMAGE[damage]
    spoil(run / "last")
    before = digests(run)
    result = resume("teacher", run, "--set", "train.max_iters=3")
    refused(
        result,
        f"The saved state in {run / 'last'} is damaged: {detail}",
        f"start the run again in another --out (--preset {run}/preset.yaml repeats its "
        "settings), or in this folder with --overwrite.",
    )
    assert digests(run) == before
    assert not (run / "last" / "ran").exists()  # the pickled command never ran


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda run: (run / "config.yaml").write_text("command: [teacher"),
         "config.yaml is damaged: not plain YAML"),
        (lambda run: (run / "config.yaml").unlink(), "has no config.yaml"),
        (lambda run: (run / "config.yaml").write_text("command: train\ndata: x\n"),
         "'command' must be one of 'teacher', 'distill', got 'train'"),
        (lambda run: (run / "preset.yaml").unlink(), "has no preset.yaml"),
        (lambda run: (run / "preset.yaml").write_text("trian: {}\n"), "unknown key 'trian'"),
    ],
)  # fmt: skip
def test_a_damaged_record_is_named_and_changes_nothing(runs, spoil, message):
    run = runs["teacher"]
    spoil(run)
    before = digests(run)
    refused(resume("teacher", run), message)
    assert digests(run) == before


# ---------------------------------------------------------------------------- bad --out


def out_args(command: str, out: Path, finished: dict[str, Path]) -> list:
    """`command` with `out` as its --out, on data not generated yet."""
    if command == "teacher":
        return ["teacher", "--data", UNSEEN_DATA, *QUICK, "--out", out]
    if command == "distill":
        teacher = finished["teacher"] / "best.safetensors"
        return [
            "distill",
            *PAIR,
            "--data",
            UNSEEN_DATA,
            "--other-teacher",
            "--teacher",
            teacher,
            "--out",
            out,
        ]
    if command == "eval":
        return ["eval", finished["teacher"] / "best.safetensors", "--data", UNSEEN_DATA,
                "--out", out]  # fmt: skip
    return ["quickstart", "--data", UNSEEN_DATA, *QUICK, "--out", out]


COMMANDS = ["teacher", "distill", "eval", "quickstart"]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_out_that_is_a_file_is_refused_before_any_work(finished, tmp_path, command):
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    refused(invoke(*out_args(command, out, finished)), f"--out {out} is a file, not a folder.")
    assert out.read_text() == "keep me" and generated(cache_root()) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_an_out_under_a_file_is_refused_before_any_work(finished, tmp_path, command):
    parent = tmp_path / "results.txt"
    parent.write_text("keep me")
    out = parent / "run"
    refused(
        invoke(*out_args(command, out, finished)),
        f"--out {out} cannot be created: {parent} is a file, not a folder.",
    )
    assert parent.read_text() == "keep me" and generated(cache_root()) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_an_out_that_is_a_symlink_loop_is_refused(finished, tmp_path, command):
    out = tmp_path / "loop"
    out.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(out)
    refused(invoke(*out_args(command, out, finished)), f"--out {out} is a symbolic link that leads")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
@pytest.mark.parametrize("command", COMMANDS)
def test_a_read_only_out_is_refused(finished, tmp_path, command):
    out = tmp_path / "locked"
    out.mkdir(mode=0o555)
    try:
        refused(invoke(*out_args(command, out, finished)), f"--out {out} cannot be written")
    finally:
        out.chmod(0o755)


def test_resuming_a_folder_that_does_not_exist_is_refused(tmp_path):
    refused(resume("teacher", tmp_path / "nowhere"), f"--resume: {tmp_path / 'nowhere'} does")
    assert not (tmp_path / "nowhere").exists()


# ---------------------------------------------------------------------------- the lock

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from crosskd_cli.storage.run_folder import RunDir, lock_run
    lock = lock_run(RunDir(Path(sys.argv[1])), "crosskd teacher")
    print("locked", flush=True)
    time.sleep(300)
    """
)


def python(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], env=env, text=True, **kwargs)


def test_a_folder_in_use_is_refused_naming_the_holder_and_taken_over_once_it_died(runs):
    run = runs["teacher"]
    holder = python("-c", HOLDER, str(run), stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = digests(run)
        message = f"Run folder {run} is in use by process {holder.pid} (crosskd teacher)."
        refused(resume("teacher", run, "--set", "train.max_iters=3"), message, "kill -TERM")
        overwrite = invoke("teacher", "--preset", "shapes-gfl-r18", *RUN, "--out", run,
                           "--overwrite")  # fmt: skip
        refused(overwrite, message)
        assert digests(run) == before  # --overwrite deleted nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / ".lock").read_text().startswith(str(holder.pid))  # left by the killed holder
    result = resume("teacher", run, "--set", "train.max_iters=3")
    assert result.exit_code == 0, result.output
    assert not (run / ".lock").exists()


def test_folders_without_out_are_claimed_atomically_so_two_runs_get_two(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = claim_run_dir(None, "teacher", "shapes-gfl-r18", resume=False, overwrite=False)
    second = claim_run_dir(None, "teacher", "shapes-gfl-r18", resume=False, overwrite=False)
    assert (first.run.root, second.run.root) == (
        Path("runs/teacher/shapes-gfl-r18"),
        Path("runs/teacher/shapes-gfl-r18-2"),
    )
    first.release()
    second.release()
    assert not Path("runs/teacher/shapes-gfl-r18").exists()  # claimed, unused: given back


def test_two_runs_started_together_without_out_both_finish_in_two_folders(finished, tmp_path):
    args = ["-m", "crosskd_cli", "teacher", "--preset", "shapes-gfl-r18", *RUN]
    both = [python(*args, cwd=tmp_path, stderr=subprocess.PIPE) for _ in range(2)]
    for process in both:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    folders = sorted(p.name for p in (tmp_path / "runs" / "teacher").iterdir())
    assert folders == ["shapes-gfl-r18", "shapes-gfl-r18-2"]
    assert all((tmp_path / "runs" / "teacher" / f / "best.safetensors").is_file() for f in folders)
