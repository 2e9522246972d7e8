"""3-D organ surfaces from a label mask: marching cubes (scikit-image) on a downsampled mask, drawn
as plotly Mesh3d traces in the organ colours. Shared by the viewer and the notebooks.
"""

from __future__ import annotations

import logging
import math
import textwrap
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from .config import check_orientation
from .visualize import label_lut

logger = logging.getLogger(__name__)

# The camera: in front of the patient (+y, anterior) and a little to their left and above, looking at the centre
# with superior up. Straight from the front, the anterior axis pointed at the viewer: its tick labels piled up and
# its title ran off the side.
EYE_DIRECTION = (-0.3, 1.0, 0.3)
# Plotly draws a 3-D scene with a 45 degree vertical field of view and lets the width follow the plot's shape, so a
# camera set for a desktop's wide plot cuts the sides off on a phone, where the plot is about as tall as it is wide.
# The camera stands back until the organs' box fills at most FILL of the view, the rest kept for the tick labels and
# axis titles around it. The server cannot see the screen: the figure carries the camera for each of VIEW_ASPECTS
# (plot width over height) in `layout.meta["cameras"]`, which the viewer's page picks from (app.PAGE_JS), and
# stands where the first fits (plotly's default 700 x 450 plot, a notebook's).
FIELD_OF_VIEW, FILL = math.pi / 4, 0.7
VIEW_ASPECTS = (1.5, 2.0, 1.0, 0.75, 0.5)
# The patient's direction each axis's numbers grow towards (the surfaces are drawn in RAS). No arrow: drawn
# flat on the page, "→ right" pointed at the screen's right under an axis that grows to the left, seen from the front.
AXIS_TITLES = ("right (mm)", "anterior (mm)", "superior (mm)")
# Plotly does not wrap a title: past about this many characters of its 13 px font, a 360 px phone cut it off.
TITLE_CHARS = 40


@dataclass
class OrganMesh:
    """One organ surface: vertices (V, 3) in mm as (x, y, z) volume-grid coordinates, faces (F, 3)."""

    label: int
    name: str
    vertices: np.ndarray
    faces: np.ndarray
    color: str  # "#rrggbb"


def surface_step(shape: Sequence[int], spacing: Sequence[float], max_voxels: int = 300_000) -> tuple[int, int, int]:
    """Integer strides (z, y, x) that keep a (Z, Y, X) grid under about `max_voxels` voxels.

    The strides aim at cubic voxels in mm, so a CT with 0.7 mm pixels and 3 mm slices is thinned
    in-plane first rather than losing its few slices.
    """
    if max_voxels <= 0:
        raise ValueError(f"max_voxels={max_voxels}: must be a positive voxel count")
    if math.prod(shape) <= max_voxels:
        return (1, 1, 1)
    size = (math.prod(n * s for n, s in zip(shape, spacing)) / max_voxels) ** (1 / 3)  # target voxel edge, mm
    steps = [max(1, round(size / s)) for s in spacing]
    while math.prod(math.ceil(n / st) for n, st in zip(shape, steps)) > max_voxels:  # rounding left too many
        finest = min(range(3), key=lambda a: steps[a] * spacing[a])
        steps[finest] += 1
    return tuple(steps)


def camera_distance(half: Sequence[float], direction: Sequence[float] = EYE_DIRECTION, aspect: float = 1.0,
                    fill: float = FILL) -> float:
    """How far along `direction` the camera must stand, in plotly's scene units (the box spans +-`half` (x, y, z)
    around the origin, which the camera looks at), for the whole box to show within `fill` of a view `aspect`
    times as wide as it is tall. Each corner p projects to (p.r, p.v) / (d - p.u) for a camera at d u, so it is
    inside the view from d >= p.u + |p.r| / (aspect tan_v) and from d >= p.u + |p.v| / tan_v: the distance is the
    largest of these."""
    u = np.asarray(direction, float) / np.linalg.norm(direction)
    right = np.cross(-u, (0.0, 0.0, 1.0))
    right /= np.linalg.norm(right)
    up = np.cross(right, -u)
    tan_v = fill * math.tan(FIELD_OF_VIEW / 2)
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * np.asarray(half, float)
    across, upwards = np.abs(corners @ right) / (tan_v * aspect), np.abs(corners @ up) / tan_v
    return float(np.max(corners @ u + np.maximum(across, upwards)))


