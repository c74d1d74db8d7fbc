"""Interoperability: save_pretrained / from_pretrained, training checkpoints, export, timm weights."""

import argparse
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import coatnet
from coatnet.cli import main
from coatnet.export import export_model
from coatnet.models import convert_timm_state_dict, load_weights, timm_variants
from conftest import randomise_norms


@pytest.fixture(scope="module")
def pico():
    torch.manual_seed(0)
    return randomise_norms(coatnet.create_model("coatnet_pico", num_classes=7))


# -- save_pretrained / from_pretrained ---------------------------------------------------------


def test_save_pretrained_round_trips_exactly(pico, tmp_path):
    folder = pico.save_pretrained(tmp_path / "pico")
    meta = json.loads((folder / "config.json").read_text())
    assert meta["model"] == "coatnet_pico" and meta["config"] == pico.config.to_dict()
    assert (folder / "model.safetensors").is_file()
    # readable as config.json is (safetensors alone writes its files 0600: a server of another user's
    # could not read them)
    assert (folder / "model.safetensors").stat().st_mode == (folder / "config.json").stat().st_mode
    loaded = coatnet.from_pretrained(folder)
    assert loaded.config == pico.config and not loaded.training
    theirs = loaded.state_dict()
    assert pico.state_dict().keys() == theirs.keys()
    assert all(torch.equal(v, theirs[k]) for k, v in pico.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pico(x), loaded(x))


def test_save_pretrained_replaces_only_a_model_folder_of_ours(pico, tmp_path):
    """Over our own folder it writes the new model (Hugging Face's convention), other files kept (a
    Hub clone's README); over a run, a checkpoint or another program's config.json it refuses in one
    line, all kept: before, a run's new config.json stood for its `last`, a checkpoint lost its EMA."""
    from coatnet.models.folder import ModelFolderError

    folder = pico.save_pretrained(tmp_path / "pico")
    (folder / "README.md").write_text("mine")
    other = coatnet.create_model("coatnet_pico", num_classes=3)
    assert coatnet.from_pretrained(other.save_pretrained(folder)).num_classes == 3
    assert (folder / "README.md").read_text() == "mine"
    (folder / "best").mkdir()  # a folder of the user's own, named as a run's link (before: refused as a run)
    (folder / "best" / "notes.txt").write_text("mine")
    assert coatnet.from_pretrained(pico.save_pretrained(folder)).num_classes == pico.num_classes
    assert (folder / "best" / "notes.txt").read_text() == "mine"
    copied = tmp_path / "copied"  # a run copied without its links (cp -r): `best` a checkpoint's folder
    pico.save_pretrained(copied / "best")
    run, checkpoint, foreign = tmp_path / "run", tmp_path / "ckpt", tmp_path / "foreign"
    (run / "ckpt-00000001").mkdir(parents=True)
    (run / "last").symlink_to("ckpt-00000001")
    checkpoint.mkdir()
    (checkpoint / "train_state.pt").write_bytes(b"state")
    foreign.mkdir()
    (foreign / "config.json").write_text('{"architectures": ["BertModel"]}')
    for where, message in ((run, "holds a training run, whose checkpoints these weights would hide"),
                           (copied, "holds a training run, whose checkpoints these weights would hide"),
                           (checkpoint, r"is a training checkpoint, whose weights \(and EMA\) these would replace"),
                           (foreign, "config.json' is not a coatnet model's and would be replaced; move it")):
        before = sorted(p.name for p in where.iterdir())
        with pytest.raises(ModelFolderError, match=message):
            pico.save_pretrained(where)
        assert sorted(p.name for p in where.iterdir()) == before
    assert (foreign / "config.json").read_text() == '{"architectures": ["BertModel"]}'


def test_a_hand_replaced_classifier_is_refused_on_save_and_on_load(tmp_path):
    """model.classifier = Linear(..., 5) leaves model.config at 10 classes: saving it would write a
    folder that loads with a random 10-class head. Refused; and such a folder is refused on reading."""
    model = coatnet.create_model("coatnet_pico", num_classes=10)
    model.classifier = torch.nn.Linear(model.head_hidden_size, 5)
    with pytest.raises(ValueError, match=r"do not fit model.config \(classifier.bias, classifier.weight\).*"
                                         r"model.reset_classifier\(N\)"):
        model.save_pretrained(tmp_path / "replaced")
    assert not (tmp_path / "replaced").exists()
    model.reset_classifier(5)
    folder = model.save_pretrained(tmp_path / "five")
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["num_classes"], meta["pretrained_cfg"]["label_names"] = 9, None  # edited by hand
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError) as e:
        coatnet.from_pretrained(folder)
    assert "holds weights that do not fit its own config.json" in str(e.value) and "classifier.weight" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", timm_variants())
