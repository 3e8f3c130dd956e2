"""COCO-format data: sources, the dataset, transforms, batching, and the built-in data set."""

from crosskd_cli.data.builtin import builtin_cache_dir, cache_root
from crosskd_cli.data.coco import ClassList, CocoDetection, read_image
from crosskd_cli.data.collate import build_eval_loader, build_loader, collate
from crosskd_cli.data.source import DataSource, resolve_data
from crosskd_cli.data.splits import DataSplits, load_splits

__all__ = [
    "ClassList",
    "CocoDetection",
    "DataSource",
    "DataSplits",
    "build_eval_loader",
    "build_loader",
    "builtin_cache_dir",
    "cache_root",
    "collate",
    "load_splits",
    "read_image",
    "resolve_data",
]
