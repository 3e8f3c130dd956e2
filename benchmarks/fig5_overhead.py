"""What the Fig. 5 measurement (`distill.gap_images`) adds to a quickstart epoch.

In one process, interleaved so that both see the same machine load: distillation steps of the
quickstart pair (bf16 autocast where the CPU has it, as the quickstart trains) and the
epoch-end measurement on N validation images. Prints the measurement's share of an epoch.

    python -m benchmarks.fig5_overhead TEACHER.safetensors --images 32

TEACHER: a teacher of the pair, e.g. the quickstart's cached one or runs/fig5/teacher's.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
from rich.console import Console

from crosskd_cli.data import build_loader, load_splits, resolve_data
from crosskd_cli.distill.distiller import Distiller
from crosskd_cli.distill.kd_terms import resolve_distill
from crosskd_cli.distill.prediction_gap import PredictionGap
from crosskd_cli.distill.preset_checks import load_preset
from crosskd_cli.engine.accelerator import native_bf16
from crosskd_cli.families import build_criterion, get_family
from crosskd_cli.models import build_detector
from crosskd_cli.runs.jobs import load_teacher, spec_for_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", type=Path)
    parser.add_argument("--preset", default="shapes-gfl-r34-to-r18")
    parser.add_argument("--data", default="builtin:shapes")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    preset = load_preset(args.preset)
    splits = load_splits(preset.data, resolve_data(args.data))
    spec = spec_for_data(preset.model, splits, Console())
    teacher, _ = load_teacher(args.teacher)
    teacher.eval().requires_grad_(False)
    criterion = build_criterion(spec)
    cfg = resolve_distill(preset.distill, get_family(spec.family).kd_defaults)
    distiller = Distiller(teacher, criterion, cfg)
    student = build_detector(spec).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    batch_size = preset.train.batch_size
    loader = build_loader(splits.train, batch_size=batch_size, shuffle=True, seed=0, drop_last=True)
    batches = iter(loader)
    bf16 = preset.train.mixed_precision == "auto" and native_bf16("cpu")
    gap = PredictionGap(
        teacher, criterion, splits.val, args.images, preset.train.eval_batch_size, "cpu"
    )

    def step_seconds(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            batch = next(batches)
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else None
            with autocast or contextlib.nullcontext():
                losses = distiller.step(student, batch)
            sum(losses.values()).backward()
            optimizer.step()
            optimizer.zero_grad()
        return (time.perf_counter() - start) / n

    def gap_seconds() -> float:
        start = time.perf_counter()
        gap(student)
        return time.perf_counter() - start

    step_seconds(2), gap_seconds()  # warm-up
    steps, gaps = [], []
    for _ in range(args.rounds):
        steps.append(step_seconds(5))
        gaps.append(gap_seconds())
    step, measured = sorted(steps)[len(steps) // 2], sorted(gaps)[len(gaps) // 2]
    epoch = step * len(loader)
    print(
        f"{len(loader)} steps of {batch_size} images at {step:.2f} s = {epoch:.0f} s per epoch; "
        f"the measurement on {args.images} images {measured:.1f} s = "
        f"{100 * measured / epoch:.1f}% of an epoch (medians of {args.rounds})"
    )


if __name__ == "__main__":
    main()
