"""What the viewer (app.py) does, without gradio, on numpy arrays; errors are one line for the page. `weights`:
which weights, loaded once; `session`: a scan on the page, its views, the crosshair; `segmentation`: a run, its
limits, its warnings; `results`: statistics, legend, surfaces; `attention`: the attention tab."""

from .attention import attention_choices, attention_click, attention_view, show_attention
from .results import (STAT_COLUMNS, legend_html, organ_choices, present_labels, statistics_columns, statistics_rows,
                      surfaces)
from .segmentation import (GPU_MAX_SECONDS, GPU_SECONDS_PER_WINDOW, GPU_SETUP_SECONDS, NOT_CT_NOTE, ModelRuns,
                           Superseded, centre_of_mask, check_workload, env_int, gpu_seconds, run_warnings,
                           scan_warnings, scan_warnings_text, scan_windows, segment_scan, warnings_text)
from .session import (Display, Session, click, compact, delete_session_files, describe, display_settings, load_scan,
                      position_text, render, render_all, set_slice, visible_labels, window_for)
from .weights import NOT_A_DEVICE, SYNTHETIC_NOTICE, UNTRAINED_NOTICE, ModelHolder, resolve_weights

# MAX_WINDOWS stays in .segmentation, where check_workload reads it: a copy here would be a second value.
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
