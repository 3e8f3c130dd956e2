"""`crosskd export CKPT --format onnx|pt2 [--nms]`: the model for other runtimes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from crosskd_cli.commands._common import refuse_to_clobber

console = Console()


def export(
    checkpoint: Annotated[Path, typer.Argument(help="A crosskd .safetensors checkpoint.")],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="onnx (needs pip install 'crosskd-cli\\[export]') or pt2 (torch.export).",
        ),
    ] = "onnx",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="The file to write. Default: the checkpoint's name with .onnx or .pt2.",
        ),
    ] = None,
    nms: Annotated[
        bool,
        typer.Option(
            "--nms",
            help="Put evaluation's decoding, score threshold and class-wise NMS in the graph: "
            "it then returns the final detections (boxes, scores, labels, num_detections, "
            "padded to 100 per image) instead of the raw head outputs.",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing file.")
    ] = False,
) -> None:
    """Export a checkpoint's model, with its input normalisation, returning the raw per-level
    head outputs (decoding and NMS stay outside: see the .json written beside the file), or
    with --nms the final detections. The written file is run once and compared with the
    PyTorch model; the max abs diff is printed.

    Example: crosskd export runs/distill/shapes-gfl-r34-to-r18/best.safetensors --format onnx --nms
    """
    from crosskd_cli.inference.export import check_format, default_path, export_checkpoint

    check_format(fmt)
    out = out or default_path(checkpoint, fmt)
    if not overwrite:
        refuse_to_clobber([out, out.with_name(out.name + ".json")])
    with console.status(f"Exporting {checkpoint.name} to {fmt}..."):
        report = export_checkpoint(checkpoint, out, fmt, nms=nms)
    compared = "detections' max abs diff" if nms else "max abs diff"
    found = f"{compared} to PyTorch {report.max_abs_diff:.2e}"
    if report.max_abs_diff == float("inf"):
        found = "the detections differ from PyTorch's in number or labels"
    console.print(
        f"Wrote {report.path} and {report.sidecar}. Checked on a {list(report.check_shape)} "
        f"input: {found}."
    )
