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


# -- The configurations themselves (FACTS.md, Tables 3, 10, 12) --------------------------------------
# The counts above pin little of the architecture: CoAtNet-0 with S1/S2 depths swapped (3, 2, 5, 2),
# head size 64, SE squeezing to 1/16, average instead of max pooling, SiLU instead of GELU, or
# BatchNorm in the Transformer blocks all stay within 2% of the parameters and 5% of the FLOPs (the
# swap: -1.0% / -1.3%). test_models.py's version-1 snapshot pins the configs only to the code's own
# earlier output. These tests state the paper's values.

# name: (S0 width, [(block, depth, width, stride) for each stage after S0], head size, drop path)
_C, _T = "mbconv", "transformer"
TABLE_3 = {
    "coatnet_0": (64, [(_C, 2, 96, 2), (_C, 3, 192, 2), (_T, 5, 384, 2), (_T, 2, 768, 2)], 32, 0.2),
    "coatnet_1": (64, [(_C, 2, 96, 2), (_C, 6, 192, 2), (_T, 14, 384, 2), (_T, 2, 768, 2)], 32, 0.3),
    "coatnet_2": (128, [(_C, 2, 128, 2), (_C, 6, 256, 2), (_T, 14, 512, 2), (_T, 2, 1024, 2)], 32, 0.5),
    "coatnet_3": (192, [(_C, 2, 192, 2), (_C, 6, 384, 2), (_T, 14, 768, 2), (_T, 2, 1536, 2)], 32, 0.7),
    "coatnet_4": (192, [(_C, 2, 192, 2), (_C, 12, 384, 2), (_T, 28, 768, 2), (_T, 2, 1536, 2)], 32, 0.0),
    "coatnet_5": (192, [(_C, 2, 256, 2), (_C, 12, 512, 2), (_T, 28, 1280, 2), (_T, 2, 2048, 2)], 64, 0.0),
    # Table 12: S3 is 8 MBConv blocks, then 42 Transformer blocks at a larger width, at the same resolution
    "coatnet_6": (192, [(_C, 2, 192, 2), (_C, 4, 384, 2), (_C, 8, 768, 2), (_T, 42, 1536, 1), (_T, 2, 2048, 2)],
                  128, 0.0),
    "coatnet_7": (192, [(_C, 2, 256, 2), (_C, 4, 512, 2), (_C, 8, 1024, 2), (_T, 42, 2048, 1), (_T, 2, 3072, 2)],
                  128, 0.0),
}


def _meta_model(name, **kwargs):
    import torch

    import coatnet

    with torch.device("meta"):
        return coatnet.create_model(name, **kwargs)


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_table_3_configuration_exactly(name):
    """Depths, widths, block types, strides and head size of Tables 3 and 12, and Table 10's stochastic
    depth for CoAtNet-0..3 (0 for the others, which have no ImageNet-1K rate); the shared block
    settings of Section 2 and Appendix A.1."""
    stem, stages, head_size, drop_path = TABLE_3[name]
    c = _meta_model(name).config
    assert (c.stem.kind, c.stem.channels, c.stem.stride, c.stem.mid_channels) == ("conv", stem, 2, None)
    assert [(s.block, s.depth, s.channels, s.stride) for s in c.stages] == stages
    assert c.transformer.head_size == head_size and c.drop_path_rate == pytest.approx(drop_path)
    assert c.stride == 32 and c.layout in ("C-C-T-T", "C-C-C-T-T")
    m, t = c.mbconv, c.transformer
    # MBConv: expand x4, SE 0.25, GELU everywhere, stride on the first 1x1 conv (Eq. 5), max-pool shortcut
    assert (m.expand_ratio, m.se_ratio, m.stride_on, m.pool, m.activation, m.se_activation) == \
        (4, 0.25, "expand", "max", "gelu", "gelu")
    assert not (m.pre_norm_activation or m.se_before_norm)
    # Transformer: FFN x4, Eq. 3's learnt table, max-pool (Eq. 4), pre-norm LayerNorm, no layer scale
    assert (t.expand_ratio, t.relative_position, t.pool, t.norm, t.layer_scale_init) == \
        (4, "table", "max", "layernorm", None)
    assert c.stem.activation == "gelu"


