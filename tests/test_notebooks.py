"""The teaching notebooks run top to bottom in fast mode and draw their figures; each .ipynb is
paired with a jupytext percent .py of the same cells."""

import ast
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
ARTIFACTS = Path(__file__).parent / "artifacts"


def test_the_three_notebooks_exist():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_paired_with_its_percent_script(path):
    script = jupytext.read(path.with_suffix(".py"))
    notebook = nbformat.read(path, as_version=4)
    assert [c.source.strip() for c in script.cells] == [c.source.strip() for c in notebook.cells], (
        f"{path.name} and its .py differ: run `jupytext --sync {path.with_suffix('.py')}`")
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), "strip outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_fast_mode_and_draws_figures(path, monkeypatch, tmp_path):
    monkeypatch.setenv("UNETRPP_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("UNETRPP_NOTEBOOK_WORKDIR", str(tmp_path))  # where notebooks may write
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    ARTIFACTS.mkdir(exist_ok=True)
    nbformat.write(nb, ARTIFACTS / path.name)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if {"image/png", "application/vnd.plotly.v1+json"} & set(o.get("data", {}))]
    markdown = " ".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert len(images) >= 3, f"{path.name} drew {len(images)} figures"
    interactive = [o for o in images if "application/vnd.plotly.v1+json" in o["data"]]
    assert all("text/html" in o["data"] for o in interactive), "a plotly figure would be blank in an HTML export"
    assert "Exercises" in markdown and "How long" in markdown


def test_notebook_02_says_why_a_network_refuses_the_input():
    """Exercise 1 of notebook 02 asks what the error says when a network refuses INPUT. measure() runs
    the complexity command in its own process: it showed only 'returned non-zero exit status 2'."""
    cell = next(c.source for c in jupytext.read(NOTEBOOKS[1].with_suffix(".py")).cells if "def measure" in c.source)
    function = next(node for node in ast.parse(cell).body if isinstance(node, ast.FunctionDef))
    namespace = {"INPUT": (1, 1, 40, 64, 64), "REPEATS": 1, "THREADS": 1}
    exec("import json, subprocess, sys", namespace)
    exec(compile(ast.Module([function], []), "02_complexity.py", "exec"), namespace)
    with pytest.raises(RuntimeError, match=r"unetrpp at input 1x1x40x64x64: error: .*divisible by stem x 8"):
        namespace["measure"]("unetrpp")


def _run_notebook_01_figure_cells(*titles: str) -> dict:
    """Run the cells of notebook 01 that draw the figures titled `titles` (section 4 first: the later ones
    read its captured maps) on a random unetrpp_tiny and one random window; returns their namespace."""
    import matplotlib
    import torch

    import unetrpp

    matplotlib.use("Agg")
    cells = jupytext.read(NOTEBOOKS[0].with_suffix(".py")).cells
    model = unetrpp.create_model("unetrpp_tiny").eval()
    namespace = {"model": model, "x": torch.randn(1, 1, *model.config.patch_size), "heads": model.config.num_heads,
                 "cfg": model.config, "choice": None, "orientation": model.config.preprocessing.orientation}
    exec("import matplotlib.pyplot as plt, numpy as np, torch\nfrom unetrpp.attention import capture_attention\n"
         "from unetrpp.visualize import slice_2d", namespace)
    for title in titles:
        cell = next(c.source for c in cells if c.cell_type == "code" and title in c.source)
        exec(compile(cell, "01_epa_attention.py", "exec"), namespace)
    return namespace


def test_notebook_01_draws_every_head_of_channel_attention_on_the_one_colour_bar():
    """Section 4 draws one colour bar, the last head's: with each head scaled on its own, the bar misread
    the other panels (on the example CT, head 1 peaks at 0.47 and head 3 at 0.39, both drawn yellow)."""
    namespace = _run_notebook_01_figure_cells("Channel attention A_CA")
    limits = {image.get_clim() for ax in namespace["fig"].axes for image in ax.get_images()}
    namespace["plt"].close("all")
    assert len(limits) == 1, f"the heads are drawn on different colour scales: {limits}"


