"""What one voxel attends to: run the network on the window around a voxel, capture the EPA maps
(paper Sec. 3.2, Fig. 2) and turn them into pictures. The effective spatial attention of the query
token over all N tokens is A_SA[query] @ E (an (N,) map on the token grid); the channel attention
is one (d x d) matrix per head.

The map says where the query of a voxel looks, not what that voxel's output is made of: the original
reshapes the spatial branch's (B, d, h, N) result straight to (B, N, C), so token n receives the
results of queries n*C ... n*C + C - 1 (mod N) (see `attention.EPA`; the released weights expect it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import visualize as vis


@dataclass
class AttentionView:
    """The window the network saw (HU, (Z, Y, X) at the model spacing), the heat-map on it, and more."""

    window_hu: np.ndarray  # (Z, Y, X) = config.patch_size
    heat: np.ndarray  # (Z, Y, X) effective spatial attention, upsampled from the token grid
    channel: np.ndarray  # (heads, d, d) channel attention of the block
    query: tuple[int, int, int]  # query voxel (z, y, x) inside the window
    grid: tuple[int, int, int]  # the block's token grid (z, y, x)
    spacing: tuple[float, float, float]  # window spacing (z, y, x) mm
    block: str
    orientation: str = "RAS"  # axis codes of the window (the model's), for display the right way round
    centre: tuple[int, int, int] | None = None  # the query voxel (z, y, x) in the volume the window came from


def attention_blocks(model) -> list[str]:
    """Names of the model's TransformerBlocks (each holds one EPA), encoder first."""
    from .attention import TransformerBlock

    return [name for name, m in model.named_modules() if isinstance(m, TransformerBlock)]


def block_label(name: str, grid: Sequence[int]) -> str:
    """A readable name for a block, e.g. 'encoder stage 1, block 1 (grid 8x16x16)'."""
    parts = name.split(".")
    if name.startswith("unetr_pp_encoder.stages"):
        where = f"encoder stage {parts[2]}, block {int(parts[3]) + 1}"
    else:
        where = f"{parts[0]}, block {int(parts[-1]) + 1}" if parts[-1].isdigit() else name
    return f"{where} (grid {'x'.join(str(g) for g in grid)})"


