"""Data sets and transforms for training CoAtNet image classifiers.

``build_datasets(name, ...)`` returns a :class:`DataBundle` (train/val datasets + class names).
Every dataset item is ``(float32 tensor (3, img_size, img_size), int label)``, the image normalized by
the preprocessing of the weights trained on (``coatnet.models.preprocessing``; ImageNet's mean and std
by default).

All randomness comes from torch's global RNG (torchvision.transforms.v2 draws from it), never from
python's ``random`` or numpy's global RNG, so a trainer that saves and restores the torch RNG state
resumes with exactly the same augmentations.
"""

from __future__ import annotations

import codecs
import os
import pickle
import stat
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import v2

from .models.preprocessing import (PixelRangeError, PretrainedCfg, as_shown, augment, eval_transform, normalize,
                                   train_transform)

DATASETS = ("digits", "imagefolder", "cifar10", "cifar100", "webdataset", "hf")

MIN_IMG_SIZE = 8


class DataError(ValueError):
    """Bad data input; its message is one line that says what was wrong and what to do."""


@dataclass(frozen=True)
class DataBundle:
    train: Dataset | None  # None: an image folder built for evaluation only (build_datasets(train=False))
    val: Dataset
    classes: tuple[str, ...]  # class names, index = label
    # Files that failed the header check at construction (both splits). Files that only fail when
    # fully decoded are counted later, per dataset, in ``ImageFolderDataset.skipped_at_load``.
    skipped_files: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def _cifar_train_transform(
    img_size: int, hflip: bool, randaugment: tuple[int, int] | None, cfg: PretrainedCfg
) -> v2.Transform:
    # The classic CIFAR recipe (pad 4 + random 32x32 crop) runs at the native 32x32, where it is
    # cheapest; the result is then scaled to img_size, i.e. a shift of up to img_size/8 pixels.
    resize = [v2.Resize(img_size, antialias=True)] if img_size != 32 else []
    return v2.Compose(
        [v2.RandomCrop(32, padding=4), *augment(hflip, randaugment), *resize, *normalize(cfg)]
    )


def _digits_transform(hflip: bool, randaugment: tuple[int, int] | None, cfg: PretrainedCfg) -> v2.Transform:
    # Input is already resized (see _build_digits). 1 -> 3 channels first: RandAugment's colour
    # ops want RGB.
    return v2.Compose([v2.RGB(), *augment(hflip, randaugment), *normalize(cfg)])


def mixup_cutmix(
    num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0
) -> v2.Transform | None:
    """Batch-level MixUp / CutMix (one of the two picked per batch when both alphas are > 0).

    Call it on ``(images, labels)`` with images (B, C, H, W) and int64 labels (B,); it returns
    soft labels (B, num_classes). ``None`` when both alphas are 0.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup/cutmix alpha must be >= 0, got {mixup_alpha}/{cutmix_alpha}")
    ops: list[v2.Transform] = []
    if mixup_alpha > 0:
        ops.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        ops.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


# --------------------------------------------------------------------------------------------
# Images on disk
# --------------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def load_image(path: str | os.PathLike) -> Image.Image:
    """Fully decode an image file to RGB; any failure becomes a one-line :class:`DataError`."""
    p = Path(path)
    if (other := _not_a_file(p)) is not None:
        raise DataError(f"cannot read image '{p}': {other}")
    if not os.path.lexists(p):  # a link in a loop exists, and opening it says so (exists() says it does not)
        raise DataError(f"cannot read image '{p}': no such file; check the path")
    return decode_image(p, f"'{p}'")


def _not_a_file(path: str | os.PathLike) -> str | None:
    """Why ``path`` (followed if a link) is not read as a file, None if it is one or cannot be looked at
    (opening it then says why): opening a FIFO waits for a writer forever, and a device may never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if not os.path.islink(path):
            return None
        return f"a link to '{os.readlink(path)}', which is not there; fix or remove the link"
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else \
        "a socket" if stat.S_ISSOCK(mode) else "a device"
    return f"not an image file but {kind}; give a JPEG/PNG/... file"


# Decoders signal bad input in several ways: OSError (incl. UnidentifiedImageError, "image file is
# truncated"), SyntaxError / ValueError from some plugins, decompression bombs.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _unreadable(e: Exception) -> str:
    """Why PIL could not open or decode an image, and what to do."""
    if isinstance(e, Image.DecompressionBombError):  # a real image, over PIL's limit against decompression bombs
        return f"{_one_line(e).rstrip('.')}; downscale it"
    if isinstance(e, OSError) and e.strerror:  # the system's error, not the decoder's: the file, not its bytes
        return f"{e.strerror.lower()}; check that it can be read"
    # PIL names a file object it cannot identify by its repr (<_io.BytesIO object at 0x...>)
    reason = "no image format PIL knows" if isinstance(e, UnidentifiedImageError) else _one_line(e)
    return f"not an image file or corrupt ({reason}); give a JPEG/PNG/... file"