def test_timm_variant_configs_round_trip_through_json(name):
    with torch.device("meta"):
        config = coatnet.create_model(name).config
    assert coatnet.CoAtNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_training_checkpoint_and_run_dir_load(pico, tmp_path):
    checkpoint = pytest.importorskip("coatnet.checkpoint")
    ema = randomise_norms(coatnet.create_model("coatnet_pico", num_classes=7))
    meta = {"model": "coatnet_pico", "config": pico.config.to_dict(), "classes": [str(i) for i in range(7)],
            "img_size": 32}
    ckpt = checkpoint.save_checkpoint(tmp_path, "ckpt-00000010", meta, pico, ema_model=ema)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ema(x)  # training evaluated the EMA: loading gives it
        for source in (ckpt, tmp_path):  # a checkpoint, and a run directory (its last checkpoint)
            assert torch.equal(coatnet.from_pretrained(source)(x), expected)
        named = coatnet.create_model("coatnet_pico", num_classes=7, pretrained=tmp_path).eval()
        assert torch.equal(named(x), expected)


def test_from_pretrained_bad_input(pico, tmp_path, capsys):
    with pytest.raises(ValueError, match="does not exist"):
        coatnet.from_pretrained(tmp_path / "nothing")
    weights = tmp_path / "w.safetensors"
    save_file(pico.state_dict(), str(weights))
    with pytest.raises(ValueError, match=r"is a file; .*create_model\(NAME, pretrained=FILE\)"):
        coatnet.from_pretrained(weights)
    # On the command line, the flags that load it (before: only the Python call)
    from coatnet.cli import main

    assert main(["train", "--resume", str(weights)]) == 2
    assert "--model NAME --pretrained FILE (coatnet train)" in capsys.readouterr().err
    assert isinstance(coatnet.create_model("coatnet_pico", num_classes=7, pretrained=weights), coatnet.CoAtNet)


def test_weights_as_users_save_them_load_or_say_what_to_do(pico, tmp_path):
    """A torch.compile'd model's state dict (keys "_orig_mod.", under DDP's "module." too) loads; grey
    weights name in_chans (and only they); a feature extractor's weights, a whole pickled model and a
    feature extractor's save say what to do instead. Before: long key lists, "corrupt", an
    AttributeError."""
    from coatnet.models.folder import ModelFolderError

    compiled = {f"module._orig_mod.{k}": v for k, v in pico.state_dict().items()}
    torch.save(compiled, tmp_path / "compiled.pt")
    loaded = coatnet.create_model("coatnet_pico", num_classes=pico.num_classes, pretrained=tmp_path / "compiled.pt")
    assert all(torch.equal(v, pico.state_dict()[k]) for k, v in loaded.state_dict().items())
    save_file(coatnet.create_model("coatnet_pico", in_chans=1).state_dict(), str(tmp_path / "grey.safetensors"))
    with pytest.raises(ValueError, match="these weights take 1 input channel: pass in_chans=1$"):
        coatnet.create_model("coatnet_pico", pretrained=tmp_path / "grey.safetensors")
    patch = dict(img_size=64, stem=dict(kind="patch", stride=2, channels=16))  # another kernel, not channels
    save_file(coatnet.create_model("coatnet_pico", **patch).state_dict(), str(tmp_path / "patch.safetensors"))
    with pytest.raises(ValueError, match="wrong shape: stem.weight .*; check the model name and options"):
        coatnet.create_model("coatnet_pico", pretrained=tmp_path / "patch.safetensors",
                             **patch | dict(stem=dict(kind="patch", stride=4, channels=16)))
    torch.save(coatnet.create_model("coatnet_pico", features_only=True).state_dict(), tmp_path / "features.pt")
    with pytest.raises(ValueError, match=r"holds a feature extractor's weights \(keys model.\*\), which hold no "
                                         r"head; load them with extractor.load_state_dict"):
        coatnet.create_model("coatnet_pico", pretrained=tmp_path / "features.pt")
    torch.save(pico, tmp_path / "whole.pt")
    with pytest.raises(ValueError, match=r"holds pickled Python objects, not only tensors \(a coatnet\.models\.coatnet\."
                                         r"CoAtNet\).*if you trust the file.*a whole model's model.state_dict\(\)"):
        coatnet.create_model("coatnet_pico", pretrained=tmp_path / "whole.pt")
    with pytest.raises(ModelFolderError, match="for a FeatureExtractor save the model it was made from"):
        coatnet.models.save_pretrained(coatnet.create_model("coatnet_pico", features_only=True), tmp_path / "f")


