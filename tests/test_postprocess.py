"""GFL post-processing: threshold, per-level top-k, decode and clamp, class-wise NMS, top 100."""

from __future__ import annotations

import pytest
import torch

from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.detection.structures import HeadOutput
from crosskd_cli.inference.postprocess import (
    candidates,
    postprocess,
    postprocess_padded,
    scale_boxes_to_original,
)

# Two levels on a 64 x 64 batch: stride 8 -> 8 x 8 map, stride 16 -> 4 x 4 map; 2 classes
SPEC = ModelSpec(num_classes=2, strides=(8, 16), reg_max=16)
SIZES = [(8, 8), (4, 4)]
SILENT = -10.0  # sigmoid 4.5e-5: far below the 0.05 threshold


def head(batch: int = 1, side_bin: int = 3) -> HeadOutput:
    """Silent class logits; every box side's distribution one-hot at `side_bin` (x stride px)."""
    cls = [torch.full((batch, 2, h, w), SILENT) for h, w in SIZES]
    one_hot = torch.zeros(4, 17)
    one_hot[:, side_bin] = 1e4
    box = [one_hot.reshape(1, 68, 1, 1).expand(batch, 68, h, w).clone() for h, w in SIZES]
    return HeadOutput(cls, box)


def test_nms_removes_an_overlapping_duplicate_of_the_same_class_only():
    out = head(side_bin=3)  # 3 bins x stride 8 = 24 px on every side
    out.cls_logits[0][0, 0, 4, 4] = 2.0  # centre (32, 32) -> [8, 8, 56, 56]
    out.cls_logits[0][0, 0, 4, 5] = 1.0  # centre (40, 32) -> [16, 8, 64, 56], IoU 0.71 > 0.6
    out.cls_logits[0][0, 1, 4, 5] = 0.0  # the same box for class 1: another class, kept
    (dets,) = postprocess(out, [(64, 64)], SPEC)
    assert dets.boxes.tolist() == [[8.0, 8.0, 56.0, 56.0], [16.0, 8.0, 64.0, 56.0]]
    assert dets.labels.tolist() == [0, 1]
    assert dets.scores.tolist() == pytest.approx([torch.sigmoid(torch.tensor(2.0)).item(), 0.5])


def test_scores_at_or_below_the_threshold_are_dropped():
    out = head()
    out.cls_logits[0][0, 0, 1, 1] = -2.7515  # sigmoid 0.060
    out.cls_logits[1][0, 1, 2, 2] = -3.1781  # sigmoid 0.040
    (dets,) = postprocess(out, [(64, 64)], SPEC, score_thr=0.05)
    assert dets.labels.tolist() == [0]
    assert dets.scores.tolist() == pytest.approx([0.06], abs=1e-4)


def test_at_most_100_detections_per_image_the_highest_scores_first():
    # 16 px boxes on the stride-8 level only: even clamped at the border no two overlap more
    # than IoU 0.5, so all 8 x 8 x 2 = 128 candidates survive NMS and the cap decides
    out = head(side_bin=1)
    out.cls_logits[0].copy_(torch.rand(1, 2, 8, 8, generator=torch.Generator().manual_seed(0)))
    (dets,) = postprocess(out, [(64, 64)], SPEC)
    assert len(dets.scores) == 100
    assert torch.equal(dets.scores, out.cls_logits[0].sigmoid().reshape(-1).topk(100).values)


def test_only_the_top_k_pairs_of_each_level_enter_nms():
    out = head(side_bin=1)
    gen = torch.Generator().manual_seed(0)
    for level in out.cls_logits:
        level.copy_(torch.rand(level.shape, generator=gen))
    (dets,) = postprocess(out, [(64, 64)], SPEC, pre_nms_top_k=3)
    expected = [c.sigmoid().reshape(-1).topk(3).values for c in out.cls_logits]
    assert torch.equal(dets.scores, torch.cat(expected).sort(descending=True).values)


def test_boxes_are_clamped_to_each_images_unpadded_size():
    out = head(batch=2, side_bin=3)
    out.cls_logits[0][:, 0, 4, 5] = 1.0  # centre (40, 32) -> [16, 8, 64, 56] before clamping
    first, second = postprocess(out, [(40, 48), (64, 64)], SPEC)  # (h, w) per image
    assert first.boxes.tolist() == [[16.0, 8.0, 48.0, 40.0]]
    assert second.boxes.tolist() == [[16.0, 8.0, 64.0, 56.0]]


def test_a_box_that_clamps_to_zero_width_is_dropped_and_an_empty_image_has_typed_empties():
    out = head(side_bin=1)
    out.cls_logits[0][0, 0, 0, 7] = 3.0  # centre (56, 0) -> [48, -8, 64, 8] -> x clamps to 48
    (dets,) = postprocess(out, [(40, 48)], SPEC)
    assert dets.boxes.shape == (0, 4) and dets.scores.shape == (0,)
    assert dets.labels.dtype == torch.int64


