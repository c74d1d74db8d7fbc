"""``coatnet study layouts``: the controlled study of Section 2.2 (Figure 1), rerun on your data.

Five layouts of comparable size (VIT_REL, C-C-C-C, C-C-C-T, C-C-T-T, C-T-T-T) train with the same
budget and no regularisation or augmentation (no stochastic depth, Mixup, label smoothing, weight
decay or RandAugment), over several seeds. The paper reads two things off the curves: how well a
layout generalises (eval accuracy for its training loss, in the low-data regime) and how much it
can fit (training loss on a large data set).

Each run is an ordinary ``coatnet train`` run in ``OUTPUT_DIR/runs/LAYOUT-seedN``. A finished run
(its ``summary.json`` written) is never redone, and a run cut off half way resumes from its last
checkpoint, so an interrupted study loses nothing. After each run, ``study.json``, ``study.md``
and ``study.png`` are rewritten from every finished run.

Sizes. At ``--size paper`` the layouts are the registered ``vit_rel``, ``c_c_c_c``, ... at
CoAtNet-0's size (24-27M parameters). At ``--size small`` (the default for images of 64 pixels or
less, e.g. the embedded digits) each has every width divided by 4, head size 16 and its stem stride
halved, so a 32x32 image goes as deep as a 64x64 one would: 1.5M-1.7M parameters, within 10% of
each other.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tqdm import tqdm

from .checkpoint import LOCK, atomic_write
from .complexity import count_flops, count_parameters
from .models import CoAtNet, CoAtNetConfig, create_model
from .plots import save_figure
from .text import json_text
from .train import RECIPES, TrainConfig, same_setting, setup_distributed, train

LAYOUTS = ("vit_rel", "c_c_c_c", "c_c_c_t", "c_c_t_t", "c_t_t_t")
LABELS = {"vit_rel": "VIT_REL", "c_c_c_c": "C-C-C-C", "c_c_c_t": "C-C-C-T", "c_c_t_t": "C-C-T-T",
          "c_t_t_t": "C-T-T-T"}
# Section 2.2: generalisation on ImageNet-1K (300 epochs) and capacity on JFT.
PAPER_GENERALISATION = "C-C-C-C ~ C-C-C-T >= C-C-T-T > C-T-T-T >> VIT_REL"
PAPER_CAPACITY = "C-C-T-T ~ C-T-T-T > VIT_REL > C-C-C-T > C-C-C-C"
# What the study switches off, over whatever recipe it starts from (Section 2.2: "without any
# regularisation or augmentation"): the random crop and flip too, the training images prepared as for evaluation.
NO_REGULARISATION = dict(drop_path=0.0, label_smoothing=0.0, weight_decay=0.0, mixup=0.0, cutmix=0.0,
                         randaugment=None, augment=False, ema=0.0)


def small_layout(name: str) -> dict:
    """The config overrides that shrink a registered layout for small images (module docstring)."""
    with torch.device("meta"):
        config = create_model(name).config
    hidden = config.head.hidden_size
    return dict(stem=dict(channels=config.stem.channels // 4, stride=config.stem.stride // 2),
                transformer=dict(head_size=16), head=dict(hidden_size=hidden // 4 if hidden else None),
                stages=[dict(block=s.block, depth=s.depth, channels=s.channels // 4, stride=s.stride)
                        for s in config.stages])


def study_settings(args: argparse.Namespace) -> dict:
    """The training settings every run of the study shares."""
    # The digits recipe on the embedded data, else the paper's ImageNet-1K one (Table 10).
    data = args.data.lower()  # as training names data sets
    base = dataclasses.asdict(RECIPES["digits" if data == "digits" else "imagenet1k-pretrain"])
    given = dict(data=data, data_dir=args.data_dir, img_size=args.img_size, epochs=args.epochs,
                 batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, device=args.device)
    settings = base | {k: v for k, v in given.items() if v is not None} | NO_REGULARISATION
    if settings["data_dir"] is not None and os.path.exists(settings["data_dir"]):
        # recorded absolute, as training records it: the same flags from another folder name other data
        settings["data_dir"] = os.path.abspath(settings["data_dir"])
    if data == "digits" and args.epochs is None:
        settings["epochs"] = 12  # the whole default study (15 runs) fits in 30 minutes on 2 CPU cores
    if settings["lr"] < settings["min_lr"]:  # the study has no --min-lr to lower it with
        raise ValueError(f"--lr {settings['lr']:g} is below the recipe's minimum rate {settings['min_lr']:g}, where "
                         f"its schedule ends; give --lr of at least {settings['min_lr']:g}")
    size = args.size or ("small" if settings["img_size"] <= 64 else "paper")
    settings.pop("model")
    return dict(settings, size=size)


def _layout_names(text: str | None) -> list[str]:
    if text is None:
        return list(LAYOUTS)
    names = [n.strip().lower().replace("-", "_") for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown or not names:
        raise ValueError(f"unknown layout(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(LAYOUTS)}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # its one run would count as two seeds
        raise ValueError(f"--layouts names {', '.join(LABELS[n] for n in twice)} more than once; give each layout "
                         f"once (--seeds sets the runs of each)")
    return names


def run_config(name: str, seed: int, settings: dict) -> TrainConfig:
    """The training settings of one layout's run at one seed."""
    overrides = small_layout(name) if settings["size"] == "small" else None
    return dataclasses.replace(TrainConfig(**{k: v for k, v in settings.items() if k != "size"}),
                               model=name, model_config=overrides, seed=seed)