def test_a_pytorch_lightning_checkpoint_of_the_model_loads(pico, tmp_path):
    """A LightningModule holding the model as `self.model` saves its weights under `model.` in the checkpoint's
    state_dict, beside its loop and optimizer states: loaded as the model's (a compiled one's too, as a
    DDP-wrapped one's `module.` is), by every way weights are given. Before: called a feature extractor's weights,
    which hold no head. A feature extractor's own weights (keys model.*, no head) still say so."""
    optimizer = torch.optim.AdamW(pico.parameters())
    for prefix in ("model.", "model._orig_mod."):
        torch.save({"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
                    "state_dict": {f"{prefix}{k}": v for k, v in pico.state_dict().items()},
                    "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [],
                    "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}}}, tmp_path / "last.ckpt")
        for model in (coatnet.create_model("coatnet_pico", pretrained=tmp_path / "last.ckpt", num_classes=7),
                      coatnet.create_model("coatnet_pico", checkpoint_path=str(tmp_path / "last.ckpt")),
                      load_weights(coatnet.create_model("coatnet_pico", num_classes=7), tmp_path / "last.ckpt")):
            assert all(torch.equal(v, pico.state_dict()[k]) for k, v in model.state_dict().items())
    # Its hyperparameters pickled as objects (here a path): not unpickled; the line names the object and says
    # how to take the weights out (before: "a model saved with torch.save(model)?", of a checkpoint of weights).
    torch.save({"state_dict": {f"model.{k}": v for k, v in pico.state_dict().items()},
                "hyper_parameters": {"data_dir": Path("/data")}}, tmp_path / "hparams.ckpt")
    with pytest.raises(ValueError, match=r"not only tensors \(a pathlib\.\w*Path\).*a PyTorch Lightning checkpoint's "
                                         r"\['state_dict'\]$"):
        coatnet.create_model("coatnet_pico", pretrained=tmp_path / "hparams.ckpt")
    features = coatnet.create_model("coatnet_pico", features_only=True, out_indices=(1, 2))
    torch.save({"state_dict": features.state_dict()}, tmp_path / "features.ckpt")
    with pytest.raises(ValueError, match=r"holds a feature extractor's weights \(keys model.\*\), which hold no head"):
        coatnet.create_model("coatnet_pico", pretrained=tmp_path / "features.ckpt")


def test_timms_feature_extractors_weights_say_they_hold_no_head(tmp_path):
    """timm's `features_only=True` model saved (keys stages_N.*): one line saying what they are (before: 286
    keys "missing" and 284 "unexpected", to check the model name by)."""
    timm = pytest.importorskip("timm")
    torch.save(timm.create_model("coatnet_nano_rw_224", img_size=32, features_only=True).state_dict(),
               tmp_path / "features.pth")
    with pytest.raises(ValueError, match=r"holds timm's feature extractor's weights \(features_only, keys "
                                         r"stages_N.\*\), which hold no head; save the model it was made from$"):
        coatnet.create_model("coatnet_nano_rw_224", pretrained=tmp_path / "features.pth")


# -- export -----------------------------------------------------------------------------------


def test_onnx_dynamic_batch_runs_in_onnxruntime(pico, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    folder = pico.save_pretrained(tmp_path / "pico")
    out = tmp_path / "pico.onnx"
    assert main(["export", "--checkpoint", str(folder), "--format", "onnx", "--output", str(out),
                 "--dynamic-batch"]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)  # exported at batch 1
    (logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), pico(x), atol=1e-4, rtol=1e-4)


def test_a_feature_extractors_onnx_outputs_are_its_maps_by_module(tmp_path):
    """Named as feature_info names them, each with a dynamic batch, not "logits" and a number."""
    ort = pytest.importorskip("onnxruntime")
    features = coatnet.create_model("coatnet_pico", features_only=True, out_indices=(1, 3)).eval()
    out = export_model(features, "onnx", tmp_path / "features.onnx", dynamic_batch=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [(o.name, o.shape[0]) for o in session.get_outputs()] == [("stages.0", "batch"), ("stages.2", "batch")]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for got, want in zip(session.run(None, {"images": x.numpy()}), features(x), strict=True):
            torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)


def test_onnx_fixed_batch_at_another_size(pico, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = export_model(pico, "onnx", tmp_path / "pico48.onnx", img_size=48, batch_size=2)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [d for d in session.get_inputs()[0].shape] == [2, 3, 48, 48]
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), pico(x),
                                   atol=1e-4, rtol=1e-4)


def test_onnx_without_the_onnx_package_is_one_line(pico, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    folder = pico.save_pretrained(tmp_path / "pico")
    earlier = tmp_path / "m.onnx"
    earlier.write_bytes(b"an earlier export")
    assert main(["export", "--checkpoint", str(folder), "--format", "onnx", "--output", str(earlier),
                 "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ONNX export needs the onnx package: pip install 'coatnet[export]'" in err
    assert earlier.read_bytes() == b"an earlier export"  # nothing already written is lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "pico"]


def test_torchscript(pico, tmp_path):
    out = export_model(pico, "torchscript", tmp_path / "pico.ts")
    scripted = torch.jit.load(str(out))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), pico(x), atol=1e-5, rtol=1e-5)
    # The trace fixed the relative-position biases of the 32x32 grid: another size is refused, not
    # run on them (it gave wrong logits without a word)
    for shape in ((1, 3, 16, 16), (1, 3, 32, 16), (1, 3, 64, 64)):
        with pytest.raises(torch.jit.Error, match=r"exported for \(N, C, 32, 32\) batches, got \["):
            scripted(torch.randn(shape))


def test_a_bfloat16_model_at_a_non_square_size(tmp_path):
    """The example input takes the model's dtype, and the Python API takes (height, width)."""
    torch.manual_seed(0)
    model = coatnet.create_model("coatnet_pico", num_classes=7).to(torch.bfloat16).eval()
    program = torch.export.load(str(export_model(model, "exported", tmp_path / "m.pt2", img_size=(32, 48)))).module()
    x = torch.randn(1, 3, 32, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x))


def test_torch_export_dynamic_batch(pico, tmp_path):
    out = export_model(pico, "exported", tmp_path / "pico.pt2", dynamic_batch=True)
    program = torch.export.load(str(out)).module()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program(x), pico(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("argv,message", [
    (["export", "--checkpoint", "{tmp}/missing", "--format", "onnx", "--output", "{tmp}/m.onnx"], "does not exist"),
    (["export", "--checkpoint", "{folder}", "--format", "tflite", "--output", "{tmp}/m.tflite"],
     "unknown export format 'tflite'; choose one of onnx, torchscript, exported"),
    (["export", "--checkpoint", "{folder}", "--format", "onnx", "--output", "{tmp}/m.onnx", "--img-size", "33"],
     "not a multiple of the model's stride 16"),
])
def test_export_bad_input_is_one_line_exit_2(pico, tmp_path, capsys, argv, message):
    folder = pico.save_pretrained(tmp_path / "pico")
    argv = [a.format(tmp=tmp_path, folder=folder) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("coatnet export: error: ") and message in err


# -- timm's weights ---------------------------------------------------------------------------

# Small inputs keep the parity tests fast (all twelve variants: ~20 s on two cores); every grid is
# still at least 2x2.
TIMM_SIZE = 64


def _timm_model(name: str, img_size: int = TIMM_SIZE, **kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return randomise_norms(timm.create_model(f"{name}_224", pretrained=False, img_size=img_size,
                                              num_classes=1000, **kwargs))


def _assert_parity(theirs, name, tmp_path, **switches):
    """timm's weights, saved and loaded by create_model(pretrained=FILE), give timm's outputs: the
    logits, and ``forward_features`` (the last map, normalised where timm's head norms before pooling).
    Returns both models and the input, in float64.

    In float32 to 1e-5 of the logits' scale (they reach ~20 with randomised norms, where float32
    rounding alone is ~1e-6); in float64 to 1e-10, which shows the conversion itself is exact.
    """
    weights = tmp_path / f"{name}.safetensors"
    save_file(theirs.state_dict(), str(weights))
    ours = coatnet.create_model(name, img_size=TIMM_SIZE, pretrained=weights, **switches).eval()
    x = torch.randn(1, 3, TIMM_SIZE, TIMM_SIZE)
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        ours, theirs, x = ours.double(), theirs.double(), x.double()
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x), rtol=1e-10, atol=1e-10)
    return ours, theirs, x


@pytest.mark.parametrize("name", timm_variants())
def test_timm_parity(name, tmp_path):
    _assert_parity(_timm_model(name), name, tmp_path)


@pytest.mark.parametrize("name", ["coatnet_nano_rw", "coatnet_rmlp_nano_rw"])
def test_timm_parity_of_forward_intermediates(name, tmp_path):
    """With timm's arguments: the stem's map and the last one normalised, or stopped early."""
    ours, theirs, x = _assert_parity(_timm_model(name), name, tmp_path)
    with torch.no_grad():
        for args in (dict(indices=[0, 4], norm=True), dict(indices=2, stop_early=True)):
            torch.testing.assert_close(ours.forward_intermediates(x, **args), theirs.forward_intermediates(x, **args),
                                       rtol=1e-10, atol=1e-10)


def test_timm_parity_layer_scale(tmp_path):
    """The layer scale of coatnet_3_rw and coatnet_rmlp_2_rw/_3_rw, on the smallest variant."""
    theirs = _timm_model("coatnet_rmlp_nano_rw", transformer_init_values=1e-6)
    _assert_parity(theirs, "coatnet_rmlp_nano_rw", tmp_path, transformer=dict(layer_scale_init=1e-6))


@pytest.mark.parametrize("name", ["coatnet_pico", "coatnet_rmlp_nano_rw_224"])
def test_timms_optimizer_factory_groups_as_training_does(name):
    """timm's create_optimizer_v2 asks the model what not to decay and how to group by depth: the
    relative-position bias goes undecayed, as in `coatnet train` (before: decayed), and layer-wise
    decay gives the stem the smallest rate and the head the full one (before: one group, a warning)."""
    import timm.optim

    from coatnet.train import param_groups

    model = coatnet.create_model(name, num_classes=10)
    theirs = timm.optim.create_optimizer_v2(model, "adamw", weight_decay=0.05)
    undecayed = lambda groups: {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}  # noqa: E731
    assert undecayed(theirs.param_groups) == undecayed(param_groups(model, 0.05))
    assert any(".relative_position." in n and id(p) in undecayed(theirs.param_groups) for n, p in model.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layered = timm.optim.create_optimizer_v2(model, "adamw", weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in layered.param_groups for p in g["params"]}
    stem, head = scale[id(model.stem[0][0].weight)], scale[id(model.classifier.weight)]
    blocks = sorted({scale[id(p)] for n, p in model.named_parameters() if n.startswith("stages.")})
    assert head == 1.0 and stem < blocks[0] and len(blocks) == sum(len(getattr(s, "blocks", s)) for s in model.stages)


def test_timm_variants_are_the_rw_family():
    assert set(timm_variants()) == {"coatnet_nano_rw", "coatnet_0_rw", "coatnet_1_rw", "coatnet_2_rw", "coatnet_3_rw",
                                    "coatnet_bn_0_rw", "coatnet_rmlp_nano_rw", "coatnet_rmlp_0_rw",
                                    "coatnet_rmlp_1_rw", "coatnet_rmlp_1_rw2", "coatnet_rmlp_2_rw",
                                    "coatnet_rmlp_3_rw"}


def test_convert_timm_cli_writes_a_pretrained_folder(tmp_path, capsys):
    """A .pth file at 64x64 with 10 classes: the folder keeps both, read from the tables and the head."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    theirs = randomise_norms(timm.create_model("coatnet_nano_rw_224", pretrained=False, img_size=64, num_classes=10))
    source = tmp_path / "nano.pth"
    torch.save(theirs.state_dict(), source)
    assert main(["convert-timm", str(source), "--model", "coatnet_nano_rw", "--output", str(tmp_path / "out")]) == 0
    assert "coatnet_nano_rw, 10 classes, 64x64 input" in capsys.readouterr().out
    ours = coatnet.from_pretrained(tmp_path / "out")
    assert ours.config.num_classes == 10 and ours.config.img_size == (64, 64)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    # Without --model, the variant the weights fit; --model in timm's name, with a tag, the same.
    assert main(["convert-timm", str(source), "--output", str(tmp_path / "found")]) == 0
    assert main(["convert-timm", str(source), "--model", "coatnet_nano_rw_224.sw_in1k", "--output",
                 str(tmp_path / "named")]) == 0
    assert capsys.readouterr().out.count("coatnet_nano_rw, 10 classes, 64x64 input") == 2
    assert coatnet.from_pretrained(tmp_path / "found").config == ours.config
    assert coatnet.from_pretrained(tmp_path / "named").config == ours.config
    # A training checkpoint of timm's train.py: its flags saved as a Namespace, the EMA's weights
    # beside the model's (taken, as timm's loader takes them), saved from DDP ("module." keys).
    checkpoint = tmp_path / "checkpoint-3.pth.tar"
    torch.save({"epoch": 3, "args": argparse.Namespace(model="coatnet_nano_rw_224", lr=1e-3),
                "state_dict": {k: v + 1 if v.is_floating_point() else v for k, v in theirs.state_dict().items()},
                "state_dict_ema": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(coatnet.create_model("coatnet_nano_rw", img_size=64, pretrained=checkpoint,
                                                        num_classes=10).eval()(x), theirs(x), atol=1e-5, rtol=1e-5)
    # A folder with files in it (a checkpoint, say, with its EMA weights) is written only with
    # --overwrite, and then the old EMA weights, which would be read in place of these, are gone.
    other = tmp_path / "other"
    coatnet.create_model("coatnet_pico").save_pretrained(other)
    (other / "ema.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    before = {f.name: f.read_bytes() for f in other.iterdir()}
    assert main(["convert-timm", str(source), "--output", str(other)]) == 2
    assert "is a folder with files in it" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in other.iterdir()} == before
    assert main(["convert-timm", str(source), "--output", str(other), "--overwrite"]) == 0
    assert not (other / "ema.safetensors").exists()
    with torch.no_grad():
        torch.testing.assert_close(coatnet.from_pretrained(other)(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_weights_of_the_wrong_model_name_the_keys(tmp_path, capsys):
    """timm weights of another variant are named as such; weights that fit no variant list the keys."""
    source = tmp_path / "nano.safetensors"
    state = _timm_model("coatnet_nano_rw").state_dict()
    save_file(state, str(source))
    with pytest.raises(ValueError) as e:
        coatnet.create_model("coatnet_rmlp_nano_rw", img_size=TIMM_SIZE, pretrained=source)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("these weights are not coatnet_rmlp_nano_rw's: they are timm's coatnet_nano_rw_224")
    assert main(["convert-timm", str(source), "--model", "coatnet_rmlp_nano_rw", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "they are timm's coatnet_nano_rw_224 (ours: coatnet_nano_rw)" in err
    del state["stages.3.blocks.1.attn.rel_pos.relative_position_bias_table"]  # now no variant fits
    save_file(state, str(source))
    with pytest.raises(ValueError) as e:
        coatnet.create_model("coatnet_rmlp_nano_rw", img_size=TIMM_SIZE, pretrained=source)
    message = str(e.value)
    assert "\n" not in message and message.startswith("weights do not fit coatnet_rmlp_nano_rw: missing: ")
    assert "relative_position.fc1.weight" in message and "unexpected: " in message
    assert "relative_position.table" in message


@pytest.mark.parametrize("argv,message", [
    (["convert-timm", "{tmp}/none.pth", "--model", "coatnet_0_rw", "--output", "{tmp}/o"], "does not exist"),
    (["convert-timm", "{ours}", "--model", "coatnet_0_rw", "--output", "{tmp}/o"],
     "does not hold timm CoAtNet weights"),
    (["convert-timm", "{timm}", "--model", "coatnet_0", "--output", "{tmp}/o"],
     "'coatnet_0' is not one of timm's CoAtNet variants"),
    # weights beside a run's checkpoints would stand for its `last` in every command
    (["convert-timm", "{timm}", "--output", "{tmp}/run", "--overwrite"],
     "holds a training run, whose checkpoints these weights would hide; give a new or empty folder"),
])
def test_convert_timm_bad_input_is_one_line_exit_2(pico, tmp_path, capsys, argv, message):
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "timm.safetensors"
    save_file(pico.state_dict(), str(ours))
    save_file({"stem.conv1.weight": torch.zeros(32, 3, 3, 3)}, str(theirs))
    (tmp_path / "run" / "ckpt-00000011").mkdir(parents=True)
    (tmp_path / "run" / "last").symlink_to("ckpt-00000011")
    assert main([a.format(tmp=tmp_path, ours=ours, timm=theirs) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("coatnet convert-timm: error: ") and message in err


def test_convert_timm_rmlp_weights_take_their_input_size(tmp_path, capsys):
    """The rmlp variants' weights hold no table to read the input size from: converted at the model's
    own with a note that says how to give another (timm's 384 px fine-tunes), or at --img-size, with
    timm's preprocessing for that size; weights with tables refuse a size other than theirs."""
    source = tmp_path / "rmlp.safetensors"
    save_file(_timm_model("coatnet_rmlp_nano_rw").state_dict(), str(source))
    assert main(["convert-timm", str(source), "--output", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "coatnet_rmlp_nano_rw, 1000 classes, 224x224 input" in out and "need --img-size 384" in out
    assert main(["convert-timm", str(source), "--img-size", "384", "--output", str(tmp_path / "b")]) == 0
    model = coatnet.from_pretrained(tmp_path / "b")
    assert model.config.img_size == (384, 384) and model.pretrained_cfg.crop_pct == 1.0
    tables = tmp_path / "nano.safetensors"
    save_file(_timm_model("coatnet_nano_rw").state_dict(), str(tables))
    assert main(["convert-timm", str(tables), "--img-size", "384", "--output", str(tmp_path / "c")]) == 2
    assert "these weights' relative-position tables are for 64 px; drop --img-size" in capsys.readouterr().err


def _damaged(state: dict, edit) -> dict:
    state = dict(state)
    edit(state)
    return state


S3_TABLE = "stages.2.blocks.0.attn.rel_pos.relative_position_bias_table"
DAMAGES = {  # what is wrong with timm's weights, what the one line says
    "a table with a dimension too many": (lambda s: s.update({S3_TABLE: s[S3_TABLE][None]}),
                                          "has shape (1, 49, 4); timm's tables are (offsets, heads)"),
    "a table no grid gives": (lambda s: s.update({S3_TABLE: torch.zeros(100, s[S3_TABLE].shape[1])}),
                              "has 100 offsets, a side of 10: no grid gives that"),
    "a table of another grid": (lambda s: s.update({S3_TABLE: torch.zeros(81, s[S3_TABLE].shape[1])}),
                                "holds relative-position tables of other sizes than its last stage's"),
    "a classifier bias of another size": (lambda s: s.update({"head.fc.bias": s["head.fc.bias"][:-1]}),
                                          "wrong shape: classifier.bias"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_convert_timm_takes_the_weights_as_they_are_or_refuses(tmp_path, capsys, damage):
    """With --model named, damaged weights are refused in one line: not a traceback, not a table
    resized to fit, not a classifier left random in a folder that claims timm's ImageNet head."""
    edit, message = DAMAGES[damage]
    source = tmp_path / "nano.safetensors"
    save_file(_damaged(_timm_model("coatnet_nano_rw").state_dict(), edit), str(source))
    assert main(["convert-timm", str(source), "--model", "coatnet_nano_rw", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_convert_keeps_keys_it_does_not_know():
    state = {"stem.conv1.weight": torch.zeros(1), "something.else": torch.ones(1)}
    converted = convert_timm_state_dict(state, "coatnet_0_rw")
    assert set(converted) == {"stem.0.0.weight", "something.else"}
    with pytest.raises(ValueError, match="weights do not fit"):
        load_weights(coatnet.create_model("coatnet_nano_rw", img_size=64), converted)


def test_a_folder_at_another_size_is_built_at_its_own(tmp_path):
    """A 64 px fine-tune loaded by name without img_size is built at 64 px, as it was saved, not at
    the name's 32 with its tables shrunk (and stretched back by a 64 px input, 9e-5 off); given
    img_size, it is built at that size, tables interpolated once."""
    torch.manual_seed(0)
    tuned = randomise_norms(coatnet.create_model("coatnet_pico", num_classes=7, img_size=64)).eval()
    for table in (p for n, p in tuned.named_parameters() if n.endswith("relative_position.table")):
        torch.nn.init.normal_(table)
    folder = tuned.save_pretrained(tmp_path / "tuned")
    loaded = coatnet.create_model("coatnet_pico", pretrained=folder).eval()
    assert loaded.config.img_size == (64, 64) and loaded.num_classes == 7
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), tuned(x))
    assert coatnet.create_model("coatnet_pico", pretrained=folder, img_size=32).config.img_size == (32, 32)


def test_a_folder_of_another_network_is_refused_by_name(tmp_path):
    """A folder's settings that leave the weights' shapes as they are (an activation, where a block
    strides) are the network's too: loaded by another name or settings, it would give other outputs
    without a word. What loading adapts (classes, size, channels) and drop_path_rate may differ."""
    torch.manual_seed(0)
    silu = coatnet.create_model("coatnet_pico", num_classes=7, mbconv=dict(activation="silu")).eval()
    folder = silu.save_pretrained(tmp_path / "silu")
    with pytest.raises(ValueError) as e:
        coatnet.create_model("coatnet_pico", pretrained=folder)
    assert f"the weights in '{folder}' were saved with a network that differs from coatnet_pico's in " \
           f"mbconv.activation 'silu' (not 'gelu'): pass those settings to create_model (coatnet.from_pretrained(" \
           in str(e.value)
    with pytest.raises(ValueError, match="are coatnet_pico's, not coatnet_nano's: name coatnet_pico "):
        coatnet.create_model("coatnet_nano", pretrained=folder)
    same = coatnet.create_model("coatnet_pico", pretrained=folder, mbconv=dict(activation="silu"), in_chans=1,
                                drop_path_rate=0.1, img_size=64).eval()
    assert same.config.mbconv == silu.config.mbconv and same.num_classes == 7


def test_timms_name_with_a_weights_file_keeps_timms_preprocessing(tmp_path):
    """Our converted weights (no config beside them) under timm's name: prepared as timm prepares
    them, as the name without weights is; a folder or timm's own keys carry their own."""
    named = coatnet.create_model("coatnet_nano_rw_224.sw_in1k")
    save_file(named.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = coatnet.create_model("coatnet_nano_rw_224.sw_in1k", pretrained=tmp_path / "w.safetensors")
    assert loaded.pretrained_cfg == named.pretrained_cfg and loaded.pretrained_cfg.crop_pct == 0.9


def test_checkpoint_path_loads_the_classifier_as_saved_as_timm_does(tmp_path):
    """timm's checkpoint_path loads the checkpoint as saved (strictly), after building: a 10-class
    fine-tune given without num_classes was a 1000-class model with a fresh random classifier and a
    warning. Now it keeps its 10 classes; a num_classes that does not fit is refused, as in timm."""
    torch.manual_seed(0)
    tuned = coatnet.create_model("coatnet_pico", num_classes=10).eval()
    torch.save({"state_dict": tuned.state_dict(), "epoch": 3}, tmp_path / "tuned.pth")  # timm's train.py's form
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = coatnet.create_model("coatnet_pico", checkpoint_path=str(tmp_path / "tuned.pth")).eval()
        with torch.no_grad():
            assert loaded.num_classes == 10 and torch.equal(loaded(x), tuned(x))
        assert coatnet.create_model("coatnet_pico", checkpoint_path=str(tmp_path / "tuned.pth"),
                                    num_classes=0).num_classes == 0  # no head: the weights' dropped, as for features
    with pytest.raises(ValueError, match="these weights have 10 classes: pass num_classes=10"):
        coatnet.create_model("coatnet_pico", checkpoint_path=str(tmp_path / "tuned.pth"), num_classes=1000)
    # timm's own checkpoint of its variant, the same
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    theirs = randomise_norms(timm.create_model("coatnet_nano_rw_224", img_size=64, num_classes=10))
    torch.save({"state_dict": theirs.state_dict()}, tmp_path / "timm.pth")
    ours = coatnet.create_model("coatnet_nano_rw_224", checkpoint_path=str(tmp_path / "timm.pth")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-4)
    # pretrained=FILE keeps the file's classifier too, as a folder's (before: the network's 1000 classes,
    # freshly initialised, with a warning); with num_classes, a new one (fine-tuning), with a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_file = coatnet.create_model("coatnet_pico", pretrained=tmp_path / "tuned.pth").eval()
    with torch.no_grad():
        assert from_file.num_classes == 10 and torch.equal(from_file(x), tuned(x))
    with pytest.warns(UserWarning, match="does not fit 1000 classes"):
        assert coatnet.create_model("coatnet_pico", pretrained=tmp_path / "tuned.pth",
                                    num_classes=1000).num_classes == 1000


def test_pretrained_cfg_reads_as_timms_dict():
    """timm's code and users read model.pretrained_cfg as a dict: "key" in it (timm's
    apply_test_time_pool asks so), keys(), items(), dict(); and assign one. Before: KeyError: 0 for
    `in`, AttributeError for keys(), and an assigned dict a TypeError at the next read."""
    model = coatnet.create_model("coatnet_nano_rw_224.sw_in1k", img_size=64)
    cfg = model.pretrained_cfg
    assert "mean" in cfg and "test_input_size" not in cfg and "label_names" in cfg
    assert dict(cfg)["crop_pct"] == 0.9 and dict(cfg.items()) == dict(cfg) and list(cfg) == cfg.keys()
    assert dict(cfg)["input_size"] == (3, 64, 64)
    timm = pytest.importorskip("timm")
    from timm.layers import apply_test_time_pool

    data_config = timm.data.resolve_data_config({}, model=model)
    assert apply_test_time_pool(model, data_config, use_test_size=True) == (model, False)
    model.pretrained_cfg = dict(mean=[0.5] * 3, std=[0.25] * 3, crop_pct=1.0, input_size=(3, 224, 224), url="x")
    assert (model.pretrained_cfg.mean, model.pretrained_cfg.std) == ((0.5,) * 3, (0.25,) * 3)
    assert model.pretrained_cfg.input_size == (3, 64, 64)  # the model's own size, as always
    with pytest.raises(ValueError, match="pretrained_cfg is a PretrainedCfg or a dict of its fields"):
        model.pretrained_cfg = "bicubic"


def test_pretrained_cfg_takes_timms_pretrained_cfg_object_and_default_cfg_is_assignable():
    """timm's PretrainedCfg (timm.models.get_pretrained_cfg), which create_model(pretrained_cfg=) takes, is taken
    when assigned to model.pretrained_cfg too (before: "pretrained_cfg is a PretrainedCfg ..., got PretrainedCfg");
    and model.default_cfg, timm's older name, is assigned as timm's build_model_with_cfg assigns it (before:
    AttributeError, no setter)."""
    timm = pytest.importorskip("timm")
    theirs = timm.models.get_pretrained_cfg("coatnet_0_rw_224.sw_in1k")
    for model in (coatnet.create_model("coatnet_pico"), coatnet.create_model("coatnet_pico", features_only=True)):
        model.pretrained_cfg = theirs
        assert (model.pretrained_cfg.mean, model.pretrained_cfg.interpolation, model.pretrained_cfg.crop_pct) == \
            ((0.5,) * 3, "bicubic", 0.95)
        assert model.pretrained_cfg.input_size == (3, 32, 32)  # the model's own size, as always
        model.default_cfg = dict(mean=[0.25] * 3, crop_pct=1.0)
        assert model.pretrained_cfg.mean == model.default_cfg.mean == (0.25,) * 3


def test_convert_timm_state_dict_takes_timms_names():
    """create_model takes timm's names everywhere; the converter said timm's own name was "not one of
    timm's CoAtNet variants"."""
    state = {"stem.conv1.weight": torch.zeros(1)}
    for name in ("coatnet_0_rw_224", "coatnet_0_rw_224.sw_in1k"):
        assert convert_timm_state_dict(state, name) == convert_timm_state_dict(state, "coatnet_0_rw")


def test_convert_timm_into_the_sources_own_folder_keeps_the_source(tmp_path, capsys):
    """`hf download timm/... model.safetensors --local-dir w`, then `convert-timm w/model.safetensors --output w
    --overwrite`: timm's file is the folder's weights, which the conversion replaced (ema.safetensors: removed),
    leaving no file timm reads. Refused in one line; the source kept."""
    (tmp_path / "w").mkdir()
    for name in ("model.safetensors", "ema.safetensors"):
        source = tmp_path / "w" / name
        save_file(_timm_model("coatnet_nano_rw").state_dict(), str(source))
        before = source.read_bytes()
        capsys.readouterr()
        assert main(["convert-timm", str(source), "--output", str(tmp_path / "w"), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "where the converted weights are written over it" in err
        assert source.read_bytes() == before and not (tmp_path / "w" / "config.json").exists()
        source.unlink()


def test_convert_timm_an_empty_output_is_refused_not_the_current_folder_overwritten(tmp_path, capsys, monkeypatch):
    """--output "" (an unset shell variable) is no folder: refused, the current folder's model kept (before:
    Path("") read as the current folder, past the check for a folder holding files: its config.json and
    weights replaced without --overwrite, where --output . is refused)."""
    source = tmp_path / "nano.safetensors"
    save_file(_timm_model("coatnet_nano_rw").state_dict(), str(source))
    mine = tmp_path / "mine"
    coatnet.create_model("coatnet_pico").save_pretrained(mine)
    before = {f.name: f.read_bytes() for f in mine.iterdir()}
    monkeypatch.chdir(mine)
    capsys.readouterr()
    assert main(["convert-timm", str(source), "--output", "."]) == 2  # as before: refused without --overwrite
    assert main(["convert-timm", str(source), "--output", ""]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "is a folder with files in it" in err[0] and err[1] == (
        "coatnet convert-timm: error: --output is empty; give the folder to write config.json and model.safetensors "
        "into (. for the current one, with --overwrite if it holds files)")
    assert {f.name: f.read_bytes() for f in mine.iterdir()} == before
