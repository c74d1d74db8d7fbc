"""Models on the Hugging Face Hub, fetched through ``huggingface_hub`` into its cache.

A repository holds either timm's weights (``model.safetensors`` or ``pytorch_model.bin``, beside
timm's own ``config.json``) or a ``save_pretrained`` folder (our ``config.json`` + ``model.safetensors``);
timm's ``local-dir:PATH`` names such a repository downloaded into a folder.
This module only finds the files, downloading them when online; reading them is the factory's, as
for a local path. ``huggingface_hub`` is imported here, lazily, so that it is needed only for the Hub.

``huggingface_hub`` reads ``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, when it is
imported; they are read again at each call here, so that setting them later (a notebook, a test) holds.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from .folder import CONFIG, EMA_WEIGHTS, TIMM_WEIGHTS, WEIGHTS, read_model_meta, timm_architecture
from .registry import MODEL_SOURCES, list_models, model_entry

HUB_PREFIX, LOCAL_DIR_PREFIX = MODEL_SOURCES

# timm's create_model(cache_dir=...): the Hub cache one call reads, over HF_HUB_CACHE and HF_HOME. A context
# variable, not an argument of every function between create_model and hf_hub_download, so that the messages
# that name the cache (hub_cache) name the one read, and a call in another thread is left with its own.
_CALL_CACHE_DIR: ContextVar[str | None] = ContextVar("coatnet_hub_cache_dir", default=None)


@contextmanager
def hub_cache_dir(cache_dir: str | os.PathLike | None):
    """Read the Hub from ``cache_dir`` (huggingface_hub's cache layout, ``models--ORG--NAME``) within the
    block, as timm's ``cache_dir`` makes its ``hf_hub_download`` read it; None leaves the one read (an
    enclosing call's: create_model calls itself for a repository's network), else the environment's."""
    if cache_dir is None:
        yield
        return
    if not isinstance(cache_dir, (str, os.PathLike)) or not str(cache_dir):
        raise ValueError(f"cache_dir is the Hugging Face cache folder to read (a path, as HF_HUB_CACHE names one), "
                         f"got {cache_dir!r}")
    token = _CALL_CACHE_DIR.set(os.path.expanduser(str(cache_dir)))
    try:
        yield
    finally:
        _CALL_CACHE_DIR.reset(token)


def is_hub_reference(pretrained) -> bool:
    """Whether ``pretrained`` names the Hub: timm's ``True`` or an ``hf-hub:`` string."""
    return pretrained is True or (isinstance(pretrained, str) and pretrained.startswith(HUB_PREFIX))


