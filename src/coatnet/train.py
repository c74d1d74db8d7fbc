"""``coatnet train``: the paper's training recipe as one plain loop.

``train(TrainConfig(...))`` runs it from Python; ``coatnet train`` merges its flags into a recipe
(or into the resumed run's settings) and calls it. Read ``train()`` first: it sets up the run,
fresh or resumed, then trains, evaluates, records and checkpoints each epoch. Runs on one CPU or
GPU as it is, and on many processes under ``torchrun`` with DistributedDataParallel.

Exact resume: every random choice either comes from the global torch RNG, whose state (one per
rank) is saved in each checkpoint, or from a per-sample seed that depends only on (seed, epoch,
sample index), so a run restarted from any checkpoint repeats the uninterrupted run bit for bit
on the same machine, whatever the number of data-loading workers.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from . import sharding
from .checkpoint import (LOCK, OPTIMIZER_SHARDS, Checkpoint, CheckpointError, atomic_write, holds_a_run,
                         load_checkpoint, locked_run_dir, point_link, process_lost, refuse_if_in_use,
                         save_checkpoint)
from .complexity import count_parameters
from .data import (MIN_IMG_SIZE, DataBundle, SubstitutesUndecodable, build_datasets, check_randaugment,
                   default_preprocessing, mixup_cutmix, recorded_place, split_folder, split_holding)
from .evaluate import evaluate
from .interrupt import raise_if_requested
from .models import create_model, load_weights
from .models.coatnet import MAX_IMG_SIZE
from .models.factory import PretrainedWeights, read_pretrained
from .models.folder import CHECKPOINT_NAME, CONFIG, TRAIN_STATE, WEIGHTS, read_model_meta, read_pretrained_cfg
from .models.hub import hub_repository, is_hub_reference, local_path
from .models.registry import MODEL_SOURCES, model_entry
from .models.timm_convert import classifier_size
from .plan import MIN_MICRO_BATCH
from .plots import plot_curves
from .text import json_text
from .validate import (Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range, check_fields,
                       resolve_device, slow_bfloat16)


# --------------------------------------------------------------------------------------------
# Settings and recipes
# --------------------------------------------------------------------------------------------


def flag(name: str) -> str:
    """The command-line flag of a :class:`TrainConfig` field: ``min_lr`` -> ``--min-lr``."""
    return "--" + name.replace("_", "-")


# A Beta(alpha, alpha) mixing weight, or 0 for off. For small alphas torch's Beta sampler is wrong: both of
# its Gamma draws underflow to 0 and it returns 0.5 (the most mixing) where the weight should be 0 or 1 (the
# least), in 24% of the draws at 0.001 and 0.08% at 0.005 (none measured at 0.01, hence the bound); past
# 1e38 the alpha overflows float32.
MixAlpha = Literal[0] | Annotated[float, Range(0.01, 1e38)]


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run. The defaults are the ``digits`` recipe: a CPU run that needs no flags.

    Each field declares what it admits; a bad value fails in one line that names its flag.
    """

    model: str = "coatnet_pico"
    model_config: dict | None = None  # overrides of the model's config fields (the layout study's sizes)
    # Start from these weights (a new head for the data's classes): a weights file, a folder, a run,
    # "hf-hub:ORG/NAME", or True for timm's weights of --model on the Hub. The run prepares its images
    # as the weights expect (their pretrained_cfg).
    pretrained: str | bool | None = None
    data: str = "digits"
    data_dir: str | None = None
    img_size: Annotated[int, Range(MIN_IMG_SIZE, MAX_IMG_SIZE)] | None = 32  # None: the weights', else the model's
    epochs: PositiveInt = 15
    batch_size: PositiveInt = 64  # global: split across processes under torchrun
    lr: PositiveFloat = 2e-3
    min_lr: NonNegativeFloat = 1e-5
    warmup_steps: NonNegativeInt = 50
    weight_decay: NonNegativeFloat = 0.05
    drop_path: Fraction | None = 0.0  # None: the model's own rate (Table 10)
    clip_grad: NonNegativeFloat = 1.0  # 0 is off
    label_smoothing: Fraction = 0.1
    augment: bool = True  # the data set's random crop and flip; off (timm's --no-aug): prepared as for eval
    randaugment: tuple[int, int] | None = None
    mixup: MixAlpha = 0.0
    cutmix: MixAlpha = 0.0
    ema: Fraction = 0.0  # EMA decay; 0 is off
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    fsdp: bool = False  # shard weights, gradients and optimizer state across processes (coatnet.sharding)
    grad_checkpointing: bool = False  # recompute each block's activations in the backward pass
    grad_accum_steps: PositiveInt = 1  # micro-batches per optimizer step (the batch is split, same samples)
    seed: Annotated[int, Range(-2**63, 2**63 - 1)] = 0  # torch's generators take 64 bits
    workers: NonNegativeInt = 0
    save_every: NonNegativeInt = 0  # also checkpoint every N steps (0: at each epoch's end only)
    device: str | None = None

    def __post_init__(self) -> None:
        check_fields(self, label=flag)
        check_randaugment(self.randaugment, "--randaugment")  # a pair: it checks itself, as check_fields leaves tuples
        augmenting = {"--randaugment": self.randaugment, "--mixup": self.mixup, "--cutmix": self.cutmix}
        if not self.augment and any(augmenting.values()):
            on = [k for k, v in augmenting.items() if v]
            raise ValueError(f"--no-aug trains on images prepared as for evaluation, and {' and '.join(on)} "
                             f"augment{'s' if len(on) == 1 else ''} them: turn {'it' if len(on) == 1 else 'them'} "
                             f"off too (0), or drop --no-aug")
        if self.lr * self.weight_decay >= 1:
            kept = 1 - self.lr * self.weight_decay
            raise ValueError(f"--weight-decay {self.weight_decay:g} with --lr {self.lr:g}: AdamW multiplies the "
                             f"weights by 1 - lr x weight-decay = {kept:.3g} at each step, which zeroes or flips "
                             f"them; keep lr x weight-decay well below 1 (the paper: 1e-3 x 0.05)")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr} is above --lr {self.lr}; the schedule decays from lr to min-lr")
        if self.model.startswith(MODEL_SOURCES):
            raise ValueError(f"--model takes a model name (see `coatnet info`), not {self.model}; to start from a "
                             f"Hub repository's or a folder's weights, give it to --pretrained (hf-hub:ORG/NAME, or "
                             f"the folder's PATH), with --model naming its network")
        if self.pretrained == "":
            raise ValueError("--pretrained was given an empty path; give weights (a file, a folder or "
                             "hf-hub:ORG/NAME), or --pretrained alone for timm's weights of --model")
        set_by_the_run = sorted({"num_classes", "img_size", "drop_path_rate", "pretrained"}
                                & set(self.model_config or {}))
        if set_by_the_run:
            raise ValueError(f"model_config sets {', '.join(set_by_the_run)}, which the run sets from its data and "
                             f"settings (the data's classes, --img-size, --drop-path, --pretrained); give them there")


# The paper's recipe (Table 10), ImageNet-1K pre-training and fine-tuning, with CoAtNet-0..3.
# Stochastic depth is left to the model (Table 10: 0.2 / 0.3 / 0.5 / 0.7 for CoAtNet-0..3).
# RandAugment's magnitude 15 is on TensorFlow's scale, where M is M/10 of each operation's range (15: 1.5
# times it). torchvision's magnitude M is M/30 of the same range and stops at it: 30, the strongest it has,
# is what timm's rand-m15 gives too (it clips M at 10); torchvision's 15 would be the paper's 5.
PAPER_RANDAUGMENT = (2, 30)
RECIPES: dict[str, TrainConfig] = {
    "digits": TrainConfig(),
    "imagenet1k-pretrain": replace(TrainConfig(), model="coatnet_0", data="imagefolder", img_size=224, epochs=300,
                                   batch_size=4096, lr=1e-3, min_lr=1e-5, warmup_steps=10_000, weight_decay=0.05,
                                   drop_path=None, clip_grad=1.0, label_smoothing=0.1,
                                   randaugment=PAPER_RANDAUGMENT, mixup=0.8, ema=0.0, workers=8),
    "imagenet1k-finetune": replace(TrainConfig(), model="coatnet_0", data="imagefolder", img_size=384, epochs=30,
                                   batch_size=512, lr=5e-5, min_lr=1e-5, warmup_steps=0, weight_decay=1e-8,
                                   drop_path=None, clip_grad=1.0, label_smoothing=0.1,
                                   randaugment=PAPER_RANDAUGMENT, mixup=0.8, ema=0.9999, workers=8),
    # Fine-tuning timm's ImageNet weights on a folder of your own photos, on one machine: Table 10's
    # fine-tuning row (no warm-up, weight decay 1e-8, label smoothing, RandAugment) adapted to a few
    # hundred images: batch 32, 10 epochs, a rate high enough for the new head; no EMA and no Mixup,
    # which need far more steps than such a run has.
    "finetune": replace(TrainConfig(), model="coatnet_0_rw_224.sw_in1k", pretrained=True, data="imagefolder",
                        img_size=None, epochs=10, batch_size=32, lr=1e-4, min_lr=1e-6, warmup_steps=0,
                        weight_decay=1e-8, drop_path=None, clip_grad=1.0, label_smoothing=0.1, randaugment=(2, 10),
                        mixup=0.0, ema=0.0, workers=4),
}


