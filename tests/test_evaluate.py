"""`coatnet eval`, `coatnet predict`, the evaluation pass and the figures."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from coatnet.cli import main
from coatnet.evaluate import evaluate
from coatnet.plots import plot_confusion, plot_curves

PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    assert main(["train", "--img-size", "16", "--epochs", "2", "--batch-size", "128", "--warmup-steps", "3",
                 "--output-dir", str(out)]) == 0
    return out


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


def test_predict_top5_on_images_of_any_size(run_dir, tmp_path, capsys):
    from sklearn.datasets import load_digits

    digits = load_digits()
    files = []
    for i, size in ((0, (37, 50)), (1, (8, 8)), (2, (300, 120))):
        img = Image.fromarray(np.uint8(digits.images[i] * 255 / 16)).resize(size).convert("RGB")
        files.append(tmp_path / f"digit{i}.png")
        img.save(files[-1])
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run_dir), *map(str, files), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == list(map(str, files))
    for r in results:
        probs = [t["probability"] for t in r["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert {t["label"] for t in r["top"]} <= {str(d) for d in range(10)}
    assert main(["predict", "--checkpoint", str(run_dir), str(files[0]), "--top-k", "3"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == str(files[0]) and len(text) == 4 and text[1].strip().startswith("1. ")


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


def test_eval_bad_input(run_dir, tmp_path, capsys):
    one_line_error(capsys, ["eval", "--checkpoint", str(tmp_path)], "not a coatnet checkpoint")
    one_line_error(capsys, ["eval", "--checkpoint", str(run_dir), "--img-size", "20"], "multiple")
    one_line_error(capsys, ["eval", "--checkpoint", str(run_dir), "--data", "cifar10", "--data-dir",
                            str(tmp_path / "nothing")], "nothing")


def test_plots_write_pngs(tmp_path):
    history = [dict(epoch=e, train_loss=2 / e, eval_loss=2.2 / e, train_top1=10 * e, top1=9 * e, top5=20 * e)
               for e in (1, 2, 3)]
    plot_curves(history, tmp_path / "curves.png")
    plot_confusion(np.eye(12, dtype=int) * 5, [f"class {i}" for i in range(12)], tmp_path / "cm.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == PNG and (tmp_path / "cm.png").read_bytes()[:4] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png", "curves.png"]  # no temporary files left
