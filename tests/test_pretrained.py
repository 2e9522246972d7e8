"""Weights: safe reading of released checkpoints, our folder format, and where weights come from."""

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from unetrpp import UNETRPP, create_model, load_original_checkpoint
from unetrpp.pretrained import identify_variant, load_pretrained, save_for_inference

from golden import as_numpy1_pickle, save_released_style


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch exploited",))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return create_model("unetrpp_tiny").eval()


def test_malicious_pickle_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.model"
    torch.save({"state_dict": {}, "plot_stuff": _Exploit()}, path)
    with pytest.raises(ValueError, match="refused to load.*allow-list"):
        load_original_checkpoint(path)
    assert not (tmp_path / "exploited").exists()


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b"hello, I am a text file\n", "not a PyTorch checkpoint \\(neither a zip archive nor a pickle\\)"),
    (b"\x89PNG\r\n\x1a\n" + bytes(64), "not a PyTorch checkpoint"),
    (b"PK\x03\x04" + bytes(64), "not a readable PyTorch checkpoint"),
])
def test_files_that_are_not_checkpoints(tmp_path, content, message):
    path = tmp_path / "model_final_checkpoint.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message + ".*expected a released UNETR\\+\\+ model_final_checkpoint.model"):
        load_original_checkpoint(path)


def test_truncated_checkpoint(tmp_path, tiny):
    path = save_released_style(create_model("unetrpp_tiny").state_dict(), tmp_path / "full.model")
    cut = tmp_path / "cut.model"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="maybe truncated"):
        load_original_checkpoint(cut)


@pytest.mark.parametrize("size", [5000, 8000, 20000])
def test_a_legacy_format_checkpoint_cut_short_is_one_line(tmp_path, tiny, size):
    """torch.save(..., _use_new_zipfile_serialization=False), as older releases are: cut early, torch's
    reader fails with struct.error or IndexError rather than its usual errors."""
    path = tmp_path / "legacy.model"
    torch.save({"state_dict": tiny.state_dict(), "epoch": 1000}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:size])
    with pytest.raises(ValueError, match="maybe truncated"):
        load_original_checkpoint(path)


def test_checkpoint_of_another_network_is_named(tmp_path, tiny):
    path = save_released_style(tiny.state_dict(), tmp_path / "other.model")
    with pytest.raises(ValueError, match=r"other.model: not the weights of a released UNETR\+\+ network \(closest: "
                                         r"unetrpp_\w+, \d+ tensor\(s\) missing, extra or of another shape; first: "):
        load_original_checkpoint(path)
    with pytest.raises(ValueError, match="not a unetrpp_acdc checkpoint .*give no name .*to detect which network"):
        load_original_checkpoint(path, name="unetrpp_acdc")


def test_folder_and_plans_file_are_pointed_to_the_checkpoint(tmp_path):
    release = tmp_path / "release" / "fold_0"
    release.mkdir(parents=True)
    (release / "model_final_checkpoint.model").write_bytes(b"PK")
    plans = release / "model_final_checkpoint.model.pkl"
    plans.write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="is a folder; give the checkpoint file itself, e.g. .*fold_0/model_final"):
        load_original_checkpoint(tmp_path / "release")
    with pytest.raises(ValueError, match=r"plans file .*give the \.model file next to it \(model_final_checkpoint.model\)"):
        load_original_checkpoint(plans)


def test_bare_state_dict_with_module_prefix_and_variant_detection(tmp_path):
    with torch.device("meta"):
        sd = create_model("unetrpp_acdc", deep_supervision=True).state_dict()
    assert identify_variant(sd) == "unetrpp_acdc"
    sd = {k: v for k, v in sd.items() if k != "decoder2.decoder_block.0.conv1.conv.weight"}
    with pytest.raises(ValueError, match="closest: unetrpp_acdc, 1 tensor.*first: missing key decoder2.decoder_block"):
        identify_variant(sd)


