"""Anchors and points: the priors of every location of every level, in MMDetection 3.x's geometry.

Anchors of stride s at location (x, y) are centred at (x * s, y * s) (FCOS points at ((x + 0.5) * s,
(y + 0.5) * s)); the anchors of one location are ordered ratio-major, then scale (MMDetection's
AnchorGenerator); levels are concatenated P3..P7, row-major (y, then x) within a level, the
anchors of a location adjacent. That is also the order in which `flatten_levels` lays out a
head's (B, A * K, H, W) outputs, so imported checkpoints see the same priors.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

_CACHE_SIZE = 32  # distinct feature-size sets kept (multi-scale training has a handful)


FeatureSizes = Sequence[tuple[int, int]]


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


def anchor_grid(spec) -> AnchorGrid:
    """A ModelSpec's anchors: octave base scale, scales per octave and ratios, centred at
    (x * s, y * s) as MMDetection's AnchorGenerator (GFL, RetinaNet, ATSS)."""
    return AnchorGrid(spec.strides, spec.octave_base_scale, spec.scales_per_octave,
                      spec.anchor_ratios)  # fmt: skip


def point_grid(spec) -> AnchorGrid:
    """A ModelSpec's points: one zero-size prior at each cell centre ((x + 0.5) * s, ...), as
    MMDetection's MlvlPointGenerator (FCOS)."""
    return AnchorGrid(spec.strides, octave_base_scale=0.0, center_offset=0.5)