def extract_window(volume: np.ndarray, spacing: Sequence[float], centre: Sequence[int],
                   patch_size: Sequence[int], target_spacing: Sequence[float]) -> np.ndarray:
    """Resample the patch around voxel `centre` (z, y, x) of `volume` to `target_spacing` (z, y, x) mm.

    Returns (patch_size) HU values, linear interpolation, air (-1024 HU or the volume minimum) outside.
    The centre voxel lands on the window's index patch_size // 2.
    """
    from scipy.ndimage import map_coordinates

    if volume.ndim != 3:
        raise ValueError(f"volume of shape {volume.shape}: need a 3-D (Z, Y, X) array")
    coords = [c + (np.arange(p) - p // 2) * (t / s)
              for c, p, t, s in zip(centre, patch_size, target_spacing, spacing)]
    grid = np.meshgrid(*coords, indexing="ij")
    fill = float(min(volume.min(), -1024.0))
    # float32 out whatever the volume's type (the viewer holds an int16 CT), without a float32 copy of the
    # whole volume per click: scipy interpolates in float64 either way
    return map_coordinates(volume, grid, output=np.float32, order=1, mode="constant", cval=fill)


def compute_attention(model, volume: np.ndarray, spacing: Sequence[float], centre: Sequence[int],
                      block: str | None = None, head: int | None = None, orientation: str = "RAS") -> AttentionView:
    """Run `model` on the window around voxel `centre` (z, y, x) and read one block's EPA maps.

    `head` None averages the heads' spatial maps. Only single-channel (CT) models are supported;
    `volume` (Z, Y, X) must be in the model's orientation (as `segment` returns it).
    """
    import torch
    import torch.nn.functional as F

    from .attention import capture_attention
    from .preprocess import normalize

    cfg = model.config
    if orientation.upper() != cfg.preprocessing.orientation.upper():
        raise ValueError(f"volume in {orientation}: the model expects {cfg.preprocessing.orientation}; "
                         "segment the scan first (its volume is reoriented for the model)")
    if cfg.in_channels != 1:
        raise ValueError(f"model with in_channels={cfg.in_channels}: the attention view needs a 1-channel CT model")
    names = attention_blocks(model)
    block = block or names[0]
    if block not in names:
        raise ValueError(f"attention block {block!r}: valid names: {', '.join(names)}")
    if head is not None and not 0 <= head < cfg.num_heads:
        raise ValueError(f"head={head}: must be in [0, {cfg.num_heads - 1}] or None for the mean over heads")
    patch = tuple(cfg.patch_size)
    window = extract_window(volume, spacing, centre, patch, cfg.preprocessing.spacing)
    x = torch.from_numpy(normalize(window, cfg.preprocessing).astype(np.float32))[None, None]
    device = next(model.parameters()).device
    with torch.no_grad(), capture_attention(model) as maps:
        model(x.to(device))
    m = maps[block]
    grid = tuple(m["grid"])
    query = tuple(p // 2 for p in patch)
    q_tok = [q * g // p for q, g, p in zip(query, grid, patch)]  # query voxel -> token on the block grid
    q_index = (q_tok[0] * grid[1] + q_tok[1]) * grid[2] + q_tok[2]  # tokens flattened z, y, x
    spatial = m["spatial"][0, :, q_index, :].float()  # (heads, P)
    effective = spatial @ m["E"].float().to(spatial.device)  # (heads, N): A_SA[query] @ E
    effective = effective.mean(0) if head is None else effective[head]
    heat = F.interpolate(effective.reshape(1, 1, *grid), size=patch, mode="trilinear", align_corners=False)
    channel = m["channel"][0].float().cpu().numpy()
    return AttentionView(window, heat[0, 0].cpu().numpy(), channel, query, grid,
                         tuple(cfg.preprocessing.spacing), block, cfg.preprocessing.orientation.upper(),
                         tuple(int(c) for c in centre))


def render_attention(view_data: AttentionView, view: str, window: tuple[float, float] = vis.WINDOW_PRESETS["abdomen"],
                     min_side: int = 320) -> np.ndarray:
    """The heat-map over the window's slice through the query voxel, in one view -> RGB uint8."""
    axis, orientation = vis.VIEW_AXIS[view], view_data.orientation
    index = view_data.query[axis]
    plane = vis.slice_2d(view_data.window_hu, view, index, orientation)
    heat = vis.slice_2d(view_data.heat, view, index, orientation)
    size = vis.display_shape(plane.shape, vis.view_spacing(view_data.spacing, view), min_side=min_side)
    gray = vis.apply_window(vis.resize_linear(plane, size), *window)
    rgb = vis.heatmap_overlay(gray, vis.resize_linear(heat, size))
    crosshair = vis.voxel_to_display(view, view_data.query, view_data.window_hu.shape, size, orientation)
    rgb = vis.draw_crosshair(rgb, *crosshair, color=(0, 255, 120))
    return vis.annotate_view(rgb, view, vis.mm_per_pixel(plane.shape, view_data.spacing, view, size))


def window_click_to_voxel(view_data: AttentionView, view: str, col: float, row: float, centre: Sequence[int],
                          volume_spacing: Sequence[float], volume_shape: Sequence[int],
                          min_side: int = 320) -> tuple[int, int, int]:
    """The volume voxel (z, y, x) under a click on an attention view of the window centred at `centre`."""
    axis = vis.VIEW_AXIS[view]
    plane_shape = vis.slice_2d(view_data.window_hu, view, view_data.query[axis]).shape  # flips keep the shape
    size = vis.display_shape(plane_shape, vis.view_spacing(view_data.spacing, view), min_side=min_side)
    w = vis.display_to_voxel(view, row, col, view_data.query, view_data.window_hu.shape, size, view_data.orientation)
    # window voxel -> mm offset from the query -> volume voxel
    out = [c + (wi - q) * t / s
           for c, wi, q, t, s in zip(centre, w, view_data.query, view_data.spacing, volume_spacing)]
    return tuple(int(np.clip(round(v), 0, n - 1)) for v, n in zip(out, volume_shape))


def channel_figure(channel: np.ndarray, title: str = ""):
    """Plotly heat-maps of the channel attention, one (d x d) panel per head."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    heads = channel.shape[0]
    rows = 1 if heads == 1 else 2  # a 2 x 2 grid for four heads stays legible on a phone as on a desktop
    cols = -(-heads // rows)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"head {h + 1}" for h in range(heads)],
                        horizontal_spacing=0.12, vertical_spacing=0.16)
    # one colour scale for all heads: the one colour bar shown (the last head's) must read every panel
    low, high = float(channel.min()), float(channel.max())
    for h in range(heads):
        row, col = h // cols + 1, h % cols + 1
        fig.add_trace(go.Heatmap(z=channel[h], colorscale="Inferno", showscale=h == heads - 1, zmin=low, zmax=high,
                                 colorbar=dict(thickness=12, title=dict(text="weight<br>(no unit)", side="right")),
                                 hovertemplate="query channel %{y}<br>key channel %{x}<br>weight %{z:.3f}"
                                               "<extra></extra>"),
                      row=row, col=col)
        # square cells: the panel shrinks to fit instead of the axes running past the d channels
        fig.update_xaxes(constrain="domain", title_text="key channel" if row == rows else None, row=row, col=col)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{h + 1 if h else ''}", constrain="domain",
                         title_text="query channel" if col == 1 else None, row=row, col=col)
    fig.update_layout(title=dict(text=title or "channel attention (d x d per head)", font=dict(size=14)),
                      height=300 * rows + 75, margin=dict(l=10, r=10, t=75, b=10))
    return fig
