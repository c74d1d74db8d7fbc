"""The ``coatnet`` command line. Each subcommand is a small function; bad input exits with status 2
and one line on stderr that says what was wrong, never a traceback."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import stat
import sys
import warnings
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Annotated

from .interrupt import stop_on_ctrl_c_and_sigterm
from .text import json_text, printable
from .validate import Fraction, NonNegativeInt, PositiveFloat, PositiveInt, Range, flag_type

POSITIVE, NON_NEGATIVE = flag_type(PositiveInt), flag_type(NonNegativeInt)


def _si(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _bytes(n: int) -> str:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _pct(p: float | None) -> str:
    return "-" if p is None else f"{p:+.1f}%"


def cmd_info(args: argparse.Namespace) -> int:
    from .complexity import measure
    from .models import list_models

    rows = [measure(name, args.img_size) for name in (args.models or list_models())]
    if args.json:
        print(json_text([r.to_dict() for r in rows], indent=2))
        return 0
    header = ("model", "layout", "img", "params", "paper", "diff", "FLOPs", "paper", "diff")
    table = [header] + [(r.model, r.layout, str(r.img_size), _si(r.params), _si(r.paper_params), _pct(r.params_diff),
                         _si(r.flops), _si(r.paper_flops), _pct(r.flops_diff)) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    print("FLOPs are multiply-adds (the paper's convention); paper figures: Tables 3-5, 13, 14.")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import fields, replace

    from .train import RECIPES, resumed_config, train

    resume = True if args.resume == "auto" else args.resume
    if resume and args.pretrained is not None:
        raise ValueError("--pretrained starts a new run from weights and --resume continues a run from its own: "
                         "give one of them")
    if resume and args.recipe is not None:
        raise ValueError("--recipe sets a new run's settings and a resumed run keeps its own: drop --recipe, and "
                         "change a setting with its own flag")
    if args.recipe == "imagenet1k-finetune" and args.pretrained is None:
        # Table 10's fine-tuning column (lr 5e-5, 30 epochs) from random weights would train nothing worth having
        raise ValueError("--recipe imagenet1k-finetune fine-tunes pre-trained weights: give them with --pretrained "
                         "(e.g. a run of --recipe imagenet1k-pretrain: --pretrained RUN/best), or train from scratch "
                         "with --recipe imagenet1k-pretrain")
    # The flags given override the resumed run's settings, or else the recipe's.
    base = resumed_config(resume, args.output_dir) or RECIPES[args.recipe or "digits"]
    given = {f.name: getattr(args, f.name) for f in fields(base) if getattr(args, f.name, None) is not None}
    for name, given_as_none in (("randaugment", RANDAUGMENT_OFF), ("drop_path", MODELS_OWN)):
        if given.get(name) == given_as_none:  # None in the settings, which would read as "not given" here
            given[name] = None
    if args.model is None and isinstance(args.pretrained, str) and args.pretrained:  # "": said by its check
        from .models.factory import weights_network

        # The weights' own network, where their config.json names it (not the recipe's model, which they
        # would not fit): --model is then needed only for a weights file.
        given["model"] = weights_network(args.pretrained) or base.model
    if args.pretrained is not None and args.recipe is None and args.img_size is None:
        # The weights' own size, as timm fine-tunes them, not the digits recipe's 32 px (their tables shrunk)
        given["img_size"] = None
    if args.data is None and args.data_dir is not None and not resume:
        from .data import data_kind

        # The kind of data set the folder holds, as timm reads a folder without --dataset (digits reads none;
        # a recipe's image folder says what it lacks)
        if (kind := data_kind(args.data_dir)) is None and base.data == "digits":
            raise ValueError(f"--data-dir {args.data_dir} " + (
                "holds no data set of a kind this can tell (train/ and val/ of images, CIFAR's files, train-*.tar "
                "shards, a Hugging Face dataset); check the folder, or name its kind with --data imagefolder|"
                "cifar10|cifar100|webdataset|hf" if os.path.isdir(os.path.expanduser(args.data_dir)) else
                "does not exist; check the path"))
        given["data"] = kind or base.data
    train(replace(base, **given), output_dir=args.output_dir, resume=resume)
    return 0


def cmd_convert_timm(args: argparse.Namespace) -> int:
    """A timm weights file in, a ``save_pretrained`` folder out, with timm's preprocessing and class names."""
    from pathlib import Path

    from .models import create_model, read_state_dict
    from .models.factory import PretrainedWeights, load_pretrained
    from .models.folder import EMA_WEIGHTS, WEIGHTS, refuse_to_replace
    from .models.hub import local_path
    from .models.registry import model_entry
    from .models.timm_convert import (classifier_size, convert_timm_state_dict, is_timm_state_dict, timm_img_size,
                                      timm_pretrained_cfg, timm_variant_of)

    if not args.output:  # Path("") is the current folder, which the check for files below would not see
        raise ValueError("--output is empty; give the folder to write config.json and model.safetensors into "
                         "(. for the current one, with --overwrite if it holds files)")
    source = local_path(args.source)  # timm's local-dir:PATH as PATH, as everywhere
    state = read_state_dict(source)
    if not is_timm_state_dict(state):
        raise ValueError(f"{args.source!r} does not hold timm CoAtNet weights (no stem.conv1.weight); "
                         f"give a timm .safetensors or .pth file")
    refuse_to_replace(Path(args.output))  # now, not after converting: a run, a checkpoint, another's config.json
    if os.path.isdir(args.output) and os.listdir(args.output) and not args.overwrite:
        raise ValueError(f"output {args.output!r} is a folder with files in it; give a new or empty one, or replace "
                         f"its config.json and weights with --overwrite")
    # A folder holding only timm's weights file, converted into itself: the folder's weights are replaced (or,
    # for ema.safetensors, removed), and timm's file, the only one timm reads, would be gone, even with --overwrite
    replaced = [Path(args.output) / f for f in (WEIGHTS, EMA_WEIGHTS)]
    if any(f.is_file() and f.samefile(source) for f in replaced):
        raise ValueError(f"{args.source!r} is in --output {args.output!r}, where the converted weights are written "
                         f"over it; give another --output folder")
    name = model_entry(args.model).name if args.model else timm_variant_of(state)  # timm's name -> ours
    if name is None:
        raise ValueError(f"{args.source!r} fits none of timm's CoAtNet variants exactly; pass --model NAME to be "
                         f"told which weights differ")
    # The input size is read from the tables; the rmlp variants have none: the user's, or the model's own.
    tables = timm_img_size(state)
    if tables and args.img_size not in (None, tables):
        raise ValueError(f"--img-size {args.img_size}: these weights' relative-position tables are for {tables} px; "
                         f"drop --img-size")
    # Converted as they are, strictly: no classifier left random, no table resized to fit.
    model = create_model(args.model or name, img_size=tables or args.img_size, num_classes=classifier_size(state))
    own = {k: v.shape for k, v in model.state_dict().items()}
    load_pretrained(model, PretrainedWeights(state, None), name, new_classifier=False)
    converted = convert_timm_state_dict(state, name)
    resized = sorted(k for k in own.keys() & converted.keys() if own[k] != converted[k].shape
                     and k.endswith("relative_position.table"))
    if resized:
        raise ValueError(f"{args.source!r} holds relative-position tables of other sizes than its last stage's "
                         f"({', '.join(f'{k} {tuple(converted[k].shape)}' for k in resized[:3])}, where "
                         f"{model.config.img_size[0]} px needs {tuple(own[resized[0]])}); check the file")
    model.pretrained_cfg = timm_pretrained_cfg(name, min(model.config.img_size), model.num_classes)
    folder = model.save_pretrained(args.output)
    print(f"wrote {folder}: {name}, {model.config.num_classes} classes, "
          f"{model.config.img_size[0]}x{model.config.img_size[1]} input")
    if not tables and args.img_size is None:
        print(f"note: these weights hold no relative-position table to read their input size from, so they were "
              f"taken as {model.config.img_size[0]} px; weights trained at another size (timm's *_384) need "
              f"--img-size 384")
    return 0


