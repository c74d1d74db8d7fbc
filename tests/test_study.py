"""`coatnet study layouts` end to end with the small layouts, one epoch at 16x16."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import coatnet.study as study
from conftest import strict_json
from coatnet.cli import main

ARGS = ["study", "layouts", "--img-size", "16", "--epochs", "1", "--batch-size", "256", "--seeds", "1"]


def test_small_layouts_are_comparable():
    from coatnet.complexity import count_parameters
    from coatnet.models import create_model

    params = {name: count_parameters(create_model(name, img_size=32, num_classes=10, **study.small_layout(name)))
              for name in study.LAYOUTS}
    assert max(params.values()) < 1.1 * min(params.values()), params
    assert all(1.4e6 < p < 1.8e6 for p in params.values()), params


def test_study_runs_writes_and_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    calls = []
    real_train = study.train

    def counting_train(config, **kwargs):
        calls.append((config.model, kwargs.get("resume")))
        if len(calls) == 3 and not counted_only:
            raise KeyboardInterrupt  # the user stops the study during its third run
        return real_train(config, **kwargs)

    monkeypatch.setattr(study, "train", counting_train)
    counted_only = False
    assert main([*ARGS, "--output-dir", str(out)]) == 130
    assert capsys.readouterr().err.endswith("coatnet study layouts: interrupted; the same command continues the "
                                            f"study from its runs' last checkpoints\n")
    first = json.loads((out / "study.json").read_text())
    assert [r["model"] for r in first["runs"]] == ["vit_rel", "c_c_c_c"]  # each finished run written at once

    # A run cut off after its checkpoint but before its summary is finished from the checkpoint.
    (out / "runs" / "c_c_c_c-seed0" / "summary.json").unlink()
    calls.clear()
    counted_only = True
    assert main([*ARGS, "--output-dir", str(out)]) == 0
    assert calls == [("c_c_c_c", True), ("c_c_c_t", None), ("c_c_t_t", None), ("c_t_t_t", None)]

    result = json.loads((out / "study.json").read_text())
    assert [r["layout"] for r in result["runs"]] == ["VIT_REL", "C-C-C-C", "C-C-C-T", "C-C-T-T", "C-T-T-T"]
    assert result["runs"][0] == first["runs"][0]
    for r in result["runs"]:
        assert r["params"] > 1e6 and r["flops"] > 1e6 and 0 <= r["top1"] <= 100 and r["train_loss"] > 0
        assert r["curves"]["epoch"] == [1] and len(r["curves"]["top1"]) == 1
    s = result["settings"]
    assert s["size"] == "small" and s["drop_path"] == s["label_smoothing"] == s["mixup"] == s["weight_decay"] == 0
    assert s["randaugment"] is None
    assert set(result["summary"]) == {"VIT_REL", "C-C-C-C", "C-C-C-T", "C-C-T-T", "C-T-T-T"}
    assert sorted(result["ordering"]["eval_top1"]) == sorted(result["summary"])
    assert result["paper"]["generalisation"] == "C-C-C-C ~ C-C-C-T >= C-C-T-T > C-T-T-T >> VIT_REL"
    md = (out / "study.md").read_text()
    assert "| C-T-T-T |" in md and "by eval top-1" in md and result["paper"]["capacity"] in md
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG"

    # Everything done: a rerun trains nothing.
    calls.clear()
    assert main([*ARGS, "--output-dir", str(out)]) == 0
    assert calls == []


@pytest.mark.parametrize("argv,message", [
    (["--layouts", "c_c_c_c,t_t_t_t"], "unknown layout(s) t_t_t_t"),
    (["--layouts", "c_c_t_t,C-C-T-T"], "--layouts names C-C-T-T more than once; give each layout once"),
    (["--seeds", "0"], "argument --seeds: must be an integer >= 1, got '0'"),
])
def test_bad_input(tmp_path, capsys, argv, message):
    one_line(capsys, [*ARGS, *argv, "--output-dir", str(tmp_path)], message)


def test_a_run_refused_by_training_leaves_no_folder(tmp_path, capsys):
    # The study's first run turns the size down: no log and lock are left that look like a run begun.
    one_line(capsys, [*ARGS, "--img-size", "7", "--output-dir", str(tmp_path)], "--img-size must be an integer >= 8")
    assert not any((tmp_path / "runs").glob("*"))
    # Neither when training logged a note before refusing (the ImageNet recipe's 8 workers, on fewer cores)
    one_line(capsys, [*ARGS, "--data", "bogus", "--output-dir", str(tmp_path / "b")],
             "unknown data set 'bogus'")
    assert not any((tmp_path / "b" / "runs").glob("*"))


def test_a_rate_below_the_recipes_minimum_is_refused_as_the_study_can_take_it(tmp_path, capsys):
    one_line(capsys, [*ARGS, "--lr", "1e-6", "--output-dir", str(tmp_path)],
             "--lr 1e-06 is below the recipe's minimum rate 1e-05, where its schedule ends; give --lr of at least")


def one_line(capsys, argv, message):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    # Flag errors and the study's own name the command alike
    assert err.count("\n") == 1 and err.startswith("coatnet study layouts: error: ") and message in err, err


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "s"
    assert main([*ARGS, "--layouts", "c_c_t_t", "--output-dir", str(out)]) == 0
    return out


def test_a_loss_that_is_not_finite_is_null_in_every_json_file(tmp_path, monkeypatch):
    """An evaluation whose loss diverged (inf here) is written as null in metrics.jsonl, summary.json and
    study.json, which strict JSON readers (jq, JavaScript) take, and the study reads its runs' files back
    (before: a bare Infinity, which they refuse)."""
    import coatnet.train

    real = coatnet.train.evaluate
    monkeypatch.setattr(coatnet.train, "evaluate", lambda *args, **kwargs: real(*args, **kwargs) | dict(
        loss=float("inf")))
    out = tmp_path / "s"
    assert main([*ARGS, "--layouts", "c_c_t_t", "--output-dir", str(out)]) == 0
    run = out / "runs" / "c_c_t_t-seed0"
    (metrics,) = map(strict_json, (run / "metrics.jsonl").read_text().splitlines())
    assert metrics["eval_loss"] is None and metrics["train_loss"] > 0
    assert strict_json((run / "summary.json").read_text())["eval_loss"] is None
    assert strict_json((out / "study.json").read_text())["runs"][0]["curves"]["eval_loss"] == [None]
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_rerun_may_write_the_data_as_training_reads_it(finished_study, tmp_path, capsys, monkeypatch):
    """The data set's name in capitals, and its folder written another way, are the same study's."""
    from test_data import make_tree

    def no_training(config, **kwargs):
        raise AssertionError(f"{config.model} trained again")
    out = tmp_path / "s"
    shutil.copytree(finished_study, out, symlinks=True)
    monkeypatch.setattr(study, "train", no_training)
    assert main([*ARGS, "--layouts", "c_c_t_t", "--data", "DIGITS", "--output-dir", str(out)]) == 0
    monkeypatch.undo()
    make_tree(tmp_path / "tree")
    monkeypatch.chdir(tmp_path)
    argv = [*ARGS, "--layouts", "c_c_t_t", "--data", "imagefolder", "--batch-size", "4", "--output-dir", "f"]
    assert main([*argv, "--data-dir", "tree"]) == 0
    monkeypatch.setattr(study, "train", no_training)
    assert main([*argv, "--data-dir", "./tree/"]) == 0


def test_other_settings_in_the_same_directory_are_refused(finished_study, tmp_path, capsys):
    out = tmp_path / "s"
    shutil.copytree(finished_study, out, symlinks=True)
    one_line(capsys, [*ARGS, "--layouts", "c_c_t_t", "--lr", "0.01", "--output-dir", str(out)],
             "other settings (lr)")
    # Without study.json (deleted, or a study stopped in its first run), each run's own record decides.
    (out / "study.json").unlink()
    one_line(capsys, [*ARGS, "--layouts", "c_c_t_t", "--epochs", "3", "--output-dir", str(out)],
             f"{out / 'runs' / 'c_c_t_t-seed0'} was trained with other settings (epochs) than this study's")
    # Another layout with the same settings joins the study; the finished one stays in its files.
    assert main([*ARGS, "--layouts", "vit_rel", "--output-dir", str(out)]) == 0
    study = json.loads((out / "study.json").read_text())
    assert [r["layout"] for r in study["runs"]] == ["VIT_REL", "C-C-T-T"] and len(study["summary"]) == 2
    # Damaged files are one line that names them and what to do.
    (out / "runs" / "vit_rel-seed0" / "summary.json").write_text("")
    one_line(capsys, [*ARGS, "--layouts", "vit_rel", "--output-dir", str(out)],
             "summary.json cannot be read (Expecting value: line 1 column 1 (char 0)); delete it (it is rebuilt")
    (out / "study.json").write_text("{}")
    one_line(capsys, [*ARGS, "--layouts", "vit_rel", "--output-dir", str(out)],
             "study.json holds no study settings; delete it (it is rebuilt from the runs) and rerun")


@pytest.mark.parametrize("file,content,message", [
    ("summary.json", "{}", "summary.json has no number under train_loss, top1, wall_seconds; delete it"),
    ("summary.json", "[]", "summary.json holds list where a JSON object belongs; delete it"),
    ("summary.json", '{"train_loss": 1, "top1": "abc", "wall_seconds": 3}', "has no number under top1"),
    ("metrics.jsonl", '{"epoch": 1}\n', "metrics.jsonl has no number under train_loss, eval_loss, top1; the run is "
                                        "damaged: delete its folder"),
    ("last/config.json", "{}", "config.json holds no usable model config ('config'); the run is damaged"),
])
def test_damaged_run_files_are_one_line(finished_study, tmp_path, capsys, file, content, message):
    """Valid JSON of the wrong shape, as well as text that is not JSON (before: a traceback)."""
    out = tmp_path / "s"
    shutil.copytree(finished_study, out, symlinks=True)
    (out / "runs" / "c_c_t_t-seed0" / file).write_text(content)
    one_line(capsys, [*ARGS, "--layouts", "c_c_t_t", "--output-dir", str(out)], message)


def test_continuing_a_study(finished_study, tmp_path, capsys):
    """A study of an earlier version (settings it did not record) or on a named device goes on; a
    blank line at the end of a run's metrics is no damage; study files of the user's are kept."""
    out = tmp_path / "s"
    shutil.copytree(finished_study, out, symlinks=True)
    study_json = json.loads((out / "study.json").read_text())
    del study_json["settings"]["grad_accum_steps"]
    (out / "study.json").write_text(json.dumps(study_json))
    with open(out / "runs" / "c_c_t_t-seed0" / "metrics.jsonl", "a") as f:
        f.write("\n")
    assert main([*ARGS, "--layouts", "c_c_t_t", "--device", "cpu", "--output-dir", str(out)]) == 0
    # study.json deleted, as a damaged one's message says: the study's own study.md and study.png are rebuilt.
    (out / "study.json").unlink()
    assert main([*ARGS, "--layouts", "c_c_t_t", "--output-dir", str(out)]) == 0
    (out / "study.json").unlink()
    (out / "study.md").write_text("my notes")
    one_line(capsys, [*ARGS, "--layouts", "c_c_t_t", "--output-dir", str(out)],
             f"{out} holds a study.md that no study wrote, which this study would overwrite")
    assert (out / "study.md").read_text() == "my notes"
    (out / "study.md").unlink()
    png = (out / "study.png").read_bytes()
    one_line(capsys, [*ARGS, "--layouts", "c_c_t_t", "--output-dir", str(out)],
             f"{out} holds a study.png but no study.md or study.json of a study")
    assert (out / "study.png").read_bytes() == png


def test_study_under_torchrun(tmp_path):
    """Two processes: each run is one DDP job, the process group lives for the whole study (it cannot
    be started twice), and only the first process writes the study's files."""
    out = tmp_path / "study"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "coatnet", *ARGS, "--layouts", "c_c_t_t,vit_rel", "--device", "cpu",
                             "--output-dir", str(out)],
                            capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1
    runs = json.loads((out / "study.json").read_text())["runs"]
    assert [r["layout"] for r in runs] == ["VIT_REL", "C-C-T-T"]  # the paper's order
    for name in ("c_c_t_t", "vit_rel"):
        assert json.loads((out / "runs" / f"{name}-seed0" / "summary.json").read_text())["world_size"] == 2


