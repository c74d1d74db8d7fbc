"""Training end to end on the embedded digits: outputs, exact resume after SIGKILL, DDP, errors.

Runs are tiny (coatnet_pico at 16x16, a few dozen steps), so the whole file takes about a minute.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coatnet.checkpoint import load_checkpoint
from coatnet.cli import main
from coatnet.models import create_model

TINY = ["--img-size", "16", "--batch-size", "128", "--warmup-steps", "3", "--seed", "3"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_cli(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "coatnet", *argv], capture_output=True, text=True, env=ENV)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def train_until(monkeypatch, stage: str, cfg, out: Path) -> None:
    """Train ``cfg`` into ``out`` until ``coatnet.train``'s function ``stage`` is called, and stop there
    as a killed run would: with what it had saved by then."""
    import coatnet.train as train_module

    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop

    with monkeypatch.context() as m:
        m.setattr(train_module, stage, stop)
        with pytest.raises(Stop):
            train_module.train(cfg, output_dir=out)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "last" / "model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch run, checkpointing every 4 steps: the run the others must match.
    Beside it, in a process of its own, the same run without the extra checkpoints: ``again``."""
    out = tmp_path_factory.mktemp("ref") / "run"
    again = subprocess.Popen([sys.executable, "-m", "coatnet", "train", *TINY, "--epochs", "2", "--output-dir",
                              str(out.parent / "again")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env=ENV)
    try:
        run_cli("train", *TINY, "--epochs", "2", "--save-every", "4", "--output-dir", str(out))
    finally:
        error = again.communicate()[1]
    assert again.returncode == 0, error
    return out


def test_outputs(reference_run):
    lines = (reference_run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        m = json.loads(line)
        assert {"epoch", "train_loss", "eval_loss", "top1", "top5", "lr", "images_per_second"} <= m.keys()
    # Each epoch's LR is the one its last step took (steps 10 and 21 of 22), not the next step's.
    from coatnet.train import TrainConfig, lr_schedule

    cfg = TrainConfig(**load_checkpoint(reference_run / "last").meta["train_config"])
    rates = []
    for step in (10, 21):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        lr_schedule(optimizer, cfg, total_steps=22, step=step)
        rates.append(optimizer.param_groups[0]["lr"])
    assert [json.loads(line)["lr"] for line in lines] == pytest.approx(rates, rel=1e-9) and rates[1] > cfg.min_lr
    summary = json.loads((reference_run / "summary.json").read_text())
    assert {"model", "dataset", "epochs", "top1", "top5", "train_loss", "images_per_second", "wall_seconds",
            "skipped_files"} <= summary.keys()
    assert summary["model"] == "coatnet_pico" and summary["dataset"] == "digits" and summary["epochs"] == 2
    assert summary["skipped_files"] == 0 and 0 <= summary["top1"] <= 100
    assert (reference_run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    for link in ("last", "best"):
        assert (reference_run / link).is_symlink()
        ckpt = load_checkpoint(reference_run / link)
        assert ckpt.meta["model"] == "coatnet_pico"
        assert ckpt.meta["pretrained_cfg"]["label_names"] == [str(i) for i in range(10)]
    # Only last and best are kept; mid-epoch checkpoints are pruned.
    assert len(list(reference_run.glob("ckpt-*"))) <= 2
    # The training state holds plain data and tensors only: it loads with weights_only=True.
    state = torch.load(reference_run / "last" / "train_state.pt", weights_only=True)
    assert state["step"] == 2 * (1437 // 128) and state["epoch"] == 2


def test_epoch_line_shows_gpu_memory_where_there_is_some(reference_run):
    """The CPU run's line has no memory figure; a GPU run's metrics (as ``epoch_metrics`` writes
    them on CUDA) add its peak and reserved memory per GPU to the line."""
    from coatnet.train import epoch_line

    m = json.loads((reference_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "gpu_peak_gib" not in m and "peak" not in epoch_line(m, 2, 10)
    line = epoch_line(m | dict(gpu_peak_gib=11.7, gpu_reserved_gib=13.04), 2, 10)
    assert line.startswith("epoch   2/2  train_loss") and line.endswith("img/s  peak 11.7 GiB per GPU (13.0 reserved)")


def test_the_epoch_line_leaves_top5_out_with_five_classes_or_fewer():
    """Top-5 of 5 classes or fewer is 100% whatever the model: the epoch line does not show it (as eval's
    line does not); with more classes it does. metrics.jsonl keeps the key either way."""
    from coatnet.train import epoch_line
    h = dict(epoch=3, train_loss=0.5, eval_loss=0.6, top1=80.0, top5=100.0, lr=1e-3, images_per_second=50.0)
    assert "top5" not in epoch_line(h, 10, num_classes=5) and " top1  80.00 " in epoch_line(h, 10, num_classes=5)
    assert " top5 100.00 " in epoch_line(h, 10, num_classes=6)


def test_two_runs_are_bitwise_identical(reference_run):
    assert_bitwise_equal(weights(reference_run), weights(reference_run.parent / "again"))


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun's workers run in sessions of their own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _kill_when(proc: subprocess.Popen, run_dir: Path, min_step: int) -> int:
    """SIGKILL ``proc`` and its children (torchrun's workers), all at once as a machine failing would,
    once ``run_dir/last`` holds a checkpoint at or past ``min_step``."""
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            step = int(os.readlink(run_dir / "last").split("-")[1])
        except (OSError, ValueError, IndexError):
            step = -1
        if step >= min_step:
            for pid in [*_children(proc.pid), proc.pid]:
                os.kill(pid, signal.SIGKILL)
            proc.wait()
            return step
        if proc.poll() is not None:
            pytest.fail("training finished before it could be killed")
        time.sleep(0.02)
    pytest.fail("no checkpoint appeared")


def test_sigkill_and_resume_matches_uninterrupted_run(reference_run, tmp_path):
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "coatnet", "train", *TINY, "--epochs", "2", "--save-every", "4",
            "--output-dir", str(out)]
    # Killed twice: first mid-epoch 1, then again after resuming, in epoch 2.
    for min_step in (4, 14):
        proc = subprocess.Popen(argv + (["--resume"] if min_step != 4 else []), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        killed_at = _kill_when(proc, out, min_step)
        assert killed_at < 22
        assert load_checkpoint(out / "last").train_state["step"] == killed_at  # last is always complete
    run_cli("train", "--resume", "--output-dir", str(out))
    assert_bitwise_equal(weights(reference_run), weights(out))
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    ref_metrics = (reference_run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["train_loss"] for m in metrics] == [json.loads(m)["train_loss"] for m in ref_metrics]


def test_resume_extends_a_finished_run(reference_run, tmp_path):
    """Extended with another --weight-decay and --min-lr, the run steps with them, as config.json
    records: AdamW's moments come from the checkpoint, its settings from this run."""
    import shutil

    out = tmp_path / "extended"
    shutil.copytree(reference_run, out, symlinks=True)
    assert main(["train", "--resume", "--epochs", "3", "--weight-decay", "0.3", "--min-lr", "2e-5",
                 "--output-dir", str(out)]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "summary.json").read_text())["epochs"] == 3
    groups = torch.load(out / "last" / "train_state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.3, 0.0]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["lr"] == pytest.approx(2e-5)


def test_no_weight_decay_on_the_relative_position_bias():
    """Eq. 3's tables, and [rw] the MLP that computes the bias (as timm), are not decayed; nor are
    biases and norms. Weights are."""
    from coatnet.train import param_groups

    for name in ("coatnet_pico", "coatnet_rmlp_nano_rw"):
        model = create_model(name)
        decay, no_decay = ({id(p) for p in g["params"]} for g in param_groups(model, 0.05))
        for key, p in model.named_parameters():
            undecayed = p.ndim == 1 or ".relative_position." in key
            assert (id(p) in no_decay) == undecayed and (id(p) in decay) != undecayed, key
        assert any(".relative_position." in key for key, _ in model.named_parameters())


def test_extending_a_finished_run_never_raises_the_lr(reference_run, tmp_path):
    """More epochs past the end of the cosine decay go on at min_lr: no new warm-up, no climb back."""
    import shutil

    out = tmp_path / "extended"
    shutil.copytree(reference_run, out, symlinks=True)
    assert main(["train", "--resume", "--epochs", "4", "--output-dir", str(out)]) == 0
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lrs) == 4 and lrs[2:] == pytest.approx([1e-5] * 2)  # the first run decayed to min_lr
    assert max(lrs[2:]) <= lrs[1]


@pytest.mark.parametrize("batch_size,warmup,said", [("1024", "0", False), ("1024", "5", False), ("512", "1", True)])
def test_the_warm_up_note_is_said_only_where_fewer_steps_would_decay(capsys, tmp_path, batch_size, warmup, said):
    """A run of one step (the finetune recipe's one epoch on a small folder) has nothing to decay
    (before: "--warmup-steps 0 covers the whole run of 1 steps ... give fewer (e.g. --warmup-steps 0)");
    two steps, both at --lr after a warm-up of one, are told to give none."""
    assert main(["train", "--img-size", "16", "--epochs", "1", "--batch-size", batch_size, "--warmup-steps", warmup,
                 "--output-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert ("covers the whole run" in out) == said, out
    if said:
        assert f"note: --warmup-steps {warmup} covers the whole run of 2 steps" in out, out
        assert "(e.g. --warmup-steps 0)" in out, out


def test_lr_schedule_warms_up_decays_then_stays_at_min_lr():
    from coatnet.train import TrainConfig, lr_schedule

    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = lr_schedule(optimizer, cfg, total_steps=100)
    lrs = []
    for _ in range(150):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[10] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # linear warm-up
    assert all(a > b for a, b in zip(lrs[10:100], lrs[11:101]))  # cosine decay
    assert lrs[100:] == pytest.approx([1e-5] * 50)  # then flat
    # Resumed at any step, the schedule goes on with the same rates.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    lr_schedule(optimizer, cfg, total_steps=100, step=57)
    assert optimizer.param_groups[0]["lr"] == lrs[57]


def test_lr_schedule_decays_along_a_cosine():
    """Table 10's decay is a cosine from lr to min_lr, not any decreasing curve: half-way down at the
    middle of the decay, and at its quarters lr's share (1 + cos(pi/4)) / 2 and (1 - cos(pi/4)) / 2."""
    from coatnet.train import TrainConfig, lr_schedule

    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    factor = lr_schedule(optimizer, cfg, total_steps=110).lr_lambdas[0]  # 100 steps of decay from step 10
    at = lambda share: cfg.min_lr + (cfg.lr - cfg.min_lr) * share  # noqa: E731
    assert cfg.lr * factor(60) == pytest.approx(at(0.5))
    assert cfg.lr * factor(35) == pytest.approx(at((1 + math.cos(math.pi / 4)) / 2))
    assert cfg.lr * factor(85) == pytest.approx(at((1 - math.cos(math.pi / 4)) / 2))


def test_train_from_python(tmp_path):
    """train() takes a TrainConfig (no argparse) and returns the summary."""
    from dataclasses import replace

    from coatnet.train import RECIPES, train

    config = replace(RECIPES["digits"], img_size=16, batch_size=128, epochs=1)
    summary = train(config, output_dir=tmp_path / "run")
    assert summary["epochs"] == 1 and summary["model"] == "coatnet_pico" and summary["img_size"] == 16
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ValueError, match="already holds a run"):
        train(config, output_dir=tmp_path / "run")


def test_finetune_at_a_new_resolution_with_ema_and_augmentation(reference_run, tmp_path):
    out = tmp_path / "ft"
    assert main(["train", "--finetune", str(reference_run / "best"), "--img-size", "32", "--epochs", "1",
                 "--batch-size", "128", "--ema", "0.9", "--mixup", "0.8", "--cutmix", "1.0",
                 "--randaugment", "2,9", "--drop-path", "0.1", "--output-dir", str(out)]) == 0
    ckpt = load_checkpoint(out / "last")
    assert ckpt.ema_weights is not None and ckpt.meta["img_size"] == 32
    # S3 runs at stride 8: a 2x2 grid at 16 px (3x3 table), 4x4 at 32 px (7x7 table, interpolated).
    key = "stages.2.blocks.0.attn.relative_position.table"
    assert load_checkpoint(reference_run / "best").weights[key].shape == (4, 3, 3)
    assert ckpt.weights[key].shape == (4, 7, 7)


@pytest.mark.parametrize("argv,message", [
    (["--model", "coatnet_99"], "unknown model 'coatnet_99'"),
    (["--data", "mnist"], "mnist"),
    (["--img-size", "20"], "not a multiple of the model's stride 16"),
    (["--data", "imagefolder"], "data"),
    (["--data", "imagefolder", "--data-dir", "/nonexistent/dir"], "/nonexistent/dir"),
    (["--randaugment", "2"], "N,M"),
    (["--randaugment", "-1,5"], "num_ops >= 0"),  # a value starting with "-" is checked, not taken for a flag
    (["--seed", "99999999999999999999999"], "--seed must be an integer >= -9223372036854775808 and <= "),
    (["--resume", "--recipe", "digits"], "--recipe sets a new run's settings and a resumed run keeps its own"),
    # Table 10's fine-tuning column, from random weights (before: trained from scratch at lr 5e-5 without a word)
    (["--recipe", "imagenet1k-finetune"], "--recipe imagenet1k-finetune fine-tunes pre-trained weights: give them "
                                          "with --pretrained"),
    (["--data", "digits", "--data-dir", "/some/dir"], "pass --data imagefolder|cifar10|cifar100"),  # not digits, silently
    (["--data-dir", "/some/dir"], "--data-dir /some/dir does not exist; check the path"),  # its kind is not known
    # Every setting is checked against the range its field declares, before anything runs.
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--min-lr", "nan"], "--min-lr must be a finite number >= 0, got nan"),
    (["--mixup", "nan"], "--mixup must be 0 or a finite number >= 0.01 and <= 1e+38, got nan"),
    # torch's Beta sampler returns 0.5 (full mixing) for alphas this small, not the 0 or 1 they mean
    (["--mixup", "1e-300"], "--mixup must be 0 or a finite number >= 0.01"),
    (["--cutmix", "0.001"], "--cutmix must be 0 or a finite number >= 0.01"),
    # timm's --no-aug beside what augments (a recipe's RandAugment and Mixup): which one is meant is not guessed
    (["--recipe", "imagenet1k-pretrain", "--no-aug"], "--no-aug trains on images prepared as for evaluation, and "
                                                      "--randaugment and --mixup augment them: turn them off too (0)"),
    (["--no-aug", "--cutmix", "1"], "and --cutmix augments them: turn it off too (0), or drop --no-aug"),
    (["--weight-decay", "1000"], "--weight-decay 1000 with --lr 0.002: AdamW multiplies the weights by 1 - lr x "
                                 "weight-decay = -1 at each step"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1.0"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--drop-path", "nan"], "--drop-path must be a finite number >= 0 and < 1"),
    (["--label-smoothing", "2"], "--label-smoothing must be a finite number >= 0 and < 1, got 2.0"),
    (["--min-lr", "0.1"], "--min-lr 0.1 is above --lr"),
    (["--device", "bogus"], "--device bogus is not a device; use cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], "--device cuda:99: "),  # no CUDA here, or not 100 devices
    (["--grad-accum-steps", "0"], "--grad-accum-steps must be an integer >= 1, got 0"),
    (["--grad-accum-steps", "5"], "--batch-size 64 (global) is not divisible by 1 process(es) x --grad-accum-steps 5"),
    (["--pretrained", "/nonexistent/w.safetensors"], "weights file '/nonexistent/w.safetensors' does not exist"),
    # timm's names of where a model is: a folder that is not there, or the Hub where a folder is needed
    (["--pretrained", "local-dir:"], "'local-dir:' names no folder; write local-dir:PATH"),
    (["--pretrained", "local-dir:/nonexistent/w"], "'local-dir:/nonexistent/w': '/nonexistent/w' is not a folder"),
    (["--resume", "hf-hub:me/w"], "'hf-hub:me/w' is a Hub repository, and a folder on disk is needed here: download "
                                  "it (hf download me/w --local-dir PATH) and give PATH"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    code = None
    try:
        code = main(["train", "--epochs", "1", *argv, "--output-dir", str(tmp_path / "x")])
    except SystemExit as e:  # argparse's own errors exit with status 2 too
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x" / "last").exists()


def test_empty_data_dir(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    assert main(["train", "--data", "imagefolder", "--data-dir", str(tmp_path / "data"), "--output-dir",
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "empty" in err.lower()


def test_existing_run_is_not_overwritten(reference_run, capsys):
    before = os.readlink(reference_run / "last")
    assert main(["train", *TINY, "--output-dir", str(reference_run)]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert os.readlink(reference_run / "last") == before


def test_resume_with_another_model(reference_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run, out, symlinks=True)
    assert main(["train", "--resume", "--model", "coatnet_nano", "--output-dir", str(out)]) == 2
    assert "is of model coatnet_pico, not coatnet_nano" in capsys.readouterr().err


def test_resume_under_another_name_of_the_same_model(tmp_path, capsys):
    """timm's names of a network (coatnet_0_rw_224, with or without a pretrained tag) build the network of
    coatnet_0_rw: a run started under one goes on under another (before: refused, the names compared as
    written); another network is still refused."""
    from test_data import make_tree

    from coatnet.study import small_layout
    from coatnet.train import TrainConfig, train

    root = make_tree(tmp_path / "data")
    out = tmp_path / "run"
    train(TrainConfig(model="coatnet_0_rw", model_config=small_layout("coatnet_0_rw"), data="imagefolder",
                      data_dir=str(root), img_size=32, batch_size=4, epochs=1, warmup_steps=1), output_dir=out)
    for epochs, name in ((2, "coatnet_0_rw_224"), (3, "coatnet_0_rw_224.sw_in1k")):  # each resumes the one before
        assert main(["train", "--resume", "--model", name, "--epochs", str(epochs), "--output-dir", str(out)]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    capsys.readouterr()
    assert main(["train", "--resume", "--model", "coatnet_1_rw_224", "--epochs", "4", "--output-dir", str(out)]) == 2
    assert "is of model coatnet_0_rw_224.sw_in1k, not coatnet_1_rw_224" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "64"], "--batch-size 64 differs from the resumed run's 128"),
    (["--seed", "4"], "--seed 4 differs from the resumed run's 3"),
    (["--img-size", "32"], "--img-size 32 differs from the resumed run's 16"),
    (["--data", "imagefolder", "--data-dir", "elsewhere"], "--data imagefolder differs from the resumed run's digits"),
])
def test_resume_keeps_the_runs_data_order_and_shapes(reference_run, tmp_path, capsys, flags, message):
    """Another data set (classes, sizes), batch size or seed (where a run stopped part way through an
    epoch is found by position in its data order), or image size (the shapes of the weights'
    optimizer state) would train on silently wrong, or crash: refused in one line, nothing written."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run, out, symlinks=True)
    before = sorted(p.name for p in out.iterdir()), (out / "metrics.jsonl").read_text()
    assert main(["train", "--resume", "--output-dir", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "--pretrained" in err and err.count("\n") == 1
    assert (sorted(p.name for p in out.iterdir()), (out / "metrics.jsonl").read_text()) == before


def test_resuming_an_earlier_checkpoint_says_the_later_ones_go(tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--output-dir", str(out)]) == 0
    shutil.copytree(out / "last", out / "epoch1")  # as `best` may be, behind `last`
    assert main(["train", "--resume", "--output-dir", str(out), "--epochs", "2"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "epoch1"), "--epochs", "2"]) == 0
    said = capsys.readouterr()
    assert "the run's last checkpoint is at step 22; going on from step 11 replaces it" in said.out + said.err


def test_a_users_own_ckpt_folders_survive_the_runs_saves(reference_run, tmp_path):
    """Only the checkpoints training names (ckpt-NNNNNNNN) are pruned, not a folder of the user's."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run, out, symlinks=True)
    shutil.copytree(out / "last", out / "ckpt-keep-epoch2")
    (out / "ckpt-notes").mkdir()
    (out / "ckpt-notes" / "README.txt").write_text("mine")
    assert main(["train", "--resume", "--output-dir", str(out), "--epochs", "3"]) == 0
    assert (out / "ckpt-notes" / "README.txt").read_text() == "mine" and (out / "ckpt-keep-epoch2").is_dir()
    assert sum(bool(re.fullmatch(r"ckpt-\d{8}(\.\d+)?", p.name)) for p in out.iterdir()) <= 2  # still pruned


def test_a_process_holding_a_loader_with_workers_ends():
    """A loader's workers end when told to at exit, so a program still holding one (a notebook, a test whose
    traceback kept it) exits (before: the workers ignored SIGTERM, and the exit waited on them for good)."""
    program = ("import torch\nfrom coatnet.train import make_loader\n"
               "data = torch.utils.data.TensorDataset(torch.arange(64.0))\n"
               "held = [iter(make_loader(data, list(range(64)), 4, 2, torch.device('cpu'), False))]\n"
               "next(held[0])\nheld.append(held)  # a cycle: the loader lives to the interpreter's exit\n")
    done = subprocess.run([sys.executable, "-c", program], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_sigterm_met_while_the_loader_forks_its_workers_still_stops_the_run(reference_run, tmp_path, capsys):
    """Python drops a KeyboardInterrupt raised inside a hook called from C: a SIGTERM (or Ctrl-C) whose
    handler ran in logging's after-fork hook, as a loader forked its workers, was printed as "Exception
    ignored in: <function _releaseLock>" and the run went on to its end, status 0 (seen with `kill` of the
    process group). It is recorded, and the next step stops the run as any SIGTERM does, in its one line."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run, out, symlinks=True)
    armed = [True]

    def sigterm_inside_the_fork_hook():
        if armed[0] and os.getpid() == parent:
            armed[0] = False
            os.kill(parent, signal.SIGTERM)  # its handler runs at Python's next check: in this hook

    parent = os.getpid()
    os.register_at_fork(after_in_parent=sigterm_inside_the_fork_hook)  # cannot be removed: disarmed below
    try:
        status = main(["train", "--resume", "--epochs", "3", "--workers", "1", "--output-dir", str(out)])
        err = capsys.readouterr().err
        assert status == 130 and err.startswith("coatnet train: interrupted; ") and err.count("\n") == 1, err
        assert json.loads((out / "summary.json").read_text())["epochs"] == 2  # the resumed run's, not a third
        armed[0] = True  # an evaluation's loader too
        status = main(["eval", "--checkpoint", str(out / "last"), "--workers", "1",
                       "--output-dir", str(tmp_path / "e")])
        assert (status, capsys.readouterr().err) == (130, "coatnet eval: interrupted\n")
        assert not (tmp_path / "e").exists()
    finally:
        armed[0] = False


def test_a_stopped_run_says_how_to_continue(reference_run, tmp_path, monkeypatch, capsys):
    """Ctrl-C, or a scheduler's SIGTERM, stops training in one line that says what continues the run,
    and from which step (before: "interrupted", and SIGTERM killed it without a word). The test's
    handler stands in for the kill, so that the old code fails the test instead of ending it."""
    import shutil

    from coatnet import train as train_module

    def killed(*_):
        pytest.fail("SIGTERM was not handled")

    def sigterm(*_):
        os.kill(os.getpid(), signal.SIGTERM)

    def said() -> str:
        err = capsys.readouterr().err
        assert err.startswith("coatnet train: interrupted; ") and err.count("\n") == 1, err
        return err.strip().removeprefix("coatnet train: interrupted; ")

    previous = signal.signal(signal.SIGTERM, killed)
    try:
        out = tmp_path / "run"
        shutil.copytree(reference_run, out, symlinks=True)
        resumed_at = load_checkpoint(out / "last").train_state["step"]
        # Stopped before its first checkpoint: the one it resumed holds --epochs 2, not the 3 given now.
        monkeypatch.setattr(train_module, "train_one_epoch", sigterm)
        assert main(["train", "--resume", "--epochs", "3", "--output-dir", str(out)]) == 130
        assert said() == f"the same command continues it from the checkpoint it resumed (step {resumed_at})"
        # Stopped after it: that checkpoint holds --epochs 3, and the run's folder is all it takes.
        monkeypatch.undo()
        monkeypatch.setattr(train_module, "report_epoch", sigterm)
        assert main(["train", "--resume", "--epochs", "3", "--output-dir", str(out)]) == 130
        saved_at = load_checkpoint(out / "last").train_state["step"]
        assert saved_at > resumed_at
        assert said() == f"`coatnet train --resume {out}` continues it from its last checkpoint (step {saved_at})"
        monkeypatch.undo()
        capsys.readouterr()
        assert main(["train", "--resume", str(out)]) == 0  # as said
        assert json.loads((out / "summary.json").read_text())["epochs"] == 3
        # A new run stopped before its first checkpoint: the same command again is not refused.
        monkeypatch.setattr(train_module, "train_one_epoch", sigterm)
        for _ in range(2):
            assert main(["train", *TINY, "--epochs", "1", "--output-dir", str(tmp_path / "new")]) == 130
            assert said() == "no checkpoint was written yet: the same command starts it again"
        assert signal.getsignal(signal.SIGTERM) is killed  # put back
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_run_stopped_before_its_report_is_reported_on_resume(reference_run, tmp_path, monkeypatch):
    """Stopped after its last checkpoint but before metrics.jsonl, curves.png and summary.json were
    written (a kill, a plot that fails): `--resume` with nothing left to train writes them from the
    checkpoint (before: the previous epochs' files stayed, as if they were the run's)."""
    import shutil

    from coatnet import train as train_module

    out = tmp_path / "run"
    shutil.copytree(reference_run, out, symlinks=True)
    curves = (out / "curves.png").read_bytes()

    def stopped(run):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "report_epoch", stopped)
    assert main(["train", "--resume", "--epochs", "3", "--output-dir", str(out)]) == 130
    assert load_checkpoint(out / "last").train_state["epoch"] == 3
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2  # the stale report
    monkeypatch.undo()
    assert main(["train", "--resume", "--epochs", "3", "--output-dir", str(out)]) == 0
    history = load_checkpoint(out / "last").train_state["history"]
    assert [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] == history
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["top1"] == history[-1]["top1"]
    assert (out / "curves.png").read_bytes() != curves
    # An earlier checkpoint resumed with nothing left to train leaves the run's report as it is.
    earlier = out / "ckpt-00000022"
    shutil.rmtree(earlier, ignore_errors=True)
    shutil.copytree((reference_run / "last").resolve(), earlier)
    reports = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "curves.png", "summary.json")}
    assert main(["train", "--resume", str(earlier), "--epochs", "2"]) == 0
    assert {name: (out / name).read_bytes() for name in reports} == reports


@pytest.mark.parametrize("written", ["absolute", "dot-slash", "a loop"])
def test_a_link_written_by_hand_keeps_its_checkpoint(tmp_path, written):
    """`best` re-pointed by hand (`ln -sfn $PWD/run/ckpt-N best`, or `./ckpt-N`) keeps its checkpoint
    through the next save's pruning (before: deleted, `best` left dangling); one that loops on
    itself keeps none, without an error."""
    from coatnet.checkpoint import _remove_unreferenced

    for step in (11, 22, 33):
        (tmp_path / f"ckpt-{step:08d}").mkdir()
    (tmp_path / "last").symlink_to("ckpt-00000033")
    (tmp_path / "best").symlink_to({"absolute": tmp_path / "ckpt-00000011", "dot-slash": "./ckpt-00000011",
                                    "a loop": "best"}[written])
    _remove_unreferenced(tmp_path)
    kept = ["ckpt-00000033"] if written == "a loop" else ["ckpt-00000011", "ckpt-00000033"]
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == kept


def test_pruning_keeps_what_a_user_put_in_a_checkpoint_folder(tmp_path, capsys):
    """A checkpoint no link points at any more loses the files training wrote (an --fsdp one's optimizer
    shards too), not an export or a run the user put inside it (before: the folder went whole); a note
    says what was kept, once. A checkpoint holding nothing else goes, folder and all."""
    from coatnet.checkpoint import _remove_unreferenced

    for step in (11, 22, 33):
        ckpt = tmp_path / f"ckpt-{step:08d}"
        (ckpt / "optimizer").mkdir(parents=True)
        for name in ("config.json", "model.safetensors", "ema.safetensors", "train_state.pt", "optimizer/.metadata"):
            (ckpt / name).write_text("ours")
    (tmp_path / "ckpt-00000011" / "model.pt").write_text("an export")
    (tmp_path / "ckpt-00000011" / "myrun").mkdir()
    (tmp_path / "ckpt-00000011" / "myrun" / "summary.json").write_text("a run")
    (tmp_path / "last").symlink_to("ckpt-00000033")
    _remove_unreferenced(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-00000011", "ckpt-00000033"]
    assert sorted(p.name for p in (tmp_path / "ckpt-00000011").iterdir()) == ["model.pt", "myrun"]
    assert (tmp_path / "ckpt-00000011" / "myrun" / "summary.json").read_text() == "a run"
    assert len(list((tmp_path / "ckpt-00000033").iterdir())) == 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'ckpt-00000011'}, which neither last nor best" in err
    assert "kept what else it holds (model.pt, myrun)" in err
    _remove_unreferenced(tmp_path)  # the next save finds nothing of ours there: no note again
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("victim", ["train_state.pt", "model.safetensors"])
def test_truncated_checkpoint(reference_run, tmp_path, capsys, victim):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run, out, symlinks=True)
    target = out / "last" / victim
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    assert main(["train", "--resume", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and victim in err and ("corrupt" in err or "truncated" in err)


def test_finetune_from_another_model_names_the_keys(reference_run, tmp_path, capsys):
    assert main(["train", "--model", "coatnet_nano", "--finetune", str(reference_run / "best"), *TINY,
                 "--epochs", "1", "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "are coatnet_pico's, not coatnet_nano's" in err and "name coatnet_pico" in err


def test_local_dir_names_the_folder_to_finetune_from_and_to_resume(tmp_path, capsys):
    """timm's local-dir:PATH is the folder PATH: --pretrained local-dir:F fine-tunes from F's weights as
    --pretrained F does, bit for bit, and --resume local-dir:RUN continues RUN (before: "weights file
    'local-dir:...' does not exist", and a missing checkpoint)."""
    torch.manual_seed(7)  # not the runs' seed: weights a fresh model of theirs would not have
    folder = create_model("coatnet_pico", num_classes=10, img_size=16).save_pretrained(tmp_path / "w")
    given = load_file(str(folder / "model.safetensors"))
    flags = [*TINY, "--epochs", "1", "--lr", "1e-9", "--min-lr", "0"]  # a step too small to move a weight far
    assert main(["train", "--pretrained", f"local-dir:{folder}", *flags, "--output-dir", str(tmp_path / "a")]) == 0
    assert main(["train", "--pretrained", str(folder), *flags, "--output-dir", str(tmp_path / "b")]) == 0
    assert f"fine-tuning from the weights of local-dir:{folder}, their classifier (10 classes) kept" in \
        capsys.readouterr().out
    tuned = weights(tmp_path / "a")
    torch.testing.assert_close(tuned["stem.0.0.weight"], given["stem.0.0.weight"], rtol=0, atol=1e-6)
    assert_bitwise_equal(tuned, weights(tmp_path / "b"))
    assert main(["train", "--resume", f"local-dir:{tmp_path / 'a'}", "--epochs", "1"]) == 0
    assert "has trained 1 of 1 epochs: nothing left to do" in capsys.readouterr().out


def test_torchrun_two_processes_match_one(tmp_path, capsys):
    """DDP over 2 gloo processes with the same global batch as 1 process: same samples in each step.

    BatchNorm normalises each process's half batch on its own (SyncBatchNorm needs CUDA), and AdamW
    turns small gradient differences into steps of about the learning rate, so the runs agree closely
    but not bit for bit. Stated tolerance: after one epoch (22 steps), the distance between the two
    runs' parameters is under 30% of the distance either moved from the shared initial weights
    (measured: 16%; a run that sees the same data in other batches is at 100%).
    """
    common = ["train", "--img-size", "16", "--batch-size", "64", "--epochs", "1", "--warmup-steps", "2",
              "--seed", "5", "--label-smoothing", "0"]
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "coatnet", *common, "--output-dir", str(tmp_path / "two")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:  # the one-process run beside it
        assert main([*common, "--output-dir", str(tmp_path / "one")]) == 0
    finally:
        error = two.communicate()[1]
    assert two.returncode == 0, error[-3000:]
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys()
    torch.manual_seed(5)  # the initial weights both runs started from
    start = create_model("coatnet_pico", num_classes=10, img_size=16, drop_path_rate=0.0).state_dict()
    params = [k for k in one if "running_" not in k and "num_batches" not in k]
    apart = sum((one[k] - two[k]).square().sum() for k in params).sqrt()
    moved = sum((one[k] - start[k]).square().sum() for k in params).sqrt()
    assert moved > 1 and apart / moved < 0.3, (apart, moved)
    m1, m2 = (json.loads((tmp_path / r / "metrics.jsonl").read_text()) for r in ("one", "two"))
    assert m1["step"] == m2["step"] == 1437 // 64
    assert abs(m1["train_loss"] - m2["train_loss"]) < 0.05 * m1["train_loss"]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    # Only rank 0 writes: one set of files, one checkpoint.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    # The figures each process recorded on its share of the images are the saved checkpoint's: the
    # processes evaluate with the first one's BatchNorm statistics, which it saves.
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "two"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["top1"], result["top5"]) == (m2["top1"], m2["top5"])
    assert result["loss"] == pytest.approx(m2["eval_loss"], rel=1e-5)
    # Resumed with no epochs left, the run's summary stays its own; a DDP checkpoint resumes in one process.
    summary = (tmp_path / "two" / "summary.json").read_text()
    assert main(["train", "--resume", "--epochs", "1", "--output-dir", str(tmp_path / "two")]) == 0
    assert (tmp_path / "two" / "summary.json").read_text() == summary
    assert main(["train", "--resume", "--epochs", "2", "--output-dir", str(tmp_path / "two")]) == 0
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["epochs"] == 2


def test_gradient_accumulation_takes_the_same_steps_in_micro_batches(tmp_path):
    """--grad-accum-steps 4 splits each step's batch of 64 into 4 micro-batches: the same steps and
    samples. BatchNorm normalises each micro-batch on its own, so the runs agree closely, as DDP's do
    (test_torchrun_two_processes_match_one), not bit for bit."""
    common = ["--img-size", "16", "--batch-size", "64", "--epochs", "1", "--warmup-steps", "2", "--seed", "5",
              "--label-smoothing", "0"]
    for name, extra in (("whole", []), ("micro", ["--grad-accum-steps", "4", "--grad-checkpointing"])):
        assert main(["train", *common, *extra, "--output-dir", str(tmp_path / name)]) == 0
    whole, micro = weights(tmp_path / "whole"), weights(tmp_path / "micro")
    torch.manual_seed(5)
    start = create_model("coatnet_pico", num_classes=10, img_size=16, drop_path_rate=0.0).state_dict()
    params = [k for k in whole if "running_" not in k and "num_batches" not in k]
    apart = sum((whole[k] - micro[k]).square().sum() for k in params).sqrt()
    moved = sum((whole[k] - start[k]).square().sum() for k in params).sqrt()
    assert moved > 1 and apart / moved < 0.3, (apart, moved)
    assert json.loads((tmp_path / "micro" / "metrics.jsonl").read_text())["step"] == 1437 // 64


def _recorded_steps(monkeypatch, cfg, out: Path, before_step=None) -> list[dict]:
    """Train ``cfg`` into ``out`` in this process, recording for each optimizer step the rate it steps
    at, the batch, what train_step returns (loss, logits) and the weights after it. ``before_step(run,
    images, labels)`` runs before each step, its result recorded as "before"."""
    import coatnet.train as train_module

    steps, real_step = [], train_module.train_step

    def recording(run, images, labels):
        record = dict(labels=labels.clone(), lr=[])
        if before_step is not None:
            record["before"] = before_step(run, images, labels)
        handle = run.optimizer.register_step_pre_hook(
            lambda optimizer, *_: record["lr"].append(optimizer.param_groups[0]["lr"]))
        try:
            record["loss"], record["logits"] = real_step(run, images, labels)
        finally:
            handle.remove()
        record["grads"] = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
        record["state"] = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        steps.append(record)
        return record["loss"], record["logits"]

    monkeypatch.setattr(train_module, "train_step", recording)
    train_module.train(cfg, output_dir=out)
    return steps


def _small_tree(tmp_path: Path) -> Path:
    from test_data import make_tree

    return make_tree(tmp_path / "data", per_class=5)  # 15 training images: 3 steps of 4 an epoch


def test_each_step_takes_its_scheduled_rate_and_minimises_label_smoothed_cross_entropy(tmp_path, monkeypatch):
    """The k-th optimizer step runs at lr_schedule's rate for step k (the first warm-up step at
    lr / warmup_steps, not the second's), and the loss it minimises is the cross-entropy with
    --label-smoothing."""
    import torch.nn.functional as F

    from coatnet.train import TrainConfig, lr_schedule

    cfg = TrainConfig(data="imagefolder", data_dir=str(_small_tree(tmp_path)), img_size=16, batch_size=4, epochs=2,
                      warmup_steps=3, label_smoothing=0.3, seed=3)
    steps = _recorded_steps(monkeypatch, cfg, tmp_path / "run")
    assert len(steps) == 6 and all(len(s["lr"]) == 1 for s in steps)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    factor = lr_schedule(optimizer, cfg, total_steps=6).lr_lambdas[0]
    assert [s["lr"][0] for s in steps] == pytest.approx([cfg.lr * factor(k) for k in range(6)], rel=1e-12)
    assert steps[0]["lr"][0] == pytest.approx(cfg.lr / 3)
    for s in steps:
        expected = F.cross_entropy(s["logits"].float(), s["labels"], label_smoothing=0.3)
        torch.testing.assert_close(s["loss"], expected)


def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(tmp_path, monkeypatch):
    """With BatchNorm on its running statistics (eval mode) and no clipping, a step's gradient in 4
    micro-batches is the gradient of the whole batch's mean loss, not 4 times it."""
    from coatnet.train import TrainConfig

    def whole_batch_gradient(run, images, labels):
        run.net.eval()  # train_step leaves the mode as it finds it: each micro-batch normalised alike
        run.model.zero_grad(set_to_none=True)
        run.criterion(run.net(images), labels).backward()
        return {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}

    cfg = TrainConfig(data="imagefolder", data_dir=str(_small_tree(tmp_path)), img_size=16, batch_size=4, epochs=1,
                      warmup_steps=1, grad_accum_steps=4, clip_grad=0, seed=3)
    steps = _recorded_steps(monkeypatch, cfg, tmp_path / "run", before_step=whole_batch_gradient)
    assert len(steps) == 3
    for s in steps:
        assert s["grads"].keys() == s["before"].keys()
        for name, grad in s["grads"].items():
            torch.testing.assert_close(grad, s["before"][name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_ema_averages_the_weights_and_batchnorm_statistics_with_its_decay(tmp_path, monkeypatch):
    """--ema d: after the first step the average is the weights, then each step moves it a fraction
    1 - d of the way to them; BatchNorm's running statistics are averaged too (evaluated with
    statistics of the initial weights, the average's accuracy would be noise)."""
    from coatnet.train import TrainConfig

    cfg = TrainConfig(data="imagefolder", data_dir=str(_small_tree(tmp_path)), img_size=16, batch_size=4, epochs=1,
                      warmup_steps=1, ema=0.9, seed=3)
    steps = _recorded_steps(monkeypatch, cfg, tmp_path / "run")
    assert len(steps) == 3
    expected = {k: v.double() for k, v in steps[0]["state"].items() if v.is_floating_point()}
    for s in steps[1:]:
        expected = {k: 0.9 * e + 0.1 * s["state"][k].double() for k, e in expected.items()}
    ema = load_file(str(tmp_path / "run" / "last" / "ema.safetensors"))
    assert any("running_var" in k for k in expected)
    for k, e in expected.items():
        torch.testing.assert_close(ema[k].double(), e, rtol=1e-5, atol=1e-6, msg=k)


def test_resume_with_drop_path_mixup_and_ema_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    """Stopped after its checkpoint part way through epoch 1, a run with random draws in its steps
    (stochastic depth, Mixup) and an EMA ends, resumed, bit for bit where the uninterrupted run does:
    the checkpoint gives back the random generator's state and the EMA's count of averages."""
    from coatnet.train import TrainConfig, train

    cfg = TrainConfig(data="imagefolder", data_dir=str(_small_tree(tmp_path)), img_size=16, batch_size=4, epochs=2,
                      save_every=2, warmup_steps=1, seed=3, drop_path=0.3, mixup=0.8, ema=0.9)
    train(cfg, output_dir=tmp_path / "reference")
    out = tmp_path / "run"
    train_until(monkeypatch, "evaluate_epoch", cfg, out)  # stopped after its save at step 2, mid-epoch
    assert load_checkpoint(out / "last").train_state["step"] == 2
    train(cfg, output_dir=out, resume=True)
    for name in ("model.safetensors", "ema.safetensors"):
        reference = load_file(str(tmp_path / "reference" / "last" / name))
        assert_bitwise_equal(reference, load_file(str(out / "last" / name)))


def test_micro_batches_too_small_for_batchnorm_are_said(tmp_path, monkeypatch, capsys):
    from coatnet.train import Dist, TrainConfig, start_run

    def built(*args, **kwargs):  # the data is built: stop before the model
        raise KeyboardInterrupt

    monkeypatch.setattr("coatnet.train.make_loader", built)
    for steps, said in ((8, True), (4, False)):  # micro-batches of 4, then of 8
        with pytest.raises(KeyboardInterrupt):
            start_run(TrainConfig(img_size=16, batch_size=32, grad_accum_steps=steps), Dist(0, 1, torch.device("cpu")),
                      tmp_path)
        out = capsys.readouterr().out
        assert ("note: --grad-accum-steps 8 leaves micro-batches of 4 image(s): BatchNorm normalises each on its own"
                in out) == said, out


def test_amp_on_a_cpu_that_emulates_bfloat16_is_said(tmp_path, monkeypatch, capsys):
    """--amp on an x86 CPU without AVX512-BF16 or AMX trains 2-3.5x slower than float32: one note says so."""
    from coatnet.train import Dist, TrainConfig, start_run
    from coatnet.validate import slow_bfloat16

    def built(*args, **kwargs):  # the data is built: stop before the model
        raise KeyboardInterrupt

    monkeypatch.setattr("coatnet.train.make_loader", built)
    cpu = torch.device("cpu")
    for machine, amp, said in ((dict(avx512_bf16=False, amx_bf16=False), True, True),
                               (dict(avx512_bf16=False, amx_bf16=False), False, False),
                               (dict(avx512_bf16=True, amx_bf16=False), True, False),
                               (dict(avx512_bf16=False, amx_bf16=True), True, False)):
        capabilities = dict(torch.cpu.get_capabilities(), architecture="x86_64", **machine)
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
        with pytest.raises(KeyboardInterrupt):
            start_run(TrainConfig(img_size=16, amp=amp), Dist(0, 1, cpu), tmp_path)
        out = capsys.readouterr().out
        assert ("note: --amp trains in bfloat16, and this CPU has no native bfloat16 (neither AVX512-BF16 nor AMX), "
                "so it is emulated: 2-3.5x slower than float32; --no-amp trains in float32" in out) == said, out
    capabilities = dict(architecture="x86_64", avx512_bf16=False, amx_bf16=False)
    assert slow_bfloat16(cpu) and slow_bfloat16(torch.device("cuda")) is None  # the GPU's is its own
    capabilities["architecture"] = "aarch64"  # Arm's bfloat16 flags are other ones: nothing is claimed
    assert slow_bfloat16(cpu) is None
    monkeypatch.delattr(torch.cpu, "get_capabilities")  # an older torch: nothing is claimed
    assert slow_bfloat16(cpu) is None


def test_train_on_imagefolder_skips_and_counts_bad_files(tmp_path, monkeypatch, capsys):
    from test_data import make_tree

    root = make_tree(tmp_path / "data")
    (root / "train" / "dog" / "broken.png").write_bytes(b"not a png")  # refused when listing
    cut = root / "val" / "cat" / "1.jpg"  # header intact, pixels cut: fails only when decoded
    data = cut.read_bytes()
    cut.write_bytes(data[: data.index(b"\xff\xda") + 40])
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # a relative --data-dir is recorded absolute: eval finds it from anywhere
    with pytest.warns(UserWarning):
        assert main(["train", "--data", "imagefolder", "--data-dir", "data", "--img-size", "32",
                     "--batch-size", "4", "--epochs", "1", "--randaugment", "2,15", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "imagefolder" and summary["skipped_files"] == 2
    # The cut validation image is left out of the evaluation, and out of the count the last line gives.
    assert json.loads((out / "metrics.jsonl").read_text())["eval_images"] == 8
    assert " on 8 held-out imagefolder images in " in capsys.readouterr().out
    meta = load_checkpoint(out / "last").meta
    assert meta["pretrained_cfg"]["label_names"] == ["bird", "cat", "dog"] and meta["data_dir"] == str(root)


def test_train_on_cifar10(tmp_path):
    from test_data import make_cifar

    make_cifar(tmp_path / "data", "cifar10")
    out = tmp_path / "run"
    assert main(["train", "--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--batch-size", "8",
                 "--epochs", "1", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_images"] == 20 and summary["val_images"] == 3 and summary["img_size"] == 32


def test_resume_a_checkpoint_of_the_earlier_format(reference_run, tmp_path):
    """Checkpoints written before config.json held the run's settings (they were in train_state.pt,
    and the LR schedule's length was not saved) still resume and extend."""
    import shutil

    out = tmp_path / "old"
    shutil.copytree(reference_run, out, symlinks=True)
    last = out / "last"
    meta = json.loads((last / "config.json").read_text())
    settings = meta.pop("train_config")
    (last / "config.json").write_text(json.dumps(meta))
    state = torch.load(last / "train_state.pt", weights_only=True)
    del state["schedule_steps"]
    torch.save(state | {"train_config": settings}, last / "train_state.pt")
    assert main(["train", "--resume", "--epochs", "3", "--output-dir", str(out)]) == 0
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lrs) == 3 and lrs[2] <= lrs[1]


@pytest.mark.parametrize("device,local_rank,expected", [(None, "1", "cuda:1"), ("cuda", "1", "cuda:1"),
                                                        ("cuda:0", "1", "cuda:0")])
def test_cuda_without_an_index_is_each_processs_own_gpu(monkeypatch, device, local_rank, expected):
    """`--device cuda` under torchrun: each process on the GPU its LOCAL_RANK names (before, FSDP
    refused a device without an index, and DDP put every process on GPU 0)."""
    from coatnet import train

    chosen = []
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    d = train.setup_distributed(device)
    assert d.device == torch.device(expected) and chosen == [torch.device(expected)]
    monkeypatch.setenv("LOCAL_RANK", "2")  # a third process on a machine of two GPUs
    with pytest.raises(ValueError, match=r"--device cuda \(LOCAL_RANK 2\): this machine has 2 CUDA device"):
        train.setup_distributed("cuda")


def test_the_paper_recipes_hold_table_10():
    """FACTS.md's Table 10 values. RandAugment's magnitude 15 is on TensorFlow's scale (15/10 of each
    operation's range); torchvision's scale stops at the range, so the recipes take all of it (the
    full rotation of 30 degrees, shear of 0.3 and colour factor of 1 +- 0.9), as timm's rand-m15 does
    (it clips at 10), not torchvision's 15, which is half of it: the paper's magnitude 5."""
    from torchvision.transforms import v2

    from coatnet.train import RECIPES

    pre, fine = RECIPES["imagenet1k-pretrain"], RECIPES["imagenet1k-finetune"]
    assert (pre.img_size, pre.epochs, pre.batch_size, pre.lr, pre.min_lr, pre.warmup_steps, pre.weight_decay,
            pre.clip_grad, pre.label_smoothing, pre.mixup, pre.ema, pre.drop_path) == \
        (224, 300, 4096, 1e-3, 1e-5, 10_000, 0.05, 1.0, 0.1, 0.8, 0.0, None)  # None: the model's 0.2/0.3/0.5/0.7
    assert (fine.img_size, fine.epochs, fine.batch_size, fine.lr, fine.weight_decay, fine.ema) == \
        (384, 30, 512, 5e-5, 1e-8, 0.9999)
    space = v2.RandAugment._AUGMENTATION_SPACE
    for recipe in (pre, fine):
        layers, magnitude = recipe.randaugment
        ranges = {op: float(space[op][0](31, 224, 224)[magnitude]) for op in ("Rotate", "ShearX", "Brightness")}
        assert layers == 2 and ranges == pytest.approx(dict(Rotate=30.0, ShearX=0.3, Brightness=0.9))


def test_the_finetune_recipe_holds_table_10s_shared_values():
    """The values FACTS.md gives once for both columns (min LR 1e-5, gradient clip 1.0, label smoothing
    0.1, Mixup 0.8, the model's stochastic depth), which the test above checks for pre-training only.
    (Warm-up is left out: FACTS.md gives "10K steps" without a fine-tuning value; the recipe has none.)"""
    from coatnet.train import RECIPES

    fine = RECIPES["imagenet1k-finetune"]
    assert (fine.min_lr, fine.clip_grad, fine.label_smoothing, fine.mixup, fine.cutmix, fine.drop_path) == \
        (1e-5, 1.0, 0.1, 0.8, 0.0, None)
    assert fine.randaugment == RECIPES["imagenet1k-pretrain"].randaugment and fine.model == "coatnet_0"


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "5000"], "1437 images, fewer than --batch-size 5000: give a --batch-size of 1437 or less"),
    (["--model", "coatnet_99"], "unknown model 'coatnet_99'"),  # found once the model is built
])
def test_a_run_refused_in_a_users_folder_leaves_it_as_it_was(tmp_path, capsys, argv, message):
    """Refused after taking the folder's lock, a run in an existing folder of the user's takes its lock
    file away again (before: an empty .lock left, which --resume then took for a run stopped early)."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", "--img-size", "16", "--epochs", "1", *argv, "--output-dir", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_randaugment_0_turns_off_the_recipes(monkeypatch):
    """--randaugment 0 (none, off) is off, not a flag left out: the recipe's RandAugment yields to it."""
    import coatnet.train

    given = []
    monkeypatch.setattr(coatnet.train, "train", lambda config, **kwargs: given.append(config))
    for off in ("0", "none", "off"):
        assert main(["train", "--recipe", "imagenet1k-pretrain", "--randaugment", off]) == 0
    assert main(["train", "--recipe", "imagenet1k-pretrain"]) == 0
    assert [c.randaugment for c in given] == [None, None, None, (2, 30)]


@pytest.mark.parametrize("warmup,said", [(9, False), (10, True), (11, True)])
def test_a_warm_up_as_long_as_the_run_is_said(tmp_path, capsys, warmup, said):
    """11 steps (1437 digits at batch 128): a warm-up of 10 ends at the last step, at --lr, as one of 11
    does, so neither decays; one of 9 leaves a step of decay (before: only 11 or more was said)."""
    from coatnet.train import Dist, TrainConfig, start_run

    start_run(TrainConfig(img_size=16, batch_size=128, epochs=1, warmup_steps=warmup),
              Dist(0, 1, torch.device("cpu")), tmp_path)
    assert ("covers the whole run of 11 steps" in capsys.readouterr().out) == said


def test_gradient_accumulation_skips_ddps_all_reduce_under_compile(tmp_path):
    """torch.compile wraps the DDP module: --compile with --grad-accum-steps all-reduced every
    micro-batch's gradients (before), as if DDP's no_sync were not there."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from coatnet.train import _gradient_sync

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(torch.nn.Linear(2, 2))
        for net in (ddp, torch.compile(ddp)):
            run = type("Run", (), {"net": net, "config": type("Config", (), {"fsdp": False})})
            with _gradient_sync(run, sync=False):
                assert not ddp.require_backward_grad_sync
            with _gradient_sync(run, sync=True):
                assert ddp.require_backward_grad_sync
    finally:
        dist.destroy_process_group()


def test_resume_part_way_through_an_epoch_on_another_number_of_processes_trains_its_rest_once(tmp_path, capsys,
                                                                                              monkeypatch):
    """15 training images in batches of 4: 2 processes take 8 each (one repeated) in 4 steps, 1 process
    3 steps. A 2-process run's checkpoint after 2 steps, resumed by 1 process, trains the epoch's
    other 8 positions, in the 2 steps the epoch has on 2 processes (before: the 1-process order's 1
    step, 3 of the epoch's samples never trained). The same run's checkpoint on 2 processes is stood
    in for by a 1-process one recorded as 2 processes': both took the same 8 samples."""
    import coatnet.train as train_module
    from test_data import make_tree
    from torch.utils.data import DistributedSampler

    from coatnet.train import TrainConfig, train

    root = make_tree(tmp_path / "data", per_class=5)
    out = tmp_path / "run"
    cfg = TrainConfig(data="imagefolder", data_dir=str(root), img_size=16, batch_size=4, epochs=1, save_every=2,
                      warmup_steps=1, seed=3)

    train_until(monkeypatch, "evaluate_epoch", cfg, out)  # killed after its steps: `last` is the save at step 2
    state_file = out / "last" / "train_state.pt"
    state = torch.load(state_file, weights_only=True)
    assert (state["step"], state["batch_in_epoch"]) == (2, 2)
    fresh = dict(loss_sum=0.0, correct=0, count=0, seconds=0.0)
    state |= dict(rng=state["rng"] * 2, progress=[state["progress"][0], fresh], world_size=2)
    state.pop("epoch_world_size", None)  # as written before it was recorded: the processes that wrote it
    torch.save(state, state_file)

    trained = []
    make_loader = train_module.make_loader

    def spy(dataset, indices, batch_size, *args, **kwargs):
        if isinstance(dataset, train_module.SeededSamples):  # the whole batches it trains on (drop_last)
            trained.extend(i for _, i in indices[:len(indices) - len(indices) % batch_size])
        return make_loader(dataset, indices, batch_size, *args, **kwargs)

    monkeypatch.setattr(train_module, "make_loader", spy)
    capsys.readouterr()
    train(cfg, output_dir=out, resume=True)
    shares = []
    for rank in range(2):
        sampler = DistributedSampler(range(15), num_replicas=2, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(0)
        shares.append(list(sampler))
    two_processes = [i for position in zip(*shares) for i in position]  # the 2-process run's order, 16 positions
    assert trained == two_processes[8:]
    assert sorted(set(two_processes[:8] + trained)) == list(range(15))  # every sample of the epoch
    assert json.loads((out / "metrics.jsonl").read_text())["step"] == 4
    assert "note: epoch 1 began on 2 process(es): its remaining samples are trained once each" in \
        capsys.readouterr().out


@pytest.mark.parametrize("stop_in,change,said,steps", [
    ("evaluate_epoch", "add", "the rest of epoch 1 (2 steps) is drawn from the new set's order, so in that epoch some "
     "images may be trained twice and others not at all; the epochs after it take 4 steps each, while the "
     "learning-rate schedule keeps its recorded 6 steps, so the rate stays at --min-lr over the last 2 of the run's "
     "8 steps", [4, 8]),
    ("report_epoch", "add", "the epochs from 2 on take 4 steps each, while the learning-rate schedule keeps its "
     "recorded 6 steps, so the rate stays at --min-lr over the last 1 of the run's 7 steps", [3, 7]),
    # 9 images: 2 steps an epoch, as many as the stopped epoch took: it ends there, without a step or a loop
    ("evaluate_epoch", "remove", "epoch 1 ends at the 2 steps it took, as many as the new set has or more; the epochs "
     "after it take 2 steps each, while the learning-rate schedule keeps its recorded 6 steps, so the run ends at "
     "step 4 of them, before the rate has decayed to --min-lr", [2, 4]),
])
def test_resume_on_a_changed_training_set_says_what_it_trains(tmp_path, capsys, monkeypatch, stop_in, change, said,
                                                              steps):
    """15 training images in batches of 4: 3 steps an epoch, 6 in the 2-epoch run's schedule. Stopped after
    its save at step 2 (part way through epoch 1) or at the end of epoch 1, the run resumes on 4 images
    more (19: 4 steps an epoch) or 6 fewer (9). Each epoch's order and steps then follow the new set, and
    the schedule keeps its length: said in one note (before: nothing said, the checkpoint did not record
    the set's size). The same checkpoint resumed on the set as it was says nothing."""
    import shutil

    from test_data import make_tree, write_image

    from coatnet.train import TrainConfig, train

    root = make_tree(tmp_path / "data", per_class=5)
    out = tmp_path / "run"
    cfg = TrainConfig(data="imagefolder", data_dir=str(root), img_size=16, batch_size=4, epochs=2, save_every=2,
                      warmup_steps=1, seed=3)

    train_until(monkeypatch, stop_in, cfg, out)
    shutil.copytree(out, tmp_path / "same", symlinks=True)
    capsys.readouterr()
    train(cfg, output_dir=tmp_path / "same", resume=True)
    assert "training set" not in capsys.readouterr().out
    if change == "add":
        for k in range(4):
            write_image(root / "train" / "cat" / f"new{k}.png", 100 + k, "PNG")
    else:
        for path in root.glob("train/*/[34].*"):
            path.unlink()
    train(cfg, output_dir=out, resume=True)
    notes = [line for line in capsys.readouterr().out.splitlines() if "training set" in line]
    images = 19 if change == "add" else 9
    assert notes == [f"note: the training set has {images} images, 15 when this checkpoint was saved: {said}"]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == steps
    assert (history[-1]["lr"] == pytest.approx(cfg.min_lr)) == ("stays at --min-lr" in said)  # as the note says


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)


@pytest.mark.parametrize("flags", [["--save-every", "2"], ["--fsdp", "--save-every", "1"]])
def test_a_process_killed_under_torchrun_is_one_line_from_the_others(tmp_path, flags):
    """SIGKILL of one worker (the kernel's OOM killer, a machine lost): the process left waiting on it in a
    collective says so in one line, with what continues the run (before: gloo's 25-line traceback, or
    in an --fsdp run's save "cannot write checkpoint ...: free some space or fix the folder's permissions").
    torchrun's --monitor-interval gives it the time to say it before torchrun stops it."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "--monitor-interval", "3", "-m", "coatnet", "train", "--img-size", "16", "--batch-size",
                             "16", "--epochs", "1", *flags, "--output-dir", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while not os.path.islink(out / "last") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    worker = next(pid for pid in _children(proc.pid) if _rank_of(pid) == 1)
    os.kill(worker, signal.SIGKILL)
    stderr = proc.communicate(timeout=120)[1]
    errors = [line for line in stderr.splitlines() if line.startswith("coatnet train: error:")]
    assert len(errors) == 1, stderr[-3000:]
    # gloo's words: "Connection reset by peer", or "Connection closed by peer [ADDR]:PORT"
    assert re.fullmatch(rf"coatnet train: error: process 0: another process of the job stopped \(.*by peer[^)]*\); its "
                        rf"own error, or torchrun's report, says why; then `coatnet train --resume {out}` under "
                        rf"torchrun, on the job's 2 processes, continues it from its last checkpoint \(step \d+\)",
                        errors[0]), errors[0]
    assert "[rank0]: Traceback" not in stderr and "free some space" not in stderr
    assert load_checkpoint(out / "last").train_state["step"] > 0


def test_ctrl_c_of_torchrun_is_said_once(tmp_path):
    """Ctrl-C (SIGINT to torchrun, which passes it on to every worker): the first process says what
    continues the run; the others leave with status 130 and say nothing (before: a bare
    "coatnet train: interrupted" line from each of them)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "coatnet", "train", *TINY, "--batch-size", "16", "--epochs", "1", "--save-every",
                             "2", "--output-dir", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    deadline = time.time() + 120
    while not os.path.islink(out / "last") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    said = [line for line in stderr.splitlines() if line.startswith("coatnet train:")]
    assert len(said) == 1 and said[0].startswith(f"coatnet train: interrupted; `coatnet train --resume {out}` under "
                                                 f"torchrun, on the job's 2 processes, continues it from its last "
                                                 f"checkpoint (step "), stderr[-3000:]


def test_a_resume_that_cannot_run_on_these_processes_says_what_can(reference_run):
    """Found with training's other checks (said once under torchrun, before the data is read): a run
    resumed with --fsdp added or dropped (before: said by every process once it had built its model),
    and a resumed run's batch, which it keeps, on processes that do not divide it (before: "give a
    multiple of 3", which the resume then refused as another --batch-size)."""
    from dataclasses import replace

    from coatnet.train import Dist, _check, resumed_config

    ckpt = load_checkpoint(reference_run / "last")
    cfg = resumed_config(True, reference_run)
    with pytest.raises(ValueError, match=r"was written by a run without --fsdp and resumes only so: drop --fsdp; or "
                                         rf"start a new run from its weights with --pretrained {ckpt.path}$"):
        _check(replace(cfg, fsdp=True), Dist(0, 1, torch.device("cpu")), ckpt, reference_run)
    with pytest.raises(ValueError) as e:
        _check(cfg, Dist(0, 3, torch.device("cpu")), ckpt, reference_run)  # batch 128
    assert str(e.value) == (f"the resumed run's --batch-size 128 (global, kept on resume) is not divisible by 3 "
                            f"process(es) x --grad-accum-steps 1; resume it on a number of processes that divides it "
                            f"(e.g. 2), or start a new run from its weights with --pretrained {ckpt.path}")
    _check(cfg, Dist(0, 2, torch.device("cpu")), ckpt, reference_run)  # 2 processes resume it



def test_each_epoch_is_shuffled_anew_and_the_same_for_a_seed():
    from coatnet.train import epoch_order

    orders = [epoch_order(50, seed=3, epoch=e, world_size=1) for e in range(3)]
    assert all(sorted(o) == list(range(50)) for o in orders)
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    assert epoch_order(50, seed=3, epoch=1, world_size=1) == orders[1]
    assert epoch_order(50, seed=4, epoch=1, world_size=1) != orders[1]
    padded = epoch_order(50, seed=3, epoch=1, world_size=4)  # 52: the first two repeated
    assert padded == orders[1] + orders[1][:2]


def test_the_curves_legend_says_whether_training_targets_were_smoothed_or_mixed(tmp_path, monkeypatch):
    """curves.png's training loss is named by the run's own targets: plain labels, or smoothed (label
    smoothing) and mixed (CutMix as Mixup) (before: "smoothed, mixed" whatever the run)."""
    from coatnet import train as train_module

    drawn = []
    monkeypatch.setattr(train_module, "plot_curves", lambda *args, **kwargs: drawn.append(kwargs))
    plain, smoothed_and_cut = (["--label-smoothing", "0", "--mixup", "0", "--cutmix", "0"],
                               ["--label-smoothing", "0.1", "--mixup", "0", "--cutmix", "1"])
    for flags, said in ((plain, dict(smoothed=False, mixed=False)),
                        (smoothed_and_cut, dict(smoothed=True, mixed=True))):
        out = tmp_path / f"run{len(drawn)}"
        assert main(["train", *TINY, "--epochs", "1", *flags, "--output-dir", str(out)]) == 0
        assert drawn[-1] == said


def test_finetuning_from_weights_without_a_classifier_says_a_new_one_and_no_theirs(tmp_path, capsys):
    """Headless weights (num_classes=0): the line says a new classifier for the data's classes, without a
    "(theirs: 0)" of a classifier they do not have."""
    folder = create_model("coatnet_pico", num_classes=0, img_size=16).save_pretrained(tmp_path / "w")
    out = tmp_path / "a"
    assert main(["train", "--pretrained", str(folder), *TINY, "--epochs", "1", "--output-dir", str(out)]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fine-tuning from")]
    assert said == [f"fine-tuning from the weights of {folder}, a new classifier for the 10 classes"], said