def resumed_config(resume: bool | str | Path | None, output_dir: str | Path | None = None) -> TrainConfig | None:
    """The settings of the run that ``train(..., output_dir, resume)`` would continue; None for a new run.

    Read from the checkpoint's config.json, without its weights and optimizer state (train() reads
    those); checkpoints written before it held the settings keep them in their training state."""
    if not resume:
        return None
    path = _resume_path(resume, output_dir)
    if os.environ.get("RANK", "0") == "0":  # the process that takes the lock (the others would race it)
        refuse_if_in_use(path if path.is_dir() and not (path / "config.json").exists() else path.parent)
    path, meta = read_model_meta(path)
    values = meta["train_config"] if "train_config" in meta else \
        _resume_checkpoint(resume, output_dir).train_state.get("train_config")
    try:  # a config.json edited by hand, or written by another version, is refused in one line
        if not isinstance(values, dict):
            raise ValueError("none recorded" if values is None else f"a JSON {type(values).__name__}, not an object")
        unknown = sorted(set(values) - {f.name for f in fields(TrainConfig)})
        missing = [k for k in KEPT_ON_RESUME if k not in values]
        if unknown or missing:
            raise ValueError("; ".join(([f"unknown {', '.join(unknown)}"] if unknown else [])
                                       + ([f"no {', '.join(missing)}"] if missing else [])))
        if isinstance(values.get("randaugment"), list):
            values = values | {"randaugment": tuple(values["randaugment"])}  # saved as a list
        return TrainConfig(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{str(path / 'config.json')!r} holds no usable train_config ({e}); resume another "
                              f"checkpoint, or start a new run from its weights with --pretrained {path}") from None


# What every checkpoint's train_state.pt holds and a resume reads. Those written later are optional
# (read with .get: schedule_steps, epoch_world_size, cuda_rng, train_images), train_config too where
# config.json holds it.
RESUMED_STATE = ("step", "epoch", "batch_in_epoch", "optimizer", "rng", "best_top1", "history", "progress",
                 "wall_seconds", "ema_n_averaged")


def _resume_path(resume: bool | str | Path, output_dir: str | Path | None) -> Path:
    if resume is True and output_dir is None:
        raise ValueError("--resume without a path needs --output-dir (the run to continue)")
    path = Path(output_dir) if resume is True else local_path(resume)  # timm's local-dir:PATH too
    if (path / LOCK).is_file() and not holds_a_run(path) and not (path / "config.json").exists():
        if os.environ.get("RANK", "0") == "0":  # the process that takes the lock (the others would race it)
            refuse_if_in_use(path)  # a run in its first epoch has no checkpoint yet either
        raise CheckpointError(f"{path} holds no checkpoint to resume: its run stopped before its first save; "
                              f"start it again without --resume")
    return path


def _resume_checkpoint(resume: bool | str | Path | None, output_dir: str | Path | None) -> Checkpoint | None:
    """The checkpoint ``resume`` names (a checkpoint or run directory; True: the run in ``output_dir``)."""
    if not resume:
        return None
    ckpt = load_checkpoint(_resume_path(resume, output_dir))
    if ckpt.train_state is None:
        raise CheckpointError(f"{str(ckpt.path)!r} holds weights only, no training state; "
                              f"use --pretrained to start a new run from it")
    # Edited by hand or cut short: said here in one line, not as a KeyError where the resume reads it.
    state = ckpt.train_state if isinstance(ckpt.train_state, dict) else {}
    missing = [key for key in RESUMED_STATE if key not in state]
    if "train_config" not in ckpt.meta and "train_config" not in state:  # older checkpoints keep it here
        missing.append("train_config")
    if missing:
        raise CheckpointError(f"{str(ckpt.path / TRAIN_STATE)!r} lacks {', '.join(missing)}, which resuming "
                              f"reads (edited, or not written by coatnet); resume another checkpoint of the run "
                              f"(its ckpt-* folders in {ckpt.path.parent}), or start a new run from its weights with --pretrained {ckpt.path}")
    return ckpt


# --------------------------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # this call started the process group, so it ends it

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None, fsdp: bool = False) -> Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:  # "cuda": each process its own GPU, as torchrun numbers them
        dev = torch.device("cuda", local_rank)
        device = f"cuda (LOCAL_RANK {local_rank})"
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # A caller that trains several times (the layout study) starts the group once and keeps it:
    # a process group cannot be started again in a process under torchrun.
    # FSDP needs a group even in one process (a sharded run resumed without torchrun): a group of one.
    owns_group = (world_size > 1 or fsdp) and not dist.is_initialized()
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if owns_group and world_size > 1:
        # torchrun starts them all; another launcher may not have. Said once, by the first.
        if "TORCHELASTIC_RUN_ID" not in os.environ and os.environ.get("RANK", "0") == "0":
            print(f"note: waiting for the {world_size} processes of WORLD_SIZE={world_size} at "
                  f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}, as the environment says "
                  f"(torchrun starts them; unset WORLD_SIZE for one process)", file=sys.stderr, flush=True)
        dist.init_process_group(backend)
    elif owns_group:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(dist.get_rank() if world_size > 1 else 0, world_size, dev, owns_group)


def _broadcast(obj, d: Dist):
    """Rank 0's value of ``obj`` on every rank."""
    if d.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj, d: Dist) -> list:
    if d.world_size == 1:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def _said_once(check, d: Dist):
    """``check()`` in every process: the refusals of a run's settings, checkpoint and folder, which every
    process makes alike. Under torchrun a refusal is said once, not once per process: the first process
    raises it (or, where only others refuse, the first of theirs, naming the process), the others leave
    with exit status 2 (``SystemExit``) and say nothing."""
    try:
        result, error = check(), None
    except ValueError as e:
        result, error = None, e
    if d.world_size == 1:
        if error is not None:
            raise error
        return result
    refused = [(rank, message) for rank, message in enumerate(_gather(None if error is None else str(error), d))
               if message is not None]
    if not refused:
        return result
    if not d.main:
        raise SystemExit(2)
    if error is not None:
        raise error
    rank, message = refused[0]
    raise ValueError(f"process {rank}: {message}")


def _log(d: Dist, text: str) -> None:
    if d.main:
        print(text, flush=True)


# --------------------------------------------------------------------------------------------
# Data order and per-sample seeds
# --------------------------------------------------------------------------------------------


class SeededSamples(Dataset):
    """Draws each sample's augmentation from its own seed, passed in by the sampler with the index.

    The seed depends only on (run seed, epoch, index), so a sample is augmented the same way in a
    resumed run, under another number of workers, or on another rank.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        seed, index = key
        with torch.random.fork_rng(devices=[]):
            # The CPU's generator only, which the transforms draw from: torch.manual_seed also seeds
            # every accelerator's, and records a stack trace per call for CUDA's lazy start, 20x the time.
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


def epoch_order(n: int, seed: int, epoch: int, world_size: int) -> list[int]:
    """The indices of ``n`` samples in the order ``world_size`` processes train on them in ``epoch``:
    DistributedSampler's shuffle and padding (the first samples repeated up to a multiple of
    ``world_size``), whose rank r takes positions r, r + world_size, ... of it. So a
    step of global batch B takes positions [jB, (j+1)B) on any number of processes, and a run resumed
    part way through an epoch on another number goes on where the epoch stopped."""
    sampler = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=seed)  # the shuffle alone
    sampler.set_epoch(epoch)
    size = math.ceil(n / world_size) * world_size
    return (list(sampler) * math.ceil(size / n))[:size]  # padded as DistributedSampler pads each rank's share


def epoch_steps(n: int, batch_size: int, world_size: int) -> int:
    """The steps of an epoch of ``n`` samples in global batches of ``batch_size`` on ``world_size``
    processes: each rank's share (padded) in whole local batches."""
    return math.ceil(n / world_size) // (batch_size // world_size)