def decode_image(source: Path | BinaryIO, where: str) -> Image.Image:
    """Fully decode an image (a file, or a file object of its bytes) to RGB, :func:`as_shown`; a
    failure is a one-line :class:`DataError` naming ``where``."""
    try:
        # PIL's warnings (a damaged EXIF block, an image over its decompression-bomb warning size) name no file:
        # said again naming it, so that one photo of a folder's thousands can be found.
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            with Image.open(source) as im:
                image = as_shown(im)  # decoded in full here, so a truncated file fails now, not in a transform
        for w in said:
            warnings.warn(f"image {where}: {w.message}", w.category, stacklevel=2)
        return image
    except PixelRangeError as e:
        raise DataError(f"cannot read image {where}: {e}") from None
    except _PIL_ERRORS as e:
        raise DataError(f"cannot read image {where}: {_unreadable(e)}") from None


def _header_problem(path: str) -> str | None:
    """Why PIL cannot identify the image from its header (a cheap check, no pixels decoded); None if it can."""
    if (other := _not_a_file(path)) is not None:
        return other
    try:
        with Image.open(path):
            return None
    except _PIL_ERRORS as e:
        return _unreadable(e)


def _inside(path: str, folders: set[str]) -> bool:
    """Whether ``path`` (a real path) is in one of ``folders`` (real paths), at any depth."""
    while (up := os.path.dirname(path)) != path:
        if up in folders:
            return True
        path = up
    return False


def _is_hidden(name: str) -> bool:
    # Skip dot-entries such as .ipynb_checkpoints/ or macOS "._x.jpg" resource forks.
    return name.startswith(".")


# The names of an image folder's splits, ours first, then those timm's folder data sets take too
SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "validation", "valid", "eval", "evaluation")}


def split_folder(data_dir: str | Path, split: str) -> Path:
    """``data_dir``'s folder of ``split`` ("train" or "val") under the first of its names that is a folder
    (:data:`SPLIT_NAMES`), else under our name."""
    data_dir = Path(data_dir).expanduser()
    return next((data_dir / n for n in SPLIT_NAMES[split] if (data_dir / n).is_dir()), data_dir / split)


def split_holding(folder: Path, data_dir: str | Path) -> tuple[str, Path] | None:
    """The split folder of an image-folder data set (its name, as ``val`` or ``validation``, and its real
    path) that ``folder`` is in, or None: a folder a command writes there is read as a class, and a file it
    writes in a class folder as an image of that class, by every later run on the data."""
    real = Path(os.path.realpath(folder))
    for split in SPLIT_NAMES:
        folder = split_folder(data_dir, split)
        tree = Path(os.path.realpath(folder))
        if real == tree or tree in real.parents:
            return folder.name, tree
    return None


def recorded_place(data_dir: str | None) -> str | None:
    """``data_dir`` as a run or report records it: a folder or file that exists, absolute (so that eval and
    --resume find it from any working directory); anything else (a shard pattern, a Hub name) as given."""
    if data_dir is None or not os.path.exists(place := os.path.expanduser(data_dir)):
        return data_dir
    return os.path.abspath(place)


def is_image_file(name: str) -> bool:
    """Whether a file named ``name`` is read as an image: by its extension, hidden ones left out."""
    return not _is_hidden(name) and has_file_allowed_extension(name, IMG_EXTENSIONS)


# The label of a sample evaluation leaves out (:func:`coatnet.evaluate.evaluate`): a stand-in for a
# validation image that failed to decode.
IGNORED_LABEL = -1


