"""The building blocks and the network: shapes, Eq. 3, down-sampling, resolution changes, errors."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import StochasticDepth

import coatnet
from coatnet.models import load_weights
from coatnet.models.coatnet import (MBConv, MBConvConfig, RelativeAttention, TransformerBlock, TransformerConfig,
                                    pool_tokens, resize_relative_table)


def tiny(**kw):
    torch.manual_seed(0)
    return coatnet.create_model("coatnet_pico", num_classes=10, **kw).eval()


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown model 'coatnet_9'.*coatnet_0.*c_c_t_t"):
        coatnet.create_model("coatnet_9")


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="unknown option.*dropout"):
        coatnet.create_model("coatnet_pico", dropout=0.1)


@pytest.mark.parametrize("size", [(32, 32), (32, 64), (48, 80)])
def test_any_multiple_of_the_stride_works(size):
    model = tiny()
    x = torch.randn(2, 3, *size)
    assert model(x).shape == (2, 10)
    assert model.forward_features(x).shape == (2, 256, size[0] // 16, size[1] // 16)


def test_coatnet_0_full_size_forward_non_square():
    model = coatnet.create_model("coatnet_0").eval()
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 224, 160))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    assert model.num_features == 768 and model.config.stride == 32


def test_head_interface():
    model = tiny()
    feats = model.forward_features(torch.randn(3, 3, 32, 32))
    assert model.forward_head(feats, pre_logits=True).shape == (3, model.head_hidden_size)
    model.reset_classifier(5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5) and model.config.num_classes == 5
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.num_features)
    assert model.default_cfg == model.pretrained_cfg  # timm's older name


def test_a_new_classifier_is_where_the_model_is_in_its_dtype():
    model = tiny().to(torch.bfloat16)
    model.reset_classifier(5)
    assert model.classifier.weight.dtype == torch.bfloat16
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with torch.device("meta"):
        model = coatnet.create_model("coatnet_pico")
    model.reset_classifier(4)
    assert model.classifier.weight.device.type == "meta"


def test_pre_logits_layer_of_paper_models():
    model = coatnet.create_model("coatnet_0", num_classes=7)
    assert isinstance(model.pre_logits[1], torch.nn.Tanh) and model.classifier.in_features == 768


def test_forward_intermediates_are_s1_to_s4():
    model = tiny()
    x = torch.randn(2, 3, 64, 32)
    final, maps = model.forward_intermediates(x)
    assert [m.shape[1:] for m in maps] == [(32, 32, 16), (64, 16, 8), (128, 8, 4), (256, 4, 2)]
    assert [model.feature_info[i]["reduction"] for i in model.default_feature_indices()] == [2, 4, 8, 16]
    torch.testing.assert_close(final, model.forward_features(x))
    only = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    assert [m.shape[1] for m in only] == [16, 64]
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[9])
    # timm's forms: the last n, and negative indices from the end
    assert [m.shape[1] for m in model.forward_intermediates(x, indices=2, intermediates_only=True)] == [128, 256]
    torch.testing.assert_close(model.forward_intermediates(x, indices=[-1], intermediates_only=True)[0], maps[-1])
    with pytest.raises(ValueError, match="output_fmt 'NHWC': the maps are NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_reset_classifier_takes_timms_global_pool(tmp_path):
    """"avg", the paper's, or, as timm's reset_classifier(0, ''), none: the model gives the last stage's map
    (dense features; before: refused), and "avg" pools again; a classifier over the unpooled map is refused,
    and save_pretrained, whose config has no pooling to record, refuses such a head."""
    from coatnet.models.folder import ModelFolderError

    model = tiny().eval()
    x = torch.randn(1, 3, 32, 32)
    model.reset_classifier(3, global_pool="avg")
    assert model(x).shape == (1, 3)
    with pytest.raises(ValueError, match=r"pools by the average \('avg'\) or not at all"):
        model.reset_classifier(3, global_pool="max")
    model.reset_classifier(0, "")
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_features(x))
    assert model(x).shape[:2] == (1, model.num_features) and model(x).ndim == 4
    with pytest.raises(ModelFolderError, match="unpooled"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="pass num_classes=0, or global_pool='avg' for 3 classes"):
        model.reset_classifier(3)  # the pooling kept: '' has no classifier
    model.reset_classifier(3, "avg")
    assert model(x).shape == (1, 3)
    dense = coatnet.create_model("coatnet_pico", num_classes=0, global_pool="", img_size=64)
    side = 64 // dense.feature_info[-1]["reduction"]
    assert dense(torch.randn(2, 3, 64, 64)).shape == (2, dense.num_features, side, side)
    with pytest.raises(ValueError, match="pass num_classes=0"):
        coatnet.create_model("coatnet_pico", global_pool="")


def test_coatnet_6_intermediates_skip_the_split_stage():
    with torch.device("meta"):
        model = coatnet.create_model("coatnet_6")
    reductions = [model.feature_info[i]["reduction"] for i in model.default_feature_indices()]
    assert reductions == [4, 8, 16, 32] and model.config.layout == "C-C-C-T-T"


@pytest.mark.parametrize("bad,message", [
    (torch.randn(3, 32, 32), "expected a 4-D batch"),
    (torch.randn(1, 1, 3, 32, 32), "expected a 4-D batch"),
    (torch.randn(1, 1, 32, 32), "expected 3 input channels, got 1"),
    (torch.randn(1, 3, 40, 32), r"input size 40x32 is not a multiple of the model's stride 16.*48x32"),
    (torch.randn(1, 3, 0, 32), r"the images are empty \(input shape \(1, 3, 0, 32\)\); give images of at least 16x16"),
    (torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8), "the batch is torch.uint8, not floating point; scale"),
    (torch.randn(1, 3, 32, 32, dtype=torch.float64), "the batch is torch.float64 and the model torch.float32; convert"),
])
def test_bad_input_raises_clear_value_error(bad, message):
    model = tiny()
    for mode in (torch.enable_grad, torch.no_grad):  # the plain path and the fast one
        with mode(), pytest.raises(ValueError, match=message):
            model(bad)


def test_a_batch_of_another_float_type_runs_under_autocast():
    model = tiny().to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(1, 3, 32, 32)).dtype == torch.bfloat16


def test_bad_img_size_at_build():
    with pytest.raises(ValueError, match="not a multiple of the model's stride 32; use e.g. 224x224"):
        coatnet.create_model("coatnet_0", img_size=220)


def test_in_chans():
    model = tiny(in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def _naive_relative_attention(attn: RelativeAttention, x, height, width):
    """Eq. 3 written out: scores_ij = q_i.k_j / sqrt(d) + P[h, r_i - r_j + H-1, c_i - c_j + W-1]."""
    b, n, _ = x.shape
    heads, d = attn.num_heads, attn.head_size
    q, k, v = attn.qkv(x).view(b, n, 3, heads, d).unbind(2)
    table = resize_relative_table(attn.relative_position.table, (2 * height - 1, 2 * width - 1))
    bias = torch.empty(heads, n, n)
    for i in range(n):
        for j in range(n):
            (ri, ci), (rj, cj) = divmod(i, width), divmod(j, width)
            bias[:, i, j] = table[:, ri - rj + height - 1, ci - cj + width - 1]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d) + bias
    y = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(b, n, heads * d)
    return attn.proj(y)


@pytest.mark.parametrize("grid", [(3, 4), (4, 4)])
def test_relative_attention_matches_eq3(grid):
    torch.manual_seed(0)
    attn = RelativeAttention(16, 32, grid, TransformerConfig(head_size=8))
    torch.nn.init.normal_(attn.relative_position.table)
    x = torch.randn(2, grid[0] * grid[1], 16)
    torch.testing.assert_close(attn(x, *grid), _naive_relative_attention(attn, x, *grid), atol=1e-5, rtol=1e-5)
    # Another grid: the table is interpolated to (2H'-1)x(2W'-1), then used the same way.
    x = torch.randn(2, 30, 16)
    torch.testing.assert_close(attn(x, 5, 6), _naive_relative_attention(attn, x, 5, 6), atol=1e-5, rtol=1e-5)


def test_tables_are_per_layer_and_per_head():
    model = tiny()
    tables = [m.relative_position.table for m in model.modules() if isinstance(m, RelativeAttention)]
    assert len(tables) == 3  # 2 blocks in S3, 1 in S4: one table each, nothing shared
    assert len({t.data_ptr() for t in tables}) == 3
    assert tables[0].shape == (4, 2 * 4 - 1, 2 * 4 - 1) and tables[2].shape == (8, 3, 3)


def test_resize_relative_table():
    table = torch.randn(2, 7, 9)
    assert resize_relative_table(table, (7, 9)) is table
    big = resize_relative_table(table, (13, 17))
    assert big.shape == (2, 13, 17)
    # align_corners: the zero offset stays at the centre and the extreme offsets at the corners.
    torch.testing.assert_close(big[:, 6, 8], table[:, 3, 4])
    torch.testing.assert_close(big[:, 0, 0], table[:, 0, 0])
    assert torch.allclose(resize_relative_table(torch.full((1, 5, 5), 3.0), (9, 9)), torch.tensor(3.0))
    # A grid one token high (a 32x224 strip at S4): offset 0 alone in that direction, the centre row
    # (before: the first, offset -3), in a bias computed for it and in weights loaded for it.
    torch.testing.assert_close(resize_relative_table(table, (1, 13)), resize_relative_table(table[:, 3:4], (1, 13)))
    torch.testing.assert_close(resize_relative_table(table, (1, 1)), table[:, 3:4, 4:5])
    strip = coatnet.create_model("coatnet_pico", img_size=(16, 64))  # S4's grid: 1 x 4, its table 1 x 7
    square = coatnet.create_model("coatnet_pico", img_size=64)  # 4 x 4, 7 x 7
    strip.load_state_dict(square.state_dict())
    key = "stages.3.blocks.0.attn.relative_position.table"
    torch.testing.assert_close(strip.state_dict()[key], square.state_dict()[key][:, 3:4, :])


def test_inference_bias_follows_the_table():
    """The bias is computed from the table on every call (no cache that could go stale): an in-place
    change of the table, as an optimizer step makes, shows at once, and the inference and grad-mode
    results agree."""
    torch.manual_seed(0)
    attn = RelativeAttention(16, 16, (4, 4), TransformerConfig(head_size=8))
    x = torch.randn(1, 16, 16)
    with torch.inference_mode():
        first = attn(x, 4, 4)
    with torch.no_grad():
        attn.relative_position.table.add_(torch.randn(2, 7, 7))  # in place, as an optimizer step updates it
        changed = attn(x, 4, 4)
    assert not torch.allclose(first, changed)
    torch.testing.assert_close(changed, attn(x, 4, 4))  # grad mode: same numbers


def test_training_after_cached_inference():
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        model(x)
    model.train()
    model(x).sum().backward()  # the cached index must not be an inference tensor
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_forward_at_another_size_equals_model_built_there():
    """Dynamic resolution and building at a new img_size from saved weights agree (Section 2.1)."""
    small = tiny()
    state = small.state_dict()
    big = coatnet.create_model("coatnet_pico", num_classes=10, img_size=64).eval()
    big.load_state_dict(state)
    assert big.stages[2].blocks[0].attn.relative_position.table.shape == (4, 15, 15)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(big(x), small(x), atol=1e-5, rtol=1e-5)


def test_pretrained_file_at_another_resolution(tmp_path):
    from safetensors.torch import save_file

    small = tiny()
    save_file(small.state_dict(), tmp_path / "w.safetensors")
    torch.save(small.state_dict(), tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        big = coatnet.create_model("coatnet_pico", num_classes=10, img_size=96, pretrained=tmp_path / name).eval()
        x = torch.randn(1, 3, 96, 96)
        torch.testing.assert_close(big(x), small(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [64, (32, 64)])
def test_our_weights_file_keeps_the_size_its_tables_show(tmp_path, size):
    """A state dict of ours saved at another size builds there, as timm's files and our folders do
    (before: at the name's own size, its tables interpolated, without a word); unless told; and a
    layout without tables (C-C-C-C) at its name's size."""
    saved = coatnet.create_model("coatnet_pico", num_classes=10, img_size=size).eval()
    torch.save(saved.state_dict(), tmp_path / "w.pth")
    loaded = coatnet.create_model("coatnet_pico", num_classes=10, pretrained=tmp_path / "w.pth").eval()
    assert loaded.config.img_size == saved.config.img_size
    x = torch.randn(1, 3, *saved.config.img_size)
    torch.testing.assert_close(loaded(x), saved(x), atol=1e-5, rtol=1e-5)
    told = coatnet.create_model("coatnet_pico", num_classes=10, pretrained=tmp_path / "w.pth", img_size=96)
    assert told.config.img_size == (96, 96)
    torch.save(coatnet.create_model("c_c_c_c", img_size=256).state_dict(), tmp_path / "c.pth")
    assert coatnet.create_model("c_c_c_c", pretrained=tmp_path / "c.pth").config.img_size == (224, 224)


def test_a_version_1_weights_file_keeps_the_size_its_tables_show(tmp_path):
    """Version 1 named the tables ``attn.relative_position_table``: such a file saved at 64 px builds at 64
    px too, with the same outputs (before: at the name's own 224 px, its tables interpolated, without a word)."""
    saved = coatnet.create_model("coatnet_nano_rw", num_classes=3, img_size=64).eval()
    old = {k.replace(".relative_position.table", ".relative_position_table"): v for k, v in saved.state_dict().items()}
    torch.save(old, tmp_path / "w.pth")
    loaded = coatnet.create_model("coatnet_nano_rw", num_classes=3, pretrained=tmp_path / "w.pth").eval()
    assert loaded.config.img_size == (64, 64)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x), saved(x), atol=1e-5, rtol=1e-5)