def run_one(name: str, seed: int, settings: dict, run_dir: Path, notes: set[str] | None = None) -> dict:
    """Train (or finish, or read back) one layout at one seed; returns its record for study.json.
    The notes and warnings training logs are shown on stderr too, each text once (``notes``: those
    shown already; None: none shown, as by the processes of a torchrun study but the first)."""
    config = run_config(name, seed, settings)
    if (run_dir / "last").exists():
        _check_same_run(run_dir, config)
    if not (run_dir / "summary.json").exists():
        resume = True if (run_dir / "last").exists() else None
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path = run_dir / "train.log"
        logged = log_path.stat().st_size if log_path.exists() else 0
        refused = False
        try:
            with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                train(config, output_dir=run_dir, resume=resume)
        except KeyboardInterrupt:  # training's own hint (--resume this run) would leave the study behind
            raise KeyboardInterrupt("the same command continues the study from its runs' last checkpoints") from None
        except ValueError:
            refused = True
            # Refused by training before it began (settings it turns down; at most a note logged): the
            # folder is left as it was, not holding a log and a lock that look like a run begun. The
            # refusal itself reaches the user as the study's error.
            if created and {p.name for p in run_dir.iterdir()} <= {"train.log", LOCK}:
                shutil.rmtree(run_dir, ignore_errors=True)  # every process of a torchrun study may try
            raise
        finally:  # a note (a warm-up longer than the run, say) changes what the study's figures mean
            if notes is not None and not refused:
                _show_notes(log_path, logged, run_dir.name, notes)
    summary = _read_json(run_dir / "summary.json", "delete it (it is rebuilt from the run's checkpoint) and rerun",
                         numbers=("train_loss", "top1", "wall_seconds"))
    # An evaluation whose loss diverged is recorded as null (json_text): the run is not damaged for it
    history = _read_json(run_dir / "metrics.jsonl", DAMAGED_RUN, lines=True,
                         numbers=("epoch", "train_loss", "eval_loss", "top1"), or_null=("eval_loss",))
    meta = _read_json(run_dir / "last" / "config.json", DAMAGED_RUN)
    try:
        with torch.device("meta"):  # the network exactly as trained, counted without its weights
            model = CoAtNet(CoAtNetConfig.from_dict(meta["config"])).eval()
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{run_dir / 'last' / 'config.json'} holds no usable model config ({e}); "
                         f"{DAMAGED_RUN}") from None
    return dict(layout=LABELS[name], model=name, seed=seed, params=count_parameters(model),
                flops=count_flops(model, settings["img_size"]),
                train_loss=summary["train_loss"], top1=summary["top1"], wall_seconds=summary["wall_seconds"],
                curves=dict(epoch=[h["epoch"] for h in history], train_loss=[h["train_loss"] for h in history],
                            eval_loss=[h["eval_loss"] for h in history], top1=[h["top1"] for h in history]))


def _show_notes(log_path: Path, offset: int, run: str, shown: set[str]) -> None:
    """The notes and warnings in ``log_path`` past ``offset`` on stderr, those not in ``shown`` (and added to it)."""
    with contextlib.suppress(OSError), open(log_path, "rb") as log:
        log.seek(offset)
        for line in log.read().decode(errors="replace").splitlines():
            if (line.startswith("note: ") or ": warning: " in line) and line not in shown:
                shown.add(line)
                tqdm.write(f"{run}: {line}", file=sys.stderr)  # above the progress bar, if one is shown


def _check_same_run(run_dir: Path, config: TrainConfig) -> None:
    """Refuse a run already in the study's folder that was trained (or begun) with other settings
    than this study's: picked up, it would be reported under settings it never had."""
    recorded = _read_json(run_dir / "last" / "config.json", DAMAGED_RUN).get("train_config") or {}
    wanted = json.loads(json_text(dataclasses.asdict(config)))  # as recorded: tuples become lists
    # A setting a run of an earlier version did not record had its default then: not checked.
    changed = sorted(k for k in wanted
                     if k != "device" and k in recorded and not same_setting(k, wanted[k], recorded[k]))
    if changed:
        raise ValueError(f"{run_dir} was trained with other settings ({', '.join(changed)}) than this study's; "
                         f"rerun with its flags to finish that study, or choose another --output-dir")


