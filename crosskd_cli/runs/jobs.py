"""`teacher` and `distill` jobs: data, models and the step, handed to the one training loop."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from crosskd_cli.checkpoints.format import (
    CheckpointMeta,
    load_checkpoint,
    load_state_into,
    make_meta,
    save_checkpoint,
)
from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.config.presets import Preset, to_dict
from crosskd_cli.data import DataSource, DataSplits, build_eval_loader, build_loader, load_splits
from crosskd_cli.distill.distiller import Distiller, export_as_is
from crosskd_cli.distill.kd_terms import resolve_distill
from crosskd_cli.distill.pairing import (
    check_pair,
    describe_teacher,
    tap_widths,
    teacher_identity_problems,
)
from crosskd_cli.distill.prediction_gap import EpochEndFn, PredictionGap
from crosskd_cli.distill.preset_checks import load_preset
from crosskd_cli.engine.accelerator import make_accelerator
from crosskd_cli.engine.devices import eval_shards
from crosskd_cli.engine.state import TrainerState
from crosskd_cli.engine.trainer import Hooks, SaveFn, StepFn, Trainer
from crosskd_cli.errors import CheckpointError, CrossKDError, ModelError
from crosskd_cli.families import build_criterion, get_family
from crosskd_cli.inference.evaluate import evaluate_model, headline, val_evaluator
from crosskd_cli.models import Detector, build_detector
from crosskd_cli.models.fast_step import standard_layout, step_layout, to_train_layout
from crosskd_cli.runs.record import RunRecord, TeacherFile, write_record
from crosskd_cli.storage.files import file_digest, write_json
from crosskd_cli.storage.run_folder import RunDir


@dataclass
class Job:
    """What differs between `teacher` and `distill`; the rest of a run is shared."""

    kind: str  # "teacher" or "student": the kind recorded in the checkpoint
    model: nn.Module  # the module trained: the detector, or the student with its tap adapter
    spec: ModelSpec
    step: StepFn  # step(model, batch) -> {name: loss}
    training: dict[str, Any]  # recorded in the checkpoint's metadata
    record: RunRecord  # config.yaml: the run's inputs besides its preset (preset.yaml)
    watch_zero: tuple[str, ...] = ()  # loss names reported if they stay exactly zero
    export: Callable[[nn.Module], nn.Module] = export_as_is  # `model` -> the detector to save
    # the exported detector -> more columns of an epoch's results row (Fig. 5)
    epoch_columns: EpochEndFn | None = None

    @property
    def command(self) -> str:
        return "teacher" if self.kind == "teacher" else "distill"


def spec_for_data(spec: ModelSpec, splits: DataSplits, console: Console) -> ModelSpec:
    """A detector trained on a data set predicts that data set's classes."""
    warning = splits.class_warning()  # a validation split without some training class
    if warning is not None:
        console.print(f"[bold yellow]Warning:[/] {warning}")
    if spec.num_classes != len(splits.class_names):
        console.print(
            f"[dim]The data has {len(splits.class_names)} classes; the preset's model had "
            f"{spec.num_classes}: training with {len(splits.class_names)}.[/]"
        )
        spec = dataclasses.replace(spec, num_classes=len(splits.class_names))
    return spec


def write_run_record(
    run: RunDir, preset: Preset, job: Job, schedule: dict[str, object] | None = None
) -> None:
    """preset.yaml: the preset as this run resolved it (its model for the data, the family's
    KD weights); config.yaml: its other inputs, the teacher with the sha256 of its file, and
    the lr schedule the run follows."""
    record = job.record
    if record.teacher is not None:
        teacher = TeacherFile(record.teacher.path, file_digest(Path(record.teacher.path)))
        record = dataclasses.replace(record, teacher=teacher)
    write_record(run, record, dataclasses.replace(preset, model=job.spec), schedule)


DROP_TOTALS = ("images", "annotations", "images_used")  # totals, not drops


def drop_reports(splits: DataSplits, trainer: Trainer) -> dict[str, dict[str, int]]:
    """Both splits' `drop_report`s; under several processes each image read counts once."""
    acc = trainer.accelerator

    def merge(flags: Tensor) -> Tensor:
        return acc.reduce(flags.to(acc.device), reduction="sum").cpu()

    merged = merge if acc.num_processes > 1 else None
    return {"train": splits.train.drop_report(merged), "val": splits.val.drop_report(merged)}