def test_pretrained_with_new_classes_drops_the_classifier(tmp_path):
    torch.save(tiny().state_dict(), tmp_path / "w.pth")
    with pytest.warns(UserWarning, match="classifier"):
        model = coatnet.create_model("coatnet_pico", num_classes=3, pretrained=tmp_path / "w.pth")
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_weights_without_a_classifier_leave_the_models_fresh(tmp_path):
    """Features-only weights (num_classes=0, ours or timm's) into a classifier: only the head is new."""
    headless = coatnet.create_model("coatnet_pico", num_classes=0).state_dict()
    for load in (lambda: coatnet.load_weights(coatnet.create_model("coatnet_pico", num_classes=10), headless),
                 lambda: coatnet.create_model("coatnet_pico", num_classes=5, pretrained=tmp_path / "w.pth")):
        torch.save(headless, tmp_path / "w.pth")
        with pytest.warns(UserWarning, match="the checkpoint has no classifier; the model's classifier is left fresh"):
            model = load()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in headless.items())



def test_weights_loaded_at_build_are_not_initialised_first(tmp_path, monkeypatch):
    """create_model(pretrained=...), from_pretrained and the Hub initialise only what the weights do
    not overwrite, a new classifier (CoAtNet-4 from a file took 3-8 s, most of it initialising, now < 1.3):
    the other weights are the saved ones, the new classifier as freshly initialised as ever."""
    saved = tiny()
    torch.save(saved.state_dict(), tmp_path / "w.pth")
    folder = saved.save_pretrained(tmp_path / "folder")
    initialised = []  # the weights init functions wrote, not counting those built on the meta device
    for init in ("trunc_normal_", "kaiming_normal_", "kaiming_uniform_", "uniform_", "normal_"):
        def counted(tensor, *args, init=getattr(torch.nn.init, init), **kwargs):
            initialised.extend([tuple(tensor.shape)] * (tensor.device.type != "meta"))
            return init(tensor, *args, **kwargs)
        monkeypatch.setattr(torch.nn.init, init, counted)
    for load, classes in ((lambda: coatnet.create_model("coatnet_pico", pretrained=tmp_path / "w.pth",
                                                        num_classes=10), 10),
                          (lambda: coatnet.from_pretrained(folder), 10),
                          (lambda: coatnet.create_model("coatnet_pico", pretrained=tmp_path / "w.pth",
                                                        num_classes=3), 3)):
        initialised.clear()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "the checkpoint has a classifier that does not fit")
            model = load()
        assert initialised and set(initialised) <= {(classes, saved.head_hidden_size), (classes,)}
        kept = {k: v for k, v in saved.state_dict().items() if not k.startswith("classifier.")}
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in kept.items())
    assert 0.01 < model.classifier.weight.std() < 0.03 and not model.classifier.bias.any()  # trunc_normal_(0.02)
    initialised.clear()
    coatnet.create_model("coatnet_pico", num_classes=10)  # without weights, every layer is initialised
    assert len(initialised) > 10

