"""How fast is crosskd? Training steps, teacher forward, inference, peers, data and metrics.

Every timed figure is the median of --repeats runs after --warmup untimed ones, and also
given in *yardsticks*: the time of torchvision's `resnet50()` eval forward on a
2x3x512x512 tensor (fp32, no grad) timed right before each run of the figure, so a ratio
means the same thing on a busy or a quiet machine (the median of the per-run ratios). The
sections:

- `distill`: one SGD training step (forward, assignment, losses, backward, fused SGD) of
  the distillation workload of the CrossKD paper's ablations, GFL ResNet-50 teacher ->
  GFL ResNet-18 student (stem and layer1 frozen, BN in eval mode, as with ImageNet weights),
  80 classes, --batch images of --size with three boxes each: `crosskd` at every cross
  index, `mimic`, `pkd`, `none` (the student alone) and the teacher's no-grad forward, in
  fp32 and each mixed precision the device runs natively (bf16 on a CPU with AVX512-BF16 or
  AMX; fp16 and bf16 on a GPU). Each also gets its peak memory: the peak RSS (GPU: peak
  allocated) of a fresh process that builds the models and runs only that step.
- `floor`: the compute floor of each `distill` step on this machine: its multiply-accumulates
  (convolutions and matrix products, forward and backward, counted by torch's
  `FlopCounterMode`) at the best rate this machine's convolutions reach (the head's own 3x3
  256->256 convolution on the step's largest FPN level, forward and backward, in each
  precision), in yardsticks, and each measured step as a multiple of its floor. No code that
  keeps the networks' arithmetic can run a step below its floor: it only leaves out what
  is not a convolution or a matrix product (norms, activations, losses, the optimizer).
- `inference`: images/second of the student and the teacher (forward + post-processing,
  fp32, as `crosskd eval` runs) at --size and at 1333x800.
- `peers`: our RetinaNet-R50 and FCOS-R50 beside torchvision's `retinanet_resnet50_fpn` and
  `fcos_resnet50_fpn`: random weights, all layers trained (what both build without weights),
  the same images and batch, torchvision's internal resize pinned to the image size
  (`min_size`/`max_size`); training step and inference.
- `data`: images/second of the training data pipeline on COCO-size JPEGs (decode, resize to
  1333x800, flip, collate, then the model's normalisation) in one process (what one loader
  worker delivers), against the images/second the fastest CrossKD step consumes at 1333x800.
- `metric`: seconds of the COCO metric over 5000 images x 100 detections, per backend.

    python -m benchmarks.speed                              # everything, CPU, a few minutes
    python -m benchmarks.speed --sections distill --repeats 9
    python -m benchmarks.speed --device cuda --size 1333x800 --batch 2
    python -m benchmarks.speed --json speed.json --markdown speed.md

Prints a table per section and writes every figure to --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import machine
from crosskd_cli.config.presets import DistillConfig, TrainConfig
from crosskd_cli.detection.structures import Batch, Target
from crosskd_cli.distill.distiller import Distiller
from crosskd_cli.distill.kd_terms import resolve_distill
from crosskd_cli.distill.preset_checks import load_preset
from crosskd_cli.engine.accelerator import native_bf16
from crosskd_cli.engine.devices import resolve_device
from crosskd_cli.engine.log_lines import peak_memory_mb
from crosskd_cli.engine.optim import build_optimizer
from crosskd_cli.families import build_criterion, get_family
from crosskd_cli.inference.postprocess import postprocess
from crosskd_cli.models import build_detector
from crosskd_cli.models.fast_step import (
    runtime_teacher,
    standard_layout,
    step_layout,
    to_train_layout,
    with_conv_weights_in,
)

SECTIONS = ("distill", "floor", "inference", "peers", "data", "metric")
METHODS = ("crosskd@0", "crosskd@1", "crosskd@2", "crosskd@3", "crosskd@4", "mimic", "pkd",
           "none", "teacher-forward")  # fmt: skip
COCO_SIZE = (800, 1333)  # (h, w): MMDetection's test scale, 1333x800
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_BASE: dict[str, float] = {}  # "method precision" -> MB the imports alone took
STEP_MACS: dict[str, float] = {}  # method -> multiply-accumulates of one training step
CONV_MACS: dict[str, float] = {}  # precision -> MACs of the best convolution's figure
BEST_CONV = "best conv: head 3x3 256->256, largest level, fwd+bwd"


@dataclass
class Figure:
    """One timed row: median seconds, median ratio to the interleaved yardstick."""

    section: str
    name: str
    precision: str = "fp32"
    seconds: float = float("nan")
    yardsticks: float = float("nan")
    images_per_s: float = float("nan")
    peak_mb: float | None = None
    runs: list[float] = field(default_factory=list)  # seconds of each timed run

    def row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Clock:
    """Times a function against the yardstick, interleaved: yardstick, figure, yardstick..."""

    def __init__(self, device: torch.device, warmup: int, repeats: int, size: int = 512) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.model = torchvision.models.resnet50().eval().to(device)
        self.input = torch.randn(2, 3, size, size, device=device)
        self.yardstick()  # its own warm-up

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def seconds(self, fn: Callable[[], Any]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def yardstick(self) -> None:
        with torch.no_grad():
            self.model(self.input)

    def time(self, fn: Callable[[], Any], repeats: int | None = None) -> tuple[float, float, list]:
        """(median seconds, median ratio to the yardstick, every run's seconds)."""
        for _ in range(self.warmup):
            fn()
        runs, ratios = [], []
        for _ in range(repeats or self.repeats):
            yard = self.seconds(self.yardstick)
            took = self.seconds(fn)
            runs.append(took)
            ratios.append(took / yard)
        return statistics.median(runs), statistics.median(ratios), runs


# ----------------------------------------------------------------------- the workload


def random_batch(batch: int, size: tuple[int, int], device: torch.device, seed: int = 0) -> Batch:
    """`batch` random-pixel images of (h, w) `size`, three boxes each (classes 1, 5, 7)."""
    height, width = size
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=gen)
    rel = torch.tensor([[0.02, 0.04, 0.4, 0.43], [0.2, 0.2, 0.6, 0.8], [0.1, 0.6, 0.95, 0.98]])
    boxes = rel * torch.tensor([width, height, width, height])
    labels = torch.tensor([1, 5, 7])
    targets = [Target(boxes, labels, k, size, (1.0, 1.0)) for k in range(batch)]
    return Batch(images, [size] * batch, targets).to(device)


