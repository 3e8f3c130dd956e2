"""Options shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

PresetOpt = Annotated[
    str,
    typer.Option(
        "--preset",
        "-p",
        help="A shipped preset name (see `crosskd inspect --list-presets`) "
        "or a path to a YAML file.",
    ),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        "-d",
        help="A COCO-layout folder (annotations/instances_{train,val}2017.json, train2017/, "
        "val2017/) or built-in data such as builtin:shapes or builtin:shapes:seed=3,images=2000.",
    ),
]
TrainAnnOpt = Annotated[
    Path | None, typer.Option("--train-ann", help="Custom data: COCO json of the train split.")
]
TrainImagesOpt = Annotated[
    Path | None, typer.Option("--train-images", help="Custom data: folder of train images.")
]
ValAnnOpt = Annotated[
    Path | None, typer.Option("--val-ann", help="Custom data: COCO json of the val split.")
]
ValImagesOpt = Annotated[
    Path | None, typer.Option("--val-images", help="Custom data: folder of val images.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override any preset field, e.g. --set train.epochs=3 --set data.scale=[640,480]. "
        "Repeatable.",
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Run folder. Default: runs/<command>/<preset>, numbered -2, -3... if it exists.",
    ),
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue an interrupted run from its last/ state: `--resume --out RUN` needs no "
        "other option (the folder knows its preset, data and teacher). Without --out: the "
        "latest run of the preset.",
    ),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing, non-empty --out folder.")
]
BackboneWeightsOpt = Annotated[
    Path | None,
    typer.Option(
        "--backbone-weights",
        help="A local ImageNet state dict (.pth) to start the backbone from, instead of the "
        "preset's backbone_init file (looked for in the torch hub cache).",
    ),
]
DownloadWeightsOpt = Annotated[
    bool,
    typer.Option(
        "--download-weights",
        help="Download the preset's ImageNet backbone file into the torch hub cache when it "
        "is not there yet (otherwise the run stops and says where to place it).",
    ),
]
SkipBadImagesOpt = Annotated[
    bool,
    typer.Option(
        "--skip-bad-images",
        help="Skip unreadable images (and count them) instead of stopping at the first one.",
    ),
]
LogWithOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--log-with",
        metavar="TRACKER",
        help="Also send the interval records to an experiment tracker through Accelerate: "
        "tensorboard, wandb, mlflow, aim, comet_ml, clearml or dvclive (its package installed, "
        "e.g. pip install 'crosskd-cli\\[tensorboard]'). Repeatable. Same as --set "
        "train.log_with=[...].",
    ),
]


def log_with_setting(trackers: list[str] | None) -> list[str]:
    """`--log-with a --log-with b` as the `--set` it stands for (none: the preset's)."""
    return [f"train.log_with=[{','.join(trackers)}]"] if trackers else []
