"""The viewer's logic called directly, no server: weights choice, loading, clicks, segmentation files,
tables and the attention view. Uses a random-init unetrpp_tiny and small synthetic volumes."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from unetrpp import viewer as H
from unetrpp import create_model, io
from unetrpp import visualize as vis
from unetrpp import visualize_attention as va
from unetrpp.viewer import segmentation


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return create_model("unetrpp_tiny").eval()


@pytest.fixture
def scan(tmp_path) -> Path:
    """A small synthetic CT-like volume (Z, Y, X) = (12, 40, 48), spacing (5, 3, 2.5) mm, in RAS."""
    rng = np.random.default_rng(0)
    vol = np.full((12, 40, 48), -1000, np.int16)
    vol[2:10, 8:32, 8:40] = 40 + rng.integers(-20, 20, size=(8, 24, 32))
    return io.save_array(vol, (5.0, 3.0, 2.5), tmp_path / "small_ct.nii.gz", origin=(10.0, -20.0, 30.0))


def test_resolve_weights_order(tmp_path):
    assert H.resolve_weights(None, tmp_path / "absent") == (None, H.UNTRAINED_NOTICE)
    for name in ("unetrpp_tiny_phantom", "zz_other", "unetrpp_synapse"):
        (tmp_path / name).mkdir()
    assert H.resolve_weights(None, tmp_path) == (None, H.UNTRAINED_NOTICE)  # no config.json: not weights
    (tmp_path / "unetrpp_tiny_phantom" / "config.json").write_text("{}")
    assert H.resolve_weights(None, tmp_path) == (str(tmp_path / "unetrpp_tiny_phantom"), H.SYNTHETIC_NOTICE)
    (tmp_path / "zz_other" / "config.json").write_text("{}")
    (tmp_path / "unetrpp_synapse" / "config.json").write_text("{}")
    spec, notice = H.resolve_weights(None, tmp_path)
    assert spec == str(tmp_path / "unetrpp_synapse") and "phantom" not in notice
    assert H.resolve_weights("user/repo", tmp_path)[0] == "user/repo"
    (tmp_path / "zz_other" / "config.json").write_text('{"synthetic": true}')  # its config says so, not its name
    assert H.resolve_weights("zz_other", tmp_path) == ("zz_other", H.SYNTHETIC_NOTICE)
    (tmp_path / "unetrpp_synapse" / "config.json").write_text('{"synthetic": true}')
    assert H.resolve_weights(None, tmp_path) == (str(tmp_path / "unetrpp_synapse"), H.SYNTHETIC_NOTICE)


def test_resolve_weights_picks_only_single_channel_ct_weights_unasked(tmp_path):
    """Converted BraTS (4 MRI channels) or ACDC (MRI) weights beside the teaching ones are never the default."""
    for name, config in (("unetrpp_acdc", {"preprocessing": {"modality": "MRI"}}), ("unetrpp_tumor", {"in_channels": 4}),
                         ("unetrpp_tiny_phantom", {"synthetic": True})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    assert H.resolve_weights(None, tmp_path) == (str(tmp_path / "unetrpp_tiny_phantom"), H.SYNTHETIC_NOTICE)
    assert H.resolve_weights("unetrpp_acdc", tmp_path)[0] == "unetrpp_acdc"  # asked for by name: the user's choice
    with pytest.raises(ValueError, match="takes 4 input channels, but the viewer shows one scan; use single-channel"):
        H.resolve_weights("unetrpp_tumor", tmp_path)


def test_display_settings_keep_a_zero_level_and_refuse_an_empty_custom_width():
    assert H.display_settings("custom", 350, 0, 0.4, None, False).window() == (350.0, 0.0)  # 0 HU is a level
    with pytest.raises(ValueError, match=r"\(width 0, level 40\): give a width above 0 and a level in the scan's units"):
        H.display_settings("custom", 0, 40, 0.5, None, False).window()
    with pytest.raises(ValueError, match=r"\(width empty, level 40\): give a width above 0") as info:
        H.display_settings("custom", None, 40, 0.5, None, False).window()  # an emptied number box
    assert "None" not in str(info.value)
    assert H.display_settings("lung", None, None, None, ["liver"], True).window() == vis.WINDOW_PRESETS["lung"]


def test_model_holder_falls_back_to_untrained_tiny():
    holder = H.ModelHolder(None, H.UNTRAINED_NOTICE, device="cpu")
    model = holder.get()
    assert model is holder.get() and model.config.name == "unetrpp_tiny" and not model.training


def test_the_viewer_loads_its_weights_while_the_page_opens(monkeypatch, tmp_path, tiny_model):
    """No request needed: the first scan does not wait for the weights. A failure waits for a request."""
    import threading

    import app

    tiny_model.save_pretrained(tmp_path / "w")
    loaded, real_get = threading.Event(), H.ModelHolder.get
    monkeypatch.setattr(H.ModelHolder, "get", lambda holder: (real_get(holder), loaded.set())[0])
    app.build_demo(str(tmp_path / "w"))
    assert loaded.wait(60)
    (tmp_path / "w" / "model.safetensors").write_bytes(b"broken")
    H.ModelHolder(str(tmp_path / "w"), "", device="cpu").warm_up()  # no exception, no traceback
    with pytest.raises(ValueError, match="model.safetensors: unreadable"):
        H.ModelHolder(str(tmp_path / "w"), "", device="cpu").get()


def test_importing_the_app_builds_nothing_until_demo_is_asked_for():
    import subprocess
    import sys

    code = ("import app, gradio\n"
            "assert 'demo' not in vars(app)\n"
            "assert isinstance(app.demo, gradio.Blocks) and app.demo is app.demo\n"
            "print('OK')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True,
                         text=True, timeout=300)
    assert out.stdout.strip() == "OK", out.stderr


def test_model_holder_loads_a_weights_folder(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "w")
    spec, notice = H.resolve_weights(str(tmp_path / "w"))
    model = H.ModelHolder(spec, notice, device="cpu").get()
    assert model.config == tiny_model.config and not model.training
    first = next(iter(tiny_model.state_dict()))
    assert torch.equal(model.state_dict()[first], tiny_model.state_dict()[first])


def test_load_scan_gives_ras_volume(scan, tmp_path):
    session = H.load_scan(scan)
    assert session.volume.shape == (12, 40, 48) and session.spacing == (5.0, 3.0, 2.5)
    assert session.position == [6, 20, 24] and session.mask is None and session.orientation == "RAS"
    assert session.volume[5, 20, 20] > -100  # HU kept
    # A file stored as DICOM stores it (LPS: stored x runs to the patient's left, y to the back), with markers
    # in two top corners; in the session (RAS: x to the right, y to the front) they change sides.
    data = np.full((6, 5, 4), -1000, np.int16)  # (x, y, z) as stored
    data[-1, -1, -1] = 900  # left, posterior, superior: RAS x = 0, y = 0, z = last
    data[0, 0, -1] = 500  # right, anterior, superior: RAS x = last, y = last, z = last
    lps = tmp_path / "lps.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([-2.0, -3.0, 4.0, 1.0])), lps)  # x: left, y: posterior, z: superior
    loaded = H.load_scan(str(lps))
    assert loaded.volume.shape == (4, 5, 6) and loaded.spacing == (4.0, 3.0, 2.0)
    assert loaded.volume[-1, 0, 0] == 900 and loaded.volume[-1, -1, -1] == 500


@pytest.mark.parametrize("content, name, match", [
    (b"not an image at all", "bad.nii.gz", "NIfTI image"),
    (b"hello", "notes.txt", "not a NIfTI file name"),
])
def test_load_scan_rejects_bad_files(tmp_path, content, name, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        H.load_scan(path)
    with pytest.raises(ValueError, match="no file"):
        H.load_scan(None)


def test_load_scan_rejects_4d(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.int16), np.eye(4)), tmp_path / "series.nii.gz")
    with pytest.raises(ValueError, match="3-D"):
        H.load_scan(tmp_path / "series.nii.gz")


def test_slider_and_click_move_the_crosshair(scan):
    session = H.load_scan(scan)
    H.set_slice(session, "axial", 99)
    assert session.position[0] == 11  # clamped to the last slice
    axial = H.render(session, "axial", H.Display())
    h, w = axial.shape[:2]
    H.click(session, "axial", col=0, row=h - 1)  # image's left = patient's right = last x; bottom = posterior
    assert session.position == [11, 0, 47]
    coronal = H.render(session, "coronal", H.Display(preset="custom", width=100, level=0))
    H.click(session, "coronal", col=coronal.shape[1] - 1, row=0)  # top = superior slice, right = patient's left
    assert session.position == [11, 0, 0]
    assert "HU" in H.position_text(session)


def test_segment_scan_writes_aligned_mask_and_csv(scan, tiny_model, tmp_path):
    calls = []
    session, mask_path, csv_path = H.segment_scan(scan, tiny_model, tmp_path / "cache", overlap=0.25,
                                                  progress=lambda f, m: calls.append((f, m)))
    assert calls and max(f for f, _ in calls) <= 1.0
    assert calls[-1] == (1.0, "writing the mask and statistics")  # not "done" while the files are still written
    written = nib.load(mask_path)
    source = nib.load(scan)
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    assert np.array_equal(np.asarray(written.dataobj), session.mask.transpose(2, 1, 0))  # RAS source: (x, y, z)
    assert sorted(p.name for p in Path(mask_path).parent.iterdir()) == sorted(
        [Path(mask_path).name, Path(csv_path).name])  # nothing else left behind
    header = Path(csv_path).read_text().splitlines()[0]
    assert "volume_ml" in header and "mean_hu" in header
    rows = H.statistics_rows(session.statistics)
    assert sum(r[3] for r in rows) == int((session.mask > 0).sum())
    names = H.organ_choices(session)
    assert all(n in H.legend_html(session) for n in names)
    assert [r[1] for r in rows] == names
    H.delete_session_files(session)
    assert not Path(mask_path).exists() and not Path(mask_path).parent.exists()


def test_segment_scan_rejects_bad_overlap(scan, tiny_model, tmp_path):
    with pytest.raises(ValueError, match="overlap"):
        H.segment_scan(scan, tiny_model, tmp_path, overlap=1.0)


def test_segment_scan_runs_the_precision_it_is_given(scan, tiny_model, tmp_path):
    with pytest.raises(ValueError, match="precision='fp8'"):
        H.segment_scan(scan, tiny_model, tmp_path, precision="fp8")
    seen = []  # the dtype each forward pass gets (the hook travels with segment()'s bf16 copy of the model)
    hook = tiny_model.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    full, _, _ = H.segment_scan(scan, tiny_model, tmp_path, write_csv=False)
    ran_full, seen[:] = set(seen), []
    half, _, _ = H.segment_scan(scan, tiny_model, tmp_path, write_csv=False, precision="bf16")
    hook.remove()
    assert ran_full == {torch.float32} and set(seen) == {torch.bfloat16}
    assert half.mask.shape == full.mask.shape and (half.mask == full.mask).mean() > 0.95
    assert next(tiny_model.parameters()).dtype == torch.float32  # the viewer's model stays float32


def test_gpu_seconds_count_the_windows_of_the_scan(fixtures, monkeypatch):
    """The ZeroGPU request: the setup allowance plus a share per window on the weights' target grid,
    counted from the header; eight times the windows with TTA; capped; the allowance for unreadable files."""
    from unetrpp.config import get_config
    from unetrpp.inference import count_windows
    from unetrpp.preprocess import target_shape

    config = get_config("unetrpp_synapse")
    ct = fixtures / "example_ct.nii.gz"
    volume = io.load(ct, orientation=config.preprocessing.orientation)  # the grid segment() sees
    windows = count_windows(target_shape(volume.shape, volume.spacing, config.preprocessing.spacing),
                            config.patch_size, 0.5)
    assert windows == 126  # as benchmarks/README.md reports for this scan
    assert H.gpu_seconds(ct, config) == int(H.GPU_SETUP_SECONDS + windows * H.GPU_SECONDS_PER_WINDOW)
    assert H.gpu_seconds(ct, config, tta=True) == int(H.GPU_SETUP_SECONDS + 8 * windows * H.GPU_SECONDS_PER_WINDOW)
    for unreadable in (None, fixtures / "missing.nii.gz", fixtures / "README.md"):
        assert H.gpu_seconds(unreadable, config) == H.GPU_SETUP_SECONDS
    assert H.check_workload(ct, config) == windows  # the real CT passes the viewer's limit; not at any overlap:
    with pytest.raises(ValueError, match=r"spans 336 x 303 x 366 mm .* window passes .* above this viewer's limit"):
        H.check_workload(ct, config, overlap=0.99)  # segment() accepts 0.99, so the limit must count it as it is
    with pytest.raises(ValueError, match=r"overlap=1.0: must be a number in \[0, 1\)"):
        H.check_workload(ct, config, overlap=1.0)
    # A scan the viewer refuses asks only for the time it takes to say so; the request is capped.
    assert H.gpu_seconds(ct, config, overlap=0.95) == H.gpu_seconds(ct, config, overlap=1.0) == H.GPU_SETUP_SECONDS
    monkeypatch.setattr(segmentation, "MAX_WINDOWS", 10**9)  # where check_workload reads it
    assert H.gpu_seconds(ct, config, overlap=0.95) == H.GPU_MAX_SECONDS


def test_a_scan_that_would_take_too_long_is_refused_before_the_model_runs(tmp_path, tiny_model):
    """An 11 KB file whose header says 5-10 cm voxels spans 1.6 m: thousands of windows on a shared server."""
    bad = tmp_path / "huge_spacing.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 8), np.int16), np.diag([50.0, 50.0, 100.0, 1.0])), bad)
    windows, grid, extent = H.scan_windows(bad, tiny_model.config)
    assert windows > segmentation.MAX_WINDOWS and grid == (200, 640, 640) and extent == "800 x 1600 x 1600"
    with pytest.raises(ValueError, match=r"spans 800 x 1600 x 1600 mm .* above this viewer's limit of 2,000 "
                                         r"\(UNETRPP_MAX_WINDOWS\); check the voxel spacing") as info:
        H.segment_scan(bad, tiny_model, tmp_path / "out", tta=True)
    assert "switch off test-time augmentation" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # refused before anything ran or was written
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 8), np.int16), np.diag([2.5, 2.5, 4.0, 1.0])), small)
    H.check_workload(small, tiny_model.config, tta=True)  # 8 passes of one window
    with pytest.raises(ValueError, match="above this viewer's limit of 7"):
        H.check_workload(small, tiny_model.config, tta=True, limit=7)


def test_a_scan_refused_for_its_size_in_a_header_in_meters_names_the_unit(tmp_path, tiny_model):
    """A CT in mm whose header says meters spans kilometres: cropping or lowering the overlap would not help."""
    img = nib.Nifti1Image(np.zeros((32, 32, 8), np.int16), np.diag([2.5, 2.5, 4.0, 1.0]))
    img.header.set_xyzt_units("meter")
    nib.save(img, tmp_path / "meters.nii.gz")
    with pytest.raises(ValueError, match=r"above this viewer's limit .* the header gives distances in meters "
                                         r"\(xyzt_units\), converted to millimetres: if its voxel size is in mm, set "
                                         "xyzt_units to mm"):
        H.check_workload(tmp_path / "meters.nii.gz", tiny_model.config)


def test_the_space_asks_zerogpu_for_what_each_call_needs(zerogpu_app, fixtures, scan, tiny_model):
    """app.py under `forked_gpu` (ZeroGPU's semantics: each GPU function runs in a worker on pickled
    copies of its arguments and results): every model call is wrapped with a duration, the
    segmentation's duration follows the scan and the TTA switch, and the attention tab still works
    (what the worker changes in its copy of the session is lost)."""
    import gradio as gr

    handler, _, requested = zerogpu_app
    assert set(requested) == {"on_segment", "api_segment", "attention_maps"}
    assert requested["attention_maps"] == H.GPU_SETUP_SECONDS
    session = H.load_scan(scan)
    *images, figure, caption = handler["on_attention"](session, 0, 0, "abdomen", None, None)
    assert images[0].ndim == 3 and "Query voxel" in caption
    H.attention_click(session, "axial", 0, 0)  # needs the maps the worker computed
    result, status = handler["segment_shown"](session, 0.5, False, False, {"path": session.path},
                                              progress=lambda *a, **k: None)
    assert result.mask is not None and result.mask.shape == session.volume.shape and "Segmented" in status
    # Another scan was put on the page meanwhile: this run's result changes nothing.
    skipped = handler["segment_shown"](session, 0.5, False, False, {"path": "another.nii.gz"},
                                       progress=lambda *a, **k: None)
    assert list(skipped) == [gr.skip()] * 2
    ct = fixtures / "example_ct.nii.gz"
    session = H.Session(np.zeros((2, 2, 2), np.float32), (1.0, 1.0, 1.0), ct.name, str(ct))
    expected = H.gpu_seconds(ct, tiny_model.config, 0.5, False)
    assert expected > H.GPU_SETUP_SECONDS
    assert requested["on_segment"](session, 0.5, False, False, progress=None) == expected
    assert requested["on_segment"](session, 0.5, True, False) == H.gpu_seconds(ct, tiny_model.config, 0.5, True) > expected
    assert requested["on_segment"](None, 0.5, False, False) == H.GPU_SETUP_SECONDS
    assert requested["api_segment"](str(ct), 0.5, False) == expected


def forked_gpu(requested: list, durations: dict):
    """A stand-in for `spaces.GPU` with ZeroGPU's semantics (spaces 0.51, spaces/zero/wrappers.py): each
    function's `duration` as given goes into `durations` (by function name); the duration function gets
    the call's arguments (what it returns is recorded in `requested`); the
    function runs in a forked process on pickled arguments and its result comes back pickled; a
    gr.Error raised there comes back as it is, any other exception as a gr.Error holding only its class
    name; progress calls are forwarded to the caller's `progress` while the worker runs."""
    import functools
    import multiprocessing
    import threading

    import gradio as gr

    def GPU(fn=None, duration=None):
        def wrap(f):
            durations[f.__name__] = duration

            @functools.wraps(f)
            def in_a_worker(*args, **kwargs):
                requested.append((f.__name__, duration(*args, **kwargs) if callable(duration) else duration))
                progress = kwargs.pop("progress", None)
                here, there = multiprocessing.get_context("fork").Pipe()

                def worker():
                    args, kwargs = there.recv()
                    if progress is not None:
                        kwargs["progress"] = lambda *a, **k: there.send(("progress", a, k))
                    try:
                        there.send(("ok", f(*args, **kwargs)))
                    except gr.Error as exc:
                        there.send(("error", exc))
                    except Exception as exc:
                        there.send(("error", gr.Error(type(exc).__name__, print_exception=False)))

                process = multiprocessing.get_context("fork").Process(target=worker, daemon=True)
                # Forked from a fresh thread, as gradio's handler threads fork it: a fork of a thread that has run
                # torch's OpenMP pool (pytest's main thread) waits forever for that pool in its first convolution.
                starter = threading.Thread(target=process.start)
                starter.start()
                starter.join()
                try:
                    here.send((args, kwargs))
                    while True:
                        assert here.poll(120), f"the forked {f.__name__} gave no answer in 120 s"
                        kind, *value = here.recv()
                        if kind == "progress":
                            progress(*value[0], **value[1])
                        elif kind == "error":
                            raise value[0]
                        else:
                            return value[0]
                finally:
                    process.join(10)
            return in_a_worker
        return wrap(fn) if fn is not None else wrap
    return GPU


