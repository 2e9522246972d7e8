"""The network reproduces the original UNETR++ number for number (golden files), loading weights
through the released-checkpoint path."""

import numpy as np
import pytest
import torch

from unetrpp import load_original_checkpoint
from unetrpp.pretrained import convert_original, load_pretrained

from golden import FIXTURES, golden_state_dict, original_keys, save_released_style


def _golden_input(g) -> torch.Tensor:
    return torch.randn(tuple(int(s) for s in g["input_shape"]), generator=torch.Generator().manual_seed(int(g["input_seed"])))


@pytest.fixture(scope="module")
def synapse_checkpoint(tmp_path_factory):
    return save_released_style(golden_state_dict("synapse"), tmp_path_factory.mktemp("ckpt") / "model_final_checkpoint.model",
                               prefix="module.")


def _check_outputs(outs, g):
    assert len(outs) == 3
    for i, out in enumerate(outs):
        out = out.numpy()
        assert out.shape == tuple(g[f"out{i}_shape"])
        np.testing.assert_allclose(out[:, :, 1::4, 1::4, 1::4], g[f"out{i}_sub"], atol=1e-3, rtol=1e-4)
        np.testing.assert_allclose(out.mean(axis=(0, 2, 3, 4)), g[f"out{i}_mean"], atol=1e-3, rtol=1e-4)
        np.testing.assert_allclose(out.std(axis=(0, 2, 3, 4)), g[f"out{i}_std"], atol=1e-3, rtol=1e-3)
        hist = np.bincount(out.argmax(1).ravel(), minlength=out.shape[1])
        assert np.abs(hist - g[f"out{i}_argmax_hist"]).sum() / 2 <= 0.001 * out[:, 0].size


@pytest.mark.parametrize("variant", ["synapse", "acdc", "tumor"])
def test_golden_outputs(variant, tmp_path, synapse_checkpoint):
    g = np.load(FIXTURES / f"official_{variant}.npz")
    path = synapse_checkpoint if variant == "synapse" else save_released_style(golden_state_dict(variant), tmp_path / "m.model")
    model = load_original_checkpoint(path, deep_supervision=True)  # variant detected from keys and shapes
    assert model.config.name == f"unetrpp_{variant}" and not model.training
    assert sum(p.numel() for p in model.parameters()) == int(g["n_params"])
    with torch.no_grad():
        _check_outputs(model(_golden_input(g)), g)


def test_lung_loads_and_runs(tmp_path):
    """No golden outputs exist for lung, so check the loaded network against the original's key list
    (tests/fixtures/keys_lung.tsv) shape for shape, and that it holds the checkpoint's values."""
    golden = golden_state_dict("lung")
    path = save_released_style(golden, tmp_path / "lung.model")
    model = load_original_checkpoint(path)
    assert model.config.name == "unetrpp_lung"
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == original_keys("lung")
    assert [k for k, v in state.items() if not torch.equal(v, golden[k])] == []
    del golden, state
    x = torch.randn(1, 1, 32, 192, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 2, 32, 192, 192) and torch.isfinite(out).all()


def test_converted_folder_gives_the_same_logits(synapse_checkpoint, tmp_path):
    g = np.load(FIXTURES / "official_synapse.npz")
    folder = convert_original(synapse_checkpoint, tmp_path / "unetrpp_synapse")
    model = load_pretrained(folder)
    assert model.config.preprocessing.spacing == (3.0, 0.7578, 0.7578)
    assert model.config.preprocessing.clip == (-958.0, 326.0)
    with torch.no_grad():
        out = model(_golden_input(g)).numpy()
    np.testing.assert_allclose(out[:, :, 1::4, 1::4, 1::4], g["out0_sub"], atol=1e-3, rtol=1e-4)
