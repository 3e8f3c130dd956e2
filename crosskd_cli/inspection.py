"""What `crosskd inspect` shows: head layers with their shapes, worked out on the meta device."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from crosskd_cli.models import build_detector, count_parameters
from crosskd_cli.specs import ModelSpec

_BLOCK = re.compile(r"^towers\.(\w+)\.(\d+)\.")  # towers.<name>.<k>.conv


@dataclass
class LayerRow:
    """One head layer: its name, parameter count and output shape on each FPN level."""

    name: str
    params: int
    shapes: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def block(self) -> int | None:
        """1-based tower block of this layer, None for predictors and scales."""
        match = _BLOCK.match(self.name)
        return int(match.group(2)) + 1 if match else None


@dataclass
class ModelReport:
    spec: ModelSpec
    params: dict[str, int]
    layers: list[LayerRow]
    level_shapes: list[tuple[int, ...]]  # FPN outputs P3..P7


def padded(size: tuple[int, int], divisor: int = 32) -> tuple[int, int]:
    return tuple(-(-s // divisor) * divisor for s in size)  # type: ignore[return-value]


def describe_model(spec: ModelSpec, image_size: tuple[int, int]) -> ModelReport:
    """Build `spec` on the meta device and record every head layer's output shapes.

    No memory is allocated and nothing is computed, so R101 at 800x1333 is instant.
    """
    with torch.device("meta"):
        model = build_detector(spec)
        images = torch.zeros((1, 3, *padded(image_size)), dtype=torch.uint8)
    rows: dict[str, LayerRow] = {}
    handles = []
    for name, module in model.head.named_modules():
        if name and not list(module.children()):
            rows[name] = LayerRow(name, sum(p.numel() for p in module.parameters()))
            handles.append(module.register_forward_hook(_recorder(rows[name])))
    with torch.no_grad():
        out = model(images, [image_size])
    for handle in handles:
        handle.remove()
    called = [row for row in rows.values() if row.shapes]
    called.sort(key=lambda row: list(rows).index(row.name))
    return ModelReport(
        spec, count_parameters(model), called, [tuple(f.shape[1:]) for f in out.features]
    )


def _recorder(row: LayerRow):
    def hook(module: nn.Module, args, output) -> None:
        row.shapes.append(tuple(output.shape[1:]))

    return hook


def reused_by_cross_branch(row: LayerRow, cross_index: int) -> bool:
    """The cross branch runs the teacher's blocks after `cross_index`, then its predictors."""
    return row.block is None or row.block > cross_index