@pytest.fixture
def zerogpu_app(monkeypatch, tiny_model, tmp_path):
    """app.py's handlers (by function name) under `forked_gpu`, the GPU seconds its calls asked for, and
    the duration each GPU function was given."""
    import importlib.util
    import sys
    import types

    requested, durations = [], {}
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=forked_gpu(requested, durations)))
    spec = importlib.util.spec_from_file_location("app_on_forked_zerogpu", Path(__file__).parents[1] / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    return {f.name: f.fn for f in app.build_demo(net=tiny_model).fns.values()}, requested, durations


def test_segmenting_the_scan_held_gives_what_reading_the_file_again_gave(fixtures, scan, tiny_model, tmp_path,
                                                                          monkeypatch):
    """The page's segmentation read and decompressed the upload again (1-2 s for a 512 x 512 x 300 CT, on ZeroGPU GPU time)
    although the session holds it: it segments the scan held, with the same mask, statistics, warnings, files and
    session as from the file, for a CT, an MRI, values with NaN (float32, a warning) and a 4-D file; a session
    of another file, or none, reads the file."""
    rng = np.random.default_rng(1)
    odd = rng.normal(0, 300, (40, 36, 14)).astype(np.float32)
    odd[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(odd, np.diag([2.5, 2.5, 4.0, 1.0])), tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(rng.integers(-1000, 400, (40, 36, 14, 1)).astype(np.int16), np.diag([2.5, 2.5, 4.0, 1.0])),
             tmp_path / "four_d.nii")
    reads, warned = [], {}
    load = io.load
    monkeypatch.setattr(io, "load", lambda *a, **k: reads.append(Path(a[0]).name) or load(*a, **k))
    for path in (scan, fixtures / "example_mr_sm.nii.gz", tmp_path / "nan.nii.gz", tmp_path / "four_d.nii"):
        held = H.load_scan(path)
        reads.clear()
        mine, mask, csv = H.segment_scan(path, tiny_model, tmp_path / "held", held=held)
        assert reads == [], f"{path.name} read again"
        theirs, mask_read, csv_read = H.segment_scan(path, tiny_model, tmp_path / "read")
        assert reads == [path.name]
        assert np.array_equal(mine.mask, theirs.mask) and np.array_equal(mine.volume, theirs.volume)
        assert mine.volume.dtype == theirs.volume.dtype and mine.ct == theirs.ct and mine.position == theirs.position
        assert (mine.statistics, mine.warnings, mine.spacing, mine.orientation) == \
            (theirs.statistics, theirs.warnings, theirs.spacing, theirs.orientation)
        assert mine.summary.split(" in ")[0] == theirs.summary.split(" in ")[0]  # organs and windows; not the time
        assert Path(csv).read_text() == Path(csv_read).read_text()
        written, read = nib.load(mask), nib.load(mask_read)
        assert np.array_equal(written.dataobj, read.dataobj) and np.array_equal(written.affine, read.affine)
        assert written.header.binaryblock == read.header.binaryblock
        assert np.array_equal(held.volume, H.load_scan(path).volume)  # the session held is left as it was
        reads.clear()  # "Segment (again)" on the result: nothing read either
        again, _, _ = H.segment_scan(path, tiny_model, tmp_path / "again", held=mine)
        assert reads == [] and np.array_equal(again.mask, mine.mask) and again.warnings == mine.warnings
        warned[path.name] = " ".join(mine.warnings)
    assert "NaN" in warned["nan.nii.gz"] and "4-D" in warned["four_d.nii"]  # what loading changed is still said
    reads.clear()
    H.segment_scan(scan, tiny_model, tmp_path / "other", held=H.load_scan(tmp_path / "nan.nii.gz"))
    assert reads == ["nan.nii.gz", scan.name]  # another file's session: this file is read


def test_on_zerogpu_the_worker_segments_its_copy_of_the_scan_without_reading_the_file(zerogpu_app, scan, tiny_model,
                                                                                      monkeypatch):
    """The worker gets a pickled copy of the session (its scan and what reading the file gave) and segments
    that: the same mask as from the file, and the file is not read again there (a read in the forked worker
    would fail: io.load is broken for it)."""
    handler, _, _ = zerogpu_app
    session = H.load_scan(scan)
    expected, _, _ = H.segment_scan(scan, tiny_model, Path(scan).parent / "expected")

    def no_reading(*args, **kwargs):
        raise OSError("read again")

    monkeypatch.setattr(io, "load", no_reading)
    result, status = handler["segment_shown"](session, 0.5, False, False, {"path": session.path},
                                              progress=lambda *a, **k: None)
    assert "Segmented" in status, status
    assert np.array_equal(result.mask, expected.mask) and result.statistics == expected.statistics
    assert result.warnings == expected.warnings and result.read is not None and result.read.array is None


def test_on_zerogpu_a_crosshair_moved_during_a_segmentation_stays_where_it_was_put(zerogpu_app, scan, tiny_model):
    """The worker segments a copy of the session taken when the run started: it went back to the organs
    when the crosshair had been moved meanwhile, and a failed run put the copy in place of the page's
    session (and any move made meanwhile with it)."""
    import gradio as gr

    handler, requested, _ = zerogpu_app
    session = H.load_scan(scan)
    moved = [1, 2, 3]

    def click_during_the_run(*args, **kwargs):  # called here, in the page's process, while the worker segments
        session.position[:] = moved

    result, status = handler["segment_shown"](session, 0.5, False, False, {"path": session.path},
                                              progress=click_during_the_run)
    assert "Segmented" in status and result.mask is not None
    assert result.position == moved, "the crosshair moved during the run went back to the organs"
    assert requested == [("on_segment", H.gpu_seconds(scan, tiny_model.config, 0.5, False))]
    kept, status = handler["segment_shown"](result, 1.5, False, False, {"path": result.path},
                                            progress=lambda *a, **k: None)
    assert "Could not segment" in status and "overlap=1.5" in status
    assert kept == gr.skip(), "the worker's copy of the session replaced the page's"


def test_on_zerogpu_a_result_dropped_for_a_newer_scan_leaves_no_files(zerogpu_app, scan, tmp_path):
    """A scan uploaded while the worker segments the previous one: the worker, on a copy of the page, finishes
    and writes its mask and table, and the page drops that result. Its files were offered to nobody, so gradio's
    cache clean-up never saw them and no session deleted them: one mask per replaced scan, on disk for good."""
    import gradio as gr

    handler, _, _ = zerogpu_app
    session = H.load_scan(scan)
    shown = {"path": session.path}

    def new_upload_during_the_run(*args, **kwargs):  # in the page's process, while the worker segments
        shown["path"] = str(tmp_path / "another_scan.nii.gz")

    assert handler["segment_shown"](session, 0.5, False, False, shown, progress=new_upload_during_the_run) == (
        gr.skip(), gr.skip())
    left = [p.name for p in (tmp_path / "cache").rglob("*") if p.name.startswith("small_ct")]
    assert left == [], f"the dropped result's files stay in the server's cache: {left}"


def test_on_zerogpu_the_api_and_the_attention_tab_say_what_is_wrong(zerogpu_app, scan, tmp_path):
    """Errors raised in the worker reach the page and gradio_client as the one-line message: they read
    'ValueError', since ZeroGPU hands back only the class name of an exception that is not a gr.Error."""
    import gradio as gr

    handler, _, _ = zerogpu_app
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"this is not a NIfTI image")
    with pytest.raises(gr.Error, match="broken.nii.gz: .*not a NIfTI image"):
        handler["api_segment"](str(broken), 0.5, False)
    session = H.load_scan(scan)
    session.orientation = "LPS"  # as a scan loaded for weights that expect LPS (synapse) before it is segmented
    with pytest.raises(gr.Error, match="the model expects RAS; segment the scan first"):
        handler["on_attention"](session, 0, 0, "abdomen", None, None)
    session.orientation = "RAS"
    *images, figure, caption = handler["on_attention"](session, 0, 0, "abdomen", None, None)
    assert images[0].ndim == 3 and f"Query voxel (z, y, x) = {tuple(session.position)}" in caption