class _RecipeDefaults(argparse.HelpFormatter):
    """``coatnet train --help``: each setting's value in the default (digits) recipe, which is what a
    flag left out gives. Imported only when the help is printed, so other commands start fast."""

    def _get_help_string(self, action: argparse.Action) -> str:
        from .train import RECIPES

        value = getattr(RECIPES["digits"], action.dest, None)
        if action.dest == "recipe" or value is None:
            return action.help or ""
        shown = ("on" if value else "off") if isinstance(value, bool) else value
        return f"{action.help or ''} (digits recipe: {shown})".strip()


# --randaugment 0: off, which the recipe's or the resumed run's RandAugment must yield to. Not None,
# which stands for a flag left out.
RANDAUGMENT_OFF = ()


def _randaugment(text: str) -> tuple[int, int] | tuple[()]:
    """``--randaugment 2,15`` -> (2, 15): RandAugment layers and magnitude; ``0`` or ``none`` -> off."""
    if text.lower() in ("0", "none", "off"):
        return RANDAUGMENT_OFF
    try:
        n, m = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"N,M (layers,magnitude) expected, like 2,15; got {text!r}")
    return n, m


# --drop-path model: the model's own rate (None in the settings), as the ImageNet recipes take it.
MODELS_OWN = "model"


def _drop_path(text: str) -> float | str:
    """``--drop-path 0.1`` -> 0.1 (its range is checked with the other settings); ``model`` -> :data:`MODELS_OWN`."""
    if text.lower() == MODELS_OWN:
        return MODELS_OWN
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a rate (0 <= rate < 1) or 'model' expected; got {text!r}") from None