class SubstitutesUndecodable:
    """A map-style data set whose images may fail to decode only when read (a truncated JPEG passes
    a header check): each such file is warned about once, counted in ``skipped_at_load``, and the
    next decodable sample stands in, so training never crashes on one bad file. In an
    ``evaluation`` split the stand-in carries :data:`IGNORED_LABEL`, so that the evaluation leaves
    the file out instead of counting another file's pixels under its label.

    The failures are marked in shared memory: DataLoader workers' finds reach the main process's count.
    """

    evaluation = False
    source = "the data set"  # for the message when no decodable image is left

    def _watch_for_undecodable(self, count: int) -> None:
        self.undecodable = torch.zeros(count, dtype=torch.bool).share_memory_()  # True: failed when read

    @property
    def skipped_at_load(self) -> int:
        return int(self.undecodable.sum())

    def _load(self, i: int) -> tuple[torch.Tensor, int]:
        """Sample ``i``, decoded and transformed; DataError when its image does not decode."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self)
        for k in range(n):
            i = (int(index) + k) % n
            if self.undecodable[i]:
                continue
            try:
                image, label = self._load(i)
            except DataError as e:
                self.undecodable[i] = True  # remembered, so each bad file is decoded and warned about once
                warnings.warn(f"skipping at load: {e}", stacklevel=2)
                continue
            return image, IGNORED_LABEL if self.evaluation and i != index else label
        raise DataError(f"no decodable image left in {self.source}; check the data")


def warn_not_images(directory: str, names: list[str]) -> None:
    """One warning for the files of ``directory`` (``names``) that are not read, not being named as
    images (a ``.gif``, a ``README``), counted by kind; hidden files go without a word."""
    kinds = Counter(os.path.splitext(n)[1].lower() or n for n in names if not _is_hidden(n))
    if kinds:
        commonest = ", ".join(f"{kind} x{n}" for kind, n in sorted(kinds.items(), key=lambda kn: (-kn[1], kn[0]))[:5])
        count = sum(kinds.values())
        warnings.warn(f"{count} file{'s' if count > 1 else ''} in '{directory}' not read, not named as images "
                      f"({commonest}); images must end in one of {', '.join(IMG_EXTENSIONS)}", stacklevel=3)


class ImageFolderDataset(SubstitutesUndecodable, ImageFolder):
    """``root/<class>/**/<image>`` files (torchvision ImageFolder layout), decoded lazily.

    Hidden (dot-named) folders and files are skipped at every depth. Symlinked folders are followed, as
    torchvision does, each real folder once: a link to the split's folder or above it (``ln -s ..
    cat/up``, a loop) or to a folder listed already (by another link, or in a class: ``cat/dogs ->
    ../dog`` would list dogs as cats too) is skipped, with a warning. A class folder may itself be a
    symlink; a symlinked file is read like any other.

    Files whose header PIL cannot read are dropped at construction (``skipped``, with a warning);
    one that fails to decode later is :class:`SubstitutesUndecodable`'s.
    """

    def __init__(self, root: Path, transform: Callable, evaluation: bool = False):
        self.evaluation, self.source = evaluation, f"'{root}'"
        self.skipped = 0  # counted by make_dataset, which the base constructor calls
        super().__init__(root, transform=transform, loader=load_image)
        self._watch_for_undecodable(len(self.samples))

    @staticmethod
    def find_classes(directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        """Sorted non-hidden subfolders of ``directory`` (none is fine: the caller reports it)."""
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not _is_hidden(e.name))
        return classes, {c: i for i, c in enumerate(classes)}

    def make_dataset(self, directory: str | os.PathLike, class_to_idx: dict[str, int], **_) -> list[tuple[str, int]]:
        """``(path, label)`` for each image under each class folder, in the same order on every machine.

        Replaces torchvision's walk, which lists hidden folders and loops on a link to a folder above.
        The base class's other arguments (extensions, is_valid_file, allow_empty) are fixed here.
        """
        samples, not_images, empty = [], [], []
        # Each folder is walked once, by its real path (links resolved): the class folders are claimed
        # first, then each subfolder as it is taken, before any is walked (two links side by side to one
        # folder would list its images twice).
        split = os.path.realpath(directory)
        # Where links lead, a real folder -> one link into it (a linked folder, or a folder of a linked
        # file), to find images shared with another split.
        self.link_targets: dict[str, str] = {}
        self.linked_files: dict[tuple[str, str], str] = {}  # (real folder, name) a linked file leads to -> the link
        claimed = set()
        # A class folder that is a link to another class's folder (eel -> dog) would list that class's images
        # under both labels, and one to the split's folder or above would list the other classes' folders in it:
        # skipped, as such links inside a class are, leaving the class empty (said below). Of several names of one
        # folder, the folder's own (not a link) keeps it, else the first.
        owner: dict[str, str] = {}
        for c in sorted(class_to_idx, key=lambda c: os.path.islink(os.path.join(directory, c))):
            owner.setdefault(os.path.realpath(os.path.join(directory, c)), c)
        not_walked = set()
        for c in class_to_idx:
            real = os.path.realpath(path := os.path.join(directory, c))
            if real == split or split.startswith(real.rstrip(os.sep) + os.sep):
                why = "it leads to the split's folder or above it, a loop"
            elif owner[real] != c:
                why = f"it leads to the folder of class '{owner[real]}', whose images would be listed as both"
            else:
                claimed.add(real)
                if os.path.islink(path):
                    self.link_targets.setdefault(real, path)
                continue
            not_walked.add(c)
            warnings.warn(f"skipping class folder '{path}' (-> '{real}'): {why}; remove the link", stacklevel=2)
        real_dirs: dict[str, str] = {}  # a linked file's folder as its link names it -> its real path, once each

        def unreadable(error: OSError):  # os.walk would pass over a folder it cannot list, and its images
            raise error

        def followed(dirpath: str, name: str) -> bool:
            """Whether to walk the subfolder ``name``: not hidden, and, for a link, neither back into the
            split's folder or above it (a loop) nor into a folder listed already (its images twice)."""
            path = os.path.join(dirpath, name)
            if _is_hidden(name):
                return False
            real = os.path.realpath(path)
            if real == split or split.startswith(real.rstrip(os.sep) + os.sep):
                why = "it leads to the split's folder or above it, a loop"
            elif real in claimed or os.path.islink(path) and _inside(real, claimed):
                why = "its images are listed through another path already"
            else:
                claimed.add(real)
                if os.path.islink(path):
                    self.link_targets.setdefault(real, path)
                return True
            warnings.warn(f"skipping folder '{path}' (-> '{real}'): {why}; remove the link", stacklevel=2)
            return False

        for cls, label in class_to_idx.items():
            if cls in not_walked:
                empty.append(cls)
                continue
            found = len(samples)
            # Top-down walk with sorted, pruned dirnames, into linked folders too (see followed()).
            for dirpath, dirnames, filenames in os.walk(os.path.join(directory, cls), onerror=unreadable,
                                                        followlinks=True):
                dirnames[:] = [d for d in sorted(dirnames) if followed(dirpath, d)]
                for fname in sorted(filenames):
                    if not is_image_file(fname):
                        not_images.append(fname)
                        continue
                    path = os.path.join(dirpath, fname)
                    if os.path.islink(path):  # a readlink, and a realpath per folder linked into, not per file
                        linked, name = os.path.split(os.path.join(dirpath, os.readlink(path)))
                        if linked not in real_dirs:
                            real_dirs[linked] = os.path.realpath(linked)
                        self.link_targets.setdefault(real_dirs[linked], path)
                        self.linked_files.setdefault((real_dirs[linked], name), path)
                    problem = _header_problem(path)
                    if problem is None:
                        samples.append((path, label))
                    else:
                        self.skipped += 1
                        warnings.warn(f"skipping '{path}': {problem}", stacklevel=2)
            if len(samples) == found:
                empty.append(cls)
        if empty:
            warnings.warn(f"{len(empty)} class{'es' if len(empty) > 1 else ''} with no images in '{directory}': "
                          f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}", stacklevel=2)
        loose = sum(1 for e in os.scandir(directory) if is_image_file(e.name) and not e.is_dir())
        if loose:
            warnings.warn(f"{loose} image{'s' if loose > 1 else ''} directly in '{directory}' not read: an image's "
                          f"class is the folder it is in; move {'them' if loose > 1 else 'it'} into "
                          f"{directory}/<class>/", stacklevel=2)
        warn_not_images(directory, not_images)
        self.real_folders = claimed  # every folder walked, by its real path
        return samples

    def shared_with(self, other: ImageFolderDataset) -> str | None:
        """A path through which this split lists images of ``other``'s folders (a linked folder, or a
        linked file, a linked class or split folder, in either direction), or one file of a third
        folder that both link to, or None. (A file reached through a chain of links is known by the
        last link's name.)"""
        for a, b in ((self, other), (other, self)):
            for folder, link in a.link_targets.items():
                if folder in b.real_folders:
                    return link
        if both := self.linked_files.keys() & other.linked_files.keys():
            return self.linked_files[min(both)]
        if self.real_folders & other.real_folders:  # one split is, or is in, the other
            return next((str(ds.root) for ds in (self, other) if os.path.islink(ds.root)),
                        min(self.real_folders & other.real_folders))
        return None

    def _load(self, i: int) -> tuple[torch.Tensor, int]:
        return ImageFolder.__getitem__(self, i)  # load_image, then the transform