@dataclass
class Workload:
    teacher: str = "gfl-r50"
    student: str = "gfl-r18"
    size: tuple[int, int] = (512, 512)
    batch: int = 2
    fast: bool = True  # the distiller's fast path (crosskd_cli.models.fast_step), as training runs


def build_step(
    work: Workload, method: str, precision: str, device: torch.device
) -> Callable[[], Any]:
    """One training step of `method` ("crosskd@3", "none", "teacher-forward", ...) on the
    workload, ready to call: the models, criterion, optimizer and batch are built once."""
    torch.manual_seed(0)
    student_spec = load_preset(work.student, []).model
    batch = random_batch(work.batch, work.size, device)
    autocast = torch.autocast(device.type, dtype=DTYPES.get(precision), enabled=precision != "fp32")
    teacher = None
    if method != "none":
        teacher = build_detector(load_preset(work.teacher, []).model).requires_grad_(False)
        teacher = teacher.eval().to(device)
    if method == "teacher-forward":  # what a distill step runs of the teacher
        run_teacher = runtime_teacher(teacher) if work.fast else teacher
        if work.fast and precision != "fp32":
            run_teacher = with_conv_weights_in(run_teacher, DTYPES[precision])
        images = step_layout(batch.images) if work.fast else batch.images

        def forward() -> None:
            with torch.no_grad(), autocast:
                run_teacher(images, batch.image_sizes)

        return forward
    name, _, index = method.partition("@")
    cfg = DistillConfig(method=name, cross_index=int(index or 3))
    cfg = resolve_distill(cfg, get_family(student_spec.family).kd_defaults)
    student = build_detector(student_spec, pretrained=True).to(device).train()
    if work.fast:  # as a training run stores it
        to_train_layout(student, device)
    if teacher is None:  # `none` never runs a teacher: nothing is built for it
        teacher = SimpleNamespace(spec=student_spec)
    distiller = Distiller(teacher, build_criterion(student_spec), cfg, fast=work.fast)
    del teacher  # the distiller holds the copy it runs
    optimizer = build_optimizer(student, TrainConfig(), 1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step() -> None:
        with autocast:
            losses = distiller.step(student, batch)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def child_memory(args: argparse.Namespace) -> None:
    """--child METHOD:PRECISION: build, run two steps, print the peak memory as JSON."""
    method, precision = args.child.split(":")
    device = resolve_device(args.device)
    imported = peak_memory_mb(device)  # torch's own libraries (a CUDA build: several 100 MB)
    step = build_step(workload(args), method, precision, device)
    for _ in range(2):
        step()
    print(json.dumps({"peak_mb": peak_memory_mb(device), "imported_mb": imported}))


def measure_memory(args: argparse.Namespace, method: str, precision: str) -> float | None:
    """Peak memory of a fresh process that builds the models and runs two steps (MB): its
    peak RSS on a CPU (torch's libraries included; the JSON keeps what the imports alone
    took), the allocator's peak on a GPU."""
    command = [sys.executable, "-m", "benchmarks.speed", "--child", f"{method}:{precision}",
               *common_flags(args)]  # fmt: skip
    root = Path(__file__).resolve().parent.parent  # `benchmarks` importable whatever the cwd
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=root)
    if done.returncode != 0:
        print(f"  (memory of {method} {precision} not measured: {done.stderr.strip()[-300:]})")
        return None
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    MEMORY_BASE[f"{method} {precision}"] = measured["imported_mb"]
    return measured["peak_mb"]