def epoch_keys(run: Run) -> list[tuple[int, int]]:
    """This rank's (sample seed, index) pairs for the rest of the current epoch, in order: the epoch's
    positions from its next batch to its end, in the order of the processes it began on, dealt out to
    this run's."""
    cfg, d, s = run.config, run.dist, run.state
    order = epoch_order(len(run.data.train), cfg.seed, s.epoch, s.epoch_world_size)
    rest = order[s.batch_in_epoch * cfg.batch_size:run.steps_per_epoch * cfg.batch_size]
    return [(((cfg.seed * 1_000_003 + s.epoch) * 1_000_000_007 + i) % 2**63, i) for i in rest[d.rank::d.world_size]]


def make_loader(dataset: Dataset, indices: list, batch_size: int, workers: int, device: torch.device,
                drop_last: bool) -> DataLoader:
    # An explicit generator: creating the loader's iterator then never draws from the global RNG.
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=workers, drop_last=drop_last,
                      pin_memory=device.type == "cuda", generator=torch.Generator(),
                      persistent_workers=False, worker_init_fn=_worker_ends_quietly_on_sigterm)


def _worker_ends_quietly_on_sigterm(worker_id: int) -> None:
    """A SIGTERM to the run's whole process group (a job scheduler's, Slurm's) stops the run as Ctrl-C does,
    and reaches its data-loading workers too: killed by it, a worker made the run print DataLoader's traceback
    ("DataLoader worker (pid N) is killed by signal: Terminated") before its line. So a worker ends at once with
    status 0, which DataLoader takes as an ending, not a failure. It must end: a worker that ignored SIGTERM
    outlived DataLoader's `terminate()` and hung its process at exit in multiprocessing's join."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    # The run, stopping, drops its end of a batch's hand-over: the worker's multiprocessing resource sharer,
    # which reports through sys.excepthook, would print that reset connection's traceback after the run's line
    hook = sys.excepthook
    sys.excepthook = lambda kind, value, tb: None if issubclass(kind, (ConnectionError, EOFError)) else hook(
        kind, value, tb)


# --------------------------------------------------------------------------------------------
# Optimizer and schedule (Table 10: AdamW, linear warm-up, cosine decay to min_lr)
# --------------------------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only: not on biases, norms or the relative-position bias
    (``model.no_weight_decay()``, as timm's optimizer factory takes them)."""
    decay, no_decay, skip = [], [], model.no_weight_decay()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, fused into one kernel per step on CPU and CUDA (one pass over all
    parameters instead of a loop of small kernels per parameter)."""
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, fused=fused)


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int, step: int = 0) -> LambdaLR:
    """The learning rate as a function of the step alone: linear warm-up to ``cfg.lr``, cosine decay
    to ``cfg.min_lr`` at ``total_steps``, then flat at ``min_lr``, so that a finished run extended by
    more epochs goes on at its last rate instead of climbing again. ``step``: where a resumed run is."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    floor = cfg.min_lr / cfg.lr

    def factor(s: int) -> float:  # of cfg.lr
        if s < warmup:
            return (1 + (warmup - 1) * s / warmup) / warmup  # from lr / warmup at the first step up to lr
        done = min(s - warmup, decay_steps) / decay_steps
        return floor + (1 - floor) * (1 + math.cos(math.pi * done)) / 2

    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr  # the schedule's base, which LambdaLR needs to start part way
    return LambdaLR(optimizer, factor, last_epoch=step - 1)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _fresh_progress() -> dict:
    """The running sums of the epoch so far (saved in mid-epoch checkpoints)."""
    return dict(loss_sum=0.0, correct=0, count=0, seconds=0.0)


class NonFiniteLoss(ValueError):
    """Training diverged: the loss or its gradient is not finite."""


@dataclass
class RunState:
    """Where a run is; checkpoints save it, a resumed run starts from it."""

    step: int = 0
    epoch: int = 0  # epochs finished
    batch_in_epoch: int = 0
    # The processes whose order of samples the current epoch follows: the run's, unless it was resumed
    # part way through the epoch on another number (that epoch then ends as it would have there).
    epoch_world_size: int = 1
    best_top1: float = -1.0
    history: list[dict] = field(default_factory=list)  # one metrics.jsonl line per finished epoch
    progress: dict = field(default_factory=_fresh_progress)
    earlier_seconds: float = 0.0  # wall time of the processes before this one (a resumed run's)


@dataclass
class Run:
    """The parts of one training run (built by :func:`start_run`) and its state."""

    config: TrainConfig
    dist: Dist
    run_dir: Path
    data: DataBundle
    val_loader: DataLoader  # this rank's shard of the validation set
    workers: int  # data-loading processes: --workers, at most the cores
    model: nn.Module
    net: nn.Module  # what the training steps call: the model, wrapped for DDP and compiled as configured
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    schedule_steps: int  # the LR schedule's length: the run's first epochs' steps, also once extended
    criterion: nn.Module
    batch_mix: nn.Module | None  # Mixup / CutMix
    started: float  # time.perf_counter() when this process started the run
    state: RunState = field(default_factory=RunState)

    @property
    def local_batch(self) -> int:
        return self.config.batch_size // self.dist.world_size

    @property
    def steps_per_epoch(self) -> int:
        """The current epoch's steps: those of the processes it began on (see RunState.epoch_world_size)."""
        return epoch_steps(len(self.data.train), self.config.batch_size, self.state.epoch_world_size)

    def wall_seconds(self) -> float:
        return self.state.earlier_seconds + time.perf_counter() - self.started


def train(config: TrainConfig, output_dir: str | Path | None = None, resume: bool | str | Path | None = None) -> dict:
    """Run a training run to ``config.epochs`` epochs; return its summary (also in ``summary.json``).

    ``output_dir``: the run directory (default: ``runs/DATE-TIME-MODEL-DATA``, or the resumed run's).
    ``resume``: True continues the run in ``output_dir``; a path continues that checkpoint or run
    directory (an extended run keeps its learning-rate schedule, flat at ``min_lr`` past its end).
    ``config`` is used as it is: build it on :func:`resumed_config` to keep the resumed run's settings.
    Bad input raises ValueError.
    """
    if config.img_size is None and (resume or not config.pretrained):  # a new run's weights say theirs (start_run)
        config = replace(config, img_size=model_img_size(config.model))
    config = replace(config, data_dir=recorded_place(config.data_dir))  # also when given again on --resume
    d = setup_distributed(config.device, config.fsdp)
    try:
        new_dir = _new_run_dir(config, d) if not (output_dir or resume) else None  # collective: outside the checks

        def refusals() -> tuple[Checkpoint | None, Path]:
            ckpt = _resume_checkpoint(resume, output_dir)
            run_dir = Path(output_dir) if output_dir else ckpt.path.parent if ckpt else new_dir
            _check(config, d, ckpt, run_dir)
            return ckpt, run_dir

        ckpt, run_dir = _said_once(refusals, d)
        # What to do where run_dir cannot take the run: a resumed one goes on in another folder.
        source = output_dir if resume is True else resume
        instead = (f"continue it elsewhere with --resume {source} --output-dir NEW" if ckpt else
                   "choose another --output-dir")
        with locked_run_dir(run_dir, instead) if d.main else nullcontext(), _said_on_interrupt(run_dir, ckpt, d):
            run = start_run(config, d, run_dir, ckpt, instead)
            if run.state.epoch >= config.epochs:
                done = (f"{run.state.epoch} of {config.epochs} epochs" if run.state.epoch == config.epochs else
                        f"{run.state.epoch} epochs, more than --epochs {config.epochs}")
                _log(d, f"{run_dir} has trained {done}: nothing left to do "
                        f"(pass --epochs N with more epochs to extend it)")
                if not _broadcast(_report_to_write(run, ckpt), d):  # the first process decides for all
                    return json.loads((run_dir / "summary.json").read_text())  # the run's own, left as it is
                report_epoch(run)  # stopped between its last checkpoint and its report: written from the checkpoint
            while run.state.epoch < config.epochs:
                train_one_epoch(run)
                metrics = evaluate_epoch(run)
                improved = record_epoch(run, metrics)
                # `best` before `last`: stopped between the two swaps, `last` is still the checkpoint before,
                # whose resume trains this epoch again and finds `best` (the new one) as good, never better
                save_run(run, ("best", "last") if improved else ("last",), top1=metrics["top1"])
                report_epoch(run)
            return finish_run(run)
    finally:
        if d.owns_group:
            dist.destroy_process_group()


class ProcessLost(RuntimeError):
    """Another process of the job stopped (killed, out of memory, its machine down) while this one
    waited on it: one line saying so and what continues the run, not the collective's traceback."""