def _preprocessing_flags(p: argparse.ArgumentParser) -> None:
    """How images are prepared: the checkpoint's own (its ``pretrained_cfg``) unless given (timm's flags)."""
    from typing import get_args

    from .models.preprocessing import CropPct, Interpolation

    def channel(text: str) -> float:  # argparse's own "invalid float value: 'cat.jpg'" hides that 3 are taken
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes three numbers, R G B; got {text!r}") from None

    g = p.add_argument_group("preprocessing", "default: the checkpoint's own, recorded with its weights")
    g.add_argument("--mean", type=channel, nargs=3, metavar=("R", "G", "B"), help="per-channel mean")
    g.add_argument("--std", type=channel, nargs=3, metavar=("R", "G", "B"), help="per-channel standard deviation")
    g.add_argument("--interpolation", choices=get_args(Interpolation), help="resize interpolation")
    g.add_argument("--crop-pct", type=flag_type(CropPct), help="centre crop's share of the resized image")
    g.add_argument("--crop-mode", choices=["center", "squash"],
                   help="center: resize the shorter side; squash: resize both sides")


# timm's train.py and validate.py flags that mean something else here, or are spelt otherwise for a
# reason: a flag of ours that a command must have for the hint to hold there, and what to write (those
# that mean the same, -b, -j and --smoothing, are aliases).
_TIMM_FLAGS = {
    "--model-ema": ("--ema", "use --ema DECAY"), "--model-ema-decay": ("--ema", "use --ema DECAY"),
    "--warmup-epochs": ("--warmup-steps", "use --warmup-steps, in optimizer steps"),
    "--aa": ("--randaugment", "use --randaugment N,M (rand-m9-n2 is --randaugment 2,9)"),
    "--torchcompile": ("--compile", "use --compile"),
    "--initial-checkpoint": ("--finetune", "use --pretrained PATH"),  # train's; eval's --pretrained takes no PATH
    "--dataset": ("--data", "use --data (digits, imagefolder, cifar10 ...)"),
    "--input-size": ("--img-size", "use --img-size"),
    "--num-classes": ("--recipe", "the classes of --data make the head"),  # train's; eval's are the checkpoint's
    "--opt": ("--weight-decay", "AdamW is the optimizer (Table 10), --weight-decay its decay"),
    "--sched": ("--min-lr", "linear warm-up, then cosine decay to --min-lr, is the schedule (Table 10)"),
    "--hflip": ("--aug", "half the training images are flipped at random, timm's default 0.5 (not digits: a "
                         "mirrored digit is another symbol); --no-aug for none"),
}
# Training prepares images as its weights expect (their pretrained_cfg) or as the data set's own; the
# commands that read a checkpoint take these flags.
_TIMM_FLAGS |= {flag: ("--recipe", "training prepares images as the weights it starts from expect, else as the "
                                   f"data set's own; eval and predict take {flag}")
                for flag in ("--mean", "--std", "--interpolation", "--crop-pct")}


def _timm_output(text: str):
    raise argparse.ArgumentTypeError(f"timm's --output is the folder each run's own goes under; --output-dir is the "
                                     f"run's own folder here: --output-dir {os.path.join(text, 'NAME')}")


def _no_head_dropout(text: str):
    raise argparse.ArgumentTypeError("timm's head dropout: CoAtNet's head has none; --drop-path RATE is the stochastic "
                                     "depth")


