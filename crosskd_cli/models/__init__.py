"""Pure nn.Modules (backbones, FPN, the dense head, detector) and the factory that builds them."""

from crosskd_cli.models.backbones import ResNetBackbone, load_torchvision_weights
from crosskd_cli.models.build import BACKBONES, build_detector, build_head, count_parameters
from crosskd_cli.models.dense_head import DenseHead
from crosskd_cli.models.detector import Detector
from crosskd_cli.models.fpn import FPN

__all__ = [
    "BACKBONES",
    "FPN",
    "DenseHead",
    "Detector",
    "ResNetBackbone",
    "build_detector",
    "build_head",
    "count_parameters",
    "load_torchvision_weights",
]
