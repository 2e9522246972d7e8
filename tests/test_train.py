"""Training on tiny SYNTHETIC phantoms: the loss falls, Ctrl-C + resume reproduces an uninterrupted
run, deep supervision, the saved inference model, and two-process gloo DDP under torchrun."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unetrpp.data.phantom import write_phantom_dataset
from unetrpp.model import UNETRPP
from unetrpp.pretrained import load_pretrained
from unetrpp.train import TrainOptions, build_config, deep_supervision_loss, poly_lr, train, training_split, validate
from unetrpp.train_data import prepare_cases

# A very small network and grid so a step takes a fraction of a second on one core.
TINY = {"patch_size": [16, 32, 32], "preprocessing": {"spacing": [10.0, 6.0, 6.0]}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("ph") / "data", cases=3, seed=11, size="small")


def options(data, out, **kw) -> TrainOptions:
    base = {"data": str(data), "out": str(out), "config_overrides": TINY, "batch_size": 2, "lr": 3e-3,
            "warmup_steps": 1, "val_cases": 1, "val_every": 1000, "log_every": 1, "checkpoint_every": 1000,
            "samples_per_case": 4, "progress": False}
    base.update(kw)
    return TrainOptions(**base)


def test_loss_falls_and_inference_model_is_saved(phantoms, tmp_path):
    seen = []
    result = train(options(phantoms, tmp_path / "run", max_steps=16, val_every=16), on_step=seen.append)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert len(losses) == 16 and seen == result.history
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1
    assert "val_mean_dice" in result.history[-1] and set(result.history[-1]["val_dice"]) >= {"liver", "spleen"}
    run = tmp_path / "run"
    assert (run / "training_curve.png").stat().st_size > 1000
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.history
    model = UNETRPP.from_pretrained(str(result.model_dir))
    assert model.config.deep_supervision is False and tuple(model.config.patch_size) == (16, 32, 32)
    assert model.config.preprocessing.spacing == (10.0, 6.0, 6.0)  # the override is recorded,
    assert model.config.preprocessing.orientation == "RAS"  # merged into the preset's preprocessing
    assert model.config.synthetic is True  # trained on phantoms, and the weights say so
    card = (result.model_dir / "README.md").read_text()
    assert "SYNTHETIC phantoms" in card and "16 steps" in card and "More Information Needed" not in card
    held_out = [c.name for c in training_split(options(phantoms, run))[1]]
    assert f"Validation cases (held out; score the weights on these): {', '.join(held_out)}." in card
    model.eval()
    assert model(torch.zeros(1, 1, 16, 32, 32)).shape == (1, 14, 16, 32, 32)


def test_training_split_names_the_held_out_cases_again(phantoms, tmp_path):
    train_cases, val_cases = training_split(options(phantoms, tmp_path, val_cases=1, seed=5))
    assert len(val_cases) == 1 and len(train_cases) == 2
    assert not {c.name for c in val_cases} & {c.name for c in train_cases}
    assert training_split(options(phantoms, tmp_path, val_cases=1, seed=5))[1] == val_cases  # the same every time


def test_interrupt_then_resume_matches_an_uninterrupted_run(phantoms, tmp_path):
    train(options(phantoms, tmp_path / "a", max_steps=6))

    def stop_at_3(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(options(phantoms, tmp_path / "b", max_steps=6), on_step=stop_at_3)
    state = torch.load(tmp_path / "b/checkpoint.pt", weights_only=True)
    assert state["step"] == 3
    assert int(state["optimizer"]["state"][0]["step"]) == 3  # AdamW's own step count
    resumed = train(options(phantoms, tmp_path / "b", max_steps=6, resume=True))
    assert resumed.step == 6
    assert [h["step"] for h in resumed.history if "loss" in h] == [1, 2, 3, 4, 5, 6]
    a = torch.load(tmp_path / "a/checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b/checkpoint.pt", weights_only=True)
    assert int(b["optimizer"]["state"][0]["step"]) == 6
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_a_bare_resume_keeps_the_runs_own_max_steps(phantoms, tmp_path):
    """`train --max-steps 2400`, Ctrl-C, then `train --resume` without --max-steps went on to the default
    1000 steps, on a learning-rate schedule for 1000 from then on: the run did not continue as it was."""
    from unetrpp.cli import build_parser

    def stop_at_2(record):
        if record["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(options(phantoms, tmp_path / "run", max_steps=3), on_step=stop_at_2)

    def past_the_end(record):
        assert record["step"] <= 3, "the resumed run went past the run's own max_steps"

    resumed = train(options(phantoms, tmp_path / "run", resume=True), on_step=past_the_end)  # max_steps not given
    assert resumed.step == 3 and json.loads((tmp_path / "run/options.json").read_text())["max_steps"] == 3
    argv = ["train", "--data", "d", "--out", "o", "--resume"]
    assert build_parser(argv).parse_args(argv).max_steps is None  # the command line leaves it to the run


def test_writing_an_interrupted_runs_weights_keeps_its_max_steps(phantoms, tmp_path):
    """`--weights RUN` says to write an interrupted run's model/ with `--resume --max-steps 1`, "or resume it
    to its end". That resume saved max_steps=1 as the run's own, so a bare --resume afterwards trained nothing."""
    def stop_at_2(record):
        if record["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(options(phantoms, tmp_path / "run", max_steps=3), on_step=stop_at_2)
    written = train(options(phantoms, tmp_path / "run", resume=True, max_steps=1))  # what the hint says
    assert written.step == 2 and (tmp_path / "run/model/config.json").is_file()
    assert json.loads((tmp_path / "run/options.json").read_text())["max_steps"] == 3
    assert torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["options"]["max_steps"] == 3
    assert train(options(phantoms, tmp_path / "run", resume=True)).step == 3  # then on to the run's end


def test_the_originals_sgd_trains_with_nesterov_momentum(phantoms, tmp_path):
    result = train(options(phantoms, tmp_path / "run", max_steps=2, optimizer="sgd", lr=1e-2))
    state = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["optimizer"]
    group = state["param_groups"][0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.99, True, 1e-4)
    assert all("momentum_buffer" in s for s in state["state"].values()) and result.step == 2


def test_resume_without_checkpoint_is_an_error(phantoms, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(options(phantoms, tmp_path / "none", max_steps=2, resume=True))


def test_a_run_is_never_overwritten_and_resume_keeps_its_options(phantoms, tmp_path, caplog):
    train(options(phantoms, tmp_path / "run", max_steps=2))
    before = (tmp_path / "run/checkpoint.pt").read_bytes(), (tmp_path / "run/metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a training run; add --resume"):
        train(options(phantoms, tmp_path / "run", max_steps=1))
    assert ((tmp_path / "run/checkpoint.pt").read_bytes(), (tmp_path / "run/metrics.jsonl").read_text()) == before
    resumed = train(options(phantoms, tmp_path / "run", max_steps=3, resume=True, lr=0.5))
    assert resumed.step == 3 and "lr=0.5 (the run has 0.003)" in caplog.text
    assert json.loads((tmp_path / "run/options.json").read_text())["lr"] == 3e-3
    caplog.clear()  # an option left at its default was not asked for; a run already past max_steps says so
    again = train(options(phantoms, tmp_path / "run", max_steps=2, resume=True, val_every=200))
    assert again.step == 3 and "already at step 3, not below max_steps=2: nothing to train" in caplog.text
    assert "val_every" not in caplog.text


def test_a_new_run_overwrites_no_file_it_did_not_write(phantoms, tmp_path):
    """A folder holding a run's file names that this package did not write is refused untouched; other
    files may sit beside a run."""
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    mine = {"options.json": "my notes", "training_curve.png": "my plot", "model/model.safetensors": "my weights"}
    for name, text in mine.items():
        (out / name).write_text(text)
    with pytest.raises(ValueError, match="already holds options.json, training_curve.png, model, which a new run"):
        train(options(phantoms, out, max_steps=1))
    assert {name: (out / name).read_text() for name in mine} == mine
    beside = tmp_path / "shared"
    beside.mkdir()
    (beside / "notes.txt").write_text("keep me")
    assert train(options(phantoms, beside, max_steps=1)).step == 1
    assert (beside / "notes.txt").read_text() == "keep me"


def test_a_run_that_failed_before_its_first_checkpoint_starts_again(phantoms, tmp_path):
    def fail_at_1(record):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        train(options(phantoms, tmp_path / "run", max_steps=3), on_step=fail_at_1)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl", "options.json"]
    with pytest.raises(FileNotFoundError, match="stopped before its first checkpoint: run the same command without"):
        train(options(phantoms, tmp_path / "run", max_steps=3, resume=True))
    again = train(options(phantoms, tmp_path / "run", max_steps=3))
    assert [h["step"] for h in again.history if "loss" in h] == [1, 2, 3]


def test_a_resumed_run_keeps_its_precision_unless_given_another(phantoms, tmp_path):
    def stop_at_1(record):
        if record["step"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(options(phantoms, tmp_path / "run", max_steps=3, precision="fp32"), on_step=stop_at_1)
    assert train(options(phantoms, tmp_path / "run", max_steps=2, resume=True)).step == 2  # precision not given
    assert json.loads((tmp_path / "run/options.json").read_text())["precision"] == "fp32"
    assert train(options(phantoms, tmp_path / "run", max_steps=3, resume=True, precision="auto")).step == 3
    assert torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["options"]["precision"] == "auto"
    assert json.loads((tmp_path / "run/options.json").read_text())["precision"] == "auto"
    assert train(options(phantoms, tmp_path / "new", max_steps=1)).step == 1  # a new run: "auto"
    assert json.loads((tmp_path / "new/options.json").read_text())["precision"] == "auto"


def test_a_run_from_before_an_option_that_failed_before_its_first_checkpoint_starts_again(phantoms, tmp_path):
    """Its options.json lacks the option added since (precision): it is still this package's, not the user's."""
    def fail_at_1(record):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        train(options(phantoms, tmp_path / "run", max_steps=2), on_step=fail_at_1)
    saved = json.loads((tmp_path / "run/options.json").read_text())
    del saved["precision"]
    (tmp_path / "run/options.json").write_text(json.dumps(saved))
    assert train(options(phantoms, tmp_path / "run", max_steps=2)).step == 2


def test_a_damaged_checkpoint_is_one_line(phantoms, tmp_path):
    train(options(phantoms, tmp_path / "run", max_steps=1))
    good = (tmp_path / "run/checkpoint.pt").read_bytes()
    for damaged, words in ((good[:1000], "not a readable training checkpoint"), (b"", "not a readable training"),
                           (None, "not a training checkpoint of")):
        if damaged is None:
            torch.save({"weights": torch.zeros(1)}, tmp_path / "run/checkpoint.pt")
        else:
            (tmp_path / "run/checkpoint.pt").write_bytes(damaged)
        with pytest.raises(ValueError, match=words) as info:
            train(options(phantoms, tmp_path / "run", max_steps=2, resume=True))
        assert "\n" not in str(info.value) and "restore it from a copy" in str(info.value)
    (tmp_path / "run/checkpoint.pt").write_bytes(good)
    (tmp_path / "run/rng_rank0.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="rng_rank0.pt: not a readable random-state file"):
        train(options(phantoms, tmp_path / "run", max_steps=2, resume=True))


def test_the_losses_logged_after_a_resume_are_those_of_an_uninterrupted_run(phantoms, tmp_path):
    """Logged every 2 steps, checkpoint at step 3, a crash at 4: the resumed run's step-4 record
    averages steps 3 and 4 as the uninterrupted one does."""
    every = dict(max_steps=6, log_every=2, checkpoint_every=3)
    whole = train(options(phantoms, tmp_path / "a", **every))

    def crash_at_4(record):
        if record["step"] == 4:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        train(options(phantoms, tmp_path / "b", **every), on_step=crash_at_4)
    resumed = train(options(phantoms, tmp_path / "b", **every, resume=True))
    losses = lambda run: [(h["step"], h["loss"]) for h in run.history if "loss" in h]
    assert [s for s, _ in losses(resumed)] == [2, 4, 6]
    for (_, a), (_, b) in zip(losses(whole), losses(resumed)):
        assert b == pytest.approx(a, rel=1e-4)


def test_data_labelled_with_other_classes_is_refused_before_training(phantoms, tmp_path, monkeypatch):
    import shutil

    data = shutil.copytree(phantoms, tmp_path / "liver_tumour")
    spec = json.loads((data / "dataset.json").read_text())
    spec["labels"] = {"0": "background", "1": "liver", "2": "tumour"}
    (data / "dataset.json").write_text(json.dumps(spec))
    monkeypatch.setattr("unetrpp.train.prepare_cases", lambda *a: pytest.fail("the data was prepared first"))
    with pytest.raises(ValueError, match="names 3 classes .* but the model has 14 .*--set out_channels=3"):
        train(options(data, tmp_path / "run", max_steps=1))
    assert not (tmp_path / "run").exists()


def test_an_unusable_run_folder_is_refused_before_the_data_is_prepared(phantoms, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.setattr("unetrpp.train.prepare_cases", lambda *a: pytest.fail("the data was prepared first"))
    with pytest.raises(ValueError, match=r"--out .*afile/run: .*afile is a file, not a folder"):
        train(options(phantoms, tmp_path / "afile" / "run", max_steps=2))


@pytest.mark.parametrize("change, words", [({"grad_clip": -1.0}, "grad_clip=-1.0: must be a positive"),
                                           ({"lr": 1e39}, "lr=1e[+]?39: must be a positive number"),  # beyond float32
                                           ({"lr": 0.0}, "lr=0.0: must be a positive number"),
                                           ({"flip_prob": 2.0}, "flip_prob=2.0"),
                                           ({"batch_size": 1}, "too few for batch norm"),
                                           ({"batch_size": 64}, "an epoch holds only 8 training patches"),
                                           ({"val_cases": 1.5}, "val_cases=1.5: a count"),
                                           ({"precision": "fp16"}, "precision='fp16': must be one of auto, fp32, bf16"),
                                           # oneDNN's bfloat16 Conv3d gave NaN weight gradients on 2x2x2 grids
                                           ({"precision": "bf16", "device": "cpu"},
                                            "precision='bf16' on cpu: bfloat16 training runs on CUDA only"),
                                           # one image per case: a 4-channel network failed at its first step
                                           ({"config_overrides": {**TINY, "in_channels": 2}},
                                            "in_channels=2 image channels, but training reads one image")])
def test_options_that_would_wreck_training_are_refused(phantoms, tmp_path, change, words):
    with pytest.raises(ValueError, match=words):
        train(options(phantoms, tmp_path / "run", max_steps=2, **change))
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="POSIX signals")
def test_ctrl_c_stops_after_the_step_with_a_whole_checkpoint(phantoms, tmp_path):
    def press_ctrl_c_at_2(record):
        if record.get("step") == 2 and "loss" in record:
            os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the loop's bookkeeping

    with pytest.raises(KeyboardInterrupt):
        train(options(phantoms, tmp_path / "run", max_steps=6, val_every=2), on_step=press_ctrl_c_at_2)
    state = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and int(state["optimizer"]["state"][0]["step"]) == 2
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_mean_dice" in r] == [2]  # the step was finished, then it stopped
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back


def test_set_name_is_answered_with_the_option_that_chooses_the_network():
    """`--set name=foo` failed with "get_config() got multiple values for argument 'name'"."""
    with pytest.raises(ValueError, match=r"--set name='foo': the network is chosen with --name \(valid names: "
                                         r"unetrpp_synapse, .*unetrpp_tiny\)"):
        build_config("unetrpp_tiny", {"name": "foo"})


def test_deep_supervision_weights_and_poly_schedule():
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    perfect = torch.full((1, 2, 8, 8, 8), -20.0)
    perfect[:, 0] = 20.0
    calls = []

    def loss_fn(out, target):
        calls.append((tuple(out.shape[2:]), tuple(target.shape[2:])))
        return out.new_tensor(float(len(calls)))

    total = deep_supervision_loss([perfect, perfect[..., ::2, ::2, ::2], perfect[..., ::4, ::4, ::4]], label, loss_fn)
    assert calls == [((8, 8, 8), (8, 8, 8)), ((4, 4, 4), (4, 4, 4)), ((2, 2, 2), (2, 2, 2))]
    assert float(total) == pytest.approx(4 / 7 * 1 + 2 / 7 * 2 + 1 / 7 * 3)
    assert poly_lr(0, 100, 10) == pytest.approx(0.1) and poly_lr(10, 100, 10) == pytest.approx(0.9**0.9)
    assert poly_lr(100, 100, 0) == 0.0


def test_deep_supervision_labels_are_subsampled_not_interpolated():
    """The coarser outputs are scored against the label map subsampled (nearest): interpolating label ids
    would put organ 2 between organs 1 and 3, and fractions where the one-hot encoding expects classes."""
    label = torch.from_numpy(np.random.default_rng(0).integers(0, 14, size=(1, 1, 8, 8, 8)))
    outputs = [torch.zeros(1, 14, *(8 // f,) * 3) for f in (1, 2, 4)]
    targets = []
    deep_supervision_loss(outputs, label, lambda out, target: targets.append(target) or out.sum())
    assert torch.equal(targets[0], label)
    for target, f in zip(targets[1:], (2, 4)):
        torch.testing.assert_close(target, label[..., ::f, ::f, ::f].to(target.dtype), rtol=0, atol=0)


def test_torchrun_two_gloo_processes(phantoms, tmp_path):
    path = [str(Path(__file__).resolve().parents[1])] + os.environ.get("PYTHONPATH", "").split(os.pathsep)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, path)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "unetrpp", "train", "--data", str(phantoms), "--out", str(tmp_path / "ddp"), "--device", "cpu",
           "--max-steps", "3", "--batch-size", "2", "--log-every", "1", "--val-every", "3", "--val-cases", "2",
           "--samples-per-case", "4", "--patch-size", "16", "32", "32", "--spacing", "10", "6", "6",
           "--threads", "1", "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3]  # rank 0 alone writes
    assert sum("val_mean_dice" in x for x in lines) == 1
    # validation shared out, one case per rank, and the Dice one process gives the saved model on both cases
    # (a case lost or counted twice is off by 50 %; rank 1 scoring with its own batch-norm statistics, by a
    # few voxels)
    assert "rank 0 validated 1 case(s)" in done.stderr and "rank 1 validated 1 case(s)" in done.stderr
    run_options = TrainOptions(**json.loads((tmp_path / "ddp/options.json").read_text()))
    final = load_pretrained(tmp_path / "ddp/model")
    single = validate(final, prepare_cases(training_split(run_options)[1], final.config), torch.device("cpu"),
                      final.config.class_names)
    recorded = next(x for x in lines if "val_dice" in x)["val_dice"]
    assert recorded == pytest.approx(single, rel=1e-9, abs=1e-12)
    assert "rank 1 of 2" in done.stderr and (tmp_path / "ddp/model/model.safetensors").is_file()
    for rank in (0, 1):  # each rank's own random state, for a resume that continues exactly
        assert torch.load(tmp_path / f"ddp/rng_rank{rank}.pt", weights_only=True)["step"] == 3


def _agree(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: the mean of rank + 1 over the ranks, and whether rank 1 asks to stop."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    from unetrpp.train_utils import DistributedContext

    ctx = DistributedContext.from_env("cpu")
    Path(out, f"rank{rank}.json").write_text(json.dumps([ctx.mean(rank + 1.0), ctx.any(rank == 1), ctx.any(False)]))
    ctx.close()


def test_ranks_agree_on_the_logged_loss_and_on_stopping(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_agree, args=(port, str(tmp_path)), nprocs=2)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [[1.5, True, False]] * 2


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_a_and_interrupt_and_resume_b(rank: int, ports: tuple[int, int], data: str, out: str) -> None:
    """One of two gloo ranks: run a uninterrupted; run b stopped by Ctrl-C on rank 0 after step 3, then resumed."""
    torch.set_num_threads(1)
    every = dict(max_steps=6, log_every=2, val_every=3)

    def join(port: int) -> None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                          LOCAL_RANK=str(rank))

    def ctrl_c_at_3(record):  # called on rank 0 alone: the ranks agree to stop after the step
        if record["step"] == 3 and "val_mean_dice" in record:
            os.kill(os.getpid(), signal.SIGINT)

    join(ports[0])
    train(options(data, Path(out, "a"), **every))
    join(ports[1])
    with pytest.raises(KeyboardInterrupt):
        train(options(data, Path(out, "b"), **every), on_step=ctrl_c_at_3)
    torch.distributed.barrier()  # rank 0 has written the checkpoint (a relaunch under torchrun comes later still)
    train(options(data, Path(out, "b"), resume=True, **every))  # in the process group the interrupted run joined


def test_a_run_interrupted_under_ddp_resumes_as_if_uninterrupted(phantoms, tmp_path):
    """Logged every 2 steps, stopped after step 3: the checkpoint kept rank 0's step-3 loss for every rank, so
    the resumed run's step-4 record averaged rank 0's step-3 loss in twice, not each rank's own."""
    torch.multiprocessing.spawn(_train_a_and_interrupt_and_resume_b, nprocs=2,
                                args=((_free_port(), _free_port()), str(phantoms), str(tmp_path)))
    assert torch.load(tmp_path / "b/rng_rank1.pt", weights_only=True)["step"] == 6
    losses = {run: [(h["step"], h["loss"]) for h in map(json.loads, (tmp_path / run / "metrics.jsonl").open())
                    if "loss" in h] for run in "ab"}
    assert [s for s, _ in losses["b"]] == [2, 4, 6]
    assert [loss for _, loss in losses["b"]] == pytest.approx([loss for _, loss in losses["a"]], rel=1e-6)
    a, b = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["model"] for run in "ab")
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_cuda_ranks_of_a_torch_without_nccl_join_over_gloo(monkeypatch):
    """Windows builds of torch have no NCCL: torchrun training on a PC with two GPUs failed on every rank with
    "Distributed package doesn't have NCCL built in". Simulated: CUDA present, NCCL absent."""
    from unetrpp.train_utils import DistributedContext

    joined = {}
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kwargs: joined.update(backend=backend))
    ctx = DistributedContext.from_env("cuda")
    assert joined == {"backend": "gloo"} and ctx.device == torch.device("cuda", 1)


@pytest.mark.skipif(os.name != "posix", reason="POSIX process groups and signals")
def test_ctrl_c_under_torchrun_leaves_a_checkpoint_of_one_step_on_every_rank(phantoms, tmp_path):
    """Ctrl-C in a terminal signals torchrun and both ranks (one process group); the launcher then signals
    the ranks again. Both stop after the same step: the checkpoint and each rank's random state agree."""
    import time

    path = [str(Path(__file__).resolve().parents[1])] + os.environ.get("PYTHONPATH", "").split(os.pathsep)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, path)))
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "unetrpp", "train", "--data", str(phantoms), "--out", str(run), "--device", "cpu",
           "--max-steps", "500", "--batch-size", "2", "--log-every", "1", "--val-every", "1000", "--val-cases", "1",
           "--samples-per-case", "4", "--patch-size", "16", "32", "32", "--spacing", "10", "6", "6",
           "--threads", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("loss") >= 2):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert 2 <= state["step"] < 500, err[-3000:]
    assert [torch.load(run / f"rng_rank{r}.pt", weights_only=True)["step"] for r in (0, 1)] == [state["step"]] * 2
    assert "checkpoint saved, continue with --resume" in err


