"""`crosskd export`: a checkpoint's model as an ONNX file or a torch.export program (.pt2).

The exported graph takes what evaluation feeds the model, `images` (B, 3, H, W) float32 RGB in
0-255, zero-padded on the right and bottom to multiples of 32, and `image_sizes` (B, 2) int64,
each image's unpadded (h, w); it normalises (padding set to 0 after normalising, as in
evaluation) and returns the raw per-level head outputs, P3..P7: cls_p3..cls_p7, box_p3..box_p7
and, for ATSS and FCOS, centerness_p3..centerness_p7. Decoding and NMS then stay outside the
graph (`crosskd_cli.inference.postprocess.postprocess`, or the JSON written beside the file
for one's own). With `nms`, the graph goes on through evaluation's post-processing
(`postprocess.postprocess_padded`: the same decoding code, then one torchvision NMS call, which
ONNX exports as NonMaxSuppression) and returns the final detections in fixed-size tensors:
boxes (B, 100, 4) xyxy in the pixels of the resized image as fed, scores (B, 100), labels
(B, 100) int64 and num_detections (B,) int64; rows past an image's count are 0 (labels -1).
TorchScript is not offered: torch deprecates it in favour of torch.export.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from crosskd_cli.data.collate import padded_size
from crosskd_cli.data.transforms import keep_ratio_size
from crosskd_cli.detection.structures import HeadOutput
from crosskd_cli.errors import OptionError
from crosskd_cli.families import get_family
from crosskd_cli.inference.postprocess import (
    MAX_PER_IMAGE,
    PRE_NMS_TOP_K,
    SCORE_THR,
    postprocess,
    postprocess_padded,
)
from crosskd_cli.inference.predictor import Predictor
from crosskd_cli.storage.files import atomic_path, write_json

FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
LEVELS = ("p3", "p4", "p5", "p6", "p7")
MAX_SIDE = 8192  # the largest padded side the exported graph accepts (data.scale's bound)
# The smallest, in multiples of 32: below 160 px, P7 is a single cell, which torch.export
# traces as another graph (a size-1 dimension is specialised).
MIN_SIDE_32 = 5


class RawDetector(nn.Module):
    """A Detector as a graph of tensors: (images, image_sizes) -> the flat tuple of raw
    per-level outputs named by `output_names`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def head_output(self, images: Tensor, image_sizes: Tensor) -> HeadOutput:
        x = self.model.normalize(images)
        height, width = x.shape[-2:]
        rows = torch.arange(height, device=x.device)[None, :] < image_sizes[:, :1]  # (B, H)
        cols = torch.arange(width, device=x.device)[None, :] < image_sizes[:, 1:]  # (B, W)
        x = x.masked_fill(~(rows[:, None, :, None] & cols[:, None, None, :]), 0.0)
        return self.model.head(self.model.neck(self.model.backbone(x)))

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        head = self.head_output(images, image_sizes)
        return (*head.cls_logits, *head.box_preds, *head.centerness)


class DetectingDetector(RawDetector):
    """With `--nms`: (images, image_sizes) -> the final detections of evaluation's
    post-processing (`postprocess`'s decoding, thresholds and NMS), in fixed-size tensors:
    boxes (B, M, 4) xyxy in the padded image's pixels, scores (B, M), labels (B, M) int64,
    num_detections (B,) int64 (M = MAX_PER_IMAGE; rows past num_detections are 0, label -1)."""

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        head = self.head_output(images, image_sizes)
        return postprocess_padded(head, image_sizes, self.model.spec)


DETECTION_OUTPUTS = ["boxes", "scores", "labels", "num_detections"]


def output_names(has_centerness: bool) -> list[str]:
    kinds = ("cls", "box", "centerness") if has_centerness else ("cls", "box")
    return [f"{kind}_{level}" for kind in kinds for level in LEVELS]


@dataclass
class ExportReport:
    path: Path
    sidecar: Path
    max_abs_diff: float  # exported file vs the PyTorch model on a check input
    check_shape: tuple[int, ...]


def check_format(fmt: str) -> None:
    """An unknown format, or onnx without its packages, before any work."""
    if fmt not in FORMATS:
        raise OptionError(
            f"--format '{fmt}' is not known.", hint=f"Use one of: {', '.join(FORMATS)}."
        )
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if fmt == "onnx" and missing:
        raise OptionError(
            f"--format onnx needs the package(s) {', '.join(missing)}, not installed here.",
            hint="pip install 'crosskd-cli[export]' (or use --format pt2, which needs nothing).",
        )


def check_inputs(predictor: Predictor, batch: int = 2) -> tuple[Tensor, Tensor]:
    """Example inputs: `batch` images at the checkpoint's test scale (a landscape 4:3 image
    resized as evaluation would, padded to at least the smallest side the graph takes), the
    others smaller so that the padding mask is exercised."""
    scale = tuple(predictor.meta.image_scale)
    height, width = keep_ratio_size(3 * max(scale), 4 * max(scale), scale)
    rows, cols = padded_size(height, width)
    padded = max(rows, 32 * MIN_SIDE_32), max(cols, 32 * MIN_SIDE_32)
    sizes = torch.tensor([[height, width]] + [[height - 16, width - 24]] * (batch - 1))
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((batch, 3, *padded), generator=generator) * 255
    for k, (h, w) in enumerate(sizes.tolist()):
        images[k, :, h:, :] = 0
        images[k, :, :, w:] = 0
    return images, sizes


