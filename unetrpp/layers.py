"""Convolutional building blocks of UNETR++ (paper Fig. 2, the parts that are not attention).

They reuse MONAI's DynUNet blocks, as the original does, so module and parameter names match the
released checkpoints (`conv1.conv.weight`, `transp_conv.conv.weight`, `out1.conv.conv.weight`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.blocks.dynunet_block import UnetOutBlock, UnetResBlock, get_conv_layer
from torch import nn


def ResBlock(in_channels: int, out_channels: int, norm: str = "instance") -> UnetResBlock:
    """MONAI's UnetResBlock: 3x3x3 conv, norm, LeakyReLU(0.01), 3x3x3 conv, norm, + residual (a 1x1x1
    conv and its own norm when the widths differ), LeakyReLU."""
    return UnetResBlock(3, in_channels, out_channels, kernel_size=3, stride=1, norm_name=norm)


def OutBlock(in_channels: int, classes: int) -> UnetOutBlock:
    """1x1x1 conv to class logits."""
    return UnetOutBlock(3, in_channels, classes)


def Downsample(in_channels: int, out_channels: int, stride: Sequence[int], groups: int) -> nn.Sequential:
    """Strided conv (kernel = stride, no bias) then GroupNorm, as in the original encoder."""
    return nn.Sequential(
        get_conv_layer(3, in_channels, out_channels, kernel_size=stride, stride=stride, conv_only=True),
        nn.GroupNorm(groups, out_channels),
    )


class UpBlock(nn.Module):
    """Transposed conv (kernel = stride), add the encoder skip, then `blocks` (decoder stage)."""

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int], blocks: nn.Module) -> None:
        super().__init__()
        self.transp_conv = get_conv_layer(3, in_channels, out_channels, kernel_size=stride, stride=stride,
                                          conv_only=True, is_transposed=True)
        self.decoder_block = nn.ModuleList([blocks])  # a list of one, for the original key names

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.transp_conv(x)
        up += skip  # in place: saves a full-resolution buffer, and the gradient does not need `up`
        return self.decoder_block[0](up)
