"""Models from the Hugging Face Hub, read offline from a Hub cache built on disk: nothing is downloaded.

The cache has huggingface_hub's layout: ``HF_HOME/hub/models--ORG--NAME/refs/REVISION`` holds a
commit hash, ``snapshots/HASH/`` the files of that commit.
"""

import json
import subprocess
import sys
import warnings
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

import coatnet
from conftest import randomise_norms

SIZE = 64  # small inputs keep the timm models fast; every grid is still at least 2x2


def timm_nano(num_classes: int = 10, seed: int = 0):
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    return randomise_norms(timm.create_model("coatnet_nano_rw_224", img_size=SIZE, num_classes=num_classes))


def timm_repo(snapshot, model, weights: str = "model.safetensors"):
    """timm's files: its config.json and the weights, as safetensors or a torch.save'd state dict."""
    (snapshot / "config.json").write_text(json.dumps({"architecture": "coatnet_nano_rw_224",
                                                      "num_classes": model.num_classes}))
    if weights == "model.safetensors":
        save_file(model.state_dict(), str(snapshot / weights))
    else:
        torch.save(model.state_dict(), snapshot / weights)


def assert_same_outputs(ours, theirs):
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours.eval()(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_pretrained_true_loads_timms_repository_with_its_classes(hub):
    theirs = timm_nano(num_classes=10)
    timm_repo(hub("timm/coatnet_nano_rw_224.sw_in1k"), theirs)
    ours = coatnet.create_model("coatnet_nano_rw_224.sw_in1k", pretrained=True, img_size=SIZE)
    assert ours.num_classes == 10  # the weights' classifier, not the default 1000
    assert_same_outputs(ours, theirs)


def test_finetuning_names_the_repository_it_reads_and_its_new_classifier(hub, tmp_path, capsys):
    """`coatnet train --pretrained --model NAME`: the run's line names the repository read, with timm's
    default tag (before: timm/NAME, a repository that does not exist), and the new classifier, with no
    warning for what fine-tuning asks (before: "the checkpoint has a classifier that does not fit")."""
    from coatnet.cli import main
    from test_data import make_tree

    timm_repo(hub("timm/coatnet_nano_rw_224.sw_in1k"), timm_nano(num_classes=10))
    photos = make_tree(tmp_path / "photos", per_class=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "the checkpoint has")
        assert main(["train", "--pretrained", "--model", "coatnet_nano_rw_224", "--data", "imagefolder", "--data-dir",
                     str(photos), "--img-size", "32", "--epochs", "1", "--batch-size", "3", "--output-dir",
                     str(tmp_path / "run")]) == 0
    assert ("fine-tuning from the weights of timm/coatnet_nano_rw_224.sw_in1k, a new classifier for the 3 classes "
            "(theirs: 10)") in capsys.readouterr().out


def test_a_timm_weights_file_keeps_the_size_its_tables_show(tmp_path):
    """Built at the name's 224 before, its tables shrunk and its preprocessing (the 384 px one, for a
    384 px fine-tune) for another size, without a word; the Hub's copy kept its size."""
    theirs = timm_nano(num_classes=1000)
    save_file(theirs.state_dict(), str(tmp_path / "nano.safetensors"))
    ours = coatnet.create_model("coatnet_nano_rw_224", pretrained=tmp_path / "nano.safetensors")
    assert ours.config.img_size == (SIZE, SIZE)
    assert_same_outputs(ours, theirs)
    assert coatnet.create_model("coatnet_nano_rw_224", pretrained=tmp_path / "nano.safetensors",
                                img_size=96).config.img_size == (96, 96)  # unless told


def test_pretrained_true_without_a_tag_takes_timms_default_tag(hub):
    theirs = timm_nano()
    timm_repo(hub("timm/coatnet_nano_rw_224.sw_in1k"), theirs)
    assert_same_outputs(coatnet.create_model("coatnet_nano_rw_224", pretrained=True, img_size=SIZE), theirs)


@pytest.mark.parametrize("name,default", [("coatnet_2_rw_224", "sw_in12k_ft_in1k"),
                                          ("coatnet_rmlp_1_rw2_224", "sw_in12k_ft_in1k"),
                                          ("coatnet_rmlp_2_rw_224", "sw_in12k_ft_in1k"),
                                          ("coatnet_0_rw_224", "sw_in1k")])
def test_the_default_tag_is_timms(name, default):
    """For a name with several tags, pretrained=True fetches the repository timm's would (its
    ImageNet-1k fine-tune, not the 12k-class pretraining), also without timm installed."""
    from coatnet.models.hub import hub_repository

    assert hub_repository(True, name) == (f"timm/{name}.{default}", None)
    timm = pytest.importorskip("timm")
    assert timm.models.get_pretrained_cfg(name).tag == default


def test_hf_hub_revision_and_pytorch_model_bin(hub):
    """``@v1`` reads the commit v1 points at, not main's; a .bin is read too (weights_only)."""
    main, v1 = timm_nano(seed=0), timm_nano(seed=1)
    timm_repo(hub("someone/nano", "main", "a" * 40), main)
    timm_repo(hub("someone/nano", "v1", "b" * 40), v1, weights="pytorch_model.bin")
    ours = coatnet.create_model("coatnet_nano_rw", pretrained="hf-hub:someone/nano@v1", img_size=SIZE)
    assert_same_outputs(ours, v1)
    assert_same_outputs(coatnet.create_model("coatnet_nano_rw", pretrained="hf-hub:someone/nano", img_size=SIZE), main)


def test_from_pretrained_builds_timms_architecture_from_its_config(hub):
    theirs = timm_nano(num_classes=10)
    timm_repo(hub("timm/coatnet_nano_rw_224.sw_in1k"), theirs)
    ours = coatnet.from_pretrained("hf-hub:timm/coatnet_nano_rw_224.sw_in1k")
    assert ours.config.name == "coatnet_nano_rw" and ours.num_classes == 10 and ours.config.img_size == (SIZE, SIZE)
    assert_same_outputs(ours, theirs)


def test_a_save_pretrained_folder_on_the_hub(hub):
    torch.manual_seed(0)
    model = randomise_norms(coatnet.create_model("coatnet_pico", num_classes=7, img_size=SIZE))
    model.save_pretrained(hub("me/pico"))
    assert_same_outputs(coatnet.from_pretrained("hf-hub:me/pico"), model)
    assert_same_outputs(coatnet.create_model("coatnet_pico", pretrained="hf-hub:me/pico", img_size=SIZE), model)


def test_a_hub_repository_as_the_model_name(hub):
    """timm's ``create_model("hf-hub:ORG/NAME", pretrained=...)``: the network its config.json names,
    with its weights, or freshly initialised with its classes; options apply as to any name."""
    theirs = timm_nano(num_classes=10)
    timm_repo(hub("timm/coatnet_nano_rw_224.sw_in1k"), theirs)
    name = "hf-hub:timm/coatnet_nano_rw_224.sw_in1k"
    assert_same_outputs(coatnet.create_model(name, pretrained=True), theirs)
    assert_same_outputs(coatnet.create_model("coatnet_nano_rw_224.sw_in1k", pretrained=1, img_size=SIZE), theirs)
    fresh = coatnet.create_model(name, img_size=SIZE)
    assert fresh.config.name == "coatnet_nano_rw" and fresh.num_classes == 10
    assert not torch.equal(fresh.state_dict()["stem.0.0.weight"], theirs.state_dict()["stem.conv1.weight"])
    features = coatnet.create_model(name, pretrained=True, features_only=True, out_indices=(-1,))
    assert [f.shape[1] for f in features(torch.randn(1, 3, SIZE, SIZE))] == [512]
    with pytest.warns(UserWarning, match="classifier"):
        assert coatnet.create_model(name, pretrained=True, num_classes=3).num_classes == 3


def test_a_save_pretrained_folder_on_the_hub_as_the_model_name(hub):
    """Our folder keeps its whole config (classes, size), not the registered network's defaults."""
    torch.manual_seed(0)
    model = randomise_norms(coatnet.create_model("coatnet_pico", num_classes=7, img_size=SIZE))
    model.pretrained_cfg = replace(model.pretrained_cfg, mean=(0.4, 0.4, 0.4), label_names=tuple("abcdefg"))
    model.save_pretrained(hub("me/pico"))
    assert_same_outputs(coatnet.create_model("hf-hub:me/pico", pretrained=True), model)
    fresh = coatnet.create_model("hf-hub:me/pico@main", drop_path_rate=0.3)
    assert fresh.config == model.config.__class__.from_dict(model.config.to_dict() | {"drop_path_rate": 0.3})
    assert fresh.pretrained_cfg == model.pretrained_cfg  # without the weights, prepared for as they are (timm's way)
    with pytest.raises(ValueError, match="takes its weights from that repository: pass pretrained=True or False"):
        coatnet.create_model("hf-hub:me/pico", pretrained="weights.safetensors")


@pytest.mark.parametrize("name,pretrained,message", [
    ("coatnet_0_rw_224.sw_in1k", True, "timm/coatnet_0_rw_224.sw_in1k is not in the Hugging Face cache "),
    ("coatnet_0_rw_224", True, "download it with `hf download timm/coatnet_0_rw_224.sw_in1k`, or unset HF_HUB_OFFLINE"),
    ("coatnet_0_rw", "hf-hub:me/w@v2", "`hf download me/w --revision v2`"),
    ("coatnet_0", True, "coatnet_0 has no published weights"),
    ("coatnet_0_224", True, "coatnet_0_224 has no published weights"),
    # our name of an rw network: timm's name of its weights (not the paper's coatnet_0's, another network)
    ("coatnet_0_rw", True, "timm publishes the weights of coatnet_0_rw as coatnet_0_rw_224: pass that name with "
                           "pretrained=True"),
    ("coatnet_0", "hf-hub:coatnet_0", "'hf-hub:coatnet_0' names no repository; write hf-hub:ORG/NAME"),
    ("coatnet_0", "hf-hub:me/w@", "names no repository"),
    ("coatnet_0_rw_224.sw_in2k", True, "unknown pretrained tag 'sw_in2k'"),
])
def test_mistakes_are_one_line(hub, name, pretrained, message):
    with pytest.raises(ValueError) as e:
        coatnet.create_model(name, pretrained=pretrained)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_cached_repository_without_weights_is_missing_too(hub):
    (hub("me/empty") / "README.md").write_text("nothing here")
    with pytest.raises(ValueError, match="me/empty is not in the Hugging Face cache"):
        coatnet.from_pretrained("hf-hub:me/empty")


def test_a_repository_with_neither_format_says_which_files_it_needs(hub, monkeypatch):
    """Online, a repository that lacks every file (stood in for: no network in tests)."""
    from coatnet.models import hub as hub_module

    monkeypatch.setattr(hub_module, "_fetch", lambda repo, revision, filename: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ValueError) as e:
        coatnet.from_pretrained("hf-hub:me/other")
    assert str(e.value).startswith("me/other holds neither timm weights (model.safetensors or pytorch_model.bin) "
                                   "nor a save_pretrained folder") and "\n" not in str(e.value)


def test_an_unreachable_hub_is_one_line_after_its_first_file(hub, monkeypatch):
    """Online (HF_HUB_OFFLINE unset) without a network, huggingface_hub retries each file for a while;
    the first file's failure ends the load, naming the cause, instead of trying every other file."""
    import huggingface_hub
    from huggingface_hub.utils import LocalEntryNotFoundError

    calls = []

    def unreachable(repo, filename, **kwargs):
        calls.append(filename)
        raise LocalEntryNotFoundError("Connection error, and the file is not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ValueError) as e:
        coatnet.create_model("coatnet_0_rw_224.sw_in1k", pretrained=True)
    assert str(e.value).startswith("the Hugging Face Hub could not be reached and its cache (")
    assert "lacks timm/coatnet_0_rw_224.sw_in1k" in str(e.value) and calls == ["config.json"]
    # where each command takes the folder (before: "--pretrained PATH" to predict, whose --pretrained takes none)
    assert str(e.value).endswith("give the folder (pretrained=PATH; --pretrained PATH to train, --checkpoint PATH to "
                                 "eval, predict or export)")


@pytest.mark.parametrize("config,message", [("{not json", "is not valid JSON"),
                                            ("[1, 2]", "holds a JSON list, not the object of a model's config"),
                                            # before: TypeError's traceback, from deep in the preprocessing
                                            ('{"architecture": "coatnet_nano_rw_224", "pretrained_cfg": [1]}',
                                             "has a pretrained_cfg that is a JSON list, not an object")])
def test_a_broken_config_json_is_one_line_naming_it(hub, config, message):
    snapshot = hub("me/broken")
    (snapshot / "config.json").write_text(config)
    save_file(timm_nano().state_dict(), str(snapshot / "model.safetensors"))
    for load in (lambda: coatnet.from_pretrained("hf-hub:me/broken"),
                 lambda: coatnet.create_model("coatnet_nano_rw", pretrained="hf-hub:me/broken", img_size=SIZE)):
        with pytest.raises(ValueError) as e:
            load()
        assert message in str(e.value) and str(snapshot / "config.json") in str(e.value) and "\n" not in str(e.value)


def test_a_repository_of_another_family_says_so(hub):
    """Not "unknown model" and the list of every model: the repository holds another network."""
    snapshot = hub("timm/maxvit_nano_rw_256.sw_in1k")
    (snapshot / "config.json").write_text(json.dumps({"architecture": "maxvit_nano_rw_256", "num_classes": 1000}))
    save_file({"stem.conv1.weight": torch.zeros(1)}, str(snapshot / "model.safetensors"))
    with pytest.raises(ValueError, match=r"^timm/maxvit_nano_rw_256.sw_in1k holds timm's maxvit_nano_rw_256, not a "
                                         r"CoAtNet; coatnet builds the networks coatnet.list_models\(\) lists$"):
        coatnet.from_pretrained("hf-hub:timm/maxvit_nano_rw_256.sw_in1k")


def test_timm_weights_without_a_config_need_a_name(hub):
    save_file(timm_nano().state_dict(), str(hub("me/bare") / "model.safetensors"))
    with pytest.raises(ValueError, match=r"me/bare has no config.json naming timm's architecture .*"
                                         r"create_model\(NAME, pretrained='hf-hub:me/bare'\)"):
        coatnet.from_pretrained("hf-hub:me/bare")


def test_huggingface_hub_is_imported_only_for_the_hub():
    code = "import sys, coatnet; coatnet.create_model('coatnet_pico'); assert 'huggingface_hub' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_repository_written_by_timm_keeps_its_model_args(hub):
    """timm's push_to_hf_hub records the options a model was built with (model_args) and one mean
    and std for a grey model: the model is built with them, and fed as timm feeds it."""
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    theirs = randomise_norms(timm.create_model("coatnet_nano_rw_224", img_size=SIZE, num_classes=10, in_chans=1))
    save_for_hf(theirs.eval(), hub("someone/nano-grey"), safe_serialization=True,
                model_args=dict(img_size=SIZE, num_classes=10, in_chans=1, global_pool="avg", drop_rate=0.1))
    ours = coatnet.create_model("hf-hub:someone/nano-grey", pretrained=True).eval()
    assert (ours.config.in_chans, ours.config.img_size, ours.num_classes) == (1, (SIZE, SIZE), 10)
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-4)
    cfg = ours.pretrained_cfg
    assert (cfg.mean, cfg.std, cfg.interpolation, cfg.crop_pct) == ((0.5,) * 3, (0.5,) * 3, "bicubic", 0.9)
    image = torch.randint(0, 256, (3, 80, 100), dtype=torch.uint8)
    assert coatnet.data_transforms(ours)(image).shape == (1, SIZE, SIZE)


def test_a_fresh_model_of_a_timm_repository_is_prepared_for_as_its_weights(hub):
    """timm's create_model("hf-hub:...", pretrained=False) takes the repository's pretrained_cfg and
    label names, as a save_pretrained folder's does here; before, timm's defaults for the architecture."""
    snapshot = hub("me/tuned")
    (snapshot / "config.json").write_text(json.dumps({
        "architecture": "coatnet_nano_rw_224", "num_classes": 3, "label_names": ["a", "b", "c"], "model_args":
        {"img_size": SIZE}, "pretrained_cfg": {"mean": [0.4] * 3, "std": [0.2] * 3, "interpolation": "bilinear"}}))
    save_file(timm_nano(num_classes=3).state_dict(), str(snapshot / "model.safetensors"))
    with_weights = coatnet.create_model("hf-hub:me/tuned", pretrained=True).pretrained_cfg
    fresh = coatnet.create_model("hf-hub:me/tuned").pretrained_cfg
    assert fresh == with_weights
    assert (fresh.mean, fresh.std, fresh.interpolation, fresh.label_names) == ((0.4,) * 3, (0.2,) * 3, "bilinear",
                                                                             ("a", "b", "c"))
    assert coatnet.create_model("hf-hub:me/tuned", num_classes=5).pretrained_cfg.label_names is None


def test_a_training_checkpoint_on_the_hub_gives_its_ema_weights_online_too(hub, tmp_path, monkeypatch):
    """Uploaded as it is, a checkpoint's folder holds ema.safetensors, the weights training evaluated and
    from_pretrained takes from the folder; fetched online (stood in for: no network in tests) only
    model.safetensors came before, so the same repository gave other weights than after `hf download`."""
    import shutil

    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    torch.manual_seed(0)
    remote = coatnet.create_model("coatnet_pico", num_classes=5, img_size=SIZE).save_pretrained(tmp_path / "remote")
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in coatnet.from_pretrained(remote).state_dict().items()}
    save_file(ema, str(remote / "ema.safetensors"))

    def download(repo, filename, **kwargs):
        if not (remote / filename).exists():
            raise EntryNotFoundError(f"{filename} is not in {repo}")
        return shutil.copy(remote / filename, hub(repo) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for model in (coatnet.from_pretrained("hf-hub:me/ckpt"), coatnet.create_model("coatnet_pico", img_size=SIZE,
                                                                                     pretrained="hf-hub:me/ckpt")):
        assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())


