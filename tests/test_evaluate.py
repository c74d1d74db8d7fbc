"""`coatnet eval`, `coatnet predict`, the evaluation pass and the figures."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import coatnet
import coatnet.evaluate
import coatnet.plots
from coatnet.cli import main
from coatnet.evaluate import evaluate
from coatnet.plots import plot_confusion, plot_curves
from conftest import strict_json
from test_data import make_tree, no_hang  # noqa: F401 (a fixture)

PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    assert main(["train", "--img-size", "16", "--epochs", "2", "--batch-size", "128", "--warmup-steps", "3",
                 "--output-dir", str(out)]) == 0
    return out


def test_no_use_ema_evaluates_the_weights_themselves(run_dir, tmp_path, capsys):
    """`eval --no-use-ema` of a run with an EMA evaluates its weights themselves, as a copy of the checkpoint
    without its EMA evaluates (timm's validate.py's flag); the default is the EMA, as the run evaluated.
    The two reports go to two folders, eval.json saying which; a checkpoint without an EMA refuses the flag."""
    out = tmp_path / "run"
    assert main(["train", "--img-size", "16", "--epochs", "1", "--batch-size", "128", "--warmup-steps", "3", "--lr",
                 "0.02", "--ema", "0.5", "--output-dir", str(out)]) == 0
    recorded = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    shutil.copytree(out / "last", tmp_path / "raw", symlinks=False)
    (tmp_path / "raw" / "ema.safetensors").unlink()
    capsys.readouterr()
    results = {}
    for name, argv in (("ema", [str(out / "last")]), ("no-ema", [str(out / "last"), "--no-use-ema"]),
                       ("copy", [str(tmp_path / "raw")])):
        assert main(["eval", "--checkpoint", *argv, "--json"]) == 0
        results[name] = json.loads(capsys.readouterr().out)
    assert results["ema"]["loss"] == pytest.approx(recorded["eval_loss"], rel=1e-6)
    assert results["no-ema"]["loss"] == results["copy"]["loss"] != results["ema"]["loss"]
    reports = {p.name: json.loads((p / "eval.json").read_text())["ema"] for p in out.glob("eval-*")}
    ckpt = (out / "last").resolve().name
    assert reports == {f"eval-{ckpt}-digits": True, f"eval-{ckpt}-digits-2": False}
    for flag in ("--no-use-ema", "--use-ema"):
        assert main(["eval", "--checkpoint", str(run_dir / "last"), flag]) == 2
        err = capsys.readouterr().err
        assert err.endswith(f"error: {flag}: {(run_dir / 'last').resolve()} holds no EMA of its weights (a run's "
                            f"checkpoint with --ema does): drop {flag}\n") and err.count("\n") == 1, err


class FixedLogits(nn.Module):
    """Returns the logits stored with each input (the input's first column is its row index)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x[:, 0].long()]


def test_evaluate_counts_top1_top5_and_confusion():
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5, 0],   # true 0: top-1 right
                           [0.0, 1, 2, 3, 4, 5, 9],   # true 1: 1 is 6th, outside the top-5
                           [0.0, 1, 9, 3, 4, 5, 6],   # true 3: wrong, but inside the top-5
                           [0.0, 9, 2, 3, 4, 5, 6]])  # true 1: top-1 right
    labels = torch.tensor([0, 1, 3, 1])
    loader = DataLoader(TensorDataset(torch.arange(4.0)[:, None], labels), batch_size=3)
    r = evaluate(FixedLogits(logits), loader, torch.device("cpu"), num_classes=7)
    assert r["count"] == 4 and r["top1"] == 50.0 and r["top5"] == 75.0
    assert r["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    expected = torch.zeros(7, 7, dtype=torch.int64)
    for t, p in ((0, 0), (1, 6), (3, 2), (1, 1)):
        expected[t, p] += 1
    assert torch.equal(r["confusion"], expected)


def test_eval_matches_training_and_writes_figures(run_dir, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run_dir / "last"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["count"] == 360 and result["top1"] == pytest.approx(last["top1"])
    assert result["top5"] == pytest.approx(last["top5"])
    out = run_dir / "eval-ckpt-00000022-digits"
    report = json.loads((out / "eval.json").read_text())
    assert np.array(report["confusion_matrix"]).sum() == 360
    assert np.trace(np.array(report["confusion_matrix"])) == round(3.6 * report["top1"])
    assert (out / "confusion_matrix.png").read_bytes()[:4] == PNG


def digit_files(folder, sizes=((37, 50), (8, 8), (300, 120))):
    """PNGs of the first digits of the embedded set, one per size."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    files = []
    for i, size in enumerate(sizes):
        img = Image.fromarray(np.uint8(digits.images[i] * 255 / 16)).resize(size).convert("RGB")
        files.append(folder / f"digit{i}.png")
        img.save(files[-1])
    return files


def test_predict_top5_on_images_of_any_size(run_dir, tmp_path, capsys):
    files = digit_files(tmp_path)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run_dir), *map(str, files), "--json"]) == 0
    output = json.loads(capsys.readouterr().out)
    results = output["predictions"]
    assert [r["image"] for r in results] == list(map(str, files)) and output["errors"] == []
    for r in results:
        probs = [t["probability"] for t in r["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert {t["label"] for t in r["top"]} <= {str(d) for d in range(10)}
    assert main(["predict", "--checkpoint", str(run_dir), str(files[0]), "--top-k", "3"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == str(files[0]) and len(text) == 4 and text[1].strip().startswith("1. ")
    # each line: rank, label and the probability in percent, as --json gives them
    assert text[1:] == [f"  {rank}. {t['label']}  {100 * t['probability']:6.2f}%"
                        for rank, t in enumerate(results[0]["top"][:3], 1)]
    # --top-k beyond the classes: all of them, not torch's "selected index k out of range"
    assert main(["predict", "--checkpoint", str(run_dir), str(files[0]), "--top-k", "20", "--json"]) == 0
    (r,) = json.loads(capsys.readouterr().out)["predictions"]
    assert sorted(t["label"] for t in r["top"]) == [str(d) for d in range(10)]


def test_predict_text_keeps_its_columns_for_long_labels(run_dir, tmp_path, capsys):
    """The probabilities line up however long the labels (before: padded to 20, a longer label pushed its
    figure out of the column), and however many ranks (10. under 9.)."""
    names = [f"class {i}" if i % 2 else f"a rather long class name number {i}" for i in range(10)]
    ckpt = copy_checkpoint(run_dir, tmp_path / "ckpt", classes=names)
    files = digit_files(tmp_path, sizes=((8, 8), (8, 8)))
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(ckpt), *map(str, files), "--top-k", "10"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(lines) == 20 and len({line.index("%") for line in lines}) == 1, lines
    assert len({line.index(".") for line in lines}) == 1 and lines[9].startswith("  10. "), lines


def test_predict_computes_as_the_run_evaluated(run_dir, tmp_path, capsys, monkeypatch):
    """After --amp, each epoch's evaluation (and `best`) ran under bfloat16 autocast: predict does too,
    as eval does, so its classes are the run's; --no-amp gives float32. A float32 run's default is float32.
    On a CPU that emulates bfloat16 (here, as one without AVX512-BF16 or AMX says), each bfloat16 pass
    says so and how to avoid it."""
    amp_run = tmp_path / "amp"
    assert main(["train", "--img-size", "16", "--epochs", "1", "--batch-size", "128", "--warmup-steps", "3",
                 "--amp", "--output-dir", str(amp_run)]) == 0
    image = str(digit_files(tmp_path)[0])
    cpu = dict(torch.cpu.get_capabilities(), architecture="x86_64", avx512_bf16=False, amx_bf16=False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: cpu)
    notes = []

    def probabilities(run, *flags):
        capsys.readouterr()
        assert main(["predict", "--checkpoint", str(run), image, "--json", *flags]) == 0
        out, err = capsys.readouterr()
        notes.append("no native bfloat16" in err and "--no-amp computes in float32" in err)
        return [t["probability"] for t in json.loads(out)["predictions"][0]["top"]]
    assert probabilities(amp_run) == probabilities(amp_run, "--amp") != probabilities(amp_run, "--no-amp")
    assert probabilities(run_dir) == probabilities(run_dir, "--no-amp") != probabilities(run_dir, "--amp")
    assert notes == [True, True, False, False, False, True]


def one_line_error(capsys, argv, *fragments):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err


def test_predict_bad_input(run_dir, tmp_path, capsys):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    one_line_error(capsys, ["predict", "--checkpoint", str(run_dir), str(not_image)], "notes.png", "not an image")
    one_line_error(capsys, ["predict", "--checkpoint", str(run_dir), str(tmp_path / "missing.png")],
                   "missing.png", "no such file")
    one_line_error(capsys, ["predict", "--checkpoint", str(tmp_path / "nope"), str(not_image)], "does not exist")
    image = digit_files(tmp_path, sizes=((8, 8),))[0]  # a bad --device fails before anything is read
    one_line_error(capsys, ["predict", "--checkpoint", str(run_dir), str(image), "--device", "foo"],
                   "--device foo is not a device")


def test_predict_says_a_link_in_a_loop_is_one(run_dir, tmp_path, capsys):
    """A link that leads back to itself (or through another link to itself) is there: it is named as the loop it
    is, as a data tree's is (before: "no such file; check the path", of a file that the folder shows)."""
    (tmp_path / "loop.png").symlink_to("loop.png")
    (tmp_path / "a.png").symlink_to("b.png")
    (tmp_path / "b.png").symlink_to("a.png")
    for name in ("loop.png", "a.png"):
        one_line_error(capsys, ["predict", "--checkpoint", str(run_dir), str(tmp_path / name)],
                       f"'{tmp_path / name}': too many levels of symbolic links")


def test_eval_and_predict_under_torchrun_are_refused(run_dir, capsys, monkeypatch):
    """Each process would evaluate everything and write (or print) the same results."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for command in (["eval"], ["predict", "x.png"]):
        one_line_error(capsys, [*command, "--checkpoint", str(run_dir)],
                       f"coatnet {command[0]} runs in one process: run it without torchrun")


def test_eval_bad_input(run_dir, tmp_path, capsys):
    one_line_error(capsys, ["eval", "--checkpoint", str(tmp_path)], "not a coatnet checkpoint")
    (tmp_path / ".lock").write_text("")  # a run in its first epoch, or killed before its first save
    for command in (["eval"], ["predict", "x.png"]):  # before: "not a coatnet checkpoint"
        one_line_error(capsys, [*command, "--checkpoint", str(tmp_path)], f"'{tmp_path}' holds no checkpoint yet: its "
                       f"run is in its first epoch, or stopped before its first save; give it once the run has saved one")
    one_line_error(capsys, ["eval", "--checkpoint", str(run_dir), "--device", "foo"], "--device foo is not a device")
    one_line_error(capsys, ["eval", "--checkpoint", str(run_dir), "--img-size", "20"], "multiple")
    one_line_error(capsys, ["eval", "--checkpoint", str(run_dir), "--data", "cifar10", "--data-dir",
                            str(tmp_path / "nothing")], "nothing")
    make_tree(tmp_path / "pets")
    one_line_error(capsys, ["eval", "--checkpoint", str(run_dir), "--data", "imagefolder", "--data-dir",
                            str(tmp_path / "pets")], "the checkpoint's 10 classes differ from imagefolder's 3 classes "
                                                     "(only the checkpoint's: ['0', '1', '2', '3', '4'], only the data's: "
                                                     "['bird', 'cat', 'dog'])")
    # Files of the user's where the report goes are kept; an evaluation's own are replaced.
    for name, content in (("eval.json", b'{"mine": 1}'), ("confusion_matrix.png", b"my plot")):
        mine = tmp_path / f"mine-{name}"
        mine.mkdir()
        (mine / name).write_bytes(content)
        one_line_error(capsys, ["eval", "--checkpoint", str(run_dir), "--output-dir", str(mine)],
                       f"{mine} holds an eval.json or confusion_matrix.png that no evaluation wrote")
        assert [p.name for p in mine.iterdir()] == [name] and (mine / name).read_bytes() == content
    for _ in range(2):
        assert main(["eval", "--checkpoint", str(run_dir), "--output-dir", str(tmp_path / "ours")]) == 0
    one_line_error(capsys, ["eval", "--checkpoint", str(run_dir), "--output-dir", str(tmp_path / "ours" / "eval.json")],
                   "a file is where a folder was to be made; give a folder's path")
    # a folder under a file: the file named (before: "Not a directory", of the folder)
    one_line_error(capsys, ["eval", "--checkpoint", str(run_dir), "--output-dir",
                            str(tmp_path / "ours" / "eval.json" / "sub")],
                   f"'{tmp_path / 'ours' / 'eval.json'}' is a file, so it cannot hold a folder; give a folder's path: "
                   f"{tmp_path / 'ours' / 'eval.json' / 'sub'}")


def test_an_evaluation_of_other_settings_does_not_replace_anothers_report(tmp_path, capsys):
    """The report's folder beside the checkpoint is the evaluation's of these settings: one of another data
    folder, size or preprocessing goes to the next one (-2, -3, ...), a rerun replaces its own (before: every
    evaluation of the checkpoint on an imagefolder replaced the last one's eval.json, whatever its data)."""
    torch.manual_seed(0)
    folder = coatnet.create_model("coatnet_pico", num_classes=3, img_size=16).save_pretrained(tmp_path / "model")
    trees = [make_tree(tmp_path / name, per_class=n) for name, n in (("a", 1), ("b", 2))]
    first = tmp_path / "eval-model-imagefolder"
    runs = [(trees[0], []), (trees[1], []), (trees[0], []), (trees[0], ["--img-size", "32"]),
            (trees[0], ["--crop-pct", "0.8"]), (trees[1], [])]
    for (tree, flags), folder_name in zip(runs, ["", "-2", "", "-3", "-4", "-2"], strict=True):
        assert main(["eval", "--checkpoint", str(folder), "--data", "imagefolder", "--data-dir", str(tree),
                     *flags]) == 0
        out = first.with_name(first.name + folder_name)
        assert f"wrote {out / 'eval.json'}" in capsys.readouterr().out
        report = json.loads((out / "eval.json").read_text())
        assert (report["data_dir"], report["count"]) == (str(tree), 3 * (1 + (tree == trees[1])))
    assert sorted(p.name for p in tmp_path.glob("eval-*")) == [first.name + s for s in ("", "-2", "-3", "-4")]
    assert json.loads((first.with_name(first.name + "-3") / "eval.json").read_text())["img_size"] == 32
    assert json.loads((first.with_name(first.name + "-4") / "eval.json").read_text())["preprocessing"][
        "crop_pct"] == 0.8


def test_a_rerun_naming_the_checkpoint_another_way_replaces_its_own_report(tmp_path, capsys, monkeypatch):
    """The same evaluation, its checkpoint named relative then absolute: one report, replaced (before: the
    second went to -2, the path as typed read as another setting)."""
    torch.manual_seed(0)
    coatnet.create_model("coatnet_pico", num_classes=3, img_size=16).save_pretrained(tmp_path / "model")
    tree = make_tree(tmp_path / "a", per_class=1)
    monkeypatch.chdir(tmp_path)
    for checkpoint in ("model", str(tmp_path / "model")):
        assert main(["eval", "--checkpoint", checkpoint, "--data", "imagefolder", "--data-dir", str(tree)]) == 0
        assert f"wrote {tmp_path / 'eval-model-imagefolder' / 'eval.json'}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.glob("eval-*")] == ["eval-model-imagefolder"]


def test_predict_names_a_file_whose_name_is_not_utf8_as_valid_utf8(run_dir, tmp_path, capsys):
    bad = os.path.join(str(tmp_path).encode(), b"bad\xfe.png")
    with open(bad, "wb") as f:
        f.write(b"not an image")
    assert main(["predict", "--checkpoint", str(run_dir), os.fsdecode(bad), "--json"]) == 2
    (error,) = json.loads(capsys.readouterr().out)["errors"]
    assert error["image"].endswith("bad\\xfe.png") and f"'{error['image']}'" in error["message"]
    error["message"].encode("utf-8")  # no lone surrogate, which strict JSON readers refuse


def test_predict_runs_in_batches_of_batch_size(run_dir, tmp_path, capsys, monkeypatch):
    """Memory is bounded by --batch-size, not the number of files; the results are those of one batch."""
    files = [str(f) for f in digit_files(tmp_path, sizes=((8, 8), (20, 30), (37, 50), (9, 9), (40, 40)))]
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    files.insert(2, str(bad))
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run_dir), *files, "--json"]) == 1
    whole = json.loads(capsys.readouterr().out)
    batches = []
    real = coatnet.evaluate.model_from_folder

    def recording(folder):
        model = real(folder)
        model.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
        return model

    monkeypatch.setattr(coatnet.evaluate, "model_from_folder", recording)
    assert main(["predict", "--checkpoint", str(run_dir), *files, "--json", "--batch-size", "2"]) == 1
    batched = json.loads(capsys.readouterr().out)
    assert batches == [2, 1, 2]  # 6 files; the unreadable third leaves its batch one short
    assert batched["errors"] == whole["errors"] and len(batched["predictions"]) == 5
    for a, b in zip(batched["predictions"], whole["predictions"]):
        assert a["image"] == b["image"] and [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        assert [t["probability"] for t in a["top"]] == pytest.approx([t["probability"] for t in b["top"]], abs=1e-5)


def test_predict_reads_the_images_of_a_folder(run_dir, tmp_path, capsys):
    """A folder stands for its image files, sorted; the other files are counted in a warning (a
    hidden one goes without a word); a folder without any is one error line, and so is a link to an
    image that is gone."""
    photos = tmp_path / "photos"
    photos.mkdir()
    files = digit_files(photos, sizes=((8, 8), (20, 30)))
    (photos / "gone.png").symlink_to(tmp_path / "moved.png")
    (photos / "notes.txt").write_text("not an image")
    (photos / "clip.gif").write_bytes(b"GIF89a")
    (photos / ".DS_Store").write_bytes(b"")
    (photos / "sub").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "sorted" / "cats").mkdir(parents=True)
    capsys.readouterr()
    with pytest.warns(UserWarning) as warned:
        assert main(["predict", "--checkpoint", str(run_dir), str(photos), str(tmp_path / "empty"),
                     str(tmp_path / "sorted"), "--json"]) == 1
    assert [str(w.message) for w in warned] == [f"2 files in '{photos}' not read, not named as images (.gif x1, .txt "
                                                f"x1); images must end in one of .jpg, .jpeg, .png, .ppm, .bmp, .pgm, "
                                                f".tif, .tiff, .webp"]
    output = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in output["predictions"]] == sorted(map(str, files))
    assert [e["message"] for e in output["errors"]] == [f"'{tmp_path / 'empty'}' is a folder without image files "
                                                        f"(.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp)",
                                                        f"'{tmp_path / 'sorted'}' is a folder without image files "
                                                        f"(.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp) "
                                                        f"(its subfolders are not searched)",
                                                        f"cannot read image '{photos / 'gone.png'}': a link to "
                                                        f"'{tmp_path / 'moved.png'}', which is not there; fix or "
                                                        f"remove the link"]


