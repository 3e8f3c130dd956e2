"""Test-time post-processing of every family: per-level top-k, decode, class-wise NMS, top 100.

Mirrors MMDetection 3.x `predict_by_feat` with each family's test config, so imported
checkpoints give the same detections: every location of the (padded) feature map competes;
per level, the (prior, class) pairs whose class score passes the threshold keep their top 1000;
boxes are decoded and clamped to the unpadded image, those left with zero width or height are
dropped; ATSS and FCOS then multiply each score by its sigmoid centerness (after the threshold,
as MMDetection does) before NMS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.detection.box_coders import BoxCoder
from crosskd_cli.detection.priors import AnchorGrid, flatten_levels
from crosskd_cli.detection.structures import Detections, HeadOutput, upcast
from crosskd_cli.families import get_family

SCORE_THR = 0.05
PRE_NMS_TOP_K = 1000  # per level
MAX_PER_IMAGE = 100


@lru_cache(maxsize=8)
def _decoding(spec: ModelSpec) -> tuple[AnchorGrid, BoxCoder]:
    """The family's priors (cached per spec: they cache their grids) and box coder."""
    family = get_family(spec.family)
    return family.priors(spec), family.box_coder(spec)


def _level_candidates(
    spec: ModelSpec,
    coder: BoxCoder,
    per_location: int,
    cls_logits: Tensor,
    box_preds: Tensor,
    centerness: Tensor | None,
    priors: Tensor,
    stride: int,
    k: int,
    max_shape: Tensor,
    score_thr: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One level's top-k (prior, class) pairs of every image, decoded and clamped.

    priors (N, 4) of this level; max_shape (B, 1, 2) as (h, w) -> class scores (B, k) (the
    threshold's), final scores (B, k), labels (B, k), boxes (B, k, 4) xyxy. With `score_thr`
    (one image, B = 1): only the pairs whose class score passes it, k at most.
    """
    if score_thr is None:  # fixed shapes (the exported graph): every pair competes
        scores = upcast(flatten_levels([cls_logits], per_location).flatten(1)).sigmoid()
        # sym_min: a plain min while exporting would pin the traced image size
        scores, index = scores.topk(torch.sym_min(k, scores.shape[1]), dim=1)  # highest first
    else:  # one image: the pairs above the threshold, then their top k
        scores, index = _above_threshold_top_k(cls_logits[0], score_thr, k)
        scores, index = scores[None], index[None]
    prior, labels = index // spec.num_classes, index % spec.num_classes
    box = flatten_levels([box_preds], per_location)  # (B, N, K)
    box = box.gather(1, prior[..., None].expand(-1, -1, box.shape[-1]))
    with torch.autocast(box.device.type, enabled=False):  # fp32 decode even under autocast
        strides = torch.full(prior.shape, float(stride), device=box.device)
        boxes = coder.decode(priors[prior], strides, upcast(box), max_shape)
    final = scores
    if centerness is not None:
        factor = upcast(flatten_levels([centerness], per_location).squeeze(-1)).sigmoid()
        final = scores * factor.gather(1, prior)
    return scores, final, labels, boxes


def _above_threshold_top_k(logits: Tensor, score_thr: float, k: int) -> tuple[Tensor, Tensor]:
    """The top k of one image's (prior, class) pairs on one level among those whose class
    score passes `score_thr`: (class scores, indices into `flatten_levels`' (prior, class)
    order). logits: (K * C, H, W), the head's own layout.

    The same pairs as the fixed-shape path's top k of every pair with the threshold applied
    after, found faster when few pass (a trained head): RetinaNet's 9 anchors x 80 classes are
    2.9 million pairs per image on the stride-8 level at 512x512 (14.6 million at 1333x800),
    and a top-k selection, a sigmoid or even the reorder into (prior, class) order over all of
    them takes longer than one comparison of the logits against the threshold's logit, less a
    margin far above the rounding of a sigmoid or of a half-precision logit. The few that pass
    then meet the threshold itself, on their sigmoid, as in the fixed-shape path (a score may
    differ from that path's in its last bit: a sigmoid rounds the tail of its vector loop
    differently). When many pass (an untrained head), gathering them costs more than that
    top k, which then runs.
    """
    channels, height, width = logits.shape
    passing = logits > _logit_below(score_thr)
    if int(passing.count_nonzero()) > passing.numel() // 4:
        scores = upcast(logits.permute(1, 2, 0).reshape(-1)).sigmoid()  # (prior, class) order
        scores, index = scores.topk(min(k, scores.numel()))
    else:
        where = passing.reshape(-1).nonzero()[:, 0]  # (channel, y, x) order
        channel, location = where // (height * width), where % (height * width)
        index, order = (location * channels + channel).sort()  # (prior, class) order
        scores = upcast(logits.reshape(-1)[where[order]]).sigmoid()
    above = scores > score_thr
    scores, index = scores[above], index[above]
    if scores.numel() > k:
        scores, pick = scores.topk(k)
        index = index[pick]
    return scores, index


def _logit_below(score_thr: float, margin: float = 0.1) -> float:
    """A logit below that of `score_thr` by `margin`: every class score above the threshold
    has a logit above it (sigmoid is increasing)."""
    if score_thr <= 0.0:
        return -math.inf
    if score_thr >= 1.0:
        return math.inf  # no sigmoid in float32 exceeds 1.0
    return math.log(score_thr / (1.0 - score_thr)) - margin


@torch.no_grad()
def postprocess(
    head_out: HeadOutput,
    image_sizes: Sequence[tuple[int, int]],
    spec: ModelSpec,
    score_thr: float = SCORE_THR,
    nms_iou: float | None = None,
    pre_nms_top_k: int = PRE_NMS_TOP_K,
    max_per_image: int = MAX_PER_IMAGE,
) -> list[Detections]:
    """Raw head outputs -> one `Detections` per image, in resized-image coordinates.

    image_sizes: each image's unpadded (h, w), the clamp bounds. nms_iou: the family's
    (0.6 GFL/ATSS, 0.5 RetinaNet/FCOS) when None. On a CPU each image's pairs above the
    threshold are found first (`_above_threshold_top_k`); elsewhere top-k and decoding run
    batched over images, as in the exported graph. NMS runs per image over its class-offset
    boxes (as MMCV's batched_nms does).
    """
    device = head_out.cls_logits[0].device
    max_shape = torch.tensor(image_sizes, dtype=torch.float32, device=device)[:, None, :]
    iou = get_family(spec.family).nms_iou if nms_iou is None else nms_iou
    if device.type != "cpu":  # one top k per level for the batch, no host sync per level
        cls_scores, scores, labels, boxes = candidates(head_out, max_shape, spec, pre_nms_top_k)
        return [
            _nms_one_image(*per_image, score_thr, iou, max_per_image)
            for per_image in zip(boxes, cls_scores, scores, labels, strict=True)
        ]
    detections = []
    for b in range(len(image_sizes)):  # image by image: each keeps its own number of pairs
        found = candidates(head_out.image(b), max_shape[b : b + 1], spec, pre_nms_top_k, score_thr)
        cls_scores, scores, labels, boxes = (x[0] for x in found)
        detections.append(
            _nms_one_image(boxes, cls_scores, scores, labels, score_thr, iou, max_per_image)
        )
    return detections


def candidates(
    head_out: HeadOutput,
    max_shape: Tensor,
    spec: ModelSpec,
    pre_nms_top_k: int = PRE_NMS_TOP_K,
    score_thr: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every level's top-k (prior, class) pairs of every image, decoded and clamped, levels
    concatenated: class scores (B, K) (the threshold's), final scores (B, K), labels (B, K),
    boxes (B, K, 4) xyxy. max_shape: (B, 1, 2) float32, each image's unpadded (h, w). With
    `score_thr` (one image): only the pairs whose class score passes it.

    Traceable by torch.export with symbolic image sizes (the priors are then built in the
    graph rather than taken from the cache), so the exported post-processing is this code.
    """
    sizes = [tuple(x.shape[-2:]) for x in head_out.cls_logits]
    grid, coder = _decoding(spec)
    priors = grid(sizes, head_out.cls_logits[0].device)
    priors_per_level = priors.boxes.split(priors.num_per_level)
    centerness = head_out.centerness or [None] * len(head_out.cls_logits)
    levels = [
        _level_candidates(
            spec,
            coder,
            grid.per_location,
            cls,
            box,
            ctr,
            level_priors,
            stride,
            pre_nms_top_k,
            max_shape,
            score_thr,
        )  # fmt: skip
        for cls, box, ctr, level_priors, stride in zip(
            head_out.cls_logits,
            head_out.box_preds,
            centerness,
            priors_per_level,
            spec.strides,
            strict=True,
        )
    ]
    cls_scores, scores, labels, boxes = (torch.cat(p, dim=1) for p in zip(*levels, strict=True))
    return cls_scores, scores, labels, boxes


def _nms_one_image(
    boxes: Tensor,
    cls_scores: Tensor,
    scores: Tensor,
    labels: Tensor,
    score_thr: float,
    nms_iou: float,
    max_per_image: int,
) -> Detections:
    """boxes (K, 4), class scores / final scores / labels (K,) -> the kept detections, highest
    final score first. The threshold applies to the class score."""
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = (cls_scores > score_thr) & (width > 0) & (height > 0)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    order = batched_nms(boxes, scores, labels, nms_iou)[:max_per_image]
    return Detections(boxes[order], scores[order], labels[order])


def scale_boxes_to_original(boxes: Tensor, scale: tuple[float, float]) -> Tensor:
    """Resized-image xyxy boxes (K, 4) -> original image coordinates; scale = (sx, sy).

    Multiplies by the reciprocal, as MMDetection's rescale does, so the numbers match its own.
    """
    sx, sy = scale
    return boxes * boxes.new_tensor([1 / sx, 1 / sy, 1 / sx, 1 / sy])


def postprocess_padded(
    head_out: HeadOutput,
    image_sizes: Tensor,
    spec: ModelSpec,
    score_thr: float = SCORE_THR,
    nms_iou: float | None = None,
    pre_nms_top_k: int = PRE_NMS_TOP_K,
    max_per_image: int = MAX_PER_IMAGE,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`postprocess` for all images at once in fixed-size tensors, traceable by torch.export
    (the graph of `crosskd export --nms`).

    image_sizes: (B, 2) int64, each image's unpadded (h, w). Returns boxes (B, M, 4) xyxy in
    resized-image coordinates, scores (B, M), labels (B, M) int64 and num_detections (B,)
    int64, M = max_per_image: image b's detections fill its first num_detections[b] rows,
    highest final score first, as `postprocess` lists them; the other rows are 0 (labels -1).
    """
    max_shape = image_sizes.to(torch.float32)[:, None, :]
    cls_scores, scores, labels, boxes = candidates(head_out, max_shape, spec, pre_nms_top_k)
    iou = get_family(spec.family).nms_iou if nms_iou is None else nms_iou
    return _nms_padded(
        boxes, cls_scores, scores, labels, spec.num_classes, score_thr, iou, max_per_image
    )


def _nms_padded(
    boxes: Tensor,
    cls_scores: Tensor,
    scores: Tensor,
    labels: Tensor,
    num_classes: int,
    score_thr: float,
    nms_iou: float,
    max_per_image: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`_nms_one_image` over (B, K) candidates at once. One NMS call over every image and
    class, kept apart by coordinate offsets as torchvision's batched_nms keeps classes apart."""
    batch, slots = scores.shape[0], max_per_image
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    keep = (cls_scores > score_thr) & (width > 0) & (height > 0)  # (B, K)
    image, index = keep.nonzero(as_tuple=True)  # data-dependent count n
    kept_boxes, kept_scores = boxes[image, index], scores[image, index]  # (n, 4), (n,)
    kept_labels = labels[image, index]
    # Offsets as batched_nms's, one group per (image, class); a max over the padded boxes
    # since the kept ones may be none
    span = torch.where(keep[..., None], boxes, 0.0).max() + 1
    group = image * num_classes + kept_labels
    order = nms(kept_boxes + (group.to(boxes.dtype) * span)[:, None], kept_scores, nms_iou)
    # Group by image, each image's survivors in NMS's order (highest score first); the keys
    # are unique, so any sort (ONNX's TopK too) gives this one order
    survivors = order.numel()
    key = image[order] * survivors + torch.arange(survivors, device=image.device)
    order = order[key.argsort()]
    counts = (image[order][None, :] == torch.arange(batch, device=image.device)[:, None]).sum(1)
    starts = counts.cumsum(0) - counts  # (B,): where each image's survivors begin in `order`
    num = counts.clamp(max=slots)
    slot = torch.arange(slots, device=image.device)[None, :]  # (1, M)
    # Rows past an image's count point at an appended padding entry
    padded = torch.cat([order, order.new_full((1,), image.numel())])
    pick = padded[torch.where(slot < num[:, None], starts[:, None] + slot, order.numel())]
    return (
        torch.cat([kept_boxes, kept_boxes.new_zeros(1, 4)])[pick],
        torch.cat([kept_scores, kept_scores.new_zeros(1)])[pick],
        torch.cat([kept_labels, kept_labels.new_full((1,), -1)])[pick],
        num,
    )
