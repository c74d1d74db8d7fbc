"""A registry of named model builders, in timm's style: ``create_model(name, ...)``."""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field, replace
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
    name: str  # the registered name, also when looked up by an alias
    builder: Callable[..., nn.Module]
    paper: PaperFigures
    defaults: dict = field(default_factory=dict)  # an alias's own options, e.g. img_size=384
    tag: str | None = None  # the pretrained tag the name carried ("sw_in1k" of "coatnet_0_rw_224.sw_in1k")

    def build(self, **options) -> nn.Module:
        """The model, with ``options`` (None: the configuration's own) over the alias's defaults."""
        return self.builder(**(self.defaults | {k: v for k, v in options.items() if v is not None}))


@dataclass(frozen=True)
class _Alias:
    target: str
    defaults: dict
    tags: tuple[str, ...]  # of the weights published under this name


# Classes of the weights published under a tag, where not ImageNet-1k's 1000: a timm name with such a
# tag (or whose default tag it is, e.g. coatnet_3_rw_224) is built with their classifier, as in timm.
TAG_CLASSES = {"sw_in12k": 11821}  # the ImageNet-12k subset timm trains on

_REGISTRY: dict[str, ModelEntry] = {}
_ALIASES: dict[str, _Alias] = {}


def register_model(paper: PaperFigures | None = None):
    """Decorator: register a builder function under its own name."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        if name in _REGISTRY:
            raise RuntimeError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, builder, paper or PaperFigures())
        return builder

    return wrap


def register_alias(alias: str, target: str, tags: tuple[str, ...] = (), **defaults) -> None:
    """Another name (timm's) for the registered ``target``, built with ``defaults``; ``tags`` are
    the pretrained tags published under it, which the name may carry after a dot."""
    if alias in _REGISTRY or alias in _ALIASES or target not in _REGISTRY:
        raise RuntimeError(f"alias {alias!r} of {target!r} clashes or has no target")
    _ALIASES[alias] = _Alias(target, defaults, tags)


def list_models(pattern: str | list[str] | None = None, aliases: bool = False, pretrained: bool = False, *,
                filter: str | list[str] | None = None, exclude_filters: str | list[str] | None = None) -> list[str]:
    """Registered model names, in registration order, then (with ``aliases``) timm's names for them
    with each published pretrained tag; ``pattern`` is a shell-style filter, or a list of them (a name
    matching any; empty, as timm's default ``''``, lists all). ``pretrained``: only timm's names of published
    weights, with their tags, as ``timm.list_models(pretrained=True)`` gives them (a pattern without a tag,
    ``coatnet_0_rw_224``, matches each of its tags, as there). timm's keywords: ``filter`` is ``pattern``,
    and ``exclude_filters`` leaves out the names matching any of its patterns."""
    if pattern is not None and filter is not None:
        raise ValueError("list_models: give the filter once, as pattern or as timm's filter=")
    pattern = filter if pattern is None else pattern
    if pretrained:
        names = [f"{alias}.{tag}" for alias, a in _ALIASES.items() for tag in a.tags]
    else:
        names = list(_REGISTRY)
        if aliases:
            names += [f"{alias}.{tag}" if tag else alias for alias, a in _ALIASES.items() for tag in (None, *a.tags)]
    # timm's filter defaults to '': an empty pattern filters nothing (before: it matched no name, [] for all)
    patterns, excluded = ([p for p in ([given] if isinstance(given, str) else list(given or ())) if p]
                          for given in (pattern, exclude_filters))
    if pretrained:  # as timm's: a pattern without a tag matches the names of its weights, each tag (excluded too)
        patterns, excluded = ([p for q in given for p in ((q,) if "." in q else (q, f"{q}.*"))]
                              for given in (patterns, excluded))
    names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)] if patterns else names
    return [n for n in names if not any(fnmatch.fnmatch(n, p) for p in excluded)]


# timm's names of where a model is, a Hub repository (hf-hub:ORG/NAME) or a folder (local-dir:PATH), which
# create_model builds the network of (its config.json's); not names of a network
MODEL_SOURCES = ("hf-hub:", "local-dir:")


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``: ours, or timm's name for it, with or without a pretrained tag.
    An unknown name or tag raises ValueError listing the known ones."""
    if name.startswith(MODEL_SOURCES):
        raise ValueError(f"{name!r} names where a model is (a Hub repository or a folder), which only "
                         f"create_model takes: give its network's name here (its config.json's architecture)")
    base, _, tag = name.partition(".")
    if base in _REGISTRY and not tag:
        return _REGISTRY[base]
    alias = _ALIASES.get(base)
    if alias is None:
        close = _closest(base.lower(), [*_REGISTRY, *_ALIASES])  # CoAtNet_0, as the paper writes it, too
        hint = ("; a pretrained tag goes with timm's name, e.g. coatnet_0_rw_224.sw_in1k" if base in _REGISTRY else
                f" (did you mean {close}?)" if close else "")
        raise ValueError(f"unknown model {name!r}{hint}; known models: {', '.join(_REGISTRY)} "
                         f"(and timm's names for them: coatnet.list_models(aliases=True))")
    if tag and tag not in alias.tags:
        published = ", ".join(alias.tags) or "none"
        raise ValueError(f"unknown pretrained tag {tag!r} for {base}; tags published for it: {published}")
    classes = TAG_CLASSES.get(tag or next(iter(alias.tags), ""))
    defaults = alias.defaults | ({"num_classes": classes} if classes else {})
    return replace(_REGISTRY[alias.target], defaults=defaults, tag=tag or None)


def is_model(name) -> bool:
    """timm's ``is_model``: whether ``name`` (ours, or timm's name for it) names a network here, its pretrained
    tag left aside as timm leaves it (``coatnet_0_rw_224.sw_in1k`` is ``coatnet_0_rw_224``)."""
    if not isinstance(name, str) or name.startswith(MODEL_SOURCES):
        return False
    base = name.partition(".")[0]
    return base in _REGISTRY or base in _ALIASES


def _closest(name: str, names: list[str]) -> str | None:
    """The one name nearest to ``name`` (a typo's), or None where none is near or several are as near
    (``coatnet_9`` is as near each of coatnet_0..7)."""
    scores = sorted(((difflib.SequenceMatcher(None, name, n).ratio(), n) for n in names), reverse=True)
    best = scores[0] if scores else (0, None)
    return best[1] if best[0] >= 0.8 and (len(scores) == 1 or scores[1][0] < best[0]) else None