@contextmanager
def _said_on_interrupt(run_dir: Path, ckpt: Checkpoint | None, d: Dist):
    """Ctrl-C (or SIGTERM, which ``coatnet train`` takes as Ctrl-C) stops the run with what continues
    it, and from where: the steps since its last checkpoint are lost. A checkpoint of this process
    holds the flags it was given; the one it resumed holds the flags given before. So does the loss of
    another process of the job (:class:`ProcessLost`), which every process left says, each may be the last."""
    try:
        yield
    except KeyboardInterrupt:
        if not d.main:  # under torchrun every process is stopped: the first one says so
            raise SystemExit(130) from None
        raise KeyboardInterrupt(_how_to_continue(run_dir, ckpt, d.world_size)) from None
    except BaseException as e:  # DCP's gathered failures are BaseExceptions
        if d.world_size == 1 or not process_lost(e):
            raise
        # gloo's first sentence, without its source file: "Read error [ADDR]: Connection reset by peer"
        why = re.sub(r"\[[^\]]*\.cc:\d+\]\s*", "", next(iter(str(e).splitlines()), "")).split(". ")[0][:160]
        why = why or type(e).__name__
        then = _how_to_continue(run_dir, ckpt, d.world_size)
        raise ProcessLost(f"process {d.rank}: another process of the job stopped ({why}); its own error, or "
                          f"torchrun's report, says why; then {then}") from None


def _how_to_continue(run_dir: Path, ckpt: Checkpoint | None, world_size: int) -> str:
    """What continues a stopped run, and from which step. A torchrun job's is resumed by torchrun on as many
    processes: on another number it continues too, but its random draws differ from the uninterrupted run's."""
    resumed_at = ckpt.train_state["step"] if ckpt else None
    saved_at = read_model_meta(run_dir)[1].get("step") if (run_dir / "last").exists() else None
    if saved_at is not None and saved_at != resumed_at:
        under = f" under torchrun, on the job's {world_size} processes," if world_size > 1 else ""
        return f"`coatnet train --resume {run_dir}`{under} continues it from its last checkpoint (step {saved_at})"
    if ckpt:
        return f"the same command continues it from the checkpoint it resumed (step {resumed_at})"
    return "no checkpoint was written yet: the same command starts it again"


def model_img_size(name: str) -> int:
    """The input size the model ``name`` is built for (384 for ``coatnet_rmlp_2_rw_384``), on the meta
    device: no weights are made."""
    with torch.device("meta"):
        return min(create_model(name).config.img_size)


def start_run(cfg: TrainConfig, d: Dist, run_dir: Path, ckpt: Checkpoint | None = None,
              instead: str = "choose another --output-dir") -> Run:
    """The run's data, model, optimizer and schedule: fresh, or at the state of the checkpoint it resumes.
    ``instead``: what to do where the run's folder has too little space."""
    started = time.perf_counter()
    local_batch = cfg.batch_size // d.world_size
    # Data-loading processes beyond the cores only compete for them (the ImageNet recipes ask for 8).
    workers = min(cfg.workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    if workers < cfg.workers:
        _log(d, f"note: --workers {cfg.workers} capped at this machine's {workers} cores")
    if cfg.amp and (why := slow_bfloat16(d.device)):
        _log(d, f"note: --amp trains in bfloat16, and {why}; --no-amp trains in float32")
    micro_batch = local_batch // cfg.grad_accum_steps
    if cfg.grad_accum_steps > 1 and micro_batch < MIN_MICRO_BATCH:
        _log(d, f"note: --grad-accum-steps {cfg.grad_accum_steps} leaves micro-batches of {micro_batch} image(s): "
                f"BatchNorm normalises each on its own, so its statistics are noisy and training differs from "
                f"batches of {local_batch}; use fewer steps where memory allows")

    # Images are prepared as the weights expect: the resumed run's way, the pretrained weights', or ours.
    weights = read_pretrained(cfg.pretrained, cfg.model) if cfg.pretrained and not ckpt else None
    if cfg.img_size is None:  # the size the weights were trained at where known (a 384 px fine-tune is not
        size = weights and weights.img_size  # shrunk to 224 under its 384 px preprocessing), else the model's
        cfg = replace(cfg, img_size=(min(size) if isinstance(size, tuple) else size) or model_img_size(cfg.model))
    if weights is not None and (grey := _grey_input(weights)):
        _log(d, f"note: {cfg.pretrained} takes grey images (1 input channel) and training reads RGB ones: its "
                f"input filters are spread over the 3 colours, a third each, so a grey image gives what it gave")
        weights = replace(weights, state=weights.state | grey)
    preprocessing = (read_pretrained_cfg(ckpt) if ckpt else None) \
        or default_preprocessing(cfg.data, cfg.img_size, weights.pretrained_cfg if weights else None)
    with warnings.catch_warnings():
        if not d.main:  # every process lists the same files: the first one says what it found
            warnings.simplefilter("ignore")
        data = build_datasets(cfg.data, cfg.data_dir, cfg.img_size, randaugment=cfg.randaugment,
                              preprocessing=preprocessing, augment=cfg.augment)
    if ckpt is not None:
        _check_same_classes(ckpt, preprocessing.label_names, data.classes)
    if data.num_classes < 2:  # every label the same: 100% from the first step, and nothing learnt
        raise ValueError(f"the data has {data.num_classes} class ({', '.join(data.classes)}): training a classifier "
                         f"needs at least 2; add the other classes' folders (or samples)")
    if len(data.train) < cfg.batch_size:
        raise ValueError(f"the training set has {len(data.train)} images, fewer than --batch-size {cfg.batch_size}: "
                         f"give a --batch-size of {len(data.train)} or less, or more images")
    val_indices = list(range(d.rank, len(data.val), d.world_size))
    val_loader = make_loader(data.val, val_indices, local_batch, workers, d.device, drop_last=False)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    batch_mix = mixup_cutmix(data.num_classes, cfg.mixup, cfg.cutmix)
    steps_per_epoch = epoch_steps(len(data.train), cfg.batch_size, d.world_size)
    if ckpt is None:
        schedule_steps = cfg.epochs * steps_per_epoch
    else:  # the length the run started with, also when extended (an older checkpoint without it: its epochs')
        saved = ckpt.train_state
        schedule_steps = saved.get("schedule_steps") or \
            (ckpt.meta.get("train_config") or saved["train_config"])["epochs"] * steps_per_epoch

    # Keep this order of random draws: an exact resume repeats them.
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and in every run
    with warnings.catch_warnings():  # a new classifier is what fine-tuning asks for: said below, in its line
        warnings.filterwarnings("ignore", "the checkpoint has (a|no) classifier")
        model = create_model(cfg.model, pretrained=weights, num_classes=data.num_classes, img_size=cfg.img_size,
                             drop_path_rate=cfg.drop_path, **(cfg.model_config or {}))
    model.pretrained_cfg = preprocessing.with_classes(data.num_classes, data.classes)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    if weights is not None:
        source = hub_repository(True, cfg.model)[0] if cfg.pretrained is True else cfg.pretrained
        theirs = classifier_size(weights.state)
        head = (f"their classifier ({theirs} classes) kept" if theirs == data.num_classes else
                f"a new classifier for the {data.num_classes} classes" + (f" (theirs: {theirs})" if theirs else ""))
        _log(d, f"fine-tuning from the weights of {source}, {head}")
    # The model computes channels-last (CoAtNet.forward_stem), so its conv weights' gradients come
    # back channels-last: keep the weights so too. Otherwise DDP's buckets, laid out like the weights,
    # do not match the gradients ("Grad strides do not match bucket view strides"), and autograd
    # copies the stem's gradients into the weights' layout at every step.
    # (FSDP shards contiguous weights only.)
    model.to(d.device, memory_format=torch.contiguous_format if cfg.fsdp else torch.channels_last)
    ema = (AveragedModel(model, multi_avg_fn=sharding.ema_avg_fn(get_ema_multi_avg_fn(cfg.ema)), use_buffers=True)
           if cfg.ema > 0 else None)
    if cfg.fsdp:
        for module in [model, ema.module] if ema else [model]:
            sharding.shard(module, cfg.amp)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = lr_schedule(optimizer, cfg, schedule_steps, step=ckpt.train_state["step"] if ckpt else 0)
    net = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None) \
        if d.world_size > 1 and not cfg.fsdp else model
    if cfg.compile:
        net = torch.compile(net)
    torch.manual_seed(cfg.seed + d.rank)  # drop path and Mixup draws differ across ranks

    run = Run(cfg, d, run_dir, data, val_loader, workers, model, net, ema, optimizer, scheduler,
              schedule_steps, criterion, batch_mix, started, RunState(epoch_world_size=d.world_size))
    # Before the restore, which says "resumed": with nothing to train, no checkpoint is written.
    if d.main and (ckpt.train_state["epoch"] if ckpt else 0) < cfg.epochs:
        _check_free_space(run, instead)
    if ckpt is not None:
        _restore(run, ckpt)
    if cfg.fsdp:  # weights, gradients and AdamW's two moments: 4 copies of this process's shard
        held = sum(4 * p.to_local().numel() * p.element_size() for p in model.parameters())
        _log(d, f"FSDP: each process holds {held / 2**20:.1f} MiB of weights, gradients and optimizer state "
                f"({4 * sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20:.1f} MiB unsharded)")
    _log(d, f"training {cfg.model} ({count_parameters(model) / 1e6:.2f}M params with a {data.num_classes}-class "
            f"head) on {cfg.data}: {len(data.train)} train / {len(data.val)} val images at {cfg.img_size}x"
            f"{cfg.img_size}, {cfg.epochs} epochs x {steps_per_epoch} steps, batch {cfg.batch_size}, "
            f"{d.world_size} process(es) on {d.device.type}; output {run_dir}")
    # lr_schedule ends the warm-up at the last step at the latest (schedule_steps - 1): from there on, none decays
    # (a run of one step has nothing to decay, whatever the warm-up)
    if ckpt is None and schedule_steps > 1 and cfg.warmup_steps >= schedule_steps - 1:
        _log(d, f"note: --warmup-steps {cfg.warmup_steps} covers the whole run of {schedule_steps} steps: the rate "
                f"reaches --lr at its last step and never decays; give fewer (e.g. --warmup-steps "
                f"{schedule_steps // 10})")
    return run


