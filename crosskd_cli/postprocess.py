"""GFL test-time post-processing: per-level top-k, integral decode, class-wise NMS, top 100.

Mirrors MMDetection 3.x GFLHead.predict_by_feat with its GFL test config, so imported
checkpoints give the same detections: every location of the (padded) feature map competes,
scores above the threshold keep their top 1000 (location, class) pairs per level, boxes are
clamped to the unpadded image and those left with zero width or height are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from crosskd_cli.specs import ModelSpec
from crosskd_cli.structures import Detections, HeadOutput
from crosskd_cli.targets import AnchorGrid, distance_to_bbox, integral

SCORE_THR = 0.05
NMS_IOU = 0.6  # GFL and ATSS; RetinaNet and FCOS use 0.5
PRE_NMS_TOP_K = 1000  # per level
MAX_PER_IMAGE = 100


@lru_cache(maxsize=8)
def _anchor_grid(strides: tuple[int, ...], octave_base_scale: float) -> AnchorGrid:
    return AnchorGrid(strides, octave_base_scale)


def _level_candidates(
    cls_logits: Tensor,
    box_logits: Tensor,
    centers: Tensor,
    stride: int,
    reg_max: int,
    k: int,
    max_shape: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """One level's top-k (location, class) pairs of every image, decoded and clamped.

    cls_logits (B, C, H, W), box_logits (B, 4*(reg_max+1), H, W), centers (H*W, 2) pixels,
    max_shape (B, 1, 2) as (h, w) -> scores (B, k), labels (B, k), boxes (B, k, 4) xyxy.
    """
    batch, num_classes = cls_logits.shape[:2]
    scores = cls_logits.permute(0, 2, 3, 1).reshape(batch, -1).float().sigmoid()  # (B, HW*C)
    scores, index = scores.topk(min(k, scores.shape[1]), dim=1)  # sorted, highest first
    location, labels = index // num_classes, index % num_classes
    box = box_logits.permute(0, 2, 3, 1).reshape(batch, -1, box_logits.shape[1])  # (B, HW, 68)
    box = box.gather(1, location[..., None].expand(-1, -1, box.shape[-1]))
    with torch.autocast(box.device.type, enabled=False):  # fp32 decode even under autocast
        distances = integral(box.float(), reg_max) * stride  # only the kept locations
    return scores, labels, distance_to_bbox(centers[location], distances, max_shape)


@torch.no_grad()
def gfl_postprocess(
    head_out: HeadOutput,
    image_sizes: Sequence[tuple[int, int]],
    spec: ModelSpec,
    score_thr: float = SCORE_THR,
    nms_iou: float = NMS_IOU,
    pre_nms_top_k: int = PRE_NMS_TOP_K,
    max_per_image: int = MAX_PER_IMAGE,
) -> list[Detections]:
    """Raw GFL head outputs -> one `Detections` per image, in resized-image coordinates.

    head_out: per level cls (B, C, H, W) and box (B, 4*(reg_max+1), H, W) logits; image_sizes:
    each image's unpadded (h, w), the clamp bounds. Top-k and decoding run batched over images;
    NMS runs per image over its class-offset boxes (as MMCV's batched_nms does).
    """
    sizes = [tuple(x.shape[-2:]) for x in head_out.cls_logits]
    device = head_out.cls_logits[0].device
    anchors = _anchor_grid(tuple(spec.strides), float(spec.octave_base_scale))(sizes, device)
    centers_per_level = anchors.centers.split(anchors.num_per_level)
    max_shape = torch.tensor(image_sizes, dtype=torch.float32, device=device)[:, None, :]
    levels = [
        _level_candidates(cls, box, centers, stride, spec.reg_max, pre_nms_top_k, max_shape)
        for cls, box, centers, stride in zip(
            head_out.cls_logits, head_out.box_preds, centers_per_level, spec.strides, strict=True
        )
    ]
    scores, labels, boxes = (torch.cat(parts, dim=1) for parts in zip(*levels, strict=True))
    per_image = zip(boxes, scores, labels, strict=True)
    return [_nms_one_image(b, s, lab, score_thr, nms_iou, max_per_image) for b, s, lab in per_image]


def _nms_one_image(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    score_thr: float,
    nms_iou: float,
    max_per_image: int,
) -> Detections:
    """boxes (K, 4), scores (K,), labels (K,) -> the kept detections, highest score first."""
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = (scores > score_thr) & (width > 0) & (height > 0)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    order = batched_nms(boxes, scores, labels, nms_iou)[:max_per_image]
    return Detections(boxes[order], scores[order], labels[order])


def scale_boxes_to_original(boxes: Tensor, scale: tuple[float, float]) -> Tensor:
    """Resized-image xyxy boxes (K, 4) -> original image coordinates; scale = (sx, sy).

    Multiplies by the reciprocal, as MMDetection's rescale does, so the numbers match its own.
    """
    sx, sy = scale
    return boxes * boxes.new_tensor([1 / sx, 1 / sy, 1 / sx, 1 / sy])
