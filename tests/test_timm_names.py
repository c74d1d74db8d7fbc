"""What a timm user types: timm's model names and pretrained tags, and feature extraction."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

import coatnet
from coatnet.cli import main


@pytest.mark.parametrize("timm_name,ours,img_size", [
    ("coatnet_0_rw_224", "coatnet_0_rw", 224),
    ("coatnet_0_rw_224.sw_in1k", "coatnet_0_rw", 224),
    ("coatnet_rmlp_2_rw_224.sw_in12k_ft_in1k", "coatnet_rmlp_2_rw", 224),
    ("coatnet_rmlp_2_rw_384.sw_in12k_ft_in1k", "coatnet_rmlp_2_rw", 384),
    ("coatnet_0_224", "coatnet_0", 224),
])
def test_timm_names_build_our_networks(timm_name, ours, img_size):
    with torch.device("meta"):
        model = coatnet.create_model(timm_name)
        reference = coatnet.create_model(ours, img_size=img_size)
    assert model.config == reference.config


def test_timms_spellings_of_create_models_arguments(tmp_path, monkeypatch):
    """timm's checkpoint_path and pretrained_cfg_overlay (its file, and preprocessing over the
    weights'), global_pool="avg" and drop_rate=0: what users type, taken; before, each was refused as
    an unknown option."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    saved = coatnet.create_model("coatnet_pico", num_classes=3)
    save_file(saved.state_dict(), str(tmp_path / "w.safetensors"))
    file = str(tmp_path / "w.safetensors")
    for model in (coatnet.create_model("coatnet_pico", num_classes=3, checkpoint_path=file, global_pool="avg",
                                       drop_rate=0.0),
                  coatnet.create_model("coatnet_pico", pretrained=True, num_classes=3,
                                       pretrained_cfg_overlay=dict(file=file, crop_pct=0.8, mean=(0.1, 0.2, 0.3)))):
        assert all(torch.equal(v, saved.state_dict()[k]) for k, v in model.state_dict().items())
    assert (model.pretrained_cfg.crop_pct, model.pretrained_cfg.mean) == (0.8, (0.1, 0.2, 0.3))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="me/tuned is not in the Hugging Face cache"):  # hf_hub_id: that repository
        coatnet.create_model("coatnet_0_rw_224", pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id="me/tuned"))
    features = coatnet.create_model("coatnet_pico", features_only=True, pretrained_cfg_overlay=dict(crop_pct=0.8))
    assert features.pretrained_cfg.crop_pct == features.model.pretrained_cfg.crop_pct == 0.8
    for kwargs, message in ((dict(global_pool="max"), r"global_pool: CoAtNet's head pools by the average \('avg'\) or not"),
                            (dict(drop_rate=0.1), "drop_rate: CoAtNet's head has no dropout"),
                            (dict(pretrained=file, checkpoint_path=file), "give the weights once"),
                            (dict(pretrained=True, checkpoint_path=file, pretrained_cfg_overlay=dict(file=file)),
                             "give the weights once"),
                            # as in timm, the overlay's weights are pretrained=True's (before: loaded with False)
                            (dict(pretrained_cfg_overlay=dict(file=file)), "are the weights of pretrained=True"),
                            # taken without effect before, a model other than asked for
                            (dict(pretrained=True, pretrained_cfg_overlay=dict(num_classes=3, input_size=(3, 64, 64))),
                             r"pretrained_cfg_overlay \['input_size', 'num_classes'\] is not taken here")):
        with pytest.raises(ValueError, match=message):
            coatnet.create_model("coatnet_pico", **kwargs)


