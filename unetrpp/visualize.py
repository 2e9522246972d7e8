"""Slice rendering shared by the viewer (app.py) and the notebooks: windowing, orthogonal views in
radiological convention with the aspect ratio of the voxel spacing, label overlays and contours,
crosshairs, and the map from a clicked display pixel back to a voxel.

Volumes are (Z, Y, X) as everywhere in the package; rendered images are RGB uint8 (H, W, 3).
Radiological convention: the patient's right is on the image's left in axial and coronal views,
anterior is up in axial views and on the left in sagittal views, superior is up.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from .labels import BTCV_COLORS

VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")
# The volume axis (0 = z, 1 = y, 2 = x) each view slices along.
VIEW_AXIS: dict[str, int] = {"axial": 0, "coronal": 1, "sagittal": 2}

# (width, level) in HU; common radiology settings.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (400.0, 40.0),
    "liver": (150.0, 30.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
}

CROSSHAIR_COLOR = (80, 220, 255)


def _check_view(view: str) -> int:
    if view not in VIEW_AXIS:
        raise ValueError(f"view={view!r}: must be one of {VIEWS}")
    return VIEW_AXIS[view]


def window_preset(name: str, width: float | None = None, level: float | None = None) -> tuple[float, float]:
    """(width, level) of a named preset, or of `width`/`level` when `name` is "custom"."""
    if name == "custom":
        if width is None or level is None or width <= 0:
            given = ", ".join(f"{what} {'empty' if v is None else f'{v:g}'}" for what, v in (("width", width),
                                                                                       ("level", level)))
            # in the scan's units: HU for a CT, the file's own values for a scan that is not (an MRI)
            raise ValueError(f"custom window ({given}): give a width above 0 and a level in the scan's units, "
                             "e.g. 400 and 40 for soft tissue in a CT (HU)")
        return float(width), float(level)
    if name not in WINDOW_PRESETS:
        raise ValueError(f"window preset {name!r}: must be one of {[*WINDOW_PRESETS, 'custom']}")
    return WINDOW_PRESETS[name]


def apply_window(values: np.ndarray, width: float, level: float) -> np.ndarray:
    """Map HU values (any shape) to uint8 grey levels: level - width/2 -> 0, level + width/2 -> 255."""
    if width <= 0:
        raise ValueError(f"window width={width}: must be > 0 HU (e.g. 400 for abdomen)")
    low = level - width / 2.0
    scaled = (np.asarray(values, dtype=np.float32) - low) * (255.0 / width)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _display_flips(orientation: str) -> tuple[bool, bool, bool]:
    """Whether the volume's (z, y, x) axes run opposite to the screen (down, right) directions.

    Screen rows run superior -> inferior (axial: anterior -> posterior), screen columns run from
    the patient's right to left (sagittal: anterior -> posterior).
    """
    codes = orientation.upper()
    if len(codes) != 3 or codes[0] not in "LR" or codes[1] not in "AP" or codes[2] not in "SI":
        raise ValueError(f"orientation={orientation!r}: the viewer needs x in L/R, y in A/P, z in S/I order, "
                         "e.g. 'RAS' or 'LPS'; load the volume with unetrpp.io.load(path, 'RAS')")
    return codes[2] == "S", codes[1] == "A", codes[0] == "R"


def slice_2d(volume: np.ndarray, view: str, index: int, orientation: str = "RAS") -> np.ndarray:
    """One slice of a (Z, Y, X) volume, oriented for display: axial (Y, X), coronal (Z, X), sagittal (Z, Y)."""
    axis = _check_view(view)
    if volume.ndim != 3:
        raise ValueError(f"volume of shape {volume.shape}: need a 3-D (Z, Y, X) array")
    if not 0 <= index < volume.shape[axis]:
        raise ValueError(f"{view} slice {index}: must be in [0, {volume.shape[axis] - 1}]")
    flip_z, flip_y, flip_x = _display_flips(orientation)
    plane = np.take(volume, index, axis=axis)
    row_flip, col_flip = {"axial": (flip_y, flip_x), "coronal": (flip_z, flip_x), "sagittal": (flip_z, flip_y)}[view]
    return plane[::-1 if row_flip else 1, ::-1 if col_flip else 1]


def view_spacing(spacing: Sequence[float], view: str) -> tuple[float, float]:
    """(row, column) pixel size in mm of a view, from the volume spacing (z, y, x)."""
    _check_view(view)
    z, y, x = (float(s) for s in spacing)
    return {"axial": (y, x), "coronal": (z, x), "sagittal": (z, y)}[view]


def display_shape(shape: Sequence[int], spacing: Sequence[float], min_side: int = 384,
                  max_side: int = 768) -> tuple[int, int]:
    """Display size (H, W) of a (rows, cols) slice with square pixels in mm (spacing is (row, col) mm).

    Small slices are enlarged to `min_side` on their longest side, large ones kept at native size
    unless they exceed `max_side`.
    """
    height_mm, width_mm = shape[0] * spacing[0], shape[1] * spacing[1]
    pixel = min(spacing)  # keep the finer of the two resolutions
    h, w = height_mm / pixel, width_mm / pixel
    scale = max(1.0, min_side / max(h, w))
    scale = min(scale, max_side / max(h, w)) if max(h, w) * scale > max_side else scale
    return max(1, round(h * scale)), max(1, round(w * scale))


def _source_index(n_in: int, n_out: int) -> np.ndarray:
    """For each output pixel, the input pixel whose centre it falls in (nearest neighbour)."""
    return np.minimum((np.arange(n_out) + 0.5) * n_in / n_out, n_in - 1).astype(np.intp)


def resize_nearest(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of (H, W[, C]) to `size` (H', W'): for labels, keeps ids exact."""
    rows, cols = _source_index(image.shape[0], size[0]), _source_index(image.shape[1], size[1])
    return image[rows[:, None], cols[None, :]]


