"""Helpers shared by the tests."""

import os

import torch

# Nothing in the tests may reach the network: the Hub is read from caches the tests write.
os.environ["HF_HUB_OFFLINE"] = "1"


def randomise_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Give every BatchNorm statistics and affine terms, and every layer scale a size, away from the
    identity (of the size trained networks have), so that a wrong fold, conversion or ordering
    shows; returns the model in eval mode."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
                m.weight.copy_(1 + torch.randn(m.weight.shape, generator=generator) * 0.1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model.eval()
