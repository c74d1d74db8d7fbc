"""``coatnet train --fsdp``: FSDP2 over 2 gloo processes on the CPU, its sharded checkpoints, exact resume."""

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import coatnet
from coatnet.checkpoint import CheckpointError, load_checkpoint
from coatnet.cli import main
from coatnet.train import resumed_config, train
from test_train import ENV, _kill_when, assert_bitwise_equal, weights

# bfloat16 weights gathered for compute, EMA and activation checkpointing: every part FSDP touches.
FLAGS = ["--img-size", "16", "--batch-size", "64", "--epochs", "1", "--warmup-steps", "2", "--seed", "5",
         "--label-smoothing", "0", "--ema", "0.9", "--amp", "--grad-checkpointing", "--save-every", "4"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "coatnet",
            "train", "--fsdp", *FLAGS]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted 2-process FSDP run, and what it printed; beside it, in a process of its own,
    the same run in one process without FSDP: ``one``."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    one = subprocess.Popen([sys.executable, "-m", "coatnet", "train", *FLAGS, "--output-dir", str(out.parent / "one")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        done = subprocess.run(TORCHRUN + ["--output-dir", str(out)], capture_output=True, text=True, env=ENV)
    finally:
        error = one.communicate()[1]
    assert done.returncode == 0, done.stderr[-3000:]
    assert one.returncode == 0, error[-3000:]
    return out, done.stdout


def test_two_sharded_processes_match_one_and_hold_half_each(fsdp_run, capsys):
    """As for DDP (test_train.py::test_torchrun_two_processes_match_one): the same samples in each
    step, BatchNorm statistics per process, so close but not bit for bit."""
    out, stdout = fsdp_run
    one, two = weights(out.parent / "one"), weights(out)
    torch.manual_seed(5)
    start = coatnet.create_model("coatnet_pico", num_classes=10, img_size=16, drop_path_rate=0.0).state_dict()
    params = [k for k in one if "running_" not in k and "num_batches" not in k]
    apart = sum((one[k] - two[k]).square().sum() for k in params).sqrt()
    moved = sum((one[k] - start[k]).square().sum() for k in params).sqrt()
    assert moved > 1 and apart / moved < 0.3, (apart, moved)
    m1, m2 = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in
              (out.parent / "one", out))
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [22]
    assert abs(m1[0]["train_loss"] - m2[0]["train_loss"]) < 0.05 * m1[0]["train_loss"]
    # `coatnet eval` evaluates as the --amp run did (bfloat16 autocast), so its figures come again;
    # --no-amp in float32. (Not FSDP's: its gathered weights are bfloat16, which autocast's are not.)
    reports = {}
    for flag in ("--amp", "--no-amp", None):
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(out.parent / "one"), "--json", *[flag] * bool(flag)]) == 0
        reports[flag] = json.loads(capsys.readouterr().out)
    assert reports[None] == reports["--amp"] and reports["--amp"]["amp"] and not reports["--no-amp"]["amp"]
    assert (reports[None]["top1"], reports[None]["top5"]) == (m1[0]["top1"], m1[0]["top5"])
    assert reports[None]["loss"] == pytest.approx(m1[0]["eval_loss"], rel=1e-6)
    assert reports["--no-amp"]["loss"] != pytest.approx(m1[0]["eval_loss"], rel=1e-4)
    # Each process holds half of the weights, gradients and AdamW state, and writes half of the latter.
    found = re.search(r"each process holds ([\d.]+) MiB .* \(([\d.]+) MiB unsharded\)", stdout)
    held, whole = map(float, found.groups())
    assert 0.45 < held / whole < 0.6, (held, whole)
    shards = sorted((out / "last" / "optimizer").glob("*.distcp"))
    sizes = [f.stat().st_size for f in shards]
    assert len(shards) == 2 and 0.8 < sizes[0] / sizes[1] < 1.25, sizes


