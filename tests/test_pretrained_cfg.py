"""Preprocessing travels with the weights (``pretrained_cfg``), and fine-tuning on a folder of photos.

timm's weights are stood in for by a timm model with random weights: nothing is downloaded.
"""

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms import v2

import coatnet
from coatnet.cli import main
from coatnet.models.preprocessing import IMAGENET_MEAN, PretrainedCfg, data_transforms, imagenet_class_names
from test_data import make_tree
from test_hub import SIZE, timm_nano, timm_repo

TIMM = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")


def image(path, size=(50, 30), seed=0):
    """A noise image of ``size`` (width, height)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def timm_file(tmp_path):
    """A file of timm's coatnet_nano_rw_224 weights (random), ImageNet-sized head, at SIZE px."""
    save_file(timm_nano(num_classes=1000).state_dict(), str(tmp_path / "nano.safetensors"))
    return tmp_path / "nano.safetensors"


def test_a_new_model_has_ours_and_it_is_saved_and_read_back(tmp_path):
    model = coatnet.create_model("coatnet_pico", num_classes=3, img_size=64)
    assert model.pretrained_cfg == PretrainedCfg(mean=IMAGENET_MEAN, crop_pct=0.875)
    assert coatnet.create_model("coatnet_pico", img_size=32).pretrained_cfg.crop_pct == 1.0  # small: no crop
    model.pretrained_cfg = PretrainedCfg(crop_pct=0.9, crop_mode="squash", label_names=("a", "b", "c"), **TIMM)
    folder = model.save_pretrained(tmp_path / "m")
    assert json.loads((folder / "config.json").read_text())["pretrained_cfg"]["label_names"] == ["a", "b", "c"]
    assert coatnet.from_pretrained(folder).pretrained_cfg == model.pretrained_cfg
    again = coatnet.create_model("coatnet_pico", pretrained=folder, img_size=64)  # a folder keeps its head
    assert again.num_classes == 3 and again.pretrained_cfg == model.pretrained_cfg
    with pytest.warns(UserWarning, match="classifier"):  # a new head: the names no longer apply
        other = coatnet.create_model("coatnet_pico", pretrained=folder, img_size=64, num_classes=5)
    assert other.pretrained_cfg == model.pretrained_cfg.with_classes(5) and other.pretrained_cfg.label_names is None
    # nor after a fresh head of as many classes: they are no longer those classes (predict named them so)
    again.reset_classifier(3)
    assert again.pretrained_cfg == replace(model.pretrained_cfg, label_names=None)


def test_timm_weights_bring_timms_preprocessing_and_imagenet_names(timm_file, tmp_path):
    model = coatnet.create_model("coatnet_nano_rw_224", pretrained=timm_file, img_size=SIZE)
    assert model.pretrained_cfg == PretrainedCfg(crop_pct=0.9, label_names=imagenet_class_names(), **TIMM)
    # convert-timm writes them into the folder, and the 384 px fine-tunes resize without a crop
    assert main(["convert-timm", str(timm_file), "--model", "coatnet_nano_rw", "--output", str(tmp_path / "c")]) == 0
    assert coatnet.from_pretrained(tmp_path / "c").pretrained_cfg == model.pretrained_cfg
    from coatnet.models.timm_convert import timm_pretrained_cfg

    big = timm_pretrained_cfg("coatnet_rmlp_2_rw", 384, 1000)
    assert (big.crop_pct, big.crop_mode, big.mean) == (1.0, "squash", (0.5, 0.5, 0.5))
    assert timm_pretrained_cfg("coatnet_bn_0_rw", 224, 10).mean == IMAGENET_MEAN


def test_a_hub_repository_brings_its_own_pretrained_cfg(hub):
    theirs = timm_nano(num_classes=3)
    snapshot = hub("timm/coatnet_nano_rw_224.sw_in1k")
    timm_repo(snapshot, theirs)
    config = json.loads((snapshot / "config.json").read_text())
    config |= dict(label_names=["x", "y", "z"], pretrained_cfg=dict(crop_pct=0.8, mean=[0.1, 0.2, 0.3],
                                                                    interpolation="bilinear", tag="sw_in1k"))
    (snapshot / "config.json").write_text(json.dumps(config))
    expected = PretrainedCfg(mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5), crop_pct=0.8, label_names=("x", "y", "z"))
    model = coatnet.create_model("coatnet_nano_rw_224.sw_in1k", pretrained=True, img_size=SIZE)
    assert model.pretrained_cfg == expected
    assert coatnet.from_pretrained("hf-hub:timm/coatnet_nano_rw_224.sw_in1k").pretrained_cfg == expected


