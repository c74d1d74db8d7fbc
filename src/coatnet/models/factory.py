"""``create_model`` and ``from_pretrained``, and the one way weights enter a model: ``load_weights``."""

from __future__ import annotations

import argparse
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .coatnet import SCRIPT_REFUSED, CoAtNet, CoAtNetConfig, FeatureExtractor, build_model
from .folder import (ModelFolder, ModelFolderError, exported_model, read_model_folder, read_pretrained_cfg,
                     upgrade_state_dict)
from .hub import (HUB_PREFIX, LOCAL_DIR_PREFIX, MODEL_SOURCES, fetch, hub_cache_dir, hub_config, hub_repository,
                  is_hub_reference, local_dir, local_path, repository_config, timm_folder_weights)
from .preprocessing import PretrainedCfg
from .registry import list_models, model_entry
from .timm_convert import (classifier_size, convert_timm_state_dict, is_timm_state_dict, timm_img_size,
                           timm_pretrained_cfg, timm_variant_of)


def create_model(name: str, pretrained: str | Path | None = None, num_classes: int | None = None,
                 in_chans: int | None = None, img_size: int | tuple[int, int] | None = None,
                 drop_path_rate: float | None = None, features_only: bool = False,
                 out_indices: int | tuple[int, ...] | None = None, **kwargs) -> nn.Module:
    """Build a registered model, in timm's convention; timm's names work too (``coatnet_0_rw_224``,
    with or without a pretrained tag: ``coatnet_0_rw_224.sw_in1k``; ``coatnet_0_224`` is our ``coatnet_0``).

    ``num_classes``, ``in_chans``, ``img_size`` and ``drop_path_rate`` default to the
    configuration's own (1000 classes, 3 channels, 224x224 and the Table 10 rate for the paper's
    models). Other keyword arguments override configuration fields: a field of the whole network
    by value (``stages``), a part's fields by a dict, e.g. ``mbconv=dict(stride_on="depthwise")``
    for the Table 9 variant.

    ``pretrained`` is a weights file (``.safetensors``, or a ``.pt``/``.pth`` state dict or timm's
    training checkpoint, its EMA weights where kept, or a PyTorch Lightning checkpoint of a module holding the
    model as ``model``, read with ``weights_only=True``), timm's weights
    of the variant ``name`` reproduces (``coatnet_*_rw``, converted on the fly), or a folder: a
    ``save_pretrained`` folder, a training checkpoint (its EMA weights when it has them) or a run
    directory, whose network must be ``name``'s with ``kwargs`` (:func:`from_pretrained` builds its
    own), or a Hub repository downloaded into a folder (``hf download ORG/NAME --local-dir PATH``); a
    folder is PATH or, as in timm, ``"local-dir:PATH"``. From the Hugging Face Hub, through its cache
    (``HF_HOME``, ``HF_HUB_OFFLINE``): ``True`` is timm's repository of ``name``
    (``timm/coatnet_0_rw_224.sw_in1k``), and ``"hf-hub:ORG/NAME"``
    (``@REVISION`` optional) a repository of timm's weights or a ``save_pretrained`` folder. Weights
    keep their own classifier unless ``num_classes`` is given (those without one, a file's, the network's
    default, freshly initialised; a folder's or the Hub's, none), and weights whose
    input size is known (a folder's, the Hub's, a file's with relative-position tables) keep it unless
    ``img_size`` is given. Weights saved at another resolution load with their relative-position
    tables interpolated; a classifier of another size is dropped with a warning and left freshly
    initialised (fine-tuning on new classes); RGB weights fit a model of other ``in_chans`` as timm
    fits them (:func:`fit_input_channels`). The model takes the weights' preprocessing
    (``model.pretrained_cfg``: mean, std, interpolation, crop, class names; timm's for timm's weights,
    and, as in timm, for timm's name of published weights, with or without weights of their own), which
    :func:`coatnet.data_transforms` turns into a transform.

    ``features_only=True`` returns a :class:`FeatureExtractor`, timm's way: a module that gives the
    list of NCHW maps after the stages in ``out_indices`` (default S1..S4; as in timm, an int n
    takes the last n and negative indices count from the end), with
    ``feature_info.channels()`` and ``.reduction()``.

    ``name`` may be a Hub repository or a folder too, as in timm: ``"hf-hub:ORG/NAME"`` (``@REVISION``
    optional) or ``"local-dir:PATH"`` (such a repository downloaded into a folder, or a ``save_pretrained``
    folder, a training checkpoint or a run directory) is the network its ``config.json`` describes (timm's
    architecture, or a ``save_pretrained`` folder's config), with its weights when ``pretrained=True``, or
    with timm's ``checkpoint_path=FILE`` loaded into it (as it loads into a named network).

    timm's ``cache_dir`` is the Hub cache this call reads (huggingface_hub's layout, ``models--ORG--NAME``), over
    ``HF_HUB_CACHE`` and ``HF_HOME``; timm's ``pretrained_cfg`` is a pretrained tag (the name's own replaced) or a
    dict (or a ``PretrainedCfg``) that replaces the weights' config: see :func:`_pretrained_cfg_argument`.
    """
    if not isinstance(name, str):
        raise ValueError(f"a model name is a string, e.g. 'coatnet_0', got {name!r}; coatnet.list_models() lists them")
    if type(pretrained) is int:  # timm's 0 and 1
        pretrained = bool(pretrained)
    with hub_cache_dir(kwargs.pop("cache_dir", None)):  # every Hub read below, from timm's cache_dir where given
        name, cfg, defaults, source = _pretrained_cfg_argument(name, kwargs.pop("pretrained_cfg", None), pretrained)
        num_classes, in_chans, img_size = (defaults.get(k) if v is None else v for k, v in (
            ("num_classes", num_classes), ("in_chans", in_chans), ("img_size", img_size)))
        exact = bool(kwargs.get("checkpoint_path"))  # timm loads it as saved: its classifier too
        pretrained, overlay = _timm_arguments(pretrained, kwargs, source)
        checkpoint = None
        if exact and name.startswith(MODEL_SOURCES):  # as in timm: the network of the config.json, then the file
            checkpoint, pretrained = pretrained, False  # (the repository's own weights would all be overwritten)
        elif exact:
            pretrained = replace(read_pretrained(pretrained, name), whole=True, exact=True)
        pool = kwargs.pop("global_pool", None)
        model = _create_model(name, pretrained, num_classes, in_chans, img_size, drop_path_rate, features_only,
                              out_indices, checkpoint=checkpoint, **kwargs)
    if pool == "" and not features_only:  # timm's create_model(..., num_classes=0, global_pool=''): dense maps
        model.reset_classifier(model.num_classes, pool)
    if cfg is not None:  # timm's pretrained_cfg dict: the weights' config, replaced before the overlay
        outputs = (model.model if isinstance(model, FeatureExtractor) else model).num_classes
        if cfg.label_names is not None and "num_classes" not in defaults and len(cfg.label_names) != outputs:
            raise ValueError(f"pretrained_cfg lists {len(cfg.label_names)} label_names but the model has {outputs} "
                             f"outputs; give one name per output, or its num_classes")
        model.pretrained_cfg = cfg.with_classes(outputs)
    if overlay:  # timm's pretrained_cfg_overlay: how images are prepared, over the weights' own
        model.pretrained_cfg = model.pretrained_cfg.override(overlay)
    return model


