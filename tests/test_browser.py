"""The viewer in a real browser: Playwright drives headless Chromium (Debian package `chromium`)
against the app launched in-process. Screenshots go to tests/artifacts/ (gitignored).

Outside CI the test skips when no Chromium is found; under CI (CI=true) it must run.
"""

import contextlib
import os
import re
import shutil
import socket
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from unetrpp import create_model

EXAMPLE_CT = Path(__file__).parent / "fixtures" / "example_ct_sm.nii.gz"  # real CT (see fixtures/README.md)
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

if CHROMIUM is None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true but no chromium found: apt-get install -y chromium", pytrace=False)
    pytest.skip("no Chromium found (apt-get install -y chromium); the browser test is skipped outside CI",
                allow_module_level=True)


@contextlib.contextmanager
def serve(net, cache):
    """The viewer on a free local port, with `net` as its model; yields its URL."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_TEMP_DIR", str(cache))
    mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    import app

    demo = app.build_demo(net=net)
    demo.queue(**app.QUEUE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **app.LAUNCH)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
        # a segmentation still running (a test ends once it has seen what it checks) stops at its next window: the
        # process would abort at exit with a handler thread inside torch
        assert demo.model_runs.stop(), "a model run did not stop within 30 s"
        mp.undo()


@contextlib.contextmanager
def browser_page(url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1600, "height": 1200}, accept_downloads=True)
        pg = context.new_page()
        pg.set_default_timeout(60_000)
        pg.goto(url)
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    torch.manual_seed(0)
    with serve(create_model("unetrpp_tiny"), tmp_path_factory.mktemp("gradio_cache")) as address:
        yield address


@pytest.fixture(scope="module")
def page(url):
    with browser_page(url) as pg:
        yield pg


def image_src(page, view: str) -> str:
    return page.locator(f"#view-{view} img").first.get_attribute("src") or ""


def changed(page, view: str, before: str) -> None:
    page.wait_for_function(
        "([sel, old]) => { const i = document.querySelector(sel); return i && i.src && i.src !== old; }",
        arg=[f"#view-{view} img", before], timeout=30_000)


def _box_on_screen(page, low: float, high: float) -> float:
    """How far plotly's camera puts the corners of the 3-D scene's box from the plot's centre, as a fraction of its
    half-width or half-height (1: at the plot's edge), whichever is larger (the axis titles lie outside the box),
    once it is between `low` and `high` or after 5 s: the page sets the camera for the plot's shape as it is drawn."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    reach = """() => {
      const scene = document.querySelector('#surface .js-plotly-plot')._fullLayout.scene._scene.glplot;
      const {projection: P, view: V, model: M} = scene.cameraParams, b = scene.bounds, out = [];
      const mul = (A, v) => [0, 1, 2, 3].map(r => A[r] * v[0] + A[4 + r] * v[1] + A[8 + r] * v[2] + A[12 + r] * v[3]);
      for (const i of [0, 1]) for (const j of [0, 1]) for (const k of [0, 1]) {
        const c = mul(P, mul(V, mul(M, [b[i][0], b[j][1], b[k][2], 1])));
        out.push(Math.abs(c[0] / c[3]), Math.abs(c[1] / c[3])); }
      return Math.max(...out); }"""
    try:
        page.wait_for_function(f"([low, high]) => {{ const r = ({reach})(); return low <= r && r <= high; }}",
                               arg=[low, high], timeout=5_000)
    except PlaywrightTimeout:
        pass  # the caller's assert says how far it reached
    return page.evaluate(reach)


def test_viewer_end_to_end(page, tmp_path):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    page.get_by_text("Not a medical device").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "00_start.png"), full_page=True)
    page.locator("#scan-upload input[type=file]").set_input_files(str(EXAMPLE_CT))
    # The scan shows, segmentation runs, then the legend lists organ names.
    page.locator("#legend .legend-item").first.wait_for(timeout=120_000)
    page.locator("#view-axial img").first.wait_for()
    legend = page.locator("#legend").inner_text()
    assert any(name in legend for name in ("liver", "spleen", "kidney", "stomach", "aorta", "pancreas"))
    assert page.locator("#stats-table").get_by_text("mean HU").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "01_segmented.png"), full_page=True)
    # Screen readers: each view is named (gradio leaves an image without alt text out, and the clickable view a
    # button without a name), the status line is announced, and the page says how to move the crosshair by keyboard.
    for view in ("axial", "coronal", "sagittal"):
        expect(page.locator(f"#view-{view}").get_by_role("button", name=f"{view} slice of the scan")).to_have_count(1)
    expect(page.locator("#status [aria-live=polite]")).to_contain_text("Segmented")
    expect(page.locator("#crosshair-help")).to_contain_text("arrow keys")

    # Move the axial slider: only the axial image is re-rendered.
    before = image_src(page, "axial")
    page.locator("#slider-axial input[type=range]").fill("3")
    changed(page, "axial", before)
    # Keyboard only: an arrow key on a slice slider moves the crosshair in the other two views as well, and one on
    # the opacity slider redraws the views (gradio sent a slider's release for a pointer only).
    before = [image_src(page, view) for view in ("coronal", "sagittal")]
    page.locator("#slider-axial input[type=range]").press("ArrowRight")
    changed(page, "coronal", before[0])
    changed(page, "sagittal", before[1])
    page.wait_for_timeout(300)  # the axial view's own redraw lands too
    before = image_src(page, "axial")
    page.get_by_label("range slider for overlay opacity").press("ArrowLeft")
    changed(page, "axial", before)
    # Where the keyboard is shows: a ring on the slider just moved and on a radio button (gradio's theme drew none).
    ring = "() => [document.activeElement.type, getComputedStyle(document.activeElement).outlineStyle]"
    assert page.evaluate(ring) == ["range", "solid"]
    page.get_by_label("window W (HU)").focus()
    page.keyboard.press("Shift+Tab")  # to the window presets' last radio button
    assert page.evaluate(ring) == ["radio", "solid"]
    # Switch the window preset: all views re-render.
    before = image_src(page, "coronal")
    page.locator("#window-preset").get_by_text("lung", exact=True).click()
    changed(page, "coronal", before)
    width_box, level_box = page.get_by_label("window W (HU)"), page.get_by_label("level L (HU)")
    expect(width_box).to_have_value("1500")  # the boxes show the window in use
    expect(level_box).to_have_value("-600")
    # Typing a width makes the window custom, and the views use it.
    before = image_src(page, "axial")
    width_box.fill("800")
    width_box.press("Enter")
    changed(page, "axial", before)
    expect(page.locator("#window-preset input[value='custom']")).to_be_checked()
    page.screenshot(path=str(ARTIFACTS / "02_slider_and_lung_window.png"), full_page=True)
    # Clicking the axial view moves the crosshair: the coronal and sagittal sliders follow.
    before = page.locator("#position").inner_text()
    box = page.locator("#view-axial img").first.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.7)
    # The click also blurs the W box, whose redraw re-renders the same line (it can blink empty first): wait
    # for a position line that is not the old one, not for any change.
    page.wait_for_function("old => { const t = document.querySelector('#position').innerText;"
                           " return t !== old && t.startsWith('voxel'); }", arg=before)
    assert page.locator("#position").inner_text() != before
    page.wait_for_timeout(500)
    assert page.locator(".toast-body").count() == 0, page.locator(".toast-body").all_inner_texts()

    # The file boxes show whole file names (gradio cut them to "exam… .gz" in the narrow column).
    for box in ("#scan-upload", "#mask-file", "#csv-file"):
        name = page.locator(f"{box} td.filename").first
        assert name.inner_text().replace("\n", "").startswith("example_ct_sm")
        inside = name.evaluate("e => { const box = e.getBoundingClientRect(), r = document.createRange();"
                               " return [...e.children].every(s => { r.selectNodeContents(s);"
                               " const b = r.getBoundingClientRect(); return b.right <= box.right + 1; }); }")
        assert inside, f"{box}: the file name runs out of its cell"
    # Download the mask; it opens on the upload's grid.
    with page.expect_download() as info:
        page.locator("#mask-file a").first.click()
    saved = tmp_path / "downloaded_mask.nii.gz"
    info.value.save_as(saved)
    assert nib.load(saved).shape == nib.load(EXAMPLE_CT).shape
    np.testing.assert_allclose(nib.load(saved).affine, nib.load(EXAMPLE_CT).affine, atol=1e-5)

    # The attention tab: EPA spatial attention of the crosshair voxel and the channel matrices.
    page.get_by_role("tab", name="Attention").click()
    page.locator("#attention-btn").click()
    page.locator("#attention-axial img").first.wait_for(timeout=60_000)
    page.get_by_text("Query voxel").first.wait_for()
    expect(page.get_by_role("img", name="axial slice of the model window")).to_have_count(1)
    page.locator(".gtitle", has_text="encoder stage 0").first.wait_for(timeout=30_000)  # the plotly matrices' title
    page.screenshot(path=str(ARTIFACTS / "03_attention.png"), full_page=True)
    # Clicking the heat-map moves the query, and the crosshair of the Slices tab with it.
    caption = page.get_by_text("Query voxel").first
    before = caption.inner_text()
    box = page.locator("#attention-axial img").first.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.2)
    page.wait_for_function("old => !document.body.innerText.includes(old)", arg=before, timeout=60_000)
    query = re.search(r"Query voxel \(z, y, x\) = (\(\d+, \d+, \d+\))", page.get_by_text("Query voxel").first.inner_text())
    page.get_by_role("tab", name="Slices").click()
    page.wait_for_function("q => document.querySelector('#position').innerText.includes(q)", arg=query.group(1),
                           timeout=30_000)
    page.get_by_role("tab", name="Attention").click()
    # Picking a head while maps are shown shows that head's maps, without pressing the button again.
    page.get_by_label("head").click()
    page.get_by_role("option", name="head 2", exact=True).click()
    page.get_by_text("; head 2. Heat-map").first.wait_for(timeout=60_000)
    # Ticking an organ off fades it in the legend and greys it in the 3-D plot's legend. The organ: one
    # with a surface (an organ of a few voxels has none).
    page.get_by_role("tab", name="3D surfaces").click()
    page.locator("#surface .js-plotly-plot").first.wait_for(timeout=30_000)
    organ = page.evaluate("document.querySelector('#surface .js-plotly-plot').data[0].name")
    page.get_by_role("tab", name="Slices").click()
    page.locator("#organs").get_by_label(organ, exact=True).click()
    page.locator("#legend .legend-item[style*='line-through']").first.wait_for(timeout=30_000)
    assert page.locator("#legend .legend-item[style*='line-through']").inner_text().strip() == organ
    page.get_by_role("tab", name="3D surfaces").click()
    page.locator("#surface .js-plotly-plot").first.wait_for(timeout=30_000)
    page.wait_for_function("name => [...document.querySelector('#surface .js-plotly-plot').data]"
                           ".some(t => t.name === name && t.visible === 'legendonly')", arg=organ, timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "04_surfaces.png"), full_page=True)
    # On a desktop the page picks the camera for a wide plot: the scene fills it, rather than the square view a
    # phone needs (40 % smaller), with room left for the axis titles.
    reach = _box_on_screen(page, 0.6, 0.75)
    assert 0.6 <= reach <= 0.75, f"the 3-D box reaches {reach:.2f} of the plot's half-width or half-height at 1600 px"
    page.get_by_role("tab", name="Slices").click()

    # A broken upload shows a readable error, and the page keeps working: the phantom example loads.
    bad = tmp_path / "broken_scan.nii.gz"
    bad.write_bytes(b"this is not a NIfTI image")
    page.locator("#scan-upload button[aria-label='Clear']").first.click()
    page.locator("#scan-upload input[type=file]").set_input_files(str(bad))
    page.locator("#status").get_by_text("not a NIfTI image").wait_for(timeout=30_000)  # stays after the toast
    page.screenshot(path=str(ARTIFACTS / "05_bad_file_error.png"), full_page=True)
    page.get_by_role("tab", name="Attention").click()  # the last scan's attention maps are gone with it
    assert page.locator("#attention-axial img").count() == 0 and "Query voxel" not in page.content()
    page.get_by_role("tab", name="Slices").click()
    page.get_by_text("example_ct_sm.nii.gz", exact=True).first.click()  # a bundled example
    page.locator("#status").get_by_text("Segmented").wait_for(timeout=120_000)
    page.locator("#legend .legend-item").first.wait_for(timeout=30_000)
    page.locator("#view-sagittal img").first.wait_for()
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / "06_still_usable.png"), full_page=True)

    # On a phone-width screen (390 px) every display control keeps its whole label inside its box.
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(500)
    for label in ("window W (HU)", "level L (HU)", "overlay opacity", "contours only"):
        text_right, box_right = page.get_by_text(label, exact=True).first.evaluate(
            "e => [e.getBoundingClientRect().right, e.closest('.block').getBoundingClientRect().right]")
        assert text_right <= box_right, f"{label!r} cut at 390 px: text ends at {text_right}, its box at {box_right}"
    # The statistics' five columns fit the screen: no sideways scrolling to reach volume, voxels and mean HU.
    table_width, shown_width = page.locator("#stats-table").evaluate(
        "e => [e.querySelector('table').scrollWidth, e.querySelector('table').parentElement.clientWidth]")
    assert table_width <= shown_width + 1, f"statistics table {table_width} px wide in {shown_width} px at 390 px"
    page.screenshot(path=str(ARTIFACTS / "07_phone_width.png"), full_page=True)
    # The attention block's name shows whole (it was cut after "encoder stage 0, b" in half a line).
    page.get_by_role("tab", name="Attention").click()
    text_width, box_width = page.locator("#attention-block input").first.evaluate("e => [e.scrollWidth, e.clientWidth]")
    assert text_width <= box_width, f"block name {text_width} px wide in a {box_width} px box at 390 px"
    # The 3-D plot was last drawn while its tab was hidden (the example segmented again): shown, it fits its box, not
    # plotly's default 700 px, which ran off the phone's screen.
    page.get_by_role("tab", name="3D surfaces").click()
    page.locator("#surface .js-plotly-plot canvas").first.wait_for(timeout=30_000)
    page.wait_for_function("() => { const g = document.querySelector('#surface .js-plotly-plot');"
                           " return Math.abs(g._fullLayout.width - g.getBoundingClientRect().width) <= 1; }",
                           timeout=5_000)
    # The scene fits too: plotly frames it by the plot's height, and a camera set for a desktop put the box's sides,
    # with their axis titles, past the phone's edges; the page picks the figure's camera for a phone's plot.
    reach = _box_on_screen(page, 0.0, 0.75)
    assert reach <= 0.75, f"the 3-D box reaches {reach:.2f} of the plot's half-width or half-height at 390 px"
    page.get_by_role("tab", name="Slices").click()


def test_a_scan_uploaded_during_a_segmentation_replaces_it(page, tmp_path):
    """The newest upload wins: the run for the earlier scan gives way, and the new scan is segmented."""
    torch.manual_seed(0)
    slow = create_model("unetrpp_tiny")
    slow.register_forward_pre_hook(lambda module, args: time.sleep(0.4))  # 12 windows: about 5 s a scan
    second = tmp_path / "second_scan.nii.gz"
    shutil.copy(EXAMPLE_CT, second)
    with serve(slow, tmp_path / "cache") as address:
        page.set_viewport_size({"width": 1600, "height": 1200})
        page.goto(address)
        page.get_by_text("Not a medical device").first.wait_for()
        page.locator("#scan-upload input[type=file]").set_input_files(str(EXAMPLE_CT))
        page.locator("#status").get_by_text("window").first.wait_for(timeout=60_000)  # its run has started
        page.locator("#scan-upload button[aria-label='Clear']").first.click()
        page.locator("#scan-upload input[type=file]").set_input_files(str(second))
        page.locator("#status").get_by_text("Segmented second_scan.nii.gz").wait_for(timeout=60_000)
        page.wait_for_timeout(6_000)  # the earlier run, had it gone on, would have ended by now
        assert "Segmented second_scan.nii.gz" in page.locator("#status").inner_text()
        assert "second_scan" in page.locator("#mask-file").inner_text()
        page.screenshot(path=str(ARTIFACTS / "08_second_upload_wins.png"), full_page=True)


def test_a_scan_that_is_not_ct_gets_a_fitted_window_and_no_hu(page, url):
    """The bundled MRI: a window fitted to its values (HU presets show it white), no 'HU' on the boxes, the
    position line or the table; the next CT goes back to the abdomen preset in HU."""
    from playwright.sync_api import expect

    page.set_viewport_size({"width": 1600, "height": 1200})
    page.goto(url)
    page.get_by_text("Not a medical device").first.wait_for()
    page.locator("#scan-upload input[type=file]").set_input_files(str(EXAMPLE_CT.with_name("example_mr_sm.nii.gz")))
    page.locator("#legend .legend-item").first.wait_for(timeout=120_000)
    expect(page.locator("#window-preset input[value='custom']")).to_be_checked()
    width = float(page.get_by_label("window W", exact=True).input_value())
    assert 300 < width < 1500, width  # the MRI's 1st-99th percentiles span about 660
    assert page.get_by_label("window W (HU)").count() == 0
    assert "intensity" in page.locator("#position").inner_text() and "HU" not in page.locator("#position").inner_text()
    assert page.locator("#stats-table").get_by_text("mean intensity").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "09_mri_fitted_window.png"), full_page=True)

    page.locator("#scan-upload button[aria-label='Clear']").first.click()
    page.locator("#scan-upload input[type=file]").set_input_files(str(EXAMPLE_CT))
    page.locator("#status").get_by_text("Segmented example_ct_sm.nii.gz").wait_for(timeout=120_000)
    expect(page.locator("#window-preset input[value='abdomen']")).to_be_checked()
    expect(page.get_by_label("window W (HU)")).to_have_value("400")
    # the status line comes with the run's end, the table and the position line with the redraw after it
    expect(page.locator("#stats-table").get_by_text("mean HU").first).to_be_visible()
    expect(page.locator("#position")).to_have_text(re.compile(r"· -?[\d.]+ HU"))


def test_what_reading_a_scan_found_shows_while_it_is_segmented(page, tmp_path):
    """A scan with NaN voxels: the page said so only when its segmentation ended. The warning shows once the scan
    does, beside the run's progress bar, stays after the run (which does not repeat it), and goes with the next scan."""
    from playwright.sync_api import expect

    torch.manual_seed(0)
    slow = create_model("unetrpp_tiny")
    slow.register_forward_pre_hook(lambda module, args: time.sleep(0.4))  # 12 windows: about 5 s a scan
    example = nib.load(EXAMPLE_CT)
    values = np.asarray(example.dataobj, dtype=np.float32)
    values[0, 0, :3] = np.nan
    odd = tmp_path / "nan_scan.nii.gz"
    nib.save(nib.Nifti1Image(values, example.affine), odd)
    with serve(slow, tmp_path / "cache") as address:
        page.set_viewport_size({"width": 1600, "height": 1200})
        page.goto(address)
        page.get_by_text("Not a medical device").first.wait_for()
        page.locator("#scan-upload input[type=file]").set_input_files(str(odd))
        page.locator("#scan-warnings").get_by_text("replaced 3 non-finite voxels").wait_for(timeout=60_000)
        assert "Segmented" not in page.locator("#status").inner_text()  # its run has 5 s to go
        page.screenshot(path=str(ARTIFACTS / "10_scan_warning_while_segmenting.png"), full_page=True)
        page.locator("#status").get_by_text("Segmented nan_scan.nii.gz").wait_for(timeout=60_000)
        assert "non-finite" not in page.locator("#status").inner_text()
        expect(page.locator("#scan-warnings")).to_contain_text("nan_scan.nii.gz: replaced 3 non-finite voxels")
        page.locator("#scan-upload button[aria-label='Clear']").first.click()
        page.locator("#scan-upload input[type=file]").set_input_files(str(EXAMPLE_CT))
        page.locator("#status").get_by_text("Segmented example_ct_sm.nii.gz").wait_for(timeout=60_000)
        expect(page.locator("#scan-warnings")).to_be_hidden()