def test_predict_says_which_subfolders_holding_images_it_did_not_search(run_dir, tmp_path, capsys):
    """A folder of photos with albums in it: its own images are classified, and the subfolders holding images
    (at any depth) are named in a warning (before: left out without a word); empty or hidden ones are not."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (image,) = digit_files(photos, sizes=((8, 8),))
    for album in ("2023/summer", "paris", ".thumbnails", "empty"):
        (photos / album).mkdir(parents=True)
    for album in ("2023/summer", "paris", ".thumbnails"):
        shutil.copy(image, photos / album / "a.png")
    capsys.readouterr()
    with pytest.warns(UserWarning) as warned:
        assert main(["predict", "--checkpoint", str(run_dir), str(photos), "--json"]) == 0
    assert [str(w.message) for w in warned] == [f"2 subfolders of '{photos}' holding images not searched (2023, "
                                                f"paris); give them too, e.g. '{photos / '2023'}'"]
    assert [r["image"] for r in json.loads(capsys.readouterr().out)["predictions"]] == [str(image)]


def test_plots_write_pngs(tmp_path):
    history = [dict(epoch=e, train_loss=2 / e, eval_loss=2.2 / e, train_top1=10 * e, top1=9 * e, top5=20 * e)
               for e in (1, 2, 3)]
    plot_curves(history, 10, tmp_path / "curves.png")
    plot_confusion(np.eye(12, dtype=int) * 5, [f"class {i}" for i in range(12)], tmp_path / "cm.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == PNG and (tmp_path / "cm.png").read_bytes()[:4] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png", "curves.png"]  # no temporary files left


@pytest.mark.parametrize("num_classes,curves", [(6, ["train top-1", "eval top-1", "eval top-5"]),
                                                 (5, ["train top-1", "eval top-1"])])
def test_top5_is_drawn_only_where_it_can_be_below_100(tmp_path, monkeypatch, num_classes, curves):
    drawn = []
    monkeypatch.setattr(coatnet.plots, "save_figure", lambda fig, path: drawn.append(fig))
    plot_curves([dict(epoch=1, train_loss=2.0, eval_loss=2.2, train_top1=10, top1=9, top5=100)], num_classes,
                tmp_path / "c.png")
    assert [line.get_label() for line in drawn[0].axes[1].get_lines()] == curves


def test_curves_draw_each_series_as_its_own_line(tmp_path, monkeypatch):
    """Losses beside accuracies, each curve from its own column of the history, against its epochs."""
    drawn = []
    monkeypatch.setattr(coatnet.plots, "save_figure", lambda fig, path: drawn.append(fig))
    history = [dict(epoch=e, train_loss=3.0 - e, eval_loss=2.5 - e / 2, train_top1=10 * e, top1=9 * e, top5=20 * e)
               for e in (1, 2)]
    plot_curves(history, 10, tmp_path / "c.png")
    loss, acc = drawn[0].axes[:2]
    assert [(line.get_label(), list(line.get_xdata()), list(line.get_ydata()))
            for line in loss.get_lines()] == [("train", [1, 2], [2.0, 1.0]), ("eval", [1, 2], [2.0, 1.5])]
    # training's targets named where they are not the labels (before: "smoothed, mixed" whatever the run)
    for kwargs, said in ((dict(smoothed=True), "train (its smoothed targets)"), (dict(mixed=True), "train (its mixed "
                         "targets)"), (dict(smoothed=True, mixed=True), "train (its smoothed, mixed targets)")):
        plot_curves(history, 10, tmp_path / "c.png", **kwargs)
        assert drawn[-1].axes[0].get_lines()[0].get_label() == said
    plot_curves(history[:1], 10, tmp_path / "c.png")  # one epoch: whole epochs still (before: 0.945, 0.96, ...)
    assert all(tick == int(tick) for ax in drawn[-1].axes[:2] for tick in ax.get_xticks())
    assert [list(line.get_ydata()) for line in acc.get_lines()] == [[10, 20], [9, 18], [20, 40]]


def test_confusion_matrix_rows_are_true_classes_and_counts_sit_in_their_cells(tmp_path, monkeypatch):
    """Row i, column j: true class i predicted as j, its count written there, white where the cell is dark."""
    figures = []
    monkeypatch.setattr(coatnet.plots, "save_figure", lambda fig, path, **_: figures.append(fig))
    matrix = np.array([[6, 1, 0], [0, 2, 4], [0, 0, 3]])
    plot_confusion(matrix, ["a", "b", "c"], tmp_path / "cm.png")
    ax = figures[0].axes[0]
    assert np.array_equal(ax.images[0].get_array(), matrix)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "true")
    cells = {(int(t.get_position()[1]), int(t.get_position()[0])): (t.get_text(), t.get_color()) for t in ax.texts}
    assert cells == {(0, 0): ("6", "white"), (0, 1): ("1", "black"), (1, 1): ("2", "black"), (1, 2): ("4", "white"),
                     (2, 2): ("3", "black")}


def full_disk(self, fname, *args, **kwargs):
    """Figure.savefig on a disk that fills part way through the PNG."""
    Path(fname).write_bytes(PNG + b" half")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_plot_that_cannot_be_written_leaves_nothing(run_dir, tmp_path, capsys, monkeypatch):
    """A figure whose write fails (a full disk, the folder made unwritable) removes its temporary file
    and keeps the figure there before; the error names the figure (before: `.curves.tmp.png` and
    `.confusion_matrix.tmp.png` left in the run's and the report's folders, the error naming them)."""
    history = [dict(epoch=1, train_loss=2.0, eval_loss=2.2, train_top1=10, top1=9, top5=20)]
    monkeypatch.setattr(Figure, "savefig", full_disk)
    for plot, args in ((plot_curves, [history, 10]), (plot_confusion, [np.eye(3, dtype=int), ["a", "b", "c"]])):
        folder = tmp_path / plot.__name__
        folder.mkdir()
        (folder / "figure.png").write_bytes(b"the old figure")
        with pytest.raises(OSError) as e:
            plot(*args, folder / "figure.png")
        assert os.listdir(folder) == ["figure.png"] and (folder / "figure.png").read_bytes() == b"the old figure"
        assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(folder / "figure.png"))
    out = tmp_path / "report"
    one_line_error(capsys, ["eval", "--checkpoint", str(run_dir / "last"), "--output-dir", str(out)],
                   f"coatnet eval: error: No space left on device: {out / 'confusion_matrix.png'}")
    assert os.listdir(out) == ["eval.json"]


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "PYTHONUNBUFFERED"])
def test_a_reader_that_stops_reading_ends_the_command_quietly(run_dir, tmp_path, buffered):
    """`coatnet predict --json ... | head -c 10`: the reader gone is no error of the user's. The command
    ends without a word, with status 141, as Unix tools ended by SIGPIPE do (before: "coatnet predict:
    error: Broken pipe", status 2). test_cli.py has results written only at the end."""
    image = digit_files(tmp_path, sizes=((16, 16),))[0]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | ({} if buffered else
                                                                              {"PYTHONUNBUFFERED": "1"})
    # ~400 KiB of results, more than a pipe holds (64 KiB): the command is still writing when the reader goes
    argv = [sys.executable, "-m", "coatnet", "predict", "--checkpoint", str(run_dir / "last"), "--top-k", "10",
            "--json", *[str(image)] * 500]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.read(10) == b'{\n  "predi'
        proc.stdout.close()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # nothing, where it ended
    assert (proc.returncode, err.decode()) == (141, "")


def test_a_loss_that_is_not_finite_is_null_in_eval_json_and_the_json_output(run_dir, tmp_path, capsys,
                                                                             monkeypatch):
    """A loss that diverged is written as null, which strict JSON readers take (before: a bare NaN, which
    jq and JavaScript refuse); the text report says nan."""
    real = coatnet.evaluate.evaluate
    monkeypatch.setattr(coatnet.evaluate, "evaluate", lambda *args, **kwargs: real(*args, **kwargs) | dict(
        loss=float("nan")))
    out = tmp_path / "report"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run_dir / "last"), "--output-dir", str(out), "--json"]) == 0
    printed, written = strict_json(capsys.readouterr().out), strict_json((out / "eval.json").read_text())
    assert printed["loss"] is written["loss"] is None and printed["top1"] == written["top1"] > 0
    assert main(["eval", "--checkpoint", str(run_dir / "last"), "--output-dir", str(out)]) == 0
    assert "loss nan" in capsys.readouterr().out