# timm's PretrainedCfg fields that change nothing here: what describes the weights (their licence, paper, the
# names of the first conv and classifier, the tag), and timm's test-time settings. A dict copied whole from a timm
# model (dict(model.pretrained_cfg)) carries them, as timm's config.json does, whose readers ignore them too.
_CFG_ABOUT = ("architecture", "tag", "source", "test_input_size", "min_input_size", "fixed_input_size",
              "test_crop_pct", "label_offset", "label_descriptions", "pool_size", "test_pool_size", "first_conv",
              "classifier", "license", "description", "origin_url", "paper_name", "paper_ids", "notes")
# ... and the fields that say where the weights are, which timm reads with pretrained=True only.
_CFG_PLACE = ("file", "hf_hub_id", "url", "state_dict", "hf_hub_filename", "custom_load")
_CFG_PREPROCESSING = ("mean", "std", "interpolation", "crop_pct", "crop_mode", "label_names")


def _pretrained_cfg_argument(name: str, value, pretrained) -> tuple[str, PretrainedCfg | None, dict, dict]:
    """timm's ``pretrained_cfg``. A tag (``"sw_in1k"``) replaces the name's own, as in timm. A dict, or a
    ``PretrainedCfg`` (timm's or ours), is the weights' config: it replaces how images are prepared (the
    model's ``pretrained_cfg``, timm's defaults for the fields it lacks), its ``num_classes`` and
    ``input_size`` are the defaults of ``num_classes``, ``in_chans`` and ``img_size`` (timm's CoAtNets have a
    fixed input size: their tables are sized for it), and with ``pretrained=True`` its ``file``, else its
    ``hf_hub_id`` (timm's precedence), are the weights. Returns the name, that preprocessing (None without
    a dict), those defaults, and the weights' place as ``pretrained_cfg_overlay`` gives it."""
    if value is None or (isinstance(value, (str, Mapping)) and not value):  # as in timm, empty is not given
        return name, None, {}, {}
    if name.startswith(MODEL_SOURCES):  # timm asserts the same: the config is the repository's config.json
        where = "folder" if name.startswith(LOCAL_DIR_PREFIX) else "repository"
        raise ValueError(f"pretrained_cfg: the model {name!r} takes its config from that {where}'s config.json, as "
                         f"in timm; change how its images are prepared with pretrained_cfg_overlay")
    if isinstance(value, str):  # as in timm, the tag given wins over the name's own
        return f"{name.partition('.')[0]}.{value}", None, {}, {}
    if is_dataclass(value) and not isinstance(value, type):  # timm's PretrainedCfg, or ours (model.pretrained_cfg)
        value = {f.name: getattr(value, f.name) for f in fields(value)}
    if not isinstance(value, Mapping):
        raise ValueError(f"pretrained_cfg is a pretrained tag (a string, e.g. 'sw_in1k'), a dict or a PretrainedCfg, "
                         f"as in timm; got a {type(value).__name__}")
    given = {k: v for k, v in value.items() if v is not None}
    unknown = sorted(set(given) - {*_CFG_ABOUT, *_CFG_PLACE, *_CFG_PREPROCESSING, "num_classes", "input_size"})
    if unknown:  # timm's PretrainedCfg(**dict) refuses them too
        raise ValueError(f"pretrained_cfg {unknown} are not fields of timm's PretrainedCfg; give mean, std, "
                         f"interpolation, crop_pct, crop_mode, label_names, num_classes, input_size, file or hf_hub_id")
    try:  # timm's PretrainedCfg defaults are ours but for the interpolation: bicubic, not bilinear
        cfg = PretrainedCfg.from_dict({"interpolation": "bicubic"} | given)
    except (TypeError, ValueError) as e:
        raise ValueError(f"pretrained_cfg: {e}") from None
    defaults = {}
    if "num_classes" in given:
        defaults["num_classes"] = given["num_classes"]
        if cfg.label_names is not None and len(cfg.label_names) != given["num_classes"]:
            raise ValueError(f"pretrained_cfg lists {len(cfg.label_names)} label_names for num_classes "
                             f"{given['num_classes']}; give one name per class")
    if "input_size" in given:
        size = given["input_size"]
        if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(type(n) is int for n in size)):
            raise ValueError(f"pretrained_cfg's input_size is (channels, height, width), as in timm; got {size!r}")
        defaults["in_chans"], defaults["img_size"] = size[0], tuple(size[1:])
    source = {}
    if pretrained is True:  # else nothing is loaded, and timm reads none of these
        for key, why in (("state_dict", "weights in memory: load them with model.load_state_dict, or save them and "
                                        "give file=PATH"),
                         ("custom_load", "timm's own loaders of other formats: give file=PATH of a state dict"),
                         ("hf_hub_filename", "another file of the repository: download it and give file=PATH")):
            if given.get(key):
                raise ValueError(f"pretrained_cfg's {key} is not taken here ({why})")
        if given.get("file") or given.get("hf_hub_id"):
            source = {"file": given["file"]} if given.get("file") else {"hf_hub_id": given["hf_hub_id"]}
        elif given.get("url"):
            raise ValueError(f"pretrained_cfg's url: coatnet reads weights from a file or the Hugging Face Hub (its "
                             f"cache), never from a URL; download {given['url']} and give file=PATH")
    return name, cfg, defaults, source


