"""Sharded data sets: WebDataset tar shards and Hugging Face datasets, as map-style datasets.

``build_webdataset(data_dir, train_transform, eval_transform)`` and ``build_hf(...)`` return a
:class:`~coatnet.data.DataBundle` whose items are ``(transform(PIL RGB image), int label)``, like
``build_datasets``. Both need the ``data`` extra (``pip install 'coatnet[data]'``).

Why map-style (random access by index) and not webdataset's streaming pipeline: the trainer draws
the order with ``DistributedSampler`` over indices and seeds each sample's augmentation from
(seed, epoch, index), so with random access these data sets inherit everything ImageFolder has:

* **Exact resume**: everything, bit-exactly (order, augmentations, the position inside the epoch),
  as long as the files are unchanged. Index ``i`` always names the same sample: shards are taken in
  sorted name order (or the brace pattern's order) and samples in tar order; a Hugging Face split
  keeps its row order (parquet files sorted by name).
* **Ranks and workers**: ``DistributedSampler`` shuffles all indices with (seed + epoch), pads the
  list to a multiple of the world size by repeating its first indices (``drop_last=False``, the
  default), and gives rank ``r`` positions ``r, r + world, ...``. So every sample is seen in each
  epoch, without gaps and, when the count divides by the world size, without duplicates; otherwise
  at most ``world - 1`` samples are seen twice that epoch. DataLoader workers only read the indices
  handed to them, so they add neither duplicates nor gaps.

WebDataset shards: ``wids.ShardListDataset`` (webdataset's indexed reader, now the separate
``wids`` package, not part of ``webdataset`` 1.0) does not fit: it needs a shard list with sample
counts (which means reading every shard first anyway), copies or locks shards in a cache dir
(``/tmp/_wids_cache`` or a ``.lock`` file next to each shard), re-indexes a shard every time it falls
out of its small LRU of open shards (with a global shuffle, almost every read), prints to stderr,
and reports bad input with ``assert``. Instead each shard's tar headers are read once, at
construction, with Python's ``tarfile`` (the reader under webdataset's own iterator) without
reading the images, and the index (shard, byte offset, size, label) is kept in numpy arrays. Reading
the headers costs 0.1-0.2 ms a sample (minutes for ImageNet-1k), so each shard's index is also kept
in a cache (``~/.cache/coatnet/webdataset-index``, or under ``$XDG_CACHE_HOME``), keyed by the
shard's path, size, modification and change times: later runs, resumes and evaluations read it back
in milliseconds, and a shard written again is indexed again. A sample is grouped the way
webdataset groups it (consecutive files with the same key, split with
``webdataset.tariterators.base_plus_ext``; names ``__x__`` and folders ``__x__/`` skipped as metadata,
as there): ``key.jpg|jpeg|png|webp`` is the image, ``key.cls`` the label as text; other files are
ignored. An item opens its shard, reads the image bytes at the offset and closes it (one ``open``
per image, as ImageFolder does), so nothing is open when the dataset is pickled into a worker. Only uncompressed ``.tar`` shards work:
a compressed one cannot be read at an offset.

Hugging Face: ``datasets.Dataset`` is already random access over memory-mapped Arrow files
(re-mapped by path in a spawned worker; a forked worker shares the read-only mapping). A
``save_to_disk`` folder is used in place; parquet files are converted once by ``datasets`` into an
Arrow cache (see :func:`build_hf` for where), which later runs and other ranks reuse.

An image that fails to decode when read is warned about, counted in ``skipped_at_load`` and replaced
by the next decodable sample, as ``ImageFolderDataset`` does.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import DataBundle, DataError, SubstitutesUndecodable, _not_a_file, _one_line, decode_image
from .text import json_text

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # a sample's image, in order of preference
HF_EVAL_SPLITS = ("validation", "val", "test")
_WDS_META = r"__[^/]*__($|/)"  # webdataset skips these names (metadata)
INDEX_FORMAT = 1  # part of a shard index's cache key: a change to the rows' meaning never reads an old cache


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise DataError(
            f"the '{module}' package is not installed; pip install 'coatnet[data]'"
        ) from None


class EncodedImages(SubstitutesUndecodable, Dataset):
    """Map-style base: item ``i`` is ``(transform(decoded image i), labels[i])``; an image that does
    not decode is :class:`~coatnet.data.SubstitutesUndecodable`'s.

    Subclasses implement ``_read(i) -> (encoded bytes, description for messages)``.
    """

    def __init__(self, labels: np.ndarray, transform: Callable):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self._watch_for_undecodable(len(self.labels))

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def _read(self, i: int) -> tuple[bytes, str]:
        raise NotImplementedError

    def _load(self, i: int) -> tuple[torch.Tensor, int]:
        data, where = self._read(i)
        return self.transform(decode_image(io.BytesIO(data), where)), int(self.labels[i])


# --------------------------------------------------------------------------------------------
# WebDataset tar shards
# --------------------------------------------------------------------------------------------


class TarShardDataset(EncodedImages):
    """Samples of uncompressed WebDataset tar shards, read by index through a prebuilt index."""

    def __init__(self, shards: list[str], shard: np.ndarray, offset: np.ndarray, size: np.ndarray,
                 keys: np.ndarray, labels: np.ndarray, transform: Callable):
        super().__init__(labels, transform)
        self.shards = list(shards)
        self.source = f"the shards '{shards[0]}'" + (f" ... ({len(shards)})" if len(shards) > 1 else "")
        self.shard, self.offset, self.size, self.keys = shard, offset, size, keys

    def _read(self, i: int) -> tuple[bytes, str]:
        path, key = self.shards[self.shard[i]], self.keys[i].decode("utf-8", "surrogateescape")
        try:
            with open(path, "rb") as f:
                f.seek(int(self.offset[i]))
                data = f.read(int(self.size[i]))
        except OSError as e:
            raise DataError(f"cannot read shard '{path}' ({_one_line(e)})") from None
        if len(data) != self.size[i]:
            raise DataError(f"shard '{path}' is shorter than when it was indexed; re-create it")
        return data, f"'{key}' in shard '{path}'"


def _index_shard(path: str) -> list[tuple[str, int, int, int]]:
    """One shard's samples in tar order: (key, image offset, image size, label)."""
    from webdataset.tariterators import base_plus_ext

    samples: list[list] = []  # [key, {ext: TarInfo}, label], grouped as webdataset groups them
    started: set[str] = set()
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                key, ext = base_plus_ext(m.name)
                if not m.isreg() or key is None or re.match(_WDS_META, m.name):
                    continue
                if not samples or samples[-1][0] != key:
                    if key in started:  # webdataset reads a sample's files as one run of members
                        raise DataError(f"sample '{key}' in shard '{path}' has files apart from each other (other "
                                        f"samples' between them); re-create the shard with each sample's files "
                                        f"together (tar them in sorted order)")
                    started.add(key)
                    samples.append([key, {}, None])
                samples[-1][1][ext.lower()] = m
                if ext.lower() == "cls":
                    raw = tf.extractfile(m).read()
                    try:
                        samples[-1][2] = int(raw.decode("utf-8").strip())
                    except (UnicodeDecodeError, ValueError):
                        raise DataError(
                            f"sample '{key}' in shard '{path}' has label {raw[:20]!r}, not an "
                            "integer; write the class index as text in key.cls"
                        ) from None
                    if not -2**63 <= samples[-1][2] < 2**63:  # a class index is an int64 (a tensor's, numpy's)
                        text = str(samples[-1][2])
                        raise DataError(f"sample '{key}' in shard '{path}' has label {text[:20]}"
                                        f"{'...' if len(text) > 20 else ''}, beyond any class index; write the "
                                        "class index as text in key.cls")
            end = tf.offset  # where the end-of-archive zero blocks must be
        with open(path, "rb") as f:  # tarfile stops silently at a cut at a member boundary
            f.seek(end)
            tail = f.read(512)
        if len(tail) < 512 or any(tail):
            raise tarfile.ReadError(f"no end-of-archive marker at byte {end}")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(
            f"shard '{path}' is not an uncompressed tar file or is truncated ({_one_line(e)}); "
            "re-create or re-download it"
        ) from None
    rows = []
    for key, files, label in samples:
        image = next((files[e] for e in IMAGE_EXTS if e in files), None)
        if image is None or label is None:
            missing = "image (.jpg/.jpeg/.png/.webp)" if image is None else "label (.cls)"
            # a key ends at the first dot of a name, as webdataset groups them: 'img.001.png' is 'img' with '001.png'
            # (of a sample with a label, 'seg.png' is an extension, as webdataset means it: a mask, say)
            dotted = next((f"{key}.{ext}" for ext in files if "." in ext), None) if label is None else None
            raise DataError(f"sample '{key}' in shard '{path}' has no {missing}; " + (
                f"its file '{dotted}' has a dot in its key, and a key ends at the first dot of a file's name "
                "(webdataset's rule): re-create the shard with keys without dots (img_001.png)" if dotted
                else "every sample needs both"))
        rows.append((key, image.offset_data, image.size, label))
    return rows


