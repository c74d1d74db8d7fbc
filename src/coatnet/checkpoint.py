"""Training checkpoints that survive a crash, and never unpickle code.

A checkpoint is a model folder (``coatnet.models.folder``) with the training state beside it::

    ckpt-00000123/
        config.json        model name, model config, preprocessing and class names, data set, step,
                           metrics, and the run's settings (JSON)
        model.safetensors  the model's weights
        ema.safetensors    the EMA weights, when training keeps an EMA (what evaluation used)
        train_state.pt     optimizer, RNG states, step, history: tensors and plain Python values
                           only, read back with ``torch.load(weights_only=True)``
        optimizer/         (``--fsdp`` runs) the optimizer state, one shard per process, written
                           with ``torch.distributed.checkpoint`` instead of in train_state.pt

so ``coatnet.from_pretrained`` and ``create_model(pretrained=...)`` read it as they read any model
folder. ``last`` and ``best`` in the run directory are symbolic links to such directories. A new
checkpoint is written in full under a temporary name, renamed into place, and only then is the
link swapped with ``os.replace``, which is atomic: a crash at any moment leaves ``last`` pointing
at a complete checkpoint, the old one or the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .models.folder import (CHECKPOINT_NAME, CONFIG, EMA_WEIGHTS, LOCK, TRAIN_STATE, WEIGHTS, ModelFolder,
                            ModelFolderError, holds_a_run, read_model_folder, write_model_folder)

OPTIMIZER_SHARDS = "optimizer"  # the folder of the optimizer state of an --fsdp run, one shard per process


class CheckpointError(ModelFolderError):
    """A checkpoint that cannot be used; the message is one line that says what to do."""


@dataclass
class Checkpoint(ModelFolder):
    train_state: dict | None = None


def atomic_write(path: Path, text: str) -> None:
    """Write a text file under a temporary name and rename it: readers see the old or the new file."""
    write_atomically(path, lambda tmp: tmp.write_text(text))


def write_atomically(path: Path, write: Callable[[Path], object], tmp: Path | None = None) -> None:
    """Have ``write`` write the file ``path`` under a temporary name (``tmp``, or ``.NAME.tmp``
    beside it), then rename it into place: readers see the old file or the new one. A write that
    fails (a full disk, the folder made unwritable, Ctrl-C) leaves the old file and removes the
    temporary one, and its error names ``path``, not a hidden file that is no longer there."""
    tmp = tmp or path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno is not None and e.filename in (None, str(tmp), tmp):
            raise OSError(e.errno, e.strerror, str(path)) from None  # errno picks the subclass (PermissionError, ...)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, name: str, meta: dict, model: nn.Module | dict,
                    ema_model: nn.Module | dict | None = None, train_state: dict | None = None,
                    links: tuple[str, ...] = ("last",), shards: Path | None = None) -> Path:
    """Write checkpoint ``run_dir/name`` and point each of ``links`` (e.g. "last", "best") at it.

    ``model`` and ``ema_model``: modules or their state dicts. ``shards``: a folder of the sharded
    optimizer state, written by every process (``coatnet.sharding``), moved into the checkpoint."""
    run_dir = Path(run_dir)
    # A directory of this name may exist (a run resumed from an earlier `best` reaches the same
    # step again) and `last` may point at it: never overwrite, take a fresh name.
    base, n = name, 0
    while (run_dir / name).exists():
        n += 1
        name = f"{base}.{n}"
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_model_folder(tmp, meta, model, ema_model)
        if train_state is not None:
            # A file of ours, closed however the write ends: torch's own, left open by a failed write until
            # its exception is collected, would hold a full disk's space after the copy is deleted.
            with open(tmp / TRAIN_STATE, "wb") as f:
                try:
                    torch.save(train_state, f)
                except RuntimeError as e:  # torch's zip writer reports a short write (a full disk) so
                    raise OSError(f"writing {TRAIN_STATE} failed: {_torch_write_error(e)}") from None
        if shards is not None:
            os.replace(shards, tmp / OPTIMIZER_SHARDS)  # DCP wrote and synced its files
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        os.replace(tmp, final)
    except OSError as e:  # disk full, read-only, quota: the half-written copy goes, the links stay
        shutil.rmtree(tmp, ignore_errors=True)
        if shards is not None:
            shutil.rmtree(shards, ignore_errors=True)
        raise write_failed(final, e.strerror or str(e)) from None
    for link in links:
        point_link(run_dir, link, name)
    _fsync_dir(run_dir)
    _remove_unreferenced(run_dir)
    return final


def point_link(run_dir: Path, link: str, name: str) -> None:
    """Point ``run_dir/link`` at the checkpoint ``name`` (a relative link), atomically."""
    tmp_link = run_dir / f".{link}.tmp"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(name)
    os.replace(tmp_link, run_dir / link)


def _torch_write_error(e: RuntimeError) -> str:
    """Why torch's writer failed, without its internals: a write it found cut short ("[enforce fail at
    inline_container.cc:672] . unexpected pos ...") is a full disk or a quota."""
    if "unexpected pos" in str(e):
        return "no space left on the device"
    return " ".join(re.sub(r"\[enforce fail at [^\]]*\]\s*\.?", "", str(e)).split())[:200]


