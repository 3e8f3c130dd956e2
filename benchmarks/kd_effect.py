"""Does CrossKD work? The paper's GFL ablations (Tables 1, 2, 4) at CPU scale on builtin:shapes.

Trains the pair preset's teacher once, then the student with every method of the comparison
(`none`, `mimic`, `pkd`, `crosskd` at i = 0..4, `crosskd+pkd`, `crosskd+mimic`), several paired
seeds for the three that matter most, through the real `crosskd` commands. Every finished run
is evaluated with `crosskd eval` and leaves a small JSON file in --results; commit those, since
machines are not kept: a later session reruns only what has no result yet.

    python -m benchmarks.kd_effect                    # everything still missing, then the report
    python -m benchmarks.kd_effect --only none,crosskd-i3 --seeds 3
    python -m benchmarks.kd_effect --report-only      # table + plot from the committed results

Writes benchmarks/results/kd_effect/*.json (one per run), and kd_effect.md / .json / .png
beside them. Needs `pip install -e '.[bench]'` for the plot (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import machine
from benchmarks.kd_report import label_of, write_report
from crosskd_cli.storage.files import atomic_write_text, file_digest

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results" / "kd_effect"
DEFAULT_PRESET = "shapes-gfl-r34-to-r18"
DEFAULT_DATA = "builtin:shapes"


KD_ON = {  # which predictions the KD losses touch (paper Table 3) -> the preset overrides
    "both": [],
    "cls": ["distill.box_kd=false"],
    "reg": ["distill.cls_kd=none"],
}


@dataclass(frozen=True)
class Run:
    """One student training of the comparison."""

    method: str
    cross_index: int | None  # None: the method has no cross branch
    seed: int
    kd_on: str = "both"  # both, cls or reg

    @property
    def group(self) -> str:
        """File-safe name of the method at its index, as --only takes it: crosskd-pkd-i3."""
        name = self.method.replace("+", "-")
        name = name if self.cross_index is None else f"{name}-i{self.cross_index}"
        return name if self.kd_on == "both" else f"{name}-{self.kd_on}"

    @property
    def name(self) -> str:
        return f"{self.group}-s{self.seed}"


def plan(seeds: int) -> list[Run]:
    """The runs of the comparison: `seeds` paired seeds for none, mimic and crosskd i=3, one
    seed for the cross-index sweep (Table 1), KD on one branch only (Table 3) and the
    combinations (Tables 2 and 4)."""
    runs = []
    for seed in range(seeds):
        runs += [Run("none", None, seed), Run("mimic", None, seed), Run("crosskd", 3, seed)]
    runs += [Run("crosskd", index, 0) for index in (0, 1, 2, 4)]
    runs += [Run("pkd", None, 0), Run("crosskd+pkd", 3, 0), Run("crosskd+mimic", 3, 0)]
    for kd_on in ("cls", "reg"):
        runs += [Run("mimic", None, 0, kd_on), Run("crosskd", 3, 0, kd_on)]
    return runs


def crosskd(*args: str, log: Path) -> None:
    """Run one `crosskd` command in a child process, its output to `log`; stop on failure."""
    command = [sys.executable, "-m", "crosskd_cli", *args]
    print("$ crosskd " + " ".join(args), flush=True)
    with log.open("a") as stream:
        code = subprocess.call(command, stdout=stream, stderr=subprocess.STDOUT)
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        sys.exit(f"crosskd {args[0]} failed with exit code {code}; the end of {log}:\n{tail}")


def train(command: str, run_dir: Path, args: list[str], log: Path) -> float:
    """Train into `run_dir` (resuming an interrupted run); returns the training seconds."""
    if (run_dir / "best.safetensors").is_file() and (run_dir / "metrics.json").is_file():
        return _recorded_seconds(run_dir)
    resumable = (run_dir / "last" / "trainer_state.json").is_file()
    flags = ["--resume"] if resumable else ["--overwrite"]
    crosskd(command, *args, "--out", str(run_dir), *flags, log=log)
    return _recorded_seconds(run_dir)


def _recorded_seconds(run_dir: Path) -> float:
    state = run_dir / "last" / "trainer_state.json"
    return json.loads(state.read_text()).get("wall_time", 0.0) if state.is_file() else 0.0


def evaluate(checkpoint: Path, log: Path) -> dict:
    """`crosskd eval` on the checkpoint's recorded validation data -> its metrics.json."""
    out = checkpoint.parent / "bench-eval"
    crosskd("eval", str(checkpoint), "--out", str(out), "--overwrite", log=log)
    return json.loads((out / "metrics.json").read_text())