def test_shipped_teaching_weights_reach_the_acceptance_dice_on_unseen_phantoms(tmp_path):
    """weights/unetrpp_tiny_phantom on default-size phantoms from a seed never used in training or in
    the model card: the mean Dice over the 13 organs must reach 0.80 (issue acceptance)."""
    from unetrpp import io
    from unetrpp.evaluate import evaluate_case, mean_metrics
    from unetrpp.inference import segment
    from unetrpp.pretrained import load_pretrained

    data = write_phantom_dataset(tmp_path / "unseen", cases=2, seed=2001, size="default")
    model = load_pretrained("unetrpp_tiny_phantom")
    per_case = {}
    for i in (1, 2):
        result = segment(str(data / f"imagesTr/img000{i}.nii.gz"), model=model, device="cpu")
        truth = io.load(data / f"labelsTr/label000{i}.nii.gz", dtype=None)
        per_case[str(i)] = evaluate_case(result.mask, truth.array.astype(int), truth.spacing, with_hd95=False)
    summary = mean_metrics(per_case)
    assert summary["mean"]["dice"] >= 0.80, summary
    assert min(v["dice"] for k, v in summary.items() if k != "mean") > 0.5, summary


def _poisoned_dataset(poisoned, batch_size: int = 2):
    """A PatchDataset whose patches are all NaN at the (1-based) steps where `poisoned(step)` holds, as a scan
    with NaN voxels gives: the loss, every gradient and batch norm's running statistics turn NaN."""
    from unetrpp.train_data import PatchDataset

    served = [0]

    class Poisoned(PatchDataset):
        def __getitem__(self, index):
            image, label = super().__getitem__(index)
            served[0] += 1
            step = (served[0] - 1) // batch_size + 1  # counted from the start of this train() call
            return (torch.full_like(image, float("nan")) if poisoned(step) else image), label

    return Poisoned