def _grey_input(weights: PretrainedWeights) -> dict[str, torch.Tensor]:
    """The input conv of weights of one channel (a grey model's) as 3-channel filters for the RGB images
    training reads, each a third of the grey filter (an image's RGB copy then gives what the grey one gave,
    the inverse of fit_input_channels); empty for other weights."""
    key = next((k for k in ("stem.0.0.weight", "stem.weight", "stem.conv1.weight") if k in weights.state), None)
    weight = weights.state[key] if key else None
    if weight is None or weight.dim() != 4 or weight.shape[1] != 1:
        return {}
    return {key: (weight.float().repeat(1, 3, 1, 1) / 3).to(weight.dtype)}


def _check_same_classes(ckpt: Checkpoint, recorded: list[str] | None, classes: list[str]) -> None:
    """A resumed run goes on with the classes it trained on, label for label: with a class added or
    removed its head and optimizer state no longer fit, and with one renamed (or reordered) each
    label would silently mean another class. Without names recorded (a config.json edited), their number."""
    if recorded is None:
        trained, change = ckpt.meta["config"].get("num_classes", len(classes)), "their names not recorded"
        if trained == len(classes):
            return
    elif list(recorded) == list(classes):
        return
    else:
        removed, added = [c for c in recorded if c not in classes], [c for c in classes if c not in recorded]
        trained = len(recorded)
        change = "; ".join(part for part in (f"gone: {', '.join(removed[:5])}" if removed else "",
                                             f"new: {', '.join(added[:5])}" if added else "") if part) or "another order"
    raise ValueError(f"the data's {len(classes)} classes are not the {trained} this run trained on ({change}); "
                     f"resume with the data as it was, or fine-tune on the new classes in a new run with "
                     f"--pretrained {ckpt.path}")


def _new_run_dir(cfg: TrainConfig, d: Dist) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(_broadcast(f"runs/{stamp}-{cfg.model}-{cfg.data}", d))


# What a resumed run keeps: the data it draws, in the order its seed and batch size give (a batch
# part way through an epoch is found by its position in that order), and the input size its
# weights' and optimizer state's shapes follow. Other settings may change (more epochs, another lr).
KEPT_ON_RESUME = ("data", "data_dir", "batch_size", "seed", "img_size")
RUN_FILES = ("metrics.jsonl", "curves.png", "summary.json")  # what a run writes beside its checkpoints


def _check(cfg: TrainConfig, d: Dist, ckpt: Checkpoint | None, run_dir: Path) -> None:
    """Refuse settings that cannot run, and any that would overwrite a run, before anything is built."""
    if ckpt and _network(ckpt.meta["model"]) != _network(cfg.model):
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} is of model {ckpt.meta['model']}, not {cfg.model}; "
                              f"drop --model to resume it, or start a new run from its weights with --pretrained")
    saved = ckpt and (ckpt.meta.get("train_config") or ckpt.train_state["train_config"])
    for name in KEPT_ON_RESUME if ckpt else ():
        if name in saved and not same_setting(name, getattr(cfg, name), saved.get(name)):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {getattr(cfg, name)} differs from the resumed run's {saved.get(name)}: a resumed "
                             f"run keeps its data, batch size, seed and image size; drop {flag} to resume it, or "
                             f"start a new run from its weights with --pretrained {ckpt.path}")
    # Found here, said once under torchrun and before the data is read and the model built (before: by every
    # process, once the run had read its data and built its model)
    sharded = ckpt is not None and ckpt.train_state["optimizer"] is None  # an --fsdp run's is written apart
    if ckpt and sharded != cfg.fsdp:
        raise CheckpointError(f"{str(ckpt.path)!r} was written by a run {'with' if sharded else 'without'} --fsdp "
                              f"and resumes only so: {'add' if sharded else 'drop'} --fsdp; or start a "
                              f"new run from its weights with --pretrained {ckpt.path}")
    trained = ckpt and ckpt.train_state["epoch"]  # epochs the resumed checkpoint finished
    if ckpt and ckpt.train_state["batch_in_epoch"] and cfg.epochs <= trained:
        # nothing would be trained, and the run's report would be of its last finished epoch, not of this checkpoint
        raise ValueError(f"--epochs {cfg.epochs} is below the epoch {ckpt.path} is part way through (epoch "
                         f"{trained + 1}, step {ckpt.train_state['step']}); give --epochs {trained + 1} or more to "
                         f"finish it")
    if ckpt and cfg.data_dir and not os.path.exists(cfg.data_dir):
        raise ValueError(f"the run's data directory {cfg.data_dir} does not exist; if it moved, give its new place "
                         f"with --data-dir")
    # Given no --img-size, a resumed run takes its train_config's: it must be its model's.
    if ckpt and list(ckpt.meta["config"].get("img_size") or ()) not in ([cfg.img_size] * 2, []):
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} holds a model at {ckpt.meta['config']['img_size']} px "
                              f"but its train_config says img_size {cfg.img_size} (config.json edited?); put back "
                              f"the model's size, or start a new run from its weights with --pretrained")
    if (run_dir / CONFIG).is_file() and (run_dir / WEIGHTS).is_file():
        # A checkpoint or model folder: the run would be written inside it (`--resume --output-dir RUN/last`
        # trained a new run in RUN/last/, leaving RUN as it was and its `last` a folder that holds a run).
        of = ckpt and run_dir.resolve() == ckpt.path.resolve()
        raise ValueError(f"--output-dir {run_dir} is a checkpoint or model folder, not a run directory; "
                         + (f"give the run's, --output-dir {run_dir.parent}, to continue it" if of else
                            "choose another --output-dir"))
    if ckpt is None and holds_a_run(run_dir):
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or choose another "
                         f"--output-dir")
    if ckpt is None and isinstance(cfg.pretrained, (str, Path)) and not is_hub_reference(cfg.pretrained) \
            and os.path.realpath(local_path(cfg.pretrained)) == os.path.realpath(run_dir):
        # Read after the run has made (and locked) its folder, it was said to be "a run in its first epoch"
        raise ValueError(f"--pretrained {cfg.pretrained} is this new run's own --output-dir, which holds no weights "
                         f"to start from; give the weights (another run, a folder or a file), or another --output-dir")
    elsewhere = ckpt is None or run_dir.resolve() != ckpt.path.parent.resolve()  # not the resumed run's folder
    behind_last = ckpt and os.path.realpath(run_dir / "last") != os.path.realpath(ckpt.path)
    if ckpt and not (elsewhere or behind_last) and cfg.epochs < trained < saved.get("epochs", 0):
        # Its last epoch's line would read "epoch 10/3", and the run was not finished: nothing says it ended
        raise ValueError(f"{run_dir} has trained {trained} of its {saved['epochs']} epochs, more than --epochs "
                         f"{cfg.epochs}: nothing to train; drop --epochs to train on to {saved['epochs']}, or use "
                         f"its weights as they are ({run_dir / 'last'})")
    if ckpt and cfg.epochs <= trained and (elsewhere or behind_last and not (run_dir / "summary.json").exists()):
        # Nothing to train: a report would be of no checkpoint in run_dir (a new folder), or would describe
        # another checkpoint than the run's `last`. A finished run's own report is left as it is.
        where = f" into {run_dir}" if elsewhere else ""
        raise ValueError(f"{ckpt.path} has trained {trained} epoch(s) and --epochs is {cfg.epochs}: nothing to train"
                         f"{where}; give --epochs {trained + 1} or more to train on from it")
    if ckpt and elsewhere and holds_a_run(run_dir):
        raise ValueError(f"--output-dir {run_dir} holds another run; resuming {ckpt.path} there would overwrite it: "
                         f"give an empty --output-dir, or none to continue in {ckpt.path.parent}")
    # Found now, not when the first epoch's report or checkpoint would replace it (naming our temporary file).
    for name in (*RUN_FILES, "last", "best"):
        path, link = run_dir / name, name in ("last", "best")
        if not path.is_symlink() and (path.is_dir() or link and path.exists()):
            raise ValueError(f"'{path}' is a {'folder' if path.is_dir() else 'file'}, where the run keeps its {name} "
                             f"{'link' if link else 'file'}; rename or move it, or choose another --output-dir")
    # A run writes these after its first checkpoint: in a folder without one, they are someone's own.
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if elsewhere and found:
        raise ValueError(f"{run_dir} holds {', '.join(found)} of no run, which this run would overwrite; move them "
                         f"or choose another --output-dir")
    if cfg.data.lower() == "imagefolder" and cfg.data_dir is not None:
        if inside := split_holding(run_dir, cfg.data_dir):  # the data set spoilt by the run's first save
            raise ValueError(f"--output-dir {run_dir} is inside the data's {inside[0]}/ folder ({inside[1]}), where "
                             f"the run's checkpoints and curves.png would be read as classes and images; choose "
                             f"a folder outside {split_folder(cfg.data_dir, 'train')} and "
                             f"{split_folder(cfg.data_dir, 'val')}")
    if cfg.data.lower() == "digits" and cfg.data_dir is not None:
        raise ValueError(f"--data-dir {cfg.data_dir} is given but the data set is digits, which is embedded and "
                         f"reads no folder; pass --data imagefolder|cifar10|cifar100|webdataset|hf")
    if cfg.batch_size % (d.world_size * cfg.grad_accum_steps) and ckpt:
        # A resumed run keeps its --batch-size (above): another one would be refused, so the processes must fit it
        fit = [n for n in range(1, cfg.batch_size + 1) if cfg.batch_size % (n * cfg.grad_accum_steps) == 0]
        nearest = max([n for n in fit if n < d.world_size] or fit[:1] or [None])  # the most it has, else fewest
        raise ValueError(f"the resumed run's --batch-size {cfg.batch_size} (global, kept on resume) is not divisible "
                         f"by {d.world_size} process(es) x --grad-accum-steps {cfg.grad_accum_steps}; resume it on a "
                         f"number of processes that divides it"
                         + (f" (e.g. {nearest})" if nearest else ", with a --grad-accum-steps that divides it")
                         + f", or start a new run from its weights with --pretrained {ckpt.path}")
    if cfg.batch_size % (d.world_size * cfg.grad_accum_steps):
        raise ValueError(f"--batch-size {cfg.batch_size} (global) is not divisible by {d.world_size} process(es) x "
                         f"--grad-accum-steps {cfg.grad_accum_steps}; give a multiple of "
                         f"{d.world_size * cfg.grad_accum_steps}")