# --------------------------------------------------------------------------------------------
# In-memory tensor data sets (digits, CIFAR)
# --------------------------------------------------------------------------------------------


class TensorImageDataset(Dataset):
    """uint8 images (N, C, H, W) held in memory, transformed per item as tensors (no PIL)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable):
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(images) == len(labels)
        self.images = images
        self.labels = labels
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(tv_tensors.Image(self.images[index])), self.targets[index]


def _build_digits(img_size: int, hflip: bool, randaugment: tuple[int, int] | None,
                  cfg: PretrainedCfg) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # 0..16 intensities -> 0..255 uint8, one channel.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    # Upsample all 1797 images once, here, instead of per sample every epoch (this is the first
    # and only deterministic op), as ``cfg`` says, so that predict and export, which follow it,
    # prepare an image of a digit as training did: by default a whole-image bilinear resize without a
    # crop (default_preprocessing), because the strokes touch the 8x8 border. Memory is small:
    # 1797 x img_size^2 bytes (1.8 MB at 32, 90 MB at 224).
    scaled = int(img_size / cfg.crop_pct)
    resize = v2.Compose([v2.Resize((scaled, scaled), interpolation=v2.InterpolationMode(cfg.interpolation)),
                         v2.CenterCrop(img_size)])
    images = resize(tv_tensors.Image(torch.from_numpy(images))).as_subclass(torch.Tensor).numpy()
    labels = digits.target.astype(np.int64)
    # Fixed, stratified 80/20 split: identical on every call and machine (seeded numpy RandomState).
    x_tr, x_va, y_tr, y_va = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    return DataBundle(
        train=TensorImageDataset(
            torch.from_numpy(x_tr), torch.from_numpy(y_tr), _digits_transform(hflip, randaugment, cfg)
        ),
        val=TensorImageDataset(
            torch.from_numpy(x_va), torch.from_numpy(y_va), _digits_transform(False, None, cfg)
        ),
        classes=tuple(str(d) for d in range(10)),
    )


# --------------------------------------------------------------------------------------------
# CIFAR (official "python version" pickles)
# --------------------------------------------------------------------------------------------


try:  # numpy >= 2 (and the compatibility shim in late 1.26)
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # pragma: no cover - older numpy
    from numpy.core.multiarray import _reconstruct as _np_reconstruct
    from numpy.core.multiarray import scalar as _np_scalar


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays: a pickle can run any callable it names, so
    everything except what the CIFAR files reference is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,  # files written by numpy 1.x
        ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,  # files written by numpy 2.x
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # numpy scalars (labels as list(np.array), from conversion scripts): a dtype and its bytes
        ("numpy.core.multiarray", "scalar"): _np_scalar,
        ("numpy._core.multiarray", "scalar"): _np_scalar,
        # empty bytes, as Python 3 pickles them at protocols 0-2 (called with no arguments: a size would
        # allocate that many); others are _codecs.encode's, below
        ("__builtin__", "bytes"): lambda: b"",
    }

    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        # What _codecs.encode may build in all: as much as the file holds (a text is pickled once, and
        # each call copies it, so a small crafted file could otherwise ask for any amount of memory).
        self.budget = os.fstat(file.fileno()).st_size

    def _latin1(self, text: str, encoding: str) -> bytes:
        """``_codecs.encode`` as pickles of Python 3 at protocols 0-2 call it, to rebuild bytes (an
        array's data among them) from text: with latin-1 alone, so that no other codec runs."""
        self.budget -= len(text)
        if encoding != "latin1" or self.budget < 0:
            raise DataError("refusing a CIFAR pickle that builds bytes " + (
                f"with the codec {encoding!r}" if encoding != "latin1" else "of more than its own size") +
                "; use the official files from https://www.cs.toronto.edu/~kriz/cifar.html")
        return codecs.encode(text, "latin1")

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):  # bytes as Python 3 pickles them at protocols 0-2
            return self._latin1
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to load '{module}.{name}' from a CIFAR pickle (only numpy arrays are "
                "allowed); use the official files from https://www.cs.toronto.edu/~kriz/cifar.html"
            ) from None