DAMAGED_RUN = "the run is damaged: delete its folder to train it again"


def _read_json(path: Path, fix: str, lines: bool = False, numbers: tuple[str, ...] = (),
               or_null: tuple[str, ...] = ()):
    """A file the study or its runs wrote: a JSON object, or (``lines``) one per line, each with a
    number under every key of ``numbers`` (or null, one that was not finite, for those also in
    ``or_null``). A damaged one is one line that says what to do (``fix``)."""
    try:
        text = path.read_text()
        data = [json.loads(line) for line in text.splitlines() if line.strip()] if lines else json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} cannot be read ({e}); {fix}") from None
    for item in data if lines else [data]:
        if not isinstance(item, dict):
            raise ValueError(f"{path} holds {type(item).__name__} where a JSON object belongs; {fix}")
        bad = [k for k in numbers if not (_number(item.get(k)) or k in or_null and k in item and item[k] is None)]
        if bad:
            raise ValueError(f"{path} has no number under {', '.join(bad)}; {fix}")
    return data


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finished_runs(out: Path) -> list[tuple[str, int]]:
    """(layout, seed) of every finished run in the study's folder."""
    found = []
    for run_dir in sorted((out / "runs").glob("*-seed*")):
        name, _, seed = run_dir.name.rpartition("-seed")
        if name in LAYOUTS and seed.isdigit() and (run_dir / "summary.json").exists():
            found.append((name, int(seed)))
    return found


def run_layout_study(args: argparse.Namespace) -> int:
    names = _layout_names(args.layouts)
    settings = study_settings(args)
    out = Path(args.output_dir)
    previous = out / "study.json"
    if previous.exists():
        rebuilt = "delete it (it is rebuilt from the runs) and rerun"
        before = _read_json(previous, rebuilt)
        if not isinstance(before, dict) or not isinstance(before.get("settings"), dict):
            raise ValueError(f"{previous} holds no study settings; {rebuilt}")
        before = before["settings"]
        # As for each run: the device may change, and a setting an earlier version did not record had
        # its default then.
        changed = sorted(k for k in settings
                         if k != "device" and k in before and not same_setting(k, settings[k], before[k]))
        if changed:
            raise ValueError(f"{out} holds a study run with other settings ({', '.join(changed)}); "
                             f"rerun with the same flags to finish it, or choose another --output-dir")
    else:  # study.json deleted (as a damaged one's message says), or files of the user's: ours only are replaced
        md, png = out / "study.md", out / "study.png"
        if os.path.lexists(md) and not (md.is_file() and md.read_text(errors="replace").startswith(MARKDOWN_START)):
            raise ValueError(f"{out} holds a study.md that no study wrote, which this study would overwrite; move it "
                             f"or choose another --output-dir")
        if os.path.lexists(png) and not md.is_file():
            raise ValueError(f"{out} holds a study.png but no study.md or study.json of a study, which this study would "
                             f"overwrite; move it or choose another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    # Under torchrun every process takes part in each training run (one DDP job, one process group
    # for the whole study); only the first writes the study's files and shows progress.
    d = setup_distributed(settings["device"])
    main = d.main
    jobs = [(name, seed) for seed in range(args.seeds) for name in names]
    # Every run the folder holds already is checked before any is trained: one of other settings found
    # only after a new run had trained would leave that run in the study's folder, trained on them.
    for name, seed in dict.fromkeys([*jobs, *_finished_runs(out)]):
        if (out / "runs" / f"{name}-seed{seed}" / "last").exists():
            _check_same_run(out / "runs" / f"{name}-seed{seed}", run_config(name, seed, settings))
    # Runs finished by earlier invocations (other --layouts or --seeds) stay in the study's files.
    notes: set[str] | None = set() if main else None
    records = [run_one(name, seed, settings, out / "runs" / f"{name}-seed{seed}")
               for name, seed in _finished_runs(out) if (name, seed) not in jobs]
    show = main and sys.stderr.isatty()  # a bar, not hundreds of lines in a log file
    with tqdm(jobs, desc="layout study", unit="run", dynamic_ncols=True, disable=not show) as bar:
        for name, seed in bar:
            bar.set_postfix_str(f"{LABELS[name]} seed {seed}")
            records.append(run_one(name, seed, settings, out / "runs" / f"{name}-seed{seed}", notes))
            records.sort(key=lambda r: (r["seed"], LAYOUTS.index(r["model"])))
            if main:
                write_study(out, settings, records)
    if main:
        print(f"wrote {out / 'study.json'}, {out / 'study.md'} and {out / 'study.png'}")
        print((out / "study.md").read_text())
    if d.owns_group:
        torch.distributed.destroy_process_group()
    return 0


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def _mean_std_range(values: list[float]) -> dict:
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                min=min(values), max=max(values), n=len(values))


