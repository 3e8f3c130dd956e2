"""Use a checkpoint from Python: load it into a ready model, run it on images, get detections.

The public path is `crosskd_cli.api` (which exports these names):

    from crosskd_cli.api import Predictor

    model = Predictor.load("runs/distill/shapes-gfl-r34-to-r18/best.safetensors")
    for found in model.predict(["street.jpg", "park.png"], score_thr=0.3):
        for box, score, name in zip(found.boxes.tolist(), found.scores.tolist(), found.names):
            print(name, round(score, 2), box)  # box: x1, y1, x2, y2 in the image's pixels

The preprocessing and post-processing are `crosskd eval`'s (keep-ratio resize to the
checkpoint's scale, each image padded to its own multiple of 32, fp32, the family's decoding
and NMS), so an image gets the detections evaluation gives it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from crosskd_cli.checkpoints.format import CheckpointMeta, load_checkpoint, load_state_into
from crosskd_cli.data import read_image
from crosskd_cli.data.collate import collate_by_shape
from crosskd_cli.data.transforms import build_transforms, transform_sample
from crosskd_cli.detection.structures import Target
from crosskd_cli.engine.devices import resolve_device
from crosskd_cli.errors import DataError
from crosskd_cli.inference.postprocess import postprocess, scale_boxes_to_original
from crosskd_cli.models import Detector, build_detector

ImageLike = str | Path | Tensor | Image.Image | np.ndarray


@dataclass
class Prediction:
    """The detections of one image, highest score first, in the image's own pixels.

    boxes: (K, 4) float32 xyxy; scores: (K,); labels: (K,) int64, the model's contiguous class
    labels; names / category_ids: each detection's class name and original category id;
    image_size: the image's (h, w); source: its path when it was given as one.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: list[str]
    category_ids: list[int]
    image_size: tuple[int, int]
    source: str | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def to_coco(self, image_id: int) -> list[dict[str, Any]]:
        """COCO results (image_id, category_id, bbox [x, y, w, h], score), as `crosskd eval`
        writes them, plus each detection's class name."""
        xywh = torch.cat([self.boxes[:, :2], self.boxes[:, 2:] - self.boxes[:, :2]], dim=1)
        return [
            {
                "image_id": image_id,
                "category_id": category_id,
                "class_name": name,
                "bbox": box,
                "score": score,
            }
            for box, score, category_id, name in zip(
                xywh.tolist(), self.scores.tolist(), self.category_ids, self.names, strict=True
            )
        ]


class Predictor:
    """A checkpoint's model, ready to detect: `Predictor.load(path)`, then `predict(images)`."""

    def __init__(self, model: Detector, meta: CheckpointMeta, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.meta = meta
        self.device = device
        self.transforms = build_transforms(train=False, scale=tuple(meta.image_scale))

    @classmethod
    def load(cls, checkpoint: str | Path, device: str | torch.device = "auto") -> Predictor:
        """Rebuild the model from a crosskd .safetensors file alone. device: auto (the GPU if
        there is one, else the CPU), cpu, cuda, cuda:N or a torch.device."""
        state_dict, meta = load_checkpoint(checkpoint)
        model = build_detector(meta.model)
        load_state_into(model, state_dict, source=str(checkpoint))
        if not isinstance(device, torch.device):
            device = resolve_device(device)
        return cls(model, meta, device)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.class_names)

    @property
    def category_ids(self) -> list[int]:
        return list(self.meta.category_ids)

    @torch.inference_mode()
    def predict(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        score_thr: float = 0.0,
        batch_size: int = 8,
    ) -> list[Prediction]:
        """One `Prediction` per image, in order. images: paths, (3, H, W) uint8 RGB tensors,
        PIL images or (H, W, 3) uint8 arrays (or one of these). score_thr keeps detections
        scoring at least that; 0 keeps all of evaluation's (its 0.05 class-score threshold,
        top 100 per image). batch_size: images per forward (it does not change results)."""
        if isinstance(images, (str, Path, Tensor, Image.Image, np.ndarray)):
            images = [images]
        found: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            found += self.predict_tensors([as_tensor(image) for image in chunk], score_thr)
            for k, image in enumerate(chunk):
                if isinstance(image, (str, Path)):
                    found[start + k].source = str(image)
        return found

    @torch.inference_mode()
    def predict_tensors(self, images: Sequence[Tensor], score_thr: float = 0.0) -> list[Prediction]:
        """(3, H, W) uint8 RGB tensors -> one `Prediction` each, all in one pass (images of
        one padded size share a forward, as in evaluation's batches)."""
        samples = [self._prepare(image, k) for k, image in enumerate(images)]
        found: dict[int, Prediction] = {}
        for batch in collate_by_shape(samples):
            batch = batch.to(self.device)
            out = self.model(batch.images, batch.image_sizes)
            detections = postprocess(out.head, batch.image_sizes, self.meta.model)
            for dets, target in zip(detections, batch.targets, strict=True):
                found[target.image_id] = self._prediction(dets, target, score_thr)
        return [found[k] for k in range(len(images))]

    def _prepare(self, image: Tensor, index: int) -> tuple[Tensor, Target]:
        """Evaluation's test transform (`CocoDetection._sample`): the image resized, and a
        Target with no boxes carrying its index, original size and resize scale."""
        height, width = image.shape[-2:]
        no_boxes = torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64)
        resized, _, _ = transform_sample(self.transforms, image, *no_boxes)
        scale = (resized.shape[-1] / width, resized.shape[-2] / height)
        return resized, Target(*no_boxes, index, (height, width), scale)

    def _prediction(self, dets, target: Target, score_thr: float) -> Prediction:
        keep = dets.scores >= score_thr
        boxes = scale_boxes_to_original(dets.boxes[keep], target.scale).cpu()
        labels = dets.labels[keep].cpu()
        return Prediction(
            boxes,
            dets.scores[keep].cpu(),
            labels,
            [self.meta.class_names[k] for k in labels.tolist()],
            [self.meta.category_ids[k] for k in labels.tolist()],
            target.orig_size,
        )


def as_tensor(image: ImageLike) -> Tensor:
    """A path, PIL image, (H, W, 3) uint8 array or (3, H, W) uint8 tensor -> (3, H, W) uint8
    RGB, read as evaluation reads files (EXIF orientation applied, grey and RGBA to RGB)."""
    if isinstance(image, (str, Path)):
        return read_image(Path(image))
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise DataError(
                f"An image array must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}.",
                hint="Convert it first, e.g. np.asarray(PIL.Image.open(path).convert('RGB')).",
            )
        return torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous()
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise DataError(
            f"An image tensor must be (3, H, W) uint8 RGB, got {tuple(image.shape)} {image.dtype}.",
            hint="torchvision.io.decode_image(path, mode=ImageReadMode.RGB) gives one.",
        )
    return image
