"""COCO-format data: sources, the dataset, transforms, batching, and the built-in data set."""

from crosskd_cli.data.builtin import builtin_cache_dir, cache_root
from crosskd_cli.data.coco import CocoDetection, read_image
from crosskd_cli.data.collate import build_loader, collate
from crosskd_cli.data.source import DataSource, resolve_data

__all__ = [
    "CocoDetection",
    "DataSource",
    "build_loader",
    "builtin_cache_dir",
    "cache_root",
    "collate",
    "read_image",
    "resolve_data",
]
