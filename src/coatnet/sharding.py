"""``coatnet train --fsdp``: the model sharded across processes with PyTorch's FSDP2, its optimizer
state saved and loaded sharded with ``torch.distributed.checkpoint`` (DCP).

With plain DDP every process holds the weights, gradients and AdamW's two moments: 16 bytes per
parameter, 39 GB for CoAtNet-7 before any activation. ``fully_shard`` splits each of them across
the processes and gathers one block's weights at a time for its forward and backward.

- Units: every block (MBConv or Transformer) is its own unit, and the model root holds the rest
  (stem, head). With ``--amp`` the gathered weights are bfloat16 and gradients are reduced in
  float32 (``MixedPrecisionPolicy``); BatchNorm stays float32 (its running statistics are float32,
  and CPU BatchNorm wants weights of their type), so each BatchNorm is a small unit of its own.
- Weights are not channels-last here: FSDP shards contiguous parameters only.
- Checkpoints: the weights (and EMA weights) are gathered into one file by the first process, as
  in every checkpoint, so ``from_pretrained``, ``eval``, ``predict`` and ``export`` read any
  checkpoint of an FSDP run as they read others, and nothing needs consolidating. The optimizer
  state, twice the weights, stays sharded: each process writes its shard with DCP into the
  checkpoint's ``optimizer/`` folder. DCP reshards on load, so an FSDP run resumes on another
  number of processes; a DDP checkpoint (whole optimizer state) and an FSDP one do not resume
  each other: start a new run from the weights with ``--pretrained`` instead.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .checkpoint import CheckpointError, process_lost, write_failed

def shard(model: nn.Module, amp: bool) -> nn.Module:
    """Shard ``model`` (a CoAtNet) across the process group: each block a unit, the root the rest."""
    float32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if amp else float32
    if amp:
        for norm in model.modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                fully_shard(norm, mp_policy=float32)
    for stage in model.stages:
        for block in getattr(stage, "blocks", stage):  # a TransformerStage's blocks; a ConvStage is its blocks
            fully_shard(block, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def ema_avg_fn(average):
    """``AveragedModel``'s ``multi_avg_fn`` for a sharded model: its parameters are DTensors, its
    buffers (BatchNorm statistics) plain tensors, and one foreach call cannot mix the two."""

    def update(ema_tensors: list, tensors: list, n_averaged) -> None:
        for sharded in (True, False):
            pairs = [(e, t) for e, t in zip(ema_tensors, tensors) if isinstance(e, DTensor) == sharded]
            if pairs:
                average([e for e, _ in pairs], [t for _, t in pairs], n_averaged)

    return update


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict, on the CPU of the first process (empty on the others); every process calls it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole state dict (every process has it) into the sharded ``model``: each keeps its shard."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def save_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every process writes its shard of the optimizer state into ``folder`` (collective); a write
    that fails in any process (a full disk) is a one-line :class:`CheckpointError`, ``folder`` removed.
    DCP fails every process alike (its gathered failures), so under torchrun the first one says it and the others leave
    quietly with exit status 2 (``SystemExit``): one line for the job, not one per process."""
    try:
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=folder)
    except (Exception, dcp.api.CheckpointException) as e:  # DCP gathers every process's failure in its own
        shutil.rmtree(folder, ignore_errors=True)
        if process_lost(e):  # another process died: no disk or permission to fix (said by train, as anywhere)
            raise
        if isinstance(e, dcp.api.CheckpointException) and dist.is_initialized() and dist.get_rank() != 0:
            raise SystemExit(2) from None  # DCP's gathered failure, which the first process has too
        raise write_failed(folder, _first_line(e)) from None
    # Each process writes its shard into the folder as its machine sees it: on a folder of each machine's
    # own, the first one's checkpoint would lack the others' shards (found only by --resume, days later) and
    # they would leave theirs behind at every save. Its metadata lists every shard: the first process looks.
    rank = dist.get_rank() if dist.is_initialized() else 0
    box = [_missing_shards(folder) if rank == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        shutil.rmtree(folder, ignore_errors=True)  # here, and on each machine its own copy
        if rank != 0:
            with contextlib.suppress(OSError):  # the run's folder, made by DCP on this machine: left empty
                folder.parent.rmdir()
            raise SystemExit(2)  # said once, by the first process
        raise CheckpointError(f"the optimizer shards written by the other processes ({', '.join(box[0][:2])}"
                              f"{' ...' if len(box[0]) > 2 else ''}) are not in '{folder.parent}' as the first process "
                              f"sees it: --output-dir must be a folder every machine of the job sees (a shared file "
                              f"system), not each machine's own; give one, and continue with --resume from there")


def _missing_shards(folder: Path) -> list[str]:
    """The files of the sharded state in ``folder`` that its metadata lists and this process cannot find."""
    files = {info.relative_path for info in dcp.FileSystemReader(folder).read_metadata().storage_data.values()}
    return sorted(name for name in files if not (folder / name).is_file())


def _first_line(e: BaseException) -> str:
    """Why DCP failed, in a line: the first failing process's own error, where DCP gathered them."""
    if isinstance(e, dcp.api.CheckpointException) and e.failures:
        rank, (error, _) = min(e.failures.items(), key=lambda kv: kv[0])
        return f"process {rank}: {_first_line(error)}"
    return next(iter(str(e).strip().splitlines()), "")[:200] or type(e).__name__


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Read this process's shard of the optimizer state from ``folder``, resharded to this run
    (collective); a missing or damaged shard is a one-line :class:`CheckpointError` in every process."""
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the layout to fill
    try:
        if not folder.is_dir():
            raise FileNotFoundError("the folder is missing")
        dcp.load(state, checkpoint_id=folder)
    except (Exception, dcp.api.CheckpointException) as e:  # DCP gathers every process's failure in its own
        raise CheckpointError(f"the optimizer state in {str(folder)!r} cannot be read ({_first_line(e)}): a shard is "
                              f"missing or damaged; resume another checkpoint of the run, or start a new run from its "
                              f"weights with --pretrained {folder.parent}") from None
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
