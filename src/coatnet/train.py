"""``coatnet train``: the paper's training recipe as one plain loop.

Read ``train()`` top to bottom: set-up, data, model, optimizer and schedule, resume, then the
epoch loop (train steps, evaluation, checkpoint, metrics). Runs on one CPU or GPU as it is, and on
many processes under ``torchrun`` with DistributedDataParallel.

Exact resume: every random choice either comes from the global torch RNG, whose state (one per
rank) is saved in each checkpoint, or from a per-sample seed that depends only on (seed, epoch,
sample index), so a run restarted from any checkpoint repeats the uninterrupted run bit for bit
on the same machine, whatever the number of data-loading workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from .checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from .data import build_datasets, mixup_cutmix
from .evaluate import evaluate
from .models import create_model, load_weights, read_state_dict
from .plots import plot_curves


# --------------------------------------------------------------------------------------------
# Configuration and recipes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run. The defaults are the ``digits`` recipe: a CPU run that needs no flags."""

    model: str = "coatnet_pico"
    model_config: dict | None = None  # overrides of the model's config fields (the layout study's sizes)
    data: str = "digits"
    data_dir: str | None = None
    img_size: int = 32
    epochs: int = 15
    batch_size: int = 64  # global: split across processes under torchrun
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.05
    drop_path: float | None = 0.0  # None: the model's own rate (Table 10)
    clip_grad: float = 1.0
    label_smoothing: float = 0.1
    randaugment: tuple[int, int] | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    ema: float = 0.0  # EMA decay; 0 is off
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    workers: int = 0
    save_every: int = 0  # also checkpoint every N steps (0: at each epoch's end only)
    device: str | None = None


# The paper's recipe (Table 10), ImageNet-1K pre-training and fine-tuning, with CoAtNet-0..3.
# Stochastic depth is left to the model (Table 10: 0.2 / 0.3 / 0.5 / 0.7 for CoAtNet-0..3).
RECIPES: dict[str, dict] = {
    "digits": {},
    "imagenet1k-pretrain": dict(model="coatnet_0", data="imagefolder", img_size=224, epochs=300, batch_size=4096,
                                lr=1e-3, min_lr=1e-5, warmup_steps=10_000, weight_decay=0.05, drop_path=None,
                                clip_grad=1.0, label_smoothing=0.1, randaugment=(2, 15), mixup=0.8, ema=0.0,
                                workers=8),
    "imagenet1k-finetune": dict(model="coatnet_0", data="imagefolder", img_size=384, epochs=30, batch_size=512,
                                lr=5e-5, min_lr=1e-5, warmup_steps=0, weight_decay=1e-8, drop_path=None,
                                clip_grad=1.0, label_smoothing=0.1, randaugment=(2, 15), mixup=0.8, ema=0.9999,
                                workers=8),
}


def parse_randaugment(text: str) -> tuple[int, int] | None:
    """``"2,15"`` -> (2, 15): RandAugment layers and magnitude; ``"0"`` or ``"none"`` -> off."""
    if text.lower() in ("0", "none", "off"):
        return None
    try:
        n, m = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--randaugment takes N,M (layers,magnitude) like 2,15, got {text!r}")
    return n, m


def resolve_config(args: argparse.Namespace, base: dict | None = None) -> TrainConfig:
    """Recipe (or the resumed run's settings), then the flags given on the command line."""
    values = dict(base) if base is not None else dict(RECIPES[args.recipe])
    for f in dataclasses.fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    if isinstance(values.get("randaugment"), list):
        values["randaugment"] = tuple(values["randaugment"])
    return TrainConfig(**values)


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


def setup_distributed(device: str | None) -> Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # A caller that trains several times (the layout study) starts the group once and keeps it:
    # a process group cannot be started again in a process under torchrun.
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
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
            torch.manual_seed(seed)
            return self.dataset[index]


def epoch_keys(sampler: DistributedSampler, seed: int, epoch: int) -> list[tuple[int, int]]:
    """This rank's (sample seed, index) pairs for ``epoch``, in order."""
    sampler.set_epoch(epoch)
    return [(((seed * 1_000_003 + epoch) * 1_000_000_007 + i) % 2**63, i) for i in sampler]