def test_statistics_rows_skip_empty_and_round():
    rows = H.statistics_rows([{"label": 6, "name": "liver", "voxels": 10, "volume_ml": 1.23456, "mean_hu": 55.55},
                              {"label": 1, "name": "spleen", "voxels": 0, "volume_ml": 0.0, "mean_hu": float("nan")}])
    assert rows == [[6, "liver", 1.23, 10, 55.5]] or rows == [[6, "liver", 1.23, 10, 55.6]]


def test_a_few_voxels_of_a_fine_ct_do_not_read_zero_ml():
    """Six voxels of 0.59 x 0.71 x 1.68 mm (0.0042 mL) showed as "0" mL beside "6" voxels in the table."""
    rows = H.statistics_rows([{"label": 4, "name": "gallbladder", "voxels": 6, "volume_ml": 0.0042456, "mean_hu": 30.5},
                              {"label": 5, "name": "esophagus", "voxels": 29, "volume_ml": 0.02062, "mean_hu": 62.1},
                              {"label": 7, "name": "stomach", "voxels": 207776, "volume_ml": 147.6713,
                               "mean_hu": 50.9}])
    assert [row[2] for row in rows] == [0.0042, 0.021, 147.67]


def test_a_scan_with_no_organ_found_names_its_mean_as_one_with_organs_would(scan, tmp_path):
    """No organ found: the table and the CSV still say the mean's unit as for a scan with organs, "mean
    intensity" / mean_intensity for the MRI, not mean_hu (the CSV said mean_hu whatever the scan)."""
    torch.manual_seed(0)
    model = create_model("unetrpp_tiny").eval()
    model.register_forward_hook(lambda module, args, out: torch.cat([out[:, :1] + 100.0, out[:, 1:]], 1))  # background
    mri = Path(__file__).parent / "fixtures" / "example_mr_sm.nii.gz"
    for path, table_mean, csv_mean in ((mri, "mean intensity", "mean_intensity"), (scan, "mean HU", "mean_hu")):
        session, _, csv_path = H.segment_scan(path, model, tmp_path / "cache")
        assert H.statistics_rows(session.statistics) == [] and H.statistics_columns(session)[-1] == table_mean
        assert Path(csv_path).read_text().splitlines() == [f"label,name,voxels,volume_ml,{csv_mean}"]