def test_notebook_01_labels_the_axes_of_the_rows_of_e():
    """Section 6 drew the rows of E with no axes at all, though the text says they are shown in the CT's
    orientation: the panels say which way is which, in tokens."""
    namespace = _run_notebook_01_figure_cells("Channel attention A_CA", "Learned token projections E")
    panels = [ax for ax in namespace["fig"].axes if ax.get_images()]
    namespace["plt"].close("all")
    assert all("tokens" in ax.get_xlabel() and "left" in ax.get_xlabel() for ax in panels)
    assert "anterior" in panels[0].get_ylabel()


def test_notebook_03_keeps_the_progress_bar_while_the_live_plot_redraws(tmp_path):
    """The training cell shows train()'s progress bar (a widget in Jupyter) and a plot redrawn every few
    steps; redrawing with clear_output() also wiped the bar for the rest of a 13-minute run, while the text
    tells the student to read the seconds per step from it. Runs the cell with train() stubbed."""
    cell = next(c.source for c in jupytext.read(NOTEBOOKS[2].with_suffix(".py")).cells if "def live_plot" in c.source)
    stub = f"""
from pathlib import Path
from types import SimpleNamespace
import time
import matplotlib.pyplot as plt
from IPython.display import clear_output, display
from tqdm.auto import tqdm
FAST, MAX_STEPS, WARMUP_STEPS, synthetic = True, 8, 2, True
work = data_dir = Path({str(tmp_path)!r})
TrainOptions = SimpleNamespace
def train(options, on_step):
    bar = tqdm(total=options.max_steps, desc="train", unit="step")
    for step in range(1, options.max_steps + 1):
        bar.update(1)
        if step % 4 == 0:
            on_step({{"step": step, "loss": 1 / step}})
    bar.close()
    return SimpleNamespace(step=step, model_dir=None)
"""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(stub), nbformat.v4.new_code_cell(cell)])
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    kinds = [key for o in nb.cells[1].outputs for key in o.get("data", {})]
    assert "application/vnd.jupyter.widget-view+json" in kinds, f"no progress bar left in the cell's outputs: {kinds}"
    assert kinds.count("image/png") == 1, f"the live plot should be one figure redrawn in place: {kinds}"


def test_notebook_02_says_which_network_it_is_measuring(capsys):
    """Section 1 runs three networks, each in its own process, for about a minute in all on an idle laptop
    and several on a busy one: it printed nothing until all three were done. Runs the cell with the
    process stubbed, checking what was printed when each network starts."""
    import json
    import subprocess
    from types import SimpleNamespace

    from unetrpp.complexity import PAPER_TABLE

    cell = next(c.source for c in jupytext.read(NOTEBOOKS[1].with_suffix(".py")).cells if "def measure" in c.source)
    shown_at_start = []

    def run(cmd, **kwargs):
        shown_at_start.append(capsys.readouterr().out)
        record = {"params": 1e6, "macs": 1e9, "seconds": 0.5, "peak_rss_mb": 100.0}
        return SimpleNamespace(returncode=0, stdout=json.dumps(record), stderr="")

    namespace = {"INPUT": (1, 1, 32, 64, 64), "REPEATS": 1, "THREADS": 1, "PAPER_TABLE": PAPER_TABLE,
                 "json": json, "sys": __import__("sys"), "subprocess": SimpleNamespace(run=run)}
    exec(compile(cell, "02_complexity.py", "exec"), namespace)
    started = zip(["UNETR++", "UNETR", "Swin-UNETR"], shown_at_start, strict=True)
    assert all(network in text for network, text in started), f"printed as each one started: {shown_at_start}"


