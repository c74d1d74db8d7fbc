"""Fault injection: for each kind of fault, the promise holds (README, "What we promise when things go wrong").

The promise, checked for every fault below: the command fails with one line on stderr and exit
status 2 (never a traceback), nothing already written is lost (``last`` and ``best`` still load,
no other run's files change), and a run continued with ``--resume`` ends exactly where the
uninterrupted run does. Faults are real where this machine allows (SIGKILL of a real process, a
second real process on the same folder, a tmpfs that fills up when mounting is allowed) and
simulated where it does not (ENOSPC and EROFS raised by the file calls).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import coatnet.checkpoint as checkpoint_module
from coatnet.checkpoint import load_checkpoint
from coatnet.cli import main

TINY = ["--img-size", "16", "--batch-size", "128", "--warmup-steps", "3", "--seed", "3"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def one_line_exit_2(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory (links as their targets), to show that nothing changed."""
    files = {}
    for path in sorted(run_dir.rglob("*")):
        rel = str(path.relative_to(run_dir))
        files[rel] = os.readlink(path).encode() if path.is_symlink() else path.read_bytes() if path.is_file() else b""
    return files


def finite_weights(checkpoint_dir: Path) -> bool:
    return all(torch.isfinite(v).all() for v in load_file(str(checkpoint_dir / "model.safetensors")).values())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 1-epoch run, copied by the tests that break it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *TINY, "--epochs", "1", "--output-dir", str(out)]) == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out, symlinks=True)
    return out


# -- SIGKILL at random moments, most of them inside a save ------------------------------------------