def test_a_checkpoint_with_an_averaged_model_loads_its_average(tmp_path):
    """{"state_dict", "model_ema"} where the EMA is torch.optim.swa_utils.AveragedModel's state dict
    ("module." keys and its counter n_averaged): the average is loaded, as timm's loader takes it."""
    model = tiny()
    average = torch.optim.swa_utils.AveragedModel(model)
    torch.save({"state_dict": {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()},
                "model_ema": average.state_dict()}, tmp_path / "checkpoint.pth")
    loaded = coatnet.create_model("coatnet_pico", num_classes=10, pretrained=tmp_path / "checkpoint.pth")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_pretrained_without_a_classifier_drops_theirs_without_a_warning(tmp_path):
    """num_classes=0 (features, pooled) or features_only: nothing is left freshly initialised, so
    nothing to warn of."""
    import warnings

    saved = tiny().state_dict()  # 10 classes, where the name's default is 1000
    torch.save(saved, tmp_path / "w.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = coatnet.create_model("coatnet_pico", num_classes=0, pretrained=tmp_path / "w.pth").eval()
        features = coatnet.create_model("coatnet_pico", features_only=True, pretrained=tmp_path / "w.pth")
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, model.head_hidden_size)
    loaded = features.model.state_dict()  # less the head, which its maps do not need
    assert {k for k in saved if k not in loaded} == {k for k in saved if k.startswith(("classifier.", "head_norm."))}
    assert all(torch.equal(v, saved[k]) for k, v in loaded.items())