def test_a_segmentation_checks_once_whether_the_scan_is_ct(scan, tiny_model, tmp_path, monkeypatch):
    """The percentiles behind `ct_warning` (about 0.1 s on a large CT) are taken once per run: the run's
    warning, the statistics' mean_hu and the viewer's session each took them (3 times)."""
    from unetrpp import inference

    calls = []
    monkeypatch.setattr(inference, "intensity_range", lambda a: calls.append(a.shape) or (-1000.0, 300.0))
    session, _, _ = H.segment_scan(scan, tiny_model, tmp_path / "cache", write_csv=False)
    assert len(calls) == 1 and session.ct is True


def test_attention_view_on_the_tiny_model(scan, tiny_model):
    session = H.load_scan(scan)
    blocks = va.attention_blocks(tiny_model)
    assert blocks[0] == "unetr_pp_encoder.stages.0.0" and len(blocks) == 7
    view = va.compute_attention(tiny_model, session.volume, session.spacing, session.position, blocks[1], head=None)
    cfg = tiny_model.config
    assert view.window_hu.shape == view.heat.shape == cfg.patch_size
    assert view.grid == cfg.stage_grid(1)
    heads, d, d2 = view.channel.shape
    assert heads == cfg.num_heads and d == d2 == cfg.dims[1] // cfg.num_heads
    assert np.allclose(view.channel.sum(-1), 1.0, atol=1e-4)  # softmax rows
    # The window is centred on the query voxel and resampled to the model spacing.
    z, y, x = session.position
    assert view.window_hu[view.query] == pytest.approx(session.volume[z, y, x], abs=1e-3)
    for v in ("axial", "coronal", "sagittal"):
        assert va.render_attention(view, v).ndim == 3
    # A click on the window's centre pixel points back at the query voxel.
    image = va.render_attention(view, "axial")
    centre = va.window_click_to_voxel(view, "axial", image.shape[1] / 2, image.shape[0] / 2, session.position,
                                      session.spacing, session.volume.shape)
    assert all(abs(a - b) <= 1 for a, b in zip(centre, session.position))
    assert "stage 1" in va.block_label(blocks[1], view.grid)
    with pytest.raises(ValueError, match="valid names"):
        va.compute_attention(tiny_model, session.volume, session.spacing, session.position, "nope")
    with pytest.raises(ValueError, match="head"):
        va.compute_attention(tiny_model, session.volume, session.spacing, session.position, head=9)
    assert len(va.channel_figure(view.channel).data) == heads


