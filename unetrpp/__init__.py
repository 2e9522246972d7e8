"""UNETR++ (Shaker et al., arXiv 2212.04497) in PyTorch: network, weights, inference, training.

Axis order, everywhere in this package: image tensors are (B, C, Z, Y, X) and volumes are numpy
arrays (Z, Y, X), where X, Y, Z are the NIfTI voxel axes i, j, k after reorientation to the
weights' orientation (for "RAS": X runs towards the patient's right, Y towards anterior, Z towards
superior). Spacings and patch sizes are likewise (z, y, x). Only
`unetrpp.io` deals with the on-disk (i, j, k) order.
"""

from .config import PRESETS, Preprocessing, UNETRPPConfig, get_config
from .labels import BTCV_CLASS_NAMES, BTCV_COLORS, BTCV_LABELS
from .inference import SegmentationResult, segment
from .model import UNETRPP, create_model
from .pretrained import load_original_checkpoint

__all__ = [
    "PRESETS",
    "Preprocessing",
    "UNETRPPConfig",
    "get_config",
    "BTCV_CLASS_NAMES",
    "BTCV_COLORS",
    "BTCV_LABELS",
    "UNETRPP",
    "create_model",
    "load_original_checkpoint",
    "segment",
    "SegmentationResult",
]
