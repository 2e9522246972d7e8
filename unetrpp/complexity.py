"""Cost of a network: parameters by component and multiply-accumulates (MACs) by module.

Convention: `torch.utils.flop_counter` counts 2 FLOPs per multiply-add (convolutions, matmuls,
linear layers) and ignores norms, softmax and element-wise ops. The UNETR++ paper's "FLOPs" are
multiply-accumulates counted by fvcore, so MACs = FLOPs / 2 here; fvcore also counts a few
element-wise ops, which is why it reports 47.89 G for synapse where this gives 47.47 G.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import statistics
import sys
import time
from collections import Counter
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Component of a parameter, by the first pattern its name matches (paper Sec. 3 terminology).
COMPONENTS: tuple[tuple[str, str], ...] = (
    (r"\.conv5[12]\.", "TransformerBlock conv ResBlocks (conv51/conv52)"),
    (r"\.epa_block\.(E|F|EF)\b", "EPA spatial projections E/F"),
    (r"\.pos_embed$", "positional embeddings"),
    (r"\.epa_block\.qkvv\.", "EPA shared q/k/v projection (qkvv)"),
    (r"\.epa_block\.out_proj2?\.", "EPA output projections"),
    (r"\.conv8\.", "TransformerBlock 1x1 conv (conv8)"),
    (r"\.(norm|gamma|temperature2?)\b", "norms, layer scale, temperatures"),
    (r"^unetr_pp_encoder\.downsample_layers\.", "encoder downsampling convs"),
    (r"^(encoder1|decoder2)\.", "full-resolution conv path (encoder1/decoder2)"),
    (r"\.transp_conv\.", "decoder transposed convs"),
    (r"^out\d\.", "segmentation heads"),
)


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Parameters per component (shared tensors counted once), largest first."""
    counts: Counter[str] = Counter()
    for name, p in model.named_parameters():  # named_parameters() skips the shared F twin
        component = next((label for pattern, label in COMPONENTS if re.search(pattern, name)), "other")
        counts[component] += p.numel()
    return dict(counts.most_common())


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, dict[str, int]]:
    """FLOPs (2 per multiply-add) of one forward at `input_shape`, and FLOPs per top-level module.

    Runs on the meta device: nothing is computed and no memory is allocated for activations.
    """
    meta_model = _to_meta(model)
    x = torch.empty(tuple(input_shape), device="meta")
    counter = FlopCounterMode(display=False, depth=2)
    with counter, torch.no_grad():
        meta_model(x)
    per_module = {}
    for name, ops in counter.get_flop_counts().items():
        if name != "Global" and name.count(".") == 1:  # "UNETRPP.decoder5" -> "decoder5"
            per_module[name.split(".", 1)[1]] = int(sum(ops.values()))
    return int(counter.get_total_flops()), per_module


def _to_meta(model: nn.Module) -> nn.Module:
    if next(model.parameters()).device.type == "meta":
        return model
    if hasattr(model, "config") and hasattr(model, "deep_supervision"):  # UNETRPP: rebuild, no copy
        with torch.device("meta"):
            clone = type(model)(model.config)
        clone.deep_supervision = model.deep_supervision
    else:
        clone = copy.deepcopy(model).to("meta")
    return clone.eval()


# The paper's Table (Synapse, spec "Published results"): params in M, "GFLOPs" = G MACs by fvcore.
PAPER_TABLE = {
    "UNETR": {"params_M": 92.49, "GMACs": 75.76, "DSC": 78.35},
    "Swin-UNETR": {"params_M": 62.83, "GMACs": 384.2, "DSC": 83.48},
    "nnFormer": {"params_M": 150.5, "GMACs": 213.4, "DSC": 86.57},
    "UNETR++": {"params_M": 42.96, "GMACs": 47.98, "DSC": 87.22},
}

NETWORKS = ("unetrpp", "unetr", "swin_unetr")


def build_network(kind: str, input_shape: Sequence[int], name: str = "unetrpp_synapse",
                  device: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """UNETR++ (`name` preset with its patch set to the input) or a MONAI peer at the same input and
    widths as the paper compares: UNETR (feature_size 16, hidden 768) and Swin-UNETR (feature_size 48).
    `overrides` go to the UNETR++ config (e.g. deep_supervision=True)."""
    from monai.networks.nets import UNETR, SwinUNETR

    from .model import create_model

    b, c, *spatial = input_shape
    if kind == "unetrpp":
        return create_model(name, patch_size=tuple(spatial), in_channels=c, **overrides).eval()
    # UNETR cuts 16^3-voxel patches and Swin-UNETR downsamples 2x five times. MONAI's UNETR does not check
    # its input and fails deep in its decoder with a tensor-size mismatch, so both are checked here.
    multiple = {"unetr": 16, "swin_unetr": 32}.get(kind)
    if multiple and any(s % multiple or s < multiple for s in spatial):
        fit = [max(multiple, math.ceil(s / multiple) * multiple) for s in spatial]  # the next size up
        raise ValueError(f"{kind} input {tuple(spatial)}: each spatial axis must be a multiple of {multiple} "
                         f"(its {'16-voxel patches' if kind == 'unetr' else 'five 2x downsamplings'}); "
                         f"try {' x '.join(map(str, fit))}")
    with torch.device(device):
        if kind == "unetr":
            return UNETR(c, 14, img_size=tuple(spatial), feature_size=16, hidden_size=768).eval()
        if kind == "swin_unetr":
            return SwinUNETR(in_channels=c, out_channels=14, feature_size=48).eval()
    raise ValueError(f"unknown network {kind!r}; valid: {', '.join(NETWORKS)}")


def median_forward_seconds(model: nn.Module, x: torch.Tensor, repeats: int = 3, warmup: int = 1,
                           reuse_memory: bool = True) -> float:
    """Median wall time of `model(x)` under inference mode, after `warmup` untimed runs, with freed memory
    kept for reuse as `segment()` runs it (`unetrpp.fast.reuse_freed_memory`) unless `reuse_memory` is False."""
    from .fast import reuse_freed_memory

    times = []
    with torch.inference_mode(), reuse_freed_memory() if reuse_memory else contextlib.nullcontext():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (NaN where the OS does not report it)."""
    try:
        import resource
    except ImportError:  # Windows
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024**2 if sys.platform == "darwin" else 1024)
