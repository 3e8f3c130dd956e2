"""`crosskd export`: a checkpoint's model as an ONNX file or a torch.export program (.pt2).

The exported graph takes what evaluation feeds the model, `images` (B, 3, H, W) float32 RGB in
0-255, zero-padded on the right and bottom to multiples of 32, and `image_sizes` (B, 2) int64,
each image's unpadded (h, w); it normalises (padding set to 0 after normalising, as in
evaluation) and returns the raw per-level head outputs, P3..P7: cls_p3..cls_p7, box_p3..box_p7
and, for ATSS and FCOS, centerness_p3..centerness_p7. Decoding and NMS stay outside the graph
(`crosskd_cli.postprocess.postprocess`, or the JSON written beside the file for one's own).
TorchScript is not offered: torch deprecates it in favour of torch.export.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from crosskd_cli.api import Predictor
from crosskd_cli.data.collate import padded_size
from crosskd_cli.data.transforms import keep_ratio_size
from crosskd_cli.errors import OptionError
from crosskd_cli.runs import write_json

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

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        x = self.model.normalize(images)
        height, width = x.shape[-2:]
        rows = torch.arange(height, device=x.device)[None, :] < image_sizes[:, :1]  # (B, H)
        cols = torch.arange(width, device=x.device)[None, :] < image_sizes[:, 1:]  # (B, W)
        x = x.masked_fill(~(rows[:, None, :, None] & cols[:, None, None, :]), 0.0)
        head = self.model.head(self.model.neck(self.model.backbone(x)))
        return (*head.cls_logits, *head.box_preds, *head.centerness)


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


def export_checkpoint(checkpoint: Path, out: Path, fmt: str) -> ExportReport:
    """Write the model of `checkpoint` to `out` in `fmt`, then run the written file on check
    inputs and compare its outputs with the PyTorch model's (`max_abs_diff`)."""
    check_format(fmt)
    predictor = Predictor.load(checkpoint, torch.device("cpu"))
    graph = RawDetector(predictor.model).eval()
    images, sizes = check_inputs(predictor)
    with torch.no_grad():
        expected = graph(images, sizes)
    names = output_names(has_centerness=len(expected) == 3 * len(LEVELS))
    batch = torch.export.Dim("batch", min=1, max=1024)
    rows = torch.export.Dim("rows32", min=MIN_SIDE_32, max=MAX_SIDE // 32)
    cols = torch.export.Dim("cols32", min=MIN_SIDE_32, max=MAX_SIDE // 32)
    dynamic = ({0: batch, 2: 32 * rows, 3: 32 * cols}, {0: batch})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
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
        )
        got = _run_onnx(tmp, images, sizes)
    diff = max((a - b).abs().max().item() for a, b in zip(expected, got, strict=True))
    tmp.replace(out)
    sidecar = out.with_name(out.name + ".json")
    write_json(sidecar, describe(predictor, names, fmt))
    return ExportReport(out, sidecar, diff, tuple(images.shape))


def _run_pt2(path: Path, images: Tensor, sizes: Tensor) -> Sequence[Tensor]:
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        return loaded(images, sizes)


def _run_onnx(path: Path, images: Tensor, sizes: Tensor) -> Sequence[Tensor]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"images": images.numpy(), "image_sizes": sizes.numpy()})
    return [torch.from_numpy(output) for output in outputs]


def describe(predictor: Predictor, names: list[str], fmt: str) -> dict:
    """What a user of the exported file needs besides it: inputs, outputs, classes, and the
    model spec (family, strides, anchors, reg_max) that decoding depends on."""
    meta = predictor.meta
    return {
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
        "decode": "crosskd_cli.postprocess.postprocess(HeadOutput(cls, box, centerness), "
        "image_sizes, ModelSpec(**model)); docs/method.md describes each family's decoding",
    }


def default_path(checkpoint: Path, fmt: str) -> Path:
    return checkpoint.with_suffix(FORMATS[fmt])
