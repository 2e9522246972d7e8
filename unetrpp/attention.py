"""Efficient paired attention (EPA, paper Sec. 3.2 and Fig. 2) and the TransformerBlock around it.

EPA runs two attentions on the same shared queries and keys:
- channel attention, a (d x d) map per head over feature channels, linear in the token count N;
- spatial attention, an (N x P) map per head after projecting keys and values from N tokens down
  to P with learned Linear layers E and F (Linformer-style), again linear in N.
Shapes below: B batch, N tokens, C channels, h heads, d = C / h, P projected length. The plain
textbook form, written out step by step and checked against `EPA`: notebooks/01_epa_attention.py.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import torch
from einops import rearrange
from torch import nn

from .layers import ResBlock


# Where `capture_attention` records the maps of this thread's forward passes (None: not collecting).
# Context-local, so that one thread's capture neither sees another thread's forward passes through the
# same model (a viewer segmenting for one visitor while drawing attention for another) nor slows them down.
_CAPTURE: contextvars.ContextVar[Callable[["EPA", dict], None] | None] = contextvars.ContextVar(
    "unetrpp_attention_capture", default=None)


class EPA(nn.Module):
    """Efficient paired attention on tokens (B, N, C) -> (B, N, C).

    `kv_projection`: "separate" (E for keys, F for values), "shared" (one Linear serves as both, the
    synapse network), or "single" (one parameter matrix EF of shape (N, P), the tumor network).
    `branch_fusion`: "concat" halves each branch with out_proj/out_proj2 and concatenates them;
    "sum" (tumor) adds the two full-width branches.
    Set `store_attention = True` to keep the last attention maps in `self.attention_maps`, or use
    `capture_attention`, which collects them for its own thread only.
    """

    def __init__(self, tokens: int, dim: int, proj_size: int, heads: int, kv_projection: str = "separate",
                 branch_fusion: str = "concat", attn_dropout: float = 0.1) -> None:
        super().__init__()
        self.heads = heads
        self.kv_projection = kv_projection
        self.branch_fusion = branch_fusion
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))  # channel-attention scale per head
        self.temperature2 = nn.Parameter(torch.ones(heads, 1, 1))  # spatial-attention scale per head
        # One Linear gives queries, keys and the two value sets: q and k are shared by both branches.
        self.qkvv = nn.Linear(dim, 4 * dim, bias=False)
        if kv_projection == "single":
            bound = proj_size ** -0.5  # the original's init: uniform in +-1/sqrt(P)
            self.EF = nn.Parameter(nn.init.uniform_(torch.empty(tokens, proj_size), -bound, bound))
        else:
            self.E = nn.Linear(tokens, proj_size)
            self.F = self.E if kv_projection == "shared" else nn.Linear(tokens, proj_size)
        if branch_fusion == "concat":
            self.out_proj = nn.Linear(dim, dim // 2)  # spatial branch
            self.out_proj2 = nn.Linear(dim, dim // 2)  # channel branch
        self.attn_drop = nn.Dropout(attn_dropout)
        self.attn_drop_2 = nn.Dropout(attn_dropout)
        self.store_attention = False
        self.attention_maps: dict[str, torch.Tensor] = {}

    def keeps_attention(self) -> bool:
        """Whether this forward pass must keep its attention maps (`store_attention`, `capture_attention`)."""
        return self.store_attention or _CAPTURE.get() is not None

    def project(self, t: torch.Tensor, values: bool = False) -> torch.Tensor:
        """Project the token axis N -> P: (B, h, d, N) -> (B, h, d, P); E for keys, F for values."""
        if self.kv_projection == "single":
            return t @ self.EF  # (N, P)
        return (self.F if values else self.E)(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's EPA step by step, as the original computes it (`unetrpp.fast.FastEPA` is the same
        function computed faster for inference)."""
        B, N, C = x.shape
        q, k, v_ca, v_sa = rearrange(self.qkvv(x), "b n (four h d) -> four b h d n", four=4, h=self.heads)
        # each (B, h, d, N): channels by tokens, as the original turns them

        # The original projects k and v *before* normalising q and k; the released weights expect it.
        k_proj = self.project(k)  # (B, h, d, P)
        v_proj = self.project(v_sa, values=True)  # (B, h, d, P)
        q, k = unit_length(q), unit_length(k)  # every channel of q and k to unit length over the N tokens

        # Channel attention: which channels go together, summed over all N tokens.
        attn_ca = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)  # (B, h, d, d)
        x_ca = rearrange(self.attn_drop(attn_ca) @ v_ca, "b h d n -> b n (h d)")  # (B, N, C)

        # Spatial attention: every token against P projected "summary tokens".
        attn_sa = (q.transpose(-2, -1) @ k_proj * self.temperature2).softmax(dim=-1)  # (B, h, N, P)
        x_sa = self.attn_drop_2(attn_sa) @ v_proj.transpose(-2, -1)  # (B, h, N, d)
        # Quirk of the original (its issue #62): the output goes to (B, d, h, N), then is reshaped
        # straight to (B, N, C), which mixes tokens and channels: what query n finds for head i and
        # channel j lands in token ((j * h + i) * N + n) // C, channel n % C (C dividing N), so a
        # token's features hold the results of C consecutive queries. The released weights expect it.
        x_sa = x_sa.permute(0, 3, 1, 2).reshape(B, N, C)

        if self.keeps_attention():
            self.keep(attn_ca, attn_sa)
        return self.fuse(x_sa, x_ca)

    def keep(self, attn_ca: torch.Tensor, attn_sa: torch.Tensor) -> None:
        """Hand the maps to `store_attention` / `capture_attention`."""
        maps = {"channel": attn_ca.detach(), "spatial": attn_sa.detach()}
        if self.store_attention:
            self.attention_maps = maps
        if (record := _CAPTURE.get()) is not None:
            record(self, maps)

    def fuse(self, x_sa: torch.Tensor, x_ca: torch.Tensor) -> torch.Tensor:
        """The two branches (B, N, C) into one: summed, or each halved by its projection and concatenated."""
        if self.branch_fusion == "sum":
            return x_sa + x_ca
        return torch.cat((self.out_proj(x_sa), self.out_proj2(x_ca)), dim=-1)  # spatial half first


