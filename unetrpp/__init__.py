"""UNETR++ (Shaker et al., arXiv 2212.04497) in PyTorch: network, weights, inference, training.

Axis order, everywhere in this package: image tensors are (B, C, Z, Y, X) and volumes are numpy
arrays (Z, Y, X), where X, Y, Z are the NIfTI voxel axes i, j, k after reorientation to the
weights' orientation (for "RAS": X runs towards the patient's right, Y towards anterior, Z towards
superior). Spacings and patch sizes are likewise (z, y, x). Only
`unetrpp.io` deals with the on-disk (i, j, k) order.
"""

import importlib

from .config import PRESETS, Preprocessing, UNETRPPConfig, get_config
from .labels import BTCV_CLASS_NAMES, BTCV_COLORS, BTCV_LABELS

# The network and inference need torch and MONAI, seconds to import: they load on first use
# (PEP 562), so that `python -m unetrpp --help` and the configs answer at once.
_ON_FIRST_USE = {
    "SegmentationResult": "inference",
    "segment": "inference",
    "UNETRPP": "model",
    "create_model": "model",
    "load_original_checkpoint": "pretrained",
    "load_pretrained": "pretrained",
}


def __getattr__(name: str):
    if name in _ON_FIRST_USE:
        value = getattr(importlib.import_module(f".{_ON_FIRST_USE[name]}", __name__), name)
        globals()[name] = value  # later look-ups find it directly
        return value
    try:  # a submodule, as `import unetrpp; unetrpp.io.load(...)`
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":  # the submodule exists but needs something missing
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ON_FIRST_USE))


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
    "load_pretrained",
    "segment",
    "SegmentationResult",
]