def _index_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "coatnet" / "webdataset-index"


def _cached_index_shard(path: str) -> list[tuple[str, int, int, int]]:
    """``_index_shard(path)``, read from the index cache when the shard is unchanged, else indexed and
    put there. A cache that cannot be read or written only costs the time of indexing."""
    try:
        st = os.stat(path)
        # The change time too: copies that keep the modification time (cp -p, rsync -a, tar) get a new
        # one, and so does a file written again in place.
        ident = (f"{INDEX_FORMAT}\0{os.path.realpath(path)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0"
                 f"{st.st_mtime_ns}\0{st.st_ctime_ns}")
        cache = _index_cache_dir() / f"{hashlib.sha256(ident.encode()).hexdigest()[:40]}.json"
    except (OSError, RuntimeError):  # RuntimeError: no home folder to put the cache in
        return _index_shard(path)  # which says in one line what is wrong with the path, if anything
    try:
        rows = [(key, offset, size, label) for key, offset, size, label in json.loads(cache.read_text())]
        if all(type(k) is str and type(o) is int and type(n) is int and type(c) is int and -2**63 <= c < 2**63
               for k, o, n, c in rows):  # rows as _index_shard gives them (an older version kept any label)
            return rows
    except (OSError, ValueError, TypeError):  # not there yet, or not a list of rows
        pass
    rows = _index_shard(path)
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        # a name of its own, then a rename: ranks indexing the same shard at once never mix their writes
        with tempfile.NamedTemporaryFile("w", dir=cache.parent, prefix=f".{cache.stem}-", delete=False) as f:
            tmp = f.name
            f.write(json_text(rows))
        os.replace(tmp, cache)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return rows


