"""Anchors, ATSS assignment and GFL box coding: everything that turns ground truth into targets.

Geometry follows MMDetection 3.x GFL so imported checkpoints see the same anchors: one square
anchor per location, centre (x * s, y * s), side octave_base_scale * s, levels concatenated
P3..P7, row-major (y, then x) within a level. Assignment and target building run under
`no_grad`; the box-coding helpers stay differentiable because the losses decode through them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import box_iou

from crosskd_cli.structures import Target

# matched_idxs sentinels (a value >= 0 is the index of the matched ground-truth box)
NEGATIVE = -1  # a valid anchor assigned to background
OUT_OF_IMAGE = -2  # an anchor outside its image's unpadded extent: never positive, weight 0

ATSS_TOPK = 9  # candidates per level and per ground-truth box
INSIDE_MARGIN = 0.01  # an anchor centre must lie more than this (px) inside the box
DISTANCE_EPS = 0.1  # encoded distances stop at reg_max - 0.1 so the right DFL bin exists
IOU_EPS = 1e-6  # union floor of the aligned IoU, as MMDetection's bbox_overlaps
_CACHE_SIZE = 32  # distinct feature-size sets kept (multi-scale training has a handful)

FeatureSizes = Sequence[tuple[int, int]]
ReduceMean = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class AnchorSet:
    """All anchors of one feature pyramid, levels concatenated (level-major, then y, then x).

    boxes: (A, 4) xyxy; strides: (A,) float, each anchor's level stride; grid_xy: (A, 2)
    int64, the (x, y) location on its level; num_per_level: anchors of each level.
    """

    boxes: Tensor
    strides: Tensor
    grid_xy: Tensor
    num_per_level: tuple[int, ...]

    @property
    def centers(self) -> Tensor:
        """(A, 2) anchor centres (x, y) in pixels."""
        return (self.boxes[:, :2] + self.boxes[:, 2:]) / 2


class AnchorGrid:
    """One square anchor per location and level, cached per (feature sizes, device, dtype)."""

    def __init__(self, strides: Sequence[int], octave_base_scale: float = 8.0) -> None:
        self.strides = tuple(int(s) for s in strides)
        self.octave_base_scale = float(octave_base_scale)
        self._cache: OrderedDict[tuple, AnchorSet] = OrderedDict()

    def __call__(
        self,
        feature_sizes: FeatureSizes,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> AnchorSet:
        """Anchors for feature maps of the given (H, W) per level, P3 first."""
        sizes = tuple((int(h), int(w)) for h, w in feature_sizes)
        key = (sizes, str(torch.device(device)), dtype)
        if key not in self._cache:
            self._cache[key] = self._build(sizes, torch.device(device), dtype)
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return self._cache[key]

    def _build(
        self, sizes: tuple[tuple[int, int], ...], device: torch.device, dtype: torch.dtype
    ) -> AnchorSet:
        boxes, strides, grid = [], [], []
        for (height, width), stride in zip(sizes, self.strides, strict=True):
            ys, xs = torch.meshgrid(
                torch.arange(height, device=device),
                torch.arange(width, device=device),
                indexing="ij",
            )
            xy = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)  # (H*W, 2), x fastest
            centers = (xy * stride).to(dtype)
            half = self.octave_base_scale * stride / 2
            boxes.append(torch.cat([centers - half, centers + half], dim=1))
            strides.append(torch.full((height * width,), stride, dtype=dtype, device=device))
            grid.append(xy)
        return AnchorSet(
            torch.cat(boxes),
            torch.cat(strides),
            torch.cat(grid),
            tuple(h * w for h, w in sizes),
        )

    def valid_mask(
        self,
        image_sizes: Sequence[tuple[int, int]],
        feature_sizes: FeatureSizes,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """(B, A) bool: location (x, y) of stride s is valid when x < ceil(W / s), y < ceil(H / s).

        (H, W) is each image's unpadded size, as METHOD.md §1 pins. (MMDetection measures it
        against each image padded to /32, so it also trains the padding strip; training only.)
        """
        anchors = self(feature_sizes, device)
        sizes = torch.tensor(image_sizes, dtype=torch.int64, device=device)  # (B, 2) as (h, w)
        stride = anchors.strides.to(torch.int64)
        rows = (sizes[:, :1] + stride - 1) // stride  # (B, A): ceil(H / s)
        cols = (sizes[:, 1:] + stride - 1) // stride
        return (anchors.grid_xy[:, 0] < cols) & (anchors.grid_xy[:, 1] < rows)


def flatten_levels(per_level: Sequence[Tensor]) -> Tensor:
    """Per-level (B, C, H, W) maps -> (B, sum H*W, C), in the anchors' order.

    Done once per step and shared by the GT losses and the KD losses.
    """
    return torch.cat(
        [x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1]) for x in per_level], dim=1
    )


def pad_targets(targets: Sequence[Target], device: torch.device | str) -> tuple[Tensor, ...]:
    """Stack per-image ground truth: boxes (B, G, 4), labels (B, G), mask (B, G) bool.

    G is the largest box count in the batch; padded entries are zero boxes with mask False.
    """
    boxes = pad_sequence([t.boxes.reshape(-1, 4) for t in targets], batch_first=True)
    labels = pad_sequence([t.labels.reshape(-1) for t in targets], batch_first=True)
    counts = torch.tensor([len(t.labels) for t in targets], device=device)
    mask = torch.arange(boxes.shape[1], device=device) < counts[:, None]
    return boxes.to(device, torch.float32), labels.to(device, torch.int64), mask


@torch.no_grad()
def atss_assign(
    anchors: AnchorSet,
    valid: Tensor,
    gt_boxes: Tensor,
    gt_mask: Tensor,
    topk: int = ATSS_TOPK,
) -> Tensor:
    """ATSS (https://arxiv.org/abs/1912.02424), MMDetection's ATSSAssigner, batched.

    For each ground-truth box: the `topk` valid anchors per level nearest to its centre are
    candidates; those whose IoU >= mean + std (unbiased) of the candidates' IoUs and whose centre
    lies inside the box are positive; an anchor positive for several boxes takes the one of
    highest IoU (the first on ties).

    anchors: A anchors; valid: (B, A) bool; gt_boxes: (B, G, 4) xyxy; gt_mask: (B, G) bool.
    Returns matched_idxs (B, A) int64: box index, NEGATIVE or OUT_OF_IMAGE.
    """
    batch, num_anchors = valid.shape
    matched = torch.full((batch, num_anchors), NEGATIVE, dtype=torch.int64, device=valid.device)
    num_gt = gt_boxes.shape[1]
    if num_gt > 0:
        matched = _atss_match(anchors, valid, gt_boxes, gt_mask, topk)
    return matched.masked_fill(~valid, OUT_OF_IMAGE)


def _atss_match(
    anchors: AnchorSet, valid: Tensor, gt_boxes: Tensor, gt_mask: Tensor, topk: int
) -> Tensor:
    batch, num_gt = gt_boxes.shape[:2]
    num_anchors = anchors.boxes.shape[0]
    iou = box_iou(anchors.boxes, gt_boxes.reshape(-1, 4)).view(num_anchors, batch, num_gt)
    iou = iou.permute(1, 0, 2)  # (B, A, G)
    anchor_xy = anchors.centers
    gt_xy = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # (B, G, 2)
    distance = (anchor_xy[None, :, None, :] - gt_xy[:, None, :, :]).pow(2).sum(-1).sqrt()
    distance = distance.masked_fill(~valid[..., None], float("inf"))  # (B, A, G)

    candidates = []  # the nearest `topk` per level; invalid anchors only fill short levels
    start = 0
    for count in anchors.num_per_level:
        level = distance[:, start : start + count]
        candidates.append(level.topk(min(topk, count), dim=1, largest=False).indices + start)
        start += count
    cand = torch.cat(candidates, dim=1)  # (B, K, G)
    cand_valid = valid[..., None].expand(-1, -1, num_gt).gather(1, cand)
    cand_iou = iou.gather(1, cand)

    threshold = _masked_mean_plus_std(cand_iou, cand_valid)  # (B, G)
    cx, cy = anchor_xy[:, 0][cand], anchor_xy[:, 1][cand]  # (B, K, G)
    x1, y1, x2, y2 = (gt_boxes[..., i][:, None, :] for i in range(4))
    inside = torch.stack([cx - x1, cy - y1, x2 - cx, y2 - cy]).amin(0) > INSIDE_MARGIN
    is_pos = (cand_iou >= threshold[:, None]) & inside & cand_valid & gt_mask[:, None, :]

    # Candidate indices are distinct within a (image, box) column, so the scatter is exact
    pos_iou = torch.full_like(iou, float("-inf"))
    pos_iou.scatter_(1, cand, cand_iou.masked_fill(~is_pos, float("-inf")))
    best_iou, best_gt = pos_iou.max(dim=2)
    return torch.where(best_iou > float("-inf"), best_gt, NEGATIVE)


def _masked_mean_plus_std(values: Tensor, mask: Tensor) -> Tensor:
    """(B, K, G) -> (B, G): mean + unbiased std over K of the entries where mask is True."""
    mask = mask.to(values.dtype)
    count = mask.sum(1)
    mean = (values * mask).sum(1) / count.clamp(min=1)
    var = ((values - mean[:, None]) * mask).pow(2).sum(1) / (count - 1).clamp(min=1)
    return mean + var.sqrt()


@dataclass
class GFLTargets:
    """Training targets of a batch, aligned with the flattened anchors.

    labels: (B, A) int64, background = num_classes; label_weights: (B, A) float, 1 on valid
    anchors; bbox_targets: (B, A, 4) xyxy pixels (zero off positives); pos_mask: (B, A) bool;
    matched_idxs: (B, A) int64 (see NEGATIVE / OUT_OF_IMAGE); num_pos: scalar float, the
    positives summed over images with at least 1 per image, averaged across processes, >= 1.
    """

    labels: Tensor
    label_weights: Tensor
    bbox_targets: Tensor
    pos_mask: Tensor
    matched_idxs: Tensor
    num_pos: Tensor


@torch.no_grad()
def build_gfl_targets(
    matched_idxs: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    num_classes: int,
    reduce_mean: ReduceMean | None = None,
) -> GFLTargets:
    """Gather each positive anchor's box and label (MMDetection GFLHead.get_targets).

    matched_idxs: (B, A) from `atss_assign`; gt_boxes (B, G, 4); gt_labels (B, G).
    `reduce_mean` averages num_pos across processes (identity when None).
    """
    pos = matched_idxs >= 0
    index = matched_idxs.clamp(min=0)
    if gt_boxes.shape[1] == 0:  # nothing to gather from; no anchor is positive
        gt_boxes = gt_boxes.new_zeros(gt_boxes.shape[0], 1, 4)
        gt_labels = gt_labels.new_zeros(gt_labels.shape[0], 1)
    labels = torch.where(pos, gt_labels.gather(1, index), num_classes)
    boxes = gt_boxes.gather(1, index[..., None].expand(-1, -1, 4))
    boxes = boxes.masked_fill(~pos[..., None], 0.0)
    num_pos = pos.sum(1).clamp(min=1).sum().to(torch.float32)
    if reduce_mean is not None:
        num_pos = reduce_mean(num_pos)
    return GFLTargets(
        labels=labels,
        label_weights=(matched_idxs != OUT_OF_IMAGE).to(torch.float32),
        bbox_targets=boxes,
        pos_mask=pos,
        matched_idxs=matched_idxs,
        num_pos=num_pos.clamp(min=1.0),
    )


def bbox_to_distance(
    points: Tensor, boxes: Tensor, max_dis: float | None = None, eps: float = DISTANCE_EPS
) -> Tensor:
    """Boxes (..., 4) xyxy -> distances (..., 4) (left, top, right, bottom) from points (..., 2).

    With `max_dis`, distances are clamped to [0, max_dis - eps] (MMDetection bbox2distance).
    """
    left_top = points - boxes[..., :2]
    right_bottom = boxes[..., 2:] - points
    distance = torch.cat([left_top, right_bottom], dim=-1)
    if max_dis is not None:
        distance = distance.clamp(min=0, max=max_dis - eps)
    return distance


def distance_to_bbox(points: Tensor, distance: Tensor, max_shape: Tensor | None = None) -> Tensor:
    """Distances (..., 4) (l, t, r, b) from points (..., 2) -> boxes (..., 4) xyxy.

    max_shape: (h, w) broadcastable to (..., 2); boxes are then clamped to [0, w] x [0, h].
    """
    boxes = torch.cat([points - distance[..., :2], points + distance[..., 2:]], dim=-1)
    if max_shape is not None:
        max_xy = max_shape.flip(-1).to(boxes.dtype)  # (w, h)
        boxes = torch.minimum(boxes.clamp(min=0), torch.cat([max_xy, max_xy], dim=-1))
    return boxes


def integral(box_logits: Tensor, reg_max: int) -> Tensor:
    """GFL's expected distance: (..., 4 * (reg_max + 1)) logits -> (..., 4) in bins.

    Each side's softmax over bins 0..reg_max dotted with (0, 1, ..., reg_max).
    """
    probs = F.softmax(box_logits.unflatten(-1, (4, reg_max + 1)), dim=-1)
    project = torch.arange(reg_max + 1, dtype=probs.dtype, device=probs.device)
    return F.linear(probs, project)


def aligned_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = IOU_EPS) -> Tensor:
    """IoU of boxes1[i] with boxes2[i]: (..., 4), (..., 4) xyxy -> (...), union floored at eps."""
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).prod(-1)
    area2 = (boxes2[..., 2:] - boxes2[..., :2]).prod(-1)
    return inter / (area1 + area2 - inter).clamp(min=eps)