def make_loader(dataset: Dataset, indices: list, batch_size: int, workers: int, device: torch.device,
                drop_last: bool) -> DataLoader:
    # An explicit generator: creating the loader's iterator then never draws from the global RNG.
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=workers, drop_last=drop_last,
                      pin_memory=device.type == "cuda", generator=torch.Generator(),
                      persistent_workers=False)


# --------------------------------------------------------------------------------------------
# Optimizer and schedule (Table 10: AdamW, linear warm-up, cosine decay to min_lr)
# --------------------------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only: not on biases, norms or the relative-position tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("relative_position_table") else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, fused into one kernel per step on CPU and CUDA (4x faster
    than the per-parameter loop for CoAtNet-0 on 2 CPU cores: 12 ms instead of 48 ms a step)."""
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, fused=fused)


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup, 1),
                                                        eta_min=cfg.min_lr)
    if warmup == 0:
        return cosine
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _run_dir(args: argparse.Namespace, cfg: TrainConfig, d: Dist) -> Path:
    if args.output_dir:
        return Path(args.output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(_broadcast(f"runs/{stamp}-{cfg.model}-{cfg.data}", d))


def _resume_source(args: argparse.Namespace) -> Path | None:
    if not args.resume:
        return None
    if args.resume == "auto":
        if not args.output_dir:
            raise ValueError("--resume without a path needs --output-dir (the run to continue)")
        return Path(args.output_dir)
    return Path(args.resume)


def _log(d: Dist, text: str) -> None:
    if d.main:
        print(text, flush=True)


def train(args: argparse.Namespace) -> dict:
    """Run (or resume) a training run; return its summary. Bad input raises ValueError."""
    started = time.perf_counter()
    d = setup_distributed(args.device)

    # -- settings: recipe or resumed run, then flags ----------------------------------------
    resume_from = _resume_source(args)
    ckpt = load_checkpoint(resume_from) if resume_from else None
    if ckpt is not None and ckpt.train_state is None:
        raise CheckpointError(f"{str(ckpt.path)!r} holds weights only, no training state; "
                              f"use --finetune to start a new run from it")
    cfg = resolve_config(args, base=ckpt.train_state["train_config"] if ckpt else None)
    if ckpt and ckpt.meta["model"] != cfg.model:
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} is of model {ckpt.meta['model']}, not {cfg.model}; "
                              f"drop --model to resume it, or start a new run with --finetune")
    run_dir = ckpt.path.parent if ckpt and not args.output_dir else _run_dir(args, cfg, d)
    if ckpt is None and (run_dir / "last").exists():
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --output-dir")
    if cfg.batch_size % d.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} (global) is not divisible by {d.world_size} processes")
    local_batch = cfg.batch_size // d.world_size

    # -- data --------------------------------------------------------------------------------
    data = build_datasets(cfg.data, cfg.data_dir, cfg.img_size, randaugment=cfg.randaugment)
    if len(data.train) < cfg.batch_size:
        raise ValueError(f"the training set has {len(data.train)} images, fewer than --batch-size {cfg.batch_size}")
    train_set = SeededSamples(data.train)
    sampler = DistributedSampler(data.train, num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=cfg.seed)
    val_indices = list(range(d.rank, len(data.val), d.world_size))  # each rank evaluates its shard
    val_loader = make_loader(data.val, val_indices, local_batch, cfg.workers, d.device, drop_last=False)
    steps_per_epoch = len(sampler) // local_batch
    total_steps = cfg.epochs * steps_per_epoch
    batch_mix = mixup_cutmix(data.num_classes, cfg.mixup, cfg.cutmix)

    # -- model -------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and in every run
    model = create_model(cfg.model, num_classes=data.num_classes, img_size=cfg.img_size,
                         drop_path_rate=cfg.drop_path, **(cfg.model_config or {}))
    if args.finetune and ckpt is None:
        _load_finetune_weights(model, args.finetune)
    model.to(d.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
           if cfg.ema > 0 else None)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = lr_schedule(optimizer, cfg, total_steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    net = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None) \
        if d.world_size > 1 else model
    if cfg.compile:
        net = torch.compile(net)
    autocast = (lambda: torch.autocast(d.device.type, dtype=torch.bfloat16)) if cfg.amp else nullcontext
    torch.manual_seed(cfg.seed + d.rank)  # drop path and Mixup draws differ across ranks

    # -- state, fresh or resumed ---------------------------------------------------------------
    step, epoch, batch_in_epoch, best_top1, history = 0, 0, 0, -1.0, []
    progress = dict(loss_sum=0.0, correct=0, count=0, seconds=0.0)
    wall_before = 0.0
    if ckpt is not None:
        s = ckpt.train_state
        load_weights(model, ckpt.weights)
        optimizer.load_state_dict(s["optimizer"])
        scheduler.load_state_dict(s["scheduler"])
        if ema is not None:
            if ckpt.ema_weights is None:
                raise CheckpointError(f"{str(ckpt.path)!r} has no EMA weights but the run keeps an EMA")
            ema.module.load_state_dict(ckpt.ema_weights)
            ema.n_averaged.fill_(s["ema_n_averaged"])
        step, epoch, batch_in_epoch = s["step"], s["epoch"], s["batch_in_epoch"]
        best_top1, history, progress, wall_before = s["best_top1"], s["history"], s["progress"], s["wall_seconds"]
        if len(s["rng"]) == d.world_size:
            torch.set_rng_state(s["rng"][d.rank])
            if d.device.type == "cuda" and s.get("cuda_rng"):
                torch.cuda.set_rng_state(s["cuda_rng"][d.rank], d.device)
        else:
            _log(d, f"note: checkpoint written by {len(s['rng'])} process(es), resumed by {d.world_size}: "
                    f"random draws will differ from an uninterrupted run")
        _log(d, f"resumed {ckpt.path} at epoch {epoch + 1}, step {step}")
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)

    def meta(top1: float | None = None) -> dict:
        return dict(model=cfg.model, config=model.config.to_dict(), classes=list(data.classes), dataset=cfg.data,
                    data_dir=cfg.data_dir, img_size=cfg.img_size, epoch=epoch, step=step, top1=top1)

    def checkpoint(links: tuple[str, ...], top1: float | None = None) -> None:
        # Every rank's RNG state, so each can pick up its own draws on resume.
        rng = _gather(torch.get_rng_state(), d)
        cuda_rng = _gather(torch.cuda.get_rng_state(d.device), d) if d.device.type == "cuda" else None
        if not d.main:
            return
        state = dict(step=step, epoch=epoch, batch_in_epoch=batch_in_epoch, optimizer=optimizer.state_dict(),
                     scheduler=scheduler.state_dict(), rng=rng, cuda_rng=cuda_rng, best_top1=best_top1,
                     history=history, progress=dict(progress), wall_seconds=wall_before + time.perf_counter() - started,
                     ema_n_averaged=int(ema.n_averaged) if ema is not None else 0,
                     world_size=d.world_size, train_config=_plain(dataclasses.asdict(cfg)))
        save_checkpoint(run_dir, f"ckpt-{step:08d}", meta(top1), model, ema.module if ema else None, state, links)

    _log(d, f"training {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on {cfg.data}: "
            f"{len(data.train)} train / {len(data.val)} val images, {data.num_classes} classes, "
            f"{cfg.epochs} epochs x {steps_per_epoch} steps, batch {cfg.batch_size}, {d.world_size} process(es) on "
            f"{d.device.type}; output {run_dir}")

    # -- the epoch loop ------------------------------------------------------------------------
    while epoch < cfg.epochs:
        keys = epoch_keys(sampler, cfg.seed, epoch)[batch_in_epoch * local_batch:]
        loader = make_loader(train_set, keys, local_batch, cfg.workers, d.device, drop_last=True)
        net.train()
        bar = tqdm(total=steps_per_epoch, initial=batch_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (d.main and sys.stderr.isatty()), leave=False, dynamic_ncols=True)
        tic = time.perf_counter()
        for images, labels in loader:
            images = images.to(d.device, non_blocking=True)
            labels = labels.to(d.device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = labels
            if batch_mix is not None:
                images, targets = batch_mix(images, labels)
            with autocast():
                logits = net(images)
                loss = criterion(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            batch_in_epoch += 1
            progress["loss_sum"] += loss.item() * labels.numel()
            progress["correct"] += (logits.argmax(1) == labels).sum().item()
            progress["count"] += labels.numel()
            progress["seconds"] += time.perf_counter() - tic
            tic = time.perf_counter()
            bar.update(1)
            bar.set_postfix(loss=f"{progress['loss_sum'] / progress['count']:.3f}",
                            acc=f"{100 * progress['correct'] / progress['count']:.1f}",
                            img_s=f"{progress['count'] * d.world_size / progress['seconds']:.0f}")
            if cfg.save_every and step % cfg.save_every == 0 and batch_in_epoch < steps_per_epoch:
                checkpoint(("last",))
        bar.close()

        # -- end of epoch: evaluate, record, checkpoint ----------------------------------------
        eval_model = ema.module if ema is not None else model
        eval_model.eval()
        result = evaluate(eval_model, val_loader, d.device, data.num_classes, amp=cfg.amp,
                          channels_last=cfg.channels_last)
        totals = torch.tensor([progress["loss_sum"], progress["correct"], progress["count"]], dtype=torch.float64)
        if d.world_size > 1:
            dist.all_reduce(totals)
        history.append(dict(epoch=epoch + 1, step=step, train_loss=totals[0].item() / totals[2].item(),
                            train_top1=100 * totals[1].item() / totals[2].item(), eval_loss=result["loss"],
                            top1=result["top1"], top5=result["top5"], lr=optimizer.param_groups[0]["lr"],
                            images_per_second=totals[2].item() / max(progress["seconds"], 1e-9),
                            epoch_seconds=progress["seconds"]))
        epoch, batch_in_epoch = epoch + 1, 0
        progress = dict(loss_sum=0.0, correct=0, count=0, seconds=0.0)
        improved = result["top1"] > best_top1
        best_top1 = max(best_top1, result["top1"])
        checkpoint(("last", "best") if improved else ("last",), top1=result["top1"])
        if d.main:
            _write_metrics(run_dir, history)
            plot_curves(history, run_dir / "curves.png")
            h = history[-1]
            print(f"epoch {h['epoch']:>3}/{cfg.epochs}  train_loss {h['train_loss']:.4f}  "
                  f"eval_loss {h['eval_loss']:.4f}  top1 {h['top1']:6.2f}  top5 {h['top5']:6.2f}  lr {h['lr']:.2e}  "
                  f"{h['images_per_second']:7.1f} img/s", flush=True)

    # -- summary -------------------------------------------------------------------------------
    last = history[-1]
    # Files refused when listing the data, plus files that failed to decode while training (counted
    # in this process only: with --workers > 0 the workers' own counts are not seen here).
    skipped_files = data.skipped_files + sum(getattr(ds, "skipped_at_load", 0) for ds in (data.train, data.val))
    summary = dict(model=cfg.model, dataset=cfg.data, epochs=cfg.epochs, top1=last["top1"], top5=last["top5"],
                   best_top1=best_top1, train_loss=last["train_loss"], eval_loss=last["eval_loss"],
                   images_per_second=sum(h["images_per_second"] for h in history) / len(history),
                   wall_seconds=wall_before + time.perf_counter() - started, skipped_files=skipped_files,
                   params=sum(p.numel() for p in model.parameters()), img_size=cfg.img_size,
                   train_images=len(data.train), val_images=len(data.val), world_size=d.world_size,
                   device=d.device.type, output_dir=str(run_dir))
    if d.main:
        atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))
        print(f"done: top-1 {summary['top1']:.2f}% (best {best_top1:.2f}%), top-5 {summary['top5']:.2f}% on "
              f"{len(data.val)} held-out {cfg.data} images in {summary['wall_seconds']:.0f} s; "
              f"skipped files: {skipped_files}; run directory {run_dir}", flush=True)
    if d.world_size > 1:
        dist.barrier()
    if d.owns_group:
        dist.destroy_process_group()
    return summary


def _load_finetune_weights(model: nn.Module, source: str) -> None:
    """Weights of a checkpoint directory (its evaluated weights) or a weights file, for a new run."""
    path = Path(source)
    state = load_checkpoint(path, with_train_state=False).eval_weights if path.is_dir() else read_state_dict(path)
    load_weights(model, state)


def _plain(d: dict) -> dict:
    """A dataclass dict as JSON-like values (tuples become lists), safe for weights_only loading."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    """metrics.jsonl, one line per epoch, rewritten from the checkpointed history (never out of step)."""
    atomic_write(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))


def run_train(args: argparse.Namespace) -> int:
    train(args)
    return 0
