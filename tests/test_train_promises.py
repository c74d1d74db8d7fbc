"""Promises of training that the end-to-end tests left unchecked (found by mutation testing): gradient
clipping, which checkpoint `best` is, what the run evaluates with an EMA, a resume's sums and wall time,
new augmentations each epoch, and files that a failed or cut-off write must leave as they were.

Each run is tiny (15 images in batches of 4, 16 px): a test takes a few seconds."""

import errno
import json
import os
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file

from coatnet.checkpoint import atomic_write, load_checkpoint
from coatnet.cli import main
from test_train import _recorded_steps, _small_tree, train_until


def _cfg(tmp_path, **kw):
    from coatnet.train import TrainConfig

    return TrainConfig(data="imagefolder", data_dir=str(_small_tree(tmp_path)), img_size=16, batch_size=4,
                       **{"epochs": 1, "warmup_steps": 1, "seed": 3, **kw})


def test_gradients_are_clipped_to_clip_grad(tmp_path, monkeypatch):
    """--clip-grad C: each step's gradient, as the optimizer takes it, has a norm of at most C."""
    steps = _recorded_steps(monkeypatch, _cfg(tmp_path, clip_grad=1e-3), tmp_path / "run")
    assert len(steps) == 3
    for s in steps:
        norm = torch.stack([g.norm() for g in s["grads"].values()]).norm()
        assert norm <= 1e-3 * (1 + 1e-4), norm


def _scripted_top1(monkeypatch, top1s: list[float]) -> None:
    """Each epoch's evaluation reports the next of ``top1s`` (the rest of its figures as evaluated)."""
    import coatnet.train as train_module

    real, left = train_module.evaluate, list(top1s)

    def scripted(*args, **kwargs):
        return real(*args, **kwargs) | dict(top1=left.pop(0))

    monkeypatch.setattr(train_module, "evaluate", scripted)


def test_best_is_the_checkpoint_of_the_best_top1(tmp_path, monkeypatch):
    """`best` points at the earliest epoch of the highest top-1 (a later, worse or equal one leaves it), and
    summary.json's best_top1 is that top-1, not the last epoch's."""
    _scripted_top1(monkeypatch, [50.0, 80.0, 80.0, 60.0])
    out = tmp_path / "run"
    summary = main(["train", "--data", "imagefolder", "--data-dir", str(_small_tree(tmp_path)), "--img-size", "16",
                    "--batch-size", "4", "--epochs", "4", "--warmup-steps", "1", "--output-dir", str(out)])
    assert summary == 0
    best, last = (json.loads((out / link / "config.json").read_text()) for link in ("best", "last"))
    assert (best["epoch"], best["top1"]) == (2, 80.0)
    assert (last["epoch"], last["top1"]) == (4, 60.0)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["best_top1"], summary["top1"]) == (80.0, 60.0)
    assert [json.loads(line)["top1"] for line in (out / "metrics.jsonl").read_text().splitlines()] == \
        [50.0, 80.0, 80.0, 60.0]


def test_a_run_stopped_between_its_link_swaps_never_has_a_best_worse_than_last(tmp_path, monkeypatch):
    """Killed in the save of an improved epoch after one link swap and before the other, the run left as it
    is (not resumed) has a `best` at least as good as `last`: `best` is swapped first."""
    import coatnet.checkpoint as checkpoint_module

    _scripted_top1(monkeypatch, [50.0, 80.0])
    real, swaps = os.replace, []

    class Killed(BaseException):
        pass

    def replace(src, dst):
        if pathlib.Path(dst).name in ("last", "best"):
            swaps.append(pathlib.Path(dst).name)
            if len(swaps) == 4:  # epoch 1 swapped both, epoch 2 (better) one of them
                raise Killed
        return real(src, dst)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(checkpoint_module.os, "replace", replace)
        with pytest.raises(Killed):
            from coatnet.train import train
            train(_cfg(tmp_path, epochs=2), output_dir=out)
    best, last = (json.loads((out / link / "config.json").read_text())["top1"] for link in ("best", "last"))
    assert best >= last, (best, last)


def test_the_recorded_figures_are_the_emas_with_an_ema(tmp_path, capsys):
    """With --ema, the epoch's figures are those of the EMA weights, the ones `coatnet eval` evaluates."""
    out = tmp_path / "run"
    assert main(["train", "--data", "imagefolder", "--data-dir", str(_small_tree(tmp_path)), "--img-size", "16",
                 "--batch-size", "4", "--epochs", "2", "--warmup-steps", "1", "--lr", "0.02", "--ema", "0.5",
                 "--output-dir", str(out)]) == 0
    recorded = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "last"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] == pytest.approx(recorded["eval_loss"], rel=1e-5)
    # and the EMA is not the raw weights here (else this test would show nothing)
    raw, ema = (load_file(str(out / "last" / name)) for name in ("model.safetensors", "ema.safetensors"))
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


