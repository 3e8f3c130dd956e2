"""Pictures of detections: boxes with class name and score, panels side by side, PNG files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.io import decode_png, encode_png
from torchvision.utils import draw_bounding_boxes

from crosskd_cli.storage.files import atomic_path

# One colour per class label (cycled): distinct hues that keep black label text readable.
PALETTE = (
    (255, 56, 56), (255, 157, 151), (255, 112, 31), (255, 178, 29), (207, 210, 49),
    (72, 249, 10), (146, 204, 23), (61, 219, 134), (26, 147, 52), (0, 212, 187),
    (44, 153, 168), (0, 194, 255), (52, 69, 147), (100, 115, 255), (0, 24, 236),
    (132, 56, 255), (82, 0, 133), (203, 56, 255), (255, 149, 200), (255, 55, 199),
)  # fmt: skip
GAP = 4  # px of white between panels
TITLE_HEIGHT = 14  # px of the title strip above each panel (PIL's default 10 px font)
BACKGROUND = (255, 255, 255)


def class_color(label: int) -> tuple[int, int, int]:
    return PALETTE[label % len(PALETTE)]


def xywh_to_xyxy(boxes: Sequence[Sequence[float]]) -> Tensor:
    """COCO [x, y, w, h] boxes (a list, as in a results json) -> (K, 4) float64 xyxy."""
    xywh = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    return torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)


def draw_detections(
    image: Tensor,
    boxes: Tensor,
    labels: Sequence[int],
    names: Sequence[str],
    scores: Sequence[float] | None = None,
) -> Tensor:
    """image (3, H, W) uint8 RGB; boxes (K, 4) xyxy in its pixels; labels: each box's class
    label, named by `names[label]` -> a new (3, H, W) uint8 image with each box outlined in its
    class's colour under a tag 'name 0.87' (or 'name' without scores).

    Boxes are clipped to the image first: a box may reach past the edge by rounding."""
    if len(boxes) == 0:
        return image.clone()
    height, width = image.shape[-2:]
    boxes = boxes.detach().to("cpu", torch.float64).clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    tags = [
        names[label] if scores is None else f"{names[label]} {score:.2f}"
        for label, score in zip(labels, scores if scores is not None else labels, strict=True)
    ]
    return draw_bounding_boxes(
        image.cpu(),
        boxes,
        labels=tags,
        colors=[class_color(label) for label in labels],
        width=max(1, round(min(height, width) / 200)),
        label_colors="black",
        fill_labels=True,
    )


def side_by_side(panels: Sequence[Tensor], titles: Sequence[str]) -> Tensor:
    """(3, H_k, W_k) uint8 panels in a row, each under its title, on white:
    (3, TITLE_HEIGHT + max H_k, sum W_k + GAP * (len - 1))."""
    height = TITLE_HEIGHT + max(p.shape[-2] for p in panels)
    width = sum(p.shape[-1] for p in panels) + GAP * (len(panels) - 1)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    x = 0
    for panel, title in zip(panels, titles, strict=True):
        canvas.paste(Image.fromarray(panel.permute(1, 2, 0).cpu().numpy()), (x, TITLE_HEIGHT))
        draw.text((x + 2, 1), _fit(draw, font, title, panel.shape[-1] - 4), fill=0, font=font)
        x += panel.shape[-1] + GAP
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)


def _fit(draw: ImageDraw.ImageDraw, font, text: str, width: int) -> str:
    """`text`, shortened with '...' until it fits in `width` px."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def write_png(path: Path, image: Tensor) -> None:
    """(3, H, W) uint8 -> a PNG file at `path`, written atomically (temporary file, rename)."""
    data = encode_png(image.contiguous().cpu(), compression_level=9)
    with atomic_path(path, durable=False) as tmp:
        tmp.write_bytes(bytes(data.numpy()))


def read_png(path: Path) -> Tensor:
    """A PNG file -> (3, H, W) uint8 (for checking what was written)."""
    return decode_png(torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8))