def _load_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except DataError:
        raise
    except Exception as e:  # garbage input can fail inside pickle in many ways; all mean "corrupt"
        raise DataError(
            f"cannot read CIFAR file '{path}': corrupt or not a pickle ({_one_line(e)}); "
            "re-download and extract the data set"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR file '{path}' does not hold a dict; re-download the data set")
    return obj


_CIFAR = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        meta="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        archive="cifar-10-python.tar.gz",
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        train=("train",),
        test=("test",),
        meta="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        archive="cifar-100-python.tar.gz",
    ),
}


def data_kind(data_dir: str | Path) -> str | None:
    """The data set ``data_dir`` holds, as timm reads a folder given without a data set's name: an image
    folder (train/ and val/, or timm's names of them), CIFAR's python version (extracted or not), WebDataset
    shards (a folder of train-*.tar, or a pattern of them) or a Hugging Face dataset (``save_to_disk``,
    parquet); None for anything else (its builder's error then says what each kind needs)."""
    if "{" in str(data_dir) or str(data_dir).endswith(".tar"):
        return "webdataset"
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        return None
    if all(split_folder(root, s).is_dir() for s in SPLIT_NAMES):
        return "imagefolder"
    for name, spec in _CIFAR.items():
        if (root / spec["archive"]).is_file() or any((r / spec["meta"]).is_file()
                                                      for r in (root, root / spec["folder"])):
            return name
    if any(root.glob("train-*.tar")):
        return "webdataset"
    if (root / "dataset_dict.json").is_file() or any(root.glob("*-*.parquet")) or any(root.glob("data/*-*.parquet")):
        return "hf"
    return None


