"""`crosskd teacher`: train one detector from a preset on a data set, into a run folder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from crosskd_cli import __version__
from crosskd_cli.checkpoint import CheckpointMeta, save_checkpoint
from crosskd_cli.config import Preset, to_dict
from crosskd_cli.criterion import build_criterion
from crosskd_cli.data import CocoDetection, DataSource, build_loader
from crosskd_cli.engine import Trainer, TrainerState, make_accelerator
from crosskd_cli.evaluate import predict
from crosskd_cli.metrics import coco_metrics
from crosskd_cli.models import build_detector
from crosskd_cli.runs import RunDir, write_config, write_json
from crosskd_cli.specs import ModelSpec


@dataclass
class DataSplits:
    """The two datasets of a run and the class list they share."""

    train: CocoDetection
    val: CocoDetection

    @property
    def class_names(self) -> list[str]:
        return self.val.class_names

    @property
    def category_ids(self) -> list[int]:
        return self.val.category_ids


def load_splits(preset: Preset, data: DataSource) -> DataSplits:
    cfg = preset.data
    if data.train_ann is None or data.train_images is None:
        from crosskd_cli.errors import DataError

        raise DataError(
            f"Data '{data.spec}' has no training split.",
            hint="Give a COCO folder, builtin:shapes, or --train-ann and --train-images.",
        )
    train = CocoDetection(
        data.train_ann,
        data.train_images,
        train=True,
        scale=cfg.scale,
        flip_prob=cfg.flip_prob,
        skip_bad_images=cfg.skip_bad_images,
    )
    val = CocoDetection(
        data.val_ann,
        data.val_images,
        train=False,
        scale=cfg.scale,
        skip_bad_images=cfg.skip_bad_images,
    )
    return DataSplits(train, val)


def spec_for_data(spec: ModelSpec, splits: DataSplits, console: Console) -> ModelSpec:
    """A detector trained on a data set predicts that data set's classes."""
    if spec.num_classes != len(splits.class_names):
        console.print(
            f"[dim]The data has {len(splits.class_names)} classes; the preset's model had "
            f"{spec.num_classes}: training with {len(splits.class_names)}.[/]"
        )
        spec = dataclasses.replace(spec, num_classes=len(splits.class_names))
    return spec


def checkpoint_meta(
    preset: Preset,
    spec: ModelSpec,
    splits: DataSplits,
    data: DataSource,
    kind: str,
    training: dict[str, Any],
    metrics: dict[str, Any],
) -> CheckpointMeta:
    return CheckpointMeta(
        model=spec,
        class_names=list(splits.class_names),
        category_ids=list(splits.category_ids),
        preset=preset.name,
        val_data=data.spec,
        image_scale=tuple(preset.data.scale),
        eval_batch_size=preset.train.eval_batch_size,
        crosskd_version=__version__,
        kind=kind,
        training=training,
        metrics=metrics,
    )


def make_evaluate_fn(trainer: Trainer, splits: DataSplits, batch_size: int, console: Console):
    """Evaluation on the validation split, sharded over processes and gathered back."""
    acc = trainer.accelerator
    loader = acc.prepare_data_loader(
        build_loader(splits.val, batch_size=batch_size, shuffle=False, num_workers=0)
    )

    def evaluate(model) -> dict[str, Any]:
        results = predict(
            model,
            loader,
            splits.category_ids,
            gather=lambda objs: acc.gather_for_metrics(objs, use_gather_object=True),
        )
        metrics = coco_metrics(splits.val.coco, results)
        if trainer.is_main:
            console.print(
                "[bold]val[/] " + "  ".join(f"{k} {metrics[k]:.1f}" for k in ("AP", "AP50", "AP75"))
            )
        return metrics

    return evaluate


def train_detector(
    preset: Preset,
    data: DataSource,
    run: RunDir,
    *,
    resume: bool,
    backbone_weights: Path | None,
    console: Console,
    resume_hint: str,
    config_extra: dict[str, Any] | None = None,
) -> tuple[TrainerState, RunDir]:
    """Train the preset's detector with the shared loop; writes best/last checkpoints."""
    splits = load_splits(preset, data)
    spec = spec_for_data(preset.model, splits, console)
    accelerator = make_accelerator(preset.train)
    model = build_detector(spec, backbone_weights=backbone_weights)
    criterion = build_criterion(spec)
    reduce_mean = lambda t: accelerator.reduce(t, reduction="mean")  # noqa: E731
    trainer = Trainer(accelerator, preset.train, run, console)
    trainer.resume_hint = resume_hint
    if accelerator.is_main_process and not resume:
        config = {"command": "teacher", "data": data.spec, **(config_extra or {})}
        config["preset"] = to_dict(dataclasses.replace(preset, model=spec))
        write_config(run, config)

    def step(model, batch):
        out = model(batch.images, batch.image_sizes)
        losses, _, _ = criterion(out.head, batch.targets, batch.image_sizes, reduce_mean)
        return losses

    def save(model, name, metrics):
        training = {
            "epochs_done": trainer.state.epoch + 1,
            "iterations": trainer.state.iteration,
            "seconds": round(trainer.state.wall_time, 1),
            "processes": accelerator.num_processes,
        }
        meta = checkpoint_meta(preset, spec, splits, data, "teacher", training, metrics)
        save_checkpoint(run.root / f"{name}.safetensors", model.state_dict(), meta)

    train_loader = build_loader(
        splits.train,
        batch_size=preset.train.batch_size,
        shuffle=True,
        num_workers=preset.data.num_workers,
        seed=preset.train.seed,
        drop_last=True,
    )
    evaluate = make_evaluate_fn(trainer, splits, preset.train.eval_batch_size, console)
    state = trainer.fit(model, step, train_loader, evaluate, save, resume=resume)
    if accelerator.is_main_process:
        write_json(run.metrics, state.metrics)
    return state, run