class _FlagError(Exception):
    """A flag argparse refuses: reported in one line, like every other error."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A value that starts like a negative number ("-1,5", "-0.5e-3") is a value, not a flag, so its
        # own check can say what is wrong with it; Python 3.13's argparse does the same.
        self._negative_number_matcher = re.compile(r"-\.?\d")

    def error(self, message: str):  # argparse's own: a usage block, then exit
        # a mistyped command or choice, as a mistyped flag: the one it most looks like (as Python 3.14's does)
        if (choice := re.match(r"argument \S+: invalid choice: '([^']*)' \(choose from (.*)\)$", message)) and (
                close := difflib.get_close_matches(choice[1], [c.strip("'") for c in choice[2].split(", ")], n=1,
                                                   cutoff=0.6)):  # quoted (repr) before Python 3.14, str after
            message += f"; did you mean {close[0]}?"
        raise _FlagError(f"{self.prog}: error: {message}")

    def parse_args(self, args=None, namespace=None):
        # argparse says an unknown flag as the top command's ("coatnet: error: ..."): say it as the
        # command's that was given it, with the flag it most looks like (--batch_size: --batch-size)
        # (A file among them, `-x.png`, is said by _file_hint.)
        parsed, unknown = self.parse_known_args(args, namespace)
        if not unknown:
            return parsed
        parser = self
        while sub := next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None):
            parser = sub.choices[getattr(parsed, sub.dest)]
        hint = ""
        if not any(os.path.exists(arg) for arg in unknown):
            flags = [f for a in parser._actions for f in a.option_strings if f.startswith("--")]
            given = ["--" + arg.lstrip("-").split("=")[0].replace("_", "-") for arg in unknown if arg.startswith("-")]
            timm = [f"timm's {flag}: {_TIMM_FLAGS[flag][1]}" for flag in given
                    if flag in _TIMM_FLAGS and _TIMM_FLAGS[flag][0] in flags]
            close = [match for flag in given if flag not in _TIMM_FLAGS
                     for match in difflib.get_close_matches(flag, flags, n=1, cutoff=0.7)]
            hint = "".join(f"; {h}" for h in [*timm, *([f"did you mean {' '.join(close)}?"] if close else [])]) or \
                f"; `{parser.prog} --help` lists its flags"
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")


def _model_flags(p: argparse.ArgumentParser, checkpoint: str) -> None:
    """The model eval, predict and export run: a checkpoint or folder, or, as timm's validate.py and
    inference.py take it, --model NAME with --pretrained or a weights file (checked together by
    coatnet.evaluate, in one line)."""
    p.add_argument("--checkpoint", default=None, help=checkpoint + "; or a weights file, with --model")
    p.add_argument("--model", default=None, help="the network of a weights file (--checkpoint FILE), or of timm's "
                                                 "published weights (--pretrained), e.g. coatnet_0_rw_224.sw_in1k; "
                                                 "with --pretrained, hf-hub:ORG/NAME too")
    p.add_argument("--pretrained", action="store_true",
                   help="timm's published weights of --model, from the Hugging Face Hub (its cache)")
    p.add_argument("--use-ema", action=argparse.BooleanOptionalAction, default=None,
                   help="the EMA of the weights, where the checkpoint holds one (default, as its run evaluated); "
                        "--no-use-ema: the weights themselves (timm's validate.py spelling)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="coatnet", description="CoAtNet (Dai et al., NeurIPS 2021) in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="parameters and FLOPs of models beside the paper's figures")
    p.add_argument("models", nargs="*", metavar="MODEL", help="model names (default: all registered models)")
    p.add_argument("--img-size", type=POSITIVE, default=None, help="input resolution (default: each model's own)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train a model (no flags: coatnet_pico on the embedded digits, on CUDA if "
                                     "available, else the CPU)",
                       description="Train with the paper's recipe (Table 10). Flags override the --recipe's "
                                   "values; when resuming, they override the resumed run's settings.",
                       formatter_class=_RecipeDefaults)
    p.add_argument("--recipe", default=None,
                   choices=["digits", "finetune", "imagenet1k-pretrain", "imagenet1k-finetune"],
                   help="preset of all settings (default: digits, a CPU run on the embedded digits; finetune: "
                        "timm's coatnet_0_rw_224.sw_in1k on your --data-dir photos)")
    p.add_argument("--model", default=None, help="model name (see `coatnet info`)")
    p.add_argument("--data", default=None, help="digits, imagefolder, cifar10, cifar100, webdataset or hf")
    p.add_argument("--data-dir", default=None,
                   help="folder of an imagefolder (train/, val/), CIFAR, WebDataset shards or HF data set")
    p.add_argument("--img-size", type=int, default=None,
                   help="input resolution (default: the recipe's; the weights' own with --pretrained and no "
                        "--recipe, or --recipe finetune)")
    p.add_argument("--epochs", type=int, default=None, help="epochs to train (on --resume: in all)")
    p.add_argument("-b", "--batch-size", type=int, default=None, help="global batch size, split across processes")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=None, help="learning rate at the end of the cosine decay")
    p.add_argument("--warmup-steps", type=int, default=None, help="steps of linear warm-up")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay")
    p.add_argument("--drop-path", type=_drop_path, default=None, metavar="RATE",
                   help="stochastic depth rate, or 'model' for the model's own (Table 10: 0.2 for CoAtNet-0), "
                   "as the ImageNet recipes take it")
    p.add_argument("--drop", type=_no_head_dropout, help=argparse.SUPPRESS)  # else argparse reads it as --drop-path
    p.add_argument("--clip-grad", type=float, default=None, help="gradient norm clipping (0: off)")
    p.add_argument("--label-smoothing", "--smoothing", type=float, default=None,
                   help="label smoothing of the training loss")
    p.add_argument("--aug", dest="augment", action=argparse.BooleanOptionalAction, default=None,
                   help="the data set's random crop and flip of training images; --no-aug (timm's): prepared as "
                        "for evaluation")
    p.add_argument("--randaugment", type=_randaugment, default=None, metavar="N,M",
                   help="RandAugment layers,magnitude (torchvision's scale, 0..30); 0: off")
    p.add_argument("--mixup", type=float, default=None, help="Mixup alpha (0: off, else 0.01 or more)")
    p.add_argument("--cutmix", type=float, default=None, help="CutMix alpha (0: off, else 0.01 or more)")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY", help="keep an EMA of the weights (0: off)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bfloat16 autocast")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="timm's flag; the model always runs channels-last, its weights included")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                   help="shard weights, gradients and optimizer state across the torchrun processes (FSDP2)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block's activations in the backward pass: less memory, more compute")
    p.add_argument("--grad-accum-steps", type=int, default=None, metavar="N",
                   help="split each step's batch into N micro-batches (same samples, less memory; BatchNorm "
                        "normalises each micro-batch on its own)")
    p.add_argument("--seed", type=int, default=None, help="seed of the weights' initialisation and the data order")
    p.add_argument("-j", "--workers", type=int, default=None, help="data-loading processes")
    p.add_argument("--save-every", type=int, default=None, metavar="N", help="also checkpoint every N steps")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--output-dir", default=None, help="run directory (default: runs/DATE-TIME-MODEL-DATA)")
    p.add_argument("--output", type=_timm_output, help=argparse.SUPPRESS)  # else argparse reads it as --output-dir
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue a run: its checkpoint or run directory, PATH or local-dir:PATH (default: "
                        "--output-dir)")
    p.add_argument("--pretrained", "--finetune", nargs="?", const=True, default=None, metavar="WEIGHTS",
                   help="start from pretrained weights, with a new head for the data's classes and their "
                        "preprocessing: alone, timm's weights of --model from the Hugging Face Hub; or a weights "
                        "file, a checkpoint or run directory, a save_pretrained folder or timm's downloaded "
                        "repository (PATH or local-dir:PATH), or hf-hub:ORG/NAME, whose network is then the model "
                        "unless --model is given. Tables are interpolated to --img-size")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval",
                       help="top-1/top-5 and a confusion matrix of a checkpoint on a data set's validation split")
    _model_flags(p, "checkpoint directory (RUN_DIR/best, RUN_DIR/last), run directory, save_pretrained folder, "
                    "or timm's repository downloaded into one (hf download ORG/NAME --local-dir PATH); "
                    "local-dir:PATH is PATH, as in timm; or hf-hub:ORG/NAME, from the Hub cache")
    p.add_argument("--data", default=None, help="data set (default: the one the checkpoint was trained on)")
    p.add_argument("--data-dir", default=None, help="folder of an imagefolder, CIFAR, WebDataset or HF data set")
    p.add_argument("--img-size", type=int, default=None, help="evaluation resolution (default: the checkpoint's)")
    p.add_argument("-b", "--batch-size", type=POSITIVE, default=256)
    p.add_argument("-j", "--workers", type=NON_NEGATIVE, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--output-dir", default=None, help="where confusion_matrix.png and eval.json go "
                                                      "(default: RUN_DIR/eval-CHECKPOINT-DATA, -2, -3 ... for "
                                                      "other data or settings)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (default: as the run evaluated, so its metrics.jsonl's figures come again)")
    _preprocessing_flags(p)
    p.set_defaults(func=lambda args: _lazy("evaluate", "run_eval")(args))

    p = sub.add_parser("predict", help="top-5 classes of images, with probabilities")
    _model_flags(p, "checkpoint directory, run directory, save_pretrained folder or timm's downloaded repository "
                    "(PATH or local-dir:PATH), or hf-hub:ORG/NAME")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files of any size")
    p.add_argument("--top-k", type=POSITIVE, default=5)
    p.add_argument("-b", "--batch-size", type=POSITIVE, default=32, help="images decoded and run at a time")
    p.add_argument("--img-size", type=int, default=None, help="resolution (default: the checkpoint's)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (default: as the run evaluated, as `coatnet eval` does)")
    _preprocessing_flags(p)
    p.set_defaults(func=lambda args: _lazy("evaluate", "run_predict")(args))

    p = sub.add_parser("bench", help="time inference and a training step, side by side with timm")
    p.add_argument("--model", default="coatnet_0", help="model name (default: coatnet_0)")
    p.add_argument("--img-size", type=POSITIVE, default=None, help="input resolution (default: the model's own)")
    p.add_argument("-b", "--batch-size", type=POSITIVE, default=8, help="images per call (default: 8)")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch threads (default: all cores)")
    p.add_argument("--repeats", type=POSITIVE, default=10, help="timed repeats per measurement (default: 10)")
    p.add_argument("--compare", choices=["timm"], default=None, help="also time timm's matching model")
    p.add_argument("--compile", action="store_true", help="add torch.compile lines")
    p.add_argument("--onnx", action="store_true", help="add our model exported to ONNX, run by onnxruntime")
    p.add_argument("--dtype", choices=["float32", "tf32", "bfloat16"], default="float32",
                   help="bfloat16: autocast, as `coatnet train --amp` (the matmul in bfloat16 too); "
                        "tf32 (CUDA): every float32 product on TF32 tensor cores")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=lambda args: _lazy("bench", "run_bench")(args))

    p = sub.add_parser("export", help="export a checkpoint to ONNX, TorchScript or torch.export")
    _model_flags(p, "training checkpoint, run directory, save_pretrained folder or timm's downloaded repository "
                    "(PATH or local-dir:PATH), or hf-hub:ORG/NAME")
    # Checked by coatnet.export, so that a wrong format is a one-line error like any other.
    p.add_argument("--format", required=True, help="onnx, torchscript or exported")
    p.add_argument("--output", required=True, help="file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the checkpoint's)")
    p.add_argument("--batch-size", type=POSITIVE, default=1, help="batch size of the example input")
    p.add_argument("--dynamic-batch", action="store_true", help="let the exported graph take any batch size")
    _preprocessing_flags(p)
    p.set_defaults(func=lambda args: _lazy("export", "run_export")(args))

    p = sub.add_parser("plan", help="memory per GPU to train a model at scale, and the torchrun command that fits",
                       description="Weights, gradients, AdamW state and activations (measured on the meta device) "
                                   "per GPU for DDP and FSDP, with and without activation checkpointing; the "
                                   "configuration that fits, its micro-batch and gradient accumulation.")
    p.add_argument("--model", required=True, help="model name (see `coatnet info`)")
    p.add_argument("--img-size", type=POSITIVE, default=None, help="training resolution (default: the model's own)")
    p.add_argument("--batch-size", type=flag_type(Annotated[int, Range(1, 2**40)]), default=4096,
                   help="global batch size (default: 4096, the paper's)")
    p.add_argument("--gpus", type=POSITIVE, default=8, help="GPUs per machine (default: 8)")
    p.add_argument("--gpu-memory", type=flag_type(Annotated[float, Range(0, 2**20, low_open=True)]), default=80.0,
                   metavar="GIB",
                   help="memory of each GPU in GiB (default: 80)")
    p.add_argument("--nodes", type=POSITIVE, default=1, help="machines (default: 1)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bfloat16 mixed precision (default: on)")
    p.add_argument("--ema", type=flag_type(Fraction), default=0.0, metavar="DECAY",
                   help="an EMA of the weights, as train's --ema (the fine-tuning recipe's: 0.9999; default: none)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=lambda args: _lazy("plan", "run_plan")(args))

    p = sub.add_parser("convert-timm", help="convert a timm CoAtNet state dict into a save_pretrained folder")
    p.add_argument("source", metavar="SRC", help="timm weights: .safetensors or .pth")
    p.add_argument("--model", default=None, help="our name of the matching configuration (default: the variant "
                                                 "the weights fit)")
    p.add_argument("--output", required=True, help="folder to write (config.json, model.safetensors)")
    p.add_argument("--img-size", type=POSITIVE, default=None,
                   help="the input size the weights were trained at, for the rmlp variants (others: read from the "
                        "weights)")
    p.add_argument("--overwrite", action="store_true", help="write into --output even if it holds files")
    p.set_defaults(func=cmd_convert_timm)

    p = sub.add_parser("study", help="the paper's controlled studies")
    study = p.add_subparsers(dest="study", required=True, metavar="STUDY")
    p = study.add_parser("layouts", help="Section 2.2 / Figure 1: the five layouts, same budget, no regularisation",
                         description="Train VIT_REL, C-C-C-C, C-C-C-T, C-C-T-T and C-T-T-T (spelled vit_rel, c_c_c_c, "
                                     "c_c_c_t, c_c_t_t, c_t_t_t) with the same budget and no regularisation or "
                                     "augmentation, several seeds each; write study.json, study.md and study.png. "
                                     "An interrupted study continues where it stopped.")
    p.add_argument("--data", default="digits",
                   help="digits (default), imagefolder, cifar10, cifar100, webdataset or hf")
    p.add_argument("--data-dir", default=None,
                   help="folder of an imagefolder (train/, val/), CIFAR, WebDataset shards or HF data set")
    p.add_argument("--img-size", type=POSITIVE, default=None, help="input resolution (default: the recipe's)")
    p.add_argument("--epochs", type=POSITIVE, default=None, help="epochs per run (default: 12 on digits, else 300)")
    p.add_argument("--batch-size", type=POSITIVE, default=None, help="global batch size (default: the recipe's)")
    p.add_argument("--lr", type=flag_type(PositiveFloat), default=None,
                   help="peak learning rate (default: the recipe's)")
    p.add_argument("--warmup-steps", type=NON_NEGATIVE, default=None,
                   help="steps of linear warm-up (default: the recipe's: 50 on digits, else 10000)")
    p.add_argument("--seeds", type=POSITIVE, default=3, help="runs per layout, seeds 0..N-1 (default: 3)")
    p.add_argument("--layouts", default=None, help="comma-separated subset, e.g. c_c_t_t,c_t_t_t (default: all five)")
    p.add_argument("--size", choices=["small", "paper"], default=None,
                   help="small: widths / 4 for small images; paper: CoAtNet-0's size (default: small up to 64 px)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--output-dir", default="study-layouts", help="where the runs and the study's files go")
    p.set_defaults(func=lambda args: _lazy("study", "run_layout_study")(args))
    return parser


def _lazy(module: str, name: str):
    """Import a subcommand's module only when it runs, so `coatnet info` starts fast."""
    import importlib

    return getattr(importlib.import_module(f"coatnet.{module}"), name)


