"""What the page shows of a segmentation: the per-organ statistics table, the colour legend, the 3-D
surfaces and the organs offered in the show/hide boxes."""

from __future__ import annotations

import html
from typing import Sequence

import numpy as np

from .. import visualize as vis
from .session import Session

STAT_COLUMNS = ["label", "organ", "volume (mL)", "voxels", "mean HU"]


def statistics_columns(session: Session) -> list[str]:
    """The table's headers: the mean is in HU for a CT, in the file's own units otherwise (an MRI)."""
    return STAT_COLUMNS if session.ct else [*STAT_COLUMNS[:-1], "mean intensity"]


def statistics_rows(statistics: Sequence[dict]) -> list[list]:
    """Rows for the per-organ table, in STAT_COLUMNS order; organs that were not found are left out. Volumes
    have two decimals, or two significant digits under 1 mL: six voxels of a fine CT (0.004 mL) read "0" mL."""
    rows = []
    for s in statistics:
        if int(s.get("voxels", 0)) <= 0:
            continue
        mean = s.get("mean_hu", s.get("mean_intensity"))
        volume = float(s["volume_ml"])
        volume = round(volume, 2) if volume >= 1 else float(f"{volume:.2g}")
        rows.append([int(s["label"]), s["name"], volume, int(s["voxels"]),
                     None if mean is None or not np.isfinite(mean) else round(float(mean), 1)])
    return rows


def legend_html(session: Session, shown: Sequence[str] | None = None) -> str:
    """Colour swatches with organ names for the labels present in the mask; organs not in `shown`
    (the "organs shown" boxes; None: all) are faded and struck through."""
    if session.mask is None:
        return "<p class='legend-empty'>Run the segmentation to see the organ legend.</p>"
    entries = vis.legend_entries(session.class_names, present_labels(session))
    if not entries:
        return "<p class='legend-empty'>No organ found in this scan.</p>"
    hidden = set() if shown is None else {name for _, name, _ in entries} - set(shown)
    # faded no further than a name stays readable (4.5:1 on a light page; at 0.4 it was 2.4:1)
    faded = ";opacity:0.65;text-decoration:line-through' title='hidden: tick it under organs shown"
    # the swatch's border is the text's colour, so every swatch shows in light and dark themes (yellow on white
    # and dark blue on a dark page were 1.5:1 and 2:1 against it, with a border only a light page showed)
    items = "".join(
        f"<span class='legend-item' style='display:inline-flex;align-items:center;margin:2px 10px 2px 0"
        f"{faded if name in hidden else ''}'><span style='width:14px;height:14px;border-radius:3px;"
        f"background:{color};display:inline-block;margin-right:5px;border:1px solid currentColor'></span>"
        f"{html.escape(name)}</span>"
        for _, name, color in entries)
    # For eyes that see colours differently (with deuteranopia, liver, gallbladder and aorta look alike) the
    # organs can be told apart without colour: a way to do it, in the legend.
    hint = ("<span class='legend-hint' style='display:block;margin-top:2px'>Colours hard to tell apart? The line "
            "under the views names the organ at the crosshair, and unticking organs shows a few at a time.</span>")
    return f"<div class='organ-legend'>{items}{hint}</div>"


def surfaces(session: Session, shown: Sequence[str] | None = None):
    """The 3-D surfaces of the session's organs (None before segmentation). Marching cubes runs once
    per mask; organs not in `shown` (None: all) stay in the plot's legend, greyed, one click from view."""
    import plotly.graph_objects as go

    from ..inference import SYNTHETIC_WEIGHTS_WARNING
    from ..visualize_3d import surface_figure

    if session.mask is None:
        return None
    if session.surfaces is None:  # the figure says what made it: its camera button saves it without the page
        title = "organs found by SYNTHETIC teaching weights (not real anatomy)" if (
            SYNTHETIC_WEIGHTS_WARNING in session.warnings) else None
        session.surfaces = surface_figure(session.mask, session.spacing, session.class_names, title=title,
                                          orientation=session.orientation, labels_present=present_labels(session))
    figure = go.Figure(session.surfaces)
    if shown is not None:
        figure.for_each_trace(lambda trace: trace.update(visible=True if trace.name in shown else "legendonly"))
    return figure


def present_labels(session: Session) -> frozenset[int]:
    """The labels in the session's mask (none before segmentation), found once per mask: the legend is drawn again
    for every organ box ticked, and np.unique over a 512 x 512 x 300 mask takes 0.3-0.5 s and 78 MB each time."""
    if session.mask is None:
        return frozenset()
    if session.labels is None or session.labels[0] is not session.mask:  # none yet, or a mask set since
        session.labels = (session.mask, frozenset(np.unique(session.mask).tolist()))
    return session.labels[1]


def organ_choices(session: Session) -> list[str]:
    """Names of the organs present in the mask, for the show/hide checkboxes."""
    present = present_labels(session)
    return [name for k, name in enumerate(session.class_names) if k > 0 and k in present]
