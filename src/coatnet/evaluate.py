"""``coatnet eval`` and ``coatnet predict``, and the evaluation pass training runs each epoch."""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import atomic_write
from .data import build_datasets, eval_transform, load_image
from .models.factory import model_from_folder
from .models.folder import read_model_folder
from .plots import plot_confusion


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int, amp: bool = False,
             channels_last: bool = False) -> dict:
    """Loss, top-1, top-5 (percent) and the confusion matrix over ``loader``.

    Under DDP each rank passes its own shard of the data; the sums are all-reduced, so every rank
    returns the figures of the whole set.
    """
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-k, count
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(images)
        logits = logits.float()
        top = logits.topk(k, dim=1).indices
        sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        sums[1] += (top[:, 0] == labels).sum()
        sums[2] += (top == labels[:, None]).any(dim=1).sum()
        sums[3] += labels.numel()
        confusion += torch.bincount(labels * num_classes + top[:, 0], minlength=num_classes**2).view_as(confusion)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(confusion)
    count = max(sums[3].item(), 1)
    return dict(loss=sums[0].item() / count, top1=100 * sums[1].item() / count, top5=100 * sums[2].item() / count,
                count=int(sums[3].item()), confusion=confusion.cpu())


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _img_size(args: argparse.Namespace, meta: dict) -> int:
    return args.img_size or meta.get("img_size") or meta["config"]["img_size"][0]


def run_eval(args: argparse.Namespace) -> int:
    ckpt = read_model_folder(args.checkpoint)
    meta = ckpt.meta
    model = model_from_folder(ckpt)
    data_name = args.data or meta.get("dataset")
    data_dir = args.data_dir or (meta.get("data_dir") if data_name == meta.get("dataset") else None)
    if data_name is None:
        raise ValueError(f"{ckpt.path} does not record its data set; pass --data (and --data-dir)")
    img_size = _img_size(args, meta)
    data = build_datasets(data_name, data_dir, img_size)
    classes = list(meta.get("classes") or [])
    if classes and list(data.classes) != classes:
        raise ValueError(f"the checkpoint's {len(classes)} classes differ from {data_name}'s {len(data.classes)} "
                         f"classes; evaluate on the data set it was trained on")
    device = _device(args.device)
    model.to(device)
    loader = DataLoader(data.val, batch_size=args.batch_size, num_workers=args.workers)
    result = evaluate(model, loader, device, data.num_classes)

    run_dir = ckpt.path.resolve().parent
    out = Path(args.output_dir) if args.output_dir else run_dir / f"eval-{ckpt.path.resolve().name}-{data_name}"
    out.mkdir(parents=True, exist_ok=True)
    confusion = result.pop("confusion")
    report = dict(checkpoint=str(ckpt.path), model=meta["model"], dataset=data_name, img_size=img_size,
                  skipped_files=data.skipped_files + getattr(data.val, "skipped_at_load", 0), **result,
                  confusion_matrix=confusion.tolist(), classes=list(data.classes))
    atomic_write(out / "eval.json", json.dumps(report, indent=2))
    plot_confusion(confusion.numpy(), list(data.classes), out / "confusion_matrix.png",
                   title=f"{meta['model']} on {data_name} (top-1 {result['top1']:.2f}%)")
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "confusion_matrix"}, indent=2))
    else:
        print(f"{meta['model']} on {result['count']} {data_name} validation images at {img_size}px: "
              f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}")
        print(f"wrote {out / 'eval.json'} and {out / 'confusion_matrix.png'}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    ckpt = read_model_folder(args.checkpoint)
    classes = ckpt.meta.get("classes")
    model = model_from_folder(ckpt)
    if not classes:
        classes = [str(i) for i in range(model.config.num_classes)]
    transform = eval_transform(_img_size(args, ckpt.meta))
    images = [load_image(path) for path in args.images]  # every file checked before any output
    device = _device(args.device)
    model.to(device)
    batch = torch.stack([transform(img) for img in images]).to(device)
    with torch.inference_mode():
        probs = model(batch).float().softmax(dim=1).cpu()
    k = min(args.top_k, len(classes))
    top = probs.topk(k, dim=1)
    results = [dict(image=str(path), top=[dict(label=classes[i], probability=p) for p, i in
                                          zip(values.tolist(), indices.tolist())])
               for path, values, indices in zip(args.images, top.values, top.indices)]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(r["image"])
            for rank, t in enumerate(r["top"], 1):
                print(f"  {rank}. {t['label']:<20} {100 * t['probability']:6.2f}%")
    return 0
