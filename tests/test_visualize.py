"""Slice rendering (unetrpp.visualize) and organ surfaces (unetrpp.visualize_3d) on tiny synthetic arrays."""

import numpy as np
import pytest

from unetrpp import visualize as vis
from unetrpp.labels import BTCV_CLASS_NAMES, BTCV_COLORS
from unetrpp.visualize_3d import organ_meshes, surface_figure, surface_step

NAMES = ("background",) + BTCV_CLASS_NAMES


def test_window_maps_edges_to_black_and_white():
    out = vis.apply_window(np.array([-1000.0, 40 - 200, 40, 40 + 200, 3000]), 400, 40)
    assert out.tolist()[0] == 0 and out.tolist()[1] == 0 and out.tolist()[3] == 255 and out.tolist()[4] == 255
    assert 126 <= out[2] <= 128
    with pytest.raises(ValueError, match="width"):
        vis.apply_window(np.zeros(3), 0, 40)


def test_window_presets_and_custom():
    assert vis.window_preset("lung") == (1500.0, -600.0)
    assert vis.window_preset("custom", 80, 20) == (80.0, 20.0)
    with pytest.raises(ValueError, match="abdomen"):
        vis.window_preset("brain")


@pytest.mark.parametrize("orientation, right_x, anterior_y, superior_z",
                         [("RAS", -1, -1, -1), ("LPS", 0, 0, -1), ("LAI", 0, -1, 0)])
def test_radiological_convention(orientation, right_x, anterior_y, superior_z):
    """Patient's right on the image's left, anterior up (axial) / left (sagittal), superior up."""
    vol = np.zeros((5, 7, 7), np.float32)
    vol[2, 3, right_x] = 1  # the patient's rightmost column
    vol[2, anterior_y, 3] = 2  # the most anterior row
    vol[superior_z, 3, 3] = 3  # the top slice
    axial = vis.slice_2d(vol, "axial", 2, orientation)
    assert axial.shape == (7, 7)
    assert axial[:, 0].max() == 1 and axial[0, :].max() == 2
    coronal = vis.slice_2d(vol, "coronal", 3, orientation)
    assert coronal[2, 0] == 1 and coronal[0, 3] == 3
    sagittal = vis.slice_2d(vol, "sagittal", 3, orientation)
    assert sagittal[2, 0] == 2 and sagittal[0, 3] == 3


def test_slice_rejects_bad_view_index_and_orientation():
    vol = np.zeros((4, 5, 6))
    with pytest.raises(ValueError, match="axial"):
        vis.slice_2d(vol, "oblique", 0)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        vis.slice_2d(vol, "axial", 4)
    with pytest.raises(ValueError, match="RAS"):
        vis.slice_2d(vol, "axial", 0, "ASR")


def test_display_shape_has_square_millimetre_pixels():
    h, w = vis.display_shape((10, 40), (3.0, 0.75), min_side=40)
    assert (h, w) == (40, 40)  # 30 mm x 30 mm
    h, w = vis.display_shape((512, 512), (0.7, 0.7))
    assert (h, w) == (512, 512)  # native size kept
    h, w = vis.display_shape((30, 100), (3.0, 3.0), min_side=300)
    assert w == 300 and h == 90


def test_resizes():
    labels = np.array([[0, 1], [2, 3]], np.uint8)
    big = vis.resize_nearest(labels, (4, 6))
    assert big.shape == (4, 6) and set(np.unique(big)) == {0, 1, 2, 3} and big[0, 0] == 0 and big[3, 5] == 3
    ramp = vis.resize_linear(np.array([[0.0, 10.0]]), (1, 4))
    assert np.all(np.diff(ramp[0]) > 0) and ramp[0, 0] == 0 and ramp[0, -1] == 10


@pytest.mark.parametrize("view", vis.VIEWS)
def test_click_maps_back_to_the_voxel(view):
    shape, spacing = (7, 9, 11), (3.0, 1.0, 0.5)
    rng = np.random.default_rng(0)
    axis = vis.VIEW_AXIS[view]
    plane = [n for a, n in enumerate(shape) if a != axis]
    size = vis.display_shape(plane, vis.view_spacing(spacing, view))
    for _ in range(20):
        pos = tuple(int(rng.integers(0, n)) for n in shape)
        row, col = vis.voxel_to_display(view, pos, shape, size)
        start = tuple(0 if a != axis else pos[a] for a in range(3))
        assert vis.display_to_voxel(view, row, col, start, shape, size) == pos