def test_eval_of_five_classes_or_fewer_leaves_top5_out_of_its_line(run_dir, tmp_path, capsys):
    """With 5 classes or fewer top-5 is every class, 100% whatever the model: the report's line leaves it
    out (before: "top-5 100.00%", of a measure of nothing); eval.json keeps its "top5" key for readers.
    With more classes it is said."""
    for count in (3, 5):
        tree = make_tree(tmp_path / f"tree{count}", classes=tuple("abcde"[:count]), per_class=1)
        torch.manual_seed(0)
        folder = coatnet.create_model("coatnet_pico", num_classes=count, img_size=16).save_pretrained(
            tmp_path / f"model{count}")
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(folder), "--data", "imagefolder", "--data-dir", str(tree),
                     "--output-dir", str(tmp_path / f"e{count}")]) == 0
        line = capsys.readouterr().out.splitlines()[0]
        assert " top-1 " in line and "top-5" not in line, line
        assert json.loads((tmp_path / f"e{count}" / "eval.json").read_text())["top5"] == 100.0
    assert main(["eval", "--checkpoint", str(run_dir / "last"), "--output-dir", str(tmp_path / "e10")]) == 0
    assert " top-5 " in capsys.readouterr().out.splitlines()[0]


def test_predict_reads_every_image_it_can(run_dir, tmp_path, capsys):
    good = digit_files(tmp_path, sizes=((8, 8), (20, 30)))
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    missing = tmp_path / "missing.png"
    argv = ["predict", "--checkpoint", str(run_dir / "last"), str(good[0]), str(bad), str(good[1]), str(missing)]
    capsys.readouterr()
    assert main(argv) == 1  # some failed
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if not line.startswith(" ")] == [str(good[0]), str(good[1])]
    lines = err.splitlines()
    assert len(lines) == 2 and "Traceback" not in err, err
    assert lines[0].startswith(f"coatnet predict: error: cannot read image '{bad}': not an image file")
    assert lines[1].startswith(f"coatnet predict: error: cannot read image '{missing}': no such file")

    assert main([*argv, "--json"]) == 1
    out, err = capsys.readouterr()
    output = json.loads(out)
    assert [r["image"] for r in output["predictions"]] == [str(good[0]), str(good[1])]
    assert [e["image"] for e in output["errors"]] == [str(bad), str(missing)]
    assert all(e["message"] in err and e["message"].startswith("cannot read image") for e in output["errors"])

    assert main(["predict", "--checkpoint", str(run_dir / "last"), str(bad), str(missing)]) == 2  # none could
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 2 and "Traceback" not in err