# What timm's pretrained_cfg_overlay may say here: where the weights are, and how images are prepared.
_OVERLAY_KEYS = ("file", "hf_hub_id", "mean", "std", "interpolation", "crop_pct", "crop_mode")


def _timm_arguments(pretrained, kwargs: dict, source: dict | None = None) -> tuple:
    """timm's create_model arguments that say what ours say otherwise, taken out of ``kwargs``:
    ``checkpoint_path`` is a weights file (``pretrained``), and with ``pretrained=True`` (as in timm)
    so are ``pretrained_cfg_overlay``'s ``file`` and ``hf_hub_id``, over ``source``, the ones of
    ``pretrained_cfg`` (the overlay replaces its fields, as in timm); ``global_pool`` is "avg" (the
    paper's) or "" (checked here, applied once the model is built), ``drop_rate=0`` the head's dropout,
    none; ``exportable`` and ``no_jit`` change nothing here, and ``scriptable`` only as False. Returns
    ``pretrained`` and the overlay's preprocessing (mean, std, interpolation, crop_pct, crop_mode)."""
    if kwargs.get("global_pool", "avg") not in ("avg", None, ""):
        raise ValueError("global_pool: CoAtNet's head pools by the average ('avg') or not at all (''); pass one")
    if kwargs.pop("scriptable", None):  # timm's layer switches, as its train.py and validate.py pass them
        raise ValueError(f"scriptable: {SCRIPT_REFUSED}, or pass scriptable=False")
    kwargs.pop("exportable", None), kwargs.pop("no_jit", None)  # its layers trace and export as they are, unjitted
    if kwargs.pop("drop_rate", 0):
        raise ValueError("drop_rate: CoAtNet's head has no dropout (the paper regularises with stochastic depth, "
                         "drop_path_rate); leave it out")
    given = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    overlay = (source or {}) | given if not {"file", "hf_hub_id"} & set(given) else given
    unknown = sorted(set(overlay) - set(_OVERLAY_KEYS))
    if unknown:  # taken without effect, they would leave the model other than asked (num_classes: an argument)
        raise ValueError(f"pretrained_cfg_overlay {unknown} is not taken here; it takes {', '.join(_OVERLAY_KEYS)}, "
                         f"and create_model's own arguments the rest (num_classes, img_size, in_chans)")
    hub = overlay.pop("hf_hub_id", None)
    sources = [overlay.pop("file", None), hub and f"{HUB_PREFIX}{hub}"]
    if any(sources) and pretrained is not True:
        raise ValueError("pretrained_cfg_overlay's file and hf_hub_id are the weights of pretrained=True, as in timm: "
                         "pass it, or the weights as pretrained=PATH")
    files = [f for f in (kwargs.pop("checkpoint_path", None), *sources) if f]
    if files:
        if len(files) > 1 or pretrained not in (None, False, True):
            raise ValueError("give the weights once: pretrained=PATH, checkpoint_path=PATH or "
                             "pretrained_cfg_overlay=dict(file=PATH) or dict(hf_hub_id=ORG/NAME)")
        pretrained = files[0]
    return pretrained, overlay