def test_numpy_scalars_in_plot_stuff_are_allowed(tmp_path):
    model = create_model("unetrpp_tumor", deep_supervision=True)
    path = save_released_style(model.state_dict(), tmp_path / "tumor.model", prefix="module.")
    loaded = load_original_checkpoint(path, deep_supervision=False)
    assert loaded.config.name == "unetrpp_tumor" and loaded.deep_supervision is False
    assert torch.equal(loaded.state_dict()["unetr_pp_encoder.stages.0.0.epa_block.EF"],
                       model.state_dict()["unetr_pp_encoder.stages.0.0.epa_block.EF"])


@pytest.mark.parametrize("ddp", ["", "module."])
def test_weights_of_a_torch_compiled_model_load(tmp_path, ddp):
    """A network fine-tuned under torch.compile saves keys starting "_orig_mod." (under DDP too: "module._orig_mod.");
    loading them failed with "missing key unetr_pp_encoder...", as DDP's "module." once did."""
    model = create_model("unetrpp_tumor", deep_supervision=True)
    compiled = torch.compile(model)  # compiles at its first call, never made here: the keys are what matters
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    loaded = load_original_checkpoint(save_released_style(compiled.state_dict(), tmp_path / "tuned.model", prefix=ddp))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    folder = save_for_inference(compiled, tmp_path / "weights")  # what `train` writes, from the compiled model
    head = "out1.conv.conv.weight"
    assert torch.equal(load_pretrained(folder).state_dict()[head], model.state_dict()[head])


def test_save_and_load_pretrained_round_trip_is_bit_exact(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "w")
    back = UNETRPP.from_pretrained(tmp_path / "w").eval()
    assert back.config == tiny.config  # tuples were lists in JSON
    x = torch.randn(1, 1, 32, 64, 64)
    with torch.no_grad():
        assert torch.equal(back(x), tiny(x))


def test_from_pretrained_refuses_a_folder_missing_a_tensor(tmp_path, tiny):
    """huggingface_hub loads non-strictly by default, which would leave a layer randomly initialised."""
    import safetensors.torch

    tiny.save_pretrained(tmp_path / "w")
    tensors = safetensors.torch.load_file(tmp_path / "w" / "model.safetensors")
    safetensors.torch.save_file({k: v for k, v in tensors.items() if not k.startswith("decoder2.")},
                                tmp_path / "w" / "model.safetensors")
    with pytest.raises(RuntimeError, match="decoder2"):
        UNETRPP.from_pretrained(tmp_path / "w")
    assert UNETRPP.from_pretrained(tmp_path / "w", strict=False) is not None  # when asked for


