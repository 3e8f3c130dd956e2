"""`crosskd eval CKPT`: COCO bbox metrics of a crosskd checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from crosskd_cli.commands._common import refuse_to_clobber
from crosskd_cli.commands._options import DataOpt, ValAnnOpt, ValImagesOpt

if TYPE_CHECKING:
    import torch

console = Console()


def evaluate(
    checkpoint: Annotated[
        Path, typer.Argument(help="A crosskd .safetensors checkpoint (teacher or student).")
    ],
    data: DataOpt = None,
    val_ann: ValAnnOpt = None,
    val_images: ValImagesOpt = None,
    backend: Annotated[
        str,
        typer.Option(help="COCO evaluator: faster (faster-coco-eval) or pycocotools (official)."),
    ] = "faster",
    per_class: Annotated[
        bool, typer.Option("--per-class", help="Also print AP per class.")
    ] = False,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Images per batch, for speed and memory: the metrics do not depend on it "
            "(each image is padded to its own multiple of 32 and batched only with images of "
            "its padded size, as at batch size 1). Default: the batch size the checkpoint "
            "was evaluated with."
        ),
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            help="Where the model runs: auto (the GPU if there is one, else the CPU), cpu, "
            "cuda or cuda:N. Always in fp32."
        ),
    ] = "auto",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for predictions.json and metrics.json. "
            "Default: eval-<checkpoint name>/ beside the checkpoint.",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace predictions.json/metrics.json in --out.")
    ] = False,
    save_vis: Annotated[
        int,
        typer.Option(
            help="Draw the first N validation images, ground truth beside the predictions "
            "scoring at least 0.3, into OUT/vis/."
        ),
    ] = 0,
) -> None:
    """Evaluate a checkpoint on COCO-format validation data and print the COCO metrics.

    With no --data, evaluates on the validation data recorded in the checkpoint.

    Example: crosskd eval runs/distill/shapes-gfl-r34-to-r18/best.safetensors
    """
    from crosskd_cli.engine.devices import process_state, quiet_unless_main
    from crosskd_cli.engine.progress import progress_bar
    from crosskd_cli.errors import OptionError
    from crosskd_cli.inference.evaluate import evaluate_checkpoint
    from crosskd_cli.inference.metrics import metrics_table, per_class_table
    from crosskd_cli.storage.files import write_json
    from crosskd_cli.storage.run_folder import check_folder

    quiet_unless_main(console)  # under accelerate launch / torchrun: every process predicts
    target = check_eval_options(backend, batch_size, device)
    if save_vis < 0:
        raise OptionError(f"--save-vis must be 0 or more, got {save_vis}.", hint="Try 8.")
    if out is not None:
        check_folder(out)
    source = eval_data_source(checkpoint, data, val_ann, val_images, console)
    out = out or checkpoint.parent / f"eval-{checkpoint.stem}"
    targets = [out / "predictions.json", out / "metrics.json"]
    targets += [out / "vis"] if save_vis else []
    if out != checkpoint.parent / f"eval-{checkpoint.stem}" and not overwrite:
        refuse_to_clobber(targets)
    with progress_bar(console) as bar:
        task = bar.add_task("eval", total=None)
        report = evaluate_checkpoint(
            checkpoint,
            source,
            batch_size=batch_size,
            device=target,
            backend=backend,
            per_class=per_class,
            on_start=lambda n: bar.update(task, total=n),
            on_batch=lambda n: bar.advance(task, n),
        )
    if report.class_warning is not None:
        console.print(f"[bold yellow]Warning:[/] {report.class_warning}")
    if not process_state().is_main_process:
        return  # the main process writes the files of all
    write_json(targets[0], report.results)
    write_json(
        targets[1],
        {
            "checkpoint": str(checkpoint),
            "data": source.spec,
            "backend": backend,
            "batch_size": report.batch_size,
            "device": str(report.device),
            **report.metrics,
        },
    )
    console.print(
        metrics_table(
            report.metrics,
            f"{checkpoint.name} on {source.spec} ({report.num_images} images, {backend}, "
            f"{report.device})",
        )
    )
    if per_class:
        console.print(per_class_table(report.metrics["per_class"]))
    recorded = report.meta.metrics.get("AP")
    if recorded is not None and source.spec == report.meta.val_data:
        console.print(
            f"[dim]AP recorded in the checkpoint: {recorded:.3f}; now: "
            f"{report.metrics['AP']:.3f}.[/]"
        )
    console.print(f"Wrote {targets[0]} and {targets[1]}.")
    if save_vis > 0:
        from crosskd_cli.inference.eval_pictures import eval_pictures

        meta = report.meta
        pictures = eval_pictures(
            source, report.results, meta.category_ids, meta.class_names, save_vis, out
        )
        console.print(f"Drew {len(pictures)} images into {out / 'vis'}/.")


def check_eval_options(backend: str, batch_size: int | None, device: str = "auto") -> torch.device:
    """Refuse option values before any data is generated or any image predicted; returns the
    torch device `device` names."""
    from crosskd_cli.engine.devices import resolve_device
    from crosskd_cli.errors import OptionError
    from crosskd_cli.inference.metrics import check_backend

    check_backend(backend)
    if batch_size is not None and batch_size < 1:
        raise OptionError(
            f"--batch-size must be at least 1, got {batch_size}.",
            hint="Leave it out to use the batch size the checkpoint was evaluated with.",
        )
    return resolve_device(device)


def eval_data_source(
    checkpoint: Path,
    data: str | None,
    val_ann: Path | None,
    val_images: Path | None,
    console: Console,
):
    """--data or --val-ann/--val-images, else the validation data recorded in the checkpoint."""
    from crosskd_cli.checkpoints.format import read_meta
    from crosskd_cli.data import resolve_data
    from crosskd_cli.errors import DataError

    if data is None and val_ann is None and val_images is None:
        meta = read_meta(checkpoint)
        if not meta.val_data:
            raise DataError(
                f"{checkpoint.name} records no validation data (an imported teacher).",
                hint=f"Pass it: crosskd eval {checkpoint} --data DATA (or --val-ann/--val-images).",
            )
        console.print(
            f"No --data given: evaluating on the checkpoint's validation data "
            f"[cyan]{meta.val_data}[/]."
        )
        data = meta.val_data
    return resolve_data(data, val_ann=val_ann, val_images=val_images)
