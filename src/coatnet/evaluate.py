"""``coatnet eval`` and ``coatnet predict``, and the evaluation pass training runs each epoch."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import warnings
from contextlib import nullcontext, suppress
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from .checkpoint import atomic_write
from .data import (IGNORED_LABEL, DataError, build_datasets, is_image_file, load_image, recorded_place, same_letters,
                   split_folder, split_holding, warn_not_images)
from .export import check_img_size_flag
from .interrupt import raise_if_requested
from .models.factory import create_model, from_pretrained, model_from_folder, read_pretrained
from .models.folder import (EMA_WEIGHTS, TIMM_WEIGHTS, WEIGHTS, ModelFolder, exported_model, read_model_folder,
                            read_model_meta, run_last)
from .models.hub import HUB_PREFIX, fetch, hub_repository, is_hub_reference, local_path, timm_folder_weights
from .models.preprocessing import class_names, eval_transform
from .models.registry import MODEL_SOURCES, model_entry
from .plots import plot_confusion
from .text import json_text, printable
from .validate import resolve_device, slow_bfloat16


@torch.no_grad()  # not inference_mode: FSDP's gathered weights must stay ordinary tensors for training
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int, amp: bool = False,
             channels_last: bool = False) -> dict:
    """Loss, top-1, top-5 (percent) and the confusion matrix over ``loader``, leaving out samples
    labelled :data:`~coatnet.data.IGNORED_LABEL` (images that failed to decode).

    Under DDP each rank passes its own shard of the data; the sums are all-reduced, so every rank
    returns the figures of the whole set.
    """
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-k, count
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:  # the most batches any rank has: a sharded model's forward is a collective
        batches = torch.tensor(len(loader), device=device)
        dist.all_reduce(batches, op=dist.ReduceOp.MAX)
    for images, labels in loader:
        raise_if_requested()  # a Ctrl-C or SIGTERM dropped where it met the loader forking its workers
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(images)
        kept = labels != IGNORED_LABEL  # stand-ins for images that failed to decode
        logits, labels = logits.float()[kept], labels[kept]
        top = logits.topk(k, dim=1).indices
        sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        sums[1] += (top[:, 0] == labels).sum()
        sums[2] += (top == labels[:, None]).any(dim=1).sum()
        sums[3] += labels.numel()
        confusion += torch.bincount(labels * num_classes + top[:, 0], minlength=num_classes**2).view_as(confusion)
    if distributed:
        # Shards differ by at most one image, so by at most one batch: a rank with fewer runs an idle
        # forward for each batch it lacks, keeping FSDP's gathers in step (DDP needs none, and it costs
        # it one forward of one image at most).
        for _ in range(int(batches) - len(loader)):
            with autocast:
                model(torch.zeros(1, model.config.in_chans, *model.config.img_size, device=device))
        dist.all_reduce(sums)
        dist.all_reduce(confusion)
    count = max(sums[3].item(), 1)
    return dict(loss=sums[0].item() / count, top1=100 * sums[1].item() / count, top5=100 * sums[2].item() / count,
                count=int(sums[3].item()), confusion=confusion.cpu())


class ModelLabels(Dataset):
    """An evaluation split labelled as the model's classes: the data's label ``i`` is ``index[i]``."""

    def __init__(self, split: Dataset, index: list[int]):
        self.split, self.index = split, index

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        image, label = self.split[i]
        return image, label if label == IGNORED_LABEL else self.index[label]


def _img_size(args: argparse.Namespace, model: nn.Module) -> int | tuple[int, int]:
    """--img-size, a square's side (0 included: it is refused, not read as "not given"), else the
    model's own input size: its side, or (height, width) for a model built non-square."""
    if args.img_size is None:
        height, width = model.config.img_size
        return height if height == width else (height, width)
    check_img_size_flag(model, args.img_size)  # images are resized to it here
    return args.img_size


# A weights file, not a model folder: a network's name is needed to load it (--model NAME --checkpoint FILE).
WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".pth.tar")