def selected_methods(args: argparse.Namespace) -> list[str]:
    return args.methods.split(",") if args.methods else list(METHODS)


def precisions(args: argparse.Namespace, device: torch.device) -> list[str]:
    if args.precisions:
        return args.precisions.split(",")
    if device.type == "cuda":
        return ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    return ["fp32"] + (["bf16"] if native_bf16("cpu") else [])


def distill_section(args: argparse.Namespace, clock: Clock, device: torch.device) -> list[Figure]:
    work = workload(args)
    figures = []
    methods = selected_methods(args)
    for precision in precisions(args, device):
        for method in methods:
            step = build_step(work, method, precision, device)
            seconds, ratio, runs = clock.time(step)
            del step
            peak = None if args.no_memory else measure_memory(args, method, precision)
            figure = Figure("distill", method, precision, seconds, ratio, work.batch / seconds,
                            peak, runs)  # fmt: skip
            figures.append(figure)
            show(figure)
    return figures


def network_ratios(figures: list[Figure]) -> dict[str, float]:
    """Each KD step / (the student's step + the teacher's forward), per precision."""
    by = {(f.precision, f.name): f.yardsticks for f in figures if f.section == "distill"}
    ratios = {}
    for (precision, name), value in by.items():
        base = [by.get((precision, "none")), by.get((precision, "teacher-forward"))]
        if name not in ("none", "teacher-forward") and None not in base:
            ratios[f"{name} {precision}"] = value / sum(base)
    return ratios


def memory_ratios(figures: list[Figure]) -> dict[str, float]:
    """Each step's peak memory / the student-only step's, per precision."""
    peaks = {(f.precision, f.name): f.peak_mb for f in figures if f.section == "distill"}
    return {
        f"{name} {precision}": peak / peaks[(precision, "none")]
        for (precision, name), peak in peaks.items()
        if peak and peaks.get((precision, "none")) and name != "none"
    }


# ----------------------------------------------------------------------- floor


def step_macs(work: Workload, method: str, device: torch.device) -> float:
    """Multiply-accumulates of one training step of `method` (convolutions and matrix
    products, forward and backward: torch's FLOP count / 2); the same in every precision."""
    step = build_step(work, method, "fp32", device)
    step()  # the optimizer's state exists from here on, as in a timed step
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 2