def test_from_pretrained_answers_a_folder_without_config_and_a_checkpoint_file(tmp_path, tiny):
    """huggingface_hub answered these with "UNETRPP.__init__() missing 1 required positional argument:
    'config'" and "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    tiny.save_pretrained(tmp_path / "w")
    (tmp_path / "w" / "config.json").unlink()
    with pytest.raises(ValueError, match=r"w: no config\.json; a weights folder holds config\.json \+ model\.safetensors"):
        UNETRPP.from_pretrained(tmp_path / "w")
    ckpt = save_released_style(tiny.state_dict(), tmp_path / "model_final_checkpoint.model")
    with pytest.raises(ValueError, match=r"checkpoint\.model is a file; .*unetrpp\.load_original_checkpoint\(path\)"):
        UNETRPP.from_pretrained(ckpt)


def test_shared_projection_survives_the_round_trip(tmp_path):
    model = create_model("unetrpp_synapse", patch_size=(32, 64, 64))
    model.save_pretrained(tmp_path / "s")
    for model in (UNETRPP.from_pretrained(tmp_path / "s"), load_pretrained(tmp_path / "s")):
        epa = model.unetr_pp_encoder.stages[0][0].epa_block
        assert epa.E is epa.F


def test_loading_a_weights_folder_prints_nothing_and_leaves_stdout_alone(tmp_path, tiny, capsys, monkeypatch):
    # stdout is the whole process's: the viewer loads weights in a thread while the server prints its URL
    import safetensors.torch

    tiny.save_pretrained(tmp_path / "w")
    stdout, seen, real_load = sys.stdout, [], safetensors.torch.load_model
    monkeypatch.setattr(safetensors.torch, "load_model", lambda *a, **k: (seen.append(sys.stdout), real_load(*a, **k))[1])
    model = load_pretrained(tmp_path / "w")
    assert seen == [stdout] and capsys.readouterr().out == ""
    x = torch.randn(1, 1, 32, 64, 64)
    with torch.no_grad():
        assert not model.training and torch.equal(model(x), tiny(x))


def test_load_pretrained_sources_and_errors(tmp_path, tiny, monkeypatch):
    monkeypatch.chdir(tmp_path)  # names are also looked up in ./weights: here, none yet
    tiny.save_pretrained(tmp_path / "mine")
    assert load_pretrained(tmp_path / "mine").config == tiny.config
    monkeypatch.setattr("unetrpp.pretrained.WEIGHTS_DIR", tmp_path)
    assert load_pretrained("mine").config == tiny.config
    with pytest.raises(ValueError, match="not found.*local weights \\['mine'\\]"):
        load_pretrained("no_such_weights")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_pretrained(tmp_path / "empty")
    (tmp_path / "weights").mkdir()  # weights/... before conversion is a missing folder, not a Hub repo id
    with pytest.raises(ValueError, match="no such folder.*unetrpp convert CHECKPOINT --out weights/unetrpp_synapse"):
        load_pretrained("weights/unetrpp_synapse")
    # Mistakes a person makes: a trailing slash, an empty value, a name that is no repo id.
    assert load_pretrained("mine/").config == tiny.config
    with pytest.raises(ValueError, match="no such folder or file"):
        load_pretrained("mine_typo/")
    # a mistyped checkpoint path is not a folder to make: no `convert ... --out model_final_checkpoint.model`
    with pytest.raises(ValueError, match=r"no such checkpoint file; check the path.*local weights \['mine'\]"):
        load_pretrained(tmp_path / "Task002_Synapse" / "model_final_checkpoint.model")
    with pytest.raises(ValueError, match=r"no such weights file; check the path.*local weights \['mine'\]"):
        load_pretrained("weights/unetrpp_synapse/model.safetensors")  # not `convert ... --out .../model.safetensors`
    with pytest.raises(ValueError, match="empty; give a weights folder.*local weights \\['mine'\\]"):
        load_pretrained("")
    with pytest.raises(ValueError, match="nor a valid Hugging Face repo id.*local weights \\['mine'\\]"):
        load_pretrained("my weights/v1")


def test_weights_saved_with_deep_supervision_load_for_inference_with_one_output(tmp_path):
    """A researcher's fine-tuned network saved with its deep-supervision heads (save_pretrained, not
    save_for_inference) loads as load_pretrained promises: one tensor of full-resolution logits, not a list."""
    torch.manual_seed(0)
    model = create_model("unetrpp_tiny", deep_supervision=True, patch_size=(16, 32, 32))
    model.save_pretrained(tmp_path / "ds")
    loaded = load_pretrained(tmp_path / "ds")
    assert loaded.deep_supervision is False and not loaded.training
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x)[0])


def test_a_training_run_folder_or_its_checkpoint_points_to_the_runs_weights(tmp_path, tiny):
    """`--weights runs/tiny` (the train --out folder) or runs/tiny/checkpoint.pt was answered with "no
    config.json ... make one with `python -m unetrpp convert`" and "holds dict without a 'state_dict'":
    the fix is runs/tiny/model, which an interrupted run writes with a resume already at --max-steps."""
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    torch.save({"step": 21, "model": tiny.state_dict(), "config": tiny.config.to_dict()}, run / "checkpoint.pt")
    (run / "options.json").write_text('{"data": "my data", "out": "runs/tiny", "max_steps": 40}')
    to_write = (f"no weights folder {run / 'model'} yet; write one from its last checkpoint, without training, with "
                f"`python -m unetrpp train --data 'my data' --out {run} --resume --max-steps 1`")
    for given, words in ((run, "not a weights folder; the run"), (run / "checkpoint.pt", "is the checkpoint of a "
                         "training run, not a weights file"), (run / "model", "no such folder; the run")):
        with pytest.raises(ValueError) as info:
            load_pretrained(given)
        assert words in str(info.value) and to_write in str(info.value), given
    tiny.save_pretrained(run / "model")  # what a finished run leaves
    for given in (run, run / "checkpoint.pt"):
        with pytest.raises(ValueError, match=rf"the run's weights folder is {run / 'model'}: give --weights"):
            load_pretrained(given)
    assert load_pretrained(run / "model").config == tiny.config


def test_the_command_a_training_run_hint_gives_works_in_a_windows_shell(tmp_path, tiny, monkeypatch):
    """On Windows the hint's command quoted paths the POSIX way: cmd.exe passed 'C:\\Users\\me\\My CT' with its
    single quotes to --data, a folder that does not exist."""
    import sys

    from unetrpp.pretrained import training_run_hint

    run = tmp_path / "my runs" / "tiny"
    run.mkdir(parents=True)
    torch.save({"step": 21, "model": tiny.state_dict(), "config": tiny.config.to_dict()}, run / "checkpoint.pt")
    (run / "options.json").write_text(json.dumps({"data": "C:\\Users\\me\\My CT", "out": str(run)}))
    monkeypatch.setattr(sys, "platform", "win32")
    hint = training_run_hint(run)
    assert f'--data "C:\\Users\\me\\My CT" --out "{run}" --resume' in hint and "'" not in hint, hint


def test_weights_folder_missing_tensors_is_refused(tmp_path, tiny):
    """Layers without weights in model.safetensors must not keep their random initial values."""
    from safetensors.torch import load_file, save_file

    tiny.save_pretrained(tmp_path / "w")
    tensors = load_file(tmp_path / "w" / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "decoder2" not in k}, tmp_path / "w" / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors: unreadable or not the weights of its config.json.*decoder2"):
        load_pretrained(tmp_path / "w")


def test_hub_repo_id_from_a_prefilled_cache_and_offline_error(tmp_path, tiny):
    """A repo id resolves through huggingface_hub's cache layout with HF_HUB_OFFLINE=1; a repo that is
    not cached gives a clear message. Runs in a subprocess so the env is read at import time."""
    tiny.save_pretrained(tmp_path / "src")
    snap = tmp_path / "hub" / "models--someone--unetrpp-tiny"
    commit = hashlib.sha1(b"unetrpp").hexdigest()
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text(commit)
    (snap / "snapshots" / commit).mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (snap / "snapshots" / commit / f).write_bytes((tmp_path / "src" / f).read_bytes())
    code = ("from unetrpp.pretrained import load_pretrained\n"
            "m = load_pretrained('someone/unetrpp-tiny'); print('OK', m.config.name)\n"
            "try:\n    load_pretrained('someone/not-cached')\nexcept ValueError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "OK unetrpp_tiny" in out.stdout, out.stderr
    assert "ERR could not get weights 'someone/not-cached'" in out.stdout and "HF_HUB_OFFLINE" in out.stdout and "if you meant a local folder" in out.stdout
    # Without HF_HUB_OFFLINE on a machine whose DNS cannot find the Hub: the cache at once, no half minute
    # of retries, and a message that says what happened.
    no_dns = ("import socket\n"
              "def fail(*a, **k):\n    raise socket.gaierror(-2, 'Name or service not known')\n"
              "socket.getaddrinfo = fail\n")
    env.pop("HF_HUB_OFFLINE")
    started = time.time()
    out = subprocess.run([sys.executable, "-c", no_dns + code], env=env, capture_output=True, text=True, timeout=300)
    assert "OK unetrpp_tiny" in out.stdout, out.stderr
    assert "the Hub is out of reach (huggingface.co: Name or service not known)" in out.stdout, out.stdout
    assert "Retrying" not in out.stderr and time.time() - started < 25


def test_state_dict_that_is_not_tensors_is_refused(tmp_path):
    path = tmp_path / "odd.model"
    torch.save({"state_dict": {"a": [1, 2]}, "epoch": 3}, path)
    with pytest.raises(ValueError, match="values that are not tensors"):
        load_original_checkpoint(path)
    torch.save({"state_dict": [1]}, path)
    with pytest.raises(ValueError, match="without a 'state_dict'"):
        load_original_checkpoint(path)


def test_numpy1_pickled_checkpoint_loads(tmp_path):
    """The released files were written under numpy 1: their scalars name numpy.core.multiarray."""
    model = create_model("unetrpp_tumor", deep_supervision=True)
    path = as_numpy1_pickle(save_released_style(model.state_dict(), tmp_path / "tumor.model"))
    assert b"numpy.core.multiarray" in path.read_bytes()
    loaded = load_original_checkpoint(path)
    assert loaded.config.name == "unetrpp_tumor"


def test_a_model_card_is_utf8_whatever_the_locale(non_utf8_locale, tmp_path):
    """A trained model's card names its data folder: in the locale's encoding (a Windows PC's cp1252; ASCII here)
    a folder such as C:\\Users\\Łukasz\\BTCV ended a finished training run with "can't encode character"."""
    non_utf8_locale("from unetrpp import create_model\n"
                    "from unetrpp.pretrained import save_for_inference\n"
                    "save_for_inference(create_model('unetrpp_tiny'), 'model', card='Data: C:/Users/\\u0141ukasz/BTCV')\n")
    assert "Data: C:/Users/Łukasz/BTCV" in (tmp_path / "model" / "README.md").read_text(encoding="utf-8")



def test_a_card_given_to_save_for_inference_keeps_the_metadata_of_save_pretrained(tmp_path):
    """save_for_inference (train's RUN_DIR/model, convert) wrote metadata of its own under the card it was given,
    without the synthetic-data tag that save_pretrained and push_to_hub give SYNTHETIC weights: a phantom-trained
    model folder uploaded to the Hub was listed as if it were real weights."""
    from unetrpp.pretrained import save_for_inference

    for synthetic in (True, False):
        model = create_model("unetrpp_tiny", synthetic=synthetic)
        folder = save_for_inference(model, tmp_path / str(synthetic), card="# my card\n\nmy text")
        text = (folder / "README.md").read_text(encoding="utf-8")
        assert text.startswith("---\n") and "library_name: unetrpp" in text and "- medical-imaging" in text, text
        assert text.rstrip().endswith("# my card\n\nmy text") and "UNETR++ weights" not in text, text
        assert ("- synthetic-data" in text) is synthetic, text

def _hub_answers(monkeypatch, tmp_path, error):
    """huggingface_hub as it is when the Hub answers `error()` to every request (no network needed): a cache
    in tmp_path, not offline, the Hub's name resolving."""
    import huggingface_hub.file_download as file_download
    from huggingface_hub import constants

    def answer(*args, **kwargs):
        raise error()

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(file_download, "get_hf_file_metadata", answer)
    monkeypatch.setattr("unetrpp.hub._hub_unreachable", lambda: None)


def _hub_error(kind, status=None, message="Client Error"):
    """An error as huggingface_hub raises it: one of its own classes with the Hub's answer, or one of its HTTP
    client's (httpx2, huggingface_hub 2's; older ones use other clients, whose cases skip)."""
    def make():
        from huggingface_hub import errors

        httpx2 = pytest.importorskip("httpx2")
        if status is None:
            return getattr(httpx2, kind)(message)
        request = httpx2.Request("HEAD", "https://huggingface.co/someone/unetrpp/resolve/main/config.json")
        return getattr(errors, kind)(f"{status} {message}", response=httpx2.Response(status, request=request))
    return make


@pytest.mark.parametrize("error, said", [
    (_hub_error("RepositoryNotFoundError", 401), r"\(no such repo, or a private one\); check the id .*`hf auth login`"),
    (_hub_error("GatedRepoError", 403), r"\(a gated repo\); accept its conditions at https://huggingface.co/someone/"
                                        r"unetrpp, then log in with `hf auth login`"),
    (_hub_error("RemoteEntryNotFoundError", 404), r"\(the repo has no config\.json\); UNETR\+\+ weights repos hold"),
    (_hub_error("HfHubHTTPError", 429), r"\(too many requests \(429\)\); wait a few minutes"),
    (_hub_error("HfHubHTTPError", 503), r"\(the Hub answered 503\); try again later"),
    (_hub_error("ConnectTimeout", message="timed out"), r"\(the Hub could not be reached \(ConnectTimeout: timed "
                                                        r"out\) and it is not in the local cache\); check"),
    (_hub_error("ProxyError", message="407 Proxy Authentication Required"),
     r"\(the Hub could not be reached \(ProxyError: 407 .*any proxy \(HTTPS_PROXY\)"),
])
def test_each_answer_of_the_hub_says_what_to_do(tmp_path, monkeypatch, error, said):
    """A mistyped, private or gated repo id was answered "someone/unetrpp: no config.json ... make one with
    `python -m unetrpp convert`" (huggingface_hub's loader logs and drops the Hub's answer for config.json), a
    refusal or lost connection with a class name ("(LocalEntryNotFoundError)"), a proxy's with a traceback."""
    _hub_answers(monkeypatch, tmp_path, error)
    with pytest.raises(ValueError, match="could not get weights 'someone/unetrpp' from the Hugging Face Hub " + said) \
            as info:
        load_pretrained("someone/unetrpp")
    assert "\n" not in str(info.value) and "unetrpp convert" not in str(info.value)
    assert not any((tmp_path / "hub").rglob("*.json")) and not any((tmp_path / "hub").rglob("*.safetensors"))


def test_from_pretrained_raises_the_hubs_own_error_for_a_repo_it_cannot_read(tmp_path, monkeypatch):
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    for kind, status, raised in (("RepositoryNotFoundError", 401, RepositoryNotFoundError),
                                 ("GatedRepoError", 403, GatedRepoError)):
        _hub_answers(monkeypatch, tmp_path, _hub_error(kind, status))
        with pytest.raises(raised):  # not ValueError "someone/unetrpp: no config.json"
            UNETRPP.from_pretrained("someone/unetrpp")
    _hub_answers(monkeypatch, tmp_path, _hub_error("RemoteEntryNotFoundError", 404))
    with pytest.raises(ValueError, match="someone/unetrpp: no config.json"):  # the repo exists and lacks it
        UNETRPP.from_pretrained("someone/unetrpp")


def test_a_cached_repo_cut_short_or_damaged_is_one_line(tmp_path, tiny, monkeypatch):
    """A download that stopped after config.json was "not in the local cache"; a cut model.safetensors in the cache
    ended in safetensors' SafetensorError traceback, a config.json of another library named no file."""
    from huggingface_hub import constants

    tiny.save_pretrained(tmp_path / "src")
    files = {f: (tmp_path / "src" / f).read_bytes() for f in ("config.json", "model.safetensors")}
    for repo, content in (("partial", {"config.json": files["config.json"]}),
                          ("cut", {**files, "model.safetensors": files["model.safetensors"][:5000]}),
                          ("bert", {**files, "config.json": b'{"architectures": ["BertModel"]}'})):
        commit = hashlib.sha1(repo.encode()).hexdigest()
        folder = tmp_path / "hub" / f"models--someone--{repo}"
        (folder / "snapshots" / commit).mkdir(parents=True)
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(commit)
        for name, data in content.items():
            (folder / "snapshots" / commit / name).write_bytes(data)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=r"'someone/partial' .*its model.safetensors is not in the local cache, though "
                                         r"its config.json is \(a download that did not finish\)"):
        load_pretrained("someone/partial")
    with pytest.raises(ValueError, match=r"weights 'someone/cut' from the Hugging Face Hub: .*model.safetensors: "
                                         r"unreadable"):
        load_pretrained("someone/cut")
    with pytest.raises(ValueError, match=r"weights 'someone/bert' from the Hugging Face Hub: .*config.json: not a "
                                         r"UNETR\+\+ config \(unknown UNETR\+\+ config keys \['architectures'\]"):
        load_pretrained("someone/bert")


def test_push_to_hub_sends_a_card_that_says_synthetic_weights_are_synthetic(tmp_path, monkeypatch):
    """save_pretrained and push_to_hub wrote the Hub's blank template ("Paper: [More Information Needed]"): a
    Hub page of the teaching weights would not have said they were trained on phantoms."""
    from pathlib import Path

    from huggingface_hub import HfApi

    sent = {}

    def upload_folder(self, *, folder_path, repo_id, **kwargs):  # what would go to the Hub
        sent.update({f.name: f.read_bytes() for f in Path(folder_path).iterdir()})

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: type("Repo", (), {"repo_id": repo_id}))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    create_model("unetrpp_tiny", synthetic=True).push_to_hub("someone/teaching")
    assert sorted(sent) == ["README.md", "config.json", "model.safetensors"]
    card = sent["README.md"].decode("utf-8")
    assert "- synthetic-data" in card and "**SYNTHETIC teaching weights**: trained only on synthetic phantoms" in card
    assert "arXiv 2212.04497" in card and "Not a medical device." in card and "More Information Needed" not in card
    assert "library_name: unetrpp" in card and "python -m unetrpp predict" in card
    create_model("unetrpp_tiny").save_pretrained(tmp_path / "real")
    card = (tmp_path / "real" / "README.md").read_text(encoding="utf-8")
    assert "SYNTHETIC" not in card and "synthetic-data" not in card and "arXiv 2212.04497" in card