@pytest.mark.parametrize("in_chans", [1, 6])
def test_rgb_weights_fit_a_model_of_other_input_channels(tmp_path, in_chans):
    """As timm adapts them: a grey image (or its values repeated over 6 channels) gives what its RGB
    copy gave the RGB weights."""
    rgb = tiny()
    torch.save(rgb.state_dict(), tmp_path / "w.pth")
    model = coatnet.create_model("coatnet_pico", num_classes=10, in_chans=in_chans, pretrained=tmp_path / "w.pth")
    grey = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(grey.expand(-1, in_chans, -1, -1)), rgb(grey.expand(-1, 3, -1, -1)),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pretrained", [False, None, 0])
def test_pretrained_false_is_random_weights_as_in_timm(pretrained):
    torch.manual_seed(0)
    model = coatnet.create_model("coatnet_pico", pretrained=pretrained, num_classes=4)
    torch.manual_seed(0)
    torch.testing.assert_close(model.state_dict(), coatnet.create_model("coatnet_pico", num_classes=4).state_dict())


def test_weights_of_another_model_name_the_keys(tmp_path):
    """Weights of another registered network name it; weights of no registered one (another width here)
    name the keys that differ."""
    torch.save(coatnet.create_model("coatnet_nano").state_dict(), tmp_path / "nano.pth")
    with pytest.raises(ValueError, match=r"^these weights are not coatnet_pico's: they are coatnet_nano's; load them "
                                         r"as coatnet_nano \(coatnet train --model coatnet_nano\)$"):
        coatnet.create_model("coatnet_pico", pretrained=tmp_path / "nano.pth")
    torch.save(coatnet.create_model("coatnet_nano", stem=dict(channels=16)).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"weights do not fit coatnet_pico: .*(missing|unexpected|wrong shape)"):
        coatnet.create_model("coatnet_pico", pretrained=tmp_path / "other.pth")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated"])
