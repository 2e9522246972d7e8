"""The network and its config: presets, derived sizes, validation, gradients, attention capture."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unetrpp import PRESETS, UNETRPP, Preprocessing, create_model, fast, get_config
from unetrpp.attention import EPA, capture_attention
from unetrpp.visualize_attention import attention_blocks

from golden import original_keys

PARAMS = {"unetrpp_synapse": 42_952_850, "unetrpp_acdc": 66_796_404, "unetrpp_tumor": 42_647_604,
          "unetrpp_lung": 121_174_798}


@pytest.mark.parametrize("name", list(PARAMS))
def test_original_variants_have_exact_parameters_and_keys(name):
    with torch.device("meta"):
        model = create_model(name, deep_supervision=True)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == original_keys(name.split("_")[1])


def test_token_counts_follow_the_patch_size():
    cfg = get_config("unetrpp_acdc")
    assert [cfg.tokens(i) for i in range(4)] == [25600, 3200, 400, 50]
    cfg = get_config("unetrpp_synapse", patch_size=(32, 128, 96))
    assert cfg.stage_grid(0) == (16, 32, 24) and cfg.tokens(3) == 2 * 4 * 3
    with torch.device("meta"):
        model = UNETRPP(cfg)
    assert model.unetr_pp_encoder.stages[3][0].pos_embed.shape == (1, 24, 256)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: unetrpp_synapse.*unetrpp_tiny"):
        create_model("unetrpp_btcv")


@pytest.mark.parametrize("overrides, field", [
    ({"patch_size": (64, 100, 128)}, "patch_size"),
    ({"num_heads": 3}, "num_heads"),
    ({"dims": (32, 64, 128)}, "dims"),
    ({"kv_projection": "tied"}, "kv_projection"),
    ({"out_channels": 5}, "class_names"),
    ({"attn_dropout": 1.5}, "attn_dropout"),
    ({"conv_dropout": -0.1}, "conv_dropout"),
    ({"decoder_proj_size": -3}, "decoder_proj_size"),
    ({"depths": (1.5, 1, 1, 1)}, "depths"),
])
def test_invalid_configs_name_the_field_and_rule(overrides, field):
    with pytest.raises(ValueError, match=rf"UNETRPPConfig\.{field}=.*: "):
        get_config("unetrpp_synapse", **overrides)


@pytest.mark.parametrize("overrides, words", [
    ({"patch_size": 64}, "UNETRPPConfig.patch_size=64: needs 3 whole numbers, e.g. (64, 128, 128)"),
    ({"stem": (0, 4, 4)}, "UNETRPPConfig.stem=(0, 4, 4): needs three positive values"),
    ({"class_names": None}, "UNETRPPConfig.class_names=None: needs one name (a string) per output channel"),
    ({"attn_dropout": "high"}, "UNETRPPConfig.attn_dropout='high': a dropout rate must be a number in [0, 1)"),
    ({"layer_scale_init": "1e-6"}, "UNETRPPConfig.layer_scale_init='1e-6': must be a finite number"),
    ({"synthetic": "false"}, "UNETRPPConfig.synthetic='false': must be true or false"),
    ({"num_heads": True}, "UNETRPPConfig.num_heads=True: must be a positive integer"),
    ({"preprocessing": "ct"}, "UNETRPPConfig.preprocessing='ct': needs a Preprocessing or a dict of its fields"),
    ({"preprocessing": {"clip": [1000]}}, "preprocessing.clip=[1000]: need two HU values (low, high)"),
    ({"preprocessing": {"spacing": 3.0}}, "preprocessing.spacing=3.0: need three positive, finite mm values"),
    ({"preprocessing": {"mean": None}}, "preprocessing.mean=None: need a number"),
    ({"depths": 2}, "UNETRPPConfig.depths=2: needs 4 whole numbers, e.g. (3, 3, 3, 3)"),
    ({"extra_conv": "yes"}, "UNETRPPConfig.extra_conv='yes': must be true or false"),  # was taken as true
    ({"preprocessing": {"spacing": [4, 2, "a"]}}, "preprocessing.spacing=[4, 2, 'a']: need three positive"),
])
def test_a_config_value_of_the_wrong_type_is_named_with_the_rule(overrides, words):
    """What a hand-edited config.json or `train --set KEY=VALUE` can hold: each once ended in a bare
    "'int' object is not iterable", an IndexError traceback, or was accepted and failed only when the
    weights loaded (blamed on model.safetensors) or a scan was segmented (blamed on the scan)."""
    with pytest.raises(ValueError) as info, torch.device("meta"):
        UNETRPP(get_config("unetrpp_tiny", **overrides))
    assert words in str(info.value) and len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("spacing", [(float("nan"), 1.0, 1.0), (3.0, float("inf"), 1.0), (0.0, 1.0, 1.0), (1.0, 1.0)])
def test_a_spacing_that_is_not_three_positive_finite_values_is_refused(spacing):
    """`convert --spacing nan 1 1` once wrote a weights folder whose every prediction failed with
    "cannot convert float NaN to integer" (inf: a scan 'a single slice' at the weights' spacing)."""
    with pytest.raises(ValueError, match=r"preprocessing\.spacing=.*: need three positive, finite mm values"):
        Preprocessing(spacing=spacing)


def test_numpy_integers_are_accepted_as_sizes():
    cfg = get_config("unetrpp_tiny", patch_size=tuple(np.array([32, 64, 64])))
    assert cfg.patch_size == (32, 64, 64) and all(type(v) is int for v in cfg.patch_size)


def test_unknown_override_is_rejected():
    with pytest.raises(ValueError, match="unknown UNETR\\+\\+ config keys \\['patch'\\]"):
        create_model("unetrpp_tiny", patch=(32, 64, 64))


def test_wrong_input_size_says_what_fits():
    model = create_model("unetrpp_tiny").eval()
    with pytest.raises(ValueError, match=r"expected \(B, 1, 32, 64, 64\).*sliding window"):
        model(torch.zeros(1, 1, 32, 64, 32))


def test_every_parameter_of_tiny_gets_a_gradient():
    torch.manual_seed(0)
    model = create_model("unetrpp_tiny", deep_supervision=True).train()
    outs = model(torch.randn(2, 1, 32, 64, 64))
    assert [tuple(o.shape[2:]) for o in outs] == [(32, 64, 64), (16, 16, 16), (8, 8, 8)]
    sum(o.square().mean() for o in outs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("name", ["unetrpp_tiny", "unetrpp_tiny_single_ef"])
def test_attention_capture_leaves_outputs_unchanged(name):
    torch.manual_seed(0)
    model = (create_model("unetrpp_tiny", kv_projection="single", branch_fusion="sum")
             if name.endswith("single_ef") else create_model("unetrpp_tiny")).eval()
    x = torch.randn(1, 1, 32, 64, 64)
    with torch.no_grad():
        plain = model(x)
        with capture_attention(model) as maps:
            recorded = model(x)
    assert torch.equal(plain, recorded)
    first = maps["unetr_pp_encoder.stages.0.0"]
    heads, d, n, p = 4, 16 // 4, 16 * 16 * 16, 32
    assert first["channel"].shape == (1, heads, d, d) and first["spatial"].shape == (1, heads, n, p)
    assert first["grid"] == (16, 16, 16) and first["E"].shape == (p, n)
    epa = model.unetr_pp_encoder.stages[0][0].epa_block  # "E" is the keys' projection, not the values' F
    assert torch.equal(first["E"], epa.EF.t() if name.endswith("single_ef") else epa.E.weight)
    torch.testing.assert_close(first["spatial"].sum(-1), torch.ones(1, heads, n))
    assert len(maps) == sum(get_config("unetrpp_tiny").depths) + 3  # every EPA block, decoder included
    with torch.no_grad():
        model(x)
    assert all(not b.epa_block.attention_maps for b in model.modules() if hasattr(b, "epa_block"))


def test_captured_maps_can_be_read_inside_the_block_right_after_the_forward():
    """As a student writes it: forward, then look, inside the `with`; the dict was once filled only
    when the block ended, so it read empty there."""
    torch.manual_seed(0)
    model = create_model("unetrpp_tiny").eval()
    x = torch.randn(1, 1, 32, 64, 64)
    with torch.no_grad(), capture_attention(model) as maps:
        model(x)
        assert list(maps) == attention_blocks(model)  # every block, encoder first
        first = maps["unetr_pp_encoder.stages.0.0"]["spatial"].clone()
        model(torch.randn(1, 1, 32, 64, 64))  # a second forward replaces the maps
        assert not torch.equal(maps["unetr_pp_encoder.stages.0.0"]["spatial"], first)


def test_capture_attention_records_its_own_thread_only():
    # the viewer shares one model: one visitor's attention maps while another's scan is segmented
    import threading

    from unetrpp.fast import optimize_for_inference

    torch.manual_seed(0)
    model = optimize_for_inference(create_model("unetrpp_tiny").eval())
    mine, theirs = torch.randn(2, 1, 1, 32, 64, 64)
    with torch.no_grad():
        with capture_attention(model) as alone:
            model(mine)
        with capture_attention(model) as maps:
            model(mine)
            other = threading.Thread(target=torch.no_grad()(model), args=(theirs,))
            other.start()
            other.join()
    assert maps.keys() == alone.keys()
    for name in alone:
        assert torch.equal(maps[name]["spatial"], alone[name]["spatial"]), name


@pytest.mark.parametrize("kv_projection, branch_fusion", [("shared", "concat"), ("separate", "concat"),
                                                           ("single", "sum")])
def test_fast_epa_computes_the_explicit_epa(kv_projection, branch_fusion, monkeypatch):
    """Inference runs `FastEPA` (normalisation folded into the small products, spatial attention in
    chunks of queries); training and attention capture run EPA's explicit steps. Both compute the same
    function, also when the chunks do not divide the tokens, and the chunks match PyTorch's own attention."""
    monkeypatch.setattr(fast, "SPATIAL_CHUNK", 100)
    torch.manual_seed(0)
    epa = EPA(tokens=512, dim=32, proj_size=16, heads=4, kv_projection=kv_projection, branch_fusion=branch_fusion,
              attn_dropout=0.0).eval()
    with torch.no_grad():
        epa.temperature.uniform_(0.5, 2.0)
        epa.temperature2.uniform_(0.5, 2.0)
        x = torch.randn(2, 512, 32)
        explicit = epa(x)
        quick = fast.optimize_for_inference(copy.deepcopy(epa))
        assert type(quick) is fast.FastEPA
        torch.testing.assert_close(quick(x), explicit, atol=1e-5, rtol=1e-5)
        quick.store_attention = True  # kept maps: the explicit steps
        torch.testing.assert_close(quick(x), explicit, atol=1e-6, rtol=1e-6)
    assert quick.attention_maps["spatial"].shape == (2, 4, 512, 16)
    q, k, v = torch.randn(3, 2, 4, 512, 8).unbind()
    torch.testing.assert_close(fast.spatial_attention_in_chunks(q, k[:, :, :16], v[:, :, :16]),
                               F.scaled_dot_product_attention(q, k[:, :, :16], v[:, :, :16], scale=1.0).transpose(-2, -1))


@pytest.mark.parametrize("scale", [40, 400])
def test_attention_stays_finite_under_float16_autocast(scale):
    """Large activations, as trained networks can have, overflow float16 (65504) in sums over the N tokens:
    EPA's unit lengths and FastEPA's q^T k are formed in float32 even under autocast (the CUDA default
    is float16 autocast; CPU autocast to float16 shows the same overflow)."""
    torch.manual_seed(0)
    epa = EPA(tokens=4096, dim=32, proj_size=64, heads=4, kv_projection="shared").eval()
    quick = fast.optimize_for_inference(copy.deepcopy(epa))
    with torch.no_grad():
        for net in (epa, quick):
            net.qkvv.weight.mul_(scale)  # activations of hundreds to thousands
        x = torch.randn(1, 4096, 32)
        epa.store_attention = True
        reference = epa(x)
        reference_maps = epa.attention_maps["channel"]
        with torch.autocast("cpu", dtype=torch.float16):
            plain, folded = epa(x), quick(x)
    close = dict(atol=2e-2 * reference.abs().max().item(), rtol=0)
    for out in (plain, folded):
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), reference, **close)
    torch.testing.assert_close(epa.attention_maps["channel"].float(), reference_maps, atol=2e-2, rtol=0)