def _network(name: str) -> str:
    """The registered network ``name`` builds: timm's names for it (coatnet_0_rw_224, with or without a
    pretrained tag) are the same network, which a resumed run may be given under any of them. A name
    the registry does not know is its own (refused as another model, or when the model is built)."""
    try:
        return model_entry(name).name
    except ValueError:
        return name


def same_setting(name: str, given, saved) -> bool:
    """Whether ``given`` is the resumed run's ``saved`` setting: the same data set, whatever its case;
    the same folder, however it is written, or where it moved (the run's is gone: another mount, a
    rename), whose classes are then checked against the run's."""
    if name == "data":
        return str(given).lower() == str(saved).lower()
    if name == "data_dir" and given is not None and saved is not None and os.path.exists(given):
        return not os.path.exists(saved) or os.path.samefile(given, saved)
    return given == saved


def _check_free_space(run: Run, instead: str) -> None:
    """Refuse to start (or go on) without room for the checkpoints to come. Each holds the weights, EMA
    weights and AdamW's two moments; a save writes the new one while the old ``last`` and ``best`` are
    kept, three at once where ``best`` is behind ``last``. Those the run's folder holds already count."""
    copies = 1 + (run.ema is not None) + 2
    size = copies * sum(p.numel() * p.element_size() for p in run.model.parameters())
    held = {os.path.realpath(run.run_dir / link) for link in ("last", "best") if (run.run_dir / link).exists()}
    needed = (3 - len(held)) * size
    free = shutil.disk_usage(run.run_dir).free
    if free < needed:
        raise ValueError(f"{run.run_dir} has {free / 2**20:.0f} MiB free, and this run needs about "
                         f"{needed / 2**20:.0f} MiB more for its checkpoints ({size / 2**20:.0f} MiB each, up to three "
                         f"at once: best, last and the one replacing it); free some space or {instead}")


def _restore(run: Run, ckpt: Checkpoint) -> None:
    """Weights, optimizer, EMA, state and this rank's RNG as the checkpoint saved them."""
    s, d = ckpt.train_state, run.dist
    sharded = s["optimizer"] is None  # an --fsdp run writes its optimizer state apart, sharded (_check: as this one)
    # The checkpoint gives AdamW's moments and steps; the settings (weight decay, the rate at this
    # step) stay this run's, which --resume may have changed (--weight-decay, --lr).
    settings = [{k: v for k, v in group.items() if k != "params"} for group in run.optimizer.param_groups]
    if sharded:
        sharding.load_full_state_dict(run.model, ckpt.weights)
        sharding.load_optimizer(run.model, run.optimizer, ckpt.path / OPTIMIZER_SHARDS)
    else:
        load_weights(run.model, ckpt.weights)
        run.optimizer.load_state_dict(s["optimizer"])
    for group, own in zip(run.optimizer.param_groups, settings):
        group.update(own)
    # The optimizer state keeps the layout it was saved in, and CPU fused AdamW pairs elements by
    # memory position: lay each moment out like its parameter (checkpoints written before the weights
    # were channels-last).
    for p, p_state in run.optimizer.state.items():
        for key, value in p_state.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                p_state[key] = torch.empty_like(p).copy_(value)
    if run.ema is not None:
        if ckpt.ema_weights is None:
            raise CheckpointError(f"{str(ckpt.path)!r} has no EMA weights but the run keeps an EMA; resume it without "
                                  f"--ema, or start a new run from its weights with --pretrained and --ema")
        if sharded:
            sharding.load_full_state_dict(run.ema.module, ckpt.ema_weights)
        else:
            load_weights(run.ema.module, ckpt.ema_weights)
        run.ema.n_averaged.fill_(s["ema_n_averaged"])
    # Continued in another folder (--resume RUN --output-dir NEW), `best` is the best of the checkpoints
    # there: the next epoch's is the first, not one left in RUN.
    best_here = os.path.lexists(run.run_dir / "best")
    # The best top-1 is that of the checkpoint `best` points at, as its config.json records it, not the one this
    # checkpoint counted: a run stopped between its two link swaps (or written by a version that swapped `last`
    # first) counted an epoch whose checkpoint `best` never pointed at, and no later epoch would have replaced it.
    best_top1 = s["best_top1"] if best_here else -1.0
    if best_here:
        try:
            recorded = read_model_meta(run.run_dir / "best")[1].get("top1")
        except ValueError:  # a `best` whose checkpoint is gone (deleted by hand) or damaged: none to beat, so
            recorded, best_top1 = None, -1.0  # the next epoch's is `best` (before: a link to nothing for good)
        if _a_top1(recorded):
            best_top1 = float(recorded)
        resumed = Path(os.path.realpath(ckpt.path))  # RUN/last: the checkpoint it points at
        of_the_run = resumed.parent == Path(os.path.realpath(run.run_dir)) and CHECKPOINT_NAME.fullmatch(resumed.name)
        if of_the_run and _a_top1(top1 := ckpt.meta.get("top1")) and top1 > best_top1:
            best_top1 = float(top1)  # an epoch's checkpoint better than `best`: it is the best
            if d.main:
                point_link(run.run_dir, "best", resumed.name)
    # Part way through an epoch, its rest follows the order of the processes it began on (older
    # checkpoints: those that wrote it), so that every remaining sample of it is trained, once.
    epoch_world_size = (s.get("epoch_world_size") or len(s["rng"])) if s["batch_in_epoch"] else d.world_size
    run.state = RunState(step=s["step"], epoch=s["epoch"], batch_in_epoch=s["batch_in_epoch"],
                         epoch_world_size=epoch_world_size, best_top1=best_top1,
                         history=s["history"], progress=_resumed_progress(s, d), earlier_seconds=s["wall_seconds"])
    if len(s["rng"]) == d.world_size:
        torch.set_rng_state(s["rng"][d.rank])
        if d.device.type == "cuda" and s.get("cuda_rng"):
            torch.cuda.set_rng_state(s["cuda_rng"][d.rank], d.device)
    else:
        _log(d, f"note: checkpoint written by {len(s['rng'])} process(es), resumed by {d.world_size}: "
                f"random draws will differ from an uninterrupted run")
    if epoch_world_size != d.world_size:
        _log(d, f"note: epoch {run.state.epoch + 1} began on {epoch_world_size} process(es): its remaining samples "
                f"are trained once each, in its order, and it ends at its {run.steps_per_epoch} steps "
                f"({epoch_steps(len(run.data.train), run.config.batch_size, d.world_size)} per epoch from the next)")
    if s.get("train_images") not in (None, len(run.data.train)) and run.state.epoch < run.config.epochs:
        _log(d, _changed_data_note(run, s["train_images"]))  # (older checkpoints did not record it)
    where = (f"in epoch {run.state.epoch + 1}" if run.state.batch_in_epoch else f"after epoch {run.state.epoch}")
    _log(d, f"resumed {ckpt.path} {where}, step {run.state.step}")
    last = run.run_dir / "last"
    if last.exists() and last.resolve() != ckpt.path.resolve():  # e.g. --resume RUN/best
        later = read_model_meta(last)[1].get("step", 0)
        if later > run.state.step:
            _log(d, f"note: the run's last checkpoint is at step {later}; going on from step {run.state.step} "
                    f"replaces it and drops its later epochs from metrics.jsonl as this run saves")