def best_conv(work: Workload, precision: str, device: torch.device):
    """(MACs, step) of this machine's best case: the head's 3x3 256->256 convolution on the
    workload's largest FPN level (stride 8), forward, then backward to its input and weight
    from a given gradient, in the layout the training step uses: the convolution and nothing
    else (no copy or reduction around it)."""
    height, width = work.size
    shape = (work.batch, 256, -(-height // 8), -(-width // 8))
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES.get(precision, torch.float32)
    x = step_layout(torch.randn(shape, generator=gen).to(device, dtype)).requires_grad_(True)
    grad = step_layout(torch.randn(shape, generator=gen).to(device, dtype))
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(device, dtype)
    if work.fast:
        to_train_layout(conv, device)

    def forward_backward() -> None:
        conv(x).backward(grad)
        conv.weight.grad = x.grad = None

    macs = 3 * 256 * 256 * 9 * shape[0] * shape[2] * shape[3]  # forward, input and weight grads
    return macs, forward_backward


def floor_section(args: argparse.Namespace, clock: Clock, device: torch.device) -> list[Figure]:
    """The best convolution's figure per precision; fills STEP_MACS and CONV_MACS."""
    work = workload(args)
    figures = []
    methods = selected_methods(args)
    for method in methods:
        STEP_MACS[method] = step_macs(work, method, device)
    for precision in precisions(args, device):
        macs, run = best_conv(work, precision, device)
        seconds, ratio, runs = clock.time(run)
        figure = Figure("floor", BEST_CONV, precision, seconds, ratio, runs=runs)
        CONV_MACS[precision] = macs
        figures.append(figure)
        show(figure)
    return figures


def floor_ratios(figures: list[Figure]) -> dict[str, dict[str, float]]:
    """Per step and precision: GMACs, the floor in yardsticks, and measured / floor."""
    best = {f.precision: f for f in figures if f.section == "floor"}
    gmacs, floors, over = {}, {}, {}
    for f in figures:
        if f.section != "distill" or f.name not in STEP_MACS or f.precision not in best:
            continue
        key = f"{f.name} {f.precision}"
        macs_per_yardstick = CONV_MACS[f.precision] / best[f.precision].yardsticks
        gmacs[key] = STEP_MACS[f.name] / 1e9
        floors[key] = STEP_MACS[f.name] / macs_per_yardstick
        over[key] = f.yardsticks / floors[key]
    for precision, f in best.items():
        gmacs[f"{BEST_CONV} {precision}, GMAC/s"] = CONV_MACS[precision] / f.seconds / 1e9
    return {
        "GMAC per step (and the best convolution's GMAC/s)": gmacs,
        "compute floor, yardsticks (MACs at the best convolution's rate)": floors,
        "measured step / its compute floor": over,
    }


# ----------------------------------------------------------------------- inference


def inference_section(args: argparse.Namespace, clock: Clock, device: torch.device) -> list[Figure]:
    figures = []
    for preset in (args.student, args.teacher):
        spec = load_preset(preset, []).model
        torch.manual_seed(0)
        model = build_detector(spec).eval().to(device)  # as `crosskd eval` runs it
        for size, batch in ((args.size, args.batch), (COCO_SIZE, 1)):
            images = random_batch(batch, size, device)

            def infer(model=model, images=images, spec=spec) -> None:
                with torch.inference_mode():
                    out = model(images.images, images.image_sizes)
                    postprocess(out.head, images.image_sizes, spec)

            seconds, ratio, runs = clock.time(infer, args.slow_repeats)
            name = f"{preset} {size[1]}x{size[0]} batch {batch}"
            figure = Figure("inference", name, "fp32", seconds, ratio, batch / seconds, None, runs)
            figures.append(figure)
            show(figure)
    return figures


# ----------------------------------------------------------------------- peers


def ours_peer(preset: str, batch: Batch, device: torch.device, fast: bool):
    spec = load_preset(preset, []).model
    spec = dataclasses.replace(spec, num_classes=80)
    torch.manual_seed(0)
    model = build_detector(spec).to(device)  # random weights: everything trains, BN too
    images = step_layout(batch.images) if fast else batch.images  # as `crosskd teacher` does
    if fast:
        to_train_layout(model, device)
    inference = standard_layout(model)  # as `crosskd eval` loads a checkpoint
    criterion = build_criterion(spec)
    optimizer = build_optimizer(model, TrainConfig(), 1e-4)

    def train() -> None:
        model.train()
        out = model(images, batch.image_sizes)
        losses = criterion(out.head, batch.targets, batch.image_sizes)[0]
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer() -> None:
        inference.eval()
        with torch.inference_mode():
            out = inference(batch.images, batch.image_sizes)
            postprocess(out.head, batch.image_sizes, spec)

    return train, infer


def torchvision_peer(name: str, batch: Batch, device: torch.device):
    height, width = batch.image_sizes[0]
    build = getattr(torchvision.models.detection, name)
    torch.manual_seed(0)
    model = build(
        weights=None,
        weights_backbone=None,
        num_classes=80,
        min_size=min(height, width),
        max_size=max(height, width),
    ).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4, fused=True)
    images = [image.float() / 255 for image in batch.images]
    targets = [{"boxes": t.boxes, "labels": t.labels} for t in batch.targets]

    def train() -> None:
        model.train()
        losses = model(images, targets)
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            model(images)

    return train, infer


PEERS = (("retinanet", "retinanet-r50", "retinanet_resnet50_fpn"),
         ("fcos", "fcos-r50-caffe-ms-2x", "fcos_resnet50_fpn"))  # fmt: skip


def peers_section(args: argparse.Namespace, clock: Clock, device: torch.device) -> list[Figure]:
    figures = []
    batch = random_batch(args.batch, args.size, device)
    for family, preset, tv_name in PEERS:
        for who, (train, infer) in (
            ("crosskd", ours_peer(preset, batch, device, not args.no_fast)),
            ("torchvision", torchvision_peer(tv_name, batch, device)),
        ):
            for what, fn in (("train step", train), ("inference", infer)):
                seconds, ratio, runs = clock.time(fn)
                name = f"{family} {who} {what}"
                figure = Figure("peers", name, "fp32", seconds, ratio, args.batch / seconds,
                                None, runs)  # fmt: skip
                figures.append(figure)
                show(figure)
    return figures


def peer_ratios(figures: list[Figure]) -> dict[str, float]:
    """ours / torchvision's, per family and task (<= 1: ours is no slower)."""
    by = {f.name: f.yardsticks for f in figures if f.section == "peers"}
    ratios = {}
    for family, _, _ in PEERS:
        for what in ("train step", "inference"):
            ours, theirs = (
                by.get(f"{family} crosskd {what}"),
                by.get(f"{family} torchvision {what}"),
            )
            if ours and theirs:
                ratios[f"{family} {what}"] = ours / theirs
    return ratios


# ----------------------------------------------------------------------- data


def write_jpegs(root: Path, count: int) -> Path:
    """A COCO-layout train split of `count` 640x480 JPEGs (COCO's typical size), three boxes
    each, with smooth content plus noise so they decode like photos, not like flat colour."""
    from PIL import Image

    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    images, annotations = [], []
    for k in range(count):
        base = np.stack([(xx * (k + 1)) % 256, (yy * 3) % 256, (xx + yy) % 256], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "train2017" / f"{k}.jpg", quality=90)
        images.append({"id": k + 1, "file_name": f"{k}.jpg", "width": 640, "height": 480})
        for j, box in enumerate(([20, 30, 200, 150], [300, 100, 250, 300], [50, 250, 100, 80])):
            annotations.append({"id": 3 * k + j + 1, "image_id": k + 1, "category_id": j + 1,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})  # fmt: skip
    categories = [{"id": j + 1, "name": f"class{j}"} for j in range(3)]
    payload = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(payload))
    return root