def test_an_image_whose_exif_block_is_damaged_is_read(run_dir, tmp_path, capsys):
    """A JPEG whose EXIF block PIL cannot parse (a header neither II nor MM) decodes, and is read as stored,
    in predict, eval and data_transforms alike (before: a traceback, PIL's SyntaxError, raised by the copy's
    EXIF that the transform read again)."""
    (image,) = digit_files(tmp_path, sizes=((8, 8),))
    damaged = tmp_path / "damaged.jpg"
    Image.open(image).save(damaged, exif=b"Exif\x00\x00XX*\x00")
    plain = tmp_path / "plain.jpg"
    Image.open(image).save(plain)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run_dir / "last"), str(damaged), str(plain), "--json"]) == 0
    out, err = capsys.readouterr()
    first, second = json.loads(out)["predictions"]
    assert first["top"] == second["top"] and "Traceback" not in err, err
    model = coatnet.from_pretrained(run_dir / "last")
    transform = coatnet.data_transforms(model)
    assert torch.equal(transform(Image.open(damaged)), transform(Image.open(plain)))
    tree = image_folder(tmp_path / "tree", [str(d) for d in range(10)])
    shutil.copy(damaged, tree / "val" / "3" / "damaged.jpg")
    assert main(["eval", "--checkpoint", str(run_dir / "last"), "--data", "imagefolder", "--data-dir", str(tree),
                 "--output-dir", str(tmp_path / "eval"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 11


def test_pils_warnings_of_an_image_name_it(run_dir, tmp_path, capsys):
    """PIL's warnings while an image is read (a damaged EXIF block, a size over its decompression-bomb warning)
    name the file, once each (before: "Corrupt EXIF data. ..." without a name, twice: again by the transform)."""
    (image,) = digit_files(tmp_path, sizes=((8, 8),))
    damaged = tmp_path / "damaged.jpg"
    Image.open(image).save(damaged, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12")
    capsys.readouterr()
    with pytest.warns(UserWarning) as warned:
        assert main(["predict", "--checkpoint", str(run_dir / "last"), str(damaged), str(image)]) == 0
    assert [str(w.message) for w in warned] == [f"image '{damaged}': Corrupt EXIF data.  Expecting to read 12 bytes "
                                                f"but only got 2. "]


def test_a_run_directory_names_the_checkpoint_it_stands_for(run_dir, tmp_path, capsys):
    (image,) = digit_files(tmp_path, sizes=((8, 8),))
    using = f"using {run_dir / 'last'} -> {(run_dir / 'last').resolve().name}"
    assert using.endswith("-> ckpt-00000022")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run_dir), str(image)]) == 0
    assert capsys.readouterr().err == f"coatnet predict: {using}\n"
    assert main(["eval", "--checkpoint", str(run_dir), "--output-dir", str(tmp_path / "eval")]) == 0
    assert capsys.readouterr().err == f"coatnet eval: {using}\n"
    assert main(["predict", "--checkpoint", str(run_dir / "last"), str(image)]) == 0  # named: nothing to say
    assert capsys.readouterr().err == ""


def copy_checkpoint(run_dir, folder, classes):
    """A copy of the run's last checkpoint that records these class names (None: none)."""
    shutil.copytree(run_dir / "last", folder)
    meta = json.loads((folder / "config.json").read_text())
    meta["pretrained_cfg"]["label_names"] = classes
    (folder / "config.json").write_text(json.dumps(meta))
    return folder


def image_folder(root, classes):
    """An imagefolder data set (train/ and val/) with one 8x8 PNG per class and split."""
    root.mkdir()
    (image,) = digit_files(root, sizes=((8, 8),))
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            shutil.copy(image, root / split / name / "a.png")
    return root


@pytest.mark.parametrize("count", [9, 11])
def test_class_names_not_one_per_output_are_refused(run_dir, tmp_path, capsys, count):
    ckpt = copy_checkpoint(run_dir, tmp_path / "ckpt", classes=[str(i) for i in range(count)])
    (image,) = digit_files(tmp_path, sizes=((8, 8),))
    expected = f"lists {count} class names but the model has 10 outputs"
    one_line_error(capsys, ["predict", "--checkpoint", str(ckpt), str(image), "--top-k", "10"], "config.json", expected)
    one_line_error(capsys, ["eval", "--checkpoint", str(ckpt)], "config.json", expected)


def test_eval_names_class_names_alike_in_other_code_points(run_dir, tmp_path, capsys):
    """The checkpoint's 'café' (NFC) and the data's folder as a copy from macOS names it (NFD) look the
    same: the refusal says why they differ, as the train/val comparison does."""
    ckpt = copy_checkpoint(run_dir, tmp_path / "ckpt", classes=["caf\u00e9", *map(str, range(1, 10))])
    data = image_folder(tmp_path / "data", ["cafe\u0301", *map(str, range(1, 10))])
    one_line_error(capsys, ["eval", "--checkpoint", str(ckpt), "--data", "imagefolder", "--data-dir", str(data)],
                   "; evaluate on the data set it was trained on (caf\u00e9: the same letters in other Unicode code "
                   "points, as a copy from macOS may make; rename the data's class as the checkpoint spells it)\n")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_predict_opens_no_fifo(run_dir, tmp_path, capsys, no_hang):
    """A FIFO named x.png: opening it waited for a writer forever (before); in a folder it was left out
    without a word. It is an error of its own, as a file that is not an image."""
    os.mkfifo(tmp_path / "pipe.png")
    one_line_error(capsys, ["predict", "--checkpoint", str(run_dir), str(tmp_path / "pipe.png")],
                   "pipe.png': not an image file but a FIFO (named pipe); give a JPEG/PNG/... file")
    digit_files(tmp_path, sizes=((8, 8),))
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run_dir), str(tmp_path), "--json"]) == 1
    output = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in output["predictions"]] == [str(tmp_path / "digit0.png")]
    assert [e["image"] for e in output["errors"]] == [str(tmp_path / "pipe.png")]


def test_eval_of_a_checkpoint_without_class_names_on_a_data_set_of_other_classes(run_dir, tmp_path, capsys):
    ckpt = copy_checkpoint(run_dir, tmp_path / "ckpt", classes=None)
    data = image_folder(tmp_path / "data", ["a", "b", "c"])
    one_line_error(capsys, ["eval", "--checkpoint", str(ckpt), "--data", "imagefolder", "--data-dir", str(data)],
                   "the model has 10 outputs but imagefolder has 3 classes")


@pytest.mark.parametrize("size,message", [("100000", "image size 100000: give an integer multiple of the model's "
                                                     "stride 16 from 16 to 4096"),
                                          ("0", "image size 0: give"), ("-16", "image size -16: give"),
                                          ("20", "not a multiple of the model's stride 16"),
                                          # they are resized to it: the advice names sizes to pass, not a resize
                                          ("33", "--img-size 33 is not a multiple of the model's stride 16; pass "
                                                 "--img-size 32 or --img-size 48\n"),
                                          ("8", "--img-size 8 is not a multiple of the model's stride 16; pass "
                                                "--img-size 16\n")])
def test_img_size_is_refused_before_any_image_is_read(run_dir, tmp_path, capsys, monkeypatch, size, message):
    def read(*args, **kwargs):
        raise AssertionError("an image was read before --img-size was checked")

    monkeypatch.setattr(coatnet.evaluate, "load_image", read)
    monkeypatch.setattr(coatnet.evaluate, "build_datasets", read)
    one_line_error(capsys, ["predict", "--checkpoint", str(run_dir), str(tmp_path / "a.png"), "--img-size", size],
                   message)
    one_line_error(capsys, ["eval", "--checkpoint", str(run_dir), "--img-size", size], message)


CAFE = os.fsdecode(b"caf\xe9")  # a Latin-1 folder name, read as os.listdir does


