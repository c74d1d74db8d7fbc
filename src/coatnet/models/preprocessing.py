"""What a model's weights expect of an image: ``PretrainedCfg``, and the transforms built from it.

Weights are trained on images prepared one way (resized with some interpolation, cropped, scaled by
a mean and std); fed images prepared another way, they lose accuracy without any error. So every
model carries a :class:`PretrainedCfg` (``model.pretrained_cfg``, timm's name) beside its weights:
``save_pretrained`` and training checkpoints write it into ``config.json``, loading reads it back,
and ``coatnet eval``/``predict``/``export`` and :func:`data_transforms` follow it.

- A model without weights, and what ``coatnet train`` trains, gets ours: ImageNet's mean and std,
  bilinear resize and the usual 0.875 centre crop (no crop below 64 px, where it would cut into an
  already tiny image).
- timm's weights come with timm's: mean and std 0.5, bicubic, crop 0.95 for the rw models, read from
  the repository's ``config.json`` when fetched from the Hub (``timm_convert.timm_pretrained_cfg``
  holds timm's defaults for a bare file).

The input size is the model's own (``model.config.img_size``), so a model built at another size than
its weights were trained at is fed at the size it was built for.
"""

from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Annotated, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from torchvision.transforms import v2

from ..validate import Range, check_fields

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Interpolation = Literal["bilinear", "bicubic", "nearest"]
CropPct = Annotated[float, Range(0.1, 1)]  # below, the resize would be 10x the input size for nothing
_MIN_SIZE_FOR_CROP = 64  # below it, evaluation keeps the whole image