def test_convert_from_python_names_the_valid_preprocessing_keys_before_reading_the_checkpoint(tmp_path, monkeypatch):
    """convert_original(path, out, spcing=...) read the checkpoint (seconds for the large ones), then stopped with
    Python's "Preprocessing.__init__() got an unexpected keyword argument", which names no valid key."""
    from unetrpp import pretrained

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was read")

    monkeypatch.setattr(pretrained, "load_original_checkpoint", never)
    for name in (None, "unetrpp_synapse"):
        with pytest.raises(ValueError, match=r"unknown preprocessing keys \['spcing'\]; valid keys: \[.*'spacing'"):
            pretrained.convert_original(tmp_path / "t.model", tmp_path / "out", name=name, spcing=(1, 1, 1))
    assert not (tmp_path / "out").exists()

def test_convert_from_python_never_replaces_anothers_folder(tmp_path):
    """`python -m unetrpp convert` refused a folder that is not empty, convert_original wrote over it: the
    config.json and README.md of other weights were replaced by the converted ones'."""
    from unetrpp.pretrained import convert_original

    ckpt = save_released_style(create_model("unetrpp_tumor", deep_supervision=True).state_dict(), tmp_path / "t.model")
    other = tmp_path / "other"
    other.mkdir()
    (other / "README.md").write_text("my notes")
    with pytest.raises(ValueError, match=r"other exists and is not empty; choose a new --out folder or remove it"):
        convert_original(ckpt, other)
    assert sorted(p.name for p in other.iterdir()) == ["README.md"] and (other / "README.md").read_text() == "my notes"
    assert (convert_original(ckpt, tmp_path / "new") / "config.json").is_file()