def _index_split(shards: list[str], transform: Callable) -> TarShardDataset:
    # Threads overlap the header reads on slow (network) storage; map keeps the shard order. On a
    # local disk the Python tar parsing dominates: about 0.1 ms a sample (the cache makes it once).
    with ThreadPoolExecutor(max_workers=min(8, len(shards))) as pool:
        per_shard = list(pool.map(_cached_index_shard, shards))
    rows = [row for part in per_shard for row in part]
    if not rows:
        raise DataError(f"the shards '{shards[0]}' ... hold no samples; check the data")
    keys, offsets, sizes, labels = zip(*rows)
    shard_ids = np.repeat(np.arange(len(shards), dtype=np.int32), [len(p) for p in per_shard])
    keys = np.array([k.encode("utf-8", "surrogateescape") for k in keys])  # tar's names, as os.fsencode
    return TarShardDataset(shards, shard_ids, np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64),
                           keys, np.array(labels, dtype=np.int64), transform)


def _find_shards(data_dir: str, with_train: bool = True) -> tuple[list[str], list[str], Path]:
    """Train and val shard paths (``with_train=False``: val's alone, train's not looked for), and the
    folder that may hold classes.txt."""
    if "{" in data_dir:  # brace pattern for the train shards
        braceexpand = _require("braceexpand")

        folder, name = os.path.split(os.path.expanduser(data_dir))
        if "train" not in name:
            raise DataError(
                f"shard pattern '{data_dir}' must have 'train' in its file name (the val shards are "
                "the same pattern with 'val' for 'train')"
            )
        split_paths = []
        for split, pattern in (("train", name), ("val", name.replace("train", "val"))):
            pattern = os.path.join(folder, pattern)
            try:
                paths = list(braceexpand.braceexpand(pattern)) if split == "val" or with_train else []
            except ValueError:  # braceexpand's UnbalancedBracesError: a '{' or '}' left open or unopened
                raise DataError(f"shard pattern '{data_dir}' has unbalanced braces; close each range, as in "
                                "'DIR/train-{000000..000099}.tar'") from None
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise DataError(
                    f"no {split} shards found: {len(missing)} of {len(paths)} files of '{pattern}' do "
                    f"not exist (first: '{missing[0]}'); fix the pattern, or pass the folder holding "
                    "train-*.tar and val-*.tar"
                )
            split_paths.append(paths)
        return split_paths[0], split_paths[1], Path(folder)
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(
            f"'{root}' is neither a folder of shards nor a brace pattern like "
            "'DIR/train-{000000..000099}.tar'; check --data-dir"
        )
    train, val = (sorted(str(p) for p in root.glob(f"{s}-*.tar") if p.is_file()) if s == "val" or with_train else []
                  for s in ("train", "val"))
    if (with_train and not train) or not val:
        split = "train" if with_train and not train else "val"
        compressed = sorted(p.name for p in root.glob(f"{split}-*.tar.*"))  # a .tar.gz has no offsets to read at
        # shards named otherwise (imagenet-train-0000.tar, validation-0000.tar) are there, but not read
        others = sorted(p.name for p in root.glob("*.tar") if not p.name.startswith(("train-", "val-")))
        raise DataError(
            f"no {split} shards found: looked for '{root}/train-*.tar' and '{root}/val-*.tar'; "
            + (f"found compressed ones ({compressed[0]}, ...), which cannot be read by index: decompress them "
               f"(gunzip)" if compressed else
               f"found other names ({', '.join(others[:2])}{', ...' if len(others) > 2 else ''}): rename or link the "
               f"shards as train-*.tar and val-*.tar" if others else "put the WebDataset shards there")
        )
    return train, val, root