def drops_line(reports: dict[str, dict[str, int]]) -> str:
    """One line of what the data lost or had fixed (nonzero counts only)."""
    parts = []
    for split, counts in reports.items():
        kept = {"images_without_boxes"} if split == "val" else set()  # evaluation keeps them
        drops = [
            f"{key.replace('_', ' ')} {n}"
            for key, n in counts.items()
            if n and key not in DROP_TOTALS and key not in kept
        ]
        if drops:
            parts.append(f"{split}: {', '.join(drops)}")
    return "Data dropped or fixed: " + "; ".join(parts) + "." if parts else "Data: nothing dropped."


def checkpoint_saver(
    preset: Preset, data: DataSource, run: RunDir, splits: DataSplits, job: Job, trainer: Trainer
) -> SaveFn:
    """The loop's save_fn: the exported detector, with where the schedule stood."""

    def save(model: nn.Module, name: str, metrics: dict[str, Any]) -> None:
        state = trainer.state
        training = {
            **job.training,
            "epochs_done": state.epoch + 1,
            "iterations": state.iteration,
            "seconds": round(state.wall_time, 1),
            "processes": trainer.accelerator.num_processes,
            "precision": trainer.precision,
        }
        meta = make_meta(
            preset,
            job.spec,
            job.kind,
            class_names=splits.class_names,
            category_ids=splits.category_ids,
            val_data=data.spec,
            training=training,
            metrics=metrics,
        )
        save_checkpoint(run.root / f"{name}.safetensors", job.export(model).state_dict(), meta)

    return save


def in_train_layout(job: Job, device: torch.device) -> Job:
    """The fast step's job: the trained module's weights channels-last where that pays, and
    evaluation, checkpoints and Fig. 5 given the standard layout (`runtime.standard_layout`)."""
    if not to_train_layout(job.model, device):
        return job
    export = job.export
    return dataclasses.replace(job, export=lambda model: standard_layout(export(model)))


def run_job(
    preset: Preset,
    data: DataSource,
    run: RunDir,
    splits: DataSplits,
    job: Job,
    trainer: Trainer,
    *,
    resume: bool,
    console: Console,
) -> TrainerState:
    """The shared part of every run: the record, the loop, evaluation, best/last checkpoints,
    what the data dropped."""
    acc = trainer.accelerator
    if preset.train.fast_step:
        job = in_train_layout(job, acc.device)
    eval_batch = preset.train.eval_batch_size
    val_loader = acc.prepare_data_loader(build_eval_loader(splits.val, batch_size=eval_batch))
    gather = functools.partial(acc.gather_for_metrics, use_gather_object=True)
    main_console = console if trainer.is_main else None
    evaluate = val_evaluator(splits.val, val_loader, job.export, gather, main_console)
    save = checkpoint_saver(preset, data, run, splits, job, trainer)
    train_loader = build_loader(
        splits.train,
        batch_size=preset.train.batch_size,
        shuffle=True,
        num_workers=preset.data.num_workers,
        seed=preset.train.seed,
        drop_last=True,
        portrait=splits.train.portrait() if preset.data.group_by_aspect_ratio else None,
        pin_memory=acc.device.type == "cuda",  # page-locked batches copy to the GPU faster
    )

    def record() -> None:  # on resume too (a longer schedule, a teacher that moved), once loaded
        if acc.is_main_process:
            write_run_record(run, preset, job, trainer.schedule.record())

    columns = job.epoch_columns
    epoch_columns = None if columns is None else (lambda model: columns(job.export(model)))
    hooks = Hooks(job.step, evaluate, save, epoch_columns, record, job.watch_zero)
    state = trainer.fit(job.model, train_loader, hooks, resume=resume)
    drops = drop_reports(splits, trainer)
    if acc.is_main_process:
        write_json(run.metrics, {**state.metrics, "data": drops})
    console.print(f"[dim]{drops_line(drops)}[/]", highlight=False)
    return state