def _cifar_split(
    root: Path, files: tuple[str, ...], label_key: bytes, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    datas, labels = [], []
    for fname in files:
        d = _load_cifar_pickle(root / fname)
        data, lab = d.get(b"data"), d.get(label_key)
        if (
            not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != 3 * 32 * 32 or lab is None or len(lab) != len(data)
        ):
            raise DataError(
                f"CIFAR file '{root / fname}' lacks uint8 b'data' (N x 3072) with matching "
                f"{label_key!r}; re-download the data set"
            )
        try:
            lab = np.asarray(lab)
            shape = f"of shape {lab.shape}"
        except ValueError:  # lists of several lengths
            lab, shape = np.empty((0, 0)), "as lists of several lengths"
        if lab.ndim == 2 and lab.shape[1] == 1:  # (N, 1): Keras' cifar10.load_data() layout, pickled again
            lab = lab[:, 0]
        if lab.ndim != 1:  # else each label would be a list, which training cannot take
            raise DataError(f"CIFAR file '{root / fname}' has {label_key!r} {shape}, not one label per image "
                            f"(N or N x 1); re-download the data set")
        if lab.dtype.kind not in "iu":  # np.int64 would truncate 0.5 to class 0, and fail on strings in a traceback
            raise DataError(f"CIFAR file '{root / fname}' has {lab.dtype} labels, not integers; re-download the data set")
        datas.append(data)
        labels.append(lab.astype(np.int64))
    # concatenate copies into one fresh, writable array (torch.from_numpy needs writable memory).
    images = np.concatenate(datas).reshape(-1, 3, 32, 32)  # rows are R(1024) G(1024) B(1024)
    y = np.concatenate(labels)
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"CIFAR labels in '{root}' fall outside 0..{num_classes - 1}; re-download")
    return torch.from_numpy(images), torch.from_numpy(y)


def _build_cifar(name: str, data_dir: Path, img_size: int, train_tf: v2.Transform,
                 cfg: PretrainedCfg) -> DataBundle:
    spec = _CIFAR[name]
    needed = (*spec["train"], *spec["test"], spec["meta"])
    # Accept the extracted folder itself or its parent.
    for root in (data_dir, data_dir / spec["folder"]):
        if all((root / f).is_file() for f in needed):
            break
    else:
        # of a folder holding some of them, the ones it lacks (a download cut short, a file deleted)
        missing = min(([f for f in needed if not (r / f).is_file()] for r in (data_dir, data_dir / spec["folder"])),
                      key=len)
        archive = data_dir / spec["archive"]
        if len(missing) == len(needed) and archive.is_file():  # downloaded, not extracted
            raise DataError(f"{name} files not found in '{data_dir}', which holds {spec['archive']} not extracted: "
                            f"extract it there (tar xzf '{archive}' -C '{data_dir}')")
        other = next(o for o in _CIFAR if o != name)  # the other CIFAR's folder given (cifar-10's to --data cifar100)
        if len(missing) == len(needed) and any((r / _CIFAR[other]["meta"]).is_file() and (r / _CIFAR[other]["test"][0])
                                               .is_file() for r in (data_dir, data_dir / _CIFAR[other]["folder"])):
            raise DataError(f"{name} files not found in '{data_dir}', which holds {other}'s; pass --data {other}, or "
                            f"the folder of {name} (extracted from {spec['archive']})")
        raise DataError(
            f"{name} files not found in '{data_dir}' or '{data_dir / spec['folder']}' "
            + (f"(need {', '.join(needed)})" if len(missing) == len(needed) else f"(missing: {', '.join(missing)})")
            + f"; download {spec['archive']} from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there"
        )
    names = _load_cifar_pickle(root / spec["meta"]).get(spec["names_key"])
    if not isinstance(names, (list, tuple)) or not names:
        wrong = "missing" if names is None else "empty" if isinstance(names, (list, tuple)) else \
            f"of type {type(names).__name__}, not a list of names"
        raise DataError(f"{spec['names_key']!r} in CIFAR meta file '{root / spec['meta']}' is {wrong}; re-download "
                        f"the data set")
    classes = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)
    if len(set(classes)) < len(classes):  # two labels of one name: predictions and evaluations could not tell them
        twice = sorted({c for c in classes if classes.count(c) > 1})
        raise DataError(f"CIFAR meta file '{root / spec['meta']}' names classes twice ({', '.join(twice[:5])}); "
                        f"re-download the data set")
    x_tr, y_tr = _cifar_split(root, spec["train"], spec["label_key"], len(classes))
    x_va, y_va = _cifar_split(root, spec["test"], spec["label_key"], len(classes))
    return DataBundle(
        train=TensorImageDataset(x_tr, y_tr, train_tf),
        val=TensorImageDataset(x_va, y_va, eval_transform(img_size, cfg)),
        classes=classes,
    )


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _check_img_size(img_size: int) -> None:
    # Divisibility constraints belong to the model; here we only refuse nonsense.
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < MIN_IMG_SIZE:
        raise DataError(f"img_size must be an integer >= {MIN_IMG_SIZE}, got {img_size!r}")