def _model_flags(args: argparse.Namespace) -> None:
    """Check ``--checkpoint``, ``--model`` and ``--pretrained`` together, as timm's validate.py and
    inference.py take them: ``--model NAME --pretrained`` is timm's published weights of NAME (read as
    ``--checkpoint hf-hub:timm/NAME`` from here on), ``--model NAME --checkpoint FILE`` a weights file."""
    if args.pretrained and args.checkpoint is not None:
        raise ValueError("--pretrained is timm's published weights of --model, --checkpoint the model to run: give one")
    if args.pretrained and args.model is None:
        raise ValueError("--pretrained is timm's published weights of --model NAME: give the name too (e.g. --model "
                         "coatnet_0_rw_224.sw_in1k)")
    if args.model is None and args.checkpoint is None:
        raise ValueError("give the model to run: --checkpoint (a checkpoint, run directory or model folder), or "
                         "--model NAME with --pretrained (timm's published weights, e.g. coatnet_0_rw_224.sw_in1k) "
                         "or with --checkpoint WEIGHTS_FILE")
    if args.model is not None and not args.pretrained and args.checkpoint is None:
        raise ValueError(f"--model {args.model} needs weights to run: add --pretrained (timm's published weights "
                         f"of it) or --checkpoint WEIGHTS_FILE")
    if args.pretrained and (file := next((f for f in getattr(args, "images", ()) if f.endswith(WEIGHTS_SUFFIXES)),
                                         None)):  # predict --pretrained FILE: the file taken for an image
        raise ValueError(f"--pretrained takes no file here ('{file}' was read as an image): give a weights file as "
                         f"--checkpoint '{file}', with --model NAME")
    if args.model is not None and args.model.startswith(MODEL_SOURCES):
        if not args.pretrained:  # a weights file needs its network's name; the repository has weights of its own
            raise ValueError(f"--model {args.model} names a repository or folder, not a network: give it with "
                             f"--pretrained (its own weights), or name the network of {args.checkpoint} (its "
                             f"config.json's architecture, e.g. coatnet_0_rw_224)")
        # timm's `--model hf-hub:ORG/NAME --pretrained`: the repository (local-dir:PATH, the folder) and its weights
        args.checkpoint, args.model = args.model, None
    elif args.pretrained:
        repo, _ = hub_repository(True, args.model)
        args.checkpoint = HUB_PREFIX + repo


def load_for_inference(args: argparse.Namespace) -> tuple[ModelFolder, nn.Module]:
    """The model ``--checkpoint`` (or ``--model`` with ``--pretrained``) names, and the folder it was read
    from, its preprocessing overridden by the flags given. A link (a run directory's ``last``) is followed
    once, here: training may move it while this runs, and the weights, the line naming them and eval's
    folder are then of one checkpoint."""
    _model_flags(args)
    given = _given_folder(args.checkpoint)

    def no_ema(path: Path):
        flag = f"--{'' if args.use_ema else 'no-'}use-ema"
        raise ValueError(f"{flag}: {path} holds no EMA of its weights (a run's checkpoint with --ema does): drop "
                         f"{flag}")
    if given.is_file() and _model_folder_of(given):
        # the folder says their network, preprocessing and class names (and holds the EMA's weights, where kept):
        # with --model too, read as a bare file they would be lost without a word (before: indices for names,
        # ours for timm's preprocessing, the raw weights for the EMA's the run evaluated)
        raise ValueError(f"'{given}' is the weights of the model folder '{given.parent}': give the folder, "
                         f"--checkpoint '{given.parent}'")
    if args.model is not None and given.is_file():  # a weights file, under the network --model names
        if args.use_ema is not None:
            no_ema(given)
        weights = dataclasses.replace(read_pretrained(given, args.model), whole=True)  # their classifier, as saved
        model = create_model(args.model, pretrained=weights).eval()
        model.pretrained_cfg = model.pretrained_cfg.override(vars(args))
        return ModelFolder(given, {"model": model.config.name}, model.state_dict(), None), model
    if given.is_file() and given.name.endswith(WEIGHTS_SUFFIXES) and not exported_model(given):
        raise ValueError(f"'{given}' is a weights file: name its network too, --model NAME --checkpoint "
                         f"'{given}' (coatnet info lists the names)")
    path = run_last(given) or given
    if path.is_symlink() and path.resolve().is_dir():  # named as the run names it, where it is beside the link
        target = path.resolve()
        path = path.parent / target.name if target.parent == path.parent.resolve() else target
    else:  # as given: a link to no checkpoint is said by read_model_folder, pointing at the run's others
        path = given
    if timm_folder_weights(path) is not None:
        # timm's repository downloaded into a folder: its weights as pretrained=PATH reads them, with timm's
        # preprocessing and class names; its config.json records no run (data set, amp), which flags give
        if args.use_ema is not None:
            no_ema(path)
        model = from_pretrained(path)
        ckpt = ModelFolder(path, {"model": model.config.name}, model.state_dict(), None)
    else:
        ckpt = read_model_folder(path)
        if args.use_ema is not None and ckpt.ema_weights is None:
            no_ema(ckpt.path)
        if args.use_ema is False:  # the weights themselves, not their EMA (which ModelFolder.eval_weights prefers)
            ckpt = dataclasses.replace(ckpt, ema_weights=None)
        model = model_from_folder(ckpt)
    if args.model is not None and model_entry(args.model).name != model_entry(model.config.name).name:
        raise ValueError(f"--model {args.model} is not the network of {ckpt.path} ({model.config.name}): leave "
                         f"--model out, the checkpoint names its own")
    model.pretrained_cfg = model.pretrained_cfg.override(vars(args))
    return ckpt, model


