"""Pure nn.Modules (backbones, FPN, heads, detector) and the factory that builds them."""

from crosskd_cli.models.backbones import ResNetBackbone, load_torchvision_weights
from crosskd_cli.models.build import BACKBONES, HEADS, build_detector, count_parameters
from crosskd_cli.models.dense_head import DenseHead
from crosskd_cli.models.detector import Detector
from crosskd_cli.models.fpn import FPN
from crosskd_cli.models.gfl_head import GFLHead

__all__ = [
    "BACKBONES",
    "HEADS",
    "FPN",
    "DenseHead",
    "Detector",
    "GFLHead",
    "ResNetBackbone",
    "build_detector",
    "count_parameters",
    "load_torchvision_weights",
]