def test_notebook_01_timing_shows_each_size_and_gives_the_threads_back_when_interrupted(capsys):
    """Section 7 times on one thread, a minute or more for its largest N on a busy laptop: a student who
    stopped it was left with one thread for every later cell (and a rerun then kept one as the number to
    restore), and the numbers came only after all sizes. Runs the cell, interrupted during the second size."""
    import time
    from types import SimpleNamespace

    import matplotlib.pyplot as plt
    import torch
    from einops import rearrange

    from unetrpp.attention import EPA

    cell = next(c.source for c in jupytext.read(NOTEBOOKS[0].with_suffix(".py")).cells if "def best_ms" in c.source)

    def attention(q, k, v):
        if q.shape[2] > 64:  # the second size: the student presses stop
            raise KeyboardInterrupt
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    threads = torch.get_num_threads()
    namespace = {"TOKENS": [64, 128], "REPEATS": 1, "time": time, "torch": torch, "rearrange": rearrange, "EPA": EPA,
                 "plt": plt, "F": SimpleNamespace(scaled_dot_product_attention=attention)}
    try:
        with pytest.raises(KeyboardInterrupt):
            exec(compile(cell, "01_epa_attention.py", "exec"), namespace)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(threads)
    assert "N =     64: EPA" in capsys.readouterr().out


def test_notebook_03_writes_its_phantoms_under_a_progress_bar(tmp_path, capsys):
    """Full mode writes 24 phantoms before training, a minute or more on a laptop, and the cell said nothing
    until all were written. Runs the data cell on two small phantoms (tqdm writes to stderr outside Jupyter)."""
    cell = next(c.source for c in jupytext.read(NOTEBOOKS[2].with_suffix(".py")).cells
                if "write_phantom_dataset(" in c.source and "if BTCV_DIR" in c.source)
    namespace = {"BTCV_DIR": "", "work": tmp_path, "PHANTOM_CASES": 2, "PHANTOM_SIZE": "small", "Path": Path}
    exec("from tqdm.auto import tqdm\nfrom unetrpp.data.btcv import check_cases, read_datalist\n"
         "from unetrpp.data.phantom import write_phantom_dataset", namespace)
    exec(compile(cell, "03_train_btcv_subset.py", "exec"), namespace)
    out = capsys.readouterr()
    assert "2/2" in out.err, f"no progress bar while the phantoms were written: {out.err!r}"
    assert "2 cases in" in out.out and len(namespace["lists"]["training"]) == 2


def test_notebook_03_does_not_evaluate_the_previous_run_after_an_interrupted_one(tmp_path):
    """Ctrl-C in the training cell (train() saves a checkpoint, then raises KeyboardInterrupt) left `result`, the
    previous run's, and section 3 evaluated that model without a word. Runs both cells with train() stubbed."""
    import time
    from types import SimpleNamespace

    import matplotlib.pyplot as plt

    cells = jupytext.read(NOTEBOOKS[2].with_suffix(".py")).cells
    training = next(c.source for c in cells if "def live_plot" in c.source)
    evaluation = next(c.source for c in cells if "load_pretrained(result.model_dir)" in c.source)

    def interrupted(options, on_step):
        raise KeyboardInterrupt

    previous = SimpleNamespace(run_dir=tmp_path / "run-earlier", model_dir=tmp_path / "run-earlier" / "model", step=8)
    namespace = {"FAST": True, "MAX_STEPS": 8, "WARMUP_STEPS": 2, "synthetic": True, "work": tmp_path,
                 "data_dir": tmp_path, "TrainOptions": SimpleNamespace, "train": interrupted, "time": time, "plt": plt,
                 "display": lambda *args, **kwargs: None, "result": previous,
                 "load_pretrained": lambda path: pytest.fail(f"section 3 evaluated {path}, not this run")}
    with pytest.raises(KeyboardInterrupt):
        exec(compile(training, "03_train_btcv_subset.py", "exec"), namespace)
    with pytest.raises(RuntimeError, match=r"the training run .*run-\d{8}-\d{6} did not finish, so it has no model to "
                                           "evaluate; run the training cell again"):
        exec(compile(evaluation, "03_train_btcv_subset.py", "exec"), namespace)


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem[:2] in ("01", "03")], ids=lambda p: p.stem)
def test_notebooks_that_show_scans_say_not_a_medical_device(path):
    """01 shows attention on a real CT, 03 segments scans (real BTCV cases when given): they say what the
    README, the viewer, the command line and the model cards say."""
    markdown = " ".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
    assert "Not a medical device" in markdown
