"""The `segment` API endpoint through gradio_client, against the app launched in-process on a free
port: the real CT example in, an aligned mask and statistics out; eight concurrent calls; and no
upload or result file left after the (shortened) cache lifetime. Random-init unetrpp_tiny."""

import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from unetrpp import create_model, io

EXAMPLE_CT = Path(__file__).parent / "fixtures" / "example_ct_sm.nii.gz"  # real CT (see fixtures/README.md)
CACHE_AGE = 8  # seconds a file may live in the test server's cache


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("gradio_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_TEMP_DIR", str(cache))
    mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    import app

    torch.manual_seed(0)
    demo = app.build_demo(net=create_model("unetrpp_tiny"), delete_cache=(1, CACHE_AGE))
    demo.queue(**app.QUEUE)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **app.LAUNCH)
    try:
        yield f"http://127.0.0.1:{port}/", cache
    finally:
        demo.close()
        assert demo.model_runs.stop(), "a model run did not stop within 30 s"
        mp.undo()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    from gradio_client import Client

    return Client(server[0], download_files=str(tmp_path_factory.mktemp("client_downloads")), verbose=False)


def small_scan(path: Path, seed: int) -> Path:
    """A tiny synthetic CT-like volume (8, 24, 24) at 5 x 3 x 3 mm; one sliding window."""
    rng = np.random.default_rng(seed)
    vol = np.full((8, 24, 24), -1000, np.int16)
    vol[1:7, 4:20, 4:20] = rng.integers(0, 80, size=(6, 16, 16))
    return io.save_array(vol, (5.0, 3.0, 3.0), path)


def test_segment_endpoint_on_the_real_ct(client, tmp_path):
    from gradio_client import handle_file

    upload = tmp_path / "client_upload_ct.nii.gz"
    shutil.copy(EXAMPLE_CT, upload)
    mask_path, stats, warnings = client.predict(handle_file(str(upload)), 0.5, False, api_name="/segment")
    assert warnings == []  # real CT, untrained weights that are not the SYNTHETIC teaching ones
    mask, source = nib.load(mask_path), nib.load(EXAMPLE_CT)
    assert mask.shape == source.shape == (122, 101, 30)
    assert np.allclose(mask.affine, source.affine)
    data = np.asarray(mask.dataobj)
    assert data.dtype == np.uint8 and data.max() <= 13
    assert isinstance(stats, list) and stats
    counts = np.bincount(data.ravel(), minlength=14)
    for row in stats:
        assert set(row) >= {"label", "name", "voxels", "volume_ml", "mean_hu"}
        assert row["voxels"] == counts[row["label"]]
        assert row["volume_ml"] == pytest.approx(row["voxels"] * 27 / 1000)  # 3 mm isotropic voxels


def test_api_lists_only_segment(client):
    info = client.view_api(return_format="dict", print_info=False)
    assert list(info["named_endpoints"]) == ["/segment"]


def test_bad_upload_is_an_error_and_the_server_keeps_serving(client, tmp_path):
    from gradio_client import handle_file

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not a NIfTI image")
    with pytest.raises(Exception, match="NIfTI"):
        client.predict(handle_file(str(bad)), 0.5, False, api_name="/segment")
    mask_path, _, _ = client.predict(handle_file(str(small_scan(tmp_path / "after_error.nii.gz", 1))), 0.5, False,
                                     api_name="/segment")
    assert nib.load(mask_path).shape == (24, 24, 8)


def test_warnings_come_back_without_the_server_folder(client, tmp_path):
    """What the page shows as toasts reaches API callers too, naming their file, not the server's cache."""
    from gradio_client import handle_file

    vol = io.load(EXAMPLE_CT)
    holes = vol.array.copy()
    holes[:2] = np.nan
    upload = io.save_array(holes, vol.spacing, tmp_path / "client_upload_nan.nii.gz", dtype=np.float32)
    _, _, warnings = client.predict(handle_file(str(upload)), 0.5, False, api_name="/segment")
    nan_warning = [w for w in warnings if "non-finite" in w]
    assert len(nan_warning) == 1 and nan_warning[0].startswith("client_upload_nan.nii.gz: "), warnings


def test_eight_concurrent_calls_then_the_cache_empties(client, server, tmp_path):
    from gradio_client import handle_file

    scans = [small_scan(tmp_path / f"concurrent_{i}.nii.gz", i) for i in range(8)]
    jobs = [client.submit(handle_file(str(s)), 0.5, False, api_name="/segment") for s in scans]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: job.result(timeout=180), jobs))
    assert len(results) == 8
    for (mask_path, stats, _), scan in zip(results, scans):
        assert nib.load(mask_path).shape == nib.load(scan).shape and isinstance(stats, list)

    cache = server[1]

    def leftovers():
        return [p for p in cache.rglob("*") if p.is_file()
                and ("concurrent_" in p.name or "client_upload" in p.name or "broken" in p.name
                     or "after_error" in p.name or p.suffix == ".csv")]

    assert leftovers(), "the uploads and results should be in the server cache at first"
    deadline = time.time() + CACHE_AGE + 10
    while leftovers() and time.time() < deadline:
        time.sleep(0.5)
    assert leftovers() == []


def test_python_app_py_serves_on_the_env_port_with_weights_and_stops_cleanly_on_ctrl_c(tmp_path):
    """`python app.py --weights DIR` listens where GRADIO_SERVER_NAME / GRADIO_SERVER_PORT say; Ctrl-C during a
    segmentation ends it with status 0: the process aborted ("terminate called without an active exception",
    SIGABRT) when it ended with a handler thread inside torch."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from gradio_client import Client, handle_file

    weights = tmp_path / "my_weights"
    create_model("unetrpp_tiny").save_pretrained(weights)
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_TEMP_DIR": str(tmp_path / "cache"), "GRADIO_ANALYTICS_ENABLED": "False",
           "UNETRPP_MAX_WINDOWS": "100000"}  # a run that would take minutes: the one Ctrl-C stops
    env.pop("UNETRPP_WEIGHTS", None)
    app_py = Path(__file__).resolve().parents[1] / "app.py"
    proc = subprocess.Popen([sys.executable, str(app_py), "--weights", str(weights)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, config = time.time() + 120, None
        while config is None and time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as r:
                    config = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        assert config is not None, proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no answer"
        assert str(weights) in json.dumps(config)  # the page names the weights it serves
        job = Client(f"http://127.0.0.1:{port}/", verbose=False).submit(
            handle_file(str(Path(__file__).parent / "fixtures" / "example_ct.nii.gz")), 0.9, True, api_name="/segment")
        deadline = time.time() + 60
        while job.status().code.name != "PROCESSING" and time.time() < deadline and not job.done():
            time.sleep(0.2)
        assert job.status().code.name == "PROCESSING", job.status()
        time.sleep(1)  # inside the network
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()[-2000:]
        assert "terminate called" not in proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def test_python_app_py_on_a_taken_port_says_so_in_one_line(tmp_path):
    """A second `python app.py` while the first still serves (the usual case) ended in gradio's traceback."""
    import os
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
               "GRADIO_ANALYTICS_ENABLED": "False"}
        done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "app.py")], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot serve on 127.0.0.1:{port}: the port is taken") and "GRADIO_SERVER_PORT=" in last