def _model_folder_of(file: Path) -> bool:
    """Whether ``file`` is the weights of a model folder (ours, a checkpoint, timm's downloaded repository)."""
    if file.name not in (WEIGHTS, EMA_WEIGHTS, *TIMM_WEIGHTS):
        return False
    try:
        return timm_folder_weights(file.parent) is not None or bool(read_model_meta(file.parent))
    except ValueError:  # a config.json of something else, or none
        return False


def _given_folder(checkpoint: str) -> Path:
    """The folder ``--checkpoint`` names: a path, timm's ``local-dir:PATH``, or ``hf-hub:ORG/NAME``'s
    snapshot in the Hub cache (fetched there when online), read as any folder."""
    if not is_hub_reference(checkpoint):
        return local_path(checkpoint)
    fetched = fetch(*hub_repository(checkpoint, ""))
    return fetched if fetched.is_dir() else fetched.parent  # timm's weights file: the repository's folder


def _say_which(ckpt: ModelFolder, args: argparse.Namespace) -> None:
    """A run directory stands for its ``last`` checkpoint, which moves as training goes on: name it."""
    if (last := run_last(_given_folder(args.checkpoint))) is not None:
        print(f"coatnet {args.command}: using {last} -> {ckpt.path.name}", file=sys.stderr)


def _amp(args: argparse.Namespace, ckpt: ModelFolder, device: torch.device) -> bool:
    """bfloat16 autocast or not: the flag, else as the run evaluated each epoch (and chose ``best``)."""
    amp = args.amp if args.amp is not None else bool((ckpt.meta.get("train_config") or {}).get("amp"))
    if amp and (why := slow_bfloat16(device)):
        print(f"coatnet {args.command}: note: bfloat16 autocast ({'--amp' if args.amp else 'as the run evaluated'}), "
              f"and {why}; --no-amp computes in float32", file=sys.stderr)
    return amp