def test_the_same_relative_data_dir_from_another_folder_is_other_data(tmp_path, capsys, monkeypatch):
    """--data-dir tree given again from another working directory names another data set: refused before
    any run trains on it (before: study.json's relative path passed, and a new layout trained on the other
    data in the study's folder before the finished run's own record refused the study)."""
    from test_data import make_tree

    make_tree(tmp_path / "a" / "tree")
    make_tree(tmp_path / "b" / "tree", classes=("x", "y"))
    argv = [*ARGS, "--data", "imagefolder", "--batch-size", "4", "--data-dir", "tree", "--output-dir",
            str(tmp_path / "out")]
    monkeypatch.chdir(tmp_path / "a")
    assert main([*argv, "--layouts", "c_c_t_t"]) == 0
    trained = []
    monkeypatch.setattr(study, "train", lambda config, **kwargs: trained.append(config.model))
    monkeypatch.chdir(tmp_path / "b")
    one_line(capsys, [*argv, "--layouts", "vit_rel,c_c_t_t"], "holds a study run with other settings (data_dir)")
    (tmp_path / "out" / "study.json").unlink()  # each run's own record decides, before any run trains
    one_line(capsys, [*argv, "--layouts", "vit_rel,c_c_t_t"],
             "c_c_t_t-seed0 was trained with other settings (data_dir) than this study's")
    assert trained == [] and sorted(os.listdir(tmp_path / "out" / "runs")) == ["c_c_t_t-seed0"]