def test_data_transforms_is_the_torchvision_pipeline_the_cfg_describes(tmp_path):
    model = coatnet.create_model("coatnet_pico", num_classes=3, img_size=64)
    model.pretrained_cfg = PretrainedCfg(crop_pct=0.95, **TIMM)
    picture = Image.open(image(tmp_path / "a.png"))
    by_hand = v2.Compose([v2.ToImage(), v2.Resize(67, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                          v2.CenterCrop(64), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)])
    torch.testing.assert_close(coatnet.data_transforms(model)(picture), by_hand(picture), rtol=0, atol=0)
    assert data_transforms(model, is_training=True)(picture).shape == (3, 64, 64)  # create_transform's spelling
    # squash: both sides resized, so a band at the left edge of a wide image survives the crop
    band = np.zeros((30, 90, 3), np.uint8)
    band[:, :3] = 255
    model.pretrained_cfg = PretrainedCfg(crop_pct=1.0, crop_mode="squash", mean=(0, 0, 0), std=(1, 1, 1))
    squashed = coatnet.data_transforms(model)(Image.fromarray(band))
    assert squashed.shape == (3, 64, 64) and squashed[:, :, 0].min() > 0.5 and squashed[:, :, -1].max() < 0.1


@pytest.fixture
def folder(tmp_path):
    """A 3-class model folder with timm's preprocessing and its own class names."""
    torch.manual_seed(0)
    model = coatnet.create_model("coatnet_pico", num_classes=3, img_size=64)
    model.pretrained_cfg = PretrainedCfg(crop_pct=0.95, label_names=("ant", "bee", "cow"), **TIMM)
    return model.save_pretrained(tmp_path / "m")


def test_predict_prepares_images_as_recorded_unless_flags_say_otherwise(folder, tmp_path, capsys):
    picture = image(tmp_path / "a.png", size=(90, 70))
    model = coatnet.from_pretrained(folder)

    def predicted(*flags):
        assert main(["predict", "--checkpoint", str(folder), str(picture), "--json", "--top-k", "3", *flags]) == 0
        return {t["label"]: t["probability"] for t in json.loads(capsys.readouterr().out)["predictions"][0]["top"]}

    def expected(cfg):
        model.pretrained_cfg = cfg
        with torch.no_grad():
            probs = model(coatnet.data_transforms(model)(Image.open(picture))[None]).softmax(1)[0]
        return dict(zip(("ant", "bee", "cow"), probs.tolist()))

    recorded = model.pretrained_cfg
    assert predicted() == pytest.approx(expected(recorded), abs=1e-6)
    flags = ["--mean", "0", "0", "0", "--std", "1", "1", "1", "--interpolation", "nearest", "--crop-pct", "0.5"]
    overridden = PretrainedCfg(mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest", crop_pct=0.5,
                               label_names=recorded.label_names)
    assert predicted(*flags) == pytest.approx(expected(overridden), abs=1e-6)
    assert expected(overridden) != pytest.approx(expected(recorded), abs=1e-3)  # the flags changed something