def _all_finite(tensors) -> bool:
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def test_a_step_with_a_nan_loss_is_skipped_and_training_goes_on(phantoms, tmp_path, monkeypatch, caplog):
    """One NaN batch at step 3 (fp32, no loss scaling) made every weight NaN for the rest of the run, and the
    NaN weights were saved in the checkpoint and model/."""
    monkeypatch.setattr("unetrpp.train.PatchDataset", _poisoned_dataset(lambda step: step == 3))
    result = train(options(phantoms, tmp_path / "run", max_steps=5, val_every=5, precision="fp32"))
    assert result.step == 5
    losses = [h for h in result.history if "loss" in h]
    assert [h["skipped"] for h in losses] == [0, 0, 1, 0, 0]
    assert np.isnan(losses[2]["loss"]) and np.isfinite([h["loss"] for h in losses if not h["skipped"]]).all()
    assert [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()] == [
        "step 3 skipped: loss nan, gradient norm nan, not finite; the weights were not updated (1 in a row, the run "
        "stops at 20)"]
    state = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)
    assert _all_finite(state["model"].values())  # batch norm's running statistics too: put back
    assert int(state["optimizer"]["state"][0]["step"]) == 4  # one step of five not taken; the schedule went on
    assert state["scheduler"]["last_epoch"] == 5
    assert _all_finite(load_pretrained(result.model_dir).state_dict().values())
    assert np.isfinite(result.history[-1]["val_mean_dice"])