def test_training_notes_reach_the_user_and_warm_up_can_be_set(tmp_path, capsys):
    """A warm-up longer than the run (the recipe's 50 steps, or ImageNet's 10000 on a smaller data set)
    leaves the rate rising to the end: training's note says so, shown on stderr as well as in the run's
    train.log (before: in train.log only), and --warmup-steps sets it, as the note says to."""
    from coatnet.cli import build_parser

    capsys.readouterr()
    assert main([*ARGS, "--layouts", "c_c_t_t", "--output-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert err.count("c_c_t_t-seed0: note: --warmup-steps 50 covers the whole run of 5 steps") == 1, err
    args = build_parser().parse_args([*ARGS, "--warmup-steps", "2"])
    assert study.study_settings(args)["warmup_steps"] == 2
    assert study.study_settings(build_parser().parse_args(ARGS))["warmup_steps"] == 50


def test_layouts_of_other_seed_counts_are_labelled_with_their_own():
    """Runs of an earlier --seeds stay in the study: a layout run at 3 seeds beside one run at 1 is not
    all "3 seed(s)" (before: the header gave the largest count for every row)."""
    def record(model, seed, top1):
        return dict(layout=study.LABELS[model], model=model, seed=seed, params=1e6, flops=1e6, train_loss=1.0,
                    top1=top1)
    records = [record("c_c_t_t", s, 50.0 + s) for s in range(3)] + [record("vit_rel", 0, 40.0)]
    summary = study.summarise(records)
    settings = dict(data="digits", img_size=16, size="small", epochs=1, batch_size=256, lr=0.002)
    md = study.study_markdown(settings, summary, ["C-C-T-T", "VIT_REL"], ["C-C-T-T", "VIT_REL"])
    assert "1 to 3 seeds, as each row says" in md and "3 seed(s)" not in md
    assert "| C-C-T-T | 3 | 1.00M |" in md and "| VIT_REL | 1 | 1.00M |" in md and "| layout | seeds |" in md
    even = study.study_markdown(settings, study.summarise(records[:3]), ["C-C-T-T"], ["C-C-T-T"])
    assert "; 3 seed(s)." in even and "| C-C-T-T | 1.00M |" in even
    # one seed: each row's own run, no spread said (before: "40.00 ± 0.00 [40.00, 40.00]", as if seeds agreed)
    assert "| VIT_REL | 1 | 1.00M | 1.0M | 40.00 | 1.0000 |" in md and "± 0.00" not in md.split("VIT_REL |")[1]
    one = study.study_markdown(settings, study.summarise(records[3:]), ["VIT_REL"], ["VIT_REL"])
    assert "| VIT_REL | 1.00M | 1.0M | 40.00 | 1.0000 |" in one and "±" not in one


def test_the_study_trains_without_augmentation(tmp_path, monkeypatch):
    """FACTS.md (Section 2.2): the five layouts are "Trained without regularisation or augmentation": on
    ImageFolder data (CIFAR, shards) no random resized crop or flip either, which narrow the very gap
    between training loss and eval accuracy the study reads generalisation from (before: drawn for every
    training image; only the embedded digits trained unaugmented)."""
    from torchvision.transforms import v2

    import coatnet.train as training
    from test_data import make_tree

    make_tree(tmp_path / "tree")
    built, real = [], training.build_datasets

    def recording(*args, **kwargs):
        built.append(real(*args, **kwargs))
        raise KeyboardInterrupt  # the data seen, the run need not train

    monkeypatch.setattr(training, "build_datasets", recording)
    assert main([*ARGS, "--layouts", "c_c_t_t", "--data", "imagefolder", "--batch-size", "4", "--data-dir",
                 str(tmp_path / "tree"), "--output-dir", str(tmp_path / "out")]) == 130
    random_ops = (v2.RandomResizedCrop, v2.RandomCrop, v2.RandomHorizontalFlip, v2.RandAugment)
    used = [type(t).__name__ for t in built[0].train.transform.transforms if isinstance(t, random_ops)]
    assert used == [], f"the study's training images are augmented: {used}"


def _record(model, seed, top1, loss):
    return dict(layout=study.LABELS[model], model=model, seed=seed, params=1e6, flops=1e6, train_loss=loss, top1=top1,
                curves=dict(epoch=[1], train_loss=[loss], eval_loss=[loss], top1=[top1]))


def test_the_orderings_are_best_first_and_the_spread_is_over_seeds(tmp_path):
    """study.json orders layouts by eval top-1 highest first and by train loss lowest first; each
    figure is the mean over seeds with their sample standard deviation (n - 1)."""
    records = [_record("c_c_c_c", 0, 60.0, 0.5), _record("c_c_c_c", 1, 70.0, 0.7),
               _record("vit_rel", 0, 40.0, 0.2), _record("c_t_t_t", 0, 50.0, 0.9)]
    settings = dict(data="digits", img_size=16, size="small", epochs=1, batch_size=256, lr=0.002)
    study.write_study(tmp_path, settings, records)
    written = json.loads((tmp_path / "study.json").read_text())
    assert written["ordering"] == dict(eval_top1=["C-C-C-C", "C-T-T-T", "VIT_REL"],
                                       train_loss=["VIT_REL", "C-C-C-C", "C-T-T-T"])
    top1 = written["summary"]["C-C-C-C"]["top1"]
    assert top1["mean"] == pytest.approx(65.0) and top1["std"] == pytest.approx(50 ** 0.5)
    assert (top1["min"], top1["max"], top1["n"]) == (60.0, 70.0, 2)
    assert written["summary"]["VIT_REL"]["top1"]["std"] == 0.0
    assert "| by eval top-1 (generalisation) | C-C-C-C > C-T-T-T > VIT_REL |" in (tmp_path / "study.md").read_text()


def test_a_one_epoch_studys_figure_ticks_whole_epochs(tmp_path, monkeypatch):
    """One epoch, one point per layout: the x axis still ticks whole epochs (before: 0.96, 0.98, 1.00 ...)."""
    drawn = []
    monkeypatch.setattr(study, "save_figure", lambda fig, path: drawn.append(fig))
    study.plot_study([_record("c_c_c_c", 0, 60.0, 0.5), _record("vit_rel", 0, 40.0, 0.2)], tmp_path / "s.png")
    ticks = [tick for ax in drawn[0].axes[:2] for tick in ax.get_xticks()]
    assert ticks and all(tick == int(tick) for tick in ticks), ticks