def test_attention_heat_is_the_query_tokens_row_of_the_chosen_head(scan, tiny_model):
    """heat = A_SA[query token] @ E of the chosen head (the mean over heads for None), on the block's grid,
    upsampled to the window: recomputed here from the captured maps of the same window."""
    import torch.nn.functional as F

    from unetrpp.attention import capture_attention
    from unetrpp.preprocess import normalize

    session = H.load_scan(scan)
    block = va.attention_blocks(tiny_model)[1]
    views = {h: va.compute_attention(tiny_model, session.volume, session.spacing, session.position, block, head=h)
             for h in (None, 0, 1)}
    window, cfg = views[0].window_hu, tiny_model.config
    with torch.no_grad(), capture_attention(tiny_model) as maps:
        tiny_model(torch.from_numpy(normalize(window, cfg.preprocessing).astype(np.float32))[None, None])
    grid, patch = tuple(maps[block]["grid"]), cfg.patch_size
    token = [q // (p // g) for q, p, g in zip(views[0].query, patch, grid)]  # the token holding the window's centre
    row = maps[block]["spatial"][0, :, np.ravel_multi_index(token, grid), :]  # (heads, P)
    coarse = (row @ maps[block]["E"]).reshape(-1, 1, *grid)  # (heads, 1, *grid)
    expected = F.interpolate(coarse, size=patch, mode="trilinear", align_corners=False)[:, 0].numpy()
    for h in (0, 1):
        np.testing.assert_allclose(views[h].heat, expected[h], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(views[None].heat, expected.mean(0), rtol=1e-4, atol=1e-6)
    assert not np.allclose(views[0].heat, views[1].heat)


def test_attention_view_follows_the_window_orientation():
    """Synapse weights see LPS windows: the attention views show them as the slice views do (patient's
    left on the image's right, anterior up), and a click maps back through the same flips."""
    window = np.full((8, 16, 16), -1000.0, np.float32)
    window[:, :, 12:] = 300.0  # bright at large x: the patient's left in LPS, the right in RAS
    spacing = (2.0, 1.5, 1.5)
    sides = {}
    for orientation in ("RAS", "LPS"):
        view = va.AttentionView(window, np.zeros_like(window), np.ones((1, 2, 2)), (4, 8, 8), (2, 4, 4),
                                spacing, "b", orientation)
        image = va.render_attention(view, "axial").mean(-1)
        sides[orientation] = "right" if image[:, image.shape[1] // 2:].mean() > image[:, :image.shape[1] // 2].mean() else "left"
        y, x = va.window_click_to_voxel(view, "axial", 0, 0, (50, 50, 50), spacing, (100, 100, 100))[1:]
        sides[orientation + " top-left click"] = (np.sign(y - 50), np.sign(x - 50))
    assert sides == {"RAS": "left", "LPS": "right",  # radiological convention: patient's left on the right
                     "RAS top-left click": (1, 1), "LPS top-left click": (-1, -1)}  # anterior, patient's right


def test_attention_outputs_and_click_recentre(scan, tiny_model):
    session = H.load_scan(scan)
    with pytest.raises(ValueError, match="Show attention"):
        H.attention_click(session, "axial", 0, 0)
    blocks, heads = H.attention_choices(tiny_model)
    assert [v for _, v in blocks] == list(range(7)) and heads[0] == ("mean of heads", 0) and len(heads) == 5
    start = list(session.position)
    view = H.attention_view(tiny_model, session, 2, 1)
    session.position = [start[0] - 3, *start[1:]]  # the slider moved while the model ran (another event)
    *images, figure, caption = H.show_attention(session, view, 1, (400.0, 40.0))
    assert len(images) == 3 and "head 1" in caption and str(tuple(start)) in caption  # where the maps are from
    H.attention_click(session, "axial", 0, 0)  # top-left of the window: anterior (+y) and patient's right (+x)
    assert session.position[0] == start[0]
    assert session.position[1] > start[1] and session.position[2] > start[2]
    with pytest.raises(ValueError, match="block"):
        H.attention_view(tiny_model, session, 99, 0)


def test_the_status_line_keeps_a_runs_warnings_except_the_synthetic_one():
    from unetrpp.inference import SYNTHETIC_WEIGHTS_WARNING

    small = "the scan spans only 4 x 5 x 6 mm (z, y, x), under half of one network window"
    session = H.Session(np.zeros((4, 5, 6), np.float32), (1.0, 1.0, 1.0), "scan.nii.gz", "scan.nii.gz",
                        warnings=[SYNTHETIC_WEIGHTS_WARNING, small])
    assert H.warnings_text(session) == f"\n\n**Warning**: {small}"  # the summary already names SYNTHETIC weights
    assert session.centre() == session.position == [2, 2, 3]


def test_what_reading_a_scan_found_is_said_when_it_shows_not_when_its_segmentation_ends(scan, tiny_model, tmp_path,
                                                                                       monkeypatch):
    """A scan with NaN voxels (or a shear, a repaired header) was shown at once, but why it looks odd was said only
    once its segmentation ended, minutes later for a large CT on a CPU Space. The upload says it (a toast, and a box
    that the run's progress bar on the status line does not cover); the run's end does not say it again; the next
    scan's upload empties the box."""
    import app

    toasts = []
    monkeypatch.setattr(app.gr, "Warning", lambda message, *a, **k: toasts.append(message))
    handler = {f.name: f.fn for f in app.build_demo(net=tiny_model).fns.values()}
    odd = np.asarray(nib.load(scan).dataobj, dtype=np.float32)
    odd[0, 0, :3] = np.nan
    nib.save(nib.Nifti1Image(odd, nib.load(scan).affine), tmp_path / "nan_ct.nii.gz")
    shown = {"path": None}
    session, status, notes, *_ = handler["on_file"](str(tmp_path / "nan_ct.nii.gz"), shown)
    assert status.startswith("Loaded **nan_ct.nii.gz**") and notes.visible, (status, notes)
    assert notes.value.startswith("**Warning**: ") and "nan_ct.nii.gz: replaced 3 non-finite voxels" in notes.value
    assert len(toasts) == 1 and "non-finite" in toasts[0]
    result, status = handler["segment_shown"](session, 0.5, False, False, shown, progress=lambda *a, **k: None)
    assert status.startswith("Segmented") and "non-finite" not in status, status
    assert any("non-finite" in w for w in result.warnings)  # still the run's, for the API and the log
    assert H.scan_warnings(result) == H.scan_warnings(session) and len(toasts) == 1, toasts
    _, status, notes, *_ = handler["on_file"](str(scan), shown)
    assert status.startswith("Loaded **small_ct.nii.gz**") and not notes.visible and not notes.value
    _, status, notes, *_ = handler["on_file"](str(tmp_path / "missing.nii.gz"), shown)
    assert status.startswith("**Could not load the file**") and not notes.visible


def test_organs_ticked_off_fade_in_the_legend_and_grey_in_the_3d_plot():
    mask = np.zeros((12, 16, 16), np.uint8)
    mask[2:6, 2:8, 2:8], mask[6:10, 8:14, 8:14] = 1, 2  # spleen, right kidney
    session = H.Session(np.zeros(mask.shape, np.float32), (1.0, 1.0, 1.0), "m.nii.gz", "m.nii.gz", mask=mask,
                        class_names=("background", "spleen", "right kidney"))
    assert "line-through" not in H.legend_html(session) and "line-through" not in H.legend_html(session, ["spleen", "right kidney"])
    legend = H.legend_html(session, ["spleen"])
    faded = [item for item in legend.split("<span class='legend-item'")[1:] if "line-through" in item]
    assert len(faded) == 1 and "right kidney" in faded[0]
    everything = H.surfaces(session)
    assert [(t.name, t.visible) for t in everything.data] == [("spleen", None), ("right kidney", None)]
    built = session.surfaces
    spleen_only = H.surfaces(session, ["spleen"])
    assert [(t.name, t.visible) for t in spleen_only.data] == [("spleen", True), ("right kidney", "legendonly")]
    # the box stays as it was (plotly would autorange it to the organs shown, out of the camera's frame): the
    # spleen stays where it was, beside the place of the kidney
    box = [(everything.layout.scene[f"{a}axis"].range, spleen_only.layout.scene[f"{a}axis"].range) for a in "xyz"]
    assert all(whole is not None and tuple(whole) == tuple(shown) for whole, shown in box), box
    assert session.surfaces is built and [t.visible for t in built.data] == [None, None]  # built once, kept whole
    session.mask = None
    assert H.surfaces(session) is None


def test_ticking_organs_does_not_search_the_whole_mask_again(monkeypatch):
    """The legend is drawn again for every organ box ticked, and the page after every run with the organ boxes:
    each drawing ran np.unique over the whole mask (0.3-0.5 s and 78 MB for a 512 x 512 x 300 CT). The labels
    present are found once per mask, and a mask set anew is searched anew."""
    import pickle

    mask = np.zeros((12, 16, 16), np.uint8)
    mask[2:6, 2:8, 2:8], mask[6:10, 8:14, 8:14] = 1, 3  # spleen, left kidney
    names = ("background", "spleen", "right kidney", "left kidney")
    session = H.Session(np.zeros(mask.shape, np.float32), (1.0, 1.0, 1.0), "m.nii.gz", "m.nii.gz", mask=mask,
                        class_names=names)
    searched = []
    unique = np.unique
    monkeypatch.setattr(np, "unique", lambda a, *args, **kw: searched.append(a.shape) or unique(a, *args, **kw))
    for shown in (None, ["spleen"], [], ["left kidney"]):
        assert H.organ_choices(session) == ["spleen", "left kidney"]
        assert "spleen" in H.legend_html(session, shown) and "right kidney" not in H.legend_html(session, shown)
    assert searched == [mask.shape]
    # a ZeroGPU worker's copy of the session carries the labels with the mask, not a second mask
    copy = pickle.loads(pickle.dumps(session))
    assert H.organ_choices(copy) == ["spleen", "left kidney"] and searched == [mask.shape]
    assert len(pickle.dumps(session)) < mask.nbytes + session.volume.nbytes + 2000
    session.mask = np.where(mask == 3, 2, mask).astype(np.uint8)  # another mask
    assert H.organ_choices(session) == ["spleen", "right kidney"] and "left kidney" not in H.legend_html(session)
    session.mask = None
    assert H.organ_choices(session) == [] and "Run the segmentation" in H.legend_html(session)


def test_surfaces_use_the_labels_found_for_the_legend(monkeypatch):
    """The surfaces searched the whole mask again for organs too small to draw (0.17 s for 512 x 512 x 250 voxels):
    they take the labels the legend found, and still name such an organ."""
    from unetrpp.labels import BTCV_CLASS_NAMES

    mask = np.zeros((40, 128, 128), np.uint8)  # above the surfaces' 300,000 voxels: they see a subsampled mask
    mask[5:30, 20:90, 20:90] = 6
    mask[0, 0, 0] = 13  # one voxel of left adrenal: no surface
    session = H.Session(np.zeros(mask.shape, np.int16), (1.0, 1.0, 1.0), "m.nii.gz", "m.nii.gz", mask=mask,
                        class_names=("background", *BTCV_CLASS_NAMES))
    searched = []
    unique = np.unique
    monkeypatch.setattr(np, "unique", lambda a, *args, **kw: searched.append(a.shape) or unique(a, *args, **kw))
    H.legend_html(session)
    figure = H.surfaces(session)
    assert searched.count(mask.shape) == 1
    assert [t.name for t in figure.data] == ["liver"] and "left adrenal gland" in figure.layout.title.text


def test_surfaces_made_by_synthetic_weights_say_so_on_the_figure():
    """The 3-D plot saves itself as a PNG (its camera button), away from the page's notice and status line."""
    from unetrpp.inference import SYNTHETIC_WEIGHTS_WARNING

    mask = np.zeros((12, 16, 16), np.uint8)
    mask[2:6, 2:8, 2:8] = 1
    made = {}
    for warnings in ([SYNTHETIC_WEIGHTS_WARNING], []):
        session = H.Session(np.zeros(mask.shape, np.float32), (1.0, 1.0, 1.0), "m.nii.gz", "m.nii.gz", mask=mask,
                            class_names=("background", "spleen"), warnings=warnings)
        made[bool(warnings)] = H.surfaces(session).layout.title.text or ""
    assert "SYNTHETIC" in made[True] and "not real anatomy" in made[True].replace("<br>", " ")
    assert "SYNTHETIC" not in made[False]


def test_only_the_organs_ticked_are_drawn_on_the_slices():
    mask = np.zeros((12, 16, 16), np.uint8)
    mask[4:8, 2:8, 2:8], mask[4:8, 9:14, 9:14] = 1, 2  # spleen, right kidney, both in axial slice 6
    session = H.Session(np.zeros(mask.shape, np.float32), (2.0, 2.0, 2.0), "m.nii.gz", "m.nii.gz", mask=mask,
                        class_names=("background", "spleen", "right kidney"), position=[6, 8, 8])
    lut = vis.label_lut()

    def colours(visible):
        image = H.render(session, "axial", H.Display(visible=visible, opacity=1.0))
        return {k for k in (1, 2) if (image.reshape(-1, 3) == lut[k]).all(axis=1).any()}

    assert colours(None) == {1, 2}
    assert colours(["spleen"]) == {1}
    assert colours(["right kidney"]) == {2}
    assert colours([]) == set()


def test_after_segmentation_the_crosshair_lands_on_the_organs():
    mask = np.zeros((10, 20, 30), np.uint8)
    assert H.centre_of_mask(mask) == [5, 10, 15]  # nothing found: the middle of the volume
    mask[1:4, 2:7, 20:29] = 3  # one organ off to a corner: the middle of its bounding box
    assert H.centre_of_mask(mask) == [2, 4, 24]
    mask[7, 15, 5] = 6  # a second organ: the middle of the box around both, [4, 8, 16], is background,
    assert H.centre_of_mask(mask) == [3, 6, 20]  # so the organ voxel nearest it (the line under the views named it)
    ring = np.zeros((5, 40, 40), np.uint8)  # organs around a centre left empty, as around the spine
    yy, xx = np.mgrid[:40, :40]
    ring[:, (yy - 20) ** 2 + (xx - 20) ** 2 >= 100] = 1
    position = H.centre_of_mask(ring)
    assert ring[tuple(position)] == 1 and position[0] == 2
    assert abs(np.hypot(position[1] - 20, position[2] - 20) - 10) < 1  # the nearest organ voxel, on the ring's inside


def test_a_bad_number_in_the_viewers_environment_variables_is_one_line(monkeypatch):
    """UNETRPP_MAX_WINDOWS, UNETRPP_CONCURRENCY and UNETRPP_QUEUE_SIZE (Space variables, README) set to
    something that is not a positive whole number end `python app.py` with one `error:` line naming the
    variable, not an int() traceback; unset, they keep their defaults. The first two are read at import by
    the handlers and by app.py (a process each); the third goes through app.py's second, like the second."""
    import os
    import subprocess
    import sys

    def message(name, value, default):
        return (f"{name}={value!r}: must be a whole number of at least 1, e.g. {name}={default} "
                "(the default, also used when it is unset)")

    for name, value, default in (("UNETRPP_MAX_WINDOWS", "2k", 2000), ("UNETRPP_CONCURRENCY", "one", 1)):
        out = subprocess.run([sys.executable, "-c", "import app"], cwd=Path(__file__).parents[1],
                             env={**os.environ, name: value}, capture_output=True, text=True, timeout=300)
        assert out.returncode != 0 and out.stderr.strip().splitlines() == [f"error: {message(name, value, default)}"], \
            out.stderr
    monkeypatch.setenv("UNETRPP_QUEUE_SIZE", "0")
    with pytest.raises(ValueError) as refused:
        H.env_int("UNETRPP_QUEUE_SIZE", 24)
    assert str(refused.value) == message("UNETRPP_QUEUE_SIZE", "0", 24)
    monkeypatch.setenv("UNETRPP_QUEUE_SIZE", " 12 ")
    assert H.env_int("UNETRPP_QUEUE_SIZE", 24) == 12
    assert H.env_int("UNETRPP_SURELY_UNSET", 7) == 7


def test_app_help_names_every_environment_variable_the_viewer_reads():
    """A Space owner reads `python app.py --help`: each UNETRPP_ variable app.py or the handlers read is there."""
    import re
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    handlers = "".join(p.read_text() for p in sorted(Path(H.__file__).parent.glob("*.py")))  # the viewer package
    read = set(re.findall(r"UNETRPP_[A-Z_]+", (root / "app.py").read_text() + handlers))
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and read >= {"UNETRPP_WEIGHTS", "UNETRPP_MAX_WINDOWS"}, out.stderr
    assert not {name for name in read if name not in out.stdout}, out.stdout


def test_a_bad_custom_window_leaves_the_views_empty_and_says_why_but_stops_nothing(scan, tiny_model):
    """The redraw after an upload or a run draws with the W/L boxes as they are: a width left at -5 or emptied
    must not fail it, or the page shows only 'Error' badges, the upload is never segmented and a run's mask
    and statistics are never offered. The views stay empty, and the line under them says what to fix."""
    import app

    handler = {f.name: f.fn for f in app.build_demo(net=tiny_model).fns.values()}
    session = H.load_scan(scan)
    for width in (-5, None):
        outputs = handler["show"](session, "custom", width, 40, 0.5, None, False)
        assert outputs[:3] == [None, None, None]
        assert outputs[3].startswith("**Views not drawn**: custom window (width") and "e.g. 400 and 40" in outputs[3]
    images = handler["show"](session, "custom", 400, 40, 0.5, None, False)[:3]  # fixed: the views come back
    assert all(image.ndim == 3 for image in images)


def test_a_page_whose_scan_the_server_no_longer_holds_says_so(tiny_model):
    """An hour after its last upload or run (or after a restart) the server drops a page's session while the page
    still shows the scan: a slider, a click or 'Segment (again)' then said 'unexpected error (AttributeError:
    'NoneType' object has no attribute 'volume'); please try another file', or asked for an upload already shown."""
    import app

    demo = app.build_demo(net=tiny_model)

    def on(elem_id, event):
        block = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)
        return next(f.fn for f in demo.fns.values() if (block._id, event) in [tuple(t) for t in f.targets])

    segment_shown = next(f.fn for f in demo.fns.values() if f.name == "segment_shown")
    click = app.gr.SelectData(None, {"index": [10, 10], "value": None})
    disp = ("abdomen", 400, 40, 0.5, [], False)
    # The slider and the views answer outside the queue, where gradio shows no toast: on the position line.
    for what, out in {"slider": on("slider-axial", "input")(None, 3, *disp),
                      "click": on("view-axial", "select")(None, *disp, click)}.items():
        position = out[-1] if what == "slider" else out[3]
        assert "no longer holds this page's scan" in position and "upload the scan again" in position, (what, out)
        assert all(o == app.gr.skip() for o in out if o is not position), what  # the views stay as they are
    redraw = next(f.fn for f in demo.fns.values() if f.name == "redraw_views")
    assert redraw(None, *disp) == [app.gr.skip()] * 7  # a window preset clicked: the page keeps what it shows
    attention = on("attention-btn", "click")
    calls = {"attention click": lambda: on("attention-axial", "select")(None, 0, 0, *disp, click),
             "attention button": lambda: attention(None, 0, 0, *disp[:3], {"path": "/cache/ct.nii.gz"}),
             "segment again": lambda: segment_shown(None, 0.5, False, False, {"path": "/cache/ct.nii.gz"})}
    for what, call in calls.items():
        with pytest.raises(app.gr.Error) as error:
            call()
        message = error.value.message
        assert "no longer holds this page's scan" in message and "upload the scan again" in message, (what, message)
    with pytest.raises(app.gr.Error, match="Upload a CT volume"):  # nothing was ever loaded on this page
        segment_shown(None, 0.5, False, False, {"path": None})
    with pytest.raises(app.gr.Error, match="Load a scan first"):
        attention(None, 0, 0, *disp[:3], {"path": None})


def test_a_run_queued_for_a_scan_replaced_before_its_turn_does_not_run(scan, tiny_model, tmp_path, monkeypatch):
    """A visitor replaces an upload whose run waits behind other visitors' runs: when its turn comes, that run read
    the page's session, the new scan, and segmented it, and the new upload's own run then segmented it again (twice
    the model time on a busy server). The page sends the upload a run was queued for; a run for another one stops."""
    import app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "cache"))
    after_upload = next(f.fn for f in app.build_demo(net=tiny_model).fns.values() if f.name == "after_upload")
    second = H.load_scan(io.save_array(np.asarray(nib.load(scan).dataobj), (5.0, 3.0, 2.5), tmp_path / "second.nii.gz"))
    shown = {"path": second.path}
    quiet = lambda *a, **k: None  # noqa: E731
    assert after_upload(second, str(scan), 0.5, False, False, shown, progress=quiet) == [app.gr.skip()] * 2
    assert not list((tmp_path / "cache").rglob("*_mask.nii.gz")), "the run queued for the replaced upload ran"
    result, status = after_upload(second, second.path, 0.5, False, False, shown, progress=quiet)
    assert status.startswith("Segmented **second.nii.gz**") and result.mask is not None


