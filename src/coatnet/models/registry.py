"""A registry of named model builders, in timm's style: ``create_model(name, ...)``."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class PaperFigures:
    """What the paper reports for a configuration, for side-by-side checks (``coatnet info``).

    ``flops`` maps an input resolution to multiply-adds, the paper's convention (Tables 4, 5, 13, 14).
    """

    params: float | None = None
    flops: dict[int, float] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    paper: PaperFigures


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(paper: PaperFigures | None = None):
    """Decorator: register a builder function under its own name."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        if name in _REGISTRY:
            raise RuntimeError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, builder, paper or PaperFigures())
        return builder

    return wrap


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, in registration order; ``pattern`` is a shell-style filter."""
    names = list(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; an unknown name raises ValueError listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_REGISTRY)}") from None
