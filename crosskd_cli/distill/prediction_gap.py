"""The paper's Fig. 5: how far the student's own predictions are from the teacher's and from
the ground truth, measured at each epoch end on a fixed handful of validation images.

Four mean L1 distances (docs/method.md §5), all on the student's own head (not the cross-head
branch), with the assignment of the run's criterion:

- l1_to_teacher_cls: sigmoid class scores, student vs teacher, over every valid location and
  class;
- l1_to_teacher_box: box sides (left, top, right, bottom distances from the prior's centre,
  decoded by the family's box coder, in units of the prior's stride), student vs teacher, at
  the positive locations of the assignment (the same for both: same priors, same boxes);
- l1_to_gt_cls: sigmoid class scores vs the one-hot class of the assigned box, at positives
  (GFL's own target replaces the 1 by an IoU with the prediction itself: a moving target);
- l1_to_gt_box: box sides vs those of the assigned box, at positives, in strides.

The measurement changes nothing the run computes: no gradient, no RNG draw (the images are
read straight from the dataset, not through a DataLoader, which would draw a seed), and the
student's train/eval modes are restored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from crosskd_cli.criteria import DenseCriterion, FlatOutputs
from crosskd_cli.data.collate import collate_by_shape
from crosskd_cli.detection.box_ops import bbox_to_distance
from crosskd_cli.detection.structures import Batch
from crosskd_cli.detection.targets import DenseTargets

COLUMNS = ("l1_to_teacher_cls", "l1_to_teacher_box", "l1_to_gt_cls", "l1_to_gt_box")


@dataclass
class _Sums:
    """Running sums and counts of the four distances over the images measured."""

    sums: dict[str, float]
    counts: dict[str, float]

    @classmethod
    def empty(cls) -> _Sums:
        return cls(dict.fromkeys(COLUMNS, 0.0), dict.fromkeys(COLUMNS, 0.0))

    def add(self, name: str, total: Tensor, count: Tensor) -> None:
        self.sums[name] += float(total)
        self.counts[name] += float(count)

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in COLUMNS if self.counts[k] > 0}


def box_sides(criterion: DenseCriterion, flat: FlatOutputs) -> Tensor:
    """(B, A, 4) decoded (left, top, right, bottom) of every prior, in units of its stride."""
    boxes = criterion.decode(flat)
    return bbox_to_distance(flat.anchors.centers, boxes) / flat.strides[:, None]


def batch_distances(
    criterion: DenseCriterion, student: FlatOutputs, teacher: FlatOutputs, targets: DenseTargets
) -> dict[str, tuple[Tensor, Tensor]]:
    """{column: (sum of absolute differences, number of elements)} of one batch."""
    student, teacher = student.float(), teacher.float()
    valid = student.valid[..., None].float()  # (B, A, 1)
    pos = targets.pos_mask
    num_classes = student.cls.shape[-1]
    s_scores, t_scores = student.cls.sigmoid(), teacher.cls.sigmoid()
    onehot = torch.zeros_like(s_scores)
    onehot[pos] = nn.functional.one_hot(targets.labels[pos], num_classes).to(onehot.dtype)
    s_sides = box_sides(criterion, student)
    gt_sides = bbox_to_distance(student.anchors.centers, targets.bbox_targets)
    gt_sides = gt_sides / student.strides[:, None]
    n_pos = pos.sum()
    cls_gap = ((s_scores - t_scores).abs() * valid).sum()
    return {
        "l1_to_teacher_cls": (cls_gap, valid.sum() * num_classes),
        "l1_to_teacher_box": (
            (s_sides - box_sides(criterion, teacher))[pos].abs().sum(),
            n_pos * 4,
        ),
        "l1_to_gt_cls": ((s_scores - onehot)[pos].abs().sum(), n_pos * num_classes),
        "l1_to_gt_box": ((s_sides - gt_sides)[pos].abs().sum(), n_pos * 4),
    }


class PredictionGap:
    """The epoch-end measurement: `gap(student) -> {column: mean L1}` on the first
    `num_images` images of `dataset` (a validation split), in batches of `batch_size`."""

    def __init__(
        self,
        teacher: nn.Module,
        criterion: DenseCriterion,
        dataset: torch.utils.data.Dataset,
        num_images: int,
        batch_size: int,
        device: torch.device,
    ) -> None:
        self.teacher = teacher
        self.criterion = criterion
        self.dataset = dataset
        self.indices = list(range(min(num_images, len(dataset))))
        self.batch_size = batch_size
        self.device = device

    def batches(self):
        """The fixed images, read in order, each batch grouped by padded size (as evaluation)."""
        for start in range(0, len(self.indices), self.batch_size):
            samples = [self.dataset[i] for i in self.indices[start : start + self.batch_size]]
            yield from collate_by_shape(samples)

    @torch.no_grad()
    def __call__(self, student: nn.Module) -> dict[str, float]:
        was_training = student.training
        student.eval()  # running statistics used, never updated
        try:
            totals = _Sums.empty()
            for batch in self.batches():
                for name, (total, count) in self.measure(student, batch.to(self.device)).items():
                    totals.add(name, total, count)
            return totals.means()
        finally:
            student.train(was_training)

    def measure(self, student: nn.Module, batch: Batch) -> dict[str, tuple[Tensor, Tensor]]:
        sizes = batch.image_sizes
        student_flat = self.criterion.flatten(student(batch.images, sizes).head, sizes)
        teacher_flat = self.criterion.flatten(self.teacher(batch.images, sizes).head, sizes)
        targets = self.criterion.assign(student_flat, batch.targets)
        return batch_distances(self.criterion, student_flat, teacher_flat, targets)


EpochEndFn = Callable[[nn.Module], dict[str, float]]
