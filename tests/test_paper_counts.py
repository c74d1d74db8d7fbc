"""Parameter and FLOP counts against the paper (Tables 3-5, 9, 13, 14), on the meta device."""

import functools

import pytest

from coatnet.complexity import measure
from coatnet.models import list_models, model_entry


@functools.cache
def measured(name: str, size: int = 224):
    """``measure`` of a named model, counted once for all the tests that read it (full-size FLOP counts
    take seconds each). Every model named here is built for 224 px by default."""
    return measure(name, size)

PAPER_MODELS = [f"coatnet_{i}" for i in range(8)]
LAYOUTS = ["vit_rel", "c_c_c_c", "c_c_c_t", "c_c_t_t", "c_t_t_t"]


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_params_within_2_percent(name, request):
    if name == "coatnet_6":
        # Table 12's CoAtNet-6 counts to 1.348B, 8.3% under the reported 1.47B, while its FLOPs
        # match (-3.7%) and CoAtNet-7, built the same way, matches to 0.1%. See README.
        request.applymarker(pytest.mark.xfail(strict=True, reason="paper's CoAtNet-6 count is inconsistent"))
    r = measured(name)
    assert abs(r.params_diff) <= 2.0, f"{name}: {r.params / 1e6:.2f}M vs paper {r.paper_params / 1e6:.0f}M"


FLOP_CASES = [(name, size) for name in PAPER_MODELS for size in sorted(model_entry(name).paper.flops)]


@pytest.mark.parametrize("name,size", FLOP_CASES)
def test_flops_within_5_percent(name, size):
    r = measured(name, size)
    assert abs(r.flops_diff) <= 5.0, f"{name}@{size}: {r.flops / 1e9:.2f}B vs paper {r.paper_flops / 1e9:.1f}B"


def test_every_reported_flop_figure_is_checked():
    sizes = {(n, s) for n, s in FLOP_CASES}
    assert {("coatnet_0", 224), ("coatnet_3", 512), ("coatnet_7", 512)} <= sizes and len(sizes) == 15


@pytest.mark.parametrize("name,paper", [("coatnet_0", 4.6e9), ("coatnet_1", 8.8e9), ("coatnet_2", 16.6e9)])
def test_table9_stride_on_depthwise_flops(name, paper):
    """Table 9 moves the MBConv stride to the depthwise conv: more FLOPs, same parameters."""
    r = measure(name, mbconv=dict(stride_on="depthwise"))
    assert abs(r.flops / paper - 1) <= 0.05
    assert r.params == measured(name).params and r.flops > measured(name).flops


def test_layouts_have_comparable_size():
    params = {name: measured(name).params for name in LAYOUTS}
    assert max(params.values()) / min(params.values()) <= 1.15, params
    assert {measured(n).layout for n in LAYOUTS} == {"VIT_REL", "C-C-C-C", "C-C-C-T", "C-C-T-T", "C-T-T-T"}


def test_registry_holds_the_whole_family():
    timm_variants = set(list_models("coatnet_*_rw*"))  # not the paper's: for timm's weights (test_interop.py)
    assert set(PAPER_MODELS + LAYOUTS + ["coatnet_pico", "coatnet_nano"]) == set(list_models()) - timm_variants


def test_count_flops_leaves_the_model_as_it_was_and_counts_the_attention():
    """The bench counts a fresh model's FLOPs before timing it: the model's mode and BatchNorm
    statistics stay as they were, a layout whose last map is 1x1 is counted (BatchNorm in train mode
    refuses one value per channel), and on the CPU the count is the meta device's, attention included."""
    import torch

    import coatnet
    from coatnet.complexity import count_flops

    for name in ("c_c_c_c", "c_t_t_t"):
        torch.manual_seed(0)
        model = coatnet.create_model(name, img_size=32)
        model.stages[0][0].residual.norm.eval()  # a frozen BatchNorm while fine-tuning
        modes = [m.training for m in model.modules()]
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert count_flops(model, 32) == measure(name, 32).flops
        assert [m.training for m in model.modules()] == modes
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_non_square_size_is_counted_as_built():
    """create_model takes (height, width): measure counts that input, not a square of its height
    (before: 224x320 reported as 224 px with 224x224's FLOPs, beside the paper's 224 px figures)."""
    import coatnet
    from coatnet.complexity import count_flops, count_parameters

    r = measure("coatnet_0", (224, 320))
    model = coatnet.create_model("coatnet_0", img_size=(224, 320))
    assert r.params == count_parameters(model)
    assert r.flops == count_flops(model, (224, 320)) > measure("coatnet_0", 224).flops
    assert r.img_size == (224, 320) and r.paper_flops is None and r.paper_params is None
    assert r.flops_diff is None and r.params_diff is None
    assert measure("coatnet_0", (224, 224)) == measure("coatnet_0", 224)  # square: as before, beside the paper
