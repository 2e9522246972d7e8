"""Cost of a network: parameters by component and multiply-accumulates (MACs) by module.

Convention: `torch.utils.flop_counter` counts 2 FLOPs per multiply-add (convolutions, matmuls,
linear layers) and ignores norms, softmax and element-wise ops. The UNETR++ paper's "FLOPs" are
multiply-accumulates counted by fvcore, so MACs = FLOPs / 2 here; fvcore also counts a few
element-wise ops, which is why it reports 47.89 G for synapse where this gives 47.47 G.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

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
    import copy

    if next(model.parameters()).device.type == "meta":
        return model
    with torch.device("meta"):
        clone = type(model)(model.config) if hasattr(model, "config") else copy.deepcopy(model).to("meta")
    clone.deep_supervision = getattr(model, "deep_supervision", False)
    return clone.eval()