def resize_linear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Separable bilinear resize of a 2-D float image (H, W) to `size`, pixel centres aligned."""
    out = np.asarray(image, dtype=np.float32)
    for axis, n_out in enumerate(size):
        n_in = out.shape[axis]
        if n_in == n_out:
            continue
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(np.intp)
        hi = np.minimum(lo + 1, n_in - 1)
        w = (pos - lo).astype(np.float32)
        a, b = np.take(out, lo, axis=axis), np.take(out, hi, axis=axis)
        w = w[:, None] if axis == 0 else w[None, :]
        out = a * (1 - w) + b * w
    return out


def label_lut(colors: Mapping[int, Sequence[int]] | None = None, size: int = 256) -> np.ndarray:
    """(size, 3) uint8 colour table: row k is the colour of label k (BTCV colours by default)."""
    lut = np.zeros((size, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)  # labels without a colour get fixed pseudo-random ones
    lut[1:] = rng.integers(60, 256, size=(size - 1, 3))
    for label, rgb in (colors if colors is not None else BTCV_COLORS).items():
        lut[label] = rgb
    return lut


def label_boundaries(labels: np.ndarray, thickness: int = 2) -> np.ndarray:
    """Boolean (H, W): pixels of a non-zero label that touch a different label, `thickness` px wide."""
    edge = np.zeros(labels.shape, dtype=bool)
    for shift in range(1, thickness + 1):
        for axis in (0, 1):
            diff = np.zeros(labels.shape, dtype=bool)
            sl_a = [slice(None)] * 2
            sl_b = [slice(None)] * 2
            sl_a[axis], sl_b[axis] = slice(shift, None), slice(None, -shift)
            d = labels[tuple(sl_a)] != labels[tuple(sl_b)]
            diff[tuple(sl_a)] |= d
            diff[tuple(sl_b)] |= d
            edge |= diff
    return edge & (labels > 0)


def blend_labels(gray: np.ndarray, labels: np.ndarray | None, opacity: float = 0.5,
                 visible: Iterable[int] | None = None, contour_only: bool = False,
                 colors: Mapping[int, Sequence[int]] | None = None) -> np.ndarray:
    """Colour a grey image (H, W) uint8 with a label image (H, W) -> RGB (H, W, 3) uint8.

    `visible` lists the label ids to draw (all non-zero ones when None); `contour_only` draws
    only the organ outlines, fully opaque, so the grey values inside stay readable.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"overlay opacity={opacity}: must be between 0 and 1")
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if labels is None or opacity == 0:
        return rgb
    if labels.shape != gray.shape:
        raise ValueError(f"labels of shape {labels.shape} do not match the image {gray.shape}")
    lut = label_lut(colors)
    alpha = np.zeros(256, dtype=np.float32)
    ids = range(1, 256) if visible is None else [int(v) for v in visible if 0 < int(v) < 256]
    alpha[list(ids)] = 1.0 if contour_only else opacity
    labels = labels.astype(np.intp, copy=False)
    a = alpha[labels]
    if contour_only:
        a = a * label_boundaries(labels)
    a = a[..., None]
    return (rgb * (1 - a) + lut[labels] * a).astype(np.uint8)


def voxel_to_display(view: str, position: Sequence[int], volume_shape: Sequence[int],
                     size: tuple[int, int], orientation: str = "RAS") -> tuple[float, float]:
    """Display pixel (row, col) of the centre of voxel `position` (z, y, x) in a view of size (H, W)."""
    axis = _check_view(view)
    flips = _display_flips(orientation)
    row_axis, col_axis = [a for a in range(3) if a != axis]
    out = []
    for ax, n_out in ((row_axis, size[0]), (col_axis, size[1])):
        n = volume_shape[ax]
        i = n - 1 - position[ax] if flips[ax] else position[ax]
        out.append((i + 0.5) * n_out / n)
    return out[0], out[1]