def unit_length(t: torch.Tensor) -> torch.Tensor:
    """t / its L2 norm over the last axis, as `F.normalize`, computed in float32 (float64 for float64):
    float16 squares overflow above 256, and such norms above 65504 (trained networks reach both)."""
    wide = t.to(torch.promote_types(t.dtype, torch.float32))
    return (wide / wide.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(t.dtype)


class TransformerBlock(nn.Module):
    """EPA with layer scale, then a conv ResBlock (or two), on a feature map (B, C, Z, Y, X).

    `grid` is the (z, y, x) token grid the positional embedding and E/F are sized for.
    """

    def __init__(self, grid: tuple[int, int, int], dim: int, proj_size: int, heads: int,
                 kv_projection: str, branch_fusion: str, attn_dropout: float, conv_dropout: float,
                 extra_conv: bool, layer_scale_init: float) -> None:
        super().__init__()
        self.grid = tuple(grid)
        tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.norm = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(layer_scale_init * torch.ones(dim))
        self.epa_block = EPA(tokens, dim, proj_size, heads, kv_projection, branch_fusion, attn_dropout)
        self.conv51 = ResBlock(dim, dim, norm="batch")
        self.conv52 = ResBlock(dim, dim, norm="batch") if extra_conv else None
        self.conv8 = nn.Sequential(nn.Dropout3d(conv_dropout), nn.Conv3d(dim, dim, kernel_size=1))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convolve(self.attend(x))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """tokens + layer-scaled EPA of their LayerNorm, back as a feature map (B, C, Z, Y, X)."""
        B, C, Z, Y, X = x.shape
        t = rearrange(x, "b c z y x -> b (z y x) c") + self.pos_embed  # (B, N, C)
        t = t + self.gamma * self.epa_block(self.norm(t))
        return rearrange(t, "b (z y x) c -> b c z y x", z=Z, y=Y, x=X)

    def convolve(self, skip: torch.Tensor) -> torch.Tensor:
        """The conv ResBlock(s) and a 1x1x1 conv, added to the map they start from."""
        a = self.conv51(skip)
        if self.conv52 is not None:
            a = self.conv52(a)
        return skip + self.conv8(a)


@contextlib.contextmanager
def capture_attention(model: nn.Module) -> Iterator[dict[str, dict]]:
    """Record every EPA block's attention maps during the forward passes run inside the block.

    Yields a dict that each forward pass fills (readable inside the block, right after the forward):
    TransformerBlock name -> {"channel": (B, h, d, d), "spatial": (B, h, N, P), "grid": (z, y, x)
    token grid, "E": (P, N) key projection}; a later forward replaces the maps of the one before.
    The effective spatial attention of query token q over all tokens is spatial[b, h, q] @ E; what
    q gathers with it is written to other tokens' features (the issue-#62 reshape in `EPA.forward`).
    Recording does not change any output. Only forward passes run by this thread (this context) are
    recorded, so other threads may use the same model meanwhile.
    """
    blocks = {block.epa_block: (name, block) for name, block in model.named_modules()
              if isinstance(block, TransformerBlock)}
    maps: dict[str, dict] = {}

    def record(epa: EPA, found: dict[str, torch.Tensor]) -> None:
        if epa in blocks:  # not another model's EPA run in this thread meanwhile
            name, block = blocks[epa]
            e = epa.EF.t() if epa.kv_projection == "single" else epa.E.weight
            maps[name] = {**found, "grid": block.grid, "E": e.detach()}

    token = _CAPTURE.set(record)
    try:
        yield maps
    finally:
        _CAPTURE.reset(token)