def test_blend_labels_opacity_visibility_and_contours():
    gray = np.full((12, 12), 100, np.uint8)
    labels = np.zeros((12, 12), np.uint8)
    labels[2:10, 2:10] = 6
    assert np.array_equal(vis.blend_labels(gray, labels, opacity=0.0)[..., 0], gray)
    full = vis.blend_labels(gray, labels, opacity=1.0)
    assert tuple(full[5, 5]) == BTCV_COLORS[6] and tuple(full[0, 0]) == (100, 100, 100)
    hidden = vis.blend_labels(gray, labels, opacity=1.0, visible=[1])
    assert tuple(hidden[5, 5]) == (100, 100, 100)
    contour = vis.blend_labels(gray, labels, opacity=0.5, contour_only=True)
    assert tuple(contour[5, 5]) == (100, 100, 100)  # inside stays grey
    assert tuple(contour[2, 5]) == BTCV_COLORS[6]  # the outline is drawn opaque
    with pytest.raises(ValueError, match="opacity"):
        vis.blend_labels(gray, labels, opacity=1.5)


def test_render_view_draws_mask_and_crosshair():
    vol = np.zeros((8, 32, 32), np.float32)
    mask = np.zeros(vol.shape, np.uint8)
    mask[:, :, 16:] = 1  # x >= 16: the patient's right half in RAS, drawn on the image's left
    img = vis.render_view(vol, "axial", (4, 5, 5), (2.0, 1.0, 1.0), mask=mask, opacity=1.0, min_side=64,
                          crosshair=False)
    assert img.shape == (64, 64, 3)
    assert tuple(img[32, 2]) == BTCV_COLORS[1] and tuple(img[32, 60]) != BTCV_COLORS[1]
    with_cross = vis.render_view(vol, "axial", (4, 5, 5), (2.0, 1.0, 1.0), min_side=64)
    row, col = vis.voxel_to_display("axial", (4, 5, 5), vol.shape, (64, 64))
    assert tuple(with_cross[int(row), 0]) != tuple(with_cross[0, 0]) == (102, 102, 102)  # 0 HU in W400/L40
    views = vis.orthogonal_views(vol, spacing=(2.0, 1.0, 1.0))
    assert set(views) == set(vis.VIEWS) and views["coronal"].shape[0] * 2 == views["coronal"].shape[1]


def test_legend_entries_and_heatmap():
    entries = vis.legend_entries(NAMES, labels_present=[0, 6, 1])
    assert [e[:2] for e in entries] == [(1, "spleen"), (6, "liver")]
    assert entries[1][2] == "#%02x%02x%02x" % BTCV_COLORS[6]
    gray = np.full((4, 4), 50, np.uint8)
    heat = np.zeros((4, 4))
    heat[0, 0] = 1.0
    out = vis.heatmap_overlay(gray, heat)
    assert tuple(out[3, 3]) == (50, 50, 50) and tuple(out[0, 0]) != (50, 50, 50)


def test_channel_attention_panels_share_the_one_colour_bar():
    """The figure shows one colour bar (the last head's): each head scaled on its own made the same colour
    mean 0.47 in one panel and 0.39 in another, so the bar misread every panel but the last."""
    from unetrpp.visualize_attention import channel_figure

    channel = np.stack([np.full((4, 4), 0.25), np.eye(4) * 0.9 + 0.025, np.full((4, 4), 0.25)])
    channel[0, 0] = [0.4, 0.2, 0.2, 0.2]
    traces = channel_figure(channel).data
    assert [(t.zmin, t.zmax) for t in traces] == [(channel.min(), channel.max())] * 3