def test_corrupt_weights_file(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="corrupt, truncated or not a weights file"):
        load_weights(tiny(), path)
    with pytest.raises(ValueError, match="does not exist"):
        load_weights(tiny(), tmp_path / "missing.safetensors")


def test_drop_path_is_linear_over_blocks():
    model = coatnet.create_model("coatnet_0")
    rates = [m.p for m in model.modules() if isinstance(m, StochasticDepth)]
    assert len(rates) == 2 + 3 + 5 + 2
    expected = [0.2 * i / 11 for i in range(12)]
    assert rates == pytest.approx(expected)
    assert coatnet.create_model("coatnet_0", drop_path_rate=0.0).config.drop_path_rate == 0.0


def test_mbconv_downsampling_eq5_and_table9():
    block = MBConv(8, 16, stride=2)
    assert block.residual.expand[0].stride == (2, 2) and block.residual.depthwise[0].stride == (1, 1)
    assert isinstance(block.residual.norm, torch.nn.BatchNorm2d)  # pre-activation
    assert isinstance(block.shortcut[0], torch.nn.MaxPool2d) and block.shortcut[1].kernel_size == (1, 1)
    assert block.residual.expand[0].out_channels == 64  # x4 expansion
    assert block.residual.se.fc1.out_channels == 4  # SE shrink 0.25
    dw = MBConv(8, 16, stride=2, config=MBConvConfig(stride_on="depthwise"))
    assert dw.residual.expand[0].stride == (1, 1) and dw.residual.depthwise[0].stride == (2, 2)
    x = torch.randn(2, 8, 12, 12)
    assert block(x).shape == dw(x).shape == (2, 16, 6, 6)