def check_randaugment(randaugment: tuple[int, int] | None, label: str = "randaugment") -> None:
    if randaugment is None:
        return
    ok = (
        isinstance(randaugment, (tuple, list)) and len(randaugment) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in randaugment)
        and randaugment[0] >= 0 and 0 <= randaugment[1] <= 30  # v2.RandAugment has 31 bins
    )
    if not ok:
        raise DataError(
            f"{label} must be (num_ops, magnitude) with num_ops >= 0 and magnitude in 0..30, "
            f"got {randaugment!r}"
        )


def same_letters(names: list[str], others: list[str], remedy: str) -> str:
    """`` (café: the same letters in other Unicode code points ...; remedy)`` for the names of ``names`` that
    ``others`` holds in other code points (a folder copied from macOS is in NFD): they look the same; else ""."""
    nfc = lambda names: {unicodedata.normalize("NFC", n) for n in names}  # noqa: E731
    alike = sorted(nfc(names) & nfc(others))
    return (f" ({', '.join(alike[:5])}: the same letters in other Unicode code points, as a copy from macOS may make; "
            f"{remedy})" if alike else "")


def _build_imagefolder(
    data_dir: Path, img_size: int, train_tf: v2.Transform, cfg: PretrainedCfg, with_train: bool = True
) -> DataBundle:
    # Evaluation alone needs only val/: train/ is neither listed nor required.
    split_dirs = {s: split_folder(data_dir, s) for s in (("train", "val") if with_train else ("val",))}
    for split, d in split_dirs.items():
        if not d.is_dir() and any(data_dir.name in names for names in SPLIT_NAMES.values()) and (
                theirs := split_folder(data_dir.parent, split)).is_dir():
            # the split's folder given for the tree's (eval --data-dir tree/val): not tree/val/val/<class>/
            raise DataError(f"'{data_dir}' has no {split}/ folder: it is the {data_dir.name}/ folder of "
                            f"'{data_dir.parent}', which holds {theirs.name}/; pass --data-dir '{data_dir.parent}'")
        if not d.is_dir():
            others = ", ".join(f"{n}/" for n in SPLIT_NAMES[split][1:])
            raise DataError(f"'{data_dir}' has no {split}/ folder (nor {others}, as timm takes it); lay out images as "
                            + " and ".join(f"{data_dir}/{s}/<class>/*.jpg" for s in split_dirs))
    train_name, val_name = (f"{split_dirs['train'].name}/" if with_train else "train/"), f"{split_dirs['val'].name}/"
    for split, d in split_dirs.items():  # a class folder linked to a disk not mounted would be left out without a word
        if nothing := sorted(e.name for e in os.scandir(d) if not is_image_file(e.name) and not _is_hidden(e.name)
                             and e.is_symlink() and not os.path.exists(e.path)):
            warnings.warn(f"skipping {len(nothing)} link{'s' if len(nothing) > 1 else ''} to nothing in '{d}', "
                          f"{'their classes' if len(nothing) > 1 else 'its class'} left out: "
                          + ", ".join(f"{n} -> '{os.readlink(d / n)}'" for n in nothing[:5])
                          + f"{' ...' if len(nothing) > 5 else ''}; fix or remove the link"
                          + ("s" if len(nothing) > 1 else ""), stacklevel=2)
    # Compare the class folders before the (slow) header scan of every file.
    first = next(iter(split_dirs.values()))
    classes, _ = ImageFolderDataset.find_classes(first)
    val_classes, _ = ImageFolderDataset.find_classes(split_dirs["val"])
    if not classes:
        raise DataError(f"empty data directory: '{first}' has no class folders; put images in {first}/<class>/")
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))

        def few(names: list[str]) -> str:  # ImageNet's 1000 would make a line of 13,000 characters
            return f"{names}" if len(names) <= 5 else f"{str(names[:5])[:-1]}, ...] ({len(names)})"

        # ImageNet's validation images come in one folder, not by class: the refusal says so, not only 1000 names
        loose = 0 if val_classes else sum(1 for e in os.scandir(split_dirs["val"]) if is_image_file(e.name))
        raise DataError(
            f"{train_name} and {val_name} in '{data_dir}' have different class folders "
            f"(only in train: {few(only_train)}, only in val: {few(only_val)}); "
            + (f"{val_name} holds {loose} image{'s' if loose > 1 else ''} directly, not in class folders: move each "
               f"into {split_dirs['val']}/<class>/, as {train_name} holds them" if loose else
               "give both the same classes")
            + same_letters(only_train, only_val, "rename one of the two folders")
        )
    # Its file headers are checked one by one (ImageNet: 1.28M), so evaluation leaves it unread.
    train = ImageFolderDataset(split_dirs["train"], train_tf) if with_train else None
    val = ImageFolderDataset(split_dirs["val"], eval_transform(img_size, cfg), evaluation=True)
    for split, ds in {"train": train, "val": val}.items():
        if split in split_dirs and len(ds) == 0:
            raise DataError(
                f"empty data directory: no readable images in '{split_dirs[split]}' "
                f"(looked for {', '.join(IMG_EXTENSIONS)}); put images in "
                f"{split_dirs[split]}/<class>/"
            )
    if train is not None and (shared := train.shared_with(val)):
        # The accuracy would count images trained on, without a word (ln -s train val, for a quick
        # overfitting check, is deliberate: hence a warning, not a refusal).
        warnings.warn(f"{train_name} and {val_name} in '{data_dir}' share images (through '{shared}'): the validation "
                      "accuracy counts images trained on; remove the link for a held-out measure", stacklevel=2)
    return DataBundle(train, val, tuple(classes), skipped_files=(train.skipped if train else 0) + val.skipped)