def export_checkpoint(checkpoint: Path, out: Path, fmt: str, nms: bool = False) -> ExportReport:
    """Write the model of `checkpoint` to `out` in `fmt` (with `nms`, its post-processing too),
    then run the written file on check inputs and compare its outputs with the PyTorch model's
    (`max_abs_diff`; with `nms`, of boxes and scores, infinite when the detections differ in
    number or labels)."""
    check_format(fmt)
    predictor = Predictor.load(checkpoint, torch.device("cpu"))
    graph = (DetectingDetector if nms else RawDetector)(predictor.model).eval()
    images, sizes = check_inputs(predictor)
    if nms:  # the file is checked against evaluation's postprocess (detections_diff)
        names = DETECTION_OUTPUTS
    else:
        with torch.no_grad():
            expected = graph(images, sizes)
        names = output_names(has_centerness=len(expected) == 3 * len(LEVELS))
    batch = torch.export.Dim("batch", min=1, max=1024)
    rows = torch.export.Dim("rows32", min=MIN_SIDE_32, max=MAX_SIDE // 32)
    cols = torch.export.Dim("cols32", min=MIN_SIDE_32, max=MAX_SIDE // 32)
    dynamic = ({0: batch, 2: 32 * rows, 3: 32 * cols}, {0: batch})
    # written beside `out` and checked there; it replaces `out` only once it ran
    with atomic_path(out) as tmp, warnings.catch_warnings():
        # torchvision's nms meta kernel calls a torch API torch has since renamed
        warnings.filterwarnings("ignore", "`create_unbacked_symint` is deprecated", FutureWarning)
        program = torch.export.export(graph, (images, sizes), dynamic_shapes=dynamic)
        if fmt == "pt2":
            torch.export.save(program, tmp)
            got = _run_pt2(tmp, images, sizes)
        else:
            torch.onnx.export(
                program,
                (images, sizes),
                tmp,
                input_names=["images", "image_sizes"],
                output_names=names,
                external_data=False,
                verbose=False,  # its "[torch.onnx] ..." progress lines are not ours to print
            )
            got = _run_onnx(tmp, images, sizes)
    if nms:
        diff = detections_diff(predictor, images, sizes, got)
    else:
        diff = max((a - b).abs().max().item() for a, b in zip(expected, got, strict=True))
    sidecar = out.with_name(out.name + ".json")
    write_json(sidecar, describe(predictor, names, fmt, nms))
    return ExportReport(out, sidecar, diff, tuple(images.shape))


def detections_diff(
    predictor: Predictor, images: Tensor, sizes: Tensor, got: Sequence[Tensor]
) -> float:
    """Max abs diff of an --nms graph's boxes and scores to `postprocess` on the PyTorch model
    (as evaluation runs it), infinite when an image's detections differ in number or labels."""
    image_sizes = [tuple(size) for size in sizes.tolist()]
    with torch.no_grad():
        head = predictor.model(images, image_sizes).head
    expected = postprocess(head, image_sizes, predictor.model.spec)
    boxes, scores, labels, counts = got
    diff = 0.0
    for k, dets in enumerate(expected):
        count = int(counts[k])
        if count != dets.labels.numel() or not torch.equal(labels[k, :count], dets.labels):
            return float("inf")
        if count:
            diff = max(
                diff,
                (boxes[k, :count] - dets.boxes).abs().max().item(),
                (scores[k, :count] - dets.scores).abs().max().item(),
            )
    return diff


def _run_pt2(path: Path, images: Tensor, sizes: Tensor) -> Sequence[Tensor]:
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        return loaded(images, sizes)


def _run_onnx(path: Path, images: Tensor, sizes: Tensor) -> Sequence[Tensor]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"images": images.numpy(), "image_sizes": sizes.numpy()})
    return [torch.from_numpy(output) for output in outputs]


def describe(predictor: Predictor, names: list[str], fmt: str, nms: bool = False) -> dict:
    """What a user of the exported file needs besides it: inputs, outputs, classes, and the
    model spec (family, strides, anchors, reg_max) that decoding depends on, or with `nms` the
    post-processing settings baked into the graph."""
    meta = predictor.meta
    described = {
        "format": fmt,
        "inputs": {
            "images": "(B, 3, H, W) float32 RGB 0-255, zero-padded right/bottom to multiples "
            "of 32 (each side at least 160)",
            "image_sizes": "(B, 2) int64, each image's unpadded (h, w)",
        },
        "outputs": names,
        "test_scale": list(meta.image_scale),
        "class_names": list(meta.class_names),
        "category_ids": list(meta.category_ids),
        "model": asdict(meta.model),
    }
    if not nms:
        described["decode"] = (
            "crosskd_cli.inference.postprocess.postprocess(HeadOutput(cls, box, centerness), "
            "image_sizes, ModelSpec(**model)); docs/method.md describes each family's decoding"
        )
        return described
    described["detections"] = {
        "boxes": f"(B, {MAX_PER_IMAGE}, 4) float32 xyxy in the pixels of the resized image "
        "as fed (divide x by its scale sx and y by sy for the original image)",
        "scores": f"(B, {MAX_PER_IMAGE}) float32, highest first",
        "labels": f"(B, {MAX_PER_IMAGE}) int64 indices into class_names",
        "num_detections": "(B,) int64: image b's detections are its first num_detections[b] "
        "rows; the rest are 0, labels -1",
    }
    described["postprocess"] = {
        "score_thr": SCORE_THR,
        "pre_nms_top_k": PRE_NMS_TOP_K,
        "nms_iou": get_family(meta.model.family).nms_iou,
        "max_per_image": MAX_PER_IMAGE,
    }
    return described


def default_path(checkpoint: Path, fmt: str) -> Path:
    return checkpoint.with_suffix(FORMATS[fmt])
