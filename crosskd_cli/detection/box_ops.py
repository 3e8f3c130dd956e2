"""Box geometry on tensors: distance and delta encodings, the DFL integral, aligned IoU, clamping.

Differentiable: the losses decode through them. As MMDetection 3.x computes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DISTANCE_EPS = 0.1  # encoded distances stop at reg_max - 0.1 so the right DFL bin exists


IOU_EPS = 1e-6  # union floor of the aligned IoU, as MMDetection's bbox_overlaps


WH_RATIO_CLIP = 16 / 1000  # delta decoding clamps log(w / w_anchor) to +-|log(this)|


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
