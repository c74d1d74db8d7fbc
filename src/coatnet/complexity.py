"""Parameter and FLOP counts beside the paper's, built on the ``meta`` device.

On ``meta`` a model has shapes but no storage, so counting CoAtNet-7 (2.4B parameters) costs no
memory. FLOPs are multiply-adds, the paper's convention, from ``torch.utils.flop_counter``
(convolutions, matrix products and attention; element-wise work is not counted, as in the paper).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .models import create_model, model_entry


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, img_size: int | tuple[int, int], in_chans: int | None = None) -> int:
    """Multiply-adds of one forward pass of one image of ``img_size`` (``in_chans``: for a model
    without our ``config``, e.g. timm's), in eval mode, on the meta device whatever ``model``'s is.

    On the meta device the attention's products are counted: on the CPU PyTorch's fused attention
    kernel is one ``FlopCounterMode`` counts nothing for (timm's model runs it). ``model`` is left as
    it was: in train mode BatchNorm would fold the image into its statistics (and refuse a 1x1 map).
    """
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    state = {name: torch.empty_like(t, device="meta") for name, t in tensors}
    x = torch.zeros(1, in_chans or model.config.in_chans, height, width, device="meta",
                    dtype=next(model.parameters()).dtype)
    modes = [(m, m.training) for m in model.modules()]  # each its own: a frozen BatchNorm stays frozen
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            torch.func.functional_call(model.eval(), state, (x,))
    finally:
        for m, training in modes:
            m.train(training)
    return counter.get_total_flops() // 2


@dataclass(frozen=True)
class Complexity:
    model: str
    layout: str
    img_size: int | tuple[int, int]  # (height, width) where they differ
    params: int
    flops: int
    paper_params: float | None
    paper_flops: float | None

    @staticmethod
    def _diff(ours: float, paper: float | None) -> float | None:
        return None if paper is None else 100.0 * (ours / paper - 1.0)

    @property
    def params_diff(self) -> float | None:
        """Percent difference from the paper's parameter count (None where it reports none)."""
        return self._diff(self.params, self.paper_params)

    @property
    def flops_diff(self) -> float | None:
        return self._diff(self.flops, self.paper_flops)

    def to_dict(self) -> dict:
        return asdict(self) | {"params_diff_pct": self.params_diff, "flops_diff_pct": self.flops_diff}


def measure(name: str, img_size: int | tuple[int, int] | None = None, **kwargs) -> Complexity:
    """Count ``name`` at ``img_size`` (default: the model's own) on the meta device."""
    paper = model_entry(name).paper  # an unknown name, or a Hub repository's or folder's, fails before building
    with torch.device("meta"):
        model = create_model(name, img_size=img_size, **kwargs).eval()
    height, width = model.config.img_size
    # A non-square input (create_model takes one) is counted as built, and reported as (H, W): the
    # paper's figures are all of square images, so it has none to compare with.
    size = height if height == width else (height, width)
    # The paper counts parameters once, for the sizes it reports (224, 384, 512): at others the
    # relative-position tables, which grow with the grid, would be compared with a count that lacks them.
    square = height == width
    paper_params = paper.params if square and (size == 224 or size in paper.flops) else None
    return Complexity(name, model.config.layout, size, count_parameters(model), count_flops(model, (height, width)),
                      paper_params, paper.flops.get(size) if square else None)