def data_section(args: argparse.Namespace, clock: Clock, device: torch.device) -> list[Figure]:
    from crosskd_cli.data import CocoDetection, build_loader

    figures = []
    spec = load_preset(args.student, []).model
    normalizer = build_detector(spec).to(device)
    with tempfile.TemporaryDirectory(prefix="crosskd-speed-") as tmp:
        root = write_jpegs(Path(tmp), args.data_images)
        dataset = CocoDetection(
            root / "annotations" / "instances_train2017.json",
            root / "train2017",
            train=True,
            scale=(1333, 800),
        )
        for workers in sorted({0, *args.data_workers}):
            loader = build_loader(dataset, batch_size=args.batch, shuffle=True,
                                  num_workers=workers, drop_last=True)  # fmt: skip

            def load_all(loader=loader) -> None:
                for batch in loader:
                    batch = batch.to(device)
                    normalizer.normalize(batch.images, batch.image_sizes)

            seconds, ratio, runs = clock.time(load_all, args.slow_repeats)
            images = len(loader) * args.batch
            name = f"{images} JPEGs 640x480 -> 1333x800, " + (
                "in the training process" if workers == 0 else f"{workers} workers"
            )
            figure = Figure("data", name, "fp32", seconds, ratio, images / seconds, None, runs)
            figures.append(figure)
            show(figure)
    if args.no_consumer:
        return figures
    precision = precisions(args, device)[-1]  # the fastest step consumes the most
    work = dataclasses.replace(workload(args), size=COCO_SIZE)
    step = build_step(work, "crosskd@3", precision, device)
    seconds, ratio, runs = clock.time(step, args.slow_repeats)
    name = "consumed by the crosskd@3 step at 1333x800"
    figure = Figure("data", name, precision, seconds, ratio, work.batch / seconds, None, runs)
    figures.append(figure)
    show(figure)
    return figures


