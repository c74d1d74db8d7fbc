"""Properties of the blocks that the other tests left unchecked (found by mutation testing): the
MLP relative-position bias on non-square grids, the head's order (pool, then norm), stochastic
depth per sample and in a training stage, and global forward hooks at inference. Tiny modules only;
each test runs in well under a second."""

import pytest
import torch
from torch.nn.modules import module as nn_module

import coatnet
from coatnet.models.coatnet import ConvStage, MBConv, RelativePositionMLP, TransformerBlock, TransformerConfig
from conftest import randomise_norms


@pytest.mark.parametrize("grid", [(2, 3), (3, 2), (1, 4)])
def test_relative_position_mlp_matches_its_formula_on_non_square_grids(grid):
    """Entry (i, j) of the bias is the MLP of the log-spaced offset (row_i - row_j, col_i - col_j)."""
    torch.manual_seed(0)
    mlp = RelativePositionMLP(num_heads=3, hidden=16).eval()
    for p in mlp.parameters():
        torch.nn.init.normal_(p)
    height, width = grid
    n = height * width
    expected = torch.empty(3, n, n)
    with torch.no_grad():
        for i in range(n):
            for j in range(n):
                (ri, ci), (rj, cj) = divmod(i, width), divmod(j, width)
                d = torch.tensor([float(ri - rj), float(ci - cj)])
                expected[:, i, j] = mlp.fc2(torch.relu(mlp.fc1(d.sign() * d.abs().log1p())))
        torch.testing.assert_close(mlp(height, width), expected, atol=1e-5, rtol=1e-5)


def test_the_head_pools_then_normalises():
    """The paper's head: global average pooling of the last map, then LayerNorm and the classifier."""
    torch.manual_seed(0)
    model = coatnet.create_model("coatnet_pico", num_classes=10, img_size=64).eval()
    with torch.no_grad():
        model.head_norm.weight.normal_()
        model.head_norm.bias.normal_()
        x = torch.randn(2, 3, 64, 64)
        features = model.forward_features(x)
        assert features.shape[-2:] == (4, 4)
        expected = model.classifier(model.head_norm(features.mean(dim=(2, 3))))
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def _dropped_and_kept(out, shortcut, residual, p):
    """Per sample: whether the output is the shortcut alone, or shortcut + residual / (1 - p)."""
    dropped = [torch.allclose(o, s, atol=1e-5) for o, s in zip(out, shortcut)]
    kept = [torch.allclose(o, s + r / (1 - p), atol=1e-4, rtol=1e-4) for o, s, r in zip(out, shortcut, residual)]
    return dropped, kept


def test_stochastic_depth_drops_each_sample_on_its_own():
    """Stochastic depth (Table 10) draws per sample ("row"), not once per batch, in both block kinds."""
    torch.manual_seed(0)
    p = 0.5
    block = MBConv(8, 8, stride=1, drop_path=p).train()
    x = torch.randn(1, 8, 4, 4).expand(32, -1, -1, -1).contiguous()  # identical samples
    with torch.no_grad():
        residual = block.residual(x)
        torch.manual_seed(1)
        out = block(x)
    dropped, kept = _dropped_and_kept(out, x, residual, p)
    assert all(d or k for d, k in zip(dropped, kept))
    assert any(dropped) and any(kept)

    block = TransformerBlock(16, 16, (2, 2), config=TransformerConfig(head_size=8), drop_path=p).train()
    tokens = torch.randn(1, 4, 16).expand(32, -1, -1).contiguous()
    with torch.no_grad():
        torch.manual_seed(1)
        out = block(tokens, 2, 2)
    # Both branches are dropped together per sample: a sample whose attention branch is kept but FFN
    # dropped (or the other way round) gives neither; count only that the draws differ across samples.
    rows = {tuple(o.flatten()[:4].tolist()) for o in out}
    assert len(rows) > 1


def test_a_conv_stage_in_training_computes_its_blocks():
    """In training, a stage of MBConv blocks is the blocks called in turn, stochastic depth included."""
    torch.manual_seed(0)
    stage = ConvStage([MBConv(8, 8, drop_path=0.5), MBConv(8, 8, drop_path=0.5)]).train()
    x = torch.randn(16, 8, 6, 6)
    torch.manual_seed(3)
    out = stage(x)
    torch.manual_seed(3)
    expected = x
    for block in stage:
        expected = block(expected)
    torch.testing.assert_close(out, expected)
    out.sum().backward()


def test_a_global_forward_hook_sees_the_plain_layers_at_inference():
    """A hook registered for every module (torch.nn.modules.module.register_module_forward_hook) changes
    the output at inference as it does with autograd on: the fast path steps aside for it."""
    torch.manual_seed(0)
    model = randomise_norms(coatnet.create_model("coatnet_pico", num_classes=10))
    x = torch.randn(2, 3, 32, 32)

    def halve_norms(module, args, output):
        return output * 0.5 if isinstance(module, torch.nn.BatchNorm2d) else None

    handle = nn_module.register_module_forward_hook(halve_norms)
    try:
        with torch.enable_grad():
            plain = model(x).detach()
        with torch.inference_mode():
            fast = model(x)
    finally:
        handle.remove()
    with torch.inference_mode():
        unhooked = model(x)
    assert not torch.allclose(plain, unhooked, atol=1e-3)  # the hook does change the output
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