def _create_model(name: str, pretrained, num_classes, in_chans, img_size, drop_path_rate, features_only: bool,
                  out_indices, checkpoint=None, **kwargs) -> nn.Module:
    if out_indices is not None and not features_only:
        raise ValueError("out_indices picks the maps of a feature extractor: pass features_only=True with it")
    if name.startswith(MODEL_SOURCES):
        model = _hub_model(name, pretrained, checkpoint, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                           drop_path_rate=drop_path_rate, **kwargs)
        return FeatureExtractor(model, out_indices) if features_only else model
    entry = model_entry(name)
    if pretrained is None or pretrained is False:  # random weights
        weights = None
    else:
        weights = pretrained if isinstance(pretrained, PretrainedWeights) else read_pretrained(pretrained, name)
    if weights is not None and num_classes is None:  # their classifier, unless told otherwise; weights without
        theirs = classifier_size(weights.state)  # one, but from a folder or the Hub, still the network's own
        num_classes = theirs if theirs or weights.whole or features_only else None
    if weights is not None and img_size is None:  # the size they were trained at, where known: a 384 px
        img_size = weights.img_size  # fine-tune is not shrunk to 224 under its 384 px preprocessing
    build = lambda: entry.build(num_classes=num_classes, in_chans=in_chans, img_size=img_size,  # noqa: E731
                                drop_path_rate=drop_path_rate, **kwargs)
    model = build() if weights is None else built_for_weights(build)
    if weights is not None and weights.config is not None:
        _check_same_network(model.config, weights)
    if list_models(f"{name.partition('.')[0]}.*", aliases=True):  # timm's name of its weights, as in timm
        model.pretrained_cfg = timm_pretrained_cfg(entry.name, min(model.config.img_size), model.num_classes)
    if weights is not None:  # their own preprocessing, where they hold one
        # checkpoint_path's classifier is loaded as saved, as timm's load_checkpoint does (strictly): one of
        # another size is refused, not left freshly initialised; a model without a classifier drops it
        load_pretrained(model, weights, entry.name, new_classifier=not weights.exact or not model.num_classes)
    return FeatureExtractor(model, out_indices) if features_only else model


# What loading weights adapts (the classifier, the input size and channels), and a training setting.
_ADAPTED_ON_LOAD = {"version", "name", "num_classes", "img_size", "in_chans", "drop_path_rate"}


def built_for_weights(build: Callable[[], CoAtNet]) -> CoAtNet:
    """The network ``build()`` makes, for weights about to be loaded into it: its layers are built
    without their weights (on the meta device) and given memory where the model would live, left
    uninitialised, since loading overwrites every weight but a new classifier's, which is initialised
    here. Initialising the rest only to overwrite it took most of the loading's time (CoAtNet-4 from a
    file or folder: 3-8 s, now under 1.3 on 2 cores of an AMD EPYC)."""
    with torch.device("meta"):
        model = build()
    model.to_empty(device=torch.get_default_device())
    model.reset_classifier(model.num_classes)
    return model


def _check_same_network(built: CoAtNetConfig, weights: PretrainedWeights) -> None:
    """Refuse weights saved with a network that differs from ``built`` where their shapes may not show
    it (an activation, a pooling, where a block strides): loaded, they would give other outputs."""
    try:
        saved = CoAtNetConfig.from_dict(weights.config).to_dict()
    except (TypeError, ValueError) as e:
        raise ModelFolderError(f"{weights.origin!r} has no usable model config ({e}); if a newer coatnet wrote it, "
                               f"upgrade coatnet") from None
    ours = built.to_dict()
    differ = []
    for key in sorted(set(saved) - _ADAPTED_ON_LOAD):
        if isinstance(saved[key], dict):
            differ += [f"{key}.{k} {v!r} (not {ours[key][k]!r})" for k, v in saved[key].items() if v != ours[key][k]]
        elif saved[key] != ours[key]:
            differ.append(key)
    if not differ:
        return
    load = f"coatnet.from_pretrained({weights.origin!r}) builds the network as saved"
    if saved["name"] != built.name:
        raise ValueError(f"the weights in {weights.origin!r} are {saved['name']}'s, not {built.name}'s: name "
                         f"{saved['name']} (coatnet train --model {saved['name']}; {load})")
    raise ValueError(f"the weights in {weights.origin!r} were saved with a network that differs from "
                     f"{built.name}'s in {'; '.join(differ)}: pass those settings to create_model ({load})")