def test_timms_pretrained_cfg_argument(tmp_path, monkeypatch):
    """timm's pretrained_cfg: a tag replaces the name's own; a dict (or a PretrainedCfg, timm's or ours) is the
    weights' config: how images are prepared (timm's defaults where it is silent), the defaults of num_classes,
    in_chans and img_size, and with pretrained=True where the weights are; the overlay goes over it. Before: refused
    as an unknown option."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        for name in ("coatnet_2_rw_224", "coatnet_2_rw_224.sw_in12k_ft_in1k"):
            assert coatnet.create_model(name, pretrained_cfg="sw_in12k").num_classes == 11821
    with pytest.raises(ValueError, match="unknown pretrained tag 'foo' for coatnet_2_rw_224"):
        coatnet.create_model("coatnet_2_rw_224", pretrained_cfg="foo")
    cfg = dict(mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2), crop_pct=0.8, num_classes=5, input_size=(3, 64, 64),
               label_names=list("abcde"), license="apache-2.0", first_conv="stem.conv1", url="")
    ours = coatnet.create_model("coatnet_nano_rw_224", pretrained_cfg=cfg, pretrained_cfg_overlay=dict(crop_pct=0.7))
    assert (ours.num_classes, ours.config.img_size, ours.config.in_chans) == (5, (64, 64), 3)
    assert ours.pretrained_cfg == coatnet.PretrainedCfg(mean=(0.4,) * 3, std=(0.2,) * 3, interpolation="bicubic",
                                                        crop_pct=0.7, label_names=tuple("abcde"))
    timm = pytest.importorskip("timm")
    from timm.models import PretrainedCfg

    for given in (cfg, PretrainedCfg(**cfg)):  # as timm takes each, and prepares images for it
        theirs = timm.create_model("coatnet_nano_rw_224", pretrained_cfg=given)
        ours = coatnet.create_model("coatnet_nano_rw_224", pretrained_cfg=given)
        assert (ours.num_classes, ours.config.img_size) == (theirs.num_classes, (64, 64))
        assert timm.data.resolve_model_data_config(ours) == timm.data.resolve_model_data_config(theirs)
    grey = coatnet.create_model("coatnet_pico", pretrained_cfg=dict(input_size=(1, 32, 32), mean=(0.5,), std=(0.25,)))
    assert grey.config.in_chans == 1 and grey.pretrained_cfg.channel_stats(1) == ([0.5], [0.25])
    assert coatnet.create_model("coatnet_pico", pretrained_cfg=grey.pretrained_cfg).config.in_chans == 1
    # where the weights are: read with pretrained=True only, as in timm (file before hf_hub_id)
    torch.manual_seed(0)
    saved = coatnet.create_model("coatnet_pico", num_classes=3)
    save_file(saved.state_dict(), str(tmp_path / "w.safetensors"))
    place = dict(file=str(tmp_path / "w.safetensors"), hf_hub_id="me/elsewhere", num_classes=3)
    loaded = coatnet.create_model("coatnet_pico", pretrained=True, pretrained_cfg=place)
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert coatnet.create_model("coatnet_pico", pretrained_cfg=place).num_classes == 3  # nothing loaded, nor read
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="me/tuned is not in the Hugging Face cache"):
        coatnet.create_model("coatnet_0_rw_224", pretrained=True, pretrained_cfg=dict(hf_hub_id="me/tuned"))
    for kwargs, message in (
            (dict(pretrained_cfg=3), "^pretrained_cfg is a pretrained tag \\(a string, e.g. 'sw_in1k'\\), a dict or a "
                                     "PretrainedCfg, as in timm; got a int$"),
            (dict(pretrained_cfg=dict(mean=(0.5,) * 3, foo=1)), r"^pretrained_cfg \['foo'\] are not fields of timm's"),
            (dict(pretrained_cfg=dict(crop_pct=5)), "^pretrained_cfg: crop_pct"),
            (dict(pretrained_cfg=dict(input_size=64)), r"^pretrained_cfg's input_size is \(channels, height, width\)"),
            (dict(pretrained_cfg=dict(num_classes=3, label_names=["a", "b"])), "lists 2 label_names for num_classes 3"),
            (dict(pretrained_cfg=dict(label_names=["a", "b"])), "lists 2 label_names but the model has 1000 outputs"),
            (dict(pretrained=True, pretrained_cfg=dict(url="https://example.com/w.pth")),
             "^pretrained_cfg's url: coatnet reads weights from a file or the Hugging Face Hub"),
            (dict(pretrained=True, pretrained_cfg=dict(state_dict=saved.state_dict())),
             r"^pretrained_cfg's state_dict is not taken here \(weights in memory")):
        with pytest.raises(ValueError, match=message):
            coatnet.create_model("coatnet_pico", **kwargs)
    with pytest.raises(ValueError, match="^pretrained_cfg: the model 'hf-hub:me/tuned' takes its config from that "
                                         "repository's config.json, as in timm"):
        coatnet.create_model("hf-hub:me/tuned", pretrained_cfg=dict(mean=(0.5,) * 3))


def test_a_grey_models_overlay_gives_its_one_channels_mean_and_std():
    """timm's overlay for a grey model, pretrained_cfg_overlay=dict(mean=(0.5,), std=(0.25,)), as timm writes
    them in a grey model's config.json (which loads): before, refused as "mean must be 3 numbers"."""
    model = coatnet.create_model("coatnet_pico", in_chans=1, pretrained_cfg_overlay=dict(mean=(0.5,), std=[0.25]))
    assert model.pretrained_cfg.channel_stats(1) == ([0.5], [0.25])
    image = torch.full((1, 40, 40), 255, dtype=torch.uint8)
    assert torch.allclose(coatnet.data_transforms(model)(image), torch.full((1, 32, 32), 2.0))  # (1 - 0.5) / 0.25