def test_class_names_that_are_not_utf8(run_dir, tmp_path, capsys):
    names = sorted([CAFE, *"abcdefghi"])
    data = image_folder(tmp_path / "data", names)
    ckpt = copy_checkpoint(run_dir, tmp_path / "ckpt", classes=names)
    out = tmp_path / "eval"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ckpt), "--data", "imagefolder", "--data-dir", str(data),
                 "--output-dir", str(out), "--json"]) == 0
    assert "caf\\xe9" in json.loads(capsys.readouterr().out)["classes"]
    assert "caf\\xe9" in json.loads((out / "eval.json").read_bytes().decode("utf-8"))["classes"]
    assert (out / "confusion_matrix.png").read_bytes()[:4] == PNG
    (image,) = digit_files(tmp_path, sizes=((8, 8),))
    assert main(["predict", "--checkpoint", str(ckpt), str(image), "--top-k", "10"]) == 0
    assert "caf\\xe9" in capsys.readouterr().out


def test_confusion_plot_of_names_that_are_not_utf8(tmp_path):
    plot_confusion(np.eye(3, dtype=int), [CAFE, "\ud800x", "b"], tmp_path / "cm.png")  # second: from a JSON file
    assert (tmp_path / "cm.png").read_bytes()[:4] == PNG


def test_confusion_plot_of_names_with_dollar_signs(tmp_path, monkeypatch):
    """Class names are drawn as written: matplotlib would read `$x^$` as broken math (an error) and
    `$\\alpha$` as a Greek letter."""
    from matplotlib.axes import Axes

    drawn = []
    set_yticks = Axes.set_yticks
    monkeypatch.setattr(Axes, "set_yticks", lambda ax, ticks, labels, **kw: (drawn.extend(labels),
                                                                            set_yticks(ax, ticks, labels, **kw)))
    plot_confusion(np.eye(3, dtype=int), ["$x^$", "$\\alpha$", "b"], tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes()[:4] == PNG and drawn == ["\\$x^\\$", "\\$\\alpha\\$", "b"]


@pytest.mark.parametrize("count,length", [(3, 80), (5, 40), (12, 8), (40, 12), (100, 30)])
def test_confusion_labels_neither_overlap_nor_get_cut_off(tmp_path, monkeypatch, count, length):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figures = []
    monkeypatch.setattr(coatnet.plots, "save_figure", lambda fig, path, **_: figures.append(fig))
    names = [f"{i}-" + ("Wm" * length)[:length] for i in range(count)]  # wide letters
    plot_confusion(np.eye(count, dtype=int), names, tmp_path / "cm.png")
    (fig,) = figures
    FigureCanvasAgg(fig).draw()
    renderer, ax = fig.canvas.get_renderer(), fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == names == [t.get_text() for t in ax.get_yticklabels()]
    columns = sorted((t.get_window_extent(renderer) for t in ax.get_xticklabels()), key=lambda b: b.x0)
    rows = sorted((t.get_window_extent(renderer) for t in ax.get_yticklabels()), key=lambda b: b.y0)
    assert all(a.x1 <= b.x0 for a, b in zip(columns, columns[1:])), "column labels overlap"
    assert all(a.y1 <= b.y0 for a, b in zip(rows, rows[1:])), "row labels overlap"
    page = fig.bbox
    assert all(page.x0 <= b.x0 and b.x1 <= page.x1 and page.y0 <= b.y0 and b.y1 <= page.y1 for b in columns + rows)


def test_an_imagenet_head_of_an_earlier_folder_predicts_imagenet_names(tmp_path, capsys):
    """A folder written before class names travelled with the weights (timm's ImageNet weights,
    converted) has a 1000-class head and no names: predict prints ImageNet-1k's, which torchvision
    ships. A head of today without names (new, or replaced) prints its indices, not ImageNet's names."""
    import coatnet

    torch.manual_seed(0)
    folder = coatnet.create_model("coatnet_pico", num_classes=1000).save_pretrained(tmp_path / "in1k")
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)

    def labels():
        assert main(["predict", "--checkpoint", str(folder), str(image), "--json"]) == 0
        return [t["label"] for t in json.loads(capsys.readouterr().out)["predictions"][0]["top"]]

    assert all(label.isdigit() for label in labels())
    meta = json.loads((folder / "config.json").read_text())
    del meta["pretrained_cfg"]  # as written before it existed
    (folder / "config.json").write_text(json.dumps(meta))
    from torchvision.models import ResNet50_Weights

    found = labels()
    assert len(found) == 5 and set(found) <= set(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def test_a_non_square_model_predicts_on_its_own_input_size(tmp_path, capsys):
    """A model built for 32x64 images sees 32x64 ones, as ``data_transforms(model)`` prepares them,
    not a 32x32 crop; eval, whose data sets are square, asks for the side to use."""
    import coatnet

    torch.manual_seed(0)
    model = coatnet.create_model("coatnet_pico", num_classes=10, img_size=(32, 64)).eval()
    folder = model.save_pretrained(tmp_path / "wide")
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8)).save(image)
    assert main(["predict", "--checkpoint", str(folder), str(image), "--json", "--top-k", "1"]) == 0
    predicted = json.loads(capsys.readouterr().out)["predictions"][0]["top"][0]
    with torch.inference_mode():
        probs = model(coatnet.data_transforms(model)(Image.open(image))[None]).softmax(1)[0]
    assert predicted["label"] == str(probs.argmax().item())
    assert predicted["probability"] == pytest.approx(probs.max().item(), rel=1e-5)
    one_line_error(capsys, ["eval", "--checkpoint", str(folder), "--data", "digits"],
                   "takes 32x64 images and the evaluation data sets are square: pass --img-size SIDE")


def test_a_grey_model_predicts_on_grey_images(tmp_path, capsys):
    """A 1-channel model (create_model(in_chans=1)) gets each image as grey, normalised by the
    weights' mean and std averaged, in predict and in data_transforms, whatever the file's mode."""
    import coatnet

    torch.manual_seed(0)
    model = coatnet.create_model("coatnet_pico", num_classes=10, in_chans=1, img_size=32).eval()
    folder = model.save_pretrained(tmp_path / "grey")
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(image)
    assert main(["predict", "--checkpoint", str(folder), str(image), "--json", "--top-k", "1"]) == 0
    predicted = json.loads(capsys.readouterr().out)["predictions"][0]["top"][0]
    x = coatnet.data_transforms(model)(Image.open(image))
    grey = torch.from_numpy(np.asarray(Image.open(image).convert("L").resize((32, 32), Image.BILINEAR)))
    mean, std = sum(model.pretrained_cfg.mean) / 3, sum(model.pretrained_cfg.std) / 3
    torch.testing.assert_close(x[0], (grey / 255 - mean) / std, atol=0.05, rtol=0)  # PIL's resize vs torchvision's
    with torch.inference_mode():
        probs = model(x[None]).softmax(1)[0]
    assert predicted["probability"] == pytest.approx(probs.max().item(), rel=1e-5)
    one_line_error(capsys, ["eval", "--checkpoint", str(folder), "--data", "digits"],
                   "takes 1-channel images and the evaluation data sets are RGB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey", "x.png"]  # no eval folder left behind
    from coatnet.export import PREPROCESSING_KEY, export_model

    files = {PREPROCESSING_KEY: ""}
    torch.jit.load(str(export_model(model, "torchscript", tmp_path / "grey.pt")), _extra_files=files)
    recorded = json.loads(files[PREPROCESSING_KEY])
    assert recorded["input_size"] == [1, 32, 32] and recorded["mean"] == [mean] and recorded["std"] == [std]
    with pytest.raises(ValueError, match="models of 1 or 3 input channels, not 4; prepare 4-channel inputs"):
        coatnet.data_transforms(coatnet.create_model("coatnet_pico", in_chans=4, img_size=32))


def test_a_run_directory_is_read_at_one_checkpoint_while_training_moves_last(run_dir, tmp_path, capsys, monkeypatch):
    """Training may save (and move `last`) while eval reads its data: the weights, the line naming
    the checkpoint and eval's folder are all of the checkpoint `last` pointed at when eval began
    (before: the results of one, under the name of the next)."""
    from coatnet import evaluate

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, symlinks=True)
    was = (run / "last").resolve().name
    shutil.copytree(run / was, run / "ckpt-00000099")
    build = evaluate.build_datasets

    def build_while_training_saves(*args, **kwargs):
        (run / "moved").symlink_to("ckpt-00000099")
        os.replace(run / "moved", run / "last")
        return build(*args, **kwargs)
    monkeypatch.setattr(evaluate, "build_datasets", build_while_training_saves)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == f"coatnet eval: using {run / 'last'} -> {was}\n"
    assert json.loads(out)["checkpoint"] == str(run / was) and (run / f"eval-{was}-digits").is_dir()