def organ_meshes(mask: np.ndarray, spacing: Sequence[float], class_names: Sequence[str],
                 colors: Mapping[int, Sequence[int]] | None = None, max_voxels: int = 300_000,
                 min_voxels: int = 8) -> list[OrganMesh]:
    """Surfaces of every label present in `mask` (Z, Y, X), spacing (z, y, x) mm.

    The mask is subsampled with a stride that keeps it under `max_voxels`, so the cost does not
    grow with the scan; labels with fewer than `min_voxels` voxels after subsampling are skipped.
    """
    from skimage.measure import marching_cubes

    if mask.ndim != 3:
        raise ValueError(f"mask of shape {mask.shape}: need a 3-D (Z, Y, X) label array")
    step = surface_step(mask.shape, spacing, max_voxels)
    small = mask[::step[0], ::step[1], ::step[2]]
    step_spacing = tuple(float(s) * st for s, st in zip(spacing, step))
    lut = label_lut(colors)
    meshes = []
    for label in np.unique(small):
        label = int(label)
        if label == 0 or label >= len(class_names):
            continue
        binary = small == label
        if binary.sum() < min_voxels:
            continue
        # Pad so organs touching the border give closed surfaces.
        padded = np.pad(binary, 1).astype(np.float32)
        verts, faces, _, _ = marching_cubes(padded, level=0.5, spacing=step_spacing)
        verts = (verts - np.asarray(step_spacing))[:, ::-1]  # undo the pad; (z, y, x) -> (x, y, z)
        color = "#%02x%02x%02x" % tuple(int(c) for c in lut[label])
        meshes.append(OrganMesh(label, class_names[label], verts.astype(np.float32), faces.astype(np.int32), color))
    logger.debug("marching cubes at strides %s: %d organ surfaces", step, len(meshes))
    return meshes


def surface_figure(mask: np.ndarray, spacing: Sequence[float], class_names: Sequence[str],
                   colors: Mapping[int, Sequence[int]] | None = None, max_voxels: int = 300_000,
                   title: str | None = None, orientation: str = "RAS", labels_present: Iterable[int] | None = None):
    """A plotly Figure with one Mesh3d per organ of `mask` (Z, Y, X); axes in mm, equal aspect.

    `orientation` names where the mask's (x, y, z) axes point ("RAS", "LPS", ...): the surfaces are
    drawn in RAS directions whatever it is, so the patient's right is always +x. `labels_present`: the
    labels in `mask`, when the caller knows them (the viewer does), to name the organs too small for a
    surface without a pass over the whole mask (0.17 s for 512 x 512 x 250 voxels).
    """
    import plotly.graph_objects as go

    signs = np.array([-1.0 if c in "LPI" else 1.0 for c in check_orientation(orientation)], np.float32)
    fig = go.Figure()
    meshes = organ_meshes(mask, spacing, class_names, colors, max_voxels)
    drawn = {m.label for m in meshes}
    present = sorted(labels_present) if labels_present is not None else np.unique(mask).tolist()
    too_small = [class_names[v] for v in present if 0 < v < len(class_names) and v not in drawn]
    notes = [title] if title else []
    if too_small:  # say so rather than leave them out of the legend silently (no line break inside a name)
        notes.append("too small for a surface: " + ", ".join(name.replace(" ", "\u00a0") for name in too_small))
    lines = [line.replace("\u00a0", " ") for note in notes for line in textwrap.wrap(note, TITLE_CHARS)]
    title = "<br>".join(lines) or None
    for m in meshes:
        x, y, z = (m.vertices * signs).T
        i, j, k = m.faces.T
        fig.add_trace(go.Mesh3d(x=x, y=y, z=z, i=i, j=j, k=k, color=m.color, opacity=1.0, name=m.name,
                                showlegend=True, flatshading=False, hovertemplate=f"{m.name}<extra></extra>",
                                lighting=dict(ambient=0.45, diffuse=0.8, specular=0.2, roughness=0.6)))
    # The box the camera is placed for, in mm as plotly would autorange it (1/32 of each side added at both ends),
    # held fixed: an organ hidden from the legend would otherwise reshape the box and move the others.
    if meshes:
        points = np.concatenate([m.vertices for m in meshes]) * signs
        lo, hi = points.min(0), points.max(0)
        pad = np.maximum(hi - lo, 1.0) / 32
        lo, hi = lo - pad, hi + pad
    else:
        lo, hi = -np.ones(3), np.ones(3)
    sides = hi - lo
    ratio = sides / np.prod(sides) ** (1 / 3)  # equal mm on every axis, scaled as plotly's aspectmode "data" does
    direction = np.asarray(EYE_DIRECTION) / np.linalg.norm(EYE_DIRECTION)
    cameras = [[aspect, dict(zip("xyz", (direction * camera_distance(ratio / 2, aspect=aspect)).tolist()))]
               for aspect in VIEW_ASPECTS]
    axes = {f"{a}axis": dict(title=t, range=[float(lo[n]), float(hi[n])])
            for n, (a, t) in enumerate(zip("xyz", AXIS_TITLES))}
    # x runs towards the patient's right in RAS volumes: seen from the front, right is on the left.
    fig.update_layout(
        # the legend below the scene, in rows: beside it, it took half of a phone's width
        title=dict(text=title, font=dict(size=13)), margin=dict(l=0, r=0, t=14 + 16 * len(lines) if lines else 0, b=0),
        legend=dict(itemsizing="constant", orientation="h", yanchor="top", y=0, x=0),
        scene=dict(aspectmode="manual", aspectratio=dict(zip("xyz", ratio.tolist())), **axes,
                   camera=dict(eye=cameras[0][1], up=dict(x=0, y=0, z=1))),
        meta=dict(cameras=cameras),
    )
    return fig