def test_a_run_that_diverges_stops_and_keeps_its_last_checkpoint(phantoms, tmp_path, monkeypatch, capsys):
    """Every step NaN from the resume on: the run stops after MAX_SKIPPED_IN_A_ROW with a one-line error and
    exit status 2, the checkpoint (due again at step 4, a skipped step) and model/ byte for byte as they were."""
    from unetrpp.cli import main

    run = tmp_path / "run"
    train(options(phantoms, run, max_steps=2, checkpoint_every=2))
    kept = {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()
            and p.name not in ("metrics.jsonl", "options.json", "training_curve.png")}
    assert Path("checkpoint.pt") in kept and Path("model/model.safetensors") in kept
    monkeypatch.setattr("unetrpp.train.MAX_SKIPPED_IN_A_ROW", 3)
    monkeypatch.setattr("unetrpp.train.PatchDataset", _poisoned_dataset(lambda step: True))
    status = main(["train", "--data", str(phantoms), "--out", str(run), "--resume", "--max-steps", "30",
                   "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2
    said = next(line for line in err.splitlines() if line.startswith("error: "))
    assert said == (f"error: step 5: 3 steps in a row had a non-finite loss or gradient norm and were skipped (last: "
                    f"loss nan, gradient norm nan), so the run has diverged and stops without saving anything "
                    f"non-finite ({run / 'checkpoint.pt'} of step 2 is kept as it was); start a new run (another "
                    f"--out) with a lower --lr than 0.003")
    assert {name: (run / name).read_bytes() for name in kept} == kept


def _blow_up_the_weights_at(monkeypatch, optimizer_step: int) -> None:
    """After the optimiser's `optimizer_step`-th update, one weight is infinite: what a finite gradient times a
    learning rate far too high gives."""
    import unetrpp.train

    build = unetrpp.train._build

    def blowing_up(*args, **kwargs):
        model, opt, sched = build(*args, **kwargs)
        taken = []

        def after(optimizer, args, kwargs):
            taken.append(1)
            if len(taken) == optimizer_step:
                with torch.no_grad():
                    next(model.parameters())[0].fill_(float("inf"))  # the stem's

        opt.register_step_post_hook(after)
        return model, opt, sched

    monkeypatch.setattr(unetrpp.train, "_build", blowing_up)


@pytest.mark.parametrize("blown_at", [3, 4])  # the step before a checkpoint's, or a checkpoint's own
def test_non_finite_weights_are_never_saved(phantoms, tmp_path, monkeypatch, blown_at):
    """Weights gone infinite at step 3 make step 4 skipped; at step 4 they would be checkpointed: either way the
    run stops at step 4, and the checkpoint of step 2 is left as it was."""
    from unetrpp.train_utils import TrainingDiverged

    _blow_up_the_weights_at(monkeypatch, blown_at)
    kept = {}

    def keep_the_checkpoint(record):
        if record["step"] == 3:  # after the checkpoint of step 2
            kept.update({name: (tmp_path / "run" / name).read_bytes() for name in ("checkpoint.pt", "rng_rank0.pt")})

    first = r"unetr_pp_encoder\.downsample_layers\.0\.0\.conv\.weight"  # the stem's, which blew up
    with pytest.raises(TrainingDiverged, match=rf"^step 4: the weights are no longer finite \({first}\), so the run "
                                               r"has diverged .*checkpoint\.pt of step 2 is kept as it was"):
        train(options(phantoms, tmp_path / "run", max_steps=30, checkpoint_every=2), on_step=keep_the_checkpoint)
    assert {name: (tmp_path / "run" / name).read_bytes() for name in kept} == kept and len(kept) == 2
    assert not (tmp_path / "run/model").exists()


def test_a_checkpoint_with_non_finite_weights_is_refused_on_resume(phantoms, tmp_path):
    """One written before runs stopped diverging: each resumed step would be skipped."""
    from unetrpp.train_utils import TrainingDiverged

    train(options(phantoms, tmp_path / "run", max_steps=1))
    state = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)
    first = "unetr_pp_encoder.downsample_layers.0.0.conv.weight"
    state["model"][first][0] = float("nan")
    torch.save(state, tmp_path / "run/checkpoint.pt")
    with pytest.raises(TrainingDiverged, match=rf"checkpoint\.pt: its weights are not finite \({first}\), from a run "
                                               r"that diverged; restore an earlier copy"):
        train(options(phantoms, tmp_path / "run", max_steps=2, resume=True))


def _nan_on_rank_1(rank: int, ports: tuple[int, int], data: str, out: str) -> None:
    """One of two gloo ranks; rank 1 alone sees NaN patches: at step 2 only in run "once", from step 3 on in
    run "always". Writes what happened on this rank to OUT/<run>_rank<N>.json."""
    import unetrpp.train
    from unetrpp.train_utils import TrainingDiverged

    torch.set_num_threads(1)
    unetrpp.train.MAX_SKIPPED_IN_A_ROW = 3
    runs = (("once", ports[0], lambda step: step == 2, dict(max_steps=4, val_every=4)),
            ("always", ports[1], lambda step: step >= 3, dict(max_steps=30, checkpoint_every=2)))
    for run, port, poisoned, every in runs:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                          LOCAL_RANK=str(rank))
        unetrpp.train.PatchDataset = _poisoned_dataset(poisoned if rank == 1 else lambda step: False)
        try:
            said = {"step": train(options(data, Path(out, run), **every)).step}
        except TrainingDiverged as exc:
            said = {"error": str(exc)}
            torch.distributed.destroy_process_group()  # as the process's exit would under torchrun
        Path(out, f"{run}_rank{rank}.json").write_text(json.dumps(said))