def hub_repository(pretrained: bool | str, name: str) -> tuple[str, str | None]:
    """The repository and revision to load: ``hf-hub:ORG/NAME[@REVISION]``, or for ``True`` timm's
    repository of ``name`` (``timm/coatnet_0_rw_224.sw_in1k``), timm's default tag when it has none."""
    if pretrained is True:
        base, _, tag = name.partition(".")
        published = list_models(f"{base}.*", aliases=True)
        if not published:
            # our name of a network timm publishes weights of, under its own name
            ours = model_entry(base).name
            timms = [a for a in list_models(f"{base}_*.*", aliases=True) if model_entry(a).name == ours]
            if timms:
                raise ValueError(f"timm publishes the weights of {name} as {timms[0].partition('.')[0]}: pass that "
                                 f"name with pretrained=True (--pretrained)")
            raise ValueError(f"{name} has no published weights; pretrained=True (--pretrained) takes timm's names of "
                             f"weights (coatnet.list_models(pretrained=True) lists them)")
        return f"timm/{base}.{tag}" if tag else f"timm/{published[0]}", None
    repo, at, revision = pretrained.removeprefix(HUB_PREFIX).partition("@")
    org, _, model = repo.partition("/")
    if not org or not model or "/" in model or (at and not revision):
        raise ValueError(f"{pretrained!r} names no repository; write hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    return repo, revision or None


def fetch(repo: str, revision: str | None = None) -> Path:
    """The model in ``repo``, from the Hub cache (downloaded there first when online): the snapshot
    folder of a ``save_pretrained`` folder, or the file of timm's weights. Errors are one line."""
    config = _fetch(repo, revision, CONFIG)
    meta = _read_config(config) if config else {}
    ours = "model" in meta and "config" in meta
    for filename in (WEIGHTS,) if ours else TIMM_WEIGHTS:
        if (path := _fetch(repo, revision, filename)) is not None:
            if ours:  # a training checkpoint's EMA weights, where kept: the weights to use, as from a local folder
                _fetch(repo, revision, EMA_WEIGHTS)
            return path.parent if ours else path
    raise ValueError(_missing(repo, revision))


def repository_config(repo: str, revision: str | None = None) -> dict:
    """The repository's ``config.json`` alone (it names the network), without its weights."""
    config = _fetch(repo, revision, CONFIG)
    if config is None:
        raise ValueError(_missing(repo, revision))
    return _read_config(config)


def hub_config(fetched: Path) -> dict:
    """The ``config.json`` of what :func:`fetch` gave (beside timm's weights, naming the architecture,
    or in a ``save_pretrained`` folder); {} when there is none."""
    config = (fetched if fetched.is_dir() else fetched.parent) / CONFIG
    return _read_config(config) if config.is_file() else {}


def timm_folder_weights(path: Path) -> Path | None:
    """The weights file of timm's repository downloaded into the folder ``path`` (``hf download ORG/NAME
    --local-dir PATH``): timm's ``config.json`` (not a ``save_pretrained`` folder's) beside its weights;
    None for any other folder or file."""
    if timm_architecture(path) is None:
        return None
    return next((path / f for f in TIMM_WEIGHTS if (path / f).is_file()), None)


def local_path(location: str | Path) -> Path:
    """Where a model's folder or weights are on disk, as a command or ``pretrained=`` takes them: a path,
    or timm's ``local-dir:PATH``, which names the folder PATH (a timm user writes it wherever timm takes a
    model's location). Every such place reads its value through here, so that ``local-dir:`` means one
    thing everywhere. A Hub repository (``hf-hub:``), where a folder on disk is needed, or a ``local-dir:``
    that names no folder, is a one-line error saying what to give."""
    if not isinstance(location, str) or not location.startswith(MODEL_SOURCES):
        return Path(location)
    if location.startswith(HUB_PREFIX):
        repo = location.removeprefix(HUB_PREFIX).partition("@")[0] or "ORG/NAME"
        raise ValueError(f"{location!r} is a Hub repository, and a folder on disk is needed here: download it "
                         f"(hf download {repo} --local-dir PATH) and give PATH")
    folder = location.removeprefix(LOCAL_DIR_PREFIX)
    path = Path(folder).expanduser()
    if not folder:
        raise ValueError(f"{location!r} names no folder; write local-dir:PATH")
    if not path.exists():  # a file is PATH's: each place says what it makes of one
        raise ValueError(f"{location!r}: {str(path)!r} is not a folder; give one that holds timm's config.json and "
                         f"weights (hf download ORG/NAME --local-dir PATH), or a save_pretrained folder, checkpoint or "
                         f"run directory")
    return path


def local_dir(name: str, weights: bool = True) -> tuple[Path, dict, Path | None]:
    """What timm's ``local-dir:PATH`` names, found as :func:`fetch` finds a repository's: the folder, its
    ``config.json``, and its weights: the file of timm's (a repository downloaded into the folder), or the
    folder of a ``save_pretrained`` folder or training checkpoint (a run directory's ``last``). A folder
    that holds neither is a one-line error naming it. Without ``weights`` (a model freshly initialised), timm's
    ``config.json`` alone is enough, as the Hub's is (:func:`repository_config`) and timm's create_model takes it."""
    path = local_path(name)
    if (timm_file := timm_folder_weights(path)) is not None:
        return path, hub_config(timm_file), timm_file
    if not weights and timm_architecture(path) is not None:
        return path, _read_config(path / CONFIG), None
    folder, meta = read_model_meta(path)  # says what is wrong with any other folder, timm's without weights too
    return folder, meta, folder


def _read_config(path: Path) -> dict:
    """A repository's ``config.json``, a JSON object; a file that is not one is a one-line error naming it."""
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); download the repository again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(meta).__name__}, not the object of a model's config; "
                         f"download the repository again")
    # Read into the model's preprocessing (timm_pretrained_cfg): another type was a TypeError's traceback there
    if not isinstance(meta.get("pretrained_cfg"), (dict, type(None))):
        raise ValueError(f"{str(path)!r} has a pretrained_cfg that is a JSON {type(meta['pretrained_cfg']).__name__}, "
                         f"not an object of how images are prepared (mean, std, ...); correct it or download the "
                         f"repository again")
    return meta