def summarise(records: list[dict]) -> dict:
    by_layout: dict[str, list[dict]] = {}
    for r in records:
        by_layout.setdefault(r["layout"], []).append(r)
    return {layout: dict(params=rs[0]["params"], flops=rs[0]["flops"], top1=_mean_std_range([r["top1"] for r in rs]),
                         train_loss=_mean_std_range([r["train_loss"] for r in rs]))
            for layout, rs in by_layout.items()}


def write_study(out: Path, settings: dict, records: list[dict]) -> None:
    summary = summarise(records)
    by_top1 = sorted(summary, key=lambda k: -summary[k]["top1"]["mean"])
    by_loss = sorted(summary, key=lambda k: summary[k]["train_loss"]["mean"])
    study = dict(settings=settings, paper=dict(generalisation=PAPER_GENERALISATION, capacity=PAPER_CAPACITY),
                 ordering=dict(eval_top1=by_top1, train_loss=by_loss), summary=summary, runs=records)
    atomic_write(out / "study.json", json_text(study, indent=2))
    atomic_write(out / "study.md", study_markdown(settings, summary, by_top1, by_loss))
    plot_study(records, out / "study.png")


MARKDOWN_START = "Layout study on "  # how study.md begins: a study's own, replaced by the next


def study_markdown(settings: dict, summary: dict, by_top1: list[str], by_loss: list[str]) -> str:
    counts = {s["top1"]["n"] for s in summary.values()}
    # Layouts of other --seeds (earlier invocations' runs stay in the study): each row says its own.
    uneven = len(counts) > 1
    seeds = f"{min(counts)} to {max(counts)} seeds, as each row says" if uneven else f"{max(counts)} seed(s)"
    lines = [f"{MARKDOWN_START}{settings['data']} at {settings['img_size']} px ({settings['size']} layouts), "
             f"{settings['epochs']} epochs, batch {settings['batch_size']}, lr {settings['lr']}, no regularisation "
             f"or augmentation; {seeds}."
             + (" Mean ± standard deviation over seeds [min, max]." if max(counts) > 1 else ""), "",
             "| layout |" + " seeds |" * uneven + " params | FLOPs | eval top-1 (%) | final train loss |",
             "|---|" + "---:|" * uneven + "---:|---:|---:|---:|"]
    for layout in by_top1:
        s = summary[layout]
        t, l = s["top1"], s["train_loss"]
        n = f" {t['n']} |" if uneven else ""
        lines.append(f"| {layout} |{n} {s['params'] / 1e6:.2f}M | {s['flops'] / 1e6:.1f}M | "
                     f"{_over_seeds(t, 2)} | {_over_seeds(l, 4)} |")
    lines += ["", "| ordering | this study | the paper (Section 2.2) |", "|---|---|---|",
              f"| by eval top-1 (generalisation) | {' > '.join(by_top1)} | {PAPER_GENERALISATION} |",
              f"| by train loss, lowest first (capacity) | {' > '.join(by_loss)} | {PAPER_CAPACITY} (on JFT) |", ""]
    return "\n".join(lines)


def _over_seeds(s: dict, digits: int) -> str:
    """A figure over seeds: its mean ± standard deviation [min, max]; of one seed, its run's alone (a spread
    of 0.00 would read as seeds that agreed)."""
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def plot_study(records: list[dict], path: Path) -> None:
    """Figure 1's two panels: training loss and eval accuracy per layout over training (mean over
    seeds, the band spans min to max)."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    layouts = [LABELS[n] for n in LAYOUTS if any(r["layout"] == LABELS[n] for r in records)]
    for layout in layouts:
        runs = [r["curves"] for r in records if r["layout"] == layout]
        epochs = runs[0]["epoch"]
        for ax, key in ((loss_ax, "train_loss"), (acc_ax, "top1")):
            per_epoch = list(zip(*(c[key] for c in runs)))
            line, = ax.plot(epochs, [statistics.fmean(v) for v in per_epoch], marker="o", ms=3, label=layout)
            ax.fill_between(epochs, [min(v) for v in per_epoch], [max(v) for v in per_epoch],
                            color=line.get_color(), alpha=0.15)
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="training loss", yscale="log")
    acc_ax.set(xlabel="epoch", ylabel="eval top-1 (%)", title="eval accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs, not 1.25; one too
    save_figure(fig, path)

