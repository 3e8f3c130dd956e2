"""The distiller: a frozen teacher beside a training student, and the distillation step.

The cross-head forward (docs/method.md §2): the student's tap i of every tower, aligned to the
teacher tap's per-channel statistics and passed through ReLU when i > 0, continues through the
teacher's blocks i+1.. and predictors. Those cross-head predictions mimic the teacher's; the
student's own predictions answer to the ground truth only (unless `mimic` is asked for). The
KD terms themselves live in `crosskd_cli.distill.kd_terms`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from crosskd_cli.config.presets import DistillConfig
from crosskd_cli.criteria import DenseCriterion, FlatOutputs
from crosskd_cli.detection.structures import Batch, DetectorOutput, HeadOutput
from crosskd_cli.distill.kd_terms import StepOutputs, kd_weights, method_terms
from crosskd_cli.families import get_family
from crosskd_cli.models.fast_step import runtime_teacher, step_layout, with_conv_weights_in

ALIGN_EPS = 1e-6
Reduce = Callable[[Tensor], Tensor]
Taps = dict[str, list[Tensor]]  # tower name -> per-level taps


class TapStats(NamedTuple):
    """A tap's per-channel mean and std over (N, H, W), each (1, C, 1, 1): all the cross-head
    forward needs of the teacher's taps (2 numbers a channel instead of the maps)."""

    mean: Tensor
    std: Tensor


def channel_stats(tap: Tensor) -> TapStats:
    """Per-channel mean and unbiased std + 1e-6 over (N, H, W) (docs/method.md §2.4), in the
    graph when the tap is."""
    dims = (0, 2, 3)
    return TapStats(tap.mean(dim=dims, keepdim=True), tap.std(dim=dims, keepdim=True) + ALIGN_EPS)


def tap_stats(tap: Tensor) -> TapStats:
    """`channel_stats` as constants: what alignment reads of a teacher tap."""
    return channel_stats(tap.detach())


def align_tap(student_tap: Tensor, teacher: Tensor | TapStats) -> Tensor:
    """Give the student tap the teacher tap's per-channel mean and std over (N, H, W).

    The student's statistics stay differentiable; the teacher's are constants. Unbiased std
    plus 1e-6 (docs/method.md §2.4). `teacher` is the teacher's tap or its `tap_stats`.

    Computed as one affine map, tap * scale + shift with scale = t_std / s_std and shift =
    t_mean - s_mean * scale: the same function as (tap - s_mean) / s_std * t_std + t_mean,
    but autograd keeps no (tap - s_mean) map for the backward, only the tap it already holds
    (one activation map per level and tower less at the step's peak).
    """
    t_mean, t_std = teacher if isinstance(teacher, TapStats) else tap_stats(teacher)
    s_mean, s_std = channel_stats(student_tap)
    scale = t_std / s_std
    return torch.addcmul(t_mean - s_mean * scale, student_tap, scale)


def cross_head_forward(
    teacher_head: nn.Module,
    index: int,
    student_taps: Taps,
    teacher_taps: Taps | dict[str, list[TapStats]],
    align: bool = True,
) -> HeadOutput:
    """Student taps at `index` -> (align) -> (ReLU if index > 0) -> rest of the teacher head.

    Runs with autograd on: the teacher's weights are frozen (requires_grad False) but the
    gradient must flow through them back into the student's tap. `teacher_taps`: the
    teacher's taps, or their `tap_stats` (all alignment reads of them).
    """

    def prepare(student: Tensor, teacher: Tensor | TapStats) -> Tensor:
        if not align:
            return torch.relu(student) if index > 0 else student
        aligned = align_tap(student, teacher)  # a new tensor: its ReLU can run in place
        return aligned.relu_() if index > 0 else aligned

    inputs = {
        tower: [prepare(s, t) for s, t in zip(taps, teacher_taps[tower], strict=True)]
        for tower, taps in student_taps.items()
    }
    return teacher_head.forward_from(index, inputs)


class TapAdapter(nn.ModuleDict):
    """A 1x1 conv per tower (shared over levels) from the student tap width to the teacher's,
    for heads of different width (docs/method.md §2.7). Applied before alignment."""

    def __init__(self, student_channels: int, teacher_channels: int, towers=("cls", "reg")):
        super().__init__(
            {tower: nn.Conv2d(student_channels, teacher_channels, 1) for tower in towers}
        )

    def forward(self, output: DetectorOutput) -> DetectorOutput:
        head = output.head
        head.taps = {tower: [self[tower](tap) for tap in taps] for tower, taps in head.taps.items()}
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


def export_as_is(model: nn.Module) -> nn.Module:
    return model


