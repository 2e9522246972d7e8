"""The CUDA speed options of `unetrpp.inference`, as far as a CPU can check them: the automatic
windows-per-pass choice, torch.compile falling back cleanly, padded (static-shape) batches, and the
way back to the original grid in torch. Tiny random networks and synthetic volumes only."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from test_inference import ISO, phantom_ras, small_model
from test_io import write_nifti

from unetrpp import Preprocessing, devices, inference
from unetrpp.devices import CUDA_SW_BATCH, CompiledNetwork, auto_sw_batch_size, compile_network
from unetrpp.inference import (_predict, argmax_restored_torch, probabilities_to_mask, segment,
                               sliding_window_probabilities)
from unetrpp.preprocess import Prepared, _coarse_axis, resample, resample_torch

CUDA = torch.device("cuda")  # only a name here: every CUDA query is patched


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return small_model().eval()


def free_gpu_memory(monkeypatch, gib: float) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(gib * 2**30), 141 * 2**30))


# ---- windows per forward pass ----------------------------------------------------------------------
def test_auto_batch_is_one_on_cpu_and_larger_on_cuda(monkeypatch):
    patch = (64, 128, 128)
    assert auto_sw_batch_size("auto", torch.device("cpu"), patch) == auto_sw_batch_size(None, torch.device("cpu"), patch) == 1
    free_gpu_memory(monkeypatch, 100)
    assert auto_sw_batch_size("auto", CUDA, patch) == auto_sw_batch_size(None, CUDA, patch) == CUDA_SW_BATCH > 1
    free_gpu_memory(monkeypatch, 0.6)  # a nearly full GPU: fewer windows at once, never none
    assert 1 <= auto_sw_batch_size("auto", CUDA, patch) < CUDA_SW_BATCH
    free_gpu_memory(monkeypatch, 0.0)
    assert auto_sw_batch_size("auto", CUDA, patch) == 1
    assert auto_sw_batch_size(3, CUDA, patch) == 3  # a number is taken as given


def test_auto_batch_in_float32_allows_for_twice_the_memory(monkeypatch):
    patch = (64, 128, 128)
    free_gpu_memory(monkeypatch, 8)  # a quarter of it holds 8 half-precision windows, 4 in float32
    assert auto_sw_batch_size("auto", CUDA, patch) == 8
    assert auto_sw_batch_size("auto", CUDA, patch, autocast=False) == 4


def _precision_state() -> tuple:
    return devices._float32_settings()


def _matmul_precision_readable() -> bool:
    try:
        torch.get_float32_matmul_precision()
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("caller", ["defaults", "new api", "matmul medium"])
def test_true_float32_turns_tf32_off_and_restores_the_callers_settings(caller):
    new_api = bool(devices._PRECISION_BACKENDS)
    before = _precision_state()
    try:
        if caller == "new api" and new_api:
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "ieee"
        elif caller == "matmul medium":
            torch.set_float32_matmul_precision("medium")
        callers = _precision_state()
        readable = _matmul_precision_readable()
        ieee = ("ieee",) * 3 if new_api else ("highest", False)
        with pytest.raises(KeyError), devices.true_float32():
            assert _precision_state() == ieee
            with devices.true_float32():  # overlapping users: the inner one's end changes nothing
                pass
            assert _precision_state() == ieee
            raise KeyError  # and the settings come back after an error too
        assert _precision_state() == callers
        assert _matmul_precision_readable() == readable  # torch refuses to read a mix of old and new settings
    finally:
        devices._set_float32_settings(before)


@pytest.mark.parametrize("value", [0, -2, 2.5, "four", True, "4"])
def test_bad_sw_batch_size_is_one_line(value, tmp_path, model):
    with pytest.raises(ValueError, match=r"sw_batch_size=.*positive integer or 'auto'") as info:
        segment(write_nifti(tmp_path / "a.nii.gz", phantom_ras(), ISO), model=model, sw_batch_size=value)
    assert "\n" not in str(info.value)


def test_bad_compile_is_refused(tmp_path, model):
    with pytest.raises(ValueError, match="compile='yes': must be True or False"):
        segment(write_nifti(tmp_path / "a.nii.gz", phantom_ras(), ISO), model=model, compile="yes")


# ---- torch.compile ---------------------------------------------------------------------------------
def test_compile_on_cpu_changes_nothing_and_says_so(tmp_path, model, caplog):
    path = write_nifti(tmp_path / "a.nii.gz", phantom_ras(), ISO)
    plain = segment(path, model=model, device="cpu")  # on a GPU machine too
    with caplog.at_level(logging.WARNING, logger="unetrpp.inference"):
        compiled = segment(path, model=model, device="cpu", compile=True)
    np.testing.assert_array_equal(compiled.mask, plain.mask)
    assert plain.warnings == [] and len(compiled.warnings) == 1 and "compile=True is for CUDA" in compiled.warnings[0]
    assert "compile=True is for CUDA" in caplog.text


def test_compile_unsupported_platform_runs_without(monkeypatch, model):
    monkeypatch.setattr(devices, "_dynamo_supported", lambda: False)
    net, why_not = compile_network(model, CUDA)
    assert net is model and "not supported on this platform" in why_not


def test_compiled_network_is_made_once_per_network(monkeypatch, model):
    monkeypatch.setattr(devices, "_COMPILED", {})
    first, why_not = compile_network(model, CUDA)  # torch.compile is lazy: nothing compiles here
    assert why_not is None and isinstance(first, CompiledNetwork) and first.config is model.config
    assert compile_network(model, CUDA)[0] is first


def test_failed_compile_falls_back_to_the_network_with_one_warning(model, caplog):
    class Broken(torch.nn.Module):  # what a compiled network does where Inductor cannot build kernels
        def forward(self, x):
            raise RuntimeError("no working C compiler found\nmore detail")

    runner = CompiledNetwork(model)
    runner.cudagraphs = False
    runner.compiled = Broken()
    x = torch.randn(1, 1, *model.config.patch_size)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="unetrpp.devices"):
        torch.testing.assert_close(runner(x), model(x))
        runner(x)
    assert runner.failed == "torch.compile failed (RuntimeError: no working C compiler found); running without it"
    assert caplog.text.count("torch.compile failed") == 1


# ---- static shapes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tta", [False, True])
def test_padded_batch_gives_the_same_probabilities(tta, model):
    torch.manual_seed(1)
    windows = torch.randn(3, 1, *model.config.patch_size)
    with torch.inference_mode():
        plain = _predict(model, windows, tta)
        padded = _predict(model, windows, tta, pad_to=4)
    assert padded.shape == plain.shape == (3, model.config.out_channels, *model.config.patch_size)
    torch.testing.assert_close(padded, plain, atol=1e-6, rtol=1e-5)


def test_static_batch_pads_the_last_batch_and_keeps_the_result(model):
    image = np.random.default_rng(0).normal(size=(36, 21, 21)).astype(np.float32)  # 4 windows
    sizes = []
    hook = model.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    try:
        with torch.inference_mode():
            plain = sliding_window_probabilities(model, image, torch.device("cpu"), sw_batch_size=3)
            static = sliding_window_probabilities(model, image, torch.device("cpu"), sw_batch_size=3,
                                                  static_batch=True)
    finally:
        hook.remove()
    assert sizes == [3, 1, 3, 3]  # the last batch of one window went through padded to three
    torch.testing.assert_close(static, plain, atol=1e-6, rtol=1e-5)


# ---- back to the original grid in torch -------------------------------------------------------------
@pytest.mark.parametrize("shape, coarse", [((5, 9, 7), None), ((5, 9, 7), 0), ((12, 4, 7), 1), ((1, 6, 6), None)])
def test_torch_resampling_matches_scipy(shape, coarse):
    array = np.random.default_rng(2).random((8, 13, 10), dtype=np.float32)
    expected = resample(array, shape, order=1, coarse_axis=coarse)
    got = resample_torch(torch.from_numpy(array)[None], shape, coarse)[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_torch_argmax_matches_the_class_by_class_mask():
    probabilities = torch.rand(5, 16, 22, 18, generator=torch.Generator().manual_seed(3))
    prepared = Prepared(np.zeros((16, 22, 18), np.float32), (6, 9, 7), (8.0, 2.0, 2.0), (2.0, 2.0, 2.0))
    coarse = _coarse_axis(prepared.original_spacing, prepared.target_spacing)
    assert coarse == 0  # anisotropic: nearest along z, linear in-plane
    expected = probabilities_to_mask(probabilities, prepared)  # the CPU path: scipy, one class at a time
    got = resample_torch(probabilities, prepared.original_shape, coarse).argmax(0).to(torch.uint8).numpy()
    np.testing.assert_array_equal(got, expected)
    for step in (1, 2, 4, 5):  # the GPU path, a few classes at a time (here on CPU tensors)
        np.testing.assert_array_equal(argmax_restored_torch(probabilities, prepared, step).numpy(), expected)
    tied = torch.ones(3, 16, 22, 18)  # ties go to the lowest class, as argmax
    assert not argmax_restored_torch(tied, prepared, 2).any()


def test_preparing_for_a_full_gpu_resamples_on_the_cpu(monkeypatch, fixtures):
    from unetrpp.preprocess import load_volume, prepare

    prep = Preprocessing(spacing=(6.0, 6.0, 6.0))
    volume = load_volume(fixtures / "example_ct_sm.nii.gz", prep)
    free_gpu_memory(monkeypatch, 0.0)  # nothing may be moved to the GPU (there is none here to move to)
    np.testing.assert_array_equal(prepare(volume, prep, device=CUDA).image, prepare(volume, prep).image)


def test_image_stays_on_the_cpu_when_the_gpu_is_full(monkeypatch):
    image = np.zeros((4, 5, 6), np.float32)
    assert inference._image_to(image, torch.device("cpu"), torch.device("cpu")).shape == (1, 1, 4, 5, 6)
    free_gpu_memory(monkeypatch, 0.0)  # stitching on the CPU too: nothing may be moved to the GPU
    assert inference._image_to(image, CUDA, torch.device("cpu")).device.type == "cpu"


def test_progress_says_when_the_first_pass_will_compile(model):
    class PassThrough(torch.nn.Module):  # stands in for the compiled network: same results, no compiling
        def forward(self, x):
            return model(x)

    runner = CompiledNetwork(model)
    runner.cudagraphs = False
    runner.compiled = PassThrough()
    image = np.random.default_rng(0).normal(size=(36, 21, 21)).astype(np.float32)  # 4 windows

    def messages(batch: int) -> list[str]:
        seen = []
        with torch.inference_mode():
            sliding_window_probabilities(runner, image, torch.device("cpu"), sw_batch_size=batch, static_batch=True,
                                         progress=lambda fraction, message: seen.append(message))
        return [m for m in seen if "compiling" in m]

    assert messages(3) == ["compiling the network for the GPU (about a minute, once per process)"]
    assert messages(3) == []  # the same shape again: already compiled
    assert len(messages(2)) == 1  # a new batch size compiles anew
    runner.failed = "torch.compile failed (...)"  # running without it: nothing to announce
    assert messages(4) == []
