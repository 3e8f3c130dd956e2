"""`crosskd predict --source IMAGES CKPT [CKPT ...]`: detections on one's own images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from crosskd_cli.commands._common import refuse_to_clobber

console = Console()

DEFAULT_OUT = Path("runs/predict")


def predict(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help="One or more crosskd .safetensors checkpoints; with several, each image is "
            "also drawn side by side, one panel per checkpoint in this order."
        ),
    ],
    source: Annotated[
        Path,
        typer.Option(
            "--source", help="An image file or a folder of images (no annotations needed)."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for the JSON files and pictures. Default: runs/predict, numbered "
            "-2, -3... when it holds files.",
        ),
    ] = None,
    score_thr: Annotated[
        float,
        typer.Option(
            help="Keep detections scoring at least this. 0 keeps every detection `crosskd eval` "
            "scores (up to 100 per image)."
        ),
    ] = 0.3,
    batch_size: Annotated[
        int, typer.Option(help="Images per forward pass, for speed: results do not depend on it.")
    ] = 8,
    device: Annotated[
        str,
        typer.Option(help="auto (the GPU if there is one, else the CPU), cpu, cuda or cuda:N."),
    ] = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace files of an earlier predict in --out.")
    ] = False,
) -> None:
    """Run checkpoints on images and write, per checkpoint, a JSON of detections (original
    category ids, class names, file names; a valid COCO results list) and each image with its
    detections drawn. Preprocessing and post-processing are those of `crosskd eval`.

    Example: crosskd predict --source photos/ runs/teacher/shapes-gfl-r34/best.safetensors
    runs/distill/shapes-gfl-r34-to-r18/best.safetensors
    """
    from crosskd_cli.engine.devices import resolve_device
    from crosskd_cli.engine.progress import progress_bar
    from crosskd_cli.errors import OptionError
    from crosskd_cli.inference.predict import list_images, load_models, outputs, predict_images
    from crosskd_cli.storage.run_folder import check_folder

    if not 0.0 <= score_thr <= 1.0:
        raise OptionError(
            f"--score-thr must be between 0 and 1, got {score_thr}.",
            hint="Scores are probabilities; 0.3 keeps the confident detections.",
        )
    if batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1, got {batch_size}.", hint="Try 8.")
    target = resolve_device(device)
    files = list_images(source)
    if out is None:
        out = free_folder(DEFAULT_OUT)
    check_folder(out)
    models = load_models(checkpoints, target)
    if not overwrite:
        refuse_to_clobber(outputs(models, files, out))
    with progress_bar(console) as bar:
        task = bar.add_task("predict", total=len(files))
        report = predict_images(
            models,
            files,
            out,
            score_thr=score_thr,
            batch_size=batch_size,
            on_image=lambda n: bar.advance(task, n),
        )
    for path, reason in report.skipped:
        console.print(f"[bold yellow]Skipped[/] {path}: {reason}")
    for model, written in zip(report.models, report.written, strict=True):
        console.print(
            f"{model.title}: {len(model.results)} detections (score >= {score_thr}) in "
            f"{report.images} images -> {written} and {out / model.name}/"
        )
    if len(report.models) > 1:
        console.print(f"Side by side: {out / 'side_by_side'}/")


def free_folder(base: Path) -> Path:
    """`base` when it is missing or empty, else the first of base-2, base-3... that is."""
    candidate, number = base, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        number += 1
        candidate = base.with_name(f"{base.name}-{number}")
    return candidate