def _read_classes_txt(path: Path) -> tuple[str, ...]:
    try:  # utf-8-sig: a byte-order mark (Windows' Notepad writes one) is not part of the first name
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"'{path}' is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = tuple(line.strip() for line in lines)
    if not names or not all(names) or len(set(names)) != len(names):
        raise DataError(f"'{path}' must list one distinct, non-empty class name per line (line i = label i)")
    return names


def _check_labels(ds: TarShardDataset, num_classes: int, source: str) -> None:
    bad = np.flatnonzero((ds.labels < 0) | (ds.labels >= num_classes))
    if len(bad):
        i = bad[0]
        raise DataError(
            f"sample '{ds.keys[i].decode('utf-8', 'surrogateescape')}' in shard '{ds.shards[ds.shard[i]]}' has "
            f"label {ds.labels[i]}, outside 0..{num_classes - 1} of {source}; fix the label or the class list"
        )


def build_webdataset(data_dir: str, train_transform: Callable, eval_transform: Callable,
                     train: bool = True) -> DataBundle:
    """WebDataset shards: ``data_dir`` is a folder holding ``train-*.tar`` and ``val-*.tar``, or a
    brace pattern for the train shards (``DIR/train-{000000..000099}.tar``) whose val shards are
    the same pattern with ``train`` replaced by ``val`` in the file name. ``train=False``, for
    evaluation alone: the val shards alone are read (the train shards need not be there).

    Class names come from ``classes.txt`` next to the shards (line i = label i), else they are
    ``"0".."N-1"`` with N = the largest label of the splits read + 1.
    """
    _require("webdataset")
    train_shards, val_shards, folder = _find_shards(str(data_dir), with_train=train)
    splits = [_index_split(shards, transform) for shards, transform in
              ((train_shards, train_transform), (val_shards, eval_transform)) if shards]
    classes_txt = folder / "classes.txt"
    if classes_txt.is_file():
        classes = _read_classes_txt(classes_txt)
        source = f"'{classes_txt}'"
    else:
        classes = numbered_classes(splits, "write the class names to classes.txt next to the shards "
                                           "(line i: the name of label i)")
        source = "the labels"
    for ds in splits:
        _check_labels(ds, len(classes), source)
    val = splits[-1]
    val.evaluation = True  # an undecodable image is left out of the evaluation
    if train:
        warn_untrained(classes, splits[0].labels, val.labels, f"the train shards of '{data_dir}'")
    return DataBundle(splits[0] if train else None, val, classes)


# --------------------------------------------------------------------------------------------
# Hugging Face datasets
# --------------------------------------------------------------------------------------------


# Labels without names number the classes up to the largest: at most this many, or one per sample.
# (ImageNet-21k has 21,841 classes.)
MAX_NUMBERED_CLASSES = 100_000