@pytest.mark.parametrize("name,classes", [("coatnet_3_rw_224", 11821), ("coatnet_2_rw_224.sw_in12k", 11821),
                                          ("coatnet_2_rw_224", 1000), ("coatnet_rmlp_2_rw_224.sw_in12k_ft_in1k", 1000),
                                          ("coatnet_3_rw", 1000)])
def test_a_timm_name_has_the_classes_of_its_weights(name, classes):
    """As in timm: the classifier of the tag's weights (the default tag's for a name without one),
    so that timm's weights load into create_model(name) as built; our own names keep 1000."""
    with torch.device("meta"):
        assert coatnet.create_model(name).num_classes == classes
        assert coatnet.create_model(name, num_classes=5).num_classes == 5


def test_every_published_name_has_timms_classes():
    timm = pytest.importorskip("timm")
    published = timm.list_pretrained("coatnet*")
    for name in published + sorted({n.partition(".")[0] for n in published}):  # a name without a tag: the default
        with torch.device("meta"):
            assert coatnet.create_model(name).num_classes == timm.models.get_pretrained_cfg(name).num_classes, name


def test_list_models_shows_timm_names_with_their_tags():
    names = coatnet.list_models(aliases=True)
    assert {"coatnet_0_rw_224", "coatnet_0_rw_224.sw_in1k", "coatnet_rmlp_2_rw_384.sw_in12k_ft_in1k",
            "coatnet_0_224"} <= set(names)
    assert "coatnet_0_rw_224" not in coatnet.list_models()  # ours only, by default
    # timm's other forms: a list of patterns, and only the names of published weights
    assert coatnet.list_models(["coatnet_0", "coatnet_1"]) == ["coatnet_0", "coatnet_1"]
    timm = pytest.importorskip("timm")
    assert sorted(coatnet.list_models(pretrained=True)) == sorted(timm.list_models("coatnet*", pretrained=True))


@pytest.mark.parametrize("name,message", [
    ("coatnet_0_rw_224.sw_in2k", "unknown pretrained tag 'sw_in2k' for coatnet_0_rw_224; tags published for it: "
                                 "sw_in1k"),
    ("coatnet_0_224.sw_in1k", "unknown pretrained tag 'sw_in1k' for coatnet_0_224; tags published for it: none"),
    ("coatnet_0.sw_in1k", "a pretrained tag goes with timm's name"),
    ("coatnet_9_224", "unknown model 'coatnet_9_224'; known models: "),  # as near each of coatnet_0..7_224
    ("coatnet_0_rw_244", "unknown model 'coatnet_0_rw_244' (did you mean coatnet_0_rw_224?); known models: "),
    ("coatnet_pic", "did you mean coatnet_pico?"),
    ("CoAtNet_0", "did you mean coatnet_0?"),  # as the paper writes it
    (None, "a model name is a string, e.g. 'coatnet_0', got None"),
])
def test_unknown_names_and_tags_are_one_line(name, message):
    with pytest.raises(ValueError) as e:
        coatnet.create_model(name)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_commands_take_timm_names(capsys, tmp_path):
    assert main(["info", "coatnet_0_224"]) == 0
    assert "coatnet_0_224" in capsys.readouterr().out
    assert main(["train", "--model", "coatnet_rmlp_nano_rw_224", "--epochs", "1", "--img-size", "32",
                 "--batch-size", "128", "--output-dir", str(tmp_path / "run")]) == 0
    # 11 steps, all of them warm-up at the default 50: said, not silently a run that never decays
    assert "note: --warmup-steps 50 covers the whole run of 11 steps" in capsys.readouterr().out


