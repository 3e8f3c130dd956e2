"""What `crosskd inspect` shows: head layers with their shapes, worked out on the meta device,
and for a pair what the cross branch reuses and whether the two heads fit."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.config.presets import Preset, to_dict
from crosskd_cli.distill.pairing import check_cross_index, pair_problems, tap_widths
from crosskd_cli.distill.preset_checks import load_preset
from crosskd_cli.models import build_detector, count_parameters

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

    def as_dict(self) -> dict[str, Any]:
        """The JSON of `crosskd inspect --format json` for one model."""
        return {
            "spec": to_dict(self.spec),
            "params": self.params,
            "fpn_levels": [list(s) for s in self.level_shapes],
            "layers": [
                {"name": r.name, "params": r.params, "shapes": [list(s) for s in r.shapes]}
                for r in self.layers
            ],
        }


@dataclass
class PairReport:
    """A teacher/student pair at one cross index: both heads, what the cross branch reuses of
    the teacher's, and every reason the pair cannot be distilled (none: compatible)."""

    preset: str
    cross_index: int
    image_size: tuple[int, int]
    teacher: ModelReport
    student: ModelReport
    problems: list[str]
    adapter: tuple[int, int] | None  # (student, teacher) tap channels the adapter bridges

    @property
    def compatible(self) -> bool:
        return not self.problems

    @property
    def reused_teacher_layers(self) -> list[str]:
        return [r.name for r in self.teacher.layers if reused_by_cross_branch(r, self.cross_index)]

    @property
    def reused_blocks(self) -> range:
        return reused_teacher_blocks(self.cross_index, self.student.spec.stacked_convs)

    @property
    def scaled(self) -> bool:
        """The teacher's predictors include a per-level Scale (FCOS, ATSS)."""
        return any(row.name.startswith("scales.") for row in self.teacher.layers)

    def as_dict(self) -> dict[str, Any]:
        """The JSON of `crosskd inspect --preset PAIR --format json`."""
        adapter = self.adapter and {
            "from_channels": self.adapter[0],
            "to_channels": self.adapter[1],
        }
        return {
            "preset": self.preset,
            "cross_index": self.cross_index,
            "image_size": list(self.image_size),
            "teacher": self.teacher.as_dict(),
            "student": self.student.as_dict(),
            "reused_teacher_layers": self.reused_teacher_layers,
            "adapter": adapter,
            "compatible": self.compatible,
            "problems": self.problems,
        }


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


def describe_pair(pair: Preset, cross_index: int | None, image_size: tuple[int, int]) -> PairReport:
    """Both heads of a pair preset at `cross_index` (default: the preset's) and their fit."""
    student = describe_model(pair.model, image_size)
    index = pair.distill.cross_index if cross_index is None else cross_index
    teacher_spec = load_preset(pair.teacher.preset).model
    check_cross_index(index, teacher_spec, pair.model)
    teacher = describe_model(teacher_spec, image_size)
    problems = pair_problems(teacher_spec, pair.model, index, pair.distill.adapter)
    teacher_width, student_width = tap_widths(teacher_spec, pair.model, index)
    bridged = pair.distill.adapter and teacher_width != student_width
    adapter = (student_width, teacher_width) if bridged else None
    return PairReport(pair.name, index, image_size, teacher, student, problems, adapter)


def reused_by_cross_branch(row: LayerRow, cross_index: int) -> bool:
    """The cross branch runs the teacher's blocks after `cross_index`, then its predictors.

    On the student's side the same rows are those that learn from the ground truth only.
    """
    return row.block is None or row.block > cross_index


def reused_teacher_blocks(cross_index: int, blocks: int) -> range:
    """The 1-based tower blocks the cross branch runs of a `blocks`-deep teacher tower."""
    return range(cross_index + 1, blocks + 1)


def cross_branch_reuse(cross_index: int, blocks: int) -> str:
    """What the cross branch runs of the teacher's head, in words for a run's banner."""
    reused = reused_teacher_blocks(cross_index, blocks)
    if not reused:
        return "teacher predictors only"
    return f"teacher blocks {reused.start}..{reused.stop - 1} + predictors"