def warn_untrained(classes: tuple[str, ...], train_labels: np.ndarray, val_labels: np.ndarray, where: str) -> None:
    """One warning for the classes no training sample has: the model is scored on those it never saw."""
    untrained = sorted(set(range(len(classes))) - set(np.unique(train_labels).tolist()))
    if untrained:
        scored = sorted(set(untrained) & set(np.unique(val_labels).tolist()))
        names = ", ".join(classes[c] for c in untrained[:5]) + (" ..." if len(untrained) > 5 else "")
        warnings.warn(f"{len(untrained)} class{'es' if len(untrained) > 1 else ''} with no samples in {where}: "
                      f"{names}" + (f" ({len(scored)} of them in the evaluation, which the model cannot learn)"
                                    if scored else ""), stacklevel=3)


def numbered_classes(splits: tuple[EncodedImages, ...] | list[EncodedImages], remedy: str) -> tuple[str, ...]:
    """Class names "0".."N-1" for labels without names, N the largest label + 1; refused where that
    is far more classes than samples (one bad label, 10**9, would make a head of 10**9 outputs)."""
    largest, samples = int(max(ds.labels.max() for ds in splits)), sum(len(ds) for ds in splits)
    if largest >= max(samples, MAX_NUMBERED_CLASSES):
        raise DataError(f"the largest label, {largest}, would make a {largest + 1}-class head for {samples} samples; "
                        f"check the labels, or {remedy}")
    return tuple(str(c) for c in range(largest + 1))


class HFImageDataset(EncodedImages):
    """One split of a Hugging Face dataset, its image column read undecoded and decoded here."""

    def __init__(self, hf_split, image_column: str, labels: np.ndarray, transform: Callable, name: str):
        import datasets

        super().__init__(labels, transform)
        self.image_column, self.name = image_column, name
        self.source = name  # for the message when no decodable image is left
        # Only the image column, as {"bytes", "path"} (no PIL decode in datasets: see decode_image).
        self.hf = hf_split.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))

    def _read(self, i: int) -> tuple[bytes, str]:
        value = self.hf[i][self.image_column]
        where = f"row {i} of {self.name}"
        if value is None or value.get("bytes") is value.get("path") is None:  # a null in the column
            raise DataError(f"no image in {where}")
        if value.get("bytes") is None:  # stored as a path to an image file
            if (other := _not_a_file(value["path"])) is not None:  # a FIFO would wait for a writer forever
                raise DataError(f"cannot read image '{value['path']}' ({where}): {other}")
            try:
                return Path(value["path"]).read_bytes(), f"'{value['path']}' ({where})"
            except (OSError, TypeError) as e:
                raise DataError(f"cannot read image {where} ({_one_line(e)})") from None
        return value["bytes"], where


def _hf_cache_dir(root: Path) -> str:
    """Where parquet is converted to Arrow: $COATNET_HF_CACHE, else next to the data, else /tmp.

    Not next to a snapshot of a Hub cache (``.../datasets--ORG--NAME/snapshots/REV``), where the
    Hub's tools would take the folder for another revision of the repository."""
    if os.environ.get("COATNET_HF_CACHE"):
        return os.environ["COATNET_HF_CACHE"]
    root = root.resolve()
    in_hub_cache = any(p.parent.name == "snapshots" and p.parent.parent.name.startswith(("datasets--", "models--"))
                       for p in (root, *root.parents))
    if os.access(root.parent, os.W_OK) and not in_hub_cache:
        return str(root.parent / f".{root.name}-arrow-cache")
    return os.path.join(tempfile.gettempdir(), "coatnet-arrow-cache", root.name)