@dataclass(frozen=True)
class PretrainedCfg:
    """How to prepare an image for the weights (timm's ``pretrained_cfg`` fields of the same names).

    ``crop_pct``: the centre crop's share of the resized image (the image is resized to
    ``size / crop_pct``, then cropped to ``size``); ``crop_mode`` ``"center"`` resizes the shorter
    side and keeps the aspect ratio, ``"squash"`` resizes both sides (timm's 384 px fine-tunes).
    ``label_names``: one name per output, when known. ``input_size``: (channels, height, width) of
    the model it was read from (``model.pretrained_cfg``), never saved: a model is fed at its own size.

    timm's own code reads it as the dict timm's models carry (``get`` and ``[]``), so
    ``timm.data.resolve_model_data_config(model)`` and ``create_transform`` work on our models.
    """

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: Interpolation = "bilinear"
    crop_pct: CropPct = 0.875
    crop_mode: Literal["center", "squash"] = "center"
    label_names: tuple[str, ...] | None = None
    input_size: tuple[int, int, int] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_fields(self)
        # Pixels are scaled to [0, 1] before they are normalised: a mean outside it, or a std that
        # blows them past float32 (or 0-255 values), would give garbage logits without an error.
        for name, low in (("mean", 0.0), ("std", 1e-3)):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and len(value) == 3 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= 1 for v in value)):
                raise ValueError(f"{name} must be 3 numbers (one per channel) from {low:g} to 1, on pixels scaled to "
                                 f"[0, 1] (divide 0-255 values by 255), got {value!r}")
        names = self.label_names
        if names is not None and not (isinstance(names, tuple) and all(isinstance(n, str) for n in names)):
            raise ValueError(f"label_names must be a list of strings (one per output) or null, got {names!r}")

    @classmethod
    def for_size(cls, img_size: int, **fields_) -> PretrainedCfg:
        """Ours at ``img_size``: no crop below 64 px."""
        return cls(**({"crop_pct": 1.0} if img_size < _MIN_SIZE_FOR_CROP else {}) | fields_)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k != "input_size"}

    def __repr__(self) -> str:
        # ImageNet's 1000 class names would fill a screen (13 kB) wherever a model's cfg is printed
        def shown(name: str, value) -> str:
            if name == "label_names" and value is not None and len(value) > 6:
                return f"<{len(value)} names: {', '.join(map(repr, value[:3]))}, ..., {value[-1]!r}>"
            return repr(value)

        return f"PretrainedCfg({', '.join(f'{f.name}={shown(f.name, getattr(self, f.name))}' for f in fields(self))})"

    @classmethod
    def from_dict(cls, data: dict) -> PretrainedCfg:
        """Ours as written by :meth:`to_dict`, or timm's ``pretrained_cfg`` (its other keys ignored)."""
        known = {f.name for f in fields(cls)} - {"input_size"}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known and v is not None}
        return cls(**_one_per_colour(values))

    def get(self, key: str, default=None):
        """The field ``key`` as timm reads its ``pretrained_cfg`` dicts; ``default`` for the keys
        of timm's that have no field here (``test_input_size``, ``num_classes``, ...) and unset ones."""
        value = getattr(self, key) if key in {f.name for f in fields(self)} else None
        return default if value is None else value

    def __getitem__(self, key: str):
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def keys(self) -> list[str]:
        """The fields that are set, as the keys of timm's dict (so ``dict(cfg)``, ``"mean" in cfg`` and
        ``cfg.items()`` work as on timm's models: timm's ``apply_test_time_pool`` asks ``in``)."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def items(self) -> list[tuple[str, object]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def __iter__(self):
        return iter(self.keys())

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and key in self.keys()

    def override(self, values: dict) -> PretrainedCfg:
        """This preprocessing with the fields ``values`` gives (not None), e.g. command-line flags."""
        given = {f.name: values.get(f.name) for f in fields(self) if f.name not in ("label_names", "input_size")}
        # timm's overlay for a grey model gives its one channel's, as its config.json does
        return replace(self, **_one_per_colour({k: tuple(v) if isinstance(v, list) else v for k, v in given.items()
                                                if v is not None}))

    def channel_stats(self, in_chans: int) -> tuple[list[float], list[float]]:
        """Mean and std for a model of ``in_chans`` channels: ours, or for a grey model their averages
        (its input conv holds the RGB filters summed: ``fit_input_channels``)."""
        if in_chans == 3:
            return list(self.mean), list(self.std)
        return [sum(self.mean) / 3] * in_chans, [sum(self.std) / 3] * in_chans

    def with_classes(self, num_classes: int, names=None) -> PretrainedCfg:
        """This preprocessing for a head of ``num_classes`` outputs named ``names``; names that do not
        fit the head (a replaced classifier) are dropped."""
        names = tuple(names) if names is not None else self.label_names
        return replace(self, label_names=names if names is not None and len(names) == num_classes else None)


def _one_per_colour(values: dict) -> dict:
    """``values`` with a one-number mean or std (timm writes one for a grey model's one channel) given to each
    of the 3 colours, as the fields hold them (:meth:`PretrainedCfg.channel_stats` averages them back)."""
    return values | {key: values[key] * 3 for key in ("mean", "std")
                     if isinstance(values.get(key), tuple) and len(values[key]) == 1}


def imagenet_class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names, from torchvision's package (no download)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def class_names(model: nn.Module) -> list[str]:
    """One name per output: the weights' own, else the indices (a new or replaced head)."""
    names = model.pretrained_cfg.label_names
    return list(names) if names is not None else [str(i) for i in range(model.config.num_classes)]


def _interpolation(cfg: PretrainedCfg) -> v2.InterpolationMode:
    return v2.InterpolationMode(cfg.interpolation)


def normalize(cfg: PretrainedCfg, in_chans: int = 3) -> list[v2.Transform]:
    """The common tail: uint8 image -> float32 plain tensor, scaled by the weights' mean and std."""
    mean, std = cfg.channel_stats(in_chans)
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor()]


EXIF_ORIENTATION = 0x0112  # the EXIF tag of how a stored image is turned for showing


def exif_orientation(image: Image.Image) -> int:
    """How ``image`` is turned for showing (EXIF), 1 (as stored) where its EXIF block cannot be read: damaged
    metadata (a camera's or an editor's) leaves the pixels readable, as viewers show them. PIL reads a JPEG's
    own leniently, but a copy's (``convert``) strictly, raising."""
    try:
        return image.getexif().get(EXIF_ORIENTATION, 1)
    except (SyntaxError, ValueError, OSError, struct.error):
        return 1