def test_a_repository_downloaded_into_a_folder_is_read_as_from_the_hub(tmp_path):
    """`hf download timm/... --local-dir PATH`, then pretrained=PATH (as the offline error advises) or
    from_pretrained(PATH): before, "config.json is corrupt" (it is timm's, not a save_pretrained one)."""
    theirs = timm_nano(num_classes=3)
    timm_repo(tmp_path, theirs)
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(meta | {"label_names": ["a", "b", "c"]}))
    for ours in (coatnet.create_model("coatnet_nano_rw_224", pretrained=tmp_path), coatnet.from_pretrained(tmp_path)):
        assert (ours.num_classes, ours.config.img_size, ours.pretrained_cfg.label_names) == (3, (SIZE, SIZE),
                                                                                             ("a", "b", "c"))
        assert_same_outputs(ours, theirs)


def test_rmlp_weights_from_the_hub_keep_the_size_their_config_records(hub):
    """rmlp weights have no tables to show their size: a repository timm's push_to_hf_hub wrote records
    it, and loading them into a named network keeps it as from_pretrained does (before: the name's 224,
    fed 224 px images where the weights were trained at 64)."""
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    theirs = timm.create_model("coatnet_rmlp_nano_rw_224", img_size=SIZE, num_classes=10)
    save_for_hf(theirs.eval(), hub("someone/rmlp"), safe_serialization=True, model_args=dict(img_size=SIZE))
    for name in ("coatnet_rmlp_nano_rw", "coatnet_rmlp_nano_rw_224"):
        ours = coatnet.create_model(name, pretrained="hf-hub:someone/rmlp")
        assert ours.config.img_size == coatnet.from_pretrained("hf-hub:someone/rmlp").config.img_size == (SIZE, SIZE)
        assert_same_outputs(ours, theirs)
    assert coatnet.create_model("coatnet_rmlp_nano_rw", pretrained="hf-hub:someone/rmlp", img_size=96).config.img_size \
        == (96, 96)  # unless told