def _hub_model(name: str, pretrained, checkpoint: str | Path | None = None, **options) -> CoAtNet:
    """``create_model("hf-hub:ORG/NAME", pretrained=...)``, or ``"local-dir:PATH"``: the network the
    repository's (the folder's) ``config.json`` describes, with its weights (``pretrained=True``) or
    freshly initialised (``False``), or with timm's ``checkpoint_path`` (``checkpoint``) loaded into it as
    into a named network, prepared for as the repository's weights are (timm keeps their pretrained_cfg)."""
    if not (pretrained is None or type(pretrained) is bool):
        where = "folder" if name.startswith(LOCAL_DIR_PREFIX) else "repository"
        raise ValueError(f"the model {name!r} takes its weights from that {where}: pass pretrained=True or False, "
                         f"or other weights of its network as checkpoint_path=PATH")
    if name.startswith(LOCAL_DIR_PREFIX):  # found whole, as a repository in the Hub's cache is
        path, meta, fetched = local_dir(name, weights=bool(pretrained))
        where, fetched = str(path), fetched if pretrained else None
    else:
        repo = hub_repository(name, "")
        where, fetched = repo[0], fetch(*repo) if pretrained else None
        meta = hub_config(fetched) if fetched else repository_config(*repo)
    if "model" in meta and "config" in meta:  # a save_pretrained folder: its own config, whole
        try:
            config = CoAtNetConfig.from_dict(meta["config"])
        except (TypeError, ValueError) as e:
            raise ModelFolderError(f"the config.json of {where} has no usable model config ({e})") from None
        if checkpoint is not None:  # the named network built as saved, its settings under the caller's
            saved = {k: v for k, v in config.to_dict().items() if k not in ("version", "name", "num_classes")}
            model = create_model(config.name, checkpoint_path=checkpoint,
                                 **saved | {k: v for k, v in options.items() if v is not None})
            model.pretrained_cfg = read_pretrained_cfg(ModelFolder(Path(where), meta, {}, None)).with_classes(
                model.num_classes)
            return model
        if fetched:
            model = built_for_weights(lambda: build_model(config, **options))
            # Saved together with its config, its classifier fits it: one that does not (an edited config.json)
            # is refused, as from_pretrained(PATH) refuses it, not left random; num_classes asks for a new one.
            try:
                return load_pretrained(model, _read_weights(fetched, config.name, True), config.name,
                                       new_classifier=options.get("num_classes") is not None)
            except ModelFolderError:
                raise
            except ValueError as e:
                raise ModelFolderError(f"{where!r} holds weights that do not fit its own config.json ({e}); it was "
                                       f"edited or written by hand: use another checkpoint") from None
        model = build_model(config, **options)  # freshly initialised, prepared for as the repository's
        model.pretrained_cfg = read_pretrained_cfg(ModelFolder(Path(where), meta, {}, None)).with_classes(
            model.num_classes)  # weights are, as in timm
        return model
    return _timm_repository_model(where, name, meta, fetched, options, checkpoint)


def _timm_repository_model(repo: str, name: str, meta: dict, fetched: Path | None, options: dict,
                           checkpoint: str | Path | None = None) -> CoAtNet:
    """The network timm's ``config.json`` (``meta``, of the repository or folder ``repo``, which
    ``name`` gave) names, with the weights ``fetched`` beside it, or ``checkpoint`` (timm's
    checkpoint_path) loaded into it, or freshly initialised without them."""
    architecture = meta.get("architecture")
    if not isinstance(architecture, str):
        raise ValueError(f"{repo} has no config.json naming timm's architecture (or holding a save_pretrained "
                         f"config); load its weights into a named network: create_model(NAME, pretrained={name!r})")
    if not list_models(architecture.partition(".")[0], aliases=True):  # a MaxViT, a ResNet: not a list of ours
        raise ValueError(f"{repo} holds timm's {architecture}, not a CoAtNet; coatnet builds the networks "
                         f"coatnet.list_models() lists")
    # The options timm's push_to_hf_hub recorded (a grey model's in_chans, an rmlp model's img_size),
    # under the caller's own, as timm's create_model takes them.
    model_args = meta.get("model_args") or {}
    if isinstance(model_args, dict):  # the only pooling there is, and the head's dropout, a training setting
        model_args = {k: v for k, v in model_args.items() if (k, v) != ("global_pool", "avg") and k != "drop_rate"}
    known = ("num_classes", "in_chans", "img_size", "drop_path_rate")
    unknown = sorted(set(model_args) - set(known)) if isinstance(model_args, dict) else model_args
    if unknown:
        raise ValueError(f"the config.json of {repo} has model_args {unknown!r} that coatnet does not take "
                         f"(it takes {', '.join(known)}); load its weights into a named network: "
                         f"create_model(NAME, pretrained={name!r})")
    model_args = {k: tuple(v) if isinstance(v, list) else v for k, v in model_args.items()}
    given = {k: v for k, v in options.items() if v is not None}
    options = model_args | given
    if not fetched:  # timm's architecture with the repository's classes, freshly initialised, or the checkpoint's
        model = (create_model(architecture, checkpoint_path=checkpoint, **options) if checkpoint is not None else
                 create_model(architecture, **{"num_classes": meta.get("num_classes")} | options))
        # prepared for as the repository's weights are, as in timm: its class names are checked against the head
        # its config.json records (the weights'), then kept only where the model's head is that size
        recorded = model_args.get("num_classes", meta.get("num_classes"))  # the head of the repository's weights
        if recorded is None and checkpoint is None and "num_classes" not in given:
            recorded = model.num_classes  # built with the repository's default head
        source = (repr(str(Path(repo) / "config.json")) if name.startswith(LOCAL_DIR_PREFIX)
                  else f"the config.json of {repo}")
        cfg = timm_pretrained_cfg(model.config.name, min(model.config.img_size), model.num_classes
                                  if recorded is None else recorded, meta, None if recorded is None else source)
        model.pretrained_cfg = cfg.with_classes(model.num_classes)
        return model
    return create_model(architecture, pretrained=_read_weights(fetched, architecture, from_hub=True), **options)