def test_sigkill_at_random_moments_of_saves(tmp_path):
    """Saving every step, so that most kills land inside a save; after each kill `last` loads, and
    the run finished by --resume ends bit for bit where the uninterrupted one does."""
    argv = [sys.executable, "-m", "coatnet", "train", *TINY, "--epochs", "1", "--save-every", "1"]
    reference = tmp_path / "reference"  # beside the killed ones, on the other core
    with (tmp_path / "reference.err").open("w") as log:  # a file: a pipe left unread could fill and stop it
        uninterrupted = subprocess.Popen(argv + ["--output-dir", str(reference)], env=ENV, stdout=subprocess.DEVNULL,
                                         stderr=log)
    out = tmp_path / "killed"
    rng = random.Random(0)
    try:
        for attempt in range(4):
            proc = subprocess.Popen(argv + ["--output-dir", str(out)] + (["--resume"] if attempt else []), env=ENV,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 60
            while not (out / "last").is_symlink() and time.time() < deadline:  # past start-up and a first save
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.6))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert load_checkpoint(out / "last").train_state is not None  # complete, whenever the kill came
        subprocess.run(argv + ["--output-dir", str(out), "--resume"], env=ENV, check=True, capture_output=True)
        assert uninterrupted.wait() == 0, (tmp_path / "reference.err").read_text()[-3000:]
    finally:
        uninterrupted.kill()  # nothing, where it ended
    ours, theirs = load_file(str(out / "last" / "model.safetensors")), load_file(str(reference / "last" /
                                                                                     "model.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert not list(out.glob(".ckpt-*.tmp"))  # what the killed saves left under temporary names is gone


# -- disk full and read-only ---------------------------------------------------------------------


def test_disk_full_while_saving(finished_run, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of a save: one line with the path, the half-written copy removed, `last`
    still the previous checkpoint, and the run continues after space is freed."""
    out = copy_run(finished_run, tmp_path)
    before = os.readlink(out / "last")
    real_save = torch.save

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    one_line_exit_2(capsys, ["train", "--resume", "--epochs", "2", "--output-dir", str(out)],
                    "cannot write checkpoint", "No space left on device", "still points at the previous checkpoint")
    assert os.readlink(out / "last") == before and load_checkpoint(out / "last").train_state["epoch"] == 1
    assert not list(out.glob(".ckpt-*"))
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert main(["train", "--resume", "--epochs", "2", "--output-dir", str(out)]) == 0


def test_a_full_disk_in_torchs_writer_is_said_without_its_internals(tmp_path, monkeypatch):
    """torch's writer reports a full disk as "[enforce fail at inline_container.cc:672] . unexpected pos":
    the line says the disk is full instead."""
    from coatnet.checkpoint import CheckpointError, save_checkpoint

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4374")

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    with pytest.raises(CheckpointError) as error:
        save_checkpoint(tmp_path, "ckpt-00000001", {"model": "m", "config": {}}, {"w": torch.zeros(2)},
                        train_state={"step": 1})
    message = str(error.value)
    assert "writing train_state.pt failed: no space left on the device" in message and "free some space" in message
    assert "enforce" not in message and "inline_container" not in message and not list(tmp_path.iterdir())


def test_too_little_space_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    one_line_exit_2(capsys, ["train", *TINY, "--epochs", "1", "--output-dir", str(tmp_path / "run")],
                    "MiB free", "choose another --output-dir")
    assert not (tmp_path / "run").exists()  # nothing written, not even the folder


def test_free_space_allows_for_three_checkpoints_and_is_checked_on_resume(finished_run, tmp_path, capsys,
                                                                          monkeypatch):
    """While `best` is behind `last`, a save writes a third checkpoint beside them: a new run needs room
    for three (before: two), a resumed one for those its folder does not hold yet (before: unchecked)."""
    from coatnet.models import create_model

    params = sum(p.numel() * p.element_size() for p in create_model("coatnet_pico", num_classes=10,
                                                                      img_size=16).parameters())
    size = 3 * params  # the weights and AdamW's two moments
    free = []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, free[-1]))
    monkeypatch.setattr("coatnet.train.train_one_epoch", lambda run: (_ for _ in ()).throw(KeyboardInterrupt))
    free.append(int(2.5 * size))
    one_line_exit_2(capsys, ["train", *TINY, "--epochs", "1", "--output-dir", str(tmp_path / "new")],
                    "MiB free", "up to three at once", "choose another --output-dir")
    out = copy_run(finished_run, tmp_path)  # `last` is `best`: two more to come
    free.append(int(1.5 * size))
    assert main(["train", "--resume", "--epochs", "2", "--output-dir", str(out)]) == 2
    said = capsys.readouterr()
    assert "MiB free" in said.err and f"continue it elsewhere with --resume {out} --output-dir NEW" in said.err
    assert "resumed" not in said.out  # refused before the run says it resumed (before: after)
    free.append(int(2.5 * size))
    assert main(["train", "--resume", "--epochs", "2", "--output-dir", str(out)]) == 130  # past the check


def test_a_real_full_disk(tmp_path, capsys, monkeypatch):
    """A tmpfs, where this machine lets the tests mount one (root in a container may not): at 1 MiB
    the run is refused before training; at 8 MiB, told it has room, its first save fills the disk
    with the weights (4.4 MiB) and fails in the training state, which torch's writer reports as a
    RuntimeError ("unexpected pos"): one line, and nothing half-written left."""
    mount = tmp_path / "small"
    mount.mkdir()
    for size in ("1m", "8m"):
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here; test_disk_full_while_saving simulates ENOSPC instead")
        try:
            argv = ["train", *TINY, "--epochs", "1", "--output-dir", str(mount / "run")]
            if size == "1m":
                one_line_exit_2(capsys, argv, "MiB free")
            else:
                monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, 10**12))
                one_line_exit_2(capsys, argv, "cannot write checkpoint", "writing train_state.pt failed: no space "
                                "left on the device); no checkpoint was kept; free some space")
                assert not (mount / "run").exists()  # the folder it made, holding nothing of a run, is gone
                # and no file of it is left open, holding the disk's space (before: torch's, until collected)
                assert not [fd for fd in os.listdir("/proc/self/fd")
                            if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(mount))]
        finally:
            if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(mount)], check=False)  # detached once nothing uses it


@pytest.mark.parametrize("name", ["curves.png", "summary.json", "last"])
def test_a_folder_in_place_of_a_run_file_is_refused_before_training(finished_run, tmp_path, capsys, monkeypatch, name):
    """A folder where the run writes a file or keeps its `last` link (`cp -rL` makes `last` one, then
    resumed as `--resume RUN/last` or `--resume RUN`) is refused before an epoch is trained, naming it (before: after
    an epoch, naming our temporary file)."""
    out = copy_run(finished_run, tmp_path)
    target = out / name
    if target.is_symlink():
        checkpoint = target.resolve()
        target.unlink()
        shutil.copytree(checkpoint, target)
    else:
        target.unlink()
        target.mkdir()
    before = snapshot(out)
    trained = []
    monkeypatch.setattr("coatnet.train.train_one_epoch", lambda run: trained.append(1))
    # `last` by its path, or as the run directory's (before: "not a coatnet checkpoint").
    resumes = [["--resume", str(target)], ["--resume", str(out)]] if name == "last" else \
        [["--resume", "--output-dir", str(out)]]
    for resume in resumes:
        one_line_exit_2(capsys, ["train", *resume, "--epochs", "2"],
                        f"'{target}' is a folder, where the run keeps its {name}", "rename or move it")
    assert trained == [] and snapshot(out) == before


def test_an_ema_asked_of_a_run_without_one(finished_run, tmp_path, capsys):
    """--ema on resuming a run that kept none: one line that says what to do; the run unchanged.
    Resumed without it, the run says where it goes on from: after its last epoch."""
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    one_line_exit_2(capsys, ["train", "--resume", "--epochs", "2", "--ema", "0.9", "--output-dir", str(out)],
                    "has no EMA weights but the run keeps an EMA; resume it without --ema")
    assert snapshot(out) == before
    assert main(["train", "--resume", "--epochs", "1", "--output-dir", str(out)]) == 0
    assert f"resumed {out / 'last'} after epoch 1, step 11" in capsys.readouterr().out


# "²" is a digit to str.isdigit()
@pytest.mark.parametrize("content", [b"my notes", b"\xff\xfe\x00binary", "\u00b2".encode()])
def test_a_users_own_lock_file_is_left_as_it_is(tmp_path, capsys, content):
    """A `.lock` of the user's in --output-dir (not a pid of ours) is refused, not emptied."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / ".lock").write_bytes(content)
    one_line_exit_2(capsys, ["train", *TINY, "--epochs", "1", "--output-dir", str(out)],
                    f"{out / '.lock'} is not a lock of coatnet's", "move the file")
    assert sorted(p.name for p in out.iterdir()) == [".lock"] and (out / ".lock").read_bytes() == content


def test_a_lock_the_machines_crash_left_as_nuls_is_taken(finished_run, tmp_path):
    """A lock whose pid never reached the disk (the machine crashed: the file reads as NULs) is ours."""
    out = copy_run(finished_run, tmp_path)
    (out / ".lock").write_bytes(b"\x00" * 6)
    assert main(["train", "--resume", "--epochs", "1", "--output-dir", str(out)]) == 0


def test_read_only_output_folder(finished_run, tmp_path, capsys, monkeypatch):
    """A folder that cannot be written is refused before any training (not after an epoch)."""
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    if os.geteuid() == 0:  # root writes through permission bits: make the file calls say what a read-only mount says
        real_open = os.open
        monkeypatch.setattr(os, "open", lambda path, *a, **k: (_ for _ in ()).throw(
            OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))) if str(path).startswith(str(out))
            else real_open(path, *a, **k))
    else:
        os.chmod(out, 0o555)
    trained = []
    monkeypatch.setattr("coatnet.train.train_one_epoch", lambda run: trained.append(1))
    try:
        one_line_exit_2(capsys, ["train", "--resume", "--epochs", "2", "--output-dir", str(out)],
                        f"cannot write to {out}", f"continue it elsewhere with --resume {out} --output-dir NEW")
    finally:
        os.chmod(out, 0o755)
    assert trained == [] and snapshot(out) == before


def test_an_output_dir_where_a_file_is(tmp_path, capsys):
    """--output-dir a file's path, or a path under a file: the line names the file (before: "File exists")."""
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out in (afile, afile / "run"):
        one_line_exit_2(capsys, ["train", *TINY, "--epochs", "1", "--output-dir", str(out)],
                        f"cannot write to {out} ({afile} is a file, where a folder was to be made); "
                        f"choose another --output-dir")
    assert afile.read_text() == "mine"


# -- two runs on one folder, and a stale lock ------------------------------------------------------


def test_second_run_on_the_same_folder_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, capsys):
    """The first run in a process of its own; the second and the one after its death here."""
    out = tmp_path / "run"
    argv = ["train", *TINY, "--epochs", "50", "--output-dir", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "coatnet", *argv], env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not ((out / ".lock").exists() and (out / ".lock").read_text().strip() == str(first.pid)):
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.02)
        one_line_exit_2(capsys, argv + ["--resume"], f"is in use by another `coatnet train` (pid {first.pid})")
        while not (out / "last").is_symlink():
            assert time.time() < deadline
            time.sleep(0.02)
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel releases it, its pid stays
        first.wait()
    assert main(["train", "--resume", "--epochs", "1", "--output-dir", str(out)]) == 0
    assert f"process {first.pid}, which ended without releasing" in capsys.readouterr().err


