"""The dense detector: input normalisation, backbone -> FPN -> head, raw per-level outputs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from crosskd_cli.config.model_spec import ModelSpec
from crosskd_cli.detection.structures import DetectorOutput
from crosskd_cli.errors import ModelError
from crosskd_cli.models.dense_head import DenseHead


class Detector(nn.Module):
    """backbone -> neck (FPN) -> head, returning FPN features and raw head outputs (no losses).

    The attribute names `backbone`, `neck`, `head` are what checkpoint key mapping relies on
    (MMDetection's `backbone.*`, `neck.*`, `bbox_head.*`). `pixel_mean` / `pixel_std` are
    non-persistent buffers: they come from `spec`, never from a state dict.
    """

    def __init__(
        self, backbone: nn.Module, neck: nn.Module, head: DenseHead, spec: ModelSpec
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.spec = spec
        # the default dtype (float32 unless a test builds the model in float64), which
        # normalize() casts the pixels to
        mean = torch.tensor(spec.pixel_mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.pixel_std).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def normalize(self, images: Tensor, image_sizes: list[tuple[int, int]] | None = None) -> Tensor:
        """(B, 3, H, W) uint8 RGB (or float 0-255) -> float normalised, padding set to 0.

        Reorders to BGR first when `spec.to_bgr` (mean/std are given in that order). Pixels
        outside each image's unpadded (h, w) are 0 after normalising, as MMDetection pads
        after normalisation.
        """
        x = images.to(self.pixel_mean.dtype)
        if self.spec.to_bgr:
            x = x.flip(1)
        x = (x - self.pixel_mean) / self.pixel_std
        if image_sizes is None:
            return x
        if len(image_sizes) != x.shape[0]:
            raise ModelError(
                f"Got {len(image_sizes)} image sizes for a batch of {x.shape[0]} images.",
                hint="Give one unpadded (h, w) per image.",
            )
        height, width = x.shape[-2:]
        if all(h == height and w == width for h, w in image_sizes):
            return x
        return x.masked_fill(~_valid_mask(image_sizes, height, width, x.device), 0.0)

    def forward(
        self,
        images: Tensor,
        image_sizes: list[tuple[int, int]] | None = None,
        tap_index: int | None = None,
    ) -> DetectorOutput:
        """images: (B, 3, H, W) uint8 RGB zero-padded to /32; image_sizes: unpadded (h, w).

        Returns the FPN features [P3..P7] and the head's per-level outputs (with the tower taps
        at `tap_index` when given).
        """
        features = self.features(images, image_sizes)
        return DetectorOutput(features, self.head(features, tap_index=tap_index))

    def features(
        self, images: Tensor, image_sizes: list[tuple[int, int]] | None = None
    ) -> list[Tensor]:
        """The FPN features [P3..P7] alone (PKD's teacher needs no head)."""
        return self.neck(self.backbone(self.normalize(images, image_sizes)))


def _valid_mask(
    image_sizes: list[tuple[int, int]], height: int, width: int, device: torch.device
) -> Tensor:
    """(B, 1, H, W) bool mask, True inside each image's unpadded extent, False in its padding."""
    sizes = torch.tensor(image_sizes, device=device)  # (B, 2) as (h, w)
    rows = torch.arange(height, device=device)[None, :] < sizes[:, :1]  # (B, H)
    cols = torch.arange(width, device=device)[None, :] < sizes[:, 1:]  # (B, W)
    return rows[:, None, :, None] & cols[:, None, None, :]