def test_scale_boxes_to_original_divides_by_each_axis_scale():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    assert scale_boxes_to_original(boxes, (0.5, 2.0)).tolist() == [[20.0, 10.0, 60.0, 20.0]]


# RetinaNet's 9 anchors per location (3 scales x 3 ratios), 3 classes
RETINANET = ModelSpec(
    family="retinanet",
    num_classes=3,
    octave_base_scale=4,
    scales_per_octave=3,
    anchor_ratios=(0.5, 1.0, 2.0),
)
RETINA_SIDES = [16, 8, 4, 2, 1]  # a 128 x 128 batch, strides 8..128


def retinanet_head(centre: float, spread: float, dtype: torch.dtype) -> HeadOutput:
    gen = torch.Generator().manual_seed(0)
    cls = [
        (torch.randn(2, 27, s, s, generator=gen) * spread + centre).to(dtype) for s in RETINA_SIDES
    ]
    box = [torch.randn(2, 36, s, s, generator=gen) * 0.2 for s in RETINA_SIDES]
    return HeadOutput(cls, box)


CASES = [
    (-3.5, 0.4, torch.float32),  # ~12% within reach of the threshold: the selection by logit
    (-3.5, 0.4, torch.bfloat16),  # the same with half-precision logits (many equal scores)
    (-1.0, 1.0, torch.float32),  # most pass (an untrained head): every pair's top k
]


@pytest.mark.parametrize(("centre", "spread", "dtype"), CASES)
def test_image_by_image_selection_keeps_the_pairs_of_the_fixed_shape_top_k(centre, spread, dtype):
    """`postprocess` picks each level's pairs above the threshold first, then their top 1000
    (fast when few pass); the exported graph's fixed-shape path takes the top 1000 of every
    pair, then the threshold. The same pairs, right at the threshold too."""
    out = retinanet_head(centre, spread, dtype)
    near = sum(((c.float().sigmoid() - 0.05).abs() < 1e-3).sum().item() for c in out.cls_logits)
    assert near > 20  # pairs within 0.001 of the threshold, on either side
    max_shape = torch.tensor([[[128.0, 128.0]], [[100.0, 120.0]]])
    every = candidates(out, max_shape, RETINANET, 1000)
    for b in range(2):
        picked = candidates(out.image(b), max_shape[b : b + 1], RETINANET, 1000, score_thr=0.05)
        cls_scores, _, labels, boxes = (x[0] for x in picked)
        above = every[0][b] > 0.05
        assert 0 < len(labels) == above.sum() < len(every[0][b])
        ours = by_label_and_box(boxes, cls_scores, labels)
        theirs = by_label_and_box(every[3][b][above], every[0][b][above], every[2][b][above])
        assert torch.equal(ours[2], theirs[2])
        # to the last bit but one: a sigmoid rounds the tail of its vector loop differently
        torch.testing.assert_close(ours[1], theirs[1], rtol=3e-7, atol=0)
        torch.testing.assert_close(ours[0], theirs[0], rtol=3e-7, atol=1e-5)


@pytest.mark.parametrize(("centre", "spread", "dtype"), [c for c in CASES if c[2] == torch.float32])
def test_postprocess_gives_the_exported_graphs_detections(centre, spread, dtype):
    out = retinanet_head(centre, spread, dtype)
    sizes = [(128, 128), (100, 120)]
    boxes, scores, labels, counts = postprocess_padded(out, torch.tensor(sizes), RETINANET)
    for k, dets in enumerate(postprocess(out, sizes, RETINANET)):
        n = len(dets.labels)
        assert n == counts[k] > 0
        assert torch.equal(dets.labels, labels[k, :n])
        torch.testing.assert_close(dets.scores, scores[k, :n], rtol=3e-7, atol=0)
        torch.testing.assert_close(dets.boxes, boxes[k, :n], rtol=3e-7, atol=1e-5)


def by_label_and_box(boxes, scores, labels):
    """Detections sorted by (label, box, score): the order of equal scores is the selection's
    own (boxes clamped to the image border can be equal too)."""
    keys = [(labels[i].item(), *boxes[i].tolist(), scores[i].item()) for i in range(len(labels))]
    order = sorted(range(len(labels)), key=keys.__getitem__)
    return boxes[order], scores[order], labels[order]


def test_channels_last_head_outputs_give_the_same_detections():
    out = retinanet_head(-3.5, 0.4, torch.float32)
    strided = HeadOutput(
        [c.contiguous(memory_format=torch.channels_last) for c in out.cls_logits],
        [b.contiguous(memory_format=torch.channels_last) for b in out.box_preds],
    )
    sizes = [(128, 128), (100, 120)]
    expected = postprocess(out, sizes, RETINANET)
    for plain, other in zip(expected, postprocess(strided, sizes, RETINANET), strict=True):
        assert torch.equal(plain.labels, other.labels) and torch.equal(plain.boxes, other.boxes)