def test_a_resumed_epochs_training_figures_and_the_runs_wall_time_count_what_came_before(tmp_path, monkeypatch):
    """Resumed part way through an epoch, the epoch's train loss and accuracy are those of the uninterrupted
    run (its sums so far are restored), and the run's wall time includes the time before the resume."""
    from coatnet.train import train

    cfg = _cfg(tmp_path, epochs=2, save_every=2)
    train(cfg, output_dir=tmp_path / "reference")
    out = tmp_path / "run"
    train_until(monkeypatch, "evaluate_epoch", cfg, out)  # stopped after its save at step 2, mid-epoch
    state_file = out / "last" / "train_state.pt"
    state = torch.load(state_file, weights_only=True)
    assert state["step"] == 2
    torch.save(state | {"wall_seconds": 1000.0}, state_file)  # as if the first process had run 1000 s
    summary = train(cfg, output_dir=out, resume=True)
    keys = ("train_loss", "train_top1", "eval_loss", "top1")
    reference = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [[m[k] for k in keys] for m in resumed] == [[m[k] for k in keys] for m in reference]
    assert summary["wall_seconds"] >= 1000.0
    assert json.loads((out / "summary.json").read_text())["wall_seconds"] >= 1000.0


def test_each_epoch_draws_new_augmentations_of_an_image(tmp_path):
    """An image's random augmentation (here RandAugment) differs from one epoch to the next (the per-sample
    seed depends on the epoch), while an epoch's draws are the same in every run."""
    from types import SimpleNamespace

    from coatnet.data import build_datasets, default_preprocessing
    from coatnet.train import Dist, RunState, SeededSamples, TrainConfig, epoch_keys

    cfg = TrainConfig(img_size=16, batch_size=64, seed=3, randaugment=(2, 9))
    data = build_datasets("digits", None, 16, randaugment=cfg.randaugment,
                          preprocessing=default_preprocessing("digits", 16), augment=True)
    samples = SeededSamples(data.train)

    def images(epoch: int) -> dict[int, torch.Tensor]:
        run = SimpleNamespace(config=cfg, dist=Dist(0, 1, torch.device("cpu")), data=data,
                              state=RunState(epoch=epoch), steps_per_epoch=len(data.train) // cfg.batch_size)
        return {key[1]: samples[key][0] for key in epoch_keys(run)}

    first, again, second = images(0), images(0), images(1)
    assert all(torch.equal(first[i], again[i]) for i in first)
    shared = sorted(set(first) & set(second))[:40]
    assert len(shared) == 40
    assert sum(not torch.equal(first[i], second[i]) for i in shared) > 20


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    """atomic_write (metrics.jsonl, summary.json, eval.json): a write cut short by a full disk leaves the
    old file whole, and no temporary file beside it."""
    path = tmp_path / "summary.json"
    path.write_text("old")
    real = pathlib.Path.write_text

    def full_disk(self, text, *args, **kwargs):
        real(self, text[:3], *args, **kwargs)  # part of it reached the disk
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    with pytest.raises(OSError) as e:
        atomic_write(path, "new contents")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_link_swap_cut_off_leaves_last_at_a_complete_checkpoint(tmp_path, monkeypatch):
    """Killed while it swaps `last` (or `best`) to a new checkpoint, the run still has its `last`, at the
    previous checkpoint, which resumes."""
    from coatnet.train import train

    real, links = pathlib.Path.symlink_to, []

    class Killed(BaseException):
        pass

    def symlink_to(self, target, *args, **kwargs):
        links.append(target)
        if len(links) == 3:  # epoch 1 made best and last; the first swap of epoch 2's save is cut off
            raise Killed
        return real(self, target, *args, **kwargs)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "symlink_to", symlink_to)
        with pytest.raises(Killed):
            train(_cfg(tmp_path, epochs=2), output_dir=out)
    assert (out / "last").is_symlink() and load_checkpoint(out / "last").train_state["step"] == 3
    assert train(_cfg(tmp_path, epochs=2), output_dir=out, resume=True)["epochs"] == 2