def test_sigkill_and_resume_is_bit_identical(fsdp_run, tmp_path):
    import shutil

    # Beside the run to kill: a refused resume (of a copy of the finished run) is one line for the
    # job, said by the first process (before: one per process).
    finished = tmp_path / "finished"
    shutil.copytree(fsdp_run[0], finished, symlinks=True)
    refused = subprocess.Popen(TORCHRUN[:-len(FLAGS)] + ["--resume", "--seed", "6", "--output-dir", str(finished)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    out = tmp_path / "killed"
    proc = subprocess.Popen(TORCHRUN + ["--output-dir", str(out)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        killed_at = _kill_when(proc, out, 4)
    finally:
        stderr = refused.communicate()[1]
    errors = [line for line in stderr.splitlines() if line.startswith("coatnet train: error:")]
    assert refused.returncode != 0 and errors == [
        f"coatnet train: error: --seed 6 differs from the resumed run's 5: a resumed run keeps its data, batch size, "
        f"seed and image size; drop --seed to resume it, or start a new run from its weights with --pretrained "
        f"{finished / 'last'}"], stderr[-3000:]
    assert killed_at < 22 and load_checkpoint(out / "last").train_state["step"] == killed_at  # mid-epoch
    resumed = subprocess.run(TORCHRUN[:-len(FLAGS)] + ["--resume", "--output-dir", str(out)], capture_output=True,
                             text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = fsdp_run[0]
    assert_bitwise_equal(weights(reference), weights(out))
    losses = [[json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (reference, out)]
    assert losses[0] == losses[1]


def test_a_sharded_checkpoint_is_a_model_folder_and_resumes_on_one_process(fsdp_run, tmp_path, capsys):
    import shutil

    from coatnet.cli import main

    out = tmp_path / "run"
    shutil.copytree(fsdp_run[0], out, symlinks=True)
    model = coatnet.from_pretrained(out / "best")  # the gathered EMA weights: nothing to consolidate
    assert model.num_classes == 10
    assert main(["eval", "--checkpoint", str(out / "best"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 360
    # DCP reshards the 2 processes' optimizer state for 1 process (FSDP over a group of one).
    assert main(["train", "--resume", "--epochs", "2", "--output-dir", str(out)]) == 0
    assert load_checkpoint(out / "last").train_state["step"] == 44
    # A missing or damaged shard of the optimizer state is one line, the checkpoint left as it was.
    last = out / "last"
    for damage in (lambda: next((last / "optimizer").glob("*.distcp")).write_bytes(b"damaged"),
                   lambda: shutil.rmtree(last / "optimizer")):
        damage()
        capsys.readouterr()
        assert main(["train", "--resume", "--epochs", "3", "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "/optimizer' cannot be read (" in err and "a shard is missing or damaged" in err
    assert load_checkpoint(out / "last").train_state["step"] == 44
    # A run without --fsdp cannot resume it: the optimizer state is sharded.
    with pytest.raises(CheckpointError, match="was written by a run with --fsdp and resumes only so: add --fsdp"):
        train(replace(resumed_config(True, out), fsdp=False, epochs=3), output_dir=out, resume=True)


def test_a_full_disk_while_writing_the_sharded_optimizer_state(tmp_path, monkeypatch):
    """DCP reports a failed write of any process as a CheckpointException, a BaseException that no
    `except Exception` stops: one line naming the failure in every process, the shards removed."""
    import torch.distributed.checkpoint as dcp

    from coatnet import sharding

    def full(state, checkpoint_id):
        Path(checkpoint_id).mkdir()
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half")
        raise dcp.api.CheckpointException("save", {1: (OSError(28, "No space left on device"), None)})

    monkeypatch.setattr(dcp, "save", full)
    model = coatnet.create_model("coatnet_pico", num_classes=3)
    with pytest.raises(CheckpointError) as e:
        sharding.save_optimizer(model, torch.optim.AdamW(model.parameters()), tmp_path / ".shards-00000004.tmp")
    assert str(e.value) == (f"cannot write checkpoint {tmp_path / '.shards-00000004.tmp'} (process 1: [Errno 28] No "
                            f"space left on device); no checkpoint was kept; free some space or fix the folder's "
                            f"permissions and continue with --resume")
    assert list(tmp_path.iterdir()) == []
    # Every process gets DCP's gathered failure: under torchrun the first one says it, the others leave
    # quietly (before: the same line once per process).
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    with pytest.raises(SystemExit) as e:
        sharding.save_optimizer(model, torch.optim.AdamW(model.parameters()), tmp_path / ".shards-00000004.tmp")
    assert e.value.code == 2 and list(tmp_path.iterdir()) == []


def test_a_process_lost_while_writing_the_sharded_optimizer_state_is_not_a_write_failure(tmp_path, monkeypatch):
    """A peer killed while DCP writes fails the collective with gloo's "Connection reset by peer": that is
    no full disk or permission to fix (before: "cannot write checkpoint ...; free some space or fix the
    folder's permissions"). It goes up as it is, for training to say the process was lost; the shards go."""
    import torch.distributed.checkpoint as dcp

    from coatnet import sharding

    lost = RuntimeError("[../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:1: Connection reset by peer. "
                        "This is typically caused by a remote worker hanging or bugs in the application.")
    for error in (lost, dcp.api.CheckpointException("save", {0: (lost, None)})):
        def failing(state, checkpoint_id, error=error):
            Path(checkpoint_id).mkdir()
            raise error

        monkeypatch.setattr(dcp, "save", failing)
        model = coatnet.create_model("coatnet_pico", num_classes=3)
        with pytest.raises(type(error)) as e:
            sharding.save_optimizer(model, torch.optim.AdamW(model.parameters()), tmp_path / ".shards-00000004.tmp")
        assert e.value is error and list(tmp_path.iterdir()) == []


def test_a_failed_sharded_write_names_the_first_process_and_its_error_in_one_line(tmp_path, monkeypatch):
    """DCP gathers the failure of every process that failed: the line names the first of them (the one whose
    log to read), and an error without a message by its type (before, it would be an empty parenthesis)."""
    import torch.distributed.checkpoint as dcp

    from coatnet import sharding

    model = coatnet.create_model("coatnet_pico", num_classes=3)
    folder = tmp_path / ".shards-00000004.tmp"
    full, denied = OSError(28, "No space left on device"), PermissionError(13, "Permission denied")
    for failures, said in (({3: (full, None), 1: (denied, None)}, "process 1: [Errno 13] Permission denied"),
                           ({2: (RuntimeError(), None)}, "process 2: RuntimeError")):
        def failing(state, checkpoint_id, failures=failures):
            raise dcp.api.CheckpointException("save", failures)

        monkeypatch.setattr(dcp, "save", failing)
        with pytest.raises(CheckpointError) as e:
            sharding.save_optimizer(model, torch.optim.AdamW(model.parameters()), folder)
        assert f"cannot write checkpoint {folder} ({said}); no checkpoint was kept" in str(e.value), str(e.value)


def test_the_ema_of_a_sharded_model_averages_its_buffers_too():
    """A sharded model's EMA averages its parameters (DTensors) and its buffers (plain tensors, BatchNorm's
    statistics) each with the decay: a buffer left out would keep its first value for the whole run."""
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    from coatnet import sharding

    update = sharding.ema_avg_fn(get_ema_multi_avg_fn(0.9))
    ema, now = [torch.zeros(3), torch.ones(2)], [torch.ones(3), torch.full((2,), 3.0)]
    update(ema, now, torch.tensor(1))
    assert torch.allclose(ema[0], torch.full((3,), 0.1)) and torch.allclose(ema[1], torch.full((2,), 1.2))


def test_a_missing_optimizer_folder_is_one_line_saying_so(tmp_path, capfd):
    """A checkpoint whose optimizer/ folder is gone (deleted, or copied without it) is one line saying so,
    with nothing else printed (not DCP's traceback of the metadata file it could not read)."""
    from coatnet import sharding

    model = coatnet.create_model("coatnet_pico", num_classes=3)
    with pytest.raises(CheckpointError) as e:
        sharding.load_optimizer(model, torch.optim.AdamW(model.parameters()), tmp_path / "last" / "optimizer")
    assert str(e.value).startswith(f"the optimizer state in '{tmp_path / 'last' / 'optimizer'}' cannot be read (the "
                                   f"folder is missing): "), str(e.value)
    assert capfd.readouterr().err == ""


def test_an_output_dir_that_is_each_machines_own_is_refused_at_the_first_save(tmp_path):
    """Two machines (two torchrun agents of one job here, rendezvous on localhost), each in its own working
    directory, given a relative --output-dir: each process writes its optimizer shard into its own
    machine's folder. Before: the run ended "done", each checkpoint lacking the other machine's shard
    (found by --resume: "a shard is missing or damaged") and that machine's folder filling with one left
    behind at every save. Now the first save stops the job in one line saying to give a shared folder."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    nodes = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "own-folders",
             "-m", "coatnet", "train", "--fsdp", "--img-size", "16", "--batch-size", "64", "--epochs", "1",
             "--save-every", "2", "--output-dir", "run"],
            cwd=tmp_path / name, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=ENV | {"PYTHONPATH": str(Path(coatnet.__file__).parents[1])}))
    stderr = "".join(node.communicate(timeout=300)[1] for node in nodes)
    assert all(node.returncode != 0 for node in nodes), stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("coatnet train: error:")]
    assert len(errors) == 1 and re.fullmatch(
        r"coatnet train: error: the optimizer shards written by the other processes \(__1_0\.distcp\) are not in "
        r"'run' as the first process sees it: --output-dir must be a folder every machine of the job sees \(a shared "
        r"file system\), not each machine's own; give one, and continue with --resume from there", errors[0]), errors
    assert not any((tmp_path / name / "run").exists() for name in "ab")  # nothing left behind on either machine