def test_coatnet_0_blocks_as_section_2_and_appendix_a1_build_them():
    """The built network, block by block: pre-norm BatchNorm in MBConv and LayerNorm in the Transformer,
    GELU (exact) everywhere, 1x1 expand x4 (strided in the first block) -> depthwise 3x3 -> SE 0.25 -> 1x1,
    2x2 max-pool stride 2 on both branches of the down-sampling blocks, FFN x4, heads of 32, one
    (2H-1)x(2W-1) table per head and layer for the H x W grid it attends over."""
    from torch import nn

    from coatnet.models.coatnet import MBConv, RelativePositionTable, TransformerBlock

    model = _meta_model("coatnet_0")
    conv1, conv2 = model.stem[0][0], model.stem[1]
    assert (conv1.kernel_size, conv1.stride, conv2.kernel_size, conv2.stride) == ((3, 3), (2, 2), (3, 3), (1, 1))
    gelus = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert gelus and all(g.approximate == "none" for g in gelus)
    assert not any(isinstance(m, (nn.SiLU, nn.ReLU)) for m in model.modules())
    grid = 224 // 2
    for stage in model.stages:
        for j, block in enumerate(getattr(stage, "blocks", stage)):
            first = j == 0
            if isinstance(block, MBConv):
                grid //= 2 if first else 1
                r = block.residual
                out = r.project.out_channels
                assert isinstance(r.norm, nn.BatchNorm2d) and r.norm.num_features == r.expand[0].in_channels
                assert r.expand[0].kernel_size == (1, 1) and r.expand[0].out_channels == 4 * out
                assert r.expand[0].stride == ((2, 2) if first else (1, 1))
                assert r.depthwise[0].kernel_size == (3, 3) and r.depthwise[0].stride == (1, 1)
                assert r.depthwise[0].groups == 4 * out and r.se.fc1.out_channels == out // 4
                if first:
                    pool = block.shortcut[0]
                    assert isinstance(pool, nn.MaxPool2d) and (pool.kernel_size, pool.stride) == (2, 2)
            else:
                assert isinstance(block, TransformerBlock)
                grid //= 2 if first else 1
                width = block.ffn[0].in_features
                assert block.downsample == first and block.pool == "max"
                assert isinstance(block.attn_norm, nn.LayerNorm) and isinstance(block.ffn_norm, nn.LayerNorm)
                assert block.ffn[0].out_features == 4 * width and block.attn.head_size == 32
                assert block.attn.num_heads == width // 32
                table = block.attn.relative_position
                assert isinstance(table, RelativePositionTable)
                assert tuple(table.table.shape) == (width // 32, 2 * grid - 1, 2 * grid - 1)
    assert grid == 7
    tables = [m.table for m in model.modules() if isinstance(m, RelativePositionTable)]
    assert len(tables) == 5 + 2 and len({id(t) for t in tables}) == 7  # per layer, not shared
    assert isinstance(model.head_norm, nn.LayerNorm) and model.classifier.in_features == 768


@pytest.mark.parametrize("name,layout,stages", [
    ("c_c_c_c", "C-C-C-C", ["mbconv"] * 4),
    ("c_c_c_t", "C-C-C-T", ["mbconv"] * 3 + ["transformer"]),
    ("c_c_t_t", "C-C-T-T", ["mbconv"] * 2 + ["transformer"] * 2),
    ("c_t_t_t", "C-T-T-T", ["mbconv"] + ["transformer"] * 3),
])
def test_study_layouts_are_section_2_2s(name, layout, stages):
    """The multi-stage layouts: S0 conv stem, S1 always MBConv, conv stages before Transformer stages,
    a 2x reduction at each of S1..S4; no stochastic depth (the study trains without regularisation)."""
    c = _meta_model(name).config
    assert c.layout == layout and [s.block for s in c.stages] == stages
    assert c.stem.kind == "conv" and c.stem.stride == 2 and [s.stride for s in c.stages] == [2, 2, 2, 2]
    assert c.drop_path_rate == 0


def test_vit_rel_is_a_patch_stem_then_relative_attention_blocks():
    c = _meta_model("vit_rel").config
    assert (c.layout, c.stem.kind, c.stem.stride) == ("VIT_REL", "patch", 16)
    assert [(s.block, s.stride) for s in c.stages] == [("transformer", 1)]
    assert c.transformer.relative_position == "table" and c.drop_path_rate == 0


def test_coatnet_6s_reported_count_is_met_with_coatnet_7s_s4_width():
    """Where CoAtNet-6's 1.47B could come from: with S4 3072 wide (CoAtNet-7's) instead of Table 12's 2048,
    it counts 1.471B (+0.1%) and 1495B FLOPs at 512 (-1.7%, against -3.7% as built): a gap of cheap
    parameters, as the smallest grid's are. Recorded beside the strict xfail above; the model keeps Table 12."""
    stages = [dict(block=b, depth=d, channels=w, stride=s) for b, d, w, s in TABLE_3["coatnet_6"][1]]
    stages[-1]["channels"] = 3072
    r = measure("coatnet_6", 224, stages=stages, head=dict(hidden_size=3072))
    assert abs(r.params / 1.47e9 - 1) <= 0.005


def test_the_differences_are_ours_relative_to_the_papers():
    """+10% where ours is 10% above the paper's figure (before a sign or base slip would read -9.1%)."""
    from coatnet.complexity import Complexity

    r = Complexity("m", "C-C-T-T", 224, params=22_000_000, flops=4_400_000_000, paper_params=20e6, paper_flops=4e9)
    assert r.params_diff == pytest.approx(10.0) and r.flops_diff == pytest.approx(10.0)
    assert r.to_dict()["params_diff_pct"] == pytest.approx(10.0)