def write_failed(path: Path, reason: str) -> CheckpointError:
    """The one-line error of a checkpoint (or its part ``path``) that could not be written, whose
    half-written copy is gone; the run's links are left as they were."""
    last = path.parent / "last"
    kept = f"{last} still points at the previous checkpoint" if last.is_symlink() else "no checkpoint was kept"
    return CheckpointError(f"cannot write checkpoint {path} ({reason}); {kept}; free some space or fix the "
                           f"folder's permissions and continue with --resume")


# The checkpoints training names (CHECKPOINT_NAME) and what a save cut off by a crash leaves: only
# these are ever deleted, never a folder of the user's.
_OURS = re.compile(rf"({CHECKPOINT_NAME.pattern})|(\.ckpt-\d{{8}}(\.\d+)?\.tmp)|(\.shards-\d{{8}}\.tmp)")
# What a save writes into a checkpoint directory: pruning deletes these and nothing else, since a user
# may have put files of their own there (`coatnet export --output RUN/last/model.pt`, a run of theirs).
_CHECKPOINT_FILES = (CONFIG, WEIGHTS, EMA_WEIGHTS, TRAIN_STATE, OPTIMIZER_SHARDS)


def _remove_unreferenced(run_dir: Path) -> None:
    """Delete the checkpoints that neither ``last`` nor ``best`` points at (their files; the folder too
    when nothing else is left in it), and what a save cut off by a crash left under a temporary name
    (the run's lock means no other save is under way)."""
    # Where the links lead, not how they are written: `ln -s $PWD/run/ckpt-N best` keeps ckpt-N too.
    # (realpath: a link looping on itself leads nowhere, where resolve() would raise)
    keep = {os.path.realpath(run_dir / link) for link in ("last", "best") if (run_dir / link).is_symlink()}
    for d in run_dir.iterdir():
        if not (_OURS.fullmatch(d.name) and d.is_dir() and not d.is_symlink() and os.path.realpath(d) not in keep):
            continue
        if not CHECKPOINT_NAME.fullmatch(d.name):  # a temporary folder of an unfinished save: all of it ours
            shutil.rmtree(d, ignore_errors=True)
            continue
        removed = [d / name for name in _CHECKPOINT_FILES if os.path.lexists(d / name)]
        for path in removed:
            if path.is_dir() and not path.is_symlink():  # an --fsdp run's optimizer shards
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):  # as rmtree's ignore_errors: the save itself succeeded
                    path.unlink()
        with contextlib.suppress(OSError):  # fails where something of the user's is left in it
            d.rmdir()
        if removed and d.is_dir():  # said once: the next save finds no checkpoint files there
            left = sorted(p.name for p in d.iterdir())
            print(f"note: removed the checkpoint files of {d}, which neither last nor best points at any more, "
                  f"and kept what else it holds ({', '.join(left[:3])}{' ...' if len(left) > 3 else ''})",
                  file=sys.stderr)