# ----------------------------------------------------------------------- metric


def metric_section(args: argparse.Namespace, clock: Clock) -> list[Figure]:
    """COCO bbox metrics of --metric-images x 100 detections, 80 classes, each backend."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    from crosskd_cli.inference.metrics import BACKENDS, coco_metrics

    rng = np.random.default_rng(0)
    count = args.metric_images
    images = [{"id": k + 1, "width": 640, "height": 480, "file_name": f"{k}.jpg"}
              for k in range(count)]  # fmt: skip
    annotations, results = [], []
    for image in images:
        for _ in range(7):  # COCO val's mean
            x, y = rng.uniform(0, 500), rng.uniform(0, 350)
            w, h = rng.uniform(8, 140), rng.uniform(8, 130)
            cat = int(rng.integers(1, 81))
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"],
                                "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": 0})  # fmt: skip
        boxes = rng.uniform(0, 400, (100, 2))
        sides = rng.uniform(8, 140, (100, 2))
        for (x, y), (w, h), cat, score in zip(
            boxes, sides, rng.integers(1, 81, 100), rng.uniform(0.05, 1, 100), strict=True
        ):
            results.append({"image_id": image["id"], "category_id": int(cat),
                            "bbox": [x, y, w, h], "score": float(score)})  # fmt: skip
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": c, "name": str(c)} for c in range(1, 81)]}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    figures = []
    saved_warmup, clock.warmup = clock.warmup, 0  # one run is long enough to be steady
    for backend in BACKENDS:
        seconds, ratio, runs = clock.time(
            lambda backend=backend: coco_metrics(gt, results, backend=backend),
            max(1, min(args.slow_repeats, 2)),
        )
        name = f"{count} images x 100 detections, {backend}"
        figure = Figure("metric", name, "fp32", seconds, ratio, count / seconds, None, runs)
        figures.append(figure)
        show(figure)
    clock.warmup = saved_warmup
    return figures


# ----------------------------------------------------------------------- report


def show(figure: Figure) -> None:
    peak = f"{figure.peak_mb:8.0f} MB" if figure.peak_mb is not None else ""
    print(
        f"  {figure.section:9} {figure.name:48} {figure.precision:5} {figure.seconds:8.3f} s "
        f"{figure.yardsticks:6.2f} yardsticks {figure.images_per_s:8.2f} img/s {peak}",
        flush=True,
    )


def markdown(figures: list[Figure], extra: dict[str, dict[str, float]]) -> str:
    lines = []
    for section in SECTIONS:
        rows = [f for f in figures if f.section == section]
        if not rows:
            continue
        lines += [f"\n### {section}\n", "| figure | precision | seconds | yardsticks | images/s "
                  "| peak memory |", "|---|---|---|---|---|---|"]  # fmt: skip
        for f in rows:
            peak = f"{f.peak_mb:.0f} MB" if f.peak_mb is not None else ""
            lines.append(f"| {f.name} | {f.precision} | {f.seconds:.3f} | {f.yardsticks:.2f} | "
                         f"{f.images_per_s:.2f} | {peak} |")  # fmt: skip
    for title, ratios in extra.items():
        if ratios:
            lines += [f"\n### {title}\n", "| | value |", "|---|---|"]
            lines += [f"| {k} | {v:.3f} |" for k, v in ratios.items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- command line


def parse_size(text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '1333x800' (w x h) -> (800, 1333) as (h, w)."""
    width, _, height = text.partition("x")
    return (int(height or width), int(width))