def test_the_statistics_csv_offered_for_teaching_weights_says_synthetic(scan, tmp_path):
    """The Space runs the teaching weights by default: its downloaded table of organ volumes says on every
    row that the weights were trained on SYNTHETIC phantoms, as the page and the mask do."""
    import csv

    torch.manual_seed(0)
    teaching = create_model("unetrpp_tiny", synthetic=True).eval()
    session, _, csv_path = H.segment_scan(scan, teaching, tmp_path / "cache", overlap=0.25)
    rows = list(csv.DictReader(open(csv_path)))
    assert rows and all("SYNTHETIC" in row["note"] for row in rows)
    assert [row["name"] for row in rows] == [s["name"] for s in session.statistics]


def test_a_window_typed_counts_when_the_box_is_left_not_only_on_enter(tiny_model):
    """Typed W/L then a tap elsewhere (no Enter, as on a phone): the views redraw and the preset turns custom,
    so the boxes never show a window other than the one drawn. A box only visited leaves the preset as it is."""
    import app

    demo = app.build_demo(net=tiny_model)
    for label in ("window W (HU)", "level L (HU)"):
        box = next(b for b in demo.blocks.values() if getattr(b, "label", None) == label)
        on_blur = {f.name: f.fn for f in demo.fns.values() if (box._id, "blur") in [tuple(t) for t in f.targets]}
        assert {"redraw_views", "window_typed"} <= set(on_blur), label
    window_typed = on_blur["window_typed"]
    assert window_typed("abdomen", 2000, 40) == "custom" and window_typed("custom", 300, 20) == "custom"
    assert window_typed("abdomen", 400, 40) == app.gr.skip() and window_typed("lung", 1500.0, -600.0) == app.gr.skip()