def display_to_voxel(view: str, row: float, col: float, position: Sequence[int], volume_shape: Sequence[int],
                     size: tuple[int, int], orientation: str = "RAS") -> tuple[int, int, int]:
    """Voxel (z, y, x) under display pixel (row, col) of a view of size (H, W) showing slice `position`.

    The coordinate along the view's own axis is kept from `position`; the click moves the other two.
    """
    axis = _check_view(view)
    flips = _display_flips(orientation)
    row_axis, col_axis = [a for a in range(3) if a != axis]
    new = list(int(p) for p in position)
    for ax, pix, n_out in ((row_axis, row, size[0]), (col_axis, col, size[1])):
        n = volume_shape[ax]
        i = int(np.clip(np.floor(pix * n / n_out), 0, n - 1))
        new[ax] = n - 1 - i if flips[ax] else i
    return new[0], new[1], new[2]


def draw_crosshair(rgb: np.ndarray, row: float, col: float, color: Sequence[int] = CROSSHAIR_COLOR,
                   gap: int = 8, alpha: float = 0.7) -> np.ndarray:
    """Draw a crosshair through (row, col) on an RGB image, leaving a gap so the target stays visible."""
    out = rgb.copy()
    h, w = out.shape[:2]
    r, c = int(np.clip(row, 0, h - 1)), int(np.clip(col, 0, w - 1))
    color = np.asarray(color, dtype=np.float32)
    cols = np.r_[0:max(c - gap, 0), min(c + gap + 1, w):w]
    rows = np.r_[0:max(r - gap, 0), min(r + gap + 1, h):h]
    out[r, cols] = (out[r, cols] * (1 - alpha) + color * alpha).astype(np.uint8)
    out[rows, c] = (out[rows, c] * (1 - alpha) + color * alpha).astype(np.uint8)
    return out


def render_view(volume: np.ndarray, view: str, position: Sequence[int], spacing: Sequence[float],
                window: tuple[float, float] = WINDOW_PRESETS["abdomen"], mask: np.ndarray | None = None,
                opacity: float = 0.5, visible: Iterable[int] | None = None, contour_only: bool = False,
                crosshair: bool = True, orientation: str = "RAS", colors: Mapping[int, Sequence[int]] | None = None,
                min_side: int = 384, max_side: int = 768, annotate: bool = False) -> np.ndarray:
    """The slice of `volume` (Z, Y, X, HU) through `position` (z, y, x) in one view -> RGB (H, W, 3).

    Pixels are square in mm (aspect ratio from `spacing` (z, y, x) mm); `mask` (Z, Y, X) labels are
    drawn with `blend_labels`; the crosshair marks `position`; `annotate` adds the patient directions
    and a scale bar (`annotate_view`). Only this one slice is computed.
    """
    if mask is not None and mask.shape != volume.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the volume shape {volume.shape}")
    index = int(position[_check_view(view)])
    plane = slice_2d(volume, view, index, orientation)
    size = display_shape(plane.shape, view_spacing(spacing, view), min_side, max_side)
    gray = apply_window(resize_linear(plane, size), *window)
    labels = None
    if mask is not None:
        labels = resize_nearest(slice_2d(mask, view, index, orientation), size)
    rgb = blend_labels(gray, labels, opacity, visible, contour_only, colors)
    if crosshair:
        rgb = draw_crosshair(rgb, *voxel_to_display(view, position, volume.shape, size, orientation))
    if annotate:
        rgb = annotate_view(rgb, view, mm_per_pixel(plane.shape, spacing, view, size))
    return rgb


# Patient directions at the (top, bottom, left, right) edges of each view in this module's display
# convention (radiological: the patient's right on the image's left), whatever the file's orientation.
VIEW_EDGES = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}


def mm_per_pixel(plane_shape: Sequence[int], spacing: Sequence[float], view: str, size: Sequence[int]) -> float:
    """Millimetres per display pixel of a slice of `plane_shape` shown at `size` (pixels are square in mm)."""
    return plane_shape[1] * view_spacing(spacing, view)[1] / size[1]