def test_a_users_file_in_a_checkpoint_reached_again_is_kept(tmp_path):
    """Resumed from an earlier checkpoint, a run reaches the step of its later `last` again: the new
    checkpoint takes another name, and a file the user put in the old one (an export) is kept."""
    tree = str(_small_tree(tmp_path))
    out = tmp_path / "run"
    argv = ["train", "--data", "imagefolder", "--data-dir", tree, "--img-size", "16", "--batch-size", "4",
            "--warmup-steps", "1", "--output-dir", str(out)]
    assert main([*argv, "--epochs", "1"]) == 0
    shutil.copytree(out / "last", tmp_path / "run" / "epoch1")
    assert main([*argv, "--resume", "--epochs", "2"]) == 0
    step6 = (out / "last").resolve()
    (step6 / "model.pt").write_text("mine")  # coatnet export --output RUN/last/model.pt
    assert main(["train", "--resume", str(out / "epoch1"), "--epochs", "2"]) == 0
    assert (out / "last").resolve() != step6
    assert (step6 / "model.pt").read_text() == "mine"


def test_a_run_that_ended_is_not_taken_for_a_crashed_one(tmp_path, capsys):
    """A process that held a run's folder and ended normally released it: the next one says nothing of a
    process that "ended without releasing" it (it does for one killed: test_faults)."""
    import subprocess
    import sys

    from coatnet.checkpoint import locked_run_dir

    out = tmp_path / "run"
    # it writes in the folder (a run's files), so its lock file is kept when it ends
    subprocess.run([sys.executable, "-c", f"import pathlib; from coatnet.checkpoint import locked_run_dir\n"
                                          f"out = pathlib.Path({str(out)!r})\n"
                                          f"with locked_run_dir(out): (out / 'metrics.jsonl').write_text('')"],
                   check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    capsys.readouterr()
    with locked_run_dir(out):
        pass
    assert (out / ".lock").exists()
    assert "without releasing" not in capsys.readouterr().err


def test_an_epochs_training_figures_are_of_its_own_steps(tmp_path, monkeypatch):
    """metrics.jsonl's train_loss and train_top1 of each epoch are the mean loss and accuracy over that
    epoch's images only, not summed on from the epochs before."""
    steps = _recorded_steps(monkeypatch, _cfg(tmp_path, epochs=2), tmp_path / "run")
    assert len(steps) == 6
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for epoch, m in zip((steps[:3], steps[3:]), lines):
        count = sum(s["labels"].numel() for s in epoch)
        loss = sum(s["loss"].item() * s["labels"].numel() for s in epoch) / count
        correct = sum((s["logits"].argmax(1) == s["labels"]).sum().item() for s in epoch)
        assert m["train_loss"] == pytest.approx(loss, rel=1e-9)
        assert m["train_top1"] == pytest.approx(100 * correct / count, rel=1e-9)


def test_a_gradient_that_is_not_finite_stops_the_run_before_its_step(tmp_path, monkeypatch):
    """A step whose loss is finite but whose gradient is not (an overflow in the backward pass) stops the
    run before the weights take it, as a non-finite loss does."""
    from coatnet.train import NonFiniteLoss

    calls = []

    def overflow_at_the_second_step(run, images, labels):
        calls.append(1)
        if len(calls) == 2:
            next(run.model.parameters()).register_hook(lambda g: g * float("inf"))

    with pytest.raises(NonFiniteLoss, match="gradient norm"):
        _recorded_steps(monkeypatch, _cfg(tmp_path), tmp_path / "run", before_step=overflow_at_the_second_step)
    assert len(calls) == 2


def test_evaluate_gives_the_same_figures_whatever_mode_the_model_was_left_in():
    """evaluate() scores the model as it predicts (BatchNorm on its running statistics, no drop path), also
    when handed a model left in training mode, and changes none of its statistics."""
    from torch.utils.data import DataLoader, TensorDataset

    from coatnet.evaluate import evaluate
    from coatnet.models import create_model
    from conftest import randomise_norms

    torch.manual_seed(0)
    model = randomise_norms(create_model("coatnet_pico", num_classes=3, img_size=16, drop_path_rate=0.2))
    loader = DataLoader(TensorDataset(torch.randn(12, 3, 16, 16), torch.randint(0, 3, (12,))), batch_size=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = evaluate(model.eval(), loader, torch.device("cpu"), 3)
    got = evaluate(model.train(), loader, torch.device("cpu"), 3)
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6) and torch.equal(got["confusion"],
                                                                                    expected["confusion"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