def hub_cache() -> str:
    """The cache folder: ``create_model``'s ``cache_dir`` within its call (:func:`hub_cache_dir`), else as
    ``huggingface_hub`` would choose it if imported now."""
    from huggingface_hub import constants

    if (given := _CALL_CACHE_DIR.get()) is not None:
        return given
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (``huggingface_hub``'s truthy values), else as when it was imported."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return constants.HF_HUB_OFFLINE if value is None else value.upper() in {"1", "ON", "YES", "TRUE"}


# Where a folder of weights goes, in Python and on each command line
_GIVE_FOLDER = "pretrained=PATH; --pretrained PATH to train, --checkpoint PATH to eval, predict or export"


def _fetch(repo: str, revision: str | None, filename: str) -> Path | None:
    """One file of the repository, or None when the repository (or the cache, offline) lacks it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (EntryNotFoundError, HFValidationError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    offline = hub_offline()
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=hub_cache(),
                                    local_files_only=offline))
    except LocalEntryNotFoundError:
        if offline:  # not in the cache: the caller tries the repository's other files
            return None
        # Online, the Hub could not be reached (huggingface_hub has retried): every other file would
        # wait as long, so the first one's failure is the answer.
        raise ValueError(f"the Hugging Face Hub could not be reached and its cache ({hub_cache()}) lacks {repo}: "
                         f"check the connection, or download its files into a folder where there is one and "
                         f"give the folder ({_GIVE_FOLDER})") from None
    except EntryNotFoundError:  # not in the repository
        return None
    except RevisionNotFoundError:
        raise ValueError(f"{repo} has no revision {revision!r}; give a branch, tag or commit of it") from None
    except RepositoryNotFoundError:
        raise ValueError(f"there is no repository {repo} on the Hugging Face Hub, or it is private or gated: "
                         f"check the name, or log in with `hf auth login`") from None
    except HFValidationError:
        raise ValueError(f"{repo!r} is not a Hugging Face repository name; write ORG/NAME") from None


def _missing(repo: str, revision: str | None) -> str:
    """Why no model came: the cache lacks it (offline or unreachable), or the repository holds neither format."""
    download = f"`hf download {repo}{f' --revision {revision}' if revision else ''}`"
    if hub_offline():
        return (f"{repo} is not in the Hugging Face cache ({hub_cache()}) and HF_HUB_OFFLINE is set: download it "
                f"with {download}, or unset HF_HUB_OFFLINE; or download its files into a folder yourself and give the "
                f"folder ({_GIVE_FOLDER})")
    return (f"{repo} holds neither timm weights ({' or '.join(TIMM_WEIGHTS)}) nor a save_pretrained folder "
            f"({CONFIG} with \"model\" and \"config\", and {WEIGHTS}), or the Hub is unreachable and the "
            f"cache ({hub_cache()}) lacks it: check the name and connection, or download it with {download}")