def test_organ_meshes_in_mm_and_colours():
    mask = np.zeros((10, 20, 30), np.uint8)
    mask[2:6, 5:15, 10:20] = 6  # liver block: z 2..5, y 5..14, x 10..19
    mask[7:9, 2:4, 2:4] = 1
    spacing = (3.0, 1.0, 0.5)
    meshes = organ_meshes(mask, spacing, NAMES)
    assert [m.name for m in meshes] == ["spleen", "liver"]
    liver = meshes[1]
    lo, hi = liver.vertices.min(0), liver.vertices.max(0)  # (x, y, z) mm
    assert np.allclose(lo, [9.5 * 0.5, 4.5, 1.5 * 3], atol=0.3)  # half a voxel outside the first voxel centre
    assert np.allclose(hi, [19.5 * 0.5, 14.5, 5.5 * 3], atol=0.3)
    assert liver.color == "#%02x%02x%02x" % BTCV_COLORS[6] and liver.faces.max() < len(liver.vertices)
    fig = surface_figure(mask, spacing, NAMES)
    assert [t.name for t in fig.data] == ["spleen", "liver"]
    lps = surface_figure(mask, spacing, NAMES, orientation="LPS")  # x and y point left and back: drawn in RAS
    np.testing.assert_allclose(np.asarray(lps.data[1].x), -np.asarray(fig.data[1].x))
    np.testing.assert_allclose(np.asarray(lps.data[1].y), -np.asarray(fig.data[1].y))
    np.testing.assert_allclose(np.asarray(lps.data[1].z), np.asarray(fig.data[1].z))
    assert fig.layout.title.text is None  # every organ drawn: nothing to say
    scene = fig.layout.scene  # the axes name the patient's directions, as the surfaces are drawn in RAS
    assert (scene.xaxis.title.text, scene.yaxis.title.text, scene.zaxis.title.text) == (
        "right (mm)", "anterior (mm)", "superior (mm)")
    mask[0, 0, 0] = 13  # one voxel of left adrenal: no surface, but the figure says it is there
    titled = surface_figure(mask, spacing, NAMES, title="organs (mm)")
    assert [t.name for t in titled.data] == ["spleen", "liver"]
    assert titled.layout.title.text == "organs (mm)<br>too small for a surface:<br>left adrenal gland"