def train_detector(
    preset: Preset,
    data: DataSource,
    run: RunDir,
    *,
    resume: bool,
    backbone_weights: Path | None,
    console: Console,
    resume_hint: str,
) -> TrainerState:
    """`crosskd teacher`: train the preset's detector on the ground truth alone.

    On resume the saved state holds the weights: `backbone_weights` is recorded, not read."""
    splits = load_splits(preset.data, data)
    spec = spec_for_data(preset.model, splits, console)
    trainer = Trainer(make_accelerator(preset.train, run), preset.train, run, console, resume_hint)
    # on resume the state holds the weights, but the frozen stages must be those of the run
    pretrained = backbone_weights is not None
    model = build_detector(
        spec, backbone_weights=None if resume else backbone_weights, pretrained=pretrained
    )
    criterion = build_criterion(spec)
    reduce_mean = trainer.reduce_mean
    layout = step_layout if preset.train.fast_step else (lambda images: images)

    def step(model, batch):
        out = model(layout(batch.images), batch.image_sizes)
        return criterion(out.head, batch.targets, batch.image_sizes, reduce_mean)[0]

    record = RunRecord("teacher", data.spec, backbone_weights=_absolute(backbone_weights))
    job = Job("teacher", model, spec, step, {"command": "teacher"}, record)
    return run_job(preset, data, run, splits, job, trainer, resume=resume, console=console)


def load_teacher(path: Path) -> tuple[Detector, CheckpointMeta]:
    state_dict, meta = load_checkpoint(path)
    teacher = build_detector(meta.model)
    load_state_into(teacher, state_dict, source=str(path))
    return teacher, meta


def check_teacher_identity(
    preset: Preset, meta: CheckpointMeta, path: Path, intended: bool, console: Console
) -> None:
    """Refuse a teacher file that is not the teacher the pair preset names (another backbone
    or head) or that was trained as a student, unless --other-teacher says it is intended."""
    expected, name = None, "the preset's teacher"
    if preset.teacher is not None:
        name = f"the preset's teacher '{preset.teacher.preset}'"
        try:
            expected = load_preset(preset.teacher.preset).model
        except CrossKDError:  # a teacher preset file that is gone: only the kind is checked
            expected = None
    problems = teacher_identity_problems(meta, expected, name)
    if not problems:
        return
    what = f"Teacher {path.name} is not the teacher of preset '{preset.name}': " + "; ".join(
        problems
    )
    if intended:
        console.print(f"[yellow]Note: {what} (--other-teacher: used as asked).[/]")
        return
    raise ModelError(
        what + ".",
        hint="Pass the teacher the preset names, or add --other-teacher if this one is "
        "intended (the cross-head pairing is checked either way).",
    )


@torch.no_grad()
def check_teacher_outputs(teacher: nn.Module, splits: DataSplits, path: Path) -> None:
    """Refuse a teacher whose predictions on the first validation image are not finite (its
    weights are: a run that diverged, or bf16's fault before 0.3): every KD term would be NaN
    and every step skipped. The same image on every process, so all refuse alike."""
    loader = build_eval_loader(splits.val, batch_size=1)
    with torch.random.fork_rng(devices=[]):  # a loader's iterator draws a seed: the student's
        first = next(iter(loader))  # initialisation after this must not move
    batch = (first[0] if isinstance(first, list) else first).to(next(teacher.parameters()).device)
    head = teacher(batch.images, batch.image_sizes).head
    for name, maps in (("class logits", head.cls_logits), ("box predictions", head.box_preds)):
        if not all(torch.isfinite(m).all() for m in maps):
            bad = [n for n, p in teacher.state_dict().items() if not torch.isfinite(p).all()]
            where = f"; its weights hold NaN/inf ({', '.join(bad[:3])})" if bad else ""
            raise CheckpointError(
                f"Teacher {path} predicts non-finite {name} on the first validation image"
                f"{where}: it cannot teach.",
                hint="Use a teacher that trained without diverging (crosskd eval FILE shows its "
                "AP), or train it again.",
            )


def measure_teacher(
    teacher: nn.Module, splits: DataSplits, data: DataSource, batch_size: int, console: Console
) -> float:
    """--eval-teacher: the teacher's AP on this data before training, printed and recorded.
    Under several processes each predicts its share, and all get the whole split's AP."""
    loader, gather = eval_shards(build_eval_loader(splits.val, batch_size=batch_size))
    metrics = evaluate_model(teacher, splits.val, loader, gather=gather)
    console.print(f"[bold]teacher[/] on {data.spec}: {headline(metrics)}")
    return metrics["AP"]


def build_student(
    spec: ModelSpec,
    student_weights: Path | None,
    backbone_weights: Path | None,
    pretrained: bool | None = None,
) -> Detector:
    student = build_detector(spec, backbone_weights=backbone_weights, pretrained=pretrained)
    if student_weights is not None:
        state_dict, _ = load_checkpoint(student_weights)
        load_state_into(student, state_dict, source=str(student_weights))
    return student