def test_pool_tokens_is_a_2x2_max_pool():
    x = torch.randn(2, 6 * 8, 5)
    grid = x.transpose(1, 2).reshape(2, 5, 6, 8)
    expected = F.max_pool2d(grid, 2, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pool_tokens(x, 6, 8), expected)


def test_transformer_downsampling_eq4():
    torch.manual_seed(0)
    block = TransformerBlock(8, 16, (2, 2), downsample=True, config=TransformerConfig(head_size=8)).eval()
    x = torch.randn(2, 16, 8)
    pooled = pool_tokens(x, 4, 4)
    y = block.attn(pool_tokens(block.attn_norm(x), 4, 4), 2, 2)
    expected = block.shortcut(pooled) + y
    expected = expected + block.ffn(block.ffn_norm(expected))
    torch.testing.assert_close(block(x, 4, 4), expected)


def test_layout_shapes_at_224():
    for name in ("vit_rel", "c_c_c_c", "c_t_t_t"):
        with torch.device("meta"):
            model = coatnet.create_model(name)
            assert model(torch.empty(2, 3, 224, 224)).shape == (2, 1000)
    assert coatnet.create_model("vit_rel").config.stride == 16


def test_config_prints_and_round_trips():
    config = coatnet.create_model("coatnet_pico").config
    text = str(config)
    assert "S3  transformer x2" in text and "C-C-T-T" in text
    assert coatnet.CoAtNetConfig.from_dict(config.to_dict()) == config


def test_training_mode_runs_and_drop_path_is_active():
    model = coatnet.create_model("coatnet_pico", num_classes=10, drop_path_rate=0.5).train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b)  # stochastic depth draws differ
    model.eval()
    torch.testing.assert_close(model(x), model(x))


# -- the config's JSON form, its versions, and the model side's independence ----------------------

V1_CONFIGS = json.loads((Path(__file__).parent / "data" / "config_v1.json").read_text())


@pytest.mark.parametrize("name", coatnet.list_models())
def test_version_1_configs_read_as_today(name):
    """config.json files written before the nested configs (version 1, one flat dict, captured from
    that code for every registered model) give exactly today's configuration."""
    with torch.device("meta"):
        config = coatnet.create_model(name).config
    assert coatnet.CoAtNetConfig.from_dict(V1_CONFIGS[name]) == config
    assert config.to_dict()["version"] == 2