def test_under_ddp_a_nan_on_one_rank_is_skipped_or_stops_on_every_rank(phantoms, tmp_path):
    """Each rank has its own loss: rank 1's NaN batch must not leave rank 0 stepping alone (DDP's gradient
    all-reduce gives both a NaN norm here, but a NaN loss with finite gradients would not), and a run that
    diverges stops on every rank at the same step, not with one rank waiting for the other forever."""
    import time

    procs = torch.multiprocessing.spawn(_nan_on_rank_1, args=((_free_port(), _free_port()), str(phantoms),
                                                              str(tmp_path)), nprocs=2, join=False)
    deadline = time.time() + 300
    while not procs.join(timeout=5):
        if time.time() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail("the ranks did not finish: one waits for the other")
    said = {(run, rank): json.loads((tmp_path / f"{run}_rank{rank}.json").read_text())
            for run in ("once", "always") for rank in (0, 1)}
    assert said[("once", 0)] == said[("once", 1)] == {"step": 4}
    records = [json.loads(x) for x in (tmp_path / "once/metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records if "loss" in r] == [0, 1, 0, 0]
    assert _all_finite(load_pretrained(tmp_path / "once/model").state_dict().values())
    assert said[("always", 0)] == said[("always", 1)]
    assert said[("always", 0)]["error"].startswith("step 5: 3 steps in a row had a non-finite loss or gradient norm")
    assert torch.load(tmp_path / "always/checkpoint.pt", weights_only=True)["step"] == 2
    assert [torch.load(tmp_path / f"always/rng_rank{r}.pt", weights_only=True)["step"] for r in (0, 1)] == [2, 2]
