"""Inference over a data set -> COCO results (original category ids) -> COCO bbox metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from crosskd_cli.checkpoints.format import CheckpointMeta, load_checkpoint, load_state_into
from crosskd_cli.data import ClassList, CocoDetection, DataSource, build_eval_loader
from crosskd_cli.detection.structures import Detections, Target
from crosskd_cli.engine.devices import default_device, eval_shards
from crosskd_cli.errors import RunError
from crosskd_cli.inference.metrics import coco_metrics
from crosskd_cli.inference.postprocess import postprocess, scale_boxes_to_original
from crosskd_cli.models import build_detector

Gather = Callable[[list[Any]], list[Any]]


def to_coco_results(
    dets: Detections, target: Target, category_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """One image's detections in COCO results format, in original image coordinates."""
    boxes = scale_boxes_to_original(dets.boxes, target.scale).cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = dets.scores.cpu().tolist()
    labels = dets.labels.cpu().tolist()
    return [
        {
            "image_id": target.image_id,
            "category_id": category_ids[label],
            "bbox": box,
            "score": score,
        }
        for box, score, label in zip(xywh, scores, labels, strict=True)
    ]


@torch.inference_mode()
def predict(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    category_ids: Sequence[int],
    *,
    gather: Gather | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Run `model` (a Detector) over `loader` and return every detection as a COCO result,
    image by image in ascending image id, whatever the batching or the number of processes.

    The loader yields a `Batch`, or a list of them (`build_eval_loader`: one per padded size).
    `gather` collects per-image results from every process (Accelerate's gather_for_metrics
    with objects), so each process returns the whole list. An image met twice (Accelerate
    repeats batches to give every process as many) counts once; an image of `loader.dataset`
    never met is an error rather than a silently lower AP.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    by_image: dict[int, list[dict[str, Any]]] = {}
    for item in loader:
        per_image: list[tuple[int, list[dict[str, Any]]]] = []
        for batch in item if isinstance(item, list) else [item]:
            batch = batch.to(device)  # a failed read raises here (failures.py)
            out = model(batch.images, batch.image_sizes)
            dets = postprocess(out.head, batch.image_sizes, model.spec)
            per_image += [
                (t.image_id, to_coco_results(d, t, category_ids))
                for d, t in zip(dets, batch.targets, strict=True)
            ]
        if on_batch is not None:
            on_batch(len(per_image))
        if gather is not None:
            per_image = gather(per_image)
        for image_id, image_results in per_image:
            by_image.setdefault(image_id, image_results)
    model.train(was_training)
    _check_every_image_seen(loader, by_image)
    return [result for image_id in sorted(by_image) for result in by_image[image_id]]


def _check_every_image_seen(loader: torch.utils.data.DataLoader, seen: dict[int, Any]) -> None:
    expected = getattr(loader.dataset, "image_ids", None)
    if expected is None:
        return
    missing = [image_id for image_id in expected if image_id not in seen]
    if missing:
        raise RunError(
            f"Evaluation predicted {len(seen)} of {len(expected)} images (image id "
            f"{missing[0]} never reached the model); no metrics were computed from a part.",
            hint="Please report this with the command and the number of processes.",
        )


def evaluate_model(
    model: nn.Module,
    dataset: CocoDetection,
    loader: torch.utils.data.DataLoader,
    *,
    gather: Gather | None = None,
) -> dict[str, Any]:
    """COCO metrics (`coco_metrics`' keys) of `model` on `dataset`, read through `loader`."""
    results = predict(model, loader, dataset.category_ids, gather=gather)
    return coco_metrics(dataset.coco, scorable(results, dataset))


def scorable(results: list[dict[str, Any]], dataset: CocoDetection) -> list[dict[str, Any]]:
    """The results of categories `dataset`'s json lists: a model may predict classes a
    validation json lacks (`CocoDetection.missing_classes`), which have nothing to score."""
    if not dataset.missing_classes:
        return results
    listed = dataset.coco.cats
    return [result for result in results if result["category_id"] in listed]


def headline(metrics: dict[str, Any]) -> str:
    """The three numbers a run prints after each evaluation: 'AP 41.2  AP50 60.1  AP75 44.0'."""
    return "  ".join(f"{key} {metrics[key]:.1f}" for key in ("AP", "AP50", "AP75"))


def val_evaluator(
    dataset: CocoDetection,
    loader: torch.utils.data.DataLoader,
    export: Callable[[nn.Module], nn.Module],
    gather: Gather,
    console: Console | None,
) -> Callable[[nn.Module], dict[str, Any]]:
    """The training loop's evaluate_fn: the exported detector (the student without its
    adapter) on the validation split, sharded by `loader` and gathered by `gather` over the
    processes; `console` (None off the main process) prints the headline."""

    def evaluate(model: nn.Module) -> dict[str, Any]:
        metrics = evaluate_model(export(model), dataset, loader, gather=gather)
        if console is not None:
            console.print("[bold]val[/] " + headline(metrics))
        return metrics

    return evaluate


@dataclass
class EvalReport:
    """What `evaluate_checkpoint` measured, for the command to print and write."""

    meta: CheckpointMeta
    data: DataSource
    num_images: int
    batch_size: int
    device: torch.device
    results: list[dict[str, Any]]  # the scored detections (of the classes the data lists)
    metrics: dict[str, Any]
    class_warning: str | None = None  # the data lacks some of the model's classes


EVAL_CLASSES_HINT = (
    "Evaluate on data labelled with the checkpoint's classes (same category ids and names), "
    "or drop the other categories and their boxes from the validation json."
)


def eval_dataset(checkpoint: Path, meta: CheckpointMeta, data: DataSource) -> CocoDetection:
    """`data`'s validation split labelled with the checkpoint's classes: a category the model
    does not predict is an error naming it; one it predicts that the data lacks, a warning."""
    classes = ClassList(
        tuple(meta.category_ids),
        tuple(meta.class_names),
        f"checkpoint {checkpoint.name}",
        EVAL_CLASSES_HINT,
    )
    return CocoDetection(
        data.val_ann, data.val_images, train=False, scale=meta.image_scale, classes=classes
    )


def evaluate_checkpoint(
    checkpoint: Path,
    data: DataSource,
    *,
    batch_size: int | None = None,
    device: torch.device | None = None,
    backend: str = "faster",
    per_class: bool = False,
    on_batch: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> EvalReport:
    """Rebuild the model from the checkpoint alone and measure it on `data`'s validation split,
    in fp32 on `device` (default: the accelerator, as training's evaluation). Under several
    processes each predicts its share of the images and every one returns the whole report."""
    state_dict, meta = load_checkpoint(checkpoint)
    model = build_detector(meta.model)
    load_state_into(model, state_dict, source=str(checkpoint))
    device = device if device is not None else default_device()
    model.to(device)
    dataset = eval_dataset(checkpoint, meta, data)
    batch_size = batch_size or meta.eval_batch_size
    loader, gather = eval_shards(build_eval_loader(dataset, batch_size=batch_size))
    if on_start is not None:
        on_start(len(dataset))
    results = predict(model, loader, meta.category_ids, gather=gather, on_batch=on_batch)
    results = scorable(results, dataset)
    metrics = coco_metrics(dataset.coco, results, backend=backend, per_class=per_class)
    warning = dataset.missing_classes_warning()
    return EvalReport(meta, data, len(dataset), batch_size, device, results, metrics, warning)
