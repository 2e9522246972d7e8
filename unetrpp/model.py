"""The UNETR++ network (paper Sec. 3, Fig. 2): a hierarchical encoder of EPA TransformerBlocks, a
decoder that adds skips and refines with more TransformerBlocks, and a full-resolution conv path.

Module names follow the original code (`unetr_pp_encoder.stages`, `decoder5`, `conv51`, ...), so
the released checkpoints load without renaming.
"""

from __future__ import annotations

from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .attention import TransformerBlock
from .config import UNETRPPConfig, get_config
from .layers import Downsample, OutBlock, ResBlock, UpBlock


def _stage(cfg: UNETRPPConfig, grid: tuple[int, int, int], dim: int, proj_size: int, depth: int) -> nn.Sequential:
    return nn.Sequential(*[
        TransformerBlock(grid, dim, proj_size, cfg.num_heads, kv_projection=cfg.kv_projection,
                         branch_fusion=cfg.branch_fusion, attn_dropout=cfg.attn_dropout,
                         conv_dropout=cfg.conv_dropout, extra_conv=cfg.extra_conv,
                         layer_scale_init=cfg.layer_scale_init)
        for _ in range(depth)
    ])


class Encoder(nn.Module):
    """Stem (patchify by `stem`), then four stages; stage i+1 halves the grid and widens the channels (dims).

    Returns the four stage outputs (B, dims[i], *stage_grid(i)).
    """

    def __init__(self, cfg: UNETRPPConfig) -> None:
        super().__init__()
        dims = cfg.dims
        self.downsample_layers = nn.ModuleList(
            [Downsample(cfg.in_channels, dims[0], cfg.stem, groups=cfg.in_channels)]
            + [Downsample(dims[i - 1], dims[i], (2, 2, 2), groups=dims[i - 1]) for i in range(1, 4)]
        )
        self.stages = nn.ModuleList(
            [_stage(cfg, cfg.stage_grid(i), dims[i], cfg.proj_sizes[i], cfg.depths[i]) for i in range(4)]
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        hidden = []
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
            hidden.append(x)
        return hidden


class UNETRPP(nn.Module, PyTorchModelHubMixin, library_name="unetrpp", tags=["medical-imaging", "segmentation",
                                                                            "unetr-plus-plus", "3d"]):
    """UNETR++ for inputs (B, in_channels, *patch_size) -> logits (B, out_channels, *patch_size).

    With `deep_supervision` (from the config; an attribute you may switch) the forward returns
    [full resolution, decoder3 grid, decoder4 grid] logits: patch / stem and patch / (2 x stem), e.g.
    64x128x128, 32x32x32 and 16x16x16 for the synapse network.
    """

    def __init__(self, config: UNETRPPConfig | dict[str, Any]) -> None:
        super().__init__()
        cfg = config if isinstance(config, UNETRPPConfig) else UNETRPPConfig.from_dict(config)
        self.config = cfg
        self.deep_supervision = cfg.deep_supervision
        f, dims = cfg.feature_size, cfg.dims
        self.unetr_pp_encoder = Encoder(cfg)
        self.encoder1 = ResBlock(cfg.in_channels, f)  # full-resolution conv path
        self.decoder5 = UpBlock(dims[3], dims[2], (2, 2, 2),
                                _stage(cfg, cfg.stage_grid(2), dims[2], cfg.decoder_proj_size, cfg.decoder_depth))
        self.decoder4 = UpBlock(dims[2], dims[1], (2, 2, 2),
                                _stage(cfg, cfg.stage_grid(1), dims[1], cfg.decoder_proj_size, cfg.decoder_depth))
        self.decoder3 = UpBlock(dims[1], dims[0], (2, 2, 2),
                                _stage(cfg, cfg.stage_grid(0), dims[0], cfg.decoder_proj_size, cfg.decoder_depth))
        self.decoder2 = UpBlock(dims[0], f, cfg.stem, ResBlock(f, f))
        self.out1 = OutBlock(f, cfg.out_channels)
        if cfg.deep_supervision:
            self.out2 = OutBlock(dims[0], cfg.out_channels)
            self.out3 = OutBlock(dims[1], cfg.out_channels)
        self.unetr_pp_encoder.apply(_init_like_the_original)

    # The Hub mixin's loaders, with the checks hub.py makes (it and pretrained.py alone know files and hubs).
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> "UNETRPP":
        """A weights folder (config.json + model.safetensors) or a Hugging Face repo id -> the network."""
        from .hub import check_hub_source

        check_hub_source(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs: Any) -> "UNETRPP":
        """huggingface_hub's loader, strict unless asked otherwise: a missing tensor is an error, not a
        randomly initialised layer."""
        from .hub import check_hub_config

        check_hub_config(kwargs)
        return super()._from_pretrained(strict=strict, **kwargs)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> Any:
        """The README.md of save_pretrained and push_to_hub: the Hub's metadata, our text (SYNTHETIC weights
        say so, the paper, how to use them) instead of its blank template."""
        from .pretrained import model_card

        card = super().generate_model_card(*args, **kwargs)
        if self.config.synthetic:
            card.data.tags = [*(card.data.tags or []), "synthetic-data"]
        card.text = "\n" + model_card(self.config)
        return card

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self._check_input(x)
        # Local names as in the original's forward: enc1..enc4 are encoder stages 0..3, decoder5 makes
        # dec3 on stage 2's grid, ..., and encoder1 is the full-resolution conv path, not a stage.
        enc1, enc2, enc3, enc4 = self.unetr_pp_encoder(x)  # grids: stage_grid(0..3)
        dec3 = self.decoder5(enc4, enc3)  # (B, dims[2], *stage_grid(2))
        dec2 = self.decoder4(dec3, enc2)  # (B, dims[1], *stage_grid(1))
        dec1 = self.decoder3(dec2, enc1)  # (B, dims[0], *stage_grid(0))
        out = self.decoder2(dec1, self.encoder1(x))  # (B, feature_size, *patch_size)
        if self.deep_supervision:
            if not hasattr(self, "out2"):
                raise ValueError("deep_supervision=True, but this network was built without the extra output "
                                 "heads; build it with create_model(..., deep_supervision=True)")
            return [self.out1(out), self.out2(dec1), self.out3(dec2)]
        return self.out1(out)

    def _check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels or tuple(x.shape[2:]) != cfg.patch_size:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit {cfg.name}: expected (B, {cfg.in_channels}, "
                f"{', '.join(map(str, cfg.patch_size))}), since the positional embeddings and E/F are sized for "
                "one patch; run larger volumes through unetrpp.inference (sliding window) or build the model "
                "with another patch_size"
            )


def _init_like_the_original(m: nn.Module) -> None:
    """The original re-initialises only its encoder's Linear layers (truncated normal, std 0.02, zero
    bias; LayerNorms keep 1 and 0); every convolution, and the decoder, keep PyTorch's default init."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def create_model(name: str, **overrides: Any) -> UNETRPP:
    """A randomly initialised preset network, e.g. `create_model("unetrpp_synapse")`.

    `overrides` replace config fields (`create_model("unetrpp_tiny", out_channels=4)`). Load trained
    weights with `unetrpp.pretrained.load_pretrained` or `load_original_checkpoint` instead.
    """
    return UNETRPP(get_config(name, **overrides))
