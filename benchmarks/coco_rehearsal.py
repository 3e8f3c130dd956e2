"""A COCO-sized rehearsal without COCO: the paper's path end to end, timed, on this machine.

Runs what a user with COCO and a GPU-less machine would run, as real `crosskd` processes:

1. a generated COCO-2017-layout folder (`crosskd_cli.data.coco_layout`: JPEGs of COCO's common
   sizes, COCO's 80 category ids and names, 2-12 objects an image, 7 on average as COCO's 7.3);
2. `crosskd teacher import` of an MMDetection-layout GFL R101 file (random weights under
   MMDetection's key names, as the import tests make them);
3. `crosskd distill --preset gfl-r101-to-r50 --data FOLDER` at the preset's 1333x800 and batch
   size, its ResNet-50 started from the ImageNet file in the torch hub cache (a random
   torchvision-keyed one in a temporary cache, unless --torch-home names a real cache), stopped
   by a real SIGTERM after --stop-after logged steps and resumed with `--resume`;
4. `crosskd eval` of the student, then the prediction pass once more in this process, timed
   image by image.

Reports the median training step after warm-up (the first step of each process is left out:
it pays for allocations and the data loader's start) in wall time and in CPU time of the run's
processes (which other load on a shared machine barely moves), peak memory (the training process's
peak RSS as RUN/log.jsonl records it, and the largest RSS of each command's process tree),
evaluation images/second (prediction only, first image left out) and the hours the preset's
schedule would take here: epochs x ceil(117,266 COCO train images with boxes / batch) steps at
the median step time on one process, plus one evaluation of COCO's 5,000 val images. Random
weights put fewer candidates past the score threshold than trained ones; the backbones, FPN
and heads dominate the time.

    python -m benchmarks.coco_rehearsal          # 25 min on 2 CPU cores shared with other jobs
    python -m benchmarks.coco_rehearsal --work rehearsal/     # keep the folder, runs, logs
    python -m benchmarks.coco_rehearsal --set 'data.scale=[128,96]'  # a smoke run, minutes

Prints a markdown table and writes it with the figures as JSON to --out
(benchmarks/results/coco_rehearsal/ by default).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from benchmarks.common import machine
from crosskd_cli.data import resolve_data
from crosskd_cli.data.coco_layout import (
    COCO_CLASSES,
    COCO_TRAIN_IMAGES,
    COCO_VAL_IMAGES,
    write_coco_folder,
)
from crosskd_cli.distill.preset_checks import load_preset
from crosskd_cli.engine.log_lines import peak_memory_mb
from crosskd_cli.inference.evaluate import evaluate_checkpoint
from crosskd_cli.models import build_detector
from crosskd_cli.models.pretrained import BACKBONE_INITS, cache_path
from tests.test_import import mmdetection_layout

ROOT = Path(__file__).resolve().parent.parent  # the checkout the commands run from

PRESET, TEACHER_PRESET = "gfl-r101-to-r50", "gfl-r101"
STOPPED = re.compile(r"Stopped by SIGTERM at epoch \d+, iteration (\d+)")


class Command:
    """One `crosskd` process: its exit code, wall time and the largest RSS of its tree."""

    def __init__(self, args: list[str], env: dict[str, str], logs: Path, name: str) -> None:
        self.args, self.name = args, name
        self.stdout, self.stderr = logs / f"{name}.out", logs / f"{name}.err"
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.start = time.perf_counter()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "crosskd_cli", *args], env=env, stdout=out, stderr=err
            )
        self.returncode: int | None = None

    def poll(self) -> bool:
        """Reap the process if it ended (wait4 gives its tree's peak RSS, which Popen hides)."""
        if self.returncode is not None:
            return True
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode  # reaped here; Popen must not wait again
        self.wall_s = time.perf_counter() - self.start
        # the command's own peak: this driver stays small, so the fork inherits little
        self.max_rss_mb = usage.ru_maxrss / 1024
        return True

    def wait(self, expect: int = 0) -> Command:
        while not self.poll():
            time.sleep(0.2)
        if self.returncode != expect:
            sys.exit(
                f"crosskd {' '.join(self.args)} exited {self.returncode}, not {expect}:\n"
                f"{self.stdout.read_text()[-3000:]}{self.stderr.read_text()[-3000:]}"
            )
        print(f"  {self.wall_s:7.1f} s  {self.max_rss_mb:7.0f} MB  crosskd {self.name}", flush=True)
        return self


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of `pid` and its live descendants (data loader workers),
    with the children they reaped, from /proc: unlike wall time, barely moved by other load."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # ended meanwhile
            ticks = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
            stats[int(entry.name)] = (int(fields[1]), ticks)
    tree = {pid}
    for _ in range(8):  # a few generations deep is plenty
        tree |= {p for p, (parent, _) in stats.items() if parent in tree}
    total = sum(stats[p][1] for p in tree if p in stats)
    return total / os.sysconf("SC_CLK_TCK")


def follow(
    command: Command, run: Path, stop_after: int | None = None, after: int = 0
) -> dict[int, float]:
    """Wait for a distill process, sampling its CPU time as each step past iteration `after`
    is logged (and sending SIGTERM once `stop_after` steps are): {iteration: CPU seconds}."""
    cpu, signalled = {}, False
    while not command.poll():
        records = read_log(run)
        for record in records:
            if record["iteration"] > after and record["iteration"] not in cpu:
                cpu[record["iteration"]] = tree_cpu_s(command.proc.pid)
        if stop_after is not None and not signalled and len(records) >= stop_after:
            command.proc.send_signal(signal.SIGTERM)
            signalled = True
        time.sleep(0.5)
    return cpu


def read_log(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def prepare(work: Path, args) -> tuple[Path, Path, dict[str, str]]:
    """The COCO folder, the MMDetection teacher file and the environment with its hub cache."""
    torch_home = Path(args.torch_home) if args.torch_home else work / "torch_home"
    env = {**os.environ, "TORCH_HOME": str(torch_home), "COLUMNS": "200"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    os.environ["TORCH_HOME"] = str(torch_home)
    imagenet = cache_path(BACKBONE_INITS[load_preset(PRESET).model.backbone_init])
    if not imagenet.exists():
        imagenet.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(1)
        torch.save(torchvision.models.resnet50(weights=None).state_dict(), imagenet)
        print(f"random ImageNet stand-in at {imagenet}")
    start = time.perf_counter()
    folder = write_coco_folder(work / "coco", train=args.train, val=args.val, seed=args.seed)
    print(f"  {time.perf_counter() - start:7.1f} s  COCO folder: {args.train} + {args.val} images")
    torch.manual_seed(0)
    teacher = build_detector(load_preset(TEACHER_PRESET).model)
    mmdet_file = work / "gfl_r101_fpn_ms-2x_coco.pth"
    torch.save({"meta": {"CLASSES": COCO_CLASSES}, "state_dict": mmdetection_layout(teacher)},
               mmdet_file)  # fmt: skip
    return folder, mmdet_file, env


def distill_stopped_and_resumed(folder, teacher, run, env, logs, args) -> dict:
    """Distill, SIGTERM after `stop_after` logged steps, resume; the log of each process."""
    settings = [f"train.max_iters={args.iters}", "train.log_interval=1", *args.set]
    if args.workers is not None:
        settings.append(f"data.num_workers={args.workers}")
    sets = [word for s in settings for word in ("--set", s)]
    first = Command(
        ["distill", "--preset", PRESET, "--data", str(folder), "--teacher", str(teacher),
         *sets, "--out", str(run)], env, logs, "distill",
    )  # fmt: skip
    first_cpu = follow(first, run, stop_after=args.stop_after)
    first.wait(expect=143)  # 128 + SIGTERM: the state is saved
    saved = int(STOPPED.search(first.stderr.read_text())[1])
    before = [r for r in read_log(run) if r["iteration"] <= saved]
    second = Command(["distill", "--resume", "--out", str(run)], env, logs, "distill-resume")
    second_cpu = follow(second, run, after=saved)
    second.wait()
    after = [r for r in read_log(run) if r["iteration"] > saved]
    cpu = [_step_cpu(first_cpu, saved), _step_cpu(second_cpu, None)]
    return {"first": first, "second": second, "sessions": [before, after], "saved": saved,
            "cpu_s": [c for session in cpu for c in session]}  # fmt: skip


def _step_cpu(samples: dict[int, float], last: int | None) -> list[float]:
    """CPU seconds of each step but the process's first (warm-up), up to iteration `last`."""
    its = sorted(i for i in samples if last is None or i <= last)
    return [samples[b] - samples[a] for a, b in itertools.pairwise(its) if b == a + 1]


def step_seconds(sessions: list[list[dict]]) -> list[float]:
    """Wall seconds of each logged step (log_interval 1; each record's `seconds` is the run's
    training time so far), without each process's first step."""
    return [
        b["seconds"] - a["seconds"]
        for records in sessions
        for a, b in itertools.pairwise(records)
        if b["iteration"] == a["iteration"] + 1
    ]


def eval_speed(checkpoint: Path, folder: Path) -> dict:
    """Images/second of the prediction pass one image at a time (on a CPU, batches barely
    help at 1333x800: benchmarks/eval_speed.py), timed from the end of the first image."""
    stamps: list[tuple[float, int]] = []
    report = evaluate_checkpoint(
        checkpoint,
        resolve_data(str(folder)),
        batch_size=1,
        device=torch.device("cpu"),
        on_batch=lambda n: stamps.append((time.perf_counter(), n)),
    )
    (t0, _), (t1, _) = stamps[0], stamps[-1]
    timed = sum(n for _, n in stamps[1:])
    return {
        "images": report.num_images,
        "batch_size": report.batch_size,
        "images_per_s": timed / (t1 - t0) if timed else float("nan"),
    }


def predict_hours(
    step_s: float, step_cpu_s: float, eval_ips: float, batch: int, overrides: list[str]
) -> dict:
    schedule = load_preset(PRESET, overrides).train
    steps = schedule.epochs * math.ceil(COCO_TRAIN_IMAGES / batch)
    train_h = steps * step_s / 3600
    eval_h = COCO_VAL_IMAGES / eval_ips / 3600
    return {
        "epochs": schedule.epochs,
        "steps": steps,
        "train_hours": train_h,
        # were every core busy with this run alone: its CPU time spread over all cores
        "train_hours_all_cores": steps * step_cpu_s / len(os.sched_getaffinity(0)) / 3600,
        "eval_hours": eval_h,
        "total_hours": train_h + eval_h,
        "assumption": f"one process at batch {batch} (the preset's per-process batch; total "
        f"batch {batch}, lr scaled by {batch}/{schedule.base_batch_size}), {schedule.epochs} "
        f"epochs of COCO's {COCO_TRAIN_IMAGES} train images with boxes at the median step "
        f"time, plus one evaluation of its {COCO_VAL_IMAGES} val images (eval_interval 0)",
    }


def table(result: dict) -> str:
    m, s, e, p = result["machine"], result["steps"], result["eval"], result["prediction"]
    rows = [
        ("machine", f"{m['usable_cores']} cores, {m['cpu']}, {m['memory_gib']} GiB, "
                    f"torch {m['torch']}"),
        ("data", f"{result['train_images']} train + {e['images']} val images of COCO's sizes, "
                 f"scale {result['scale']}"),
        ("distill", f"{PRESET}, batch {result['batch']}, {result['iters']} steps: "
                    f"SIGTERM, saved at {result['saved']}, resumed"),
        ("step time (median after warm-up)", f"{s['median_s']:.1f} s "
         f"(min {s['min_s']:.1f}, max {s['max_s']:.1f}; {len(s['seconds'])} steps)"),
        ("CPU time per step (median, the run's processes)", f"{s['median_cpu_s']:.1f} s"),
        ("peak memory (training process)", f"{result['peak_rss_mb']['training']:.0f} MB"),
        ("peak memory (largest process, any command)",
         f"{max(result['peak_rss_mb']['commands'].values()):.0f} MB"),
        ("evaluation", f"{e['images_per_s']:.2f} images/s (batch {e['batch_size']})"),
        ("1x schedule here", f"{p['total_hours']:,.0f} h ({p['steps']:,} steps: "
                             f"{p['train_hours']:,.0f} h training, {p['eval_hours']:.1f} h eval)"),
        ("1x training, every core on this run alone", f"{p['train_hours_all_cores']:,.0f} h "
                                                      "(its CPU time over all cores)"),
        ("load average (1 min) at start, end", "{:.1f}, {:.1f} (other jobs)".format(
            result["load_average"]["start"][0], result["load_average"]["end"][0])),
        ("command wall times", ", ".join(f"{k} {v:.0f} s" for k, v in result["wall_s"].items())),
    ]  # fmt: skip
    lines = ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=16, help="generated train images")
    parser.add_argument("--val", type=int, default=10, help="generated val images")
    parser.add_argument("--iters", type=int, default=6, help="training steps in all")
    parser.add_argument("--stop-after", type=int, default=3, help="logged steps before SIGTERM")
    parser.add_argument("--workers", type=int, default=None, help="data.num_workers (preset's)")
    parser.add_argument("--seed", type=int, default=0, help="of the generated images")
    parser.add_argument(
        "--set", action="append", default=[], help="a distill override, e.g. data.scale=[128,96]"
    )
    parser.add_argument("--torch-home", default=None, help="a torch hub cache with resnet50")
    parser.add_argument("--work", default=None, help="keep the folders here (default: temp)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/coco_rehearsal"))
    args = parser.parse_args()
    if not 1 <= args.stop_after < args.iters:
        parser.error("--stop-after must be at least 1 and below --iters")

    work = Path(args.work or tempfile.mkdtemp(prefix="crosskd-rehearsal-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    load_start = os.getloadavg()
    try:
        folder, mmdet_file, env = prepare(work, args)
        teacher = work / "gfl_r101.safetensors"
        imported = Command(
            ["teacher", "import", str(mmdet_file), "--preset", TEACHER_PRESET,
             "--data", str(folder), "--out", str(teacher)], env, logs, "teacher-import",
        ).wait()  # fmt: skip
        mmdet_file.unlink()
        run = work / "run"
        distill = distill_stopped_and_resumed(folder, teacher, run, env, logs, args)
        evaluated = Command(
            ["eval", str(run / "best.safetensors"), "--out", str(work / "eval")], env, logs, "eval"
        ).wait()
        speed = eval_speed(run / "best.safetensors", folder)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    preset = load_preset(PRESET, args.set)
    batch = preset.train.batch_size
    seconds = step_seconds(distill["sessions"])
    median = statistics.median(seconds)
    records = [r for session in distill["sessions"] for r in session]
    commands = {"teacher-import": imported, "distill": distill["first"],
                "distill-resume": distill["second"], "eval": evaluated}  # fmt: skip
    result = {
        "machine": machine(),
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "preset": PRESET,
        "overrides": args.set,
        "scale": list(preset.data.scale),
        "batch": batch,
        "iters": args.iters,
        "saved": distill["saved"],
        "train_images": args.train,
        "steps": {
            "seconds": [round(s, 2) for s in seconds],
            "median_s": median,
            "min_s": min(seconds),
            "max_s": max(seconds),
            "cpu_s": [round(c, 2) for c in distill["cpu_s"]],
            "median_cpu_s": statistics.median(distill["cpu_s"]),
        },
        "peak_rss_mb": {
            "training": max(r["max_memory_mb"] for r in records),
            "commands": {name: round(c.max_rss_mb) for name, c in commands.items()},
            "benchmark_process": round(peak_memory_mb(torch.device("cpu"))),
        },
        "wall_s": {name: round(c.wall_s, 1) for name, c in commands.items()},
        "eval": speed,
        "prediction": predict_hours(
            median, statistics.median(distill["cpu_s"]), speed["images_per_s"], batch, args.set
        ),
    }
    text = table(result)
    print("\n" + text + "\n\n" + result["prediction"]["assumption"] + ".")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "coco_rehearsal.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "coco_rehearsal.md").write_text(text + "\n")
    print(f"Wrote {out / 'coco_rehearsal.json'} and {out / 'coco_rehearsal.md'}.")


if __name__ == "__main__":
    main()