def test_a_scan_that_is_not_ct_is_shown_in_its_own_units_not_hu(fixtures, scan):
    """The bundled MRI: the position line and the table give intensities, not HU, and the views get a window
    fitted to its values (HU presets show it white); a CT keeps HU and the window the user chose."""
    mri = H.load_scan(fixtures / "example_mr_sm.nii.gz")
    assert mri.ct is False
    assert "HU" not in H.position_text(mri) and "intensity" in H.position_text(mri)
    assert H.statistics_columns(mri)[-1] == "mean intensity"
    width, level = H.window_for(mri)
    low, high = np.percentile(mri.volume, (1, 99))
    assert width == pytest.approx(high - low, rel=0.05) and level == pytest.approx((low + high) / 2, rel=0.05, abs=1)
    shown = vis.apply_window(mri.volume, width, level)
    assert (shown == 255).mean() < 0.03  # about the top 1 %; abdomen's W 400 / L 40 whitens a third of it
    assert (vis.apply_window(mri.volume, 400, 40) == 255).mean() > 0.3

    ct = H.load_scan(scan)
    assert ct.ct is True and H.window_for(ct) is None
    assert H.position_text(ct).endswith(" HU") and H.statistics_columns(ct)[-1] == "mean HU"


def test_a_redraw_overtaken_by_a_crosshair_move_gives_way(monkeypatch, scan, tiny_model):
    """W/L typed, then a click in a view: the box's blur redraw and the click run at once. A redraw that
    finds the crosshair moved while it drew must not put the old views and position back over the click's."""
    import app

    handler = {f.name: f.fn for f in app.build_demo(net=tiny_model).fns.values()}
    session = H.load_scan(scan)
    drawn = handler["redraw_views"](session, "custom", 800, 40, 0.5, None, False)
    assert all(image.ndim == 3 for image in drawn[:3]) and drawn[3] == H.position_text(session)

    render_all = H.render_all

    def clicked_meanwhile(s, display):
        images = render_all(s, display)
        H.click(s, "axial", 3, 4)  # the click's handler, in another thread
        return images

    monkeypatch.setattr(H, "render_all", clicked_meanwhile)
    assert handler["redraw_views"](session, "custom", 800, 40, 0.5, None, False) == [app.gr.skip()] * 7


def test_drawing_what_the_page_holds_never_waits_in_the_queue_of_segmentations(tiny_model):
    """gradio's queue limit counts waiting events of every kind: with UNETRPP_QUEUE_SIZE segmentations waiting,
    a queued slider move, click or window change was refused ("This application is currently busy") on every
    page. Those events go around the queue; the model's runs wait in it."""
    import app

    demo = app.build_demo(net=tiny_model)
    by_id = {b._id: b for b in demo.blocks.values()}

    def triggers(fn):
        blocks = [(by_id.get(i), e) for i, e in fn.targets]  # the page's load event has no block
        return {(getattr(b, "elem_id", None) or getattr(b, "label", None), e) for b, e in blocks}

    view_events = {("slider-axial", "input"), ("slider-axial", "release"), ("view-sagittal", "select"),
                   ("window-preset", "change"), ("window W (HU)", "blur"), ("level L (HU)", "submit"),
                   ("overlay opacity", "release"), ("contours", "change")}
    queued = {t for fn in demo.fns.values() if fn.queue for t in triggers(fn)}
    unqueued = {t for fn in demo.fns.values() if not fn.queue for t in triggers(fn)}
    assert view_events <= unqueued and not view_events & queued, view_events & queued
    assert all(fn.queue for fn in demo.fns.values() if fn.concurrency_id == "model") and \
        {"segment_shown", "after_upload", "on_attention"} <= {fn.name for fn in demo.fns.values() if fn.queue}


def test_uploads_are_read_a_few_at_a_time_not_eight(tiny_model):
    """Reading a 512 x 512 x 300 CT peaks near 600 MB; at the queue's default of 8 at once, eight visitors uploading
    together took about 5 GB of a 16 GB Space. The upload's read has a group of its own, of LOAD_CONCURRENCY, which
    the server's queue enforces; the views still go around the queue."""
    import app

    demo = app.build_demo(net=tiny_model).queue(**app.QUEUE)
    for fn in demo.fns.values():  # what the server does with each event it is sent
        if fn.queue:
            demo._queue.create_event_queue_for_fn(fn)
    groups = demo._queue.event_queue_per_concurrency_id
    assert [fn.name for fn in demo.fns.values() if fn.concurrency_id == "load"] == ["on_file"]
    assert groups["load"].concurrency_limit == app.LOAD_CONCURRENCY < app.QUEUE["default_concurrency_limit"]
    assert groups["model"].concurrency_limit == app.MODEL_CONCURRENCY
    assert not any(fn.queue for fn in demo.fns.values() if fn.name == "redraw_views")  # slider let go, W/L, organs
    readme = " ".join((Path(app.__file__).parent / "README.md").read_text().split())
    assert f"uploads are read {['one', 'two', 'three'][app.LOAD_CONCURRENCY - 1]} at a time" in readme


def test_an_unexpected_error_shows_no_server_folders():
    """The page names the visitor's file, never the server's upload cache it sits in, in every message."""
    import app

    cached = f"{app.get_upload_folder()}/0f3e9a/ct.nii.gz"
    for exc in (ValueError(f"{cached}: not a NIfTI image"), RuntimeError(f"{cached}: worker died")):
        message = app.user_message(exc)
        assert "ct.nii.gz" in message and app.get_upload_folder() not in message, message