def _scene_box(fig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scene's axis ranges (lo, hi) in mm and its aspect ratio, (3,) each, as plotly draws them: ranges not
    given are the surfaces' extent with 1/32 of it added at both ends, and aspectmode "data" gives each axis a
    length in proportion to its range, their product 1."""
    scene = fig.layout.scene
    points = np.concatenate([np.stack([t.x, t.y, t.z], 1) for t in fig.data])
    lo, hi = points.min(0), points.max(0)
    lo, hi = lo - (hi - lo) / 32, hi + (hi - lo) / 32
    for n, a in enumerate("xyz"):
        if scene[f"{a}axis"].range is not None:
            lo[n], hi[n] = scene[f"{a}axis"].range
    if scene.aspectmode == "manual":
        return lo, hi, np.array([scene.aspectratio[a] for a in "xyz"])
    return lo, hi, (hi - lo) / np.prod(hi - lo) ** (1 / 3)


def _corners_on_screen(fig, eye=None) -> np.ndarray:
    """Where plotly's camera (at `eye`, else the layout's) puts the 8 corners of the scene's box: (8, 2) as fractions
    of the half-height of the view (45 degree vertical field of view, looking at the centre with the layout's up)."""
    scene = fig.layout.scene
    ratio = _scene_box(fig)[2]
    eye = np.array([(eye or scene.camera.eye)[a] for a in "xyz"])
    forward = -eye / np.linalg.norm(eye)
    right = np.cross(forward, [scene.camera.up[a] for a in "xyz"])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * ratio / 2 - eye
    depth = corners @ forward
    return np.stack([corners @ right / depth, corners @ up / depth], 1) / np.tan(np.pi / 8)


@pytest.mark.parametrize("shape, spacing", [((30, 101, 122), (3.0, 3.0, 3.0)),  # the example CT: wide and shallow
                                            ((200, 100, 100), (3.0, 3.0, 3.0))])  # chest to pelvis: tall
def test_surfaces_fit_a_phone_shaped_view_with_room_for_the_axis_titles(shape, spacing):
    """Plotly frames a 3-D scene by the plot's height: with the camera set for a desktop, a 390 px phone (a plot
    about as wide as tall) lost the sides and their axis titles, and a tall scan lost its top and bottom on every
    screen. The figure carries a camera for each plot shape, from a desktop's to a phone's, for the page to pick;
    with each, the whole box of organs stays within 70 % of the view of that shape, in mm on every axis, and the
    camera does not stand further back than it must (the box reaches 70 % on one side)."""
    mask = np.zeros(shape, np.uint8)
    z, y, x = shape
    mask[1:z - 1, y // 2 - 3:y // 2 + 3, x // 2 - 3:x // 2 + 3] = 8  # aorta, top to bottom
    mask[z // 3:2 * z // 3, 10:y // 2, 2:x // 3] = 6  # liver, on the right
    mask[z // 3:2 * z // 3, y // 2:y - 10, 2 * x // 3:x - 2] = 1  # spleen, on the left
    fig = surface_figure(mask, spacing, NAMES)
    scene = fig.layout.scene
    points = np.concatenate([np.stack([t.x, t.y, t.z], 1) for t in fig.data])
    lo, hi, ratio = _scene_box(fig)
    assert np.all(lo < points.min(0)) and np.all(points.max(0) < hi)  # every surface inside the box
    np.testing.assert_allclose(ratio / ratio[0], (hi - lo) / (hi - lo)[0], rtol=1e-6)  # a mm is a mm on every axis
    cameras = fig.layout.meta["cameras"]
    assert [aspect for aspect, _ in cameras] == [1.5, 2.0, 1.0, 0.75, 0.5]
    assert dict(scene.camera.eye.to_plotly_json()) == cameras[0][1]  # without the page: plotly's default 700 x 450
    for aspect, eye in cameras:
        across, upwards = np.abs(_corners_on_screen(fig, eye)).T
        reach = max(across.max() / aspect, upwards.max())
        assert 0.7 - 1e-6 <= reach <= 0.7 + 1e-6, (aspect, reach)
    assert all(scene[f"{a}axis"].title.text.endswith("(mm)") for a in "xyz")


def test_a_long_surface_title_is_broken_into_lines_a_phone_shows_whole():
    """Plotly draws a title on one line: the organs too small for a surface, listed after the caller's title,
    ran past the edge of a phone (a 360 px one shows about 40 characters of the title's 13 px font)."""
    mask = np.zeros((10, 20, 30), np.uint8)
    mask[2:6, 5:15, 10:20] = 6  # liver
    mask[0, 0, 0], mask[0, 0, 2], mask[0, 2, 0], mask[9, 19, 29] = 11, 12, 13, 5  # one voxel each: no surface
    fig = surface_figure(mask, (3.0, 1.0, 0.5), NAMES, title="Predicted organ surfaces (mm), SYNTHETIC weights")
    lines = fig.layout.title.text.split("<br>")
    assert max(len(line) for line in lines) <= 40, lines
    names = ("esophagus", "pancreas", "right adrenal gland", "left adrenal gland")
    assert all(any(name in line for line in lines) for name in names), lines  # no name broken across lines
    assert " ".join(lines) == ("Predicted organ surfaces (mm), SYNTHETIC weights too small for a surface: esophagus, "
                               "pancreas, right adrenal gland, left adrenal gland")
    assert fig.layout.margin.t >= 16 * len(lines)  # the lines stay above the scene


def test_surface_step_bounds_the_voxel_count_and_evens_out_voxels():
    assert surface_step((10, 10, 10), (1, 1, 1), 1000) == (1, 1, 1)
    shape = (200, 512, 512)
    step = surface_step(shape, (3.0, 0.7, 0.7), 300_000)
    assert np.prod([np.ceil(n / s) for n, s in zip(shape, step)]) <= 300_000
    assert step[1] == step[2] > step[0] >= 1  # thin the fine in-plane axes first
    with pytest.raises(ValueError, match="max_voxels"):
        surface_step((4, 4, 4), (1, 1, 1), 0)


def test_a_512_slice_renders_at_full_size_with_only_its_slice_of_the_mask():
    """A slider move re-renders one slice (about 10 ms on one idle core for 512 x 512; no timing here:
    timings live in benchmarks/). Contours of the other slices must not leak in."""
    rng = np.random.default_rng(0)
    vol = rng.normal(0, 300, size=(3, 512, 512)).astype(np.float32)
    mask = np.zeros(vol.shape, np.uint8)
    mask[0], mask[1, 200:300, 200:300], mask[2] = 6, 6, 6  # only the middle slice has a small organ
    img = vis.render_view(vol, "axial", (1, 256, 256), (3.0, 0.7, 0.7), mask=mask, contour_only=True, crosshair=False)
    assert img.shape == (512, 512, 3)
    outline = (img == BTCV_COLORS[6]).all(-1)
    assert outline[200:300, 200:300].any() and not outline[:150].any()


def test_plot_views_for_notebooks():
    import matplotlib

    matplotlib.use("Agg")
    vol = np.full((6, 20, 30), 40.0, np.float32)  # soft tissue
    mask = np.zeros(vol.shape, np.uint8)
    mask[2:4, 5:10, 5:10] = 6
    fig = vis.plot_views(vol, (3.0, 1.0, 1.0), mask, class_names=NAMES, title="SYNTHETIC")
    assert [ax.get_title() for ax in fig.axes] == list(vis.VIEWS)
    assert fig._suptitle.get_text() == "SYNTHETIC · CT window W 400 / L 40 HU"  # the grey scale is named
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["liver"]
    # The swatch has the colour the liver overlay has on the image, not the full label colour.
    drawn = vis.render_view(vol, "axial", (3, 7, 7), (3.0, 1.0, 1.0), mask=mask, crosshair=False)
    liver = drawn[(drawn != drawn[0, 0]).any(-1)][0]
    swatch = np.array(fig.legends[0].get_patches()[0].get_facecolor()[:3]) * 255
    np.testing.assert_allclose(swatch, liver, atol=1.5)
    assert np.abs(swatch - BTCV_COLORS[6]).max() > 10


def test_organ_colours_can_be_told_apart():
    """No two organs share a hue a viewer could confuse (CIEDE2000 difference of at least 15)."""
    import itertools

    from skimage.color import deltaE_ciede2000, rgb2lab

    lab = {k: rgb2lab(np.array(rgb, float)[None, None] / 255)[0, 0] for k, rgb in BTCV_COLORS.items()}
    closest = min(deltaE_ciede2000(lab[a], lab[b]) for a, b in itertools.combinations(lab, 2))
    assert closest >= 15


def test_views_carry_patient_directions_and_a_scale_bar_in_mm():
    dark = np.zeros((400, 400, 3), np.uint8)
    out = vis.annotate_view(dark, "axial", mm_per_pixel=1.0)
    assert out.shape == dark.shape and not out[150:250, 100:300].any()  # the middle is left alone
    white = lambda region: (region == 255).all(-1).any()
    assert white(out[:30, 180:220]) and white(out[180:220, :30]) and white(out[180:220, -30:])  # A, R, L
    bar = (out[400 - 12, 250:] == 255).all(-1).sum()  # 100 mm at 1 mm per pixel: 100 pixels
    assert 98 <= bar <= 102
    assert (vis.annotate_view(dark, "sagittal", 2.0)[400 - 12, 250:] == 255).all(-1).sum() in range(48, 53)  # 100 mm


def test_direction_letters_name_the_side_where_the_anatomy_is():
    """A bright block in the patient's right, anterior, superior corner of a RAS volume shows in each view
    on the edges whose letters are among R, A and S (and never on L, P or I)."""
    volume = np.full((20, 24, 28), -1000.0, np.float32)  # (z, y, x) RAS: indices grow to S, A and R
    volume[10:, 12:, 14:] = 1000.0
    for view in vis.VIEWS:
        rgb = vis.render_view(volume, view, (10, 12, 14), (2.0, 2.0, 2.0), crosshair=False)
        rows, cols = np.nonzero(rgb[..., 0] > 128)
        top, bottom, left, right = vis.VIEW_EDGES[view]
        vertical = top if rows.mean() < rgb.shape[0] / 2 else bottom
        horizontal = left if cols.mean() < rgb.shape[1] / 2 else right
        assert {vertical, horizontal} <= {"R", "A", "S"} and vertical != horizontal, (view, vertical, horizontal)


def test_the_attention_window_of_an_int16_scan_is_cut_without_a_float_copy_of_the_scan():
    """The viewer holds a CT in whole HU as int16: each click on the attention tab cuts a window from it without
    a float32 copy of the whole scan (300 MB for 512 x 512 x 300 voxels), and gets float32 HU as from float32."""
    import tracemalloc

    from unetrpp.visualize_attention import extract_window

    rng = np.random.default_rng(0)
    volume = rng.integers(-1000, 1500, size=(64, 384, 384)).astype(np.int16)  # 19 MB; as float32, 38 MB
    args = ((2.0, 0.8, 0.8), (30, 100, 120), (32, 64, 64), (4.0, 2.5, 2.5))
    extract_window(volume[:8, :8, :8], *args)  # scipy imported before counting
    tracemalloc.start()
    try:
        window = extract_window(volume, *args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < volume.nbytes, f"{peak:,} bytes allocated for a window of a {volume.nbytes:,}-byte scan"
    assert window.dtype == np.float32 and np.array_equal(window, extract_window(volume.astype(np.float32), *args))