class Distiller:
    """Holds the frozen teacher and computes one distillation step's losses.

    The teacher is placed by the caller (eval mode, requires_grad False, outside the optimizer,
    DDP and checkpoints); only the student is ever handed to the optimizer. With `fast`
    (training does it) the teacher given is changed in place, its BatchNorms folded into its
    convolutions (its state dict then differs: pass a copy to keep the original), and both
    networks get channels-last batches where that pays (`crosskd_cli.models.fast_step`): the same
    function, rounded differently.
    """

    def __init__(
        self,
        teacher: nn.Module,
        criterion: DenseCriterion,
        cfg: DistillConfig,
        reduce_mean: Reduce | None = None,
        *,
        fast: bool = False,
    ) -> None:
        self.fast = fast
        self.terms = method_terms(cfg.method)
        if fast and self.terms:  # the caller hands the teacher over
            teacher = runtime_teacher(teacher, in_place=True)
        self.teacher = teacher
        self._cast_teacher: tuple[torch.dtype, nn.Module] | None = None
        self.criterion = criterion
        self.cfg = cfg
        self.reduce_mean = reduce_mean
        family = get_family(teacher.spec.family)
        self.weights = kd_weights(cfg, family.kd_defaults, self.terms)

    @property
    def needs_taps(self) -> bool:
        return any(term.needs_taps for term in self.terms)

    @property
    def tap_index(self) -> int | None:
        return self.cfg.cross_index if self.needs_taps else None

    def loss_names(self) -> tuple[str, ...]:
        """Names of the distillation terms, watched for staying at exactly zero."""
        return tuple(
            name for term in self.terms for name in term.loss_names(self.criterion, self.cfg)
        )

    def student_module(
        self, student: nn.Module, student_width: int, teacher_width: int
    ) -> tuple[nn.Module, Callable[[nn.Module], nn.Module]]:
        """(the module to train, the function giving the detector to evaluate and export).

        Taps of different widths go through a learnable adapter trained with the student
        (the pair check has made sure it was asked for); it is never exported.
        """
        if not self.needs_taps or student_width == teacher_width:
            return student, export_as_is
        adapter = TapAdapter(student_width, teacher_width, tuple(self.teacher.head.towers))
        return AdaptedStudent(student, adapter), AdaptedStudent.exported

    def teacher_forward(
        self, images: Tensor, sizes: list[tuple[int, int]]
    ) -> tuple[DetectorOutput, dict[str, list[TapStats]]]:
        """The teacher's own forward, without autograd (the cross pass needs it, not this),
        and the statistics of its taps. Only what a term reads outlives the call: the taps
        become their statistics, the FPN features are dropped unless PKD reads them (on GFL
        at 512x512, ~33 MB of maps freed before the student runs)."""
        teacher = self.running_teacher(images.device.type)
        with torch.no_grad():
            if not any(term.needs_teacher_head for term in self.terms):
                # PKD alone reads the FPN features: the teacher's head is never run
                return DetectorOutput(teacher.features(images, sizes), HeadOutput([], [])), {}
            out = teacher(images, sizes, tap_index=self.tap_index)
            stats = {tower: [tap_stats(t) for t in taps] for tower, taps in out.head.taps.items()}
        out.head.taps = {}
        if not any(term.needs_teacher_features for term in self.terms):
            out.features = []
        return out, stats

    def running_teacher(self, device_type: str) -> nn.Module:
        """The teacher this step runs: under autocast on the fast path, a copy with its
        convolution weights already in the autocast dtype (the same numbers, no cast per
        call), made on the first such step."""
        if not self.fast or not torch.is_autocast_enabled(device_type):
            return self.teacher
        dtype = torch.get_autocast_dtype(device_type)
        if self._cast_teacher is None or self._cast_teacher[0] != dtype:
            self._cast_teacher = (dtype, with_conv_weights_in(self.teacher, dtype))
        return self._cast_teacher[1]

    def cross_head_forward(
        self, student_taps: Taps, teacher_stats: dict[str, list[TapStats]]
    ) -> HeadOutput:
        teacher = self.running_teacher(student_taps[next(iter(student_taps))][0].device.type)
        return cross_head_forward(
            teacher.head, self.cfg.cross_index, student_taps, teacher_stats, self.cfg.align
        )

    def prediction_kd(self, pred: FlatOutputs, out: StepOutputs, prefix: str) -> dict[str, Tensor]:
        """The family's KD losses between `pred` and the teacher's predictions."""
        return self.criterion.kd_losses(
            pred, out.teacher_flat, out.targets, self.cfg, self.weights, prefix, self.reduce_mean
        )

    def step(self, student: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """GT losses on the student's own predictions, then each KD term of the method."""
        index = self.tap_index
        sizes = batch.image_sizes
        images = step_layout(batch.images) if self.fast else batch.images
        # The teacher runs first: its forward's transient activations (ResNet stages at 1/4
        # scale) then never coexist with the student's, which autograd keeps until backward
        teacher_out, teacher_stats = (
            self.teacher_forward(images, sizes) if self.terms else (None, {})
        )
        student_out = student(images, sizes, tap_index=index)
        losses, targets, student_flat = self.criterion(
            student_out.head, batch.targets, sizes, self.reduce_mean
        )
        if teacher_out is None:
            return losses  # the plain baseline: the teacher is never run
        teacher_flat = (
            self.criterion.flatten(teacher_out.head, sizes) if teacher_out.head.cls_logits else None
        )
        out = StepOutputs(
            student_out, teacher_out, teacher_stats, student_flat, teacher_flat, targets, sizes
        )
        for term in self.terms:
            losses.update(term(self, out))
        return losses