@pytest.mark.parametrize("flags,message", [
    (["--crop-pct", "0"], "argument --crop-pct: must be a finite number >= 0.1 and <= 1, got '0'"),
    (["--std", "1", "0", "1"], "std must be 3 numbers (one per channel) from 0.001 to 1, on pixels scaled to [0, 1]"),
    (["--mean", "nan", "0", "0"], "mean must be 3 numbers (one per channel) from 0 to 1, on pixels scaled to [0, 1] "
                                  "(divide 0-255 values by 255), got (nan, 0.0, 0.0)"),
    (["--std", "inf", "1", "1"], "std must be 3 numbers"),
    (["--std", "1e-300", "1", "1"], "std must be 3 numbers"),  # 0 in float32: NaN logits
    (["--mean", "123.7", "116.3", "103.5"], "(divide 0-255 values by 255)"),
    (["--interpolation", "lanczos"], "argument --interpolation: invalid choice: 'lanczos'"),
])
def test_bad_preprocessing_flags_are_one_line(folder, tmp_path, capsys, flags, message):
    assert main(["predict", "--checkpoint", str(folder), str(image(tmp_path / "a.png")), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("field,value,message", [
    ("interpolation", "sinc", "interpolation must be one of"),
    ("mean", [float("nan"), 0.5, 0.5], "mean must be 3 numbers"),
    ("mean", [True, False, True], "mean must be 3 numbers"),
    ("label_names", "abc", "label_names must be a list of strings"),
    ("label_names", [None, "b", "c"], "label_names must be a list of strings"),
])
def test_an_unusable_pretrained_cfg_is_one_line(folder, tmp_path, capsys, field, value, message):
    meta = json.loads((folder / "config.json").read_text())
    meta["pretrained_cfg"][field] = value
    (folder / "config.json").write_text(json.dumps(meta))
    assert main(["predict", "--checkpoint", str(folder), str(image(tmp_path / "a.png"))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"has an unusable pretrained_cfg ({message}" in err


def test_predict_refuses_a_model_without_a_classifier(tmp_path, capsys):
    model = coatnet.create_model("coatnet_pico", img_size=32)
    model.reset_classifier(0)
    folder = model.save_pretrained(tmp_path / "features")
    assert main(["predict", "--checkpoint", str(folder), str(image(tmp_path / "a.png"))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no classifier (0 classes): there is nothing to predict" in err


@pytest.mark.parametrize("fmt", ["onnx", "exported"])
def test_export_records_the_preprocessing(folder, tmp_path, fmt):
    out = tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt2")
    assert main(["export", "--checkpoint", str(folder), "--format", fmt, "--output", str(out),
                 "--crop-pct", "0.8"]) == 0
    if fmt == "onnx":
        import onnx

        text = {p.key: p.value for p in onnx.load(str(out)).metadata_props}["preprocessing.json"]
    else:
        files = {"preprocessing.json": ""}
        torch.export.load(str(out), extra_files=files)
        text = files["preprocessing.json"]
    recorded = json.loads(text)
    assert recorded["input_size"] == [3, 64, 64] and recorded["crop_pct"] == 0.8
    assert recorded["mean"] == [0.5] * 3 and recorded["label_names"] == ["ant", "bee", "cow"]


def test_a_cfg_prints_many_class_names_in_short():
    """ImageNet's 1000 names are said by their count and ends (before: 13 kB of them in every printed cfg);
    a few are said whole."""
    many = PretrainedCfg(label_names=tuple(imagenet_class_names()))
    assert "label_names=<1000 names: 'tench', 'goldfish', 'great white shark', ..., 'toilet tissue'>" in repr(many)
    assert len(repr(many)) < 300 and repr(many).startswith("PretrainedCfg(mean=(0.485, 0.456, 0.406), ")
    assert "label_names=('a', 'b')" in repr(PretrainedCfg(label_names=("a", "b")))


def test_a_cfg_prints_up_to_six_class_names_whole():
    """Up to six names are printed whole; from seven on, in short."""
    six, seven = (tuple("abcdefg"[:n]) for n in (6, 7))
    assert f"label_names={six!r}" in repr(PretrainedCfg(label_names=six))
    assert "label_names=<7 names: 'a', 'b', 'c', ..., 'g'>" in repr(PretrainedCfg(label_names=seven))


def test_finetune_on_a_folder_of_photos_from_timm_weights(timm_file, tmp_path, capsys):
    """The README's fine-tuning command, at a tiny size: timm's weights (ImageNet head) in, a model of the
    folder's classes out, preparing images as timm's weights expect; predict prints the folder's names.
    The new classifier is said in the run's line, not in a warning (before: "the checkpoint has a
    classifier that does not fit 3 classes", for what fine-tuning asks)."""
    photos = make_tree(tmp_path / "photos", per_class=2)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "the checkpoint has")
        assert main(["train", "--recipe", "finetune", "--model", "coatnet_nano_rw_224", "--pretrained", str(timm_file),
                     "--data-dir", str(photos), "--img-size", "32", "--epochs", "1", "--batch-size", "3",
                     "--workers", "0", "--output-dir", str(out)]) == 0
    assert (f"fine-tuning from the weights of {timm_file}, a new classifier for the 3 classes (theirs: "
            f"{coatnet.create_model('coatnet_nano_rw_224', pretrained=timm_file).num_classes})"
            in capsys.readouterr().out)
    tuned = coatnet.from_pretrained(out / "last")
    assert tuned.pretrained_cfg == PretrainedCfg(crop_pct=0.9, label_names=("bird", "cat", "dog"), **TIMM)
    assert main(["predict", "--checkpoint", str(out), str(photos / "val" / "cat" / "0.png"), "--json"]) == 0
    labels = [t["label"] for t in json.loads(capsys.readouterr().out)["predictions"][0]["top"]]
    assert sorted(labels) == ["bird", "cat", "dog"]


@pytest.mark.parametrize("argv,message", [
    (["--pretrained", "w.pth", "--resume"], "--pretrained starts a new run from weights and --resume continues"),
    (["--pretrained", ""], "--pretrained was given an empty path"),
    (["--model", "hf-hub:me/w"], "--model takes a model name (see `coatnet info`), not hf-hub:me/w; to start from"),
])
def test_pretrained_misuse_is_one_line(tmp_path, capsys, argv, message):
    assert main(["train", *argv, "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "run").exists()


def test_the_finetune_recipe_trains_at_the_models_own_size():
    from coatnet.train import RECIPES, model_img_size

    assert RECIPES["finetune"].img_size is None and RECIPES["finetune"].pretrained is True
    assert model_img_size("coatnet_0_rw_224.sw_in1k") == 224
    assert model_img_size("coatnet_rmlp_2_rw_384.sw_in12k_ft_in1k") == 384


def test_the_finetune_recipe_asks_the_hub_for_timms_weights(hub, tmp_path, capsys):
    """Offline with an empty cache, the recipe's default weights are one line naming the repository."""
    photos = make_tree(tmp_path / "photos", per_class=1)
    assert main(["train", "--recipe", "finetune", "--data-dir", str(photos), "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "timm/coatnet_0_rw_224.sw_in1k is not in the Hugging Face cache" in err


def test_timms_data_config_reads_our_models():
    """timm's own recipe, ``create_transform(**resolve_model_data_config(model))``, reads the
    preprocessing and the model's own input size (not timm's fallback of 224)."""
    pytest.importorskip("timm")
    from timm.data import create_transform, resolve_model_data_config

    for model, input_size in ((coatnet.create_model("coatnet_pico", img_size=(32, 64)), (3, 32, 64)),
                              (coatnet.create_model("coatnet_0_rw_224", img_size=256), (3, 256, 256)),
                              (coatnet.create_model("coatnet_pico", features_only=True, img_size=96, in_chans=1),
                               (1, 96, 96))):
        cfg = model.pretrained_cfg
        resolved = resolve_model_data_config(model)
        assert resolved == dict(input_size=input_size, interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std,
                                crop_pct=cfg.crop_pct, crop_mode=cfg.crop_mode)
        create_transform(**resolved)
    cfg = coatnet.create_model("coatnet_pico").pretrained_cfg
    assert cfg.get("test_input_size", "none") == "none" and "input_size" not in cfg.to_dict()
    with pytest.raises(KeyError):
        cfg["num_classes"]


@pytest.mark.parametrize("name", ["coatnet_0_rw_224.sw_in1k", "coatnet_rmlp_2_rw_384", "coatnet_2_rw_224"])
def test_a_timm_name_built_without_weights_prepares_images_as_timm(name):
    """As in timm: its name of published weights carries their preprocessing even without them;
    our own names keep ours."""
    timm = pytest.importorskip("timm")
    from timm.data import resolve_model_data_config

    with torch.device("meta"):
        ours = resolve_model_data_config(coatnet.create_model(name))
        theirs = resolve_model_data_config(timm.create_model(name, pretrained=False))
    assert ours == theirs
    assert coatnet.create_model("coatnet_0_rw").pretrained_cfg == PretrainedCfg()


def test_pretrained_without_a_recipe_or_img_size_trains_at_the_weights_size(timm_file, tmp_path, capsys):
    """timm's way, `coatnet train --model NAME --pretrained WEIGHTS --data-dir DIR`: the weights' input size
    (their tables show SIZE), not the digits recipe's 32 px, their tables shrunk without a word (before)."""
    photos = make_tree(tmp_path / "photos", per_class=1)
    assert main(["train", "--model", "coatnet_nano_rw_224", "--pretrained", str(timm_file), "--data", "imagefolder",
                 "--data-dir", str(photos), "--epochs", "1", "--batch-size", "3",
                 "--output-dir", str(tmp_path / "run")]) == 0
    meta = json.loads((tmp_path / "run" / "last" / "config.json").read_text())
    assert meta["config"]["img_size"] == [SIZE, SIZE] and meta["train_config"]["img_size"] == SIZE
    out = capsys.readouterr().out
    assert f"at {SIZE}x{SIZE}" in out and "a new classifier for the 3 classes" in out


def test_pretrained_naming_the_new_runs_own_output_dir_is_one_line(tmp_path, capsys):
    """Before: "'run' holds no checkpoint yet: its run is in its first epoch", of the folder this run had just made."""
    photos = make_tree(tmp_path / "photos", per_class=1)
    run = tmp_path / "run"
    assert main(["train", "--pretrained", str(run), "--data", "imagefolder", "--data-dir", str(photos),
                 "--epochs", "1", "--batch-size", "3", "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--pretrained {run} is this new run's own --output-dir" in err
    assert not run.exists()


def test_a_grey_models_weights_are_fine_tuned_on_colour_images(tmp_path, capsys):
    """Training reads RGB images: weights of one input channel have their filters spread over the three
    colours, so that a grey image gives what it gave. Before: "pass in_chans=1", which coatnet train has no flag for."""
    grey = coatnet.create_model("coatnet_pico", in_chans=1, num_classes=4, img_size=32)
    grey.save_pretrained(tmp_path / "grey")
    photos = make_tree(tmp_path / "photos", per_class=1)
    assert main(["train", "--pretrained", str(tmp_path / "grey"), "--data", "imagefolder", "--data-dir",
                 str(photos), "--epochs", "1", "--batch-size", "3", "--lr", "1e-9", "--min-lr", "0",
                 "--output-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "1 input channel" in out and "a new classifier for the 3 classes (theirs: 4)" in out
    tuned = coatnet.from_pretrained(tmp_path / "run" / "last").state_dict()["stem.0.0.weight"]
    given = grey.state_dict()["stem.0.0.weight"]
    assert tuned.shape[1] == 3  # a third of each grey filter per colour (lr 1e-9: as loaded)
    torch.testing.assert_close(tuned, given.expand(-1, 3, -1, -1) / 3, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("source", ["hub", "folder"])
def test_pretrained_weights_of_a_folder_or_repository_bring_their_network(hub, tmp_path, capsys, source):
    """`coatnet train --pretrained hf-hub:ORG/NAME` (or a save_pretrained folder, a run) without --model
    fine-tunes the network its config.json names (before: the digits recipe's coatnet_pico, refused as
    "these weights are not coatnet_pico's"); a weights file still needs --model, which the error names."""
    if source == "hub":
        timm_repo(hub("me/nano"), timm_nano(num_classes=3))
        pretrained, network = "hf-hub:me/nano", "coatnet_nano_rw"
    else:
        coatnet.create_model("coatnet_nano", num_classes=3).save_pretrained(tmp_path / "nano")
        pretrained, network = str(tmp_path / "nano"), "coatnet_nano"
    photos = make_tree(tmp_path / "photos", per_class=1)
    assert main(["train", "--pretrained", pretrained, "--data", "imagefolder", "--data-dir", str(photos),
                 "--epochs", "1", "--batch-size", "3", "--output-dir", str(tmp_path / "run")]) == 0
    meta = json.loads((tmp_path / "run" / "last" / "config.json").read_text())
    assert meta["model"] == network and f"training {network} " in capsys.readouterr().out
    if source == "hub":
        save_file(timm_nano(num_classes=3).state_dict(), str(tmp_path / "nano.safetensors"))
        assert main(["train", "--pretrained", str(tmp_path / "nano.safetensors"), "--data", "imagefolder",
                     "--data-dir", str(photos), "--epochs", "1", "--batch-size", "3", "--output-dir",
                     str(tmp_path / "file")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "(coatnet train --model coatnet_nano_rw)" in err, err
    else:  # our own weights file of another network, at another size and with other classes (before: 168 keys
        # said not to fit coatnet_pico, "check the model name")
        torch.save(coatnet.create_model("coatnet_nano", num_classes=5, img_size=64).state_dict(), tmp_path / "n.pth")
        assert main(["train", "--pretrained", str(tmp_path / "n.pth"), "--data", "imagefolder", "--data-dir",
                     str(photos), "--epochs", "1", "--batch-size", "3", "--output-dir", str(tmp_path / "file")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.endswith(
            "these weights are not coatnet_pico's: they are coatnet_nano's; load them as coatnet_nano (coatnet train "
            "--model coatnet_nano)\n"), err
    assert not (tmp_path / "file").exists()


def test_training_crops_are_resized_with_the_weights_interpolation():
    """Fine-tuning timm's bicubic weights resizes the random crop bicubically: the same crop (same seed) as a
    torchvision RandomResizedCrop of that interpolation, not a bilinear one."""
    from coatnet.models.preprocessing import train_transform

    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    outputs = {}
    for mode in ("bilinear", "bicubic"):
        cfg = PretrainedCfg(interpolation=mode)
        torch.manual_seed(0)
        outputs[mode] = train_transform(24, cfg, hflip=False)(image)
        torch.manual_seed(0)
        crop = v2.RandomResizedCrop(24, interpolation=v2.InterpolationMode(mode), antialias=True)(image)
        expected = v2.Normalize(cfg.mean, cfg.std)(v2.ToDtype(torch.float32, scale=True)(crop))
        torch.testing.assert_close(outputs[mode], expected)
    assert not torch.equal(outputs["bilinear"], outputs["bicubic"])