def _one_process(args: argparse.Namespace) -> None:
    """Refuse torchrun: each process would do all of the work, and write or print the same results (an
    export: each the same file, all but one then refused as "appeared while exporting"). Said by the first
    process; the others leave with status 2 and say nothing, as training's refusals."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if os.environ.get("RANK", "0") != "0":
            raise SystemExit(2)
        raise ValueError(f"coatnet {args.command} runs in one process: run it without torchrun (WORLD_SIZE unset)")


def run_eval(args: argparse.Namespace) -> int:
    _one_process(args)
    device = resolve_device(args.device)  # a bad flag fails before anything is read
    ckpt, model = load_for_inference(args)
    if not model.num_classes:  # else "0 outputs but N classes", as if it were of another data set
        raise ValueError(f"{ckpt.path} has no classifier (0 classes): there is nothing to evaluate; give a "
                         f"checkpoint of a classifier")
    meta = ckpt.meta
    classes = class_names(model)
    data_name = args.data or meta.get("dataset")
    data_dir = args.data_dir or (meta.get("data_dir") if data_name == meta.get("dataset") else None)
    if data_name is None:
        raise ValueError(f"{ckpt.path} does not record its data set; pass --data (and --data-dir)")
    if str(data_name).lower() == "digits" and args.data_dir is not None:  # else the folder is ignored without a word
        raise ValueError(f"--data-dir {args.data_dir} is given but the data set is digits"
                         + ("" if args.data else f" (the one {ckpt.path} was trained on)")
                         + ", which is embedded and reads no folder; pass --data "
                         "imagefolder|cifar10|cifar100|webdataset|hf to evaluate on the folder")
    # The run's own folder, moved since: the user gave no path to check. Shards and Hugging Face datasets are
    # read from a local folder too (a brace pattern's: the folder its shards are in).
    local = str(data_name).lower() in ("imagefolder", "cifar10", "cifar100", "webdataset", "hf")
    recorded = Path(data_dir).expanduser() if data_dir is not None else None
    if recorded is not None and str(data_name).lower() == "webdataset" and "{" in recorded.name:
        recorded = recorded.parent
    if args.data_dir is None and recorded is not None and local and not recorded.is_dir():
        raise ValueError(f"{ckpt.path} was trained on the {data_name} data at '{data_dir}', which is not there now; "
                         f"pass --data-dir with its new place")
    if model.config.in_chans != 3:
        raise ValueError(f"{ckpt.path} takes {model.config.in_chans}-channel images and the evaluation data sets "
                         f"are RGB; evaluate it in Python, preparing images with coatnet.data_transforms(model)")
    img_size = _img_size(args, model)
    if isinstance(img_size, tuple):
        raise ValueError(f"{ckpt.path} takes {img_size[0]}x{img_size[1]} images and the evaluation data sets are "
                         f"square: pass --img-size SIDE to evaluate it on SIDExSIDE images")
    data = build_datasets(data_name, data_dir, img_size, preprocessing=model.pretrained_cfg, train=False)
    numbered = tuple(str(c) for c in range(data.num_classes))
    if data.classes == numbered and tuple(classes[:len(numbered)]) == numbered:
        # Labels without names, numbered up to the largest the evaluation split has: they index the
        # model's classes, which may go further.
        data = dataclasses.replace(data, classes=tuple(classes))
    val = data.val
    if model.pretrained_cfg.label_names and list(data.classes) != classes:
        theirs, new = sorted(set(classes) - set(data.classes)), sorted(set(data.classes) - set(classes))
        if new:
            raise ValueError(f"the checkpoint's {len(classes)} classes differ from {data_name}'s {len(data.classes)} "
                             f"classes (only the checkpoint's: {theirs[:5]}, only the data's: {new[:5]}); evaluate "
                             f"on the data set it was trained on"
                             + same_letters(theirs, new, "rename the data's class as the checkpoint spells it"))
        # Each of the data's classes is one of the checkpoint's, in another order or a part of them (a
        # folder of only some classes): labels are matched by name, the figures over all its classes.
        if twice := [c for c in data.classes if classes.count(c) > 1]:
            raise ValueError(f"the checkpoint names {len(set(twice))} of {data_name}'s classes more than once "
                             f"({', '.join(map(repr, twice[:5]))}): its labels cannot be matched by name; evaluate "
                             f"on the data set it was trained on, its classes in the checkpoint's order")
        print(f"coatnet eval: note: the data's {len(data.classes)} classes are "
              + (f"{len(data.classes)} of the checkpoint's {len(classes)}" if theirs else "the checkpoint's")
              + (", in another order" if sorted(data.classes, key=classes.index) != list(data.classes) else "")
              + ": its labels are matched to the checkpoint's by name", file=sys.stderr)
        val = ModelLabels(data.val, [classes.index(c) for c in data.classes])
        data = dataclasses.replace(data, classes=tuple(classes))
    if data.num_classes != len(classes):  # a checkpoint that records no class names
        raise ValueError(f"the model has {len(classes)} outputs but {data_name} has {data.num_classes} classes; "
                         f"evaluate on the data set it was trained on")
    # Beside the checkpoint; for a Hub repository, not in the Hub's cache but in the current folder.
    name, run_dir = ((args.checkpoint.removeprefix(HUB_PREFIX).replace("/", "--"), Path.cwd())
                     if is_hub_reference(args.checkpoint) else (ckpt.path.resolve().name, ckpt.path.resolve().parent))
    amp = _amp(args, ckpt, device)
    preprocessing = {k: v for k, v in model.pretrained_cfg.to_dict().items() if k != "label_names"}
    settings = dict(checkpoint=str(ckpt.path), dataset=data_name, data_dir=recorded_place(data_dir), img_size=img_size,
                    amp=amp, preprocessing=preprocessing, ema=ckpt.ema_weights is not None)
    # a folder beside the checkpoint is named by it already: its path as typed (relative, absolute) is no setting
    compared = (settings if is_hub_reference(args.checkpoint) else
                {k: v for k, v in settings.items() if k != "checkpoint"})
    out = Path(args.output_dir) if args.output_dir else _report_folder(run_dir / f"eval-{name}-{data_name}", compared)
    if str(data_name).lower() == "imagefolder" and (inside := split_holding(out, data_dir)):
        raise ValueError(f"the report's folder {out} is inside the data's {inside[0]}/ folder ({inside[1]}), where "
                         f"eval.json and confusion_matrix.png would be read as a class and an image; give an "
                         f"--output-dir outside {split_folder(data_dir, 'train')} and {split_folder(data_dir, 'val')}")
    _check_own_report(out)
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)  # before the pass: an unwritable folder fails now, not after it
    except OSError as e:
        if args.output_dir or isinstance(e, (FileExistsError, NotADirectoryError)):
            raise
        # A folder the user did not choose (beside a checkpoint on a shared or read-only disk): say where to write
        raise ValueError(f"cannot make the report's folder {out} ({e.strerror or e}); give --output-dir, a folder "
                         f"to write eval.json and confusion_matrix.png into") from None
    _say_which(ckpt, args)
    model.to(device)
    loader = DataLoader(val, batch_size=args.batch_size, num_workers=args.workers)
    try:
        result = evaluate(model, loader, device, data.num_classes, amp=amp)
    except BaseException:  # stopped (Ctrl-C, SIGTERM) or failed: no empty folder left that looks like a report's
        if made:
            with suppress(OSError):
                out.rmdir()
        raise

    confusion = result.pop("confusion")
    names = [printable(c) for c in data.classes]
    report = dict(model=meta["model"], **settings,
                  skipped_files=data.skipped_files + getattr(data.val, "skipped_at_load", 0), **result,
                  confusion_matrix=confusion.tolist(), classes=names)
    atomic_write(out / "eval.json", json_text(report, indent=2))
    plot_confusion(confusion.numpy(), names, out / "confusion_matrix.png",
                   title=f"{meta['model']} on {data_name} (top-1 {result['top1']:.2f}%)")
    if args.json:
        print(json_text({k: v for k, v in report.items() if k != "confusion_matrix"}, indent=2))
    else:
        # With 5 classes or fewer, top-5 is top-all-classes: 100% by construction, whatever the model. It is
        # left out of the line, not said as top-N, so that no one reads it as a score (eval.json keeps its
        # "top5" key, 100 there, for readers that expect it).
        top5 = f"  top-5 {result['top5']:.2f}%" if data.num_classes > 5 else ""
        print(f"{meta['model']} on {result['count']} {data_name} validation images at {img_size}px: "
              f"top-1 {result['top1']:.2f}%{top5}  loss {result['loss']:.4f}")
        print(f"wrote {out / 'eval.json'} and {out / 'confusion_matrix.png'}")
    return 0


def _report_folder(first: Path, settings: dict) -> Path:
    """The report's folder when none is given: ``first``, unless it holds the evaluation of other
    settings (another data folder, size, precision or preprocessing), then ``first-2``, ``first-3``, ...,
    the first that is free or holds an evaluation of these: a new evaluation never replaces another's,
    only its own earlier run. A folder holding someone else's files is returned, for the check that
    refuses it."""
    wanted = json.loads(json_text(settings))  # as eval.json holds them: tuples as lists
    for n in itertools.count(1):
        out = first if n == 1 else first.with_name(f"{first.name}-{n}")
        try:
            report = json.loads((out / "eval.json").read_text())
        except (OSError, ValueError):  # none there yet, or not a report (which the check then refuses)
            return out
        # an older report lacks the newer keys: read as these settings'
        if not isinstance(report, dict) or all(report.get(k, v) == v for k, v in wanted.items()):
            return out


def _check_own_report(out: Path) -> None:
    """An earlier evaluation's files in ``out`` are replaced; anyone else's are not."""
    if not out.is_dir():  # nothing there yet, or a file (which making the folder reports)
        return
    try:
        report = json.loads((out / "eval.json").read_text())
        ours = isinstance(report, dict) and {"checkpoint", "top1", "confusion_matrix"} <= set(report)
    except FileNotFoundError:
        ours = not (out / "confusion_matrix.png").exists()
    except (OSError, ValueError):  # not JSON, or not text: not an evaluation's report
        ours = False
    if not ours:
        raise ValueError(f"{out} holds an eval.json or confusion_matrix.png that no evaluation wrote, which this one "
                         f"would replace; move them or choose another --output-dir")


def images_in(folder: str) -> list[str]:
    """A folder's image files, sorted (not its subfolders'); the others are counted in a warning. A
    link to no file, a FIFO and the like are listed, to be reported as unreadable, not left out without a word."""
    files = [p for p in Path(folder).iterdir() if not p.is_dir()]
    warn_not_images(folder, [p.name for p in files if not is_image_file(p.name)])
    images = sorted(str(p) for p in files if is_image_file(p.name))
    # Subfolders holding images are not searched: said, where the folder's own images would hide it (a folder
    # of none is an error that says so).
    nested = sorted(p.name for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith(".")
                    and any(is_image_file(n) for _, _, names in os.walk(p) for n in names)) if images else []
    if nested:
        warnings.warn(f"{len(nested)} subfolder{'s' if len(nested) > 1 else ''} of '{folder}' holding images not "
                      f"searched ({', '.join(nested[:5])}{' ...' if len(nested) > 5 else ''}); give "
                      f"{'them' if len(nested) > 1 else 'it'} too, e.g. '{os.path.join(folder, nested[0])}'",
                      stacklevel=2)
    return images


def run_predict(args: argparse.Namespace) -> int:
    """Top-k classes of each readable image. Each unreadable one is one line on stderr and in the JSON's
    ``errors``; the exit status is 1 when some images could not be read, 2 when none could. A folder
    stands for its image files."""
    _one_process(args)
    device = resolve_device(args.device)  # a bad flag fails before anything is read
    ckpt, model = load_for_inference(args)
    if not model.num_classes:
        raise ValueError(f"{ckpt.path} has no classifier (0 classes): there is nothing to predict; give a "
                         f"checkpoint of a classifier")
    classes = [printable(str(c)) for c in class_names(model)]
    transform = eval_transform(_img_size(args, model), model.pretrained_cfg, model.config.in_chans)
    k = min(args.top_k, len(classes))
    model.to(device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=_amp(args, ckpt, device))
    images, errors, results = [], [], []
    for path in args.images:  # a folder stands for its image files
        found = images_in(path) if os.path.isdir(path) else [path]
        images += found
        if not found:
            searched = " (its subfolders are not searched)" if any(p.is_dir() for p in Path(path).iterdir()) else ""
            errors.append(dict(image=printable(path), message=f"'{printable(path)}' is a folder without image "
                                                           f"files ({', '.join(IMG_EXTENSIONS)}){searched}"))
    # Decoded and run --batch-size images at a time, so memory does not grow with the number of files;
    # the results print once every file is done, in one piece.
    for start in range(0, len(images), args.batch_size):
        loaded = []
        for path in images[start:start + args.batch_size]:
            try:
                loaded.append((path, transform(load_image(path))))
            except DataError as e:  # costs that image's prediction only
                errors.append(dict(image=printable(path), message=printable(str(e))))
        if not loaded:
            continue
        if not results:
            _say_which(ckpt, args)
        with torch.inference_mode(), autocast:
            probs = model(torch.stack([x for _, x in loaded]).to(device)).float().softmax(dim=1).cpu()
        top = probs.topk(k, dim=1)
        # A file name that is not UTF-8 would fail the print to stdout, and a newline in one would split its
        # line: shown with \xNN (as in the figures) and \n.
        results += [dict(image=printable(path), top=[dict(label=classes[i], probability=p) for p, i in
                                                  zip(values.tolist(), indices.tolist())])
                    for (path, _), values, indices in zip(loaded, top.values, top.indices)]
    for e in errors:
        print(f"coatnet predict: error: {e['message']}", file=sys.stderr)
    if args.json:
        print(json_text(dict(predictions=results, errors=errors), indent=2))
    else:
        width = max((len(t["label"]) for r in results for t in r["top"]), default=0)  # one column for every image
        for r in results:
            print(r["image"])
            for rank, t in enumerate(r["top"], 1):
                print(f"  {rank:>{len(str(k))}}. {t['label']:<{width}}  {100 * t['probability']:6.2f}%")
    return 2 if not results else 1 if errors else 0