def _a_top1(value) -> bool:
    """Whether ``value`` (read from a config.json) is a top-1 accuracy: a finite number."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _changed_data_note(run: Run, saved: int) -> str:
    """What a run resumed on a training set of another size than it had (images added or removed) trains:
    each epoch's order and steps follow the set as it is now, while the learning-rate schedule keeps the
    length it was given (flat at min_lr past it)."""
    cfg, s, images = run.config, run.state, len(run.data.train)
    per_epoch = epoch_steps(images, cfg.batch_size, run.dist.world_size)
    left = max(run.steps_per_epoch - s.batch_in_epoch, 0)  # of the current epoch: its rest, or all of it
    end = s.step + left + (cfg.epochs - s.epoch - 1) * per_epoch
    if not s.batch_in_epoch:
        now = f"the epochs from {s.epoch + 1} on take {per_epoch} steps each"
    elif left:
        # epoch_keys takes the epoch's positions from its next batch on in the new set's order: the images of
        # its batches so far may come again, and those at the new order's first positions do not come
        now = (f"the rest of epoch {s.epoch + 1} ({left} steps) is drawn from the new set's order, so in that epoch "
               f"some images may be trained twice and others not at all; the epochs after it take {per_epoch} "
               f"steps each")
    else:
        now = (f"epoch {s.epoch + 1} ends at the {s.batch_in_epoch} steps it took, as many as the new set has or "
               f"more; the epochs after it take {per_epoch} steps each")
    total = run.schedule_steps
    schedule = (f"so the rate stays at --min-lr over the last {end - total} of the run's {end} steps" if end > total
                else f"so the run ends at step {end} of them, before the rate has decayed to --min-lr"
                if end < total else "the run's length too")
    return (f"note: the training set has {images} images, {saved} when this checkpoint was saved: {now}, while the "
            f"learning-rate schedule keeps its recorded {total} steps, {schedule}")


def _resumed_progress(saved: dict, d: Dist) -> dict:
    """This rank's sums of the epoch so far. Each rank saved its own (earlier versions, one process:
    a dict); on another number of processes the first takes them all, since only their total counts."""
    progress = saved["progress"] if isinstance(saved["progress"], list) else [saved["progress"]]
    if len(progress) == d.world_size:
        return progress[d.rank]
    if not d.main:
        return _fresh_progress()
    totals = {k: sum(p[k] for p in progress) for k in ("loss_sum", "correct", "count")}
    return totals | {"seconds": progress[0]["seconds"]}


def train_one_epoch(run: Run) -> None:
    """Train on the rest of the current epoch (all of it, unless resumed part way), checkpointing
    every ``save_every`` steps."""
    cfg, d, s = run.config, run.dist, run.state
    keys = epoch_keys(run)
    loader = make_loader(SeededSamples(run.data.train), keys, run.local_batch, run.workers, d.device, drop_last=True)
    run.net.train()
    bar = tqdm(total=run.steps_per_epoch, initial=s.batch_in_epoch, desc=f"epoch {s.epoch + 1}/{cfg.epochs}",
               disable=not (d.main and sys.stderr.isatty()), leave=False, dynamic_ncols=True)
    p = s.progress
    tic = time.perf_counter()
    for images, labels in loader:
        raise_if_requested()  # a Ctrl-C or SIGTERM dropped where it met the loader forking its workers
        images, labels = images.to(d.device, non_blocking=True), labels.to(d.device, non_blocking=True)
        loss, logits = train_step(run, images, labels)
        s.step += 1
        s.batch_in_epoch += 1
        p["loss_sum"] += loss.item() * labels.numel()
        p["correct"] += (logits.argmax(1) == labels).sum().item()
        p["count"] += labels.numel()
        p["seconds"] += time.perf_counter() - tic
        tic = time.perf_counter()
        bar.update(1)
        bar.set_postfix(loss=f"{p['loss_sum'] / p['count']:.3f}", acc=f"{100 * p['correct'] / p['count']:.1f}",
                        img_s=f"{p['count'] * d.world_size / p['seconds']:.0f}")
        if cfg.save_every and s.step % cfg.save_every == 0 and s.batch_in_epoch < run.steps_per_epoch:
            save_run(run, ("last",))
    bar.close()


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch, in ``grad_accum_steps`` micro-batches; returns the loss and the logits."""
    cfg = run.config
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = labels
    if run.batch_mix is not None:
        images, targets = run.batch_mix(images, labels)
    run.optimizer.zero_grad(set_to_none=True)
    steps = cfg.grad_accum_steps
    losses, logits = [], []
    for i, (x, t) in enumerate(zip(images.chunk(steps), targets.chunk(steps))):
        with _gradient_sync(run, i == steps - 1), torch.autocast(run.dist.device.type, dtype=torch.bfloat16,
                                                                 enabled=cfg.amp):
            logits.append(run.net(x))
            losses.append(run.criterion(logits[-1], t))
        (losses[-1] / steps).backward()
    loss = torch.stack(losses).mean().detach()
    # The gradient norm (clipped when asked) is the same on every process after DDP's all-reduce, so
    # all of them stop together when it is not finite, before the weights take a non-finite step.
    norm = nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad if cfg.clip_grad > 0 else math.inf)
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # FSDP: the norm of all shards
    if not torch.isfinite(norm):
        then = (f"the last checkpoint in {run.run_dir} holds finite weights; lower --lr or raise --warmup-steps, "
                f"then continue with --resume" if (run.run_dir / "last").exists() else
                "no checkpoint had been written yet; lower --lr or raise --warmup-steps and start again")
        raise NonFiniteLoss(f"the loss became {loss.item():.4g} (gradient norm {norm.item():.4g}) at step "
                            f"{run.state.step + 1}, epoch {run.state.epoch + 1}; stopped before that step, and {then}")
    run.optimizer.step()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update_parameters(run.model)
    return loss, torch.cat(logits)


def _gradient_sync(run: Run, sync: bool):
    """Reduce gradients across processes only at the last micro-batch of a step (they add up locally)."""
    ddp = getattr(run.net, "_orig_mod", run.net)  # under --compile, the DDP module torch.compile wraps
    if run.config.fsdp:
        run.model.set_requires_gradient_sync(sync)
    elif not sync and isinstance(ddp, DistributedDataParallel):
        return ddp.no_sync()
    return nullcontext()


def evaluate_epoch(run: Run) -> dict:
    """The epoch's line of metrics.jsonl: the evaluated model (the EMA when there is one) on the
    validation set, the training loss and accuracy summed over all processes, and the learning rate
    of the epoch's last step (the optimizer's already holds the next step's)."""
    cfg, d, s = run.config, run.dist, run.state
    share_buffers(run)
    eval_model = run.ema.module if run.ema is not None else run.model
    eval_model.eval()
    result = evaluate(eval_model, run.val_loader, d.device, run.data.num_classes, amp=cfg.amp,
                      channels_last=cfg.channels_last)
    seconds = s.progress["seconds"]
    totals = torch.tensor([s.progress["loss_sum"], s.progress["correct"], s.progress["count"]], dtype=torch.float64)
    if d.world_size > 1:
        dist.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    metrics = dict(epoch=s.epoch + 1, step=s.step, train_loss=loss_sum / count, train_top1=100 * correct / count,
                   eval_loss=result["loss"], top1=result["top1"], top5=result["top5"], eval_images=result["count"],
                   lr=cfg.lr * run.scheduler.lr_lambdas[0](s.step - 1), images_per_second=count / max(seconds, 1e-9),
                   epoch_seconds=seconds)
    if d.device.type == "cuda":  # the most any process held so far: what `coatnet plan` predicts
        # allocated: its tensors; reserved: what PyTorch's caching allocator took from the GPU for them
        peak = torch.tensor([torch.cuda.max_memory_allocated(d.device), torch.cuda.max_memory_reserved(d.device)],
                            device=d.device)
        if d.world_size > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        metrics["gpu_peak_gib"], metrics["gpu_reserved_gib"] = (peak / 2**30).tolist()
    return metrics