@dataclass(frozen=True)
class PretrainedWeights:
    """Weights read for a model, with how images are prepared for them (None: unknown, the model's own)."""

    state: dict[str, torch.Tensor]
    pretrained_cfg: PretrainedCfg | None
    whole: bool = False  # published (Hub) or saved as a model (folder): keep their classifier and size by default
    img_size: tuple[int, int] | int | None = None  # the input size they were trained at, where known
    config: dict | None = None  # the network they were saved with (a folder's config.json), where known
    origin: str = ""  # where they were read, for messages
    exact: bool = False  # timm's checkpoint_path: loaded as saved, a classifier of another size refused


def weights_network(pretrained: str | Path) -> str | None:
    """Our name of the network of weights given by their place, where a ``config.json`` names it: a
    ``save_pretrained`` folder, a checkpoint or run directory, timm's repository downloaded into a folder
    or in the Hub cache (``hf-hub:ORG/NAME``); None for a weights file, whose network only a name says,
    and for a network not ours (the loading that follows says what is wrong with it)."""
    if is_hub_reference(pretrained):
        meta = repository_config(*hub_repository(pretrained, ""))
    elif local_path(pretrained).is_dir():
        meta = local_dir(str(pretrained))[1]
    else:
        return None
    name = meta.get("model", meta.get("architecture"))
    try:
        return model_entry(name).name if isinstance(name, str) else None
    except ValueError:  # timm's name of another family
        return None


def read_pretrained(pretrained: str | Path | bool, name: str) -> PretrainedWeights:
    """The weights ``create_model(name, pretrained=...)`` loads, read but not yet loaded: a training
    run reads them first, to prepare its data as they expect, then builds the model on them."""
    from_hub = is_hub_reference(pretrained)
    return _read_weights(fetch(*hub_repository(pretrained, name)) if from_hub else local_path(pretrained), name,
                         from_hub)


def _read_weights(path: Path, name: str, from_hub: bool) -> PretrainedWeights:
    """The weights at ``path`` (a folder or a file, fetched from the Hub or not), for the model ``name``."""
    if path.is_dir() and (timm_file := timm_folder_weights(path)) is not None:  # timm's repository, downloaded
        return _read_weights(timm_file, name, from_hub=True)  # with its config.json, as from the Hub's cache
    if path.is_dir():
        folder = read_model_folder(path)
        size = folder.meta["config"].get("img_size")
        return PretrainedWeights(folder.eval_weights, read_pretrained_cfg(folder), whole=True,
                                 img_size=tuple(size) if isinstance(size, list) else size,
                                 config=folder.meta["config"], origin=str(folder.path))
    state = read_state_dict(path)
    if not is_timm_state_dict(state):
        return PretrainedWeights(state, None, whole=from_hub, img_size=tables_img_size(state, name))
    return timm_weights(state, name, hub_config(path) if from_hub else None,
                        repr(str(path.parent / "config.json")))


