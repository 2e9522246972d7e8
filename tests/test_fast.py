"""Inference-time rewrites compute the same function as the plain layers, and leave training alone."""

import copy
import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from unetrpp import create_model, load_original_checkpoint
from unetrpp.attention import TransformerBlock, capture_attention
from unetrpp.fast import (FastConv3d, FastConvTranspose3d, FastEPA, FastInstanceNorm3d, FastLinear,
                          FastTransformerBlock, _glibc, optimize_for_inference)

from golden import FIXTURES, golden_fill, golden_state_dict, save_released_style


@pytest.mark.parametrize("layer, shape", [
    (nn.Conv3d(8, 8, 3, padding=1, bias=False), (2, 8, 6, 10, 12)),
    (nn.Conv3d(4, 16, (2, 4, 4), stride=(2, 4, 4)), (1, 4, 8, 16, 16)),
    (nn.Conv3d(16, 14, 1), (3, 16, 5, 6, 7)),
    (nn.Conv3d(16, 14, 1), (1, 16, 5, 6, 7)),  # one sample: oneDNN's product
    (nn.Conv3d(1, 16, 1, bias=False), (2, 1, 5, 6, 7)),
    (nn.ConvTranspose3d(32, 16, (2, 4, 4), stride=(2, 4, 4), bias=False), (2, 32, 3, 4, 5)),
    (nn.ConvTranspose3d(8, 4, 2, stride=2), (1, 8, 3, 3, 3)),
    (nn.ConvTranspose3d(32, 16, (2, 4, 4), stride=(2, 4, 4)), (1, 32, 3, 4, 5)),
    (nn.ConvTranspose3d(8, 4, 3, stride=2, padding=1), (1, 8, 3, 3, 3)),  # not patchwise: plain path
    (nn.InstanceNorm3d(6), (2, 6, 5, 6, 7)),
    (nn.Linear(32, 128, bias=False), (1, 300, 32)),
    (nn.Linear(32, 16), (2, 300, 32)),
])
def test_fast_layers_compute_the_same_function(layer, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    fast = optimize_for_inference(copy.deepcopy(layer))
    assert type(fast) in (FastConv3d, FastConvTranspose3d, FastInstanceNorm3d, FastLinear)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), layer(x), atol=1e-5, rtol=1e-5)
        if isinstance(layer, nn.Linear):  # tokens that are a slice of wider rows take the plain path
            wide = torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]
            torch.testing.assert_close(fast(wide), layer(wide), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_projection", ["shared", "separate", "single"])
@pytest.mark.parametrize("branch_fusion", ["concat", "sum"])
def test_channel_major_transformer_block_computes_the_same_function(kv_projection, branch_fusion):
    torch.manual_seed(0)
    block = TransformerBlock((8, 8, 12), dim=16, proj_size=8, heads=4, kv_projection=kv_projection,
                             branch_fusion=branch_fusion, attn_dropout=0.5, conv_dropout=0.1, extra_conv=False,
                             layer_scale_init=1e-6).eval()
    with torch.no_grad():  # the attention's parameters, layer scale and temperatures included, away from their init
        for name, p in block.named_parameters():
            if not name.startswith("conv"):
                p.copy_(torch.randn_like(p) * (0.5 if p.dim() > 1 else 1.0) + (1.0 if p.dim() <= 1 else 0.0))
    fast = optimize_for_inference(copy.deepcopy(block))
    assert type(fast) is FastTransformerBlock
    x = torch.randn(2, 16, 8, 8, 12) * 3 + 1  # two samples, and a mean the LayerNorm must remove
    with torch.inference_mode():
        expected = block.attend(x)  # (2, 16, 8, 8, 12)
        scale = expected.abs().max()  # float32 rounding of sums over 768 tokens: a few 1e-7 of it
        close = functools.partial(torch.testing.assert_close, rtol=0, atol=5e-6 * scale)
        assert not torch.equal(fast.attend(x), expected)  # the channel-major path ran
        close(fast.attend(x), expected)
        full = block(x)
        torch.testing.assert_close(fast(x), full, rtol=0, atol=5e-6 * full.abs().max())  # then the same convs
        # a map whose grid axes cannot be merged without a copy
        odd = x.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
        close(fast.attend(odd), expected)
        with capture_attention(fast) as maps:  # stored maps: the plain path, the same outputs
            close(fast.attend(x), expected)
        assert maps[""]["spatial"].shape == (2, 4, 8 * 8 * 12, 8)
        seen = []  # a hook a researcher puts on EPA (or inside it) fires: the plain path runs
        hook = fast.epa_block.qkvv.register_forward_hook(lambda m, args, out: seen.append(out.shape))
        close(fast.attend(x), expected)
        hook.remove()
        assert seen == [(2, 8 * 8 * 12, 64)]
        fast.train()  # attention dropout is applied in training mode, gradients or not
        torch.manual_seed(1)
        dropped = fast.attend(x)
        block.train()
        torch.manual_seed(1)
        close(dropped, block.attend(x))
        assert not torch.allclose(dropped, expected, atol=1e-3 * scale)
        fast.eval().double()  # parameters of another dtype than the input: the plain path's behaviour
        torch.testing.assert_close(fast.attend(x), block.eval().double().attend(x))


def test_a_refused_onednn_call_falls_back_to_torch(monkeypatch, caplog):
    from unetrpp import fast

    def refuse(*args):
        raise RuntimeError("mkldnn::_linear_pointwise: unsupported")

    monkeypatch.setattr(fast, "_onednn_linear", refuse)
    layer = nn.Linear(8, 4)
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(optimize_for_inference(copy.deepcopy(layer))(x), layer(x))
    assert fast._onednn_linear is None and "oneDNN matrix product unavailable" in caplog.text


def test_optimized_model_keeps_parameters_and_still_trains():
    torch.manual_seed(0)
    model = create_model("unetrpp_tiny", deep_supervision=True)
    keys = list(model.state_dict())
    optimize_for_inference(model)
    assert list(model.state_dict()) == keys
    model.train()
    outs = model(torch.randn(1, 1, 32, 64, 64))
    sum(o.mean() for o in outs).backward()  # the plain path runs under autograd
    assert all(p.grad is not None for p in model.parameters())


def test_optimized_network_matches_the_golden_outputs(tmp_path):
    g = np.load(FIXTURES / "official_synapse.npz")
    path = save_released_style(golden_state_dict("synapse"), tmp_path / "synapse.model")
    model = optimize_for_inference(load_original_checkpoint(path, deep_supervision=True))
    x = torch.randn(tuple(int(s) for s in g["input_shape"]), generator=torch.Generator().manual_seed(2026))
    with torch.inference_mode():
        outs = model(x)
    for i, out in enumerate(outs):
        np.testing.assert_allclose(out[:, :, 1::4, 1::4, 1::4].numpy(), g[f"out{i}_sub"], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("name, patch_size", [
    ("unetrpp_synapse", (32, 64, 96)),  # shared E/F; grids of 8192 to 16 tokens, not cubes
    ("unetrpp_acdc", (8, 64, 64)),  # stem (1, 4, 4), separate E/F, conv52
    ("unetrpp_tumor", (64, 64, 96)),  # four channels in, one EF, branches summed
    ("unetrpp_lung", (8, 96, 128)),  # as acdc, with 6144 tokens: chunks that do not divide them
])
def test_every_original_network_optimized_computes_the_same_function(name, patch_size):
    """The golden test covers the optimized synapse network only: the other three variants' quirks, at
    batch 2 with the deep-supervision outputs, with every parameter away from its init (a layer scale of
    1e-6 would hide any error in the attention)."""
    torch.manual_seed(0)
    model = create_model(name, patch_size=patch_size, deep_supervision=True).eval()
    variant = "synapse" if name == "unetrpp_synapse" else name  # the fill keeps synapse's E and F equal
    with torch.no_grad():
        model.load_state_dict({k: v if (t := golden_fill(k, tuple(v.shape), variant)) is None else t
                               for k, v in model.state_dict().items()})
    fast = optimize_for_inference(copy.deepcopy(model))
    assert {type(m) for m in fast.modules()} >= {FastTransformerBlock, FastEPA}  # both attention paths run
    x = torch.randn(2, model.config.in_channels, *patch_size)
    with torch.inference_mode():
        for plain, quick in zip(model(x), fast(x), strict=True):
            torch.testing.assert_close(quick, plain, rtol=0, atol=2e-5 * plain.abs().max().item())


def test_bf16_segmentation_agrees_with_float32_and_leaves_the_model_alone(tmp_path):
    from unetrpp import io, segment
    from unetrpp.data.phantom import generate_case
    from unetrpp.pretrained import load_pretrained

    image, _, spacing = generate_case(seed=7, size="small")
    scan = io.save_array(image, spacing, tmp_path / "phantom.nii.gz")
    model = load_pretrained("unetrpp_tiny_phantom")
    seen = []  # the dtype of what each forward pass gets (the hook travels with segment()'s bf16 copy)
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    full = segment(scan, model=model, precision="fp32")
    ran_full, seen[:] = set(seen), []
    half = segment(scan, model=model, precision="bf16")
    assert ran_full == {torch.float32} and set(seen) == {torch.bfloat16}
    assert next(model.parameters()).dtype == torch.float32
    assert half.mask.shape == full.mask.shape
    assert (half.mask == full.mask).mean() > 0.99
    with pytest.raises(ValueError, match="precision='fp8'"):
        segment(scan, model=model, precision="fp8")


# Run in a fresh interpreter: the allocator is process-wide, and large free blocks other tests left in
# this process's heap would serve the allocation without any page fault.
_FAULT_COUNTING = """
import resource, torch
from unetrpp.fast import reuse_freed_memory

def faults(floats):  # minor page faults of allocating and writing a float32 tensor
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(floats)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def settled(floats):  # the fewest faults of three allocations after twelve were freed: a freed block
    for _ in range(12):  # with a small one after it cannot take the next, 64-byte aligned request, so the
        torch.ones(floats)  # heap may grow by a few blocks before freed ones merge (up to 7 seen)
    return min(faults(floats) for _ in range(3))
"""
_PAGE_FAULTS = _FAULT_COUNTING + """
outside = settled(16 * 2**20)  # 64 MB
with reuse_freed_memory():
    with reuse_freed_memory():  # nested blocks: the outer one keeps the setting
        pass
    inside = settled(16 * 2**20)
print(outside, inside, settled(24 * 2**20))  # after: 96 MB, larger than anything the heap kept
"""


_IN_A_THREAD = _FAULT_COUNTING + """
import threading
import app  # the viewer, whose requests run in worker threads started after it is imported

def work():
    with reuse_freed_memory():
        print(settled(16 * 2**20))

thread = threading.Thread(target=work)
thread.start()
thread.join()
"""


@pytest.mark.skipif(_glibc() is None, reason="glibc (Linux) only; elsewhere reuse_freed_memory does nothing")
def test_worker_threads_of_the_viewer_reuse_freed_memory_too():
    run = subprocess.run([sys.executable, "-c", _IN_A_THREAD], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    assert int(run.stdout.split()[-1]) < 1000  # 16384 faults per 64 MB map without share_main_heap()


@pytest.mark.skipif(_glibc() is None, reason="glibc (Linux) only; elsewhere reuse_freed_memory does nothing")
def test_freed_memory_is_reused_inside_the_block_and_returned_after_it():
    run = subprocess.run([sys.executable, "-c", _PAGE_FAULTS], capture_output=True, text=True, check=True)
    outside, inside, after = map(int, run.stdout.split())
    assert outside > 1000  # 64 MB in 4 KB pages is 16384 faults (fewer with huge pages)
    assert inside < outside / 4
    assert after > outside  # defaults restored: a large block is mapped afresh and unmapped on free


def test_without_onednn_only_the_fast_epa_is_swapped_in(monkeypatch):
    """A PyTorch build without oneDNN (some GPU and ARM builds) keeps the plain layers, but EPA still gets
    its faster form, which needs no oneDNN (on GPUs: PyTorch's fused attention)."""
    from unetrpp import create_model
    from unetrpp.fast import FastEPA

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    model = optimize_for_inference(create_model("unetrpp_tiny").eval())
    kinds = {type(m).__name__ for m in model.modules()}
    assert "FastEPA" in kinds and not kinds & {"FastConv3d", "FastLinear", "FastTransformerBlock"}
    assert all(type(m.epa_block) is FastEPA for m in model.modules() if hasattr(m, "epa_block"))