# Whole, tightly framed images (8x8 digit scans whose strokes touch the border; 32x32 CIFAR photos)
# that training never zooms into: evaluation, predict and export do not crop them either.
WHOLE_IMAGE_DATA = ("digits", "cifar10", "cifar100")


def default_preprocessing(name: str, img_size: int, weights: PretrainedCfg | None = None) -> PretrainedCfg:
    """How a new run on ``name`` prepares images: as its ``weights`` expect (their mean, std,
    interpolation and crop), else ours at ``img_size`` (:meth:`PretrainedCfg.for_size`); never a
    crop for :data:`WHOLE_IMAGE_DATA`."""
    cfg = weights or PretrainedCfg.for_size(img_size)
    return replace(cfg, crop_pct=1.0) if name.lower() in WHOLE_IMAGE_DATA else cfg


def build_datasets(
    name: str,
    data_dir: str | os.PathLike | None = None,
    img_size: int = 32,
    randaugment: tuple[int, int] | None = None,
    hflip: bool | None = None,
    preprocessing: PretrainedCfg | None = None,
    train: bool = True,
    augment: bool = True,
) -> DataBundle:
    """Build train/val datasets for ``name`` (one of :data:`DATASETS`).

    ``randaugment`` is ``(num_ops, magnitude)`` for the train split only. ``hflip=None`` means the
    data set's default: on for imagefolder/CIFAR, off for digits (a mirrored digit is another
    symbol). ``data_dir`` is ignored for digits (it ships inside scikit-learn). ``preprocessing``:
    the mean, std, interpolation and evaluation crop of the weights trained on (default:
    :func:`default_preprocessing`). ``train=False``, for evaluation alone: the bundle's ``train`` is
    None, an image folder's ``train/`` is not scanned (its class folders still name the classes), and
    shards or a Hugging Face dataset need no train split; digits and CIFAR are cheap to build whole.
    ``augment=False``: the training images prepared as the evaluation's, without the random crop and flip
    (and refused with ``randaugment``).
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")
    _check_img_size(img_size)
    check_randaugment(randaugment)
    if randaugment is not None:
        randaugment = (int(randaugment[0]), int(randaugment[1]))
        if not augment:
            raise DataError("randaugment augments the training images, which augment=False prepares as the "
                            "evaluation's; give one of them")

    cfg = preprocessing or default_preprocessing(key, img_size)
    if key == "digits":
        return _build_digits(img_size, bool(hflip) and augment, randaugment, cfg)

    hflip = True if hflip is None else bool(hflip)
    if not augment:  # (the Section 2.2 study's)
        train_tf = eval_transform(img_size, cfg)
    elif key in _CIFAR:
        train_tf = _cifar_train_transform(img_size, hflip, randaugment, cfg)
    else:
        train_tf = train_transform(img_size, cfg, hflip, randaugment)
    if data_dir is None:
        raise DataError(f"data set '{key}' needs a data directory; pass --data-dir DIR")
    if key in ("webdataset", "hf"):  # shards or a Hugging Face dataset: coatnet.data_shards
        from . import data_shards

        build = data_shards.build_webdataset if key == "webdataset" else data_shards.build_hf
        return build(str(data_dir), train_tf, eval_transform(img_size, cfg), train=train)
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory '{root}' does not exist or is not a folder; check the path")
    if key == "imagefolder":
        return _build_imagefolder(root, img_size, train_tf, cfg, with_train=train)
    return _build_cifar(key, root, img_size, train_tf, cfg)