def _load_hf_splits(root: Path, cache_dir: str | None, with_train: bool = True) -> tuple[dict, str, dict | None]:
    """``{"train": Dataset, <eval split>: Dataset}`` (``with_train=False``: the eval split's alone),
    the eval split's name, and with ``with_train=False`` the train split's features, if it has one
    that can be read without loading it (else None)."""
    datasets = _require("datasets")
    if (root / "state.json").is_file() and (root.parent / "dataset_dict.json").is_file():
        # a split's folder of a DatasetDict given for the DatasetDict's (eval --data-dir DIR/validation)
        raise DataError(f"'{root}' is the '{root.name}' split of the DatasetDict saved in '{root.parent}'; pass "
                        f"--data-dir '{root.parent}'")
    if (root / "state.json").is_file():
        raise DataError(
            f"'{root}' holds a single split (Dataset.save_to_disk); save a DatasetDict with "
            "'train' and 'validation' splits"
        )
    if (root / "dataset_dict.json").is_file():
        try:
            dd = datasets.load_from_disk(str(root))
        except Exception as e:  # corrupt or foreign files fail in many ways; all mean "unreadable"
            raise DataError(f"cannot load the dataset saved in '{root}' ({_one_line(e)})") from None
        found = list(dd)
        files = None
    else:
        for base in (root, root / "data"):
            files = {}
            for p in sorted(base.glob("*-*.parquet")):
                files.setdefault(p.name.split("-")[0], []).append(str(p))
            if files:
                break
        else:
            raise DataError(
                f"no Hugging Face dataset in '{root}': looked for dataset_dict.json (save_to_disk), "
                f"'{root}/train-*.parquet' and '{root}/data/train-*.parquet'"
            )
        found = list(files)
    eval_split = next((s for s in HF_EVAL_SPLITS if s in found), None)
    if (with_train and "train" not in found) or eval_split is None:
        raise DataError(
            f"'{root}' needs {'a train split and ' if with_train else ''}one of {'/'.join(HF_EVAL_SPLITS)} "
            f"(found: {', '.join(found) or 'none'})"
        )
    read = ("train", eval_split) if with_train else (eval_split,)
    if files is None:
        return {s: dd[s] for s in read}, eval_split, dd["train"].features if "train" in dd and not with_train else None
    import pyarrow.parquet as pq

    train_features = None
    if "train" in files and not with_train:
        try:  # the schema of parquet written by datasets carries its features (ClassLabel names among them)
            train_features = datasets.Features.from_arrow_schema(pq.read_schema(files["train"][0]))
        except Exception:  # an evaluation does not read the train split: its bad files are training's to report
            pass

    wanted = {s: files[s] for s in read}
    for path in (p for ps in wanted.values() for p in ps):  # name the bad file, not just the folder
        try:
            pq.read_schema(path)
        except Exception as e:
            raise DataError(f"'{path}' is not a readable parquet file ({_one_line(e)}); re-download it") from None
    cache = cache_dir or _hf_cache_dir(root)
    made = not os.path.exists(cache)
    try:
        dd = datasets.load_dataset("parquet", data_files=wanted, cache_dir=cache)
    except Exception as e:
        if made:  # a half-converted cache of ours is not left beside the user's data
            shutil.rmtree(cache, ignore_errors=True)
        while e.__cause__ is not None:  # datasets wraps the reason in "An error occurred while generating ..."
            e = e.__cause__
        raise DataError(f"cannot load the parquet files in '{root}' ({_one_line(e)}){_schemas_differ(wanted)}") \
            from None
    return dict(dd), eval_split, train_features


def _schemas_differ(splits: dict[str, list[str]]) -> str:
    """Where a split's files have other column types than its first file's, which datasets cannot
    convert together: the first such file and its columns, said after a failed load (a difference that
    datasets casts, int32 against int64, loads)."""
    import pyarrow.parquet as pq

    for paths in splits.values():
        first = {f.name: f.type for f in pq.read_schema(paths[0])}
        for path in paths[1:]:
            other = {f.name: f.type for f in pq.read_schema(path)}
            if other != first:
                differ = [f"'{n}' {other.get(n, 'absent')} there, {first.get(n, 'absent')} in '{paths[0]}'"
                          for n in {**first, **other} if other.get(n) != first.get(n)]
                return f"; '{path}' differs: {', '.join(differ)}: write a split's files with one schema"
    return ""