def test_sigterm_stops_eval_and_predict_as_ctrl_c(run_dir, tmp_path, capsys, monkeypatch):
    """A timeout or a scheduler's SIGTERM is one line and status 130, as Ctrl-C (before: killed without a
    word); eval leaves no empty folder of its own. The test's handler stands in for the kill, so that
    the old code fails the test instead of ending the run."""
    import signal

    def killed(*_):
        pytest.fail("SIGTERM was not handled")

    def sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, killed)
    try:
        (image,) = digit_files(tmp_path, sizes=((8, 8),))
        monkeypatch.setattr(coatnet.evaluate, "load_image", sigterm)
        monkeypatch.setattr(coatnet.evaluate, "evaluate", sigterm)
        for argv in (["predict", "--checkpoint", str(run_dir), str(image)],
                     ["eval", "--checkpoint", str(run_dir), "--output-dir", str(tmp_path / "eval")]):
            capsys.readouterr()
            assert main(argv) == 130
            assert capsys.readouterr().err.endswith(f"coatnet {argv[0]}: interrupted\n")
            assert signal.getsignal(signal.SIGTERM) is killed  # put back
        assert not (tmp_path / "eval").exists()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_file_name_holding_a_newline_is_one_line(run_dir, tmp_path, capsys):
    """Shown with \\n, as a name that is not UTF-8 is with \\xNN (before: its error was two lines, and its
    prediction's name split in two)."""
    (good,) = digit_files(tmp_path, sizes=((8, 8),))
    good = good.rename(tmp_path / "new\nline.png")
    bad = tmp_path / "bad\nname.png"
    bad.write_text("not an image")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run_dir / "last"), str(good), str(bad), "--top-k", "1"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"{tmp_path}/new\\nline.png" and len(out.splitlines()) == 2
    assert err.count("\n") == 1 and f"cannot read image '{tmp_path}/bad\\nname.png': not an image" in err, err
    assert main(["predict", "--checkpoint", str(run_dir / "last"), str(bad), "--json"]) == 2
    (error,) = json.loads(capsys.readouterr().out)["errors"]
    assert error["image"] == f"{tmp_path}/bad\\nname.png" and f"'{error['image']}'" in error["message"]


def test_warnings_and_errors_quoting_a_name_with_a_newline_are_one_line(run_dir, tmp_path, capsys, monkeypatch):
    """A data tree's skipped file, and an error naming a folder: one line each, the name escaped
    (before: the warning went on over two lines)."""
    import warnings

    ckpt = copy_checkpoint(run_dir, tmp_path / "ckpt", classes=[str(i) for i in range(10)])
    data = image_folder(tmp_path / "data", [str(i) for i in range(10)])
    (data / "val" / "3" / "bad\nname.png").write_text("not an image")
    shown = lambda *args, **kwargs: sys.stderr.write(warnings.formatwarning(*args[:4]))  # noqa: E731
    monkeypatch.setattr(warnings, "showwarning", shown)  # the default's way, past pytest's recording
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ckpt), "--data", "imagefolder", "--data-dir", str(data),
                 "--output-dir", str(tmp_path / "e")]) == 0
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warning.startswith("coatnet eval: warning: skipping") and "/val/3/bad\\nname.png'" in warning, warning
    one_line_error(capsys, ["eval", "--checkpoint", str(ckpt), "--data", "imagefolder", "--data-dir",
                            str(tmp_path / "no\nsuch")], f"{tmp_path}/no\\nsuch")


def test_names_are_escaped_only_where_they_would_break_the_line():
    """Control characters and line separators are escaped; the rest of a name is shown as it is, also
    what str.isprintable refuses (before: a Japanese name's ideographic space, a Persian one's zero-width
    non-joiner and an emoji's joiner were shown as \\u3000, \\u200c, \\u200d)."""
    from coatnet.text import printable as shown
    for name in ("写真\u30001.png", "می\u200cخواهم.png", "no\u00a0break.png", "\U0001F468\u200d\U0001F469.png"):
        assert shown(name) == name
    assert shown("a\nb\rc\x1bd\u2028e\x85f") == "a\\nb\\rc\\x1bd\\u2028e\\x85f"
    assert shown("bad\udcffname") == "bad\\xffname"  # not UTF-8: as printable() shows it
    assert shown("bad\ud800name") == "bad\\ud800name"  # a lone surrogate (a hand-written config.json): escaped


def test_numbers_that_are_not_finite_are_null_wherever_they_are_and_the_layout_is_kept():
    """A NaN or infinity anywhere in what is written, in a list, a tuple or a nested dict, is null, and the
    JSON keeps the layout asked for (indent, sorted keys) also then."""
    from coatnet.text import json_text

    value = {"b": (1.5, float("nan")), "a": [float("inf"), {"c": -float("inf"), "d": 2}]}
    expected = {"a": [None, {"c": None, "d": 2}], "b": [1.5, None]}
    assert json_text(value, indent=2, sort_keys=True) == json.dumps(expected, indent=2, sort_keys=True)


def test_eval_matches_classes_by_name(run_dir, tmp_path, capsys):
    """A folder of the checkpoint's classes, whose sorted names are in another order, or of only some of
    them: its labels are the checkpoint's of the same name (before: refused, "the same names in another
    order"). Each image counts as it does where the sorted names are the checkpoint's order."""
    (tmp_path / "digits").mkdir()
    files = digit_files(tmp_path / "digits", sizes=((8, 8),) * 30)  # the embedded set's first 30: digit i % 10

    def report(names, kept=10, *notes):  # class i of the checkpoint named names[i]; the data of its first `kept`
        root = tmp_path / f"{names[0]}-{kept}"
        ckpt = copy_checkpoint(run_dir, root / "ckpt", classes=names)
        for split in ("train", "val"):
            for i, f in enumerate(files):
                if i % 10 < kept:
                    (root / split / names[i % 10]).mkdir(parents=True, exist_ok=True)
                    shutil.copy(f, root / split / names[i % 10] / f.name)
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(ckpt), "--data", "imagefolder", "--data-dir", str(root),
                     "--output-dir", str(root / "eval")]) == 0
        err = capsys.readouterr().err
        for note in notes:
            assert note in err, err
        return json.loads((root / "eval" / "eval.json").read_text())

    reference = report([f"c{i}" for i in range(10)])  # sorted, the checkpoint's order: no label matched
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    every = report(names, 10, "coatnet eval: note: the data's 10 classes are the checkpoint's, in another order: "
                   "its labels are matched to the checkpoint's by name")
    assert every["classes"] == names and every["count"] == 30
    assert every["confusion_matrix"] == reference["confusion_matrix"] and every["top1"] == reference["top1"]
    part = report(names, 4, "the data's 4 classes are 4 of the checkpoint's 10, in another order")  # four, one, ...
    assert part["classes"] == names and part["count"] == 12
    assert part["confusion_matrix"] == reference["confusion_matrix"][:4] + [[0] * 10] * 6


def test_eval_refuses_to_match_a_name_the_checkpoint_gives_twice(run_dir, tmp_path, capsys):
    """A checkpoint naming two outputs alike (a hand-written config.json): a data set of its classes in
    another order is refused, not matched to the first of the two without a word."""
    names = ["crane", "one", "two", "crane", "four", "five", "six", "seven", "eight", "nine"]
    ckpt = copy_checkpoint(run_dir, tmp_path / "ckpt", classes=names)
    data = image_folder(tmp_path / "data", ["crane", "one", "two"])
    one_line_error(capsys, ["eval", "--checkpoint", str(ckpt), "--data", "imagefolder", "--data-dir", str(data),
                            "--output-dir", str(tmp_path / "e")], "names 1 of imagefolder's classes more than once",
                   "'crane'")


def test_eval_of_a_run_whose_data_moved_asks_for_data_dir(run_dir, tmp_path, capsys):
    """The checkpoint's recorded folder is gone: the line says to give --data-dir, not to check a path the
    user never gave (before: "data directory ... does not exist ...; check the path")."""
    ckpt = copy_checkpoint(run_dir, tmp_path / "ckpt", classes=[str(i) for i in range(10)])
    meta = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(meta | {"dataset": "imagefolder", "data_dir": str(tmp_path / "gone")}))
    one_line_error(capsys, ["eval", "--checkpoint", str(ckpt)],
                   f"{ckpt} was trained on the imagefolder data at '{tmp_path / 'gone'}', which is not there now; "
                   f"pass --data-dir with its new place")
    data = image_folder(tmp_path / "moved", [str(i) for i in range(10)])
    assert main(["eval", "--checkpoint", str(ckpt), "--data-dir", str(data), "--output-dir", str(tmp_path / "e")]) == 0


def test_a_data_dir_given_for_a_digits_run_is_not_ignored(run_dir, tmp_path, capsys):
    """`eval --checkpoint DIGITS_RUN --data-dir FOLDER` without --data evaluated the embedded digits, the
    folder ignored without a word (before); it is refused, as `train --data-dir` with digits is, and with
    --data the folder is evaluated."""
    data = image_folder(tmp_path / "tree", [str(i) for i in range(10)])
    one_line_error(capsys, ["eval", "--checkpoint", str(run_dir), "--data-dir", str(data)],
                   f"--data-dir {data} is given but the data set is digits (the one ", "which is embedded and reads "
                   "no folder; pass --data imagefolder|cifar10|cifar100|webdataset|hf to evaluate on the folder")
    assert main(["eval", "--checkpoint", str(run_dir), "--data", "imagefolder", "--data-dir", str(data), "--json",
                 "--output-dir", str(tmp_path / "e")]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 10


def test_a_file_named_like_a_flag_is_said_to_be_one(run_dir, tmp_path, capsys, monkeypatch):
    """`coatnet predict --checkpoint RUN *` in a folder holding -x.png: argparse takes it for a flag;
    the line says how to give it (before: "unrecognized arguments: -x.png" alone)."""
    (image,) = digit_files(tmp_path, sizes=((8, 8),))
    image.rename(tmp_path / "-x.png")
    monkeypatch.chdir(tmp_path)
    hint = "'-x.png' is a file taken for a flag: give it as ./-x.png, or after -- (... -- -x.png)"
    one_line_error(capsys, ["predict", "--checkpoint", str(run_dir), "-x.png"], "required: IMAGE; " + hint)
    one_line_error(capsys, ["predict", "--checkpoint", str(run_dir), "-x.png", "a.png"], "-x.png; " + hint)
    one_line_error(capsys, ["predict", "--checkpoint", str(run_dir), "-y.png", "a.png"],  # no such file: a flag's hint
                   "unrecognized arguments: -y.png; `coatnet predict --help` lists its flags\n")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run_dir), "--", "-x.png"]) == 0