def test_a_page_keeps_its_scan_no_longer_than_the_server_keeps_its_files(tiny_model):
    """The scan was held 60 minutes, its upload and results deleted after 30: in between, 'Segment (again)' said
    'no such file' and the downloads failed on a page that still held its scan."""
    import app

    demo = app.build_demo(net=tiny_model)
    held = [b.time_to_live for b in demo.blocks.values() if isinstance(b, app.gr.State) and b.time_to_live < float("inf")]
    assert held == [demo.delete_cache[1]] and f"{held[0] // 60} minutes" in app.NOT_HELD


def test_the_readme_says_how_long_a_closed_page_keeps_its_scan(tiny_model):
    """Gradio keeps a closed page's state for an hour whatever the State's time_to_live: a visitor who closes the
    tab leaves a 512 x 512 x 300 CT on the server for an hour, not the 30 minutes the README said."""
    import datetime

    from gradio.state_holder import StateHolder

    import app

    demo = app.build_demo(net=tiny_model)
    holder = StateHolder()
    holder.set_blocks(demo)
    state = next(b for b in demo.blocks.values() if isinstance(b, app.gr.State) and b.time_to_live < float("inf"))
    state.delete_callback = lambda value: None
    held = {}
    for closed in (False, True):
        page = holder[f"page-{closed}"]
        page[state._id] = "a session"
        ttl, _ = page._state_ttl[state._id]
        page._state_ttl[state._id] = (ttl, datetime.datetime.now() - datetime.timedelta(seconds=app.SESSION_SECONDS + 60))
        page.is_closed = closed
        holder.delete_all_expired_state()
        held[closed] = state._id in page.state_data
    assert held == {False: False, True: True}  # an open page's goes after 30 minutes, a closed page's stays
    readme = " ".join((Path(app.__file__).parent / "README.md").read_text().split())
    assert "keeps a closed page's for an hour" in readme


def test_no_server_folders_in_messages_on_windows_either(monkeypatch):
    """On Windows gradio's upload cache and the paths in messages use backslashes: the cache folder stayed in."""
    import app

    monkeypatch.setattr(app, "get_upload_folder", lambda: r"C:\Users\Łukasz\AppData\Local\Temp\gradio")
    cached = r"C:\Users\Łukasz\AppData\Local\Temp\gradio\0f3e9a\Müller scan.nii.gz"
    for exc in (ValueError(f"{cached}: not a NIfTI image"), RuntimeError(f"{cached}: worker died")):
        message = app.user_message(exc)
        assert "Müller scan.nii.gz" in message and "Temp" not in message and "0f3e9a" not in message, message


def test_teaching_weights_from_a_cached_hub_repo_are_announced_as_synthetic(tmp_path, monkeypatch):
    """--weights owner/name of SYNTHETIC weights: the page's notice said only 'Weights: `owner/name`.'"""
    import hashlib

    from huggingface_hub import constants

    for repo, model in (("teaching", create_model("unetrpp_tiny", synthetic=True)), ("real", create_model("unetrpp_tiny"))):
        model.save_pretrained(tmp_path / repo)
        commit = hashlib.sha1(repo.encode()).hexdigest()
        folder = tmp_path / "hub" / f"models--someone--{repo}"
        (folder / "snapshots" / commit).mkdir(parents=True)
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(commit)
        (folder / "snapshots" / commit / "config.json").write_bytes((tmp_path / repo / "config.json").read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no folder named someone/ here
    assert H.resolve_weights("someone/teaching", tmp_path / "none") == ("someone/teaching", H.SYNTHETIC_NOTICE)
    assert H.resolve_weights("someone/real", tmp_path / "none") == ("someone/real", "Weights: `someone/real`.")
    assert H.resolve_weights("someone/uncached", tmp_path / "none")[1] == "Weights: `someone/uncached`."


def test_the_legend_reads_in_light_and_dark_themes_and_without_colour():
    """A hidden organ's faded name keeps 4.5:1 on a light page, every swatch has a border in the text's colour
    (a yellow swatch on white, a dark blue one on a dark page had almost none), and the legend says how to tell
    organs apart without colour (with deuteranopia liver, gallbladder and aorta look alike)."""
    import re

    from unetrpp import BTCV_CLASS_NAMES

    mask = np.zeros((4, 8, 8), np.uint8)
    mask[1:3, 1:4, 1:4], mask[1:3, 4:7, 4:7] = 2, 10  # right kidney (yellow), portal and splenic vein (dark blue)
    session = H.Session(np.zeros(mask.shape, np.float32), (1.0, 1.0, 1.0), "m.nii.gz", "m.nii.gz", mask=mask,
                        class_names=("background", *BTCV_CLASS_NAMES))
    legend = H.legend_html(session, ["right kidney"])

    def luminance(rgb):
        c = [v / 255 for v in rgb]
        c = [v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4 for v in c]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    opacity = float(re.search(r"opacity:([0-9.]+)", legend).group(1))
    text = [opacity * v + (1 - opacity) * 255 for v in (39, 39, 42)]  # gradio's light theme: text on white
    assert (1.05) / (luminance(text) + 0.05) >= 4.5
    assert legend.count("border:1px solid currentColor") == 2
    assert "names the organ at the crosshair" in legend


def test_a_scan_in_whole_numbers_is_held_as_int16_and_shows_exactly_what_float32_showed(fixtures, scan, tiny_model,
                                                                                          tmp_path):
    """A page holds its scan for half an hour: a CT in whole HU (and the int16 MRI) is held as int16, half the
    memory of float32 (150 MB instead of 300 for a 512 x 512 x 300 CT, per visitor), and the views, the position
    line, the fitted window and the attention window are those of the float32 volume, value for value."""
    import copy

    from unetrpp.inference import ct_warning

    for path in (scan, fixtures / "example_mr_sm.nii.gz", fixtures / "example_ct.nii.gz"):
        session = H.load_scan(path)
        exact = io.load(path, "RAS").array  # float32, as the session held it before
        assert session.volume.dtype == np.int16 and session.volume.nbytes * 2 == exact.nbytes
        assert np.array_equal(session.volume, exact) and session.ct == (ct_warning(exact) is None)
        reference = copy.copy(session)
        reference.volume = exact
        for display in (H.Display(), H.Display(preset="custom", width=700, level=123.5)):
            for mine, theirs in zip(H.render_all(session, display), H.render_all(reference, display)):
                assert np.array_equal(mine, theirs)
        assert H.position_text(session) == H.position_text(reference)
        assert H.window_for(session) == H.window_for(reference)
        mine = va.compute_attention(tiny_model, session.volume, session.spacing, session.position)
        theirs = va.compute_attention(tiny_model, exact, session.spacing, session.position)
        assert mine.window_hu.dtype == np.float32 and np.array_equal(mine.window_hu, theirs.window_hu)
        assert np.array_equal(mine.heat, theirs.heat)
    segmented, _, _ = H.segment_scan(scan, tiny_model, tmp_path / "cache")
    assert segmented.volume.dtype == np.int16 and segmented.mask.dtype == np.uint8
    # Values int16 cannot hold exactly stay float32: halves (a scaling slope of 0.5), beyond 32767.
    for values in (np.full((4, 5, 6), 0.5, np.float32), np.full((4, 5, 6), 40000.0, np.float32)):
        kept = H.Session(values, (1.0, 1.0, 1.0), "s.nii.gz", "s.nii.gz")
        assert kept.volume.dtype == np.float32 and np.array_equal(kept.volume, values)


def test_a_scan_that_is_not_ct_is_said_to_be_so_when_it_shows_not_when_its_run_ends(tiny_model, tmp_path, monkeypatch):
    """An MRI given to CT weights: the status line said "not CT" for half a second (the run's progress bar then
    took it) and that these weights expect CT only when the run ended; now the box under the status line says
    both as the scan shows, and the run's end does not say it again."""
    import app

    toasts = []
    monkeypatch.setattr(app.gr, "Warning", lambda message, *a, **k: toasts.append(message))
    handler = {f.name: f.fn for f in app.build_demo(net=tiny_model).fns.values()}
    mri = np.random.default_rng(0).uniform(0, 800, (24, 40, 40)).astype(np.float32)  # no air, no fat: not CT
    nib.save(nib.Nifti1Image(mri, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "mri.nii.gz")
    shown = {"path": None}
    session, status, notes, *_ = handler["on_file"](str(tmp_path / "mri.nii.gz"), shown)
    assert notes.visible and H.NOT_CT_NOTE in notes.value and toasts == [H.NOT_CT_NOTE], (notes, toasts)
    result, status = handler["segment_shown"](session, 0.5, False, False, shown, progress=lambda *a, **k: None)
    assert any("do not look like CT" in w for w in result.warnings)  # still the run's, for the API and the log
    assert status.startswith("Segmented") and "CT" not in H.warnings_text(result), status
    assert len(toasts) == 1, toasts