def _hf_columns(ds, where: str) -> tuple[str, str, tuple[str, ...] | None]:
    """Image column, label column and the ClassLabel names (None for a plain int column)."""
    import datasets

    feats = ds.features
    image = next((c for c in ("image", "img") if c in feats), None)
    label = next((c for c in ("label", "labels") if c in feats), None)
    if image is None:  # as for the label column below, there is no flag to name another
        theirs = next((c for c in feats if isinstance(feats[c], datasets.Image)), "COLUMN")
        raise DataError(f"{where} has no image column ('image' or 'img' of type Image); columns: {', '.join(feats)}; "
                        f"rename yours and save the data set again (dd.rename_column('{theirs}', 'image')"
                        f".save_to_disk(DIR))")
    # A struct of bytes and path is an Image's storage, as parquet written without datasets' metadata holds it
    stored = isinstance(feats[image], dict) and set(feats[image]) == {"bytes", "path"} and (
        getattr(feats[image]["bytes"], "dtype", None) in ("binary", "large_binary")
        and getattr(feats[image]["path"], "dtype", None) in ("string", "large_string"))  # else a cast's traceback
    if not isinstance(feats[image], datasets.Image) and not stored:
        raise DataError(f"{where}: column '{image}' is {feats[image]}, not an Image; save the data set with the "
                        f"column cast to one (ds.cast_column('{image}', datasets.Image()))")
    if label is None:  # there is no flag to name another: the data set is saved again
        theirs = next((c for c in feats if isinstance(feats[c], datasets.ClassLabel)), None) or \
            next((c for c in feats if "label" in c), "COLUMN")
        raise DataError(f"{where} has no label column ('label' or 'labels'); columns: {', '.join(feats)}; rename yours "
                        f"and save the data set again (dd.rename_column('{theirs}', 'label').save_to_disk(DIR))")
    if isinstance(feats[label], datasets.ClassLabel):
        return image, label, tuple(feats[label].names)
    if isinstance(feats[label], datasets.Value) and feats[label].dtype.startswith(("int", "uint")):
        return image, label, None
    raise DataError(f"{where}: label column '{label}' is {feats[label]}, not a ClassLabel or an integer; save the "
                    f"data set with it encoded (ds.class_encode_column('{label}'))")


def build_hf(data_dir: str, train_transform: Callable, eval_transform: Callable,
             cache_dir: str | None = None, train: bool = True) -> DataBundle:
    """A Hugging Face dataset: ``data_dir`` is a ``DatasetDict.save_to_disk`` folder, or a folder of
    parquet files ``DIR/<split>-*.parquet`` or ``DIR/data/<split>-*.parquet`` (the Hub layout).

    Splits: ``train``, and the first of ``validation``, ``val``, ``test`` for evaluation. Columns:
    ``image``/``img`` (an Image feature) and ``label``/``labels`` (a ClassLabel, whose names become
    the classes, or integers, giving ``"0".."N-1"``). Nothing touches the network. Parquet is
    converted once into ``cache_dir``, default ``$COATNET_HF_CACHE``, else ``.<name>-arrow-cache``
    beside ``data_dir`` (in a Hub cache: under the system temp dir), else under the system temp dir;
    a ``save_to_disk`` folder is read in place. ``train=False``, for evaluation alone: the
    evaluation split alone is read (a train split need not be there).
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"Hugging Face data directory '{root}' does not exist or is not a folder")
    splits, eval_split, train_features = _load_hf_splits(root, cache_dir, with_train=train)
    import datasets  # there, since the splits loaded

    # An evaluation alone names the classes as training did: by the train split's ClassLabel when it has one,
    # which the evaluation split's plain integers index
    label = next((c for c in ("label", "labels") if c in (train_features or {})), None)
    classes = tuple(train_features[label].names) if label and isinstance(train_features[label], datasets.ClassLabel) \
        else None
    built = []
    for split, transform in (("train", train_transform), (eval_split, eval_transform)):
        if split not in splits:
            continue
        ds, where = splits[split], f"split '{split}' of '{root}'"
        image, label, names = _hf_columns(ds, where)
        column = ds.with_format("arrow")[label]  # the whole column at once, not row by row
        labels = column.to_numpy() if column.null_count == 0 else None
        if len(column) == 0:
            raise DataError(f"{where} has no samples; check the data")
        if labels is None or labels.min() < 0:
            raise DataError(f"{where} has samples without a label (null or -1); use a labelled split")
        if classes is not None and names is not None and names != classes:
            raise DataError(f"{where} has other class names than split 'train'; give both the same ClassLabel")
        classes = classes or names
        built.append(HFImageDataset(ds, image, labels, transform, where))
    if classes is None:
        classes = numbered_classes(built, "give the label column a ClassLabel (datasets' class_encode_column)")
    for ds in built:
        if ds.labels.max() >= len(classes):
            raise DataError(f"{ds.name} has label {ds.labels.max()}, outside 0..{len(classes) - 1} of its ClassLabel")
    built[-1].evaluation = True  # an undecodable image is left out of the evaluation
    if train:
        warn_untrained(classes, built[0].labels, built[1].labels, built[0].name)
    return DataBundle(built[0] if train else None, built[-1], classes)