def _message(error: Exception) -> str:
    """The error's own message. One raised in a DataLoader worker process comes back as the same
    kind of error whose message is the worker's whole traceback: its own message is the last line."""
    text = str(error)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text


_ASKED = re.compile(r"allocate (\d+) bytes|Tried to allocate ([\d.]+ [KMGT]iB)")  # the size torch could not get


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation refused: Python's MemoryError, or torch's CPU and CUDA
    allocators' (RuntimeErrors, whose messages say so)."""
    return isinstance(error, MemoryError) or isinstance(error, RuntimeError) and bool(
        _ASKED.search(str(error)) or "out of memory" in str(error))


def _file_hint(message: str, argv: list[str]) -> str:
    """What to do where argparse took a file named ``-x.png`` for a flag (``coatnet predict --checkpoint RUN *``),
    or refused a file given to eval's or export's ``--pretrained``: it says only that the argument is unknown,
    or that no IMAGE was given."""
    refused = message.split(": error: ")[-1]
    if not refused.startswith(("unrecognized arguments", "the following arguments are required")):
        return ""
    from .evaluate import WEIGHTS_SUFFIXES

    dashed = next((a for a in argv if a.startswith("-") and a != "-" and os.path.exists(a)), None)
    if "--pretrained" in argv[:-1] and refused.startswith("unrecognized arguments") and os.path.isfile(
            file := argv[argv.index("--pretrained") + 1]) and (
            file in refused.split(": ", 1)[-1].split() or file.endswith(WEIGHTS_SUFFIXES)):  # predict: read as an IMAGE
        return f"; --pretrained takes no file here: give a weights file as --checkpoint {file}, with --model NAME"
    return "" if dashed is None else (f"; '{dashed}' is a file taken for a flag: give it as ./{dashed}, or after -- "
                                      f"(... -- {dashed})")