def tables_img_size(state: dict[str, torch.Tensor], name: str) -> int | tuple[int, int] | None:
    """The input size our weights of ``name`` were saved at, read off a relative-position table's grid
    (``heads x (2H-1) x (2W-1)``, Eq. 3's window over an H x W map) against the grid ``name`` has at its
    own size; None without tables (a C-C-C-C layout, rmlp), as timm's :func:`timm_img_size` does for theirs."""
    with torch.device("meta"):
        default = model_entry(name).build()
    built = default.state_dict()
    state = upgrade_state_dict(state)  # version 1's tables (relative_position_table) show their size too
    key = next((k for k in state if k.endswith("relative_position.table") and k in built), None)
    if key is None or state[key].dim() != 3 or built[key].dim() != 3:
        return None
    (rows, cols), (own_rows, own_cols) = (((t.shape[1] + 1) // 2, (t.shape[2] + 1) // 2) for t in (state[key], built[key]))
    height, width = default.config.img_size
    size = (rows * height // own_rows, cols * width // own_cols)
    return size[0] if size[0] == size[1] else size


def timm_weights(state: dict[str, torch.Tensor], name: str, hub_config: dict | None = None,
                 source: str | None = None) -> PretrainedWeights:
    """timm's weights for our ``name``, with timm's preprocessing (its repository's ``hub_config``
    when fetched from the Hub, which also keeps their classifier by default; ``source`` names that
    config.json in warnings)."""
    entry = model_entry(name)
    trained_at = timm_img_size(state) or _recorded_img_size(hub_config)  # rmlp weights have no tables to show it
    img_size = trained_at or entry.defaults.get("img_size")
    img_size = min(img_size) if isinstance(img_size, tuple) else img_size
    cfg = timm_pretrained_cfg(entry.name, img_size, classifier_size(state), hub_config, source)
    return PretrainedWeights(state, cfg, whole=hub_config is not None, img_size=trained_at)


def _recorded_img_size(hub_config: dict | None) -> int | tuple[int, int] | None:
    """The input size timm's ``config.json`` records: its ``model_args``' img_size, else its
    ``pretrained_cfg``'s input_size; None where it records neither."""
    args, cfg = ((hub_config or {}).get(key) for key in ("model_args", "pretrained_cfg"))
    size = args.get("img_size") if isinstance(args, dict) else None
    input_size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if size is None and isinstance(input_size, list) and len(input_size) == 3:  # (channels, height, width)
        size = input_size[1:]
    return tuple(size) if isinstance(size, list) else size


def from_pretrained(path: str | Path) -> CoAtNet:
    """The model saved in ``path``, in eval mode: a ``save_pretrained`` folder, a training checkpoint
    (its EMA weights when it kept an EMA: the weights training evaluated) or a run directory (its
    last checkpoint); or ``"hf-hub:ORG/NAME"`` (``@REVISION`` optional), a Hub repository of either a
    ``save_pretrained`` folder or timm's weights, whose ``config.json`` names timm's architecture; such a
    repository downloaded into a folder (``hf download ORG/NAME --local-dir PATH``) is read as from the Hub.

    A weights file without a config is not enough to know the network: load it with
    ``create_model(name, pretrained=FILE)``.
    """
    if isinstance(path, str) and path.startswith(MODEL_SOURCES):  # local-dir:PATH too, as timm names a folder
        return create_model(path, pretrained=True).eval()
    if (timm_file := timm_folder_weights(Path(path))) is not None:  # timm's repository, downloaded into a folder
        return _timm_repository_model(str(path), str(path), hub_config(timm_file), timm_file, {}).eval()
    return model_from_folder(read_model_folder(path))


def model_from_folder(folder: ModelFolder) -> CoAtNet:
    """The model a folder holds, with the weights to use (the EMA's where kept), in eval mode."""
    try:
        config = CoAtNetConfig.from_dict(folder.meta["config"])
    except (TypeError, ValueError) as e:
        raise ModelFolderError(f"{str(folder.path / 'config.json')!r} has no usable model config ({e})") from None
    model = built_for_weights(lambda: CoAtNet(config))
    model.pretrained_cfg = read_pretrained_cfg(folder)
    try:  # the config and the weights were saved together: every weight fits, the classifier too
        return load_weights(model, folder.eval_weights, new_classifier=False).eval()
    except ValueError as e:
        raise ModelFolderError(f"{str(folder.path)!r} holds weights that do not fit its own config.json ({e}); "
                               f"it was edited or written by hand: use another checkpoint") from None


def load_pretrained(model: nn.Module, weights: PretrainedWeights, name: str, new_classifier: bool = True) -> nn.Module:
    """Load weights: ours as they are, timm's converted to ``name``'s keys; the model takes their
    preprocessing (with their class names while its classifier is theirs). timm weights of another
    variant are named in the error (not only the keys that differ). ``new_classifier``: as in
    :func:`load_weights`."""
    if weights.pretrained_cfg is not None:
        model.pretrained_cfg = weights.pretrained_cfg.with_classes(model.num_classes)
    state, timm = weights.state, is_timm_state_dict(weights.state)
    try:
        return load_weights(model, fit_input_channels(convert_timm_state_dict(state, name) if timm else state, model),
                            new_classifier)
    except ValueError:
        match = timm_variant_of(state) if timm else own_variant_of(state)
        if match is None or match == name:
            raise
        theirs = f"timm's {match}_224 (ours: {match})" if timm else f"{match}'s"
        raise ValueError(f"these weights are not {name}'s: they are {theirs}; load them as {match} (coatnet train "
                         f"--model {match})") from None


def own_variant_of(state: dict[str, torch.Tensor]) -> str | None:
    """The registered network whose weights' names and shapes these of ours have, their classifier and
    relative-position tables aside (any classes, any input size), or None."""
    def shapes(weights: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
        return {k: v.shape for k, v in weights.items()
                if not k.startswith("classifier.") and not k.endswith("relative_position.table")}

    theirs = shapes(upgrade_state_dict(state))
    for name in list_models():
        with torch.device("meta"):
            if shapes(model_entry(name).build().state_dict()) == theirs:
                return name
    return None


def fit_input_channels(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of an RGB input conv for a model built with another ``in_chans``, as timm adapts them:
    for one channel the filters summed over the colours (a grey image gives what its RGB copy gave);
    for more, the RGB filters repeated over the channels and scaled by 3/in_chans. Other weights, and
    weights whose input conv already fits, are returned as they are."""
    own = model.state_dict()
    key = next((k for k in ("stem.0.0.weight", "stem.weight") if k in own and k in state), None)
    if key is None or state[key].shape == own[key].shape or state[key].shape[1] != 3:
        return state
    weight, channels = state[key].float(), own[key].shape[1]
    if channels == 1:
        fitted = weight.sum(dim=1, keepdim=True)
    else:
        fitted = weight.repeat(1, -(-channels // 3), 1, 1)[:, :channels] * (3 / channels)
    return state | {key: fitted.to(state[key].dtype)}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a ``torch.save``d state dict, never unpickling code."""
    path = Path(path)
    if path.is_dir():  # convert-timm local-dir:PATH: the weights file of timm's repository in it is meant
        inside = f" ({str(timm_file)!r})" if (timm_file := timm_folder_weights(path)) else ""
        raise ValueError(f"{str(path)!r} is a folder; give the weights file in it{inside}, a .safetensors or .pth file")
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist; give the path of a .safetensors or .pth file")
    if exported := exported_model(path):  # torch.load would warn that it is TorchScript, then fail
        raise ValueError(f"{str(path)!r} is an exported model ({exported}), not weights; give the weights file or "
                         f"folder it was exported from")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with torch.serialization.safe_globals([argparse.Namespace]):  # timm's train.py saves its flags so
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated or not a weights file at all
        if found := re.search(r"Unsupported global: GLOBAL (\S+)", str(e)):  # torch.load refused to unpickle a class
            raise ValueError(f"{str(path)!r} holds pickled Python objects, not only tensors (a {found[1]}), which "
                             f"coatnet does not unpickle, as that can run any code; if you trust the file, load it "
                             f"with torch.load(weights_only=False) and save its weights alone: a whole model's "
                             f"model.state_dict(), a PyTorch Lightning checkpoint's ['state_dict']") from None
        raise ValueError(f"cannot read weights from {str(path)!r} ({type(e).__name__}); "
                         f"the file is corrupt, truncated or not a weights file") from None
    # A training checkpoint's weights, as timm's load_checkpoint takes them: the EMA's where kept.
    key = next((k for k in ("state_dict_ema", "model_ema", "state_dict", "model")
                if isinstance(state, dict) and isinstance(state.get(k), dict)), None)
    if key is not None:
        state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict of tensors")
    # Saved from DistributedDataParallel or torch.optim.swa_utils.AveragedModel (with its counter), a
    # torch.compile'd model, a module holding the model as its `model` (a PyTorch Lightning module's checkpoint,
    # whose state_dict is read above), or several of these. No key of ours or timm's starts with any of them.
    state = {k: v for k, v in state.items() if k != "n_averaged"}
    wrapped = set()
    while state and (prefix := next((p for p in ("module.", "_orig_mod.", "model.")
                                     if all(k.startswith(p) for k in state)), None)):
        state, wrapped = {k.removeprefix(prefix): v for k, v in state.items()}, wrapped | {prefix}
    # Our FeatureExtractor holds the model as `model` too, less its head (and the stages after its last map):
    # stem and stages alone are its weights, loaded, the head would be missing and the error name 4-6 keys.
    if "model." in wrapped and all(k.startswith(("stem.", "stages.")) for k in state):
        raise ValueError(f"{str(path)!r} holds a feature extractor's weights (keys model.*), which hold no head; "
                         f"load them with extractor.load_state_dict, or save the model it was made from")
    if "stem.conv1.weight" in state and any(k.startswith("stages_") for k in state):  # timm's FeatureListNet's
        raise ValueError(f"{str(path)!r} holds timm's feature extractor's weights (features_only, keys stages_N.*), "
                         f"which hold no head; save the model it was made from")
    return state


def load_weights(model: nn.Module, source: str | Path | dict[str, torch.Tensor],
                 new_classifier: bool = True) -> nn.Module:
    """Load weights into ``model`` strictly, naming every mismatched key in a one-line ValueError;
    only a classifier of another size is left freshly initialised, with a warning (fine-tuning on new
    classes), unless ``new_classifier`` is False.

    Weights saved by earlier versions load too: their renamed keys are given today's names.
    """
    state = upgrade_state_dict(dict(source) if isinstance(source, dict) else read_state_dict(source))
    own = model.state_dict()
    is_head = lambda k: new_classifier and k.startswith("classifier.")  # noqa: E731
    missing = sorted(k for k in set(own) - set(state) if not is_head(k))
    unexpected = sorted(k for k in set(state) - set(own) if not is_head(k))
    # Relative-position tables of another size are fine (interpolated on load); other shapes are not.
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape and not is_head(k)
                   and not (k.endswith("relative_position.table") and own[k].shape[0] == state[k].shape[0]))
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''} ({len(keys)})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        fix = "check the model name and options the weights were saved with"
        if not (missing or unexpected) and wrong in (["stem.0.0.weight"], ["stem.weight"]):
            (out, channels, *kernel), (out_, _, *kernel_) = state[wrong[0]].shape, own[wrong[0]].shape
            if (out, kernel) == (out_, kernel_):  # only the input conv's channels differ
                fix = f"these weights take {channels} input channel{'s' * (channels != 1)}: pass in_chans={channels}"
        elif not missing and not unexpected and all(k.startswith("classifier.") for k in wrong):
            classes = state["classifier.weight"].shape[0]  # only the classifier's size differs
            fix = f"these weights have {classes} classes: pass num_classes={classes}, or nothing"
        raise ValueError(f"weights do not fit {getattr(getattr(model, 'config', None), 'name', 'the model')}: "
                         + "; ".join(parts) + f"; {fix}")
    # Only the classifier differs (another size, or none in the weights): new classes, as in
    # fine-tuning; it keeps its fresh initialisation. Without one (num_classes=0, features), the
    # weights' classifier is dropped without a word, as in timm.
    theirs, ours = ({k: v.shape for k, v in d.items() if is_head(k)} for d in (state, own))
    if theirs != ours:
        if model.num_classes:
            why = f"has a classifier that does not fit {model.num_classes} classes" if theirs else "has no classifier"
            warnings.warn(f"the checkpoint {why}; the model's classifier is left freshly initialised", stacklevel=2)
        state = {k: v for k, v in state.items() if not is_head(k)} | {k: v for k, v in own.items() if is_head(k)}
    model.load_state_dict(state)
    return model