class PixelRangeError(ValueError):
    """Pixels of 32 bits or floats: no range to scale them to 8 bits from."""


def as_shown(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """A PIL image as a viewer shows it, in ``mode`` ("RGB" or "L"), decoded: turned upright as its
    EXIF orientation says (a phone's photo is stored turned), 16-bit pixels scaled to 8 bits (convert()
    would clip them to white), palette and CMYK converted, transparent pixels on white (as a page shows
    them: convert() would drop the alpha, as timm does, and show the colours transparency hides,
    often black)."""
    if exif_orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "F" or image.mode.startswith("I"):  # one channel of 16/32-bit integers or floats
        wide = np.asarray(image, dtype=np.float64)
        if image.mode == "F" or wide.min() < 0 or wide.max() > 65535:  # refused, not guessed
            raise PixelRangeError(f"its {'float' if image.mode == 'F' else '32-bit integer'} pixels have no range "
                                  f"to scale from; save it as an 8- or 16-bit image")
        # 16-bit files open as "I;16*", or as "I" for a PGM (scaled to 0..65535), a signed 16-bit TIFF or,
        # before Pillow 10.1, a PNG; another "I" image (a 32-bit TIFF, convert("I")) within 0..255 may hold
        # 8-bit values as well as a dark 16-bit image: /257 would make the first black
        sixteen = image.format in ("PNG", "PPM") or image.format == "TIFF" and image.tag_v2.get(258) in (16, (16,))
        if image.mode == "I" and not sixteen and wide.max() <= 255:
            raise PixelRangeError("its 32-bit integer pixels are all within 0..255, which may be 8-bit values or a "
                                  "nearly black 16-bit image; save it as an 8- or 16-bit image")
        image = Image.fromarray(np.rint(wide / 257).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    shown = image.convert(mode)  # a copy, decoded in full, that needs no open file
    shown.info.pop("exif", None)  # read, its turn applied: not parsed again (and its damage said again) by a transform
    return shown


class _Colour:
    """Any image to the model's channels, RGB or grey: a PIL image :func:`as_shown`, a tensor as it is
    (grey or RGB, which torchvision converts)."""

    def __init__(self, in_chans: int):
        if in_chans not in (1, 3):
            raise ValueError(f"images are prepared for models of 1 or 3 input channels, not {in_chans}; "
                             f"prepare {in_chans}-channel inputs with your own transform")
        self.mode, self.tensor = ("RGB", v2.RGB()) if in_chans == 3 else ("L", v2.Grayscale(1))

    def __call__(self, image):
        if not isinstance(image, Image.Image):
            return self.tensor(image)
        # One already as shown (a data set's, decoded by coatnet) passes as it is: no second copy per sample.
        shown = (image.mode == self.mode and "transparency" not in image.info
                 and exif_orientation(image) == 1)
        return image if shown else as_shown(image, self.mode)


def eval_transform(img_size: int | tuple[int, int], cfg: PretrainedCfg, in_chans: int = 3) -> v2.Compose:
    """Resize, centre crop and normalise an image (PIL or tensor, any size, grey or colour) as ``cfg``
    says, into ``in_chans`` channels."""
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    scaled = (int(height / cfg.crop_pct), int(width / cfg.crop_pct))
    # "squash": both sides to the crop's share; "center": the image, aspect kept, to the least size
    # that covers it (for a square, its shorter side to the square's).
    if cfg.crop_mode == "squash":
        resize = [v2.Resize(scaled, interpolation=_interpolation(cfg), antialias=True)]
    elif height == width:
        resize = [CutOverhang(scaled), v2.Resize(scaled[0], interpolation=_interpolation(cfg), antialias=True)]
    else:
        resize = [CutOverhang(scaled), ResizeToCover(scaled, _interpolation(cfg))]
    return v2.Compose([_Colour(in_chans), v2.ToImage(), *resize, v2.CenterCrop((height, width)),
                       *normalize(cfg, in_chans)])


LONGEST_COVER = 1024  # CutOverhang: how many times the covering size's longer side a resized side may be
# CutOverhang: input pixels kept past the crop's middle on each side, for the resampling filter's reach
# (bicubic's 2 pixels, upsampling a strip 1 px wide), beyond the covering size's half.
FILTER_REACH = 2


class CutOverhang(v2.Transform):
    """Cut a strip far longer than the crop down to its middle, before it is resized to cover ``size``:
    1 x 50,000,000 px would be resized to 256 x 12,800,000,000 (timm's transform runs out of memory
    there). Only a side that would be resized to over 1024 times the covering size's longer side
    (over 67 million pixels for 256 x 256) is cut, to twice its covering size and the filter's reach,
    so every image a camera makes is prepared as timm's transform prepares it. The cut keeps the
    middle exactly where it was (as many pixels cut at either end): the crop of a strip sees the same
    middle, within a resized pixel's rounding."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = size

    def transform(self, inpt, params):
        height, width = v2.functional.get_size(inpt)
        ratio = min(height / self.size[0], width / self.size[1])  # the image's pixels per resized pixel
        kept = []
        for side, cover in ((height, self.size[0]), (width, self.size[1])):
            least = max(math.ceil(2 * cover * ratio), math.ceil(cover * ratio) + 2 * FILTER_REACH)
            if side > LONGEST_COVER * max(self.size) * ratio and side > least:
                side -= 2 * ((side - least) // 2)  # an even count cut: the middle stays the middle
            kept.append(side)
        return inpt if kept == [height, width] else v2.functional.center_crop(inpt, kept)

    _transform = transform  # the name torchvision before 0.21 calls


class ResizeToCover(v2.Transform):
    """Resize, keeping the aspect ratio, to the least size that covers (height, width): the centre
    crop of a non-square input then cuts only what overhangs (timm's ``ResizeKeepRatio``)."""

    def __init__(self, size: tuple[int, int], interpolation: v2.InterpolationMode):
        super().__init__()
        self.size, self.interpolation = size, interpolation

    def transform(self, inpt, params):
        height, width = v2.functional.get_size(inpt)
        ratio = min(height / self.size[0], width / self.size[1])
        return v2.functional.resize(inpt, [round(height / ratio), round(width / ratio)],
                                    interpolation=self.interpolation, antialias=True)

    _transform = transform  # the name torchvision before 0.21 calls


def train_transform(img_size: int, cfg: PretrainedCfg, hflip: bool = True,
                    randaugment: tuple[int, int] | None = None, in_chans: int = 3) -> v2.Compose:
    """The training transform of ImageNet-style data: random resized crop, flip, RandAugment (Table 10)."""
    crop = v2.RandomResizedCrop(img_size, interpolation=_interpolation(cfg), antialias=True)
    return v2.Compose([_Colour(in_chans), v2.ToImage(), crop, *augment(hflip, randaugment), *normalize(cfg, in_chans)])


def augment(hflip: bool, randaugment: tuple[int, int] | None) -> list[v2.Transform]:
    ops: list[v2.Transform] = [v2.RandomHorizontalFlip()] if hflip else []
    if randaugment is not None:
        ops.append(v2.RandAugment(num_ops=randaugment[0], magnitude=randaugment[1]))
    return ops


def data_transforms(model: nn.Module, is_training: bool = False) -> v2.Compose:
    """The torchvision transform that prepares images for ``model`` as its weights expect (timm's
    ``create_transform(**resolve_data_config(model=model), is_training=...)``): evaluation by default, or
    with ``is_training`` the random resized crop and flip of fine-tuning, at the model's input size."""
    size, channels = model.config.img_size, model.config.in_chans
    if is_training:
        return train_transform(size[0] if size[0] == size[1] else size, model.pretrained_cfg, in_chans=channels)
    return eval_transform(size, model.pretrained_cfg, channels)