SIGPIPE_STATUS = 128 + 13  # what a shell reports of a process that SIGPIPE ended


def _output_is_a_pipe() -> bool:
    """Whether stdout or stderr is a pipe or socket: the package writes to no other pipe of its own (its
    data-loading workers' and torchrun's connections fail with errors of their own), so a
    BrokenPipeError reaching the command line is one of these whose reader has gone."""
    for stream in (sys.stdout, sys.stderr):
        try:
            mode = os.fstat(stream.fileno()).st_mode
        except (AttributeError, OSError, ValueError):  # replaced by an object with no file (a test's capture)
            continue
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            return True
    return False


def _reader_gone() -> int:
    """The reader of the output went away (``coatnet eval --json | head -c 10``): not an error of the
    user's, and nothing can be said to it. Ended without a word, as Unix tools are by SIGPIPE, with the
    status a shell shows for them (141, which ``set -o pipefail`` sees). Returned, not raised as the
    signal, so that the command's cleanup (locks, folders made) still runs on the way out."""
    # What is still buffered for stdout can never be written: closing it drops it (its file stays open),
    # else Python's flush at exit would report the broken pipe after all.
    with suppress(OSError, ValueError):
        sys.stdout.close()
    return SIGPIPE_STATUS


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except KeyboardInterrupt:  # before a command began (torch loading, the flags read): as a command's Ctrl-C
        if os.environ.get("RANK", "0") == "0":
            print("coatnet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # a command's results, or --help, written to a pipe whose reader has gone
        if not _output_is_a_pipe():
            raise
        return _reader_gone()


def _run(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:  # --help: its text, still buffered, is written now, as a command's results are (below)
        sys.stdout.flush()
        raise
    except _FlagError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process reads the same flags: one says so
            print(f"{e}{_file_hint(str(e), sys.argv[1:] if argv is None else argv)}", file=sys.stderr)
        return 2
    if args.command in ("train", "eval", "predict", "study"):
        from .allocator import keep_freed_memory

        keep_freed_memory()  # CPU steps without page faults (coatnet.allocator)
    # A warning is one line too, as the errors are: what, not the library line that noticed it; a
    # name it quotes (a file's, with a newline in it) cannot break the line (printable).
    command = f"coatnet {args.command}" + (f" {args.study}" if args.command == "study" else "")  # as its flags' errors
    format_warning = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *where, **_: (
        f"{command}: warning: {'' if category is UserWarning else category.__name__ + ': '}{printable(str(message))}\n")
    # Not under torchrun: SIGTERM is how its agent stops the other processes when one fails, and
    # training's checkpoints are written so that being killed loses nothing.
    stoppable = stop_on_ctrl_c_and_sigterm() if "RANK" not in os.environ else nullcontext()
    try:
        with stoppable:
            status = args.func(args) or 0
            # Results still buffered (stdout a pipe) are written now, where a reader gone is met by main's
            # handler, not by Python at exit ("Exception ignored ... BrokenPipeError", status 120).
            sys.stdout.flush()
            return status
    except ValueError as e:  # bad input: one line, exit status 2
        print(f"{command}: error: {printable(_message(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder that cannot be read or written: what, where
        if isinstance(e, BrokenPipeError) and _output_is_a_pipe():
            raise  # no file of the user's: the output's reader gone (main)
        where = f": {e.filename}" if e.filename else ""
        what = e.strerror or _message(e)
        if isinstance(e, (FileExistsError, NotADirectoryError)) and e.filename and os.path.isfile(e.filename):
            what = "a file is where a folder was to be made; give a folder's path"  # mkdir of a file's path
        elif isinstance(e, NotADirectoryError) and e.filename and (blocking := next(
                (p for p in Path(e.filename).parents if os.path.isfile(p)), None)) is not None:
            what = f"'{blocking}' is a file, so it cannot hold a folder; give a folder's path"
        print(f"{command}: error: {printable(what + where)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        trained = sys.modules.get("coatnet.train")  # imported by the commands that train
        if trained is not None and isinstance(e, trained.ProcessLost):  # not bad input: status 1
            print(f"{command}: error: {printable(str(e))}", file=sys.stderr)
            return 1
        if not out_of_memory(e):
            raise
        asked = _ASKED.search(str(e))
        size = (f" (one tensor of {_bytes(int(asked[1]))})" if asked and asked[1] else
                f" (one tensor of {asked[2]})" if asked else "")
        print(f"{command}: error: out of memory{size}; give a smaller --batch-size or --img-size, or "
              f"use a machine with more memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"{command}: interrupted{'; ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = format_warning
