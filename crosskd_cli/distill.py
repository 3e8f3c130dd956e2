"""The distiller: a frozen teacher beside a training student, and the CrossKD step.

The cross-head forward (METHOD.md §2): the student's tap i of both towers, aligned to the
teacher tap's per-channel statistics and passed through ReLU when i > 0, continues through the
teacher's blocks i+1.. and predictors. Those cross-head predictions mimic the teacher's; the
student's own predictions answer to the ground truth only (unless `mimic` is asked for).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from crosskd_cli.config import DistillConfig, kd_weights
from crosskd_cli.criteria import DenseCriterion, FlatOutputs
from crosskd_cli.errors import ModelError
from crosskd_cli.losses import pkd_loss
from crosskd_cli.structures import Batch, DetectorOutput, HeadOutput

METHODS = ("crosskd", "mimic", "pkd", "crosskd+pkd", "crosskd+mimic", "none")
ALIGN_EPS = 1e-6
Reduce = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class MethodParts:
    """Which terms a method switches on."""

    cross: bool
    mimic: bool
    pkd: bool

    @classmethod
    def of(cls, method: str) -> MethodParts:
        if method not in METHODS:
            raise ModelError(
                f"Method '{method}' is not known.", hint=f"Choose one of: {', '.join(METHODS)}."
            )
        parts = method.split("+")
        return cls("crosskd" in parts, "mimic" in parts, "pkd" in parts)


def align_tap(student_tap: Tensor, teacher_tap: Tensor) -> Tensor:
    """Give the student tap the teacher tap's per-channel mean and std over (N, H, W).

    The student's statistics stay differentiable; the teacher's are constants. Unbiased std
    plus 1e-6, as METHOD.md §2.4 pins.
    """
    dims = (0, 2, 3)
    s_mean = student_tap.mean(dim=dims, keepdim=True)
    s_std = student_tap.std(dim=dims, keepdim=True) + ALIGN_EPS
    t_mean = teacher_tap.mean(dim=dims, keepdim=True).detach()
    t_std = teacher_tap.std(dim=dims, keepdim=True).detach() + ALIGN_EPS
    return (student_tap - s_mean) / s_std * t_std + t_mean


def cross_head_forward(
    teacher_head: nn.Module,
    index: int,
    student_cls_taps: list[Tensor],
    student_reg_taps: list[Tensor],
    teacher_cls_taps: list[Tensor],
    teacher_reg_taps: list[Tensor],
    align: bool = True,
) -> HeadOutput:
    """Student taps at `index` -> (align) -> (ReLU if index > 0) -> rest of the teacher head.

    Runs with autograd on: the teacher's weights are frozen (requires_grad False) but the
    gradient must flow through them back into the student's tap.
    """

    def prepare(student: Tensor, teacher: Tensor) -> Tensor:
        x = align_tap(student, teacher) if align else student
        return torch.relu(x) if index > 0 else x

    cls_in = [prepare(s, t) for s, t in zip(student_cls_taps, teacher_cls_taps, strict=True)]
    reg_in = [prepare(s, t) for s, t in zip(student_reg_taps, teacher_reg_taps, strict=True)]
    return teacher_head.forward_from(index, cls_in, reg_in)


class TapAdapter(nn.Module):
    """1x1 convs (one per tower, shared over levels) from the student tap width to the
    teacher's, for heads of different width (METHOD.md §2). Applied before alignment."""

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.cls = nn.Conv2d(student_channels, teacher_channels, 1)
        self.reg = nn.Conv2d(student_channels, teacher_channels, 1)

    def forward(self, output: DetectorOutput) -> DetectorOutput:
        head = output.head
        head.cls_taps = [self.cls(tap) for tap in head.cls_taps]
        head.reg_taps = [self.reg(tap) for tap in head.reg_taps]
        return output


class AdaptedStudent(nn.Module):
    """The student plus its tap adapter, trained (and DDP-wrapped) as one module.

    Only `student` is evaluated and exported; the adapter lives in the resumable training
    state alone. Running it inside `forward` keeps DDP's gradient hooks on its weights.
    """

    def __init__(self, student: nn.Module, adapter: TapAdapter) -> None:
        super().__init__()
        self.student = student
        self.adapter = adapter

    def forward(self, *args, **kwargs) -> DetectorOutput:
        return self.adapter(self.student(*args, **kwargs))

    @staticmethod
    def exported(model: AdaptedStudent) -> nn.Module:
        """What is evaluated and saved: the student alone."""
        return model.student


class Distiller:
    """Holds the frozen teacher and computes one distillation step's losses.

    The teacher is placed by the caller (eval mode, requires_grad False, outside the optimizer,
    DDP and checkpoints); only the student is ever handed to the optimizer.
    """

    def __init__(
        self,
        teacher: nn.Module,
        criterion: DenseCriterion,
        cfg: DistillConfig,
        reduce_mean: Reduce | None = None,
    ) -> None:
        self.teacher = teacher
        self.criterion = criterion
        self.cfg = cfg
        self.parts = MethodParts.of(cfg.method)
        self.reduce_mean = reduce_mean
        self.pkd_weight = kd_weights(cfg, teacher.spec.family)["pkd"]

    @property
    def tap_index(self) -> int | None:
        return self.cfg.cross_index if self.parts.cross else None

    def loss_names(self) -> tuple[str, ...]:
        """Names of the distillation terms, watched for staying at exactly zero."""
        names = []
        for prefix, on in (("kd_cross", self.parts.cross), ("kd_mimic", self.parts.mimic)):
            if on:
                names += self.criterion.kd_names(self.cfg, prefix)
        return tuple(names) + (("kd_pkd",) if self.parts.pkd else ())

    def step(self, student: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """GT losses on the student's own predictions, KD losses as the method says."""
        index = self.tap_index
        sizes = batch.image_sizes
        student_out = student(batch.images, sizes, tap_index=index)
        losses, targets, student_flat = self.criterion(
            student_out.head, batch.targets, sizes, self.reduce_mean
        )
        if not (self.parts.cross or self.parts.mimic or self.parts.pkd):
            return losses  # the plain baseline: the teacher is never run
        with torch.no_grad():  # only the teacher's own forward; the cross pass needs autograd
            teacher_out = self.teacher(batch.images, sizes, tap_index=index)
        teacher_flat = self.criterion.flatten(teacher_out.head, sizes)

        def mimic(pred: FlatOutputs, prefix: str) -> dict[str, Tensor]:
            return self.criterion.kd_losses(
                pred, teacher_flat, targets, self.cfg, prefix, self.reduce_mean
            )

        if self.parts.cross:
            t_head, s_head = teacher_out.head, student_out.head
            cross = cross_head_forward(
                self.teacher.head,
                index,
                s_head.cls_taps,
                s_head.reg_taps,
                t_head.cls_taps,
                t_head.reg_taps,
                align=self.cfg.align,
            )
            losses.update(mimic(self.criterion.flatten(cross, sizes), "kd_cross"))
        if self.parts.mimic:
            losses.update(mimic(student_flat, "kd_mimic"))
        if self.parts.pkd:
            losses["kd_pkd"] = self.pkd_weight * pkd_loss(
                student_out.features, teacher_out.features
            )
        return losses
