"""The paper's Fig. 5 on the built-in data: `none`, `mimic` and `crosskd` students of one
teacher, their distances to the teacher's predictions and to the ground truth per epoch.

Trains the pair's teacher, then the three students (in parallel with --parallel), through the
real `crosskd teacher` and `crosskd distill` commands (every distill run measures Fig. 5 by
default, `distill.gap_images`), and draws the three results.csv files into one picture:

    python -m benchmarks.fig5 --out runs/fig5 --png docs/images/prediction_gap.png

A short schedule by default (the README figure's; minutes on a few CPU cores); --set passes
overrides to every run, --teacher-epochs / --student-epochs set the schedules.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from crosskd_cli.viz.plots import plot_gap

METHODS = ("none", "mimic", "crosskd")


def crosskd(*args: str) -> list[str]:
    return [sys.executable, "-m", "crosskd_cli", *args]


def schedule(epochs: int, warmup: int) -> list[str]:
    """`epochs` epochs, lr x0.1 for the last one, evaluated after every epoch."""
    settings = [f"train.epochs={epochs}", f"train.milestones=[{max(epochs - 1, 1)}]",
                f"train.warmup_iters={warmup}", "train.eval_interval=1"]  # fmt: skip
    return [word for s in settings for word in ("--set", s)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shapes-gfl-r34-to-r18")
    parser.add_argument("--teacher-preset", default="shapes-gfl-r34")
    parser.add_argument("--data", default="builtin:shapes:images=160,val=48")
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--student-epochs", type=int, default=4)
    parser.add_argument("--warmup-iters", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--parallel", action="store_true", help="Train the students at once.")
    parser.add_argument("--out", type=Path, default=Path("runs/fig5"))
    parser.add_argument("--png", type=Path, default=None, help="Default: OUT/prediction_gap.png")
    args = parser.parse_args()
    common = ["--data", args.data, *[w for s in args.overrides for w in ("--set", s)]]
    teacher = args.out / "teacher"
    if not (teacher / "best.safetensors").is_file():
        subprocess.run(
            crosskd("teacher", "--preset", args.teacher_preset, *common, "--out", str(teacher),
                    *schedule(args.teacher_epochs, args.warmup_iters)),
            check=True,
        )  # fmt: skip
    jobs = []
    for method in METHODS:
        run = args.out / method
        if (run / "last.safetensors").is_file():
            continue
        command = crosskd(
            "distill", "--preset", args.preset, "--method", method, *common,
            "--teacher", str(teacher / "best.safetensors"), "--out", str(run),
            *schedule(args.student_epochs, args.warmup_iters),
        )  # fmt: skip
        jobs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
        if not args.parallel:
            jobs[-1].wait()
    if any(job.wait() for job in jobs):
        raise SystemExit("A student run failed; run it again to see why (it resumes).")
    png = args.png or args.out / "prediction_gap.png"
    runs = {method: args.out / method / "results.csv" for method in METHODS}
    plot_gap(runs, png, f"Fig. 5 on {args.data}: {args.preset}")
    print(f"Wrote {png}")


if __name__ == "__main__":
    main()