def test_a_run_killed_with_data_loading_workers_resumes_at_once(tmp_path, capsys):
    """SIGKILL of a run reading its data with --workers: its workers outlive it by up to 5 s (their check of
    the parent), and must not hold its lock meanwhile: a --resume at once goes on (before: refused, "in use
    by another `coatnet train`", naming the dead process)."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "coatnet", "train", *TINY, "--epochs", "2", "--workers", "2", "--save-every", "2",
            "--output-dir", str(out)]
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (out / "last").is_symlink():
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.02)
        time.sleep(0.3)  # its workers reading the next batches
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert main(["train", "--resume", "--output-dir", str(out)]) == 0, capsys.readouterr().err
    assert f"process {proc.pid}, which ended without releasing" in capsys.readouterr().err


# -- runs that would overwrite another -------------------------------------------------------------


def test_dangling_last_is_not_an_empty_folder(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    shutil.rmtree(out / os.readlink(out / "last"))  # `last` now points nowhere; `best` is another name
    (out / "best").unlink()
    (out / "best").symlink_to("ckpt-kept")
    (out / "ckpt-kept").mkdir()
    before = snapshot(out)
    one_line_exit_2(capsys, ["train", *TINY, "--epochs", "1", "--output-dir", str(out)], "already holds a run")
    one_line_exit_2(capsys, ["train", "--resume", "--output-dir", str(out)], "which is missing", "best")
    # eval and predict read the run so too (before: "'RUN/last' does not exist")
    for argv in (["eval", "--checkpoint", str(out)], ["predict", "--checkpoint", str(out), str(tmp_path)]):
        one_line_exit_2(capsys, argv, "which is missing", "best")
    assert snapshot(out) == before
    # Without `best` either, the line does not point at it: there is no other checkpoint.
    (out / "best").unlink()
    one_line_exit_2(capsys, ["train", "--resume", "--output-dir", str(out)], "which is missing",
                    "this folder holds none; start a new run")


def test_a_run_whose_last_link_was_removed_names_its_other_checkpoints(finished_run, tmp_path, capsys):
    """`rm RUN/last`: --resume and eval of RUN name RUN/best (before: "RUN is not a coatnet checkpoint or model
    folder", of a folder holding a run and its checkpoints); nothing is changed."""
    out = copy_run(finished_run, tmp_path)
    (out / "last").unlink()
    before = snapshot(out)
    for argv in (["train", "--resume", "--epochs", "2", "--output-dir", str(out)], ["eval", "--checkpoint", str(out)]):
        one_line_exit_2(capsys, argv, f"{str(out)!r} holds a run without its `last` link; give one of its "
                                      f"checkpoints (e.g. {str(out / 'best')!r})")
    assert snapshot(out) == before


def test_a_run_killed_in_its_first_save_starts_again(tmp_path, capsys):
    """What a kill during the first save leaves (the lock, a temporary checkpoint and optimizer shards)
    is no run (before: "already holds a run", and --resume "not a coatnet checkpoint"): --resume says
    there is nothing to resume, and a new run starts there and clears them."""
    out = tmp_path / "run"
    for name in (".ckpt-00000011.tmp", ".shards-00000011.tmp"):
        (out / name).mkdir(parents=True)
        (out / name / "model.safetensors").write_bytes(b"half")
    (out / ".lock").write_text("")
    for argv in (["--resume", "--output-dir", str(out)], ["--resume", str(out)]):
        one_line_exit_2(capsys, ["train", *argv], f"{out} holds no checkpoint to resume: its run stopped before its "
                                                  f"first save; start it again without --resume")
    assert main(["train", *TINY, "--epochs", "1", "--output-dir", str(out)]) == 0
    assert not list(out.glob(".*.tmp")) and (out / "last").is_symlink()


def test_resume_into_another_runs_folder_is_refused(finished_run, tmp_path, capsys):
    other = copy_run(finished_run, tmp_path / "other")
    before = snapshot(other)
    one_line_exit_2(capsys, ["train", "--resume", str(finished_run / "last"), "--epochs", "2", "--output-dir",
                             str(other)], "holds another run", "would overwrite it")
    assert snapshot(other) == before


@pytest.mark.parametrize("inside", ["train", "train/a", "val/b/runs/x"])
def test_an_output_dir_inside_the_datas_splits_is_refused(tmp_path, capsys, inside):
    """`--output-dir DATA/train` (or a class folder): refused before anything is written (before: trained, and
    its first save put ckpt-*, last and best among the classes, curves.png among a class's images: its own
    --resume, and every later run on DATA, refused as "different class folders", or trained on the plot)."""
    from PIL import Image

    data = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (data / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (16, 16), (40 * i, 0, 200 if c == "a" else 0)).save(data / split / c / f"{i}.png")
    before = snapshot(data)
    one_line_exit_2(capsys, ["train", "--data", "imagefolder", "--data-dir", str(data), *TINY[:2], "--batch-size",
                             "4", "--epochs", "1", "--output-dir", str(data / inside)],
                    f"is inside the data's {inside.split('/')[0]}/ folder")
    assert snapshot(data) == before


def test_a_folder_of_files_of_no_run_is_not_overwritten(finished_run, tmp_path, capsys):
    """A run's files without its checkpoints (deleted to free space) or a user's own of those names:
    neither a new run nor a run resumed into the folder overwrites them."""
    out = copy_run(finished_run, tmp_path)
    for link in ("last", "best"):
        shutil.rmtree(out / os.readlink(out / link), ignore_errors=True)
        (out / link).unlink()
    before = snapshot(out)
    one_line_exit_2(capsys, ["train", *TINY, "--epochs", "1", "--output-dir", str(out)],
                    "holds metrics.jsonl, curves.png, summary.json of no run", "choose another --output-dir")
    one_line_exit_2(capsys, ["train", "--resume", str(finished_run / "last"), "--epochs", "2", "--output-dir",
                             str(out)], "of no run, which this run would overwrite")
    assert snapshot(out) == before


def test_files_of_the_users_named_like_a_runs_are_not_taken_for_one(tmp_path, capsys, monkeypatch):
    """A folder `ckpt-notes` is not a checkpoint (a run starts beside it and keeps it); a file named
    `last` is where the run keeps its link: refused by name (before: "already holds a run", then on
    --resume "not a checkpoint")."""
    out = tmp_path / "run"
    (out / "ckpt-notes").mkdir(parents=True)
    (out / "ckpt-notes" / "mine.txt").write_text("mine")
    trained = []
    monkeypatch.setattr("coatnet.train.train_one_epoch", lambda run: trained.append(1))
    (out / "last").write_text("my notes")
    before = snapshot(out)
    one_line_exit_2(capsys, ["train", *TINY, "--epochs", "1", "--output-dir", str(out)],
                    f"'{out / 'last'}' is a file, where the run keeps its last link; rename or move it")
    assert trained == [] and snapshot(out) == before
    (out / "last").unlink()
    monkeypatch.undo()
    assert main(["train", *TINY, "--epochs", "1", "--output-dir", str(out)]) == 0
    assert (out / "ckpt-notes" / "mine.txt").read_text() == "mine"


def test_epochs_below_an_epoch_under_way_are_refused(finished_run, tmp_path, capsys, monkeypatch):
    """`last` part way through epoch 2 (a --save-every checkpoint) resumed with --epochs 1: refused, as
    nothing would be trained and the run's report would be epoch 1's, not `last`'s (before: "trained 1
    of 1 epochs", then metrics, summary and "done" of epoch 1)."""
    out = copy_run(finished_run, tmp_path)
    state_file = out / "last" / "train_state.pt"
    state = torch.load(state_file, weights_only=True)
    torch.save(state | {"step": 15, "batch_in_epoch": 4}, state_file)  # as a save at step 15 writes it
    (out / "summary.json").unlink()  # as a run stopped in its epoch 2 has none
    before = snapshot(out)
    trained = []
    monkeypatch.setattr("coatnet.train.train_one_epoch", lambda run: trained.append(1))
    one_line_exit_2(capsys, ["train", "--resume", "--epochs", "1", "--output-dir", str(out)],
                    f"--epochs 1 is below the epoch {out / 'last'} is part way through (epoch 2, step 15); "
                    f"give --epochs 2 or more to finish it")
    assert trained == [] and snapshot(out) == before


def test_an_unfinished_run_resumed_with_fewer_epochs_than_it_trained_is_refused(tmp_path, capsys, monkeypatch):
    """A run of 5 epochs stopped after its second, resumed with --epochs 1: refused, naming its 5 (before:
    "nothing left to do", then its last epoch's line as "epoch 2/1" and "done", as if it had ended)."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--output-dir", str(out)]) == 0
    config = json.loads((out / "last" / "config.json").read_text())
    config["train_config"]["epochs"] = 5  # as a run of --epochs 5 stopped after its second has it
    (out / "last" / "config.json").write_text(json.dumps(config))
    before = snapshot(out)
    trained = []
    monkeypatch.setattr("coatnet.train.train_one_epoch", lambda run: trained.append(1))
    capsys.readouterr()
    one_line_exit_2(capsys, ["train", "--resume", "--epochs", "1", "--output-dir", str(out)],
                    f"{out} has trained 2 of its 5 epochs, more than --epochs 1: nothing to train; drop --epochs to "
                    f"train on to 5, or use its weights as they are ({out / 'last'})")
    assert trained == [] and snapshot(out) == before


def test_a_finished_run_resumed_into_a_new_folder_with_nothing_to_train_is_refused(finished_run, tmp_path, capsys):
    """`--resume RUN --output-dir NEW` of a finished run, no epochs added: refused, NEW not made (before: a
    summary of no checkpoint there, best_top1 -1, and the same command then refused)."""
    new = tmp_path / "new"
    for epochs in ([], ["--epochs", "1"]):
        one_line_exit_2(capsys, ["train", "--resume", str(finished_run), *epochs, "--output-dir", str(new)],
                        f"{finished_run / 'last'} has trained 1 epoch(s) and --epochs is 1: nothing to train into "
                        f"{new}; give --epochs 2 or more")
    assert not new.exists()
    # In its own folder, a checkpoint other than `last` with no report of the run: none is written of it.
    out = copy_run(finished_run, tmp_path)
    (out / "summary.json").unlink()
    shutil.copytree(out / "last", out / "mine")
    before = snapshot(out)
    one_line_exit_2(capsys, ["train", "--resume", str(out / "mine")],
                    "has trained 1 epoch(s) and --epochs is 1: nothing to train; give --epochs 2 or more")
    assert snapshot(out) == before


def test_a_run_continued_in_a_new_folder_has_its_best_there(finished_run, tmp_path, capsys):
    """`--resume RUN --output-dir NEW`: NEW's `best` is the best of its own checkpoints (before: none,
    while a better epoch stayed in RUN, so `eval --checkpoint NEW/best` failed)."""
    run = copy_run(finished_run, tmp_path)
    state_file = run / "last" / "train_state.pt"
    state = torch.load(state_file, weights_only=True)
    torch.save(state | {"best_top1": 100.0}, state_file)  # an epoch in RUN that the next cannot beat
    new = tmp_path / "new"
    assert main(["train", "--resume", str(run), "--epochs", "2", "--output-dir", str(new)]) == 0
    assert (new / "best").is_symlink() and (new / "best").resolve().parent == new.resolve()
    summary = json.loads((new / "summary.json").read_text())
    assert summary["best_top1"] == json.loads((new / "metrics.jsonl").read_text().splitlines()[-1])["top1"]


def test_a_run_stopped_between_its_link_swaps_keeps_best_the_best(tmp_path, capsys, monkeypatch):
    """Stopped (SIGKILL, SIGTERM) in the save of an epoch that improved, after one of `last` and `best` was
    swapped and before the other: resumed, `best` is the checkpoint of the best top-1 the run reports
    (before: `last` swapped first, `best` left at the earlier, worse epoch while the resumed state counted
    the new one as the best, so `best` was never replaced and `done: ... (best X%)` named another checkpoint)."""
    out = tmp_path / "run"
    real, swaps = os.replace, []

    class Killed(BaseException):
        pass

    def replace(src, dst):
        if Path(dst).name in ("last", "best"):
            swaps.append(Path(dst).name)
            if len(swaps) == 4:  # epoch 1 swapped both; epoch 2 (better: below) one of them
                raise Killed
        return real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(checkpoint_module.os, "replace", replace)
        with pytest.raises(Killed):
            main(["train", *TINY, "--epochs", "2", "--output-dir", str(out)])
    capsys.readouterr()
    assert main(["train", "--resume", "--output-dir", str(out)]) == 0
    top1 = [json.loads(line)["top1"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert top1[1] > top1[0]  # epoch 2 improved: its save swapped both links
    best = json.loads((out / "best" / "config.json").read_text())
    assert (best["epoch"], best["top1"]) == (2, top1[1])
    assert json.loads((out / "summary.json").read_text())["best_top1"] == top1[1]
    assert f"(best {top1[1]:.2f}%)" in capsys.readouterr().out


def test_a_best_link_behind_its_better_last_is_put_right_on_resume(finished_run, tmp_path, capsys):
    """A run left by a version that swapped `last` before `best` (stopped between them): `best` at an earlier
    checkpoint than `last`, whose epoch was better. Resumed, `best` points at the better checkpoint and
    the run reports its top-1, the best of the history (before: the earlier one kept for good)."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--output-dir", str(out)]) == 0
    top1 = [json.loads(line)["top1"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert top1[1] > top1[0]
    earlier = tmp_path / "earlier"  # epoch 1's checkpoint, as `best` of the broken run
    assert main(["train", *TINY, "--epochs", "1", "--output-dir", str(earlier)]) == 0
    shutil.copytree(earlier / "last", out / "ckpt-00000011", symlinks=True)
    (out / "best").unlink()
    (out / "best").symlink_to("ckpt-00000011")
    (out / "summary.json").unlink()  # stopped in its last save: no report yet
    capsys.readouterr()
    assert main(["train", "--resume", "--output-dir", str(out)]) == 0
    assert os.readlink(out / "best") == os.readlink(out / "last")
    assert json.loads((out / "summary.json").read_text())["best_top1"] == top1[1] == max(top1)


def test_a_best_whose_checkpoint_was_deleted_is_replaced_by_the_next_epoch(finished_run, tmp_path, capsys):
    """`rm -r RUN/ckpt-N` of `best`'s checkpoint (behind `last`), then --resume: the next epoch's checkpoint is
    `best`, whatever its top-1 (before: `best` a link to nothing for good, unless an epoch beat the deleted one)."""
    run = copy_run(finished_run, tmp_path)
    state_file = run / "last" / "train_state.pt"
    state = torch.load(state_file, weights_only=True)
    torch.save(state | {"best_top1": 100.0}, state_file)  # the deleted one: an epoch the next cannot beat
    (run / "best").unlink()
    (run / "best").symlink_to("ckpt-00000005")  # gone
    assert main(["train", "--resume", "--epochs", "2", "--output-dir", str(run)]) == 0
    assert os.readlink(run / "best") == os.readlink(run / "last")
    top1 = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["top1"]
    assert json.loads((run / "summary.json").read_text())["best_top1"] == top1


# -- a run that diverges ---------------------------------------------------------------------------


def test_non_finite_loss_stops_the_run_keeping_finite_checkpoints(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    calls, nan_at = [], [15]
    real = torch.nn.CrossEntropyLoss.forward

    def diverging(self, logits, targets):  # the 15th step's loss is NaN, as a diverging run's would be
        calls.append(1)
        loss = real(self, logits, targets)
        return loss * float("nan") if len(calls) == nan_at[0] else loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", diverging)
    one_line_exit_2(capsys, ["train", *TINY, "--epochs", "2", "--output-dir", str(out)],
                    "the loss became nan", "at step 15", "lower --lr", "then continue with --resume")
    for link in ("last", "best"):
        assert finite_weights(out / link)
    assert load_checkpoint(out / "last").train_state["step"] == 11  # the end of epoch 1, the last finite state
    # Before the first checkpoint there is nothing to resume: the message says to start again.
    calls.clear()
    nan_at[0] = 3
    one_line_exit_2(capsys, ["train", *TINY, "--epochs", "2", "--output-dir", str(tmp_path / "early")],
                    "at step 3", "no checkpoint had been written yet", "start again")


# -- corrupt files of every kind the program reads -------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _malicious_pickle(path: Path) -> None:
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch /tmp/coatnet-pwned",))

    path.write_bytes(pickle.dumps({"step": Boom()}))


def _edit_config(**fields):
    """Damage config.json's model config: replace ``fields`` of it."""
    def damage(path: Path) -> None:
        meta = json.loads(path.read_text())
        meta["config"] |= {k: v(meta["config"]) if callable(v) else v for k, v in fields.items()}
        path.write_text(json.dumps(meta))
    return damage


def _edit_train_config(edit):
    """Damage config.json's training settings: ``edit`` takes them and returns what is written."""
    def damage(path: Path) -> None:
        meta = json.loads(path.read_text())
        path.write_text(json.dumps(meta | {"train_config": edit(meta["train_config"])}))
    return damage


ALL, READERS = ("resume", "eval", "predict"), ("eval", "predict")  # READERS: build the model from config.json
CORRUPTIONS = {  # file, damage, what the line says, the commands that read it
    "config.json, not JSON": ("config.json", lambda p: p.write_text("{not json"), "config.json' is corrupt", ALL),
    "config.json, not a model's": ("config.json", lambda p: p.write_text("[1, 2]"), "config.json' is corrupt", ALL),
    "config.json, a newer version": ("config.json", _edit_config(version=9), "config version 9 is newer", READERS),
    "config.json, absurd size": ("config.json", _edit_config(img_size=[32, 10**9]), "img_size must be", READERS),
    "config.json, zero width": ("config.json", _edit_config(stages=lambda c: [s | {"channels": 0}
                                                                              for s in c["stages"]]),
                                "channels must be an integer >= 1", READERS),
    "config.json, fewer classes than the head": ("config.json", lambda p: p.write_text(json.dumps(
        json.loads(p.read_text()) | {"pretrained_cfg": {"label_names": ["0", "1"]}})),
        "lists 2 class names but the model has 10 outputs", ALL),
    "train_config, a setting of another version": ("config.json", _edit_train_config(lambda c: c | {"foo": 1}),
                                                   "holds no usable train_config (unknown foo)", ("resume",)),
    "train_config, a wrong type": ("config.json", _edit_train_config(lambda c: c | {"randaugment": 5}),
                                   "holds no usable train_config (--randaugment must be", ("resume",)),
    "train_config, without the seed": ("config.json", _edit_train_config(lambda c: {k: v for k, v in c.items()
                                                                                   if k != "seed"}),
                                       "holds no usable train_config (no seed)", ("resume",)),
    "train_config, another image size": ("config.json", _edit_train_config(lambda c: c | {"img_size": 32}),
                                         "holds a model at [16, 16] px but its train_config says img_size 32",
                                         ("resume",)),
    "train_config, a model_config of what the run sets": (
        "config.json", _edit_train_config(lambda c: c | {"model_config": {"drop_path_rate": 0.5}}),
        "holds no usable train_config (model_config sets drop_path_rate, which the run sets", ("resume",)),
    "train_config, a list": ("config.json", _edit_train_config(lambda c: list(c)),
                             "holds no usable train_config (a JSON list, not an object)", ("resume",)),
    "model.safetensors, truncated": ("model.safetensors", _truncate, "model.safetensors' is corrupt or truncated", ALL),
    "model.safetensors, empty": ("model.safetensors", lambda p: p.write_bytes(b""), "is corrupt or truncated", ALL),
    "train_state.pt, truncated": ("train_state.pt", _truncate, "not written by coatnet; resume another checkpoint of "
                                  "the run (e.g. RUN_DIR/best), or start a new run from its weights with --pretrained",
                                  ("resume",)),
    "train_state.pt, a pickle that runs code": ("train_state.pt", _malicious_pickle, "cannot be read safely",
                                                ("resume",)),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_checkpoint_files(finished_run, tmp_path, capsys, case):
    """Each command that reads the damaged file fails in one line that says what is wrong with it;
    a pickle that would run code never runs."""
    from PIL import Image

    file, damage, message, readers = CORRUPTIONS[case]
    out = copy_run(finished_run, tmp_path)
    damage(out / "last" / file)
    image = tmp_path / "digit.png"
    Image.new("L", (16, 16), 128).save(image)
    commands = {"resume": ["train", "--resume", "--output-dir", str(out)],
                "eval": ["eval", "--checkpoint", str(out / "last")],
                "predict": ["predict", "--checkpoint", str(out / "last"), str(image)]}
    for name in readers:
        one_line_exit_2(capsys, commands[name], message)
    assert not Path("/tmp/coatnet-pwned").exists()


@pytest.mark.parametrize("removed", [("step",), ("optimizer", "history")])
def test_a_train_state_without_what_resuming_reads(finished_run, tmp_path, capsys, removed):
    """A train_state.pt edited by hand (or written by another program) without keys the resume reads: one
    line naming the file and the keys (before: a KeyError's traceback), and the run left as it was."""
    out = copy_run(finished_run, tmp_path)
    state_file = out / "last" / "train_state.pt"
    state = torch.load(state_file, weights_only=True)
    torch.save({k: v for k, v in state.items() if k not in removed}, state_file)
    before = snapshot(out)
    one_line_exit_2(capsys, ["train", "--resume", "--epochs", "2", "--output-dir", str(out)],
                    f"train_state.pt' lacks {', '.join(removed)}, which resuming reads",
                    "resume another checkpoint of the run", f"--pretrained {out / 'last'}")
    assert snapshot(out) == before


# -- figures recorded during training are the figures of the saved weights -------------------------


def test_eval_of_a_checkpoint_gives_what_training_recorded(tmp_path, capsys):
    """The figures training records (after fused AdamW steps, which bump no version counter) are
    those of the weights it saved, as a fresh process evaluates them. Inference keeps no cache
    (test_fast_paths.py shows a stale one at the level of the model)."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--output-dir", str(out)]) == 0
    recorded = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "last"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # Float rounding only: the loaded weights are laid out NCHW, training's channels-last.
    assert result["loss"] == pytest.approx(recorded["eval_loss"], rel=1e-5)
    assert (result["top1"], result["top5"]) == (recorded["top1"], recorded["top5"])


def test_a_checkpoint_folder_as_output_dir_is_refused(finished_run, tmp_path, capsys):
    """`--resume --output-dir RUN/last` (the checkpoint, not its run): refused, nothing written (before:
    a new run trained inside RUN/last, its checkpoints and links beside the weights, RUN left at epoch 1)."""
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    one_line_exit_2(capsys, ["train", "--resume", "--epochs", "2", "--output-dir", str(out / "last")],
                    f"--output-dir {out / 'last'} is a checkpoint or model folder, not a run directory; give the "
                    f"run's, --output-dir {out}, to continue it")
    one_line_exit_2(capsys, ["train", *TINY, "--epochs", "1", "--output-dir", str(out / "last")],
                    "is a checkpoint or model folder, not a run directory; choose another --output-dir")
    assert snapshot(out) == before