def test_presets_are_all_buildable():
    for name in PRESETS:
        with torch.device("meta"):
            assert create_model(name).config.name == name


def test_a_new_network_starts_from_the_originals_init():
    """The original re-initialises only its encoder's Linear layers (truncated normal, std 0.02); convs
    and the decoder keep PyTorch's defaults (uniform within 1/sqrt(fan_in)), the tumor network's EF is
    uniform within 1/sqrt(P)."""
    torch.manual_seed(0)
    model = create_model("unetrpp_synapse")
    qkvv = model.unetr_pp_encoder.stages[0][0].epa_block.qkvv.weight
    assert qkvv.std().item() == pytest.approx(0.02, rel=0.05)
    for linear in (model.decoder5.decoder_block[0][0].epa_block.qkvv, model.decoder3.decoder_block[0][0].epa_block.E):
        bound = linear.in_features ** -0.5  # PyTorch's default for Linear
        assert linear.weight.abs().max() <= bound and linear.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.1)
    conv = model.decoder2.decoder_block[0].conv1.conv.weight  # 16 -> 16, 3x3x3
    bound = (conv.shape[1] * 27) ** -0.5
    assert conv.abs().max() <= bound and conv.std().item() == pytest.approx(bound / 3**0.5, rel=0.1)
    ef = create_model("unetrpp_tumor").unetr_pp_encoder.stages[3][0].epa_block.EF
    assert ef.abs().max() <= ef.shape[1] ** -0.5 and ef.std().item() == pytest.approx(ef.shape[1] ** -0.5 / 3**0.5, rel=0.2)