def test_a_repo_id_whose_owner_is_a_folder_here_says_it_was_read_as_a_path(tmp_path, monkeypatch):
    """With a folder `someone/` in the working folder, `--weights someone/unetrpp` was "no such folder or file;
    make a weights folder ... --out someone/unetrpp", with no word of the Hub repo the user meant."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "someone").mkdir()
    with pytest.raises(ValueError, match=r"no such folder or file; .*read as a path since the folder someone exists "
                                         r"here: for the Hugging Face repo someone/unetrpp, run from another folder"):
        load_pretrained("someone/unetrpp")
    (tmp_path / "weights").mkdir()  # weights/unetrpp_synapse before conversion: a path, as before
    with pytest.raises(ValueError, match=r"--out weights/unetrpp_synapse`, or give one of the local weights") as info:
        load_pretrained("weights/unetrpp_synapse")
    assert "read as a path" not in str(info.value)


def test_a_synapse_checkpoint_whose_e_and_f_differ_is_refused(tmp_path):
    """The synapse network has one projection for keys and values: loading a file whose E and F differ would
    keep F for both without a word."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in create_model("unetrpp_synapse", deep_supervision=True).state_dict().items()}
    sd = {k: torch.zeros(()).expand(shape) for k, shape in shapes.items()}  # a few bytes on disk
    key = "unetr_pp_encoder.stages.1.0.epa_block.F.weight"
    sd[key] = torch.ones(()).expand(shapes[key])
    path = save_released_style(sd, tmp_path / "model_final_checkpoint.model")
    with pytest.raises(ValueError, match=r"stages\.1\.0\.epa_block\.E\.weight differs from its F twin, but unetrpp_synapse"):
        load_original_checkpoint(path, "unetrpp_synapse")