def annotate_view(rgb: np.ndarray, view: str, mm_per_pixel: float) -> np.ndarray:
    """The view with its patient directions at the edges and a scale bar in mm (bottom right) -> RGB."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = rgb.shape[:2]
    image = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, min(h, w) // 24))
    text = dict(font=font, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
    top, bottom, left, right = VIEW_EDGES[view]
    pad = 4
    draw.text((w / 2, pad), top, anchor="mt", **text)
    draw.text((w / 2, h - pad), bottom, anchor="mb", **text)
    draw.text((pad, h / 2), left, anchor="lm", **text)
    draw.text((w - pad, h / 2), right, anchor="rm", **text)
    fits = [mm for mm in (100, 50, 20, 10, 5, 2, 1) if mm / mm_per_pixel <= 0.3 * w]
    if fits:  # the longest round length that takes at most 30 % of the width
        bar = round(fits[0] / mm_per_pixel)
        x1, y = w - 3 * pad, h - 3 * pad
        draw.line([(x1 - bar, y), (x1, y)], fill=(0, 0, 0), width=5)
        draw.line([(x1 - bar, y), (x1, y)], fill=(255, 255, 255), width=3)
        draw.text((x1 - bar / 2, y - 4), f"{fits[0]} mm", anchor="mb", **text)
    return np.asarray(image)


def orthogonal_views(volume: np.ndarray, position: Sequence[int] | None = None, spacing: Sequence[float] = (1, 1, 1),
                     **kwargs) -> dict[str, np.ndarray]:
    """The three views through `position` (the volume centre by default): {view: RGB (H, W, 3)}.

    Keyword arguments go to `render_view`; handy in notebooks: `plt.imshow(views["coronal"])`.
    """
    if position is None:
        position = tuple(n // 2 for n in volume.shape)
    return {view: render_view(volume, view, position, spacing, **kwargs) for view in VIEWS}


def legend_entries(class_names: Sequence[str], labels_present: Iterable[int] | None = None,
                   colors: Mapping[int, Sequence[int]] | None = None) -> list[tuple[int, str, str]]:
    """(label id, name, "#rrggbb") for each foreground class (only those in `labels_present` if given)."""
    lut = label_lut(colors)
    present = None if labels_present is None else {int(v) for v in labels_present}
    return [(k, name, "#%02x%02x%02x" % tuple(int(c) for c in lut[k]))
            for k, name in enumerate(class_names) if k > 0 and (present is None or k in present)]


def heatmap_overlay(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.55, cmap: str = "inferno") -> np.ndarray:
    """Blend a heat-map (H, W) over a grey uint8 image (H, W) -> RGB uint8; `heat` is scaled to [0, 1].

    Opacity grows with the heat value, so cold regions leave the anatomy visible.
    """
    import matplotlib

    if heat.shape != gray.shape:
        raise ValueError(f"heat-map shape {heat.shape} differs from the image shape {gray.shape}")
    h = np.asarray(heat, dtype=np.float32)
    span = float(h.max() - h.min())
    h = (h - h.min()) / span if span > 0 else np.zeros_like(h)
    colored = matplotlib.colormaps[cmap](h)[..., :3] * 255.0
    a = (alpha * np.sqrt(h))[..., None]
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    return (rgb * (1 - a) + colored * a).astype(np.uint8)


def plot_views(volume: np.ndarray, spacing: Sequence[float], mask: np.ndarray | None = None,
               position: Sequence[int] | None = None, class_names: Sequence[str] | None = None,
               title: str | None = None, **kwargs):
    """A matplotlib Figure of the three views (for notebooks), with patient directions and scale bars,
    the CT window in the title, and an organ legend when `mask` is given, its swatches blended as the
    overlay is over soft tissue.

    `volume` and `mask` are (Z, Y, X); keyword arguments go to `render_view` (window, opacity, ...).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    kwargs.setdefault("annotate", True)
    window = kwargs.get("window", WINDOW_PRESETS["abdomen"])  # render_view's default
    views = orthogonal_views(volume, position, spacing, mask=mask, **kwargs)
    widths = [views[v].shape[1] / views[v].shape[0] for v in VIEWS]  # equal heights, true aspect
    fig, axes = plt.subplots(1, 3, figsize=(4 * sum(widths), 4.6), gridspec_kw={"width_ratios": widths})
    for ax, view in zip(axes, VIEWS):
        ax.imshow(views[view])
        ax.set_title(view)
        ax.axis("off")
    if mask is not None and class_names is not None:
        entries = legend_entries(class_names, np.unique(mask))
        alpha = 1.0 if kwargs.get("contour_only") else kwargs.get("opacity", 0.5)
        tissue = float(apply_window(np.array([40.0]), *window)[0])  # 40 HU
        swatch = (alpha * label_lut(kwargs.get("colors")).astype(float) + (1 - alpha) * tissue) / 255
        fig.legend(handles=[Patch(color=tuple(swatch[k]), label=name) for k, name, _ in entries],
                   loc="lower center", ncol=min(len(entries), 7), frameon=False, fontsize=8)
    caption = f"CT window W {window[0]:g} / L {window[1]:g} HU"
    fig.suptitle(f"{title} · {caption}" if title else caption)
    fig.tight_layout(rect=(0, 0.08 if mask is not None else 0, 1, 0.95))  # room for the title
    return fig