def test_rmlp_weights_keep_the_size_their_pretrained_cfg_records(hub):
    """A config.json without model_args (as older timm wrote it) records the size in its pretrained_cfg's
    input_size, (channels, height, width): rmlp weights loaded into a named network keep that height and width."""
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    theirs = timm.create_model("coatnet_rmlp_nano_rw_224", img_size=SIZE, num_classes=10)
    folder = hub("someone/rmlp")
    save_for_hf(theirs.eval(), folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    del config["model_args"]
    config["pretrained_cfg"]["input_size"] = [3, SIZE, SIZE]
    (folder / "config.json").write_text(json.dumps(config))
    ours = coatnet.create_model("coatnet_rmlp_nano_rw", pretrained="hf-hub:someone/rmlp")
    assert ours.config.img_size == (SIZE, SIZE)
    assert_same_outputs(ours, theirs)


def test_a_folder_as_the_model_name(tmp_path):
    """timm's ``create_model("local-dir:PATH", pretrained=...)`` (a repository downloaded with ``hf download
    ORG/NAME --local-dir PATH``): the network its config.json names, with its weights, or freshly initialised
    with its classes, as for ``hf-hub:`` (before: an unknown model name)."""
    theirs = timm_nano(num_classes=3)
    (tmp_path / "w").mkdir()
    timm_repo(tmp_path / "w", theirs)
    meta = json.loads((tmp_path / "w" / "config.json").read_text())
    (tmp_path / "w" / "config.json").write_text(json.dumps(meta | {"label_names": ["a", "b", "c"],
                                                                   "model_args": {"img_size": SIZE}}))
    name = f"local-dir:{tmp_path / 'w'}"
    for ours in (coatnet.create_model(name, pretrained=True), coatnet.from_pretrained(name)):
        assert (ours.config.name, ours.num_classes, ours.config.img_size) == ("coatnet_nano_rw", 3, (SIZE, SIZE))
        assert ours.pretrained_cfg.label_names == ("a", "b", "c")
        assert_same_outputs(ours, theirs)
    fresh = coatnet.create_model(name)
    assert (fresh.num_classes, fresh.config.img_size, fresh.pretrained_cfg.label_names) == (3, (SIZE, SIZE),
                                                                                            ("a", "b", "c"))
    assert not torch.equal(fresh.state_dict()["stem.0.0.weight"], theirs.state_dict()["stem.conv1.weight"])
    with pytest.warns(UserWarning, match="classifier"):
        assert coatnet.create_model(name, pretrained=True, num_classes=5).num_classes == 5


def test_local_dir_names_the_folder_wherever_weights_are_given(tmp_path, capsys):
    """timm's ``local-dir:PATH`` is the folder PATH where weights are given by their place too: pretrained=
    (and so `coatnet train --pretrained`) reads the folder as pretrained=PATH does, and convert-timm, which
    takes a file, names the one in it (before: "weights file 'local-dir:...' does not exist")."""
    from coatnet.cli import main

    theirs = timm_nano(num_classes=3)
    (tmp_path / "w").mkdir()
    timm_repo(tmp_path / "w", theirs)
    ours = coatnet.create_model("coatnet_nano_rw_224", pretrained=f"local-dir:{tmp_path / 'w'}")
    bare = coatnet.create_model("coatnet_nano_rw_224", pretrained=tmp_path / "w")
    assert (ours.num_classes, ours.config, ours.pretrained_cfg) == (3, bare.config, bare.pretrained_cfg)
    assert_same_outputs(ours, theirs)
    assert main(["convert-timm", f"local-dir:{tmp_path / 'w'}", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == (f"coatnet convert-timm: error: '{tmp_path / 'w'}' is a folder; give the weights file in it "
                   f"('{tmp_path / 'w' / 'model.safetensors'}'), a .safetensors or .pth file\n")


def test_a_save_pretrained_folder_as_the_model_name(tmp_path):
    """Our own folders (a save_pretrained folder, a training checkpoint) name a model as timm's do."""
    torch.manual_seed(0)
    model = randomise_norms(coatnet.create_model("coatnet_pico", num_classes=7, img_size=SIZE))
    model.pretrained_cfg = replace(model.pretrained_cfg, mean=(0.4, 0.4, 0.4), label_names=tuple("abcdefg"))
    name = f"local-dir:{model.save_pretrained(tmp_path / 'pico')}"
    assert_same_outputs(coatnet.create_model(name, pretrained=True), model)
    assert_same_outputs(coatnet.from_pretrained(name), model)
    fresh = coatnet.create_model(name, drop_path_rate=0.3)
    assert fresh.config == model.config.__class__.from_dict(model.config.to_dict() | {"drop_path_rate": 0.3})
    assert fresh.pretrained_cfg == model.pretrained_cfg


@pytest.mark.parametrize("folder,pretrained,message", [
    ("missing", True, "'{d}/missing' is not a folder; give one that holds timm's config.json and weights"),
    ("", True, "'local-dir:' names no folder; write local-dir:PATH"),
    ("empty", False, "'{d}/empty' is not a coatnet checkpoint or model folder"),
    ("config-only", True, "'{d}/config-only' holds timm's coatnet_nano_rw_224 (its config.json is timm's), without "
                          "its weights (model.safetensors or pytorch_model.bin): download them too"),
    ("empty", "weights.safetensors", "takes its weights from that folder: pass pretrained=True or False"),
])
def test_a_folder_that_holds_no_model_is_one_line(tmp_path, folder, pretrained, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text(json.dumps({"architecture": "coatnet_nano_rw_224"}))
    with pytest.raises(ValueError) as e:
        coatnet.create_model(f"local-dir:{tmp_path / folder}" if folder else "local-dir:", pretrained=pretrained)
    assert message.format(d=tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_a_folder_whose_weights_do_not_fit_its_config_is_refused_from_the_hub_and_local_dir(hub, tmp_path):
    """A save_pretrained folder whose config.json was edited (its classes) is refused by from_pretrained(PATH);
    read as hf-hub:ORG/NAME or local-dir:PATH it gave a model with a random classifier, under a warning."""
    model = coatnet.create_model("coatnet_pico", num_classes=7, img_size=32)
    for folder in (hub("me/edited"), tmp_path / "edited"):
        model.save_pretrained(folder)
        meta = json.loads((folder / "config.json").read_text())
        meta["config"]["num_classes"], meta["pretrained_cfg"]["label_names"] = 5, None
        (folder / "config.json").write_text(json.dumps(meta))
    for name in ("hf-hub:me/edited", f"local-dir:{tmp_path / 'edited'}"):
        for load in (lambda: coatnet.from_pretrained(name), lambda: coatnet.create_model(name, pretrained=True)):
            with pytest.raises(ValueError) as e:
                load()
            assert "holds weights that do not fit its own config.json" in str(e.value) and "\n" not in str(e.value)
        with pytest.warns(UserWarning, match="classifier"):  # a new classifier, asked for
            assert coatnet.create_model(name, pretrained=True, num_classes=3).num_classes == 3


def test_a_fresh_model_of_a_folder_needs_only_timms_config_json(tmp_path, hub):
    """timm's create_model("local-dir:PATH") without weights reads config.json alone, as "hf-hub:ORG/NAME"
    does here (`hf download ORG/NAME config.json --local-dir PATH`); before: refused, asking for the weights."""
    config = json.dumps({"architecture": "coatnet_nano_rw_224", "num_classes": 3, "label_names": ["a", "b", "c"],
                         "model_args": {"img_size": SIZE}})
    (tmp_path / "config.json").write_text(config)
    (hub("me/config-only") / "config.json").write_text(config)
    for name in (f"local-dir:{tmp_path}", "hf-hub:me/config-only"):
        fresh = coatnet.create_model(name)
        assert (fresh.config.name, fresh.num_classes, fresh.config.img_size) == ("coatnet_nano_rw", 3, (SIZE, SIZE))
        assert fresh.pretrained_cfg.label_names == ("a", "b", "c")
    with pytest.raises(ValueError, match="without its weights"):  # which pretrained=True needs
        coatnet.create_model(f"local-dir:{tmp_path}", pretrained=True)


def test_cache_dir_is_the_hub_cache_read_as_in_timm(hub, tmp_path, monkeypatch):
    """timm's create_model(..., cache_dir=PATH) reads the Hub cache at PATH (huggingface_hub's layout), over
    HF_HOME and HF_HUB_CACHE, for that call only; before: refused as an unknown option."""
    theirs = timm_nano(num_classes=3)
    timm_repo(hub("me/nano"), theirs)
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))  # the environment's cache lacks it
    for ours in (coatnet.create_model("hf-hub:me/nano", pretrained=True, img_size=SIZE, cache_dir=cache),
                 coatnet.create_model("coatnet_nano_rw_224", pretrained="hf-hub:me/nano", cache_dir=str(cache)),
                 # read twice, the second time by create_model for the repository's network: the same cache
                 coatnet.create_model("hf-hub:me/nano", checkpoint_path="hf-hub:me/nano", cache_dir=cache)):
        assert ours.num_classes == 3
        assert_same_outputs(ours, theirs)
    timm = pytest.importorskip("timm")  # timm reads the same folder
    assert_same_outputs(ours, timm.create_model("hf-hub:me/nano", pretrained=True, img_size=SIZE,
                                                 cache_dir=cache).eval())
    with pytest.raises(ValueError, match=r"not in the Hugging Face cache \(.*nowhere\)"):  # the cache read is named
        coatnet.create_model("hf-hub:me/nano", pretrained=True, cache_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"not in the Hugging Face cache \(.*elsewhere"):  # for that call only
        coatnet.create_model("hf-hub:me/nano", pretrained=True)
    with pytest.raises(ValueError, match="^cache_dir is the Hugging Face cache folder to read"):
        coatnet.create_model("hf-hub:me/nano", pretrained=True, cache_dir=3)


def test_checkpoint_path_loads_into_a_repositorys_network_as_in_timm(hub, tmp_path):
    """timm's create_model("hf-hub:ORG/NAME" or "local-dir:PATH", checkpoint_path=FILE): the network the
    config.json describes, prepared for as the repository's weights are, with FILE loaded as checkpoint_path
    loads into a named network (its classifier as saved). Before: refused, "pass pretrained=True or False"."""
    timm = pytest.importorskip("timm")
    snapshot = hub("me/nano")
    timm_repo(snapshot, timm_nano(num_classes=3))
    meta = json.loads((snapshot / "config.json").read_text()) | {
        "label_names": ["a", "b", "c"], "model_args": {"img_size": SIZE}, "pretrained_cfg": {"mean": [0.4] * 3}}
    (snapshot / "config.json").write_text(json.dumps(meta))
    (tmp_path / "w").mkdir()
    for file in ("config.json", "model.safetensors"):
        (tmp_path / "w" / file).write_bytes((snapshot / file).read_bytes())
    tuned = timm_nano(num_classes=3, seed=1)
    torch.save({"state_dict": tuned.state_dict(), "epoch": 3}, tmp_path / "tuned.pth")  # timm's train.py's form
    for name in ("hf-hub:me/nano", f"local-dir:{tmp_path / 'w'}"):
        for pretrained in (False, True):
            ours = coatnet.create_model(name, pretrained=pretrained, checkpoint_path=str(tmp_path / "tuned.pth"))
            assert_same_outputs(ours, tuned)
            assert (ours.pretrained_cfg.mean, ours.pretrained_cfg.label_names) == ((0.4,) * 3, ("a", "b", "c"))
            # (huggingface_hub fixed timm's default cache at its import, in an earlier test: named here)
            assert_same_outputs(ours, timm.create_model(name, pretrained=pretrained, cache_dir=tmp_path / "hf" / "hub",
                                                        checkpoint_path=str(tmp_path / "tuned.pth")).eval())
    # a fine-tune on other classes keeps them, as checkpoint_path into a named network does (timm refuses it)
    other = timm_nano(num_classes=10, seed=2)
    torch.save({"state_dict": other.state_dict()}, tmp_path / "other.pth")
    ours = coatnet.create_model("hf-hub:me/nano", checkpoint_path=str(tmp_path / "other.pth"))
    assert ours.num_classes == 10 and ours.pretrained_cfg.label_names is None  # the repository's 3 names are not its
    assert_same_outputs(ours, other)
    with pytest.raises(ValueError, match="these weights have 10 classes: pass num_classes=10"):
        coatnet.create_model("hf-hub:me/nano", checkpoint_path=str(tmp_path / "other.pth"), num_classes=3)
    # a save_pretrained repository: its network as saved, the file's weights
    torch.manual_seed(0)
    saved = coatnet.create_model("coatnet_pico", num_classes=5, img_size=SIZE, mbconv=dict(activation="silu"))
    saved.pretrained_cfg = replace(saved.pretrained_cfg, mean=(0.4, 0.4, 0.4), label_names=tuple("abcde"))
    saved.save_pretrained(hub("me/ours"))
    torch.manual_seed(1)
    file = coatnet.create_model("coatnet_pico", num_classes=5, img_size=SIZE, mbconv=dict(activation="silu")).eval()
    save_file(file.state_dict(), str(tmp_path / "ours.safetensors"))
    ours = coatnet.create_model("hf-hub:me/ours", checkpoint_path=str(tmp_path / "ours.safetensors"))
    assert ours.config == file.config and ours.pretrained_cfg == saved.pretrained_cfg
    assert_same_outputs(ours, file)


def test_class_names_that_do_not_fit_the_weights_are_said(hub, tmp_path):
    """A timm config.json whose label_names (top-level, or its pretrained_cfg's) do not fit the head of the
    weights it describes (timm's push_to_hf_hub writes the old head's names after reset_classifier): a warning
    naming the file and both counts, the outputs numbered. Before: the names dropped without a word (and the
    pretrained_cfg's own list never read)."""
    theirs = timm_nano(num_classes=3)
    snapshot = hub("me/stale")
    timm_repo(snapshot, theirs)
    meta = json.loads((snapshot / "config.json").read_text()) | {"model_args": {"img_size": SIZE}}
    (snapshot / "config.json").write_text(json.dumps(meta | {"label_names": list("abcde")}))
    config = snapshot / "config.json"
    with pytest.warns(UserWarning, match=rf"^'{config}' lists 5 class names but the weights it describes have 3 "
                                         r"outputs; the names are left out and the outputs numbered$"):
        ours = coatnet.create_model("hf-hub:me/stale", pretrained=True)
    assert ours.pretrained_cfg.label_names is None
    assert_same_outputs(ours, theirs)
    with pytest.warns(UserWarning, match="^the config.json of me/stale lists 5 class names but the weights it "
                                         "describes have 3 outputs"):
        assert coatnet.create_model("hf-hub:me/stale").pretrained_cfg.label_names is None
    (snapshot / "config.json").write_text(json.dumps(meta | {"pretrained_cfg": {"label_names": list("xyz")}}))
    assert coatnet.create_model("hf-hub:me/stale", pretrained=True).pretrained_cfg.label_names == ("x", "y", "z")
    with warnings.catch_warnings():  # names that fit, and a new head asked for: not its names, without a word
        warnings.simplefilter("error")
        assert coatnet.create_model("hf-hub:me/stale", num_classes=5).pretrained_cfg.label_names is None


def test_pretrained_true_keeps_the_tag_given():
    """A name with its tag fetches that tag's repository, not timm's default one."""
    from coatnet.models.hub import hub_repository

    assert hub_repository(True, "coatnet_2_rw_224.sw_in12k") == ("timm/coatnet_2_rw_224.sw_in12k", None)


def test_hf_hub_cache_wins_over_hf_home(tmp_path, monkeypatch):
    """As huggingface_hub reads them: HF_HUB_CACHE names the cache itself, over HF_HOME's hub folder."""
    from coatnet.models.hub import hub_cache

    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache() == str(tmp_path / "cache")
    monkeypatch.delenv("HF_HUB_CACHE")
    assert hub_cache() == str(tmp_path / "home" / "hub")
