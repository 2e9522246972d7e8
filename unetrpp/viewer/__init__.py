"""What the viewer (app.py) does, without gradio, in plain Python on numpy arrays that tests call directly:
`weights` (which weights, loaded once), `session` (a scan on the page: reading it, its views, the crosshair),
`segmentation` (a run, its limits and warnings), `results` (table, legend, surfaces), `attention` (that tab).
"""

from .segmentation import NOT_A_DEVICE, SYNTHETIC_NOTICE, UNTRAINED_NOTICE, ModelHolder, resolve_weights
from .segmentation import (Display, Session, click, compact, delete_session_files, describe, display_settings,
                           load_scan, position_text, render, render_all, set_slice, visible_labels, window_for)
from .segmentation import (GPU_MAX_SECONDS, GPU_SECONDS_PER_WINDOW, GPU_SETUP_SECONDS, NOT_CT_NOTE, ModelRuns,
                           Superseded, centre_of_mask, check_workload, env_int, gpu_seconds, run_warnings,
                           scan_warnings, scan_warnings_text, scan_windows, segment_scan, warnings_text)
from .segmentation import (STAT_COLUMNS, legend_html, organ_choices, present_labels, statistics_columns,
                           statistics_rows, surfaces)
from .segmentation import attention_choices, attention_click, attention_view, show_attention

__all__ = [
    "NOT_A_DEVICE", "SYNTHETIC_NOTICE", "UNTRAINED_NOTICE", "ModelHolder", "resolve_weights",
    "Display", "Session", "click", "compact", "delete_session_files", "describe", "display_settings", "load_scan",
    "position_text", "render", "render_all", "set_slice", "visible_labels", "window_for",
    "GPU_MAX_SECONDS", "GPU_SECONDS_PER_WINDOW", "GPU_SETUP_SECONDS", "NOT_CT_NOTE", "ModelRuns", "Superseded",
    "centre_of_mask", "check_workload", "env_int", "gpu_seconds", "run_warnings", "scan_warnings",
    "scan_warnings_text", "scan_windows", "segment_scan", "warnings_text",
    "STAT_COLUMNS", "legend_html", "organ_choices", "present_labels", "statistics_columns", "statistics_rows",
    "surfaces",
    "attention_choices", "attention_click", "attention_view", "show_attention",
]