def test_features_only():
    torch.manual_seed(0)
    extractor = coatnet.create_model("coatnet_0", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    x = torch.randn(1, 3, 96, 128)
    maps = extractor(x)
    assert extractor.feature_info.channels() == [96, 192, 384, 768]
    assert extractor.feature_info.reduction() == [4, 8, 16, 32]
    info = extractor.feature_info
    expected = [(1, c, 96 // r, 128 // r) for c, r in zip(info.channels(), info.reduction())]
    assert [tuple(m.shape) for m in maps] == expected
    assert coatnet.create_model("coatnet_pico", features_only=True).feature_info.reduction() == [2, 4, 8, 16]
    with pytest.raises(ValueError, match=r"feature indices \[9\] out of range"):
        coatnet.create_model("coatnet_pico", features_only=True, out_indices=(9,))
    # timm's other forms: an int n is the last n maps, a negative index counts from the end
    for out_indices, indices in ((2, (3, 4)), ((-1,), (4,)), ((-3, -2), (2, 3))):
        picked = coatnet.create_model("coatnet_0", features_only=True, out_indices=out_indices).eval()
        # it holds the stages up to its last map (timm's extractors prune so too), the same weights
        assert {k.split(".")[2] for k in picked.state_dict() if k.startswith("model.stages.")} == \
            {str(i) for i in range(max(indices))}
        picked.load_state_dict({k: v for k, v in extractor.state_dict().items() if k in picked.state_dict()})
        assert picked.out_indices == indices
        for got, i in zip(picked(x), indices, strict=True):
            torch.testing.assert_close(got, maps[i - 1])
    with pytest.raises(ValueError, match="pass features_only=True"):
        coatnet.create_model("coatnet_pico", out_indices=(1,))
    # timm's data helpers and ours read a feature extractor as they read its model
    prepare = coatnet.data_transforms(extractor)
    assert prepare(torch.zeros(3, 300, 200, dtype=torch.uint8)).shape == (3, 224, 224)


@pytest.mark.parametrize("out_indices,message", [
    ((3, 1), r"feature indices \[3, 1\] pick the maps \[3, 1\]; give them in increasing order, each once \(\[1, 3\]\)"),
    ((2, 2), r"pick the maps \[2, 2\]; give them in increasing order, each once \(\[2\]\)"),
    ((-1, 1), r"pick the maps \[4, 1\]"),
    ((), "feature indices \\[\\]: give an int n"), ([1.0], "feature indices \\[1.0\\]: give an int n"),
    ("1", "feature indices '1': give an int n"), (True, "feature indices True: give an int n"),
])
def test_feature_indices_that_feature_info_would_not_follow_are_refused(out_indices, message):
    """Maps come in stage order, once each: (3, 1) gave the maps of 1 and 3 under feature_info's
    channels of 3 and 1, (2, 2) one map under two entries, without a word; other types, a traceback."""
    with pytest.raises(ValueError, match=message):
        coatnet.create_model("coatnet_pico", features_only=True, out_indices=out_indices)


def test_feature_indices_as_any_sequence_of_integers():
    import numpy as np

    for out_indices in ((1, 2), range(1, 3), list(np.array([1, 2])), np.array([1, 2])):
        assert coatnet.create_model("coatnet_pico", features_only=True, out_indices=out_indices).out_indices == (1, 2)
    assert coatnet.create_model("coatnet_pico", features_only=True, out_indices=np.int64(2)).out_indices == (3, 4)


def test_prune_intermediate_layers_keeps_what_the_maps_need(tmp_path):
    """timm's prune_intermediate_layers: the stages after the last map asked for, the head and (if
    asked) its norm go; the maps and the kept weights are unchanged."""
    from coatnet.models.folder import ModelFolderError

    torch.manual_seed(0)
    model = coatnet.create_model("coatnet_pico", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    maps = model.forward_intermediates(x, [1, 2], intermediates_only=True)
    weights = model.state_dict()
    assert model.prune_intermediate_layers((1, 2)) == [1, 2]
    assert len(model.stages) == 2 and len(model.feature_info) == 3
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert not any(k.startswith(("stages.2.", "stages.3.", "head_norm.", "classifier.")) for k in model.state_dict())
    for got, want in zip(model.forward_intermediates(x, [1, 2], intermediates_only=True), maps, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(model(x), maps[1])  # the last kept map, unpooled as timm's (before: pooled)
    assert model.num_features == model.head_hidden_size == model.feature_info[-1]["num_chs"] == maps[1].shape[1]
    with pytest.raises(ModelFolderError, match="pruned"):  # not "reset_classifier(N, 'avg') first", which is no fix
        model.save_pretrained(tmp_path)
    model.reset_classifier(3, "avg")  # a new head on the kept stages
    assert model(x).shape == (2, 3)
    with pytest.raises(ModelFolderError, match="pruned"):
        model.save_pretrained(tmp_path)
    # the head reads the last stage: it cannot stay without it; the norm alone can go
    with pytest.raises(ValueError, match="prune_head=True"):
        coatnet.create_model("coatnet_pico").prune_intermediate_layers([2], prune_head=False)
    whole = coatnet.create_model("coatnet_pico", num_classes=10)
    assert whole.prune_intermediate_layers(prune_norm=True, prune_head=False) == [4]
    assert whole(x).shape == (2, 10) and isinstance(whole.head_norm, nn.Identity)
    # timm's model, pruned alike, gives the same: the map of the last stage kept
    timm = pytest.importorskip("timm")
    for model in (timm.create_model("coatnet_nano_rw_224", img_size=64),
                  coatnet.create_model("coatnet_nano_rw_224", img_size=64)):
        model.eval().prune_intermediate_layers([2])
        assert model(x).shape == (2, 128, 8, 8)


def test_features_plug_into_torchvision_faster_rcnn():
    """A Faster R-CNN on our S1..S4 maps through torchvision's FPN: one training step at a non-square size."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = coatnet.create_model("coatnet_pico", features_only=True)
            self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), out_channels=32)
            self.out_channels = 32

        def forward(self, x):
            return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(self.body(x))))

    torch.manual_seed(0)
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,), (64,)), aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    detector = FasterRCNN(Backbone(), num_classes=3, rpn_anchor_generator=anchors, min_size=96, max_size=128,
                          box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2))
    images = [torch.rand(3, 96, 128), torch.rand(3, 96, 128)]
    targets = [dict(boxes=torch.tensor([[10.0, 20.0, 60.0, 80.0]]), labels=torch.tensor([1])),
               dict(boxes=torch.tensor([[30.0, 10.0, 120.0, 50.0]]), labels=torch.tensor([2]))]
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01)
    losses = detector.train()(images, targets)
    total = sum(losses.values())
    total.backward()
    optimizer.step()
    assert torch.isfinite(total) and set(losses) >= {"loss_classifier", "loss_box_reg", "loss_objectness"}
    assert detector.backbone.body.model.stages[0][0].residual.expand[0].weight.grad is not None


def test_list_models_of_published_weights_takes_a_name_without_its_tag():
    """As timm's: list_models("coatnet_2_rw_224", pretrained=True) lists that name's weights, each tag
    (before: [], as if it had none)."""
    assert coatnet.list_models("coatnet_0_rw_224", pretrained=True) == ["coatnet_0_rw_224.sw_in1k"]
    assert sorted(coatnet.list_models("coatnet_2_rw_224", pretrained=True)) == \
        ["coatnet_2_rw_224.sw_in12k", "coatnet_2_rw_224.sw_in12k_ft_in1k"]
    assert coatnet.list_models("coatnet_0_224", pretrained=True) == []  # no weights published
    assert coatnet.list_models("coatnet_0_rw_224.sw_in1k", pretrained=True) == ["coatnet_0_rw_224.sw_in1k"]
    timm = pytest.importorskip("timm")
    for pattern in ("coatnet_0_rw_224", "coatnet_rmlp_2_rw_384", ["coatnet_3_rw_224", "coatnet_1_rw_224"], "*in12k*"):
        assert sorted(coatnet.list_models(pattern, pretrained=True)) == \
            sorted(n for n in timm.list_models(pattern, pretrained=True) if n.startswith("coatnet")), pattern


def test_list_models_of_published_weights_excludes_a_name_without_its_tag():
    """As timm's: exclude_filters without a tag leaves out each tag of that name's weights, as a filter without
    one takes each (before: list_models(pretrained=True, exclude_filters="coatnet_2_rw_224") still listed them)."""
    names = coatnet.list_models("coatnet_*_rw_224", pretrained=True, exclude_filters="coatnet_2_rw_224")
    assert "coatnet_0_rw_224.sw_in1k" in names and not [n for n in names if n.startswith("coatnet_2_rw_224.")]
    timm = pytest.importorskip("timm")
    for pattern, excluded in (("coatnet_*", "coatnet_2_rw_224"), ("*rw_224", ["coatnet_rmlp_2_rw_224", "*nano*"])):
        assert sorted(coatnet.list_models(pattern, pretrained=True, exclude_filters=excluded)) == sorted(
            n for n in timm.list_models(pattern, pretrained=True, exclude_filters=excluded) if n.startswith("coatnet"))


def test_feature_info_has_timms_accessors():
    """What detection code calls on timm's feature_info (effdet: get_dicts(keys=[...]); channels(-1)),
    and timm's default_cfg on the extractor (before: AttributeError, or a TypeError for channels(-1))."""
    extractor = coatnet.create_model("coatnet_pico", features_only=True, out_indices=(2, 3, 4))
    info = extractor.feature_info
    assert info.out_indices == (2, 3, 4)
    assert info.get_dicts(keys=["num_chs", "reduction"]) == [dict(num_chs=64, reduction=4),
                                                             dict(num_chs=128, reduction=8),
                                                             dict(num_chs=256, reduction=16)]
    assert info.get_dicts()[0] == dict(num_chs=64, reduction=4, module="stages.1")
    assert info.get_dicts(idx=-1) == dict(num_chs=256, reduction=16, module="stages.3")
    assert (info.channels(-1), info.reduction(0), info.module_name(1)) == (256, 4, "stages.2")
    assert info.channels([0, 2]) == [64, 256] and info.get("num_chs") == info.channels() == [64, 128, 256]
    assert extractor.default_cfg == extractor.pretrained_cfg


def test_timms_layer_switches_are_taken_as_timms_scripts_pass_them():
    """timm's train.py and validate.py pass scriptable=args.torchscript (False), and users exportable
    or no_jit: nothing to switch here (before: "unknown option(s) scriptable"); scriptable=True, which
    CoAtNet cannot honour, is refused in one line."""
    for switches in (dict(scriptable=False), dict(exportable=True), dict(no_jit=True), dict(scriptable=None)):
        with torch.device("meta"):
            plain = coatnet.create_model("coatnet_pico")
            assert coatnet.create_model("coatnet_pico", **switches).config == plain.config
    with pytest.raises(ValueError, match="scriptable: CoAtNet does not take torch.jit.script; trace or export it"):
        coatnet.create_model("coatnet_pico", scriptable=True)


def test_list_models_takes_timms_empty_filter_and_its_keywords():
    """timm's list_models(filter='', ...): an empty filter lists every model (before: none), and a timm
    user's keywords filter= and exclude_filters= are taken (before: TypeError, unexpected keyword)."""
    assert coatnet.list_models("") == coatnet.list_models() and coatnet.list_models("")
    assert coatnet.list_models([""]) == coatnet.list_models()
    assert coatnet.list_models(filter="coatnet_0*") == coatnet.list_models("coatnet_0*") == \
        ["coatnet_0", "coatnet_0_rw"]
    assert coatnet.list_models("coatnet_*", exclude_filters="*rw*") == [f"coatnet_{i}" for i in range(8)] + \
        ["coatnet_pico", "coatnet_nano"]
    assert coatnet.list_models("coatnet_0*", exclude_filters=["*rw*"]) == ["coatnet_0"]
    assert "coatnet_0_rw_224.sw_in1k" not in coatnet.list_models(pretrained=True, exclude_filters="*_0_*")
    with pytest.raises(ValueError, match="give the filter once"):
        coatnet.list_models("coatnet_0*", filter="coatnet_1*")


def test_is_model_as_timms():
    """timm.is_model(name): whether create_model builds the network of name, a pretrained tag left aside,
    as timm reads it (before: coatnet had no is_model, AttributeError)."""
    for name in ("coatnet_0", "coatnet_pico", "coatnet_0_rw_224", "coatnet_0_rw_224.sw_in1k", "coatnet_0_224"):
        assert coatnet.is_model(name) is True, name
    for name in ("coatnet_9", "resnet50", "", "hf-hub:timm/coatnet_0_rw_224.sw_in1k", None, 3):
        assert coatnet.is_model(name) is False, name