def workload(args: argparse.Namespace) -> Workload:
    return Workload(args.teacher, args.student, args.size, args.batch, not args.no_fast)


def common_flags(args: argparse.Namespace) -> list[str]:
    """The flags a memory child needs to rebuild the same workload."""
    height, width = args.size
    flags = ["--device", args.device, "--teacher", args.teacher, "--student", args.student,
             "--size", f"{width}x{height}", "--batch", str(args.batch)]  # fmt: skip
    if args.threads:
        flags += ["--threads", str(args.threads)]
    return flags + (["--no-fast"] if args.no_fast else [])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--size", type=parse_size, default=(512, 512), help="512 or WxH (1333x800)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--teacher", default="gfl-r50", help="teacher preset")
    p.add_argument("--student", default="gfl-r18", help="student preset")
    p.add_argument("--methods", default=None, help=f"subset of {','.join(METHODS)}")
    p.add_argument("--precisions", default=None, help="fp32,bf16,fp16 (default: native ones)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--slow-repeats", type=int, default=3, help="repeats of the long figures")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--no-fast", action="store_true", help="without crosskd_cli.models.fast_step")
    p.add_argument("--data-images", type=int, default=32)
    p.add_argument("--data-workers", type=lambda s: [int(w) for w in s.split(",")], default=[2])
    p.add_argument("--no-consumer", action="store_true", help="skip the 1333x800 crosskd step")
    p.add_argument("--metric-images", type=int, default=5000)
    p.add_argument("--yardstick-size", type=int, default=512, help="smoke tests only")
    p.add_argument("--json", type=Path, default=Path("speed.json"))
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child_memory(args)
        return {}
    device = resolve_device(args.device)
    sections = args.sections.split(",")
    info = machine()
    print(f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}, {device}, "
          f"native bf16: {info['native_bf16_cpu']}", flush=True)  # fmt: skip
    clock = Clock(device, args.warmup, args.repeats, args.yardstick_size)
    figures: list[Figure] = []
    if "distill" in sections:
        figures += distill_section(args, clock, device)
    if "floor" in sections:
        figures += floor_section(args, clock, device)
    if "inference" in sections:
        figures += inference_section(args, clock, device)
    if "peers" in sections:
        figures += peers_section(args, clock, device)
    if "data" in sections:
        figures += data_section(args, clock, device)
    if "metric" in sections:
        figures += metric_section(args, clock)
    extra = {
        "KD step / (student step + teacher forward)": network_ratios(figures),
        "ours / torchvision": peer_ratios(figures),
        "peak memory / the student-only step's": memory_ratios(figures),
        "MB after the imports alone (in every peak memory)": MEMORY_BASE,
        **floor_ratios(figures),
    }
    table = markdown(figures, extra)
    print(table)
    report = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
              "figures": [f.row() for f in figures], **extra}  # fmt: skip
    args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        args.markdown.write_text(table)
    return report


if __name__ == "__main__":
    main()
