"""Two processes on CPU (gloo): the same command scales out through Accelerate."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from crosskd_cli.checkpoints.format import load_checkpoint, read_meta
from crosskd_cli.cli import app
from crosskd_cli.inference.metrics import METRIC_KEYS

TINY = [
    "--data", "builtin:shapes:images=24,val=8,size=96", "--set", "train.max_iters=3",
    "--set", "train.batch_size=2", "--set", "train.eval_batch_size=3", "--set",
    "data.num_workers=0", "--set", "data.scale=[96,96]", "--set", "train.warmup_iters=2",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(log: Path, *args: str) -> tuple[int, str]:
    """crosskd under torchrun with two processes. Output goes through a file: with pipes, the
    launcher's workers were seen to stall."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m",
               "crosskd_cli", *args]  # fmt: skip
    with log.open("w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=600).returncode
    return code, log.read_text()


def test_teacher_and_distill_run_as_two_gloo_processes(tmp_path):
    teacher = tmp_path / "teacher"
    code, output = torchrun(
        tmp_path / "t.log", "teacher", "--preset", "shapes-gfl-r18", *TINY, "--out", str(teacher)
    )
    assert code == 0, output[-3000:]
    assert read_meta(teacher / "best.safetensors").training["processes"] == 2
    assert (teacher / "last" / "random_states_1.pkl").is_file()  # each rank saved its RNG
    # 8 val images in batches of 3 over 2 processes: Accelerate repeats a batch, counted once
    evaluated = CliRunner().invoke(app, ["eval", str(teacher / "best.safetensors"), "-o",
                                         str(tmp_path / "eval")])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    measured = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    recorded = read_meta(teacher / "best.safetensors").metrics
    assert {k: measured[k] for k in METRIC_KEYS} == {k: recorded[k] for k in METRIC_KEYS}
    # resumed from the folder alone: the main process locks and reads it, the other follows
    code, output = torchrun(
        tmp_path / "r.log", "teacher", "--resume", "--out", str(teacher),
        "--set", "train.max_iters=4",
    )  # fmt: skip
    assert code == 0, output[-3000:]
    assert output.count("Extending the schedule from 3 to 4 iterations.") == 1
    assert json.loads((teacher / "last" / "trainer_state.json").read_text())["iteration"] == 4
    drops = json.loads((teacher / "metrics.json").read_text())["data"]  # merged over ranks
    assert drops["train"]["images_used"] == 24 and not (teacher / ".lock").exists()
    student = tmp_path / "student"
    code, output = torchrun(
        tmp_path / "s.log", "distill", "--preset", "shapes-gfl-r50-to-r18", *TINY,
        "--set", "model.backbone=resnet18",
        "--other-teacher", "--teacher", str(teacher / "best.safetensors"),
        "--out", str(student),
    )  # fmt: skip
    assert code == 0, output[-3000:]
    assert output.count("crosskd distill") == 1  # only the main process talks
    state, meta = load_checkpoint(student / "best.safetensors")
    assert meta.training["processes"] == 2 and meta.kind == "student"
    teacher_state, _ = load_checkpoint(teacher / "best.safetensors")
    assert state.keys() == teacher_state.keys()  # a plain student: no DDP "module." prefix
    iterations = json.loads((student / "last" / "trainer_state.json").read_text())["iteration"]
    assert iterations == 3


def test_fcos_distills_as_two_gloo_processes(tmp_path):
    """FCOS averages its positives and centerness-target sums across processes (ATSS and
    GFL share the path): a two-process CrossKD run must get through the all-reduces."""
    teacher = tmp_path / "teacher"  # trained in this process: the distill run is the test
    result = CliRunner().invoke(app, [
        "teacher", "--preset", "shapes-fcos-r34", *TINY, "--set", "model.backbone=resnet18",
        "--out", str(teacher),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    student = tmp_path / "student"
    code, output = torchrun(
        tmp_path / "s.log", "distill", "--preset", "shapes-fcos-r34-to-r18", *TINY,
        "--other-teacher", "--teacher", str(teacher / "best.safetensors"), "--out", str(student),
    )  # fmt: skip
    assert code == 0, output[-3000:]
    meta = read_meta(student / "best.safetensors")
    assert meta.training["processes"] == 2 and meta.model.family == "fcos"
    assert "kd_cross_box" in (student / "results.csv").read_text().splitlines()[0]


SIGTERM_ONE_RANK = """
import os, signal, sys
from crosskd_cli.engine import guards

if os.environ.get("RANK") == "1":  # the scheduler's signal reaches one process only
    check, seen = guards.NonFiniteGuard.check, {"steps": 0}

    def counting(self, losses, norm):
        seen["steps"] += 1
        if seen["steps"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return check(self, losses, norm)

    guards.NonFiniteGuard.check = counting
from crosskd_cli.cli import app
app(sys.argv[1:], prog_name="crosskd")
"""


def test_a_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(SIGTERM_ONE_RANK)
    run = tmp_path / "run"
    args = ["teacher", "--preset", "shapes-gfl-r18", *TINY, "--set", "train.max_iters=6",
            "--set", "train.log_interval=1", "--out", str(run)]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(driver),
               *args]  # fmt: skip
    log = tmp_path / "stop.log"
    with log.open("w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=600).returncode
    output = log.read_text()
    assert code != 0 and "Stopped by SIGTERM at epoch 1, iteration 2" in output, output[-3000:]
    assert json.loads((run / "last" / "trainer_state.json").read_text())["iteration"] == 2
    assert (run / "last" / "random_states_1.pkl").is_file()  # both ranks saved at that step
    code, output = torchrun(tmp_path / "resume.log", "teacher", "--resume", "--out", str(run))
    assert code == 0, output[-3000:]
    assert json.loads((run / "last" / "trainer_state.json").read_text())["iteration"] == 6