def record_epoch(run: Run, metrics: dict) -> bool:
    """Add the finished epoch to the history and move on to the next; True when top-1 improved."""
    s = run.state
    s.history.append(metrics)
    s.epoch, s.batch_in_epoch, s.progress = s.epoch + 1, 0, _fresh_progress()
    s.epoch_world_size = run.dist.world_size
    improved = metrics["top1"] > s.best_top1
    s.best_top1 = max(s.best_top1, metrics["top1"])
    return improved


def share_buffers(run: Run) -> None:
    """Give every process the first one's BatchNorm statistics, the ones its checkpoint holds: DDP
    broadcasts them only at the start of each forward, so each process's last step leaves its own;
    FSDP never does. Evaluated by every process on its share of the images, the metrics are then the
    checkpoint's, and a resumed run starts each process where the uninterrupted one was. Training
    normalises by each batch's own statistics, so it is unchanged."""
    if run.dist.world_size == 1:
        return
    for module in (run.model, run.ema.module if run.ema is not None else None):
        for buffer in module.buffers() if module is not None else ():
            dist.broadcast(buffer, src=0)


def save_run(run: Run, links: tuple[str, ...], top1: float | None = None) -> None:
    """Checkpoint the run as it is now and point ``links`` at it. Every process takes part (each
    hands in its RNG state and its sums of the epoch so far, to pick them up on resume); the first writes."""
    cfg, d, s = run.config, run.dist, run.state
    share_buffers(run)
    rng, progress = _gather(torch.get_rng_state(), d), _gather(dict(s.progress), d)
    cuda_rng = _gather(torch.cuda.get_rng_state(d.device), d) if d.device.type == "cuda" else None
    model, ema_model, shards = run.model, run.ema.module if run.ema else None, None
    if cfg.fsdp:  # the weights gathered by the first process; the optimizer state written sharded
        model, ema_model = (sharding.full_state_dict(m) if m is not None else None for m in (model, ema_model))
        shards = run.run_dir / f".shards-{s.step:08d}.tmp"
        if d.main:
            shutil.rmtree(shards, ignore_errors=True)
        dist.barrier()
        sharding.save_optimizer(run.model, run.optimizer, shards)
    if not d.main:
        return
    meta = dict(model=cfg.model, config=run.model.config.to_dict(), pretrained_cfg=run.model.pretrained_cfg.to_dict(),
                dataset=cfg.data, data_dir=cfg.data_dir, img_size=cfg.img_size, epoch=s.epoch, step=s.step,
                top1=top1, train_config=_plain(asdict(cfg)))
    # Plain data and tensors only (checkpoints load with weights_only=True). No scheduler state: the
    # learning rate is a function of the step and schedule_steps. The settings are in config.json.
    state = dict(step=s.step, epoch=s.epoch, batch_in_epoch=s.batch_in_epoch, epoch_world_size=s.epoch_world_size,
                 optimizer=None if cfg.fsdp else run.optimizer.state_dict(), schedule_steps=run.schedule_steps,
                 rng=rng, cuda_rng=cuda_rng, best_top1=s.best_top1, history=s.history, progress=progress,
                 wall_seconds=run.wall_seconds(), train_images=len(run.data.train),
                 ema_n_averaged=int(run.ema.n_averaged) if run.ema is not None else 0, world_size=d.world_size)
    save_checkpoint(run.run_dir, f"ckpt-{s.step:08d}", meta, model, ema_model, state, links, shards)


def _report_to_write(run: Run, ckpt: Checkpoint) -> bool:
    """Whether a resumed run with no epoch left to train writes its report (metrics.jsonl, curves.png and
    summary.json) from the checkpoint: where it resumed its ``last`` checkpoint and summary.json is
    missing, unreadable or of another epoch (it stopped after that checkpoint, before its report). An
    earlier checkpoint's resume leaves the run's report as it is (``_check`` refuses one without)."""
    if os.path.realpath(run.run_dir / "last") != os.path.realpath(ckpt.path):
        return False
    try:
        summary = json.loads((run.run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    return not (isinstance(summary, dict) and summary.get("epochs") == run.state.epoch)


def report_epoch(run: Run) -> None:
    """metrics.jsonl and curves.png rewritten from the history (never out of step with the
    checkpoint), and a line on stdout."""
    if not run.dist.main:
        return
    history = run.state.history
    atomic_write(run.run_dir / "metrics.jsonl", "".join(json_text(h) + "\n" for h in history))
    cfg = run.config
    plot_curves(history, run.data.num_classes, run.run_dir / "curves.png", smoothed=cfg.label_smoothing > 0,
                mixed=cfg.mixup > 0 or cfg.cutmix > 0)
    print(epoch_line(history[-1], run.config.epochs, run.data.num_classes), flush=True)


def epoch_line(h: dict, epochs: int, num_classes: int) -> str:
    """An epoch's line on stdout from its metrics; on a GPU with the peak memory per GPU. Top-5 is
    left out with 5 classes or fewer, where it is 100% whatever the model (as eval's line does)."""
    peak = (f"  peak {h['gpu_peak_gib']:.1f} GiB per GPU ({h['gpu_reserved_gib']:.1f} reserved)"
            if "gpu_peak_gib" in h else "")
    top5 = f"  top5 {h['top5']:6.2f}" if num_classes > 5 else ""
    return (f"epoch {h['epoch']:>3}/{epochs}  train_loss {h['train_loss']:.4f}  eval_loss {h['eval_loss']:.4f}  "
            f"top1 {h['top1']:6.2f}{top5}  lr {h['lr']:.2e}  {h['images_per_second']:7.1f} img/s{peak}")


def skipped_data_files(data: DataBundle, d: Dist) -> int:
    """Files refused when the data was listed, and files that failed to decode when read by any of
    the processes (each marks those it read; a resumed run, those read since it resumed)."""
    marks = [ds.undecodable for ds in (data.train, data.val) if isinstance(ds, SubstitutesUndecodable)]
    if not marks:  # digits, CIFAR: in memory, nothing to fail (the same data sets in every process)
        return data.skipped_files
    undecodable = torch.cat(marks).to(d.device, torch.uint8)  # on the device: NCCL reduces nothing else
    if d.world_size > 1:
        dist.all_reduce(undecodable, op=dist.ReduceOp.MAX)  # a file two processes read is one file
    return data.skipped_files + int(undecodable.sum())


def finish_run(run: Run) -> dict:
    """The run's summary, written to summary.json by the first process, which the others wait for."""
    cfg, d, data, s = run.config, run.dist, run.data, run.state
    last = s.history[-1]
    skipped_files = skipped_data_files(data, d)
    summary = dict(model=cfg.model, dataset=cfg.data, epochs=s.epoch, top1=last["top1"], top5=last["top5"],
                   best_top1=s.best_top1, train_loss=last["train_loss"], eval_loss=last["eval_loss"],
                   images_per_second=sum(h["images_per_second"] for h in s.history) / len(s.history),
                   wall_seconds=run.wall_seconds(), skipped_files=skipped_files,
                   params=count_parameters(run.model), img_size=cfg.img_size,
                   train_images=len(data.train), val_images=len(data.val), world_size=d.world_size,
                   device=d.device.type, output_dir=str(run.run_dir))
    if d.main:
        atomic_write(run.run_dir / "summary.json", json_text(summary, indent=2))
        scored = last.get("eval_images", len(data.val))  # those that decoded (older histories: all)
        top5 = f", top-5 {summary['top5']:.2f}%" if data.num_classes > 5 else ""
        print(f"done: top-1 {summary['top1']:.2f}% (best {s.best_top1:.2f}%){top5} on "
              f"{scored} held-out {cfg.data} images in {summary['wall_seconds']:.0f} s; "
              f"skipped files: {skipped_files}; run directory {run.run_dir}", flush=True)
    if d.world_size > 1:
        dist.barrier()
    return summary


def _plain(d: dict) -> dict:
    """A dataclass dict as JSON-like values (tuples become lists), safe for weights_only loading."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