def test_deep_supervision_switched_on_without_its_heads_says_how_to_build_them():
    model = create_model("unetrpp_tiny").eval()  # built without the extra heads
    model.deep_supervision = True
    with pytest.raises(ValueError, match=r"create_model\(\.\.\., deep_supervision=True\)"):
        model(torch.zeros(1, 1, *model.config.patch_size))
    heads = create_model("unetrpp_tiny", deep_supervision=True).eval()
    with torch.no_grad():
        assert len(heads(torch.zeros(1, 1, *heads.config.patch_size))) == 3


def test_the_networks_public_api_is_typed_and_documented():
    """The style guide's rule for the modules that read like the paper's appendix: every public function
    and method has a docstring and annotated arguments and return value (forward excepted from the
    docstring: its shapes are in the class's)."""
    import inspect

    from unetrpp import attention, complexity, config, layers, model

    problems = []
    for module in (config, model, attention, layers, complexity, fast):
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            members = [(name, obj)] if inspect.isfunction(obj) else []
            if inspect.isclass(obj):
                members = [(f"{name}.{m}", f) for m, f in vars(obj).items()
                           if inspect.isfunction(f) and not m.startswith("_")]
            for where, f in members:
                sig = inspect.signature(f)
                untyped = [p for p in sig.parameters if p not in ("self", "cls")
                           and sig.parameters[p].annotation is inspect.Parameter.empty]
                if untyped or sig.return_annotation is inspect.Signature.empty:
                    problems.append(f"{module.__name__}.{where}: annotations")
                if not inspect.getdoc(f) and not where.endswith(".forward"):
                    problems.append(f"{module.__name__}.{where}: docstring")
    assert problems == []