def test_a_version_1_folder_loads(tmp_path):
    """A save_pretrained folder of the earlier format (flat config, the relative table as
    ``attn.relative_position_table``) loads with the same outputs."""
    from safetensors.torch import load_file, save_file

    model = tiny()
    folder = model.save_pretrained(tmp_path / "v1")
    meta = json.loads((folder / "config.json").read_text())
    meta["config"] = V1_CONFIGS["coatnet_pico"] | {"num_classes": 10}
    (folder / "config.json").write_text(json.dumps(meta))
    weights = load_file(folder / "model.safetensors")
    old = {k.replace(".relative_position.table", ".relative_position_table"): v for k, v in weights.items()}
    assert old.keys() != weights.keys()
    save_file(old, folder / "model.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(coatnet.from_pretrained(folder)(x), model(x))


@pytest.mark.parametrize("overrides,message", [
    (dict(mbconv=dict(stride_on="pool2")), "stride_on must be one of 'expand', 'depthwise', 'pool', got 'pool2'"),
    (dict(mbconv=dict(stride="depthwise")), "unknown mbconv option(s) stride; options: expand_ratio"),
    (dict(transformer=dict(head_size=0)), "head_size must be an integer >= 1 and <= 1024, got 0"),
    (dict(drop_path_rate=1.0), "drop_path_rate must be a finite number >= 0 and < 1, got 1.0"),
    (dict(num_classes=-1), "num_classes must be an integer >= 0 and <= 1000000, got -1"),
    (dict(num_classes=True), "num_classes must be an integer >= 0 and <= 1000000, got True"),  # not 1 class
    (dict(transformer=dict(layer_scale_init=0.0)), "layer_scale_init must be a finite number > 0, got 0.0"),
    (dict(stages=[dict(block="conv", depth=1, channels=8)]), "block must be one of 'mbconv', 'transformer'"),
    (dict(stages=[dict(block="mbconv")]), "stages option(s) depth, channels missing from {'block': 'mbconv'}"),
    (dict(img_size=32.0), "img_size must be one or two integers"),
    # [rw] attention at the input width: S3's first block attends at S2's 64 channels
    (dict(transformer=dict(attention_width="input", head_size=128)), "transformer width 64 is not a multiple of head "
                                                                     "size 128"),
])
def test_bad_config_values_are_one_line(overrides, message):
    with pytest.raises(ValueError) as e:
        coatnet.create_model("coatnet_pico", **overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_from_a_newer_version_is_refused():
    data = tiny().config.to_dict() | {"version": 3}
    with pytest.raises(ValueError, match="config version 3 is newer than this coatnet reads"):
        coatnet.CoAtNetConfig.from_dict(data)


def test_the_model_side_never_imports_the_training_side():
    code = ("import sys, coatnet.models; "
            "print(sorted(m for m in ('coatnet.train', 'coatnet.checkpoint', 'coatnet.data') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_numpy_integers_are_taken_as_the_integers_they_are():
    """A class count or size computed with numpy (labels.max() + 1: a numpy int64) builds the model, as in timm
    (before: "num_classes must be an integer ..., got np.int64(10)", about an integer)."""
    np = pytest.importorskip("numpy")
    model = coatnet.create_model("coatnet_pico", num_classes=np.int64(10), in_chans=np.int32(1),
                                 img_size=(np.int64(32), np.int64(64)))
    assert (model.num_classes, model.config.in_chans, model.config.img_size) == (10, 1, (32, 64))
    assert type(model.config.num_classes) is int and json.dumps(model.config.to_dict())  # still JSON, as saved
    assert coatnet.create_model("coatnet_pico", img_size=np.int64(64)).config.img_size == (64, 64)
    model.reset_classifier(np.int64(4))
    assert model.num_classes == 4 and type(model.config.num_classes) is int and model.classifier.out_features == 4
    with pytest.raises(ValueError, match="num_classes must be an integer"):  # a bool or a float is still refused
        coatnet.create_model("coatnet_pico", num_classes=np.float64(10))
    for bad in (-1, 2.5, None):  # refused, and the model left as it was (before: num_classes -1, its head the old)
        with pytest.raises(ValueError, match="num_classes must be an integer"):
            model.reset_classifier(bad)
        assert model.num_classes == model.config.num_classes == model(torch.randn(1, 1, 32, 64)).shape[1] == 4


def test_torch_jit_script_is_refused_in_one_line():
    """torch.jit.script(model), as a timm user types it: the model cannot be scripted (README), said in one line
    pointing at tracing and export (before: a RuntimeError from deep inside the fast path's source)."""
    for model in (tiny(), coatnet.create_model("coatnet_pico", features_only=True)):
        with pytest.raises(TypeError, match=r"does not take torch.jit.script; trace or export it \(torch.jit.trace"):
            torch.jit.script(model)


def test_a_resized_table_keeps_a_bias_linear_in_the_offset():
    """align_corners: offset d of the new grid takes the bias of offset d * (old reach / new reach), so a
    table linear in the offsets stays linear everywhere, its edges included (not flattened there)."""
    dy, dx = torch.meshgrid(torch.arange(-3, 4.0), torch.arange(-4, 5.0), indexing="ij")  # a 4 x 5 grid's offsets
    table = (0.5 * dy - 0.25 * dx + 1.0)[None]
    big = resize_relative_table(table, (13, 17))  # a 7 x 9 grid's
    ny, nx = torch.meshgrid(torch.arange(-6, 7.0), torch.arange(-8, 9.0), indexing="ij")
    torch.testing.assert_close(big[0], 0.5 * ny * 3 / 6 - 0.25 * nx * 4 / 8 + 1.0)


def test_version_1_weights_of_a_relative_position_mlp_load():
    """Version 1 named the rmlp variants' MLP ``attn.relative_position_mlp.*``: its weights load under today's
    names, with the same outputs."""
    model = coatnet.create_model("coatnet_pico", img_size=32, transformer=dict(relative_position="mlp")).eval()
    old = {k.replace(".relative_position.", ".relative_position_mlp."): v for k, v in model.state_dict().items()}
    assert old.keys() != model.state_dict().keys()
    loaded = load_weights(coatnet.create_model("coatnet_pico", img_size=32, transformer=dict(relative_position="mlp")),
                          old).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_folders_weights_without_a_classifier_build_none(tmp_path):
    """A save_pretrained folder of a headless model (num_classes=0) is loaded as it was saved: no classifier,
    and no warning of one left fresh (a file's headless weights, by contrast, get the network's default)."""
    folder = coatnet.create_model("coatnet_pico", num_classes=0).save_pretrained(tmp_path / "headless")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = coatnet.create_model("coatnet_pico", pretrained=folder)
    assert model.num_classes == 0 and model(torch.randn(1, 3, 32, 32)).shape == (1, model.num_features)


def test_a_feature_extractor_from_headless_weights_or_unpooled_builds_quietly(tmp_path):
    """features_only from a file of headless weights: no warning of a classifier left fresh (it has none);
    and timm's global_pool='' with features_only is taken (the extractor has no head to unpool)."""
    torch.save(coatnet.create_model("coatnet_pico", num_classes=0).state_dict(), tmp_path / "w.pth")
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kwargs in (dict(pretrained=tmp_path / "w.pth"), dict(global_pool="")):
            extractor = coatnet.create_model("coatnet_pico", features_only=True, **kwargs).eval()
            assert [m.shape[-1] for m in extractor(x)] == [32 // r for r in extractor.feature_info.reduction()]


def test_a_files_weights_keep_their_classifier_when_no_classes_are_given(tmp_path):
    """create_model(pretrained=FILE) with no num_classes builds the file's classifier and loads it, quietly (before:
    the network's default 1000, the file's dropped with a warning)."""
    saved = tiny()
    torch.save(saved.state_dict(), tmp_path / "w.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = coatnet.create_model("coatnet_pico", pretrained=tmp_path / "w.pth")
    assert model.num_classes == 10 and torch.equal(model.classifier.weight, saved.classifier.weight)