@contextlib.contextmanager
def locked_run_dir(run_dir: Path, instead: str = "choose another --output-dir"):
    """Create ``run_dir`` if needed and hold its lock until the block ends, however it ends.

    A second training process on the same folder is refused in one line instead of deleting the
    first one's temporary checkpoints. The lock is the kernel's (``flock``), so a process killed
    with SIGKILL releases it; the pid it leaves in the file only lets the next run say so. A
    folder that cannot be written is refused here, before any training, saying to do ``instead``
    (a resumed run: continue it in another folder). A run refused before it wrote anything leaves
    the folder as it found it: no lock (which ``--resume`` would take for a run's remains), and not
    the folder itself if it made it.
    """
    created = not run_dir.exists()
    found = None if created or not run_dir.is_dir() or (run_dir / LOCK).exists() else set(os.listdir(run_dir))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # ascii with errors replaced: a file of the user's in another encoding reads, and is then refused
        handle = open(os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="ascii",
                      errors="replace")
    except OSError as e:
        reason = e.strerror or str(e)
        if isinstance(e, (FileExistsError, NotADirectoryError)):  # mkdir where a file is: name the file
            file = next((p for p in (run_dir, *run_dir.parents) if p.is_file()), None)
            reason = f"{file} is a file, where a folder was to be made" if file else reason
        raise CheckpointError(f"cannot write to {run_dir} ({reason}); {instead}") from None
    with handle:
        _lock(handle, run_dir)
        # Ours holds a pid, or nothing (released), or NULs (a crash of the machine before the pid reached
        # the disk): anything else is a file of the user's.
        previous = handle.read().strip("\x00 \t\r\n")
        if previous and not previous.isdigit():
            raise CheckpointError(f"{run_dir / LOCK} is not a lock of coatnet's (it holds other text), and a run "
                                  f"keeps its lock there; move the file, or choose another --output-dir")
        if previous.isdigit() and int(previous) != os.getpid() and not process_alive(int(previous)):
            print(f"note: process {previous}, which ended without releasing {run_dir}, no longer holds it",
                  file=sys.stderr)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        folder = os.open(run_dir, os.O_RDONLY)  # put in place of the lock's descriptor in forked children
        _HELD_LOCKS[handle.fileno()] = folder
        try:
            yield
        finally:
            _HELD_LOCKS.pop(handle.fileno(), None)
            os.close(folder)
            handle.seek(0)
            handle.truncate()  # released: no pid is left to be mistaken for a crashed holder
            if (created or found is not None) and set(os.listdir(run_dir)) == (found or set()) | {LOCK}:
                (run_dir / LOCK).unlink()  # refused before writing anything
                if created:
                    run_dir.rmdir()


# The descriptors of the run locks this process holds, each with a read-only descriptor of its folder. A child
# forked while one is held (a DataLoader worker) inherits the lock's descriptor, and with it the flock: killed
# (SIGKILL), the run would leave its workers holding the folder for up to 5 s, their check of the parent's life,
# and a --resume at once was refused as "in use by another `coatnet train`", naming the dead process. So each
# child puts its folder's descriptor in that place (closing the lock's own there, not releasing it: the flock
# ends when the last descriptor of it closes, and the parent keeps its own).
_HELD_LOCKS: dict[int, int] = {}


def _leave_the_locks_to_the_parent() -> None:
    for lock, folder in _HELD_LOCKS.items():
        with contextlib.suppress(OSError):
            os.dup2(folder, lock, inheritable=False)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_leave_the_locks_to_the_parent)


def _lock(handle, run_dir: Path) -> None:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = handle.read().strip() or "unknown"
        raise CheckpointError(f"{run_dir} is in use by another `coatnet train` (pid {holder}); wait for it to "
                              f"finish or choose another --output-dir") from None


def refuse_if_in_use(run_dir: Path) -> None:
    """Refuse, as :func:`locked_run_dir` would, a run directory another process is training in (its
    files are not complete yet); a directory without a lock file is not in use."""
    try:
        handle = open(run_dir / LOCK, encoding="ascii", errors="replace")
    except OSError:
        return
    with handle:
        _lock(handle, run_dir)  # released when the handle closes


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (another user's too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def process_lost(error: BaseException) -> bool:
    """Whether ``error`` is a collective's failure because another process of the job is gone (killed,
    out of memory, its machine down): gloo says its peer closed or reset the connection ("... caused by a
    remote worker crashing"), NCCL and the rendezvous store raise ``DistError``; DCP gathers them per process."""
    import torch.distributed as dist

    failures = getattr(error, "failures", None)  # DCP's CheckpointException: each process's own error
    if isinstance(failures, dict) and any(process_lost(e) for e, _ in failures.values()):
        return True
    return isinstance(error, dist.DistError) or isinstance(error, RuntimeError) and "remote worker" in str(error)


def load_checkpoint(path: str | Path, with_train_state: bool = True) -> Checkpoint:
    """Read a checkpoint directory (or a run directory, meaning its ``last``) safely.

    Every failure is a ``ValueError`` whose message names the file and the fix.
    """
    folder = read_model_folder(path)
    state = None
    if with_train_state and (folder.path / TRAIN_STATE).exists():
        try:
            state = torch.load(folder.path / TRAIN_STATE, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, corrupt, or holding objects that weights_only refuses
            # its weights were read: they can start a new run, if no other checkpoint of the run resumes
            raise CheckpointError(f"{str(folder.path / TRAIN_STATE)!r} cannot be read safely ({type(e).__name__}): "
                                  f"corrupt, truncated or not written by coatnet; resume another checkpoint of "
                                  f"the run (e.g. RUN_DIR/best), or start a new run from its weights with "
                                  f"--pretrained {folder.path}") from None
    return Checkpoint(**vars(folder), train_state=state)