def digest(path: Path) -> str:
    return file_digest(path)[:16]


def write_result(path: Path, result: dict) -> None:
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="a pair preset on CPU data")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--seeds", type=int, default=3, help="paired seeds of none/mimic/crosskd")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated methods, groups or run names (teacher, none, mimic, pkd, "
        "crosskd-i3, crosskd-pkd-i3, crosskd-i3-cls, none-s1, ...); default: every missing run",
    )
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(os.environ.get("CROSSKD_BENCH_WORK", "runs/bench/kd_effect")),
        help="run folders and checkpoints (large; not committed)",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)

    args.results.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    context = {
        "title": f"{args.preset} on {args.data}",
        "preset": args.preset,
        "data": args.data,
        "teacher_label": f"of {args.preset}",
    }
    if not args.report_only:
        run_missing(args)
    summary = write_report(args.results, args.results, context)
    print((args.results / "kd_effect.md").read_text())
    if not summary["rows"]:
        print("No student results yet.")


def run_missing(args: argparse.Namespace) -> None:
    """Train and evaluate every selected run whose result file does not exist yet."""
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    sets = [x for item in args.overrides for x in ("--set", item)]
    log = args.work / "kd_effect.log"
    from crosskd_cli.distill.preset_checks import load_preset

    pair = load_preset(args.preset)
    teacher_dir = args.work / "teacher"
    checkpoint = teacher_dir / "best.safetensors"
    teacher_file = args.results / "teacher.json"
    if not only or "teacher" in only or not checkpoint.is_file():
        train(
            "teacher",
            teacher_dir,
            ["--preset", pair.teacher.preset, "--data", args.data, *sets],
            log,
        )
    teacher_sha = digest(checkpoint)  # students record it: a retrained teacher shows up
    recorded = json.loads(teacher_file.read_text()) if teacher_file.is_file() else {}
    if recorded.get("checkpoint_sha256") != teacher_sha:
        write_result(
            teacher_file,
            {
                "role": "teacher",
                "preset": pair.teacher.preset,
                "data": args.data,
                "metrics": _metrics(evaluate(checkpoint, log)),
                "train_seconds": round(_recorded_seconds(teacher_dir), 1),
                "checkpoint_sha256": teacher_sha,
                "machine": machine(),
                "date": time.strftime("%Y-%m-%d"),
            },
        )
    for run in plan(args.seeds):
        if only and not ({run.group, run.name, run.method} & only):
            continue
        result_path = args.results / f"{run.name}.json"
        if result_path.is_file():
            continue
        run_dir = args.work / run.name
        distill_args = [
            "--preset", args.preset, "--data", args.data,
            "--teacher", str(teacher_dir / "best.safetensors"),
            "--method", run.method, "--set", f"train.seed={run.seed}", *sets,
            *(x for item in KD_ON[run.kd_on] for x in ("--set", item)),
        ]  # fmt: skip
        if run.cross_index is not None:
            distill_args += ["--cross-index", str(run.cross_index)]
        seconds = train("distill", run_dir, distill_args, log)
        metrics = _metrics(evaluate(run_dir / "best.safetensors", log))
        write_result(
            result_path,
            {
                "role": "student",
                "label": label_of(run.method, run.cross_index, run.kd_on),
                "method": run.method,
                "cross_index": run.cross_index,
                "kd_on": run.kd_on,
                "seed": run.seed,
                "preset": args.preset,
                "data": args.data,
                "overrides": args.overrides,
                "metrics": metrics,
                "train_seconds": round(seconds, 1),
                "teacher_sha256": teacher_sha,
                "machine": machine(),
                "date": time.strftime("%Y-%m-%d"),
            },
        )
        print(f"{run.name}: AP {metrics['AP']:.1f} in {seconds / 60:.1f} min", flush=True)


def _metrics(report: dict) -> dict:
    return {k: report[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


if __name__ == "__main__":
    main()