def test_eval_and_predict_take_timms_local_dir_as_the_folder(run_dir, tmp_path, capsys):
    """timm's local-dir:PATH names the folder PATH for --checkpoint too (before: "'local-dir:...' does not
    exist"): a run directory gives the same evaluation (its last checkpoint, named) and predictions."""
    (image,) = digit_files(tmp_path, sizes=((8, 8),))
    reports, predictions = [], []
    for i, checkpoint in enumerate((str(run_dir), f"local-dir:{run_dir}")):
        capsys.readouterr()  # a folder of each in tmp_path (tmp_path / "/tmp/" would be /tmp itself)
        assert main(["eval", "--checkpoint", checkpoint, "--output-dir", str(tmp_path / f"eval{i}"), "--json"]) == 0
        out, err = capsys.readouterr()
        assert err == f"coatnet eval: using {run_dir / 'last'} -> ckpt-00000022\n"
        reports.append(json.loads(out))
        assert main(["predict", "--checkpoint", checkpoint, str(image), "--json"]) == 0
        predictions.append(json.loads(capsys.readouterr().out))
    assert reports[0] == reports[1] and reports[0]["count"] == 360
    assert predictions[0] == predictions[1] and predictions[0]["errors"] == []
    for command in (["eval"], ["predict", str(image)]):  # where no folder is named, one line says what to give
        one_line_error(capsys, [*command, "--checkpoint", "local-dir:"], "'local-dir:' names no folder; write "
                                                                          "local-dir:PATH")
        one_line_error(capsys, [*command, "--checkpoint", f"local-dir:{tmp_path / 'missing'}"],
                       f"'{tmp_path / 'missing'}' is not a folder; give one that holds timm's config.json")


@pytest.mark.parametrize("where", ["folder", "hub"])
def test_eval_and_predict_of_timms_repository_downloaded_into_a_folder(tmp_path, capsys, monkeypatch, hub, where):
    """`hf download timm/... --local-dir PATH`, then `coatnet eval --checkpoint PATH`: the weights as
    pretrained=PATH reads them, with timm's preprocessing and class names (before: "config.json is corrupt").
    The repository in the Hub cache, `--checkpoint hf-hub:ORG/NAME`, is the same (before: refused), its
    evaluation written in the current folder, not in the cache."""
    timm = pytest.importorskip("timm")
    import coatnet
    from safetensors.torch import save_file

    torch.manual_seed(0)
    theirs = timm.create_model("coatnet_nano_rw_224", img_size=32, num_classes=3).eval()
    folder = hub("me/w") if where == "hub" else tmp_path / "w"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architecture": "coatnet_nano_rw_224", "num_classes": 3, "label_names": ["cat", "dog", "eel"],
        "model_args": {"img_size": 32}, "pretrained_cfg": {"mean": [0.3, 0.4, 0.5], "crop_pct": 1.0}}))
    save_file(theirs.state_dict(), str(folder / "model.safetensors"))
    data = image_folder(tmp_path / "data", ["cat", "dog", "eel"])
    prepare = coatnet.data_transforms(coatnet.from_pretrained(folder))
    images = [data / "val" / c / "a.png" for c in ("cat", "dog", "eel")]
    with torch.inference_mode():
        probs = theirs(torch.stack([prepare(Image.open(i).convert("RGB")) for i in images])).softmax(1)

    checkpoint = "hf-hub:me/w" if where == "hub" else str(folder)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--checkpoint", checkpoint, "--data", "imagefolder", "--data-dir", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["model"], report["count"], report["classes"]) == ("coatnet_nano_rw", 3, ["cat", "dog", "eel"])
    assert report["top1"] == pytest.approx(100 * (probs.argmax(1) == torch.arange(3)).float().mean().item())
    written = (tmp_path if where == "hub" else folder.parent) / f"eval-{'me--w' if where == 'hub' else 'w'}-imagefolder"
    assert json.loads((written / "eval.json").read_text())["top1"] == report["top1"]
    assert main(["predict", "--checkpoint", checkpoint, str(images[0]), "--json", "--top-k", "1"]) == 0
    (top,) = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
    assert top["label"] == ["cat", "dog", "eel"][probs[0].argmax()]
    assert top["probability"] == pytest.approx(probs[0].max().item(), rel=1e-4)
    (folder / "model.safetensors").unlink()  # its config.json alone: says what is missing, not "corrupt"
    one_line_error(capsys, ["eval", "--checkpoint", str(folder), "--data", "imagefolder", "--data-dir", str(data)],
                   "holds timm's coatnet_nano_rw_224 (its config.json is timm's), without its weights")
    # a repository not in the cache, offline: one line (before: "a folder on disk is needed here")
    one_line_error(capsys, ["predict", "--checkpoint", "hf-hub:me/none", str(images[0])], "me/none")


