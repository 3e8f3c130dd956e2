"""Anchors, points, assignment and box coding: everything that turns ground truth into targets.

Geometry follows MMDetection 3.x so imported checkpoints see the same priors. Anchors of
stride s at location (x, y) are centred at (x * s, y * s) (FCOS points at ((x + 0.5) * s,
(y + 0.5) * s)); the anchors of one location are ordered ratio-major, then scale (MMDetection's
AnchorGenerator); levels are concatenated P3..P7, row-major (y, then x) within a level, the
anchors of a location adjacent. That is also the order in which `flatten_levels` lays out a
head's (B, A * K, H, W) outputs. Assignment and target building run under `no_grad`; the
box-coding helpers stay differentiable because the losses decode through them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import box_iou

from crosskd_cli.detection.structures import Target

# matched_idxs sentinels (a value >= 0 is the index of the matched ground-truth box)
NEGATIVE = -1  # a valid anchor assigned to background
OUT_OF_IMAGE = -2  # an anchor outside its image's unpadded extent: never positive, weight 0
IGNORED = -3  # RetinaNet's IoU band between negative and positive: weight 0

ATSS_TOPK = 9  # candidates per level and per ground-truth box
INSIDE_MARGIN = 0.01  # an anchor centre must lie more than this (px) inside the box
DISTANCE_EPS = 0.1  # encoded distances stop at reg_max - 0.1 so the right DFL bin exists
IOU_EPS = 1e-6  # union floor of the aligned IoU, as MMDetection's bbox_overlaps
POS_IOU, NEG_IOU = 0.5, 0.4  # RetinaNet's max-IoU thresholds
WH_RATIO_CLIP = 16 / 1000  # delta decoding clamps log(w / w_anchor) to +-|log(this)|
FCOS_RANGES = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, 1e8))
_CACHE_SIZE = 32  # distinct feature-size sets kept (multi-scale training has a handful)

FeatureSizes = Sequence[tuple[int, int]]
ReduceMean = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class AnchorSet:
    """All priors of one feature pyramid, in the flattened order (see the module docstring).

    boxes: (A, 4) xyxy (zero-size at the point for FCOS); strides: (A,) float, each prior's
    level stride; grid_xy: (A, 2) int64, the (x, y) location on its level; num_per_level:
    priors of each level.
    """

    boxes: Tensor
    strides: Tensor
    grid_xy: Tensor
    num_per_level: tuple[int, ...]

    @property
    def centers(self) -> Tensor:
        """(A, 2) prior centres (x, y) in pixels."""
        return (self.boxes[:, :2] + self.boxes[:, 2:]) / 2


class AnchorGrid:
    """MMDetection's AnchorGenerator (and, with center_offset 0.5 and zero size, its point
    generator), cached per (feature sizes, device, dtype).

    Base anchor k of a location, for ratio r (outer loop) and octave scale
    c = octave_base_scale * 2 ** (j / scales_per_octave) (inner loop): width s * c / sqrt(r),
    height s * c * sqrt(r), centred at ((x + center_offset) * s, (y + center_offset) * s).
    """

    def __init__(
        self,
        strides: Sequence[int],
        octave_base_scale: float = 8.0,
        scales_per_octave: int = 1,
        ratios: Sequence[float] = (1.0,),
        center_offset: float = 0.0,
    ) -> None:
        self.strides = tuple(int(s) for s in strides)
        self.octave_base_scale = float(octave_base_scale)
        self.scales_per_octave = int(scales_per_octave)  # octave_base_scale 0: FCOS points
        self.ratios = tuple(float(r) for r in ratios)
        self.center_offset = float(center_offset)
        self._cache: OrderedDict[tuple, AnchorSet] = OrderedDict()

    @property
    def kind(self) -> str:
        """ "points" (zero-size priors, FCOS) or "anchors"."""
        return "points" if self.octave_base_scale == 0 else "anchors"

    def layout(self) -> tuple:
        """What must match between a teacher's and a student's priors for the cross branch."""
        return (self.strides, self.octave_base_scale, self.scales_per_octave, self.ratios,
                self.center_offset)  # fmt: skip

    @property
    def per_location(self) -> int:
        return len(self.ratios) * self.scales_per_octave

    def __call__(
        self,
        feature_sizes: FeatureSizes,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> AnchorSet:
        """Priors for feature maps of the given (H, W) per level, P3 first."""
        if any(isinstance(n, torch.SymInt) for size in feature_sizes for n in size):
            # torch.export with dynamic image sizes: build them in the graph, uncached
            return self._build(tuple(feature_sizes), torch.device(device), dtype)
        sizes = tuple((int(h), int(w)) for h, w in feature_sizes)
        key = (sizes, str(torch.device(device)), dtype)
        if key not in self._cache:
            self._cache[key] = self._build(sizes, torch.device(device), dtype)
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return self._cache[key]

    def base_anchors(self, stride: int) -> Tensor:
        """(K, 4) float32 anchors of location (0, 0), in MMDetection's order (ratio-major).

        Computed in float32 with MMDetection's sequence of operations, so imported RetinaNet
        teachers see bit-identical anchors.
        """
        h_ratios = torch.tensor(self.ratios).sqrt()
        w_ratios = 1 / h_ratios
        octave = torch.tensor(
            [2 ** (j / self.scales_per_octave) for j in range(self.scales_per_octave)]
        )
        scales = octave * self.octave_base_scale
        widths = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
        heights = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
        center = self.center_offset * stride
        return torch.stack(
            [center - 0.5 * widths, center - 0.5 * heights, center + 0.5 * widths,
             center + 0.5 * heights],
            dim=1,
        )  # fmt: skip

    def _build(
        self, sizes: tuple[tuple[int, int], ...], device: torch.device, dtype: torch.dtype
    ) -> AnchorSet:
        boxes, strides, grid = [], [], []
        per_location = self.per_location
        for (height, width), stride in zip(sizes, self.strides, strict=True):
            ys, xs = torch.meshgrid(
                torch.arange(height, device=device),
                torch.arange(width, device=device),
                indexing="ij",
            )
            xy = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)  # (H*W, 2), x fastest
            shifts = (xy * stride).to(dtype).repeat(1, 2)  # (H*W, 4)
            base = self.base_anchors(stride).to(device, dtype)  # (K, 4)
            boxes.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
            count = height * width * per_location
            strides.append(torch.full((count,), stride, dtype=dtype, device=device))
            grid.append(xy.repeat_interleave(per_location, dim=0))
        return AnchorSet(
            torch.cat(boxes),
            torch.cat(strides),
            torch.cat(grid),
            tuple(h * w * per_location for h, w in sizes),
        )

    def valid_mask(
        self,
        image_sizes: Sequence[tuple[int, int]],
        feature_sizes: FeatureSizes,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """(B, A) bool: location (x, y) of stride s is valid when x < ceil(W / s), y < ceil(H / s).

        (H, W) is each image's unpadded size (docs/method.md §1.5). (MMDetection measures it
        against each image padded to /32, so it also trains the padding strip; training only.)
        """
        anchors = self(feature_sizes, device)
        sizes = torch.tensor(image_sizes, dtype=torch.int64, device=device)  # (B, 2) as (h, w)
        stride = anchors.strides.to(torch.int64)
        rows = (sizes[:, :1] + stride - 1) // stride  # (B, A): ceil(H / s)
        cols = (sizes[:, 1:] + stride - 1) // stride
        return (anchors.grid_xy[:, 0] < cols) & (anchors.grid_xy[:, 1] < rows)


def flatten_levels(per_level: Sequence[Tensor], per_location: int = 1) -> Tensor:
    """Per-level (B, K * C, H, W) maps -> (B, sum H*W*K, C), in the priors' order.

    K = per_location priors (RetinaNet's 9 anchors), each with C channels. Done once per step
    and shared by the GT losses and the KD losses.
    """
    parts = [
        x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1] // per_location) for x in per_level
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def pad_targets(targets: Sequence[Target], device: torch.device | str) -> tuple[Tensor, ...]:
    """Stack per-image ground truth: boxes (B, G, 4), labels (B, G), mask (B, G) bool.

    G is the largest box count in the batch; padded entries are zero boxes with mask False.
    """
    boxes = pad_sequence([t.boxes.reshape(-1, 4) for t in targets], batch_first=True)
    labels = pad_sequence([t.labels.reshape(-1) for t in targets], batch_first=True)
    counts = torch.tensor([len(t.labels) for t in targets], device=device)
    mask = torch.arange(boxes.shape[1], device=device) < counts[:, None]
    return boxes.to(device, torch.float32), labels.to(device, torch.int64), mask


def batched_iou(anchors: AnchorSet, gt_boxes: Tensor) -> Tensor:
    """(B, A, G) IoU of every prior with every image's (padded) ground-truth boxes (B, G, 4)."""
    batch, num_gt = gt_boxes.shape[:2]
    iou = box_iou(anchors.boxes, gt_boxes.reshape(-1, 4)).view(-1, batch, num_gt)
    return iou.permute(1, 0, 2)


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
    num_gt = gt_boxes.shape[1]
    iou = batched_iou(anchors, gt_boxes)
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
class DenseTargets:
    """Training targets of a batch, aligned with the flattened priors (every family).

    labels: (B, A) int64, background = num_classes; label_weights: (B, A) float, 1 on valid
    priors (0 outside the image and in RetinaNet's ignore band; FCOS: 1 everywhere);
    bbox_targets: (B, A, 4) xyxy pixels (zero off positives); pos_mask: (B, A) bool;
    matched_idxs: (B, A) int64 (see the sentinels above); num_pos: scalar float, the
    positives (see `build_targets`), >= 1.
    """

    labels: Tensor
    label_weights: Tensor
    bbox_targets: Tensor
    pos_mask: Tensor
    matched_idxs: Tensor
    num_pos: Tensor
    centerness: Tensor | None = None  # (B, A) ATSS/FCOS centerness targets, 0 off positives
    centerness_sum: Tensor | None = None  # their sum, averaged across processes (one reduce)


@torch.no_grad()
def build_targets(
    matched_idxs: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    num_classes: int,
    reduce_mean: ReduceMean | None = None,
    min_one_per_image: bool = True,
) -> DenseTargets:
    """Gather each positive prior's box and label (MMDetection's `get_targets`).

    matched_idxs: (B, A) from an assigner; gt_boxes (B, G, 4); gt_labels (B, G).
    num_pos counts at least 1 per image when `min_one_per_image` (GFL, ATSS), else the plain
    total (RetinaNet, FCOS), then is averaged across processes by `reduce_mean` (identity when
    None) and floored at 1. Weight 0 only where matched_idxs is OUT_OF_IMAGE or IGNORED.
    """
    pos = matched_idxs >= 0
    index = matched_idxs.clamp(min=0)
    if gt_boxes.shape[1] == 0:  # nothing to gather from; no anchor is positive
        gt_boxes = gt_boxes.new_zeros(gt_boxes.shape[0], 1, 4)
        gt_labels = gt_labels.new_zeros(gt_labels.shape[0], 1)
    labels = torch.where(pos, gt_labels.gather(1, index), num_classes)
    boxes = gt_boxes.gather(1, index[..., None].expand(-1, -1, 4))
    boxes = boxes.masked_fill(~pos[..., None], 0.0)
    per_image = pos.sum(1)
    num_pos = (per_image.clamp(min=1) if min_one_per_image else per_image).sum().float()
    if reduce_mean is not None:
        num_pos = reduce_mean(num_pos)
    return DenseTargets(
        labels=labels,
        label_weights=(matched_idxs >= NEGATIVE).to(torch.float32),
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
    return boxes if max_shape is None else clamp_to_image(boxes, max_shape)


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


@torch.no_grad()
def max_iou_assign(
    anchors: AnchorSet,
    valid: Tensor,
    gt_boxes: Tensor,
    gt_mask: Tensor,
    pos_iou: float = POS_IOU,
    neg_iou: float = NEG_IOU,
) -> Tensor:
    """MMDetection's MaxIoUAssigner as RetinaNet configures it, batched over images.

    A valid anchor whose best IoU is >= pos_iou takes that box; below neg_iou it is NEGATIVE;
    in between IGNORED. Low-quality matches (min_pos_iou=0, gt_max_assign_all): every anchor
    sharing a box's highest IoU becomes positive for it, later boxes winning, as MMDetection
    loops over boxes in order. One deliberate difference: a box no anchor overlaps at all
    (best IoU 0) gets no low-quality match, where MMDetection would make every non-overlapping
    anchor positive for it.

    anchors: A anchors; valid: (B, A) bool; gt_boxes: (B, G, 4); gt_mask: (B, G) bool.
    Returns matched_idxs (B, A) int64: box index, NEGATIVE, IGNORED or OUT_OF_IMAGE.
    """
    num_gt = gt_boxes.shape[1]
    if num_gt == 0:
        matched = torch.full_like(valid, NEGATIVE, dtype=torch.int64)
        return matched.masked_fill(~valid, OUT_OF_IMAGE)
    iou = batched_iou(anchors, gt_boxes).masked_fill(~gt_mask[:, None, :], -1.0)  # (B, A, G)
    best_iou, best_gt = iou.max(dim=2)
    matched = torch.full_like(best_gt, IGNORED)
    matched = torch.where(best_iou < neg_iou, NEGATIVE, matched)
    matched = torch.where(best_iou >= pos_iou, best_gt, matched)

    gt_best = iou.masked_fill(~valid[..., None], -1.0).amax(dim=1)  # (B, G) over valid anchors
    is_best = (iou == gt_best[:, None, :]) & (gt_best > 0)[:, None, :] & valid[..., None]
    box_index = torch.arange(num_gt, device=iou.device)
    last_best = torch.where(is_best, box_index, -1).amax(dim=2)  # (B, A): later boxes win
    matched = torch.where(last_best >= 0, last_best, matched)
    return matched.masked_fill(~valid, OUT_OF_IMAGE)


@torch.no_grad()
def fcos_assign(points: AnchorSet, gt_boxes: Tensor, gt_mask: Tensor) -> Tensor:
    """FCOS without centre sampling (MMDetection FCOSHead._get_targets_single), batched.

    A point is a candidate of a box when it lies strictly inside it and its largest distance
    to the box's sides falls in its level's regress range (FCOS_RANGES); among candidates the
    box of smallest area wins (the first on ties). Every point counts (no valid mask: FCOS
    trains its padding as background, as MMDetection does).

    Returns matched_idxs (B, A) int64: box index or NEGATIVE.
    """
    batch, num_gt = gt_boxes.shape[:2]
    num_points = points.boxes.shape[0]
    if num_gt == 0:
        return torch.full((batch, num_points), NEGATIVE, dtype=torch.int64, device=gt_boxes.device)
    ranges = torch.tensor(FCOS_RANGES[: len(points.num_per_level)], device=gt_boxes.device)
    ranges = ranges.repeat_interleave(torch.tensor(points.num_per_level, device=ranges.device), 0)
    distances = bbox_to_distance(points.centers[None, :, None, :], gt_boxes[:, None, :, :])
    inside = distances.amin(-1) > 0  # (B, A, G)
    reach = distances.amax(-1)
    in_range = (reach >= ranges[None, :, None, 0]) & (reach <= ranges[None, :, None, 1])
    areas = (gt_boxes[..., 2] - gt_boxes[..., 0]) * (gt_boxes[..., 3] - gt_boxes[..., 1])
    ok = inside & in_range & gt_mask[:, None, :]
    areas = torch.where(ok, areas[:, None, :], float("inf"))
    min_area, best_gt = areas.min(dim=2)
    return torch.where(torch.isfinite(min_area), best_gt, NEGATIVE)


def centerness_target(distances: Tensor) -> Tensor:
    """FCOS/ATSS centerness of (l, t, r, b) distances (..., 4) -> (...) in [0, 1].

    sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)); callers only use it on positives.
    """
    left_right = distances[..., [0, 2]]
    top_bottom = distances[..., [1, 3]]
    ratio = (left_right.amin(-1) / left_right.amax(-1)) * (
        top_bottom.amin(-1) / top_bottom.amax(-1)
    )
    return ratio.clamp(min=0).sqrt()


def encode_deltas(anchors: Tensor, boxes: Tensor, stds: Sequence[float]) -> Tensor:
    """MMDetection's DeltaXYWHBBoxCoder.encode (means 0): boxes -> (dx, dy, dw, dh) / stds."""
    anchor_wh = anchors[..., 2:] - anchors[..., :2]
    anchor_xy = (anchors[..., :2] + anchors[..., 2:]) / 2
    box_wh = boxes[..., 2:] - boxes[..., :2]
    box_xy = (boxes[..., :2] + boxes[..., 2:]) / 2
    deltas = torch.cat([(box_xy - anchor_xy) / anchor_wh, torch.log(box_wh / anchor_wh)], -1)
    return deltas / deltas.new_tensor(stds)


def decode_deltas(
    anchors: Tensor, deltas: Tensor, stds: Sequence[float], max_shape: Tensor | None = None
) -> Tensor:
    """MMDetection's DeltaXYWHBBoxCoder.decode (means 0, wh_ratio_clip 16/1000).

    anchors (..., 4), deltas (..., 4) -> boxes (..., 4); with max_shape ((h, w) broadcastable
    to (..., 2)) boxes are clamped to the image, as at test time.
    """
    deltas = deltas * deltas.new_tensor(stds)
    max_ratio = abs(math.log(WH_RATIO_CLIP))
    anchor_wh = anchors[..., 2:] - anchors[..., :2]
    anchor_xy = (anchors[..., :2] + anchors[..., 2:]) * 0.5
    center = anchor_xy + anchor_wh * deltas[..., :2]
    size = anchor_wh * deltas[..., 2:].clamp(min=-max_ratio, max=max_ratio).exp()
    boxes = torch.cat([center - size * 0.5, center + size * 0.5], dim=-1)
    return boxes if max_shape is None else clamp_to_image(boxes, max_shape)


def clamp_to_image(boxes: Tensor, max_shape: Tensor) -> Tensor:
    """Clamp xyxy boxes (..., 4) to [0, w] x [0, h]; max_shape (h, w) broadcastable to (..., 2)."""
    max_xy = max_shape.flip(-1).to(boxes.dtype)  # (w, h)
    return torch.minimum(boxes.clamp(min=0), torch.cat([max_xy, max_xy], dim=-1))


def anchor_grid(spec) -> AnchorGrid:
    """A ModelSpec's anchors: octave base scale, scales per octave and ratios, centred at
    (x * s, y * s) as MMDetection's AnchorGenerator (GFL, RetinaNet, ATSS)."""
    return AnchorGrid(spec.strides, spec.octave_base_scale, spec.scales_per_octave,
                      spec.anchor_ratios)  # fmt: skip


def point_grid(spec) -> AnchorGrid:
    """A ModelSpec's points: one zero-size prior at each cell centre ((x + 0.5) * s, ...), as
    MMDetection's MlvlPointGenerator (FCOS)."""
    return AnchorGrid(spec.strides, octave_base_scale=0.0, center_offset=0.5)