def module_to_train(
    distiller: Distiller, student: Detector, teacher: ModelSpec, console: Console
) -> tuple[nn.Module, Callable[[nn.Module], nn.Module]]:
    """The student, with a tap adapter when the taps' widths differ (check_pair made sure
    it was asked for), and the function exporting the student alone."""
    teacher_width, student_width = tap_widths(teacher, student.spec, distiller.cfg.cross_index)
    model, export = distiller.student_module(student, student_width, teacher_width)
    if model is not student:
        console.print(
            f"[dim]Tap adapter: 1x1 convs {student_width} -> {teacher_width} channels per "
            "tower, trained with the student, not exported.[/]"
        )
    return model, export


def distill_student(
    preset: Preset,
    data: DataSource,
    run: RunDir,
    teacher_path: Path,
    *,
    resume: bool,
    student_weights: Path | None,
    backbone_weights: Path | None,
    eval_teacher: bool,
    console: Console,
    resume_hint: str,
    other_teacher: bool = False,
) -> TrainerState:
    """`crosskd distill`: the student learns from the ground truth and the frozen teacher.

    On resume the saved state holds the student: the initial weights are recorded, not read
    (and the teacher is the recorded file, checked by its sha256). `other_teacher`: a teacher
    other than the pair preset's is intended."""
    splits = load_splits(preset.data, data)
    spec = spec_for_data(preset.model, splits, console)
    teacher, teacher_meta = load_teacher(teacher_path)
    # the family's KD weights, recorded
    cfg = resolve_distill(preset.distill, get_family(spec.family).kd_defaults)
    preset = dataclasses.replace(preset, distill=cfg)
    check_pair(teacher_meta, teacher_path.name, spec, splits.val, data.spec, cfg)
    console.print(f"[dim]{describe_teacher(teacher_meta, teacher_path.name)}[/]", highlight=False)
    if not resume:
        check_teacher_identity(preset, teacher_meta, teacher_path, other_teacher, console)
    trainer = Trainer(make_accelerator(preset.train, run), preset.train, run, console, resume_hint)
    teacher = trainer.prepare_frozen(teacher)
    check_teacher_outputs(teacher, splits, teacher_path)
    teacher_ap = teacher_meta.metrics.get("AP")
    if eval_teacher:
        teacher_ap = measure_teacher(teacher, splits, data, preset.train.eval_batch_size, console)
    initial = (None, None) if resume else (student_weights, backbone_weights)
    student = build_student(spec, *initial, pretrained=backbone_weights is not None)
    distiller = Distiller(
        teacher,
        build_criterion(spec),
        cfg,
        trainer.reduce_mean,
        fast=preset.train.fast_step,
    )
    del teacher  # the distiller's now (on the fast path folded in place): one in memory
    model, export = module_to_train(distiller, student, teacher_meta.model, console)
    training = {
        "command": "distill",
        "method": cfg.method,
        "cross_index": cfg.cross_index,
        "teacher": teacher_path.name,
        "teacher_ap": teacher_ap,
        "distill": to_dict(cfg),
    }
    record = RunRecord(
        "distill",
        data.spec,
        teacher=TeacherFile(str(teacher_path.resolve())),  # hashed when written
        backbone_weights=_absolute(backbone_weights),
        student_weights=_absolute(student_weights),
    )
    gap = prediction_gap(preset, distiller, splits, trainer)
    watch = distiller.loss_names()
    job = Job("student", model, spec, distiller.step, training, record, watch, export, gap)
    return run_job(preset, data, run, splits, job, trainer, resume=resume, console=console)


def prediction_gap(
    preset: Preset, distiller: Distiller, splits: DataSplits, trainer: Trainer
) -> EpochEndFn | None:
    """The Fig. 5 measurement at each epoch end (`distill.gap_images`), of the exported
    student (the detector a checkpoint holds); None when it is off."""
    count = preset.distill.gap_images
    if not count:
        return None
    gap = PredictionGap(
        distiller.teacher,
        distiller.criterion,
        splits.val,
        count,
        preset.train.eval_batch_size,
        trainer.accelerator.device,
    )
    return gap


def _absolute(path: Path | None) -> str | None:
    return str(path.expanduser().resolve()) if path is not None else None