def test_eval_predict_and_export_take_a_model_name_with_its_weights_as_timm_does(run_dir, tmp_path, capsys,
                                                                                  monkeypatch, hub):
    """timm's validate.py and inference.py flags: `--model NAME --pretrained` is timm's published weights of
    NAME (from the Hub cache, as `--checkpoint hf-hub:timm/NAME`), `--model NAME --checkpoint FILE` a
    weights file (before: --checkpoint required, a weights file refused with advice for `coatnet train`).
    Each wrong combination is one line that says what to give."""
    timm = pytest.importorskip("timm")
    import coatnet
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    data = image_folder(tmp_path / "data", ["cat", "dog", "eel"])
    images = [data / "val" / c / "a.png" for c in ("cat", "dog", "eel")]
    data_flags = ["--data", "imagefolder", "--data-dir", str(data), "--json"]

    # timm's published weights in the Hub cache, evaluated by their timm name
    torch.manual_seed(0)
    theirs = timm.create_model("coatnet_nano_rw_224", img_size=32, num_classes=3).eval()
    repo = hub("timm/coatnet_nano_rw_224.sw_in1k")
    (repo / "config.json").write_text(json.dumps({
        "architecture": "coatnet_nano_rw_224", "num_classes": 3, "label_names": ["cat", "dog", "eel"],
        "model_args": {"img_size": 32}, "pretrained_cfg": {"crop_pct": 1.0}}))
    save_file(theirs.state_dict(), str(repo / "model.safetensors"))
    prepare = coatnet.data_transforms(coatnet.create_model("coatnet_nano_rw_224.sw_in1k", pretrained=True))
    with torch.inference_mode():
        probs = theirs(torch.stack([prepare(Image.open(i).convert("RGB")) for i in images])).softmax(1)
    assert main(["eval", "--model", "coatnet_nano_rw_224.sw_in1k", "--pretrained", *data_flags]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["model"], report["classes"]) == ("coatnet_nano_rw", ["cat", "dog", "eel"])
    assert report["top1"] == pytest.approx(100 * (probs.argmax(1) == torch.arange(3)).float().mean().item())
    assert (tmp_path / "eval-timm--coatnet_nano_rw_224.sw_in1k-imagefolder" / "eval.json").is_file()
    assert main(["predict", "--model", "coatnet_nano_rw_224.sw_in1k", "--pretrained", str(images[1]), "--json",
                 "--top-k", "1"]) == 0
    (top,) = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
    assert top["probability"] == pytest.approx(probs[1].max().item(), rel=1e-4)

    # a weights file of ours (a state dict), its classifier kept: the model's own outputs, in eval, predict
    # and the exported graph alike
    ours = coatnet.create_model("coatnet_pico", num_classes=3).eval()
    weights = tmp_path / "w.pth"
    torch.save(ours.state_dict(), weights)
    batch = torch.stack([coatnet.data_transforms(ours)(Image.open(i).convert("RGB")) for i in images])
    with torch.inference_mode():
        expected = ours(batch).softmax(1)
    assert main(["eval", "--model", "coatnet_pico", "--checkpoint", str(weights), *data_flags]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["top1"] == pytest.approx(100 * (expected.argmax(1) == torch.arange(3)).float().mean().item())
    assert (tmp_path / "eval-w.pth-imagefolder" / "eval.json").is_file()  # beside the file, as beside a checkpoint
    assert main(["predict", "--model", "coatnet_pico", "--checkpoint", str(weights), str(images[2]), "--json",
                 "--top-k", "1"]) == 0
    (top,) = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
    assert top["probability"] == pytest.approx(expected[2].max().item(), rel=1e-4)
    onnxruntime = pytest.importorskip("onnxruntime")
    assert main(["export", "--model", "coatnet_pico", "--checkpoint", str(weights), "--format", "onnx",
                 "--output", str(tmp_path / "w.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "w.onnx"))
    (logits,) = session.run(None, {session.get_inputs()[0].name: batch[:1].numpy()})
    torch.testing.assert_close(torch.from_numpy(logits).softmax(1), expected[:1], rtol=1e-4, atol=1e-5)

    # what is wrong, and what to give
    for argv, said in (
            (["eval", *data_flags], "give the model to run: --checkpoint"),
            (["eval", "--pretrained", *data_flags], "--pretrained is timm's published weights of --model NAME"),
            (["eval", "--model", "coatnet_pico", *data_flags], "--model coatnet_pico needs weights to run"),
            (["eval", "--checkpoint", str(weights), *data_flags], "is a weights file: name its network too"),
            (["eval", "--model", "coatnet_nano_rw_224.sw_in1k", "--pretrained", "--checkpoint", str(weights)],
             "give one"),
            (["eval", "--model", "coatnet_pico", "--pretrained", *data_flags], "coatnet_pico has no published weights"),
            (["eval", "--model", "coatnet_0", "--checkpoint", str(run_dir / "last")],
             "--model coatnet_0 is not the network of"),
            (["predict", "--model", "coatnet_pico", "--pretrained", str(weights), str(images[0])],
             f"give a weights file as --checkpoint '{weights}'"),
            (["eval", "--model", "coatnet_pico", "--pretrained", str(weights), *data_flags],
             f"--pretrained takes no file here: give a weights file as --checkpoint {weights}"),
            (["eval", "--checkpoint", str(tmp_path / "w.onnx"), *data_flags], "is an exported model (ONNX")):
        one_line_error(capsys, argv, said)


def test_model_given_as_timms_hub_repository_or_folder_with_pretrained(tmp_path, capsys, monkeypatch, hub, run_dir):
    """timm's `--model hf-hub:ORG/NAME --pretrained` (`local-dir:PATH`): the repository's (the folder's) own
    network and weights, as `--checkpoint hf-hub:ORG/NAME` (before: refused, "which only create_model takes");
    with a weights file, one line asking for the network's name."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    data = image_folder(tmp_path / "data", ["cat", "dog", "eel"])
    data_flags = ["--data", "imagefolder", "--data-dir", str(data), "--json"]
    repo = hub("timm/coatnet_nano_rw_224.sw_in1k")
    (repo / "config.json").write_text(json.dumps({
        "architecture": "coatnet_nano_rw_224", "num_classes": 3, "label_names": ["cat", "dog", "eel"],
        "model_args": {"img_size": 32}}))
    save_file(timm.create_model("coatnet_nano_rw_224", img_size=32, num_classes=3).state_dict(),
              str(repo / "model.safetensors"))
    reports = []
    for model in ("coatnet_nano_rw_224.sw_in1k", "hf-hub:timm/coatnet_nano_rw_224.sw_in1k"):
        assert main(["eval", "--model", model, "--pretrained", *data_flags]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[0] == reports[1]
    assert (tmp_path / "eval-timm--coatnet_nano_rw_224.sw_in1k-imagefolder" / "eval.json").is_file()
    assert main(["predict", "--model", f"local-dir:{run_dir / 'last'}", "--pretrained", "--json",
                 str(data / "val" / "cat" / "a.png")]) == 0
    assert len(json.loads(capsys.readouterr().out)["predictions"]) == 1
    one_line_error(capsys, ["eval", "--model", "hf-hub:timm/coatnet_nano_rw_224.sw_in1k", "--checkpoint",
                            str(repo / "model.safetensors"), *data_flags],
                   "names a repository or folder, not a network: give it with --pretrained")


def test_a_weights_file_that_cannot_be_evaluated_as_given_says_what_to_give(run_dir, tmp_path, capsys):
    """A model folder's own weights file, given alone: the folder (before: "name its network too", which
    loses its preprocessing, class names and EMA weights); weights without a classifier: that they have none
    (before: "the model has 0 outputs but ... has 3 classes; evaluate on the data set it was trained on"); a
    TorchScript export (.pt, as weights): that it is one (before: "name its network too", then "the file is
    corrupt")."""
    data = image_folder(tmp_path / "data", ["cat", "dog", "eel"])
    data_flags = ["--data", "imagefolder", "--data-dir", str(data)]
    last = run_dir / "last"
    one_line_error(capsys, ["eval", "--checkpoint", str(last / "model.safetensors")],
                   f"'{last / 'model.safetensors'}' is the weights of the model folder '{last}': give the folder, "
                   f"--checkpoint '{last}'")
    headless = tmp_path / "headless.pth"
    torch.save(coatnet.create_model("coatnet_pico", num_classes=0).state_dict(), headless)
    one_line_error(capsys, ["eval", "--model", "coatnet_pico", "--checkpoint", str(headless), *data_flags],
                   f"{headless} has no classifier (0 classes): there is nothing to evaluate")
    scripted = tmp_path / "model.pt"
    assert main(["export", "--checkpoint", str(last), "--format", "torchscript", "--output", str(scripted)]) == 0
    for model in ([], ["--model", "coatnet_pico"]):
        one_line_error(capsys, ["eval", *model, "--checkpoint", str(scripted), *data_flags],
                       f"'{scripted}' is an exported model (TorchScript, run by torch.jit.load)")
    assert not any(p.name.startswith("eval-") for p in tmp_path.iterdir())


def test_an_eval_output_dir_inside_the_datas_splits_is_refused(run_dir, tmp_path, capsys):
    """`eval --output-dir` inside the image folder's val/ (or train/): refused before anything is written
    (before: eval.json and confusion_matrix.png written there, the folder a new class, or the plot an
    image of a class, every later eval and run on the data refused or scoring a plot)."""
    data = image_folder(tmp_path / "tree", [str(i) for i in range(10)])
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    for inside in (data / "val" / "reports", data / "val" / "3", data / "train"):
        split = inside.relative_to(data).parts[0]
        one_line_error(capsys, ["eval", "--checkpoint", str(run_dir), "--data", "imagefolder", "--data-dir", str(data),
                                "--output-dir", str(inside)], f"is inside the data's {split}/ folder",
                       "give an --output-dir outside")
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    assert main(["eval", "--checkpoint", str(run_dir), "--data", "imagefolder", "--data-dir", str(data),
                 "--output-dir", str(data / "reports")]) == 0


def test_a_model_folders_weights_file_with_model_says_to_give_the_folder(run_dir, tmp_path, capsys):
    """`--model NAME --checkpoint RUN/last/model.safetensors`: the folder to give, as without --model (before:
    read as a bare weights file, predict printing output indices for the run's class names, and preprocessing
    and EMA weights of the folder left out without a word)."""
    ckpt = copy_checkpoint(run_dir, tmp_path / "ckpt", classes=[f"c{i}" for i in range(10)])
    (image,) = digit_files(tmp_path, sizes=((8, 8),))
    for command in (["predict", str(image)], ["eval"], ["export", "--format", "onnx", "--output",
                                                         str(tmp_path / "m.onnx")]):
        one_line_error(capsys, [*command, "--model", "coatnet_pico", "--checkpoint", str(ckpt / "model.safetensors")],
                       f"'{ckpt / 'model.safetensors'}' is the weights of the model folder '{ckpt}': give the folder")
    assert main(["predict", "--model", "coatnet_pico", "--checkpoint", str(ckpt), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["top"][0]["label"].startswith("c")


def test_a_report_folder_that_cannot_be_made_beside_the_checkpoint_names_output_dir(run_dir, tmp_path, capsys,
                                                                                    monkeypatch):
    """A checkpoint on a read-only or shared disk: eval's default folder beside it cannot be made; the line
    says to give --output-dir (before: "Permission denied: RUN/eval-...", of a folder the user never chose)."""
    import pathlib

    real = pathlib.Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name.startswith("eval-"):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    one_line_error(capsys, ["eval", "--checkpoint", str(run_dir)], "cannot make the report's folder",
                   "(Permission denied); give --output-dir")
    assert main(["eval", "--checkpoint", str(run_dir), "--output-dir", str(tmp_path / "e")]) == 0


def test_eval_json_records_the_data_folder_it_measured(run_dir, tmp_path, capsys, monkeypatch):
    """eval.json says which data it measured: the folder given (absolute, as a run records it, so that the
    report means the same from any working directory), and none for the embedded digits."""
    make_tree(tmp_path / "tree")
    torch.manual_seed(0)
    folder = coatnet.create_model("coatnet_pico", num_classes=3, img_size=16).save_pretrained(tmp_path / "three")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--checkpoint", str(folder), "--data", "imagefolder", "--data-dir", "tree",
                 "--output-dir", "e", "--json"]) == 0
    printed, written = json.loads(capsys.readouterr().out), json.loads((tmp_path / "e" / "eval.json").read_text())
    assert printed["data_dir"] == written["data_dir"] == str(tmp_path / "tree")
    assert main(["eval", "--checkpoint", str(run_dir / "last"), "--output-dir", "d"]) == 0
    assert json.loads((tmp_path / "d" / "eval.json").read_text())["data_dir"] is None


def test_an_older_report_is_replaced_and_a_folder_of_another_eval_json_refused(tmp_path, capsys):
    """A report written before eval.json held the preprocessing and precision is this evaluation's own:
    replaced, not passed over for -2; an eval.json that is no report (not JSON, or not an object) leaves the
    folder to the check that refuses it, in one line (not a traceback, nor a new -2)."""
    torch.manual_seed(0)
    folder = coatnet.create_model("coatnet_pico", num_classes=3, img_size=16).save_pretrained(tmp_path / "model")
    tree = make_tree(tmp_path / "a", per_class=1)
    first = tmp_path / "eval-model-imagefolder"
    argv = ["eval", "--checkpoint", str(folder), "--data", "imagefolder", "--data-dir", str(tree)]
    assert main(argv) == 0
    older = json.loads((first / "eval.json").read_text())
    del older["preprocessing"], older["amp"]
    (first / "eval.json").write_text(json.dumps(older))
    capsys.readouterr()
    assert main(argv) == 0
    assert f"wrote {first / 'eval.json'}" in capsys.readouterr().out
    assert "preprocessing" in json.loads((first / "eval.json").read_text())
    for content in ("not a report", "[1, 2]"):
        (first / "eval.json").write_text(content)
        one_line_error(capsys, argv, f"{first} holds an eval.json or confusion_matrix.png that no evaluation wrote")
    assert [p.name for p in tmp_path.glob("eval-*")] == [first.name]
