"""``coatnet export``: a model out of Python, as ONNX, TorchScript or a ``torch.export`` program.

- ``onnx``: ``torch.onnx.export`` with ``dynamo=False``, the TorchScript-based exporter, opset 17.
  The dynamo exporter needs ``onnxscript``, which the ``export`` extra does not install; the
  TorchScript-based one needs only ``onnx``. Input ``images``, output ``logits`` (a feature
  extractor's: one per map, named as its ``feature_info`` names their modules, ``stages.0`` ...).
- ``torchscript``: ``torch.jit.trace``; the trace reads the batch size from its input, so it takes
  any batch size with or without ``dynamic_batch``.
- ``exported``: ``torch.export.export`` saved with ``torch.export.save`` (a ``.pt2`` file);
  ``torch.export.load(PATH).module()`` runs it.

The spatial size is fixed at export (``img_size``, default the model's own): the relative-position
bias of that grid is computed once and stored in the graph.

Each file records how to prepare an image for it, as JSON under the key ``preprocessing.json``
(:data:`PREPROCESSING_KEY`): the input size and the model's ``pretrained_cfg`` (mean, std,
interpolation, crop, class names). In ONNX it is a metadata property
(``onnxruntime.InferenceSession(...).get_modelmeta().custom_metadata_map``); in the TorchScript and
``torch.export`` files an extra file (``torch.jit.load(PATH, _extra_files=...)``,
``torch.export.load(PATH, extra_files=...)``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import glob
import io
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .checkpoint import process_alive
from .models import from_pretrained
from .models.folder import CONFIG, EMA_WEIGHTS, TIMM_WEIGHTS, TRAIN_STATE, WEIGHTS
from .models.coatnet import MAX_IMG_SIZE, FeatureExtractor
from .text import json_text

PREPROCESSING_KEY = "preprocessing.json"


def export_model(model_or_path: nn.Module | str | Path, format: str, output: str | Path,
                 img_size: int | tuple[int, int] | None = None, batch_size: int = 1, dynamic_batch: bool = False,
                 overwrite: bool = False) -> Path:
    """Export a model, or the one saved in a ``save_pretrained`` folder or training checkpoint.

    The example input is ``batch_size`` x C x ``img_size``, a side or (height, width), in the model's
    dtype; with ``dynamic_batch`` the ONNX and ``exported`` graphs take any batch size. An existing
    ``output`` is replaced only with ``overwrite``. Returns the path written.
    """
    if format not in _EXPORTERS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(_EXPORTERS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be an integer of at least 1, got {batch_size!r}")
    # Path() drops a trailing slash: "exports/" would become a file named exports, where a folder was meant.
    named_a_folder = isinstance(output, str) and (output.endswith(("/", os.sep)) or
                                                  os.path.basename(output) in (".", ".."))
    output = Path(output)
    # Refused before the export, which would only fail (or overwrite) at its end, at the rename.
    if output.is_dir() or named_a_folder:
        raise ValueError(f"output {str(output)!r} is a folder; give a file path like "
                         f"{str(output / ('model' + _SUFFIXES[format]))!r}")
    real = Path(os.path.realpath(output))  # the file meant, however the path reaches it (new/../, links)
    if real.name in MODEL_FOLDER_FILES and (real.parent / CONFIG).is_file():
        # --overwrite means an earlier export, not a model's weights or config (the checkpoint's own, often)
        raise ValueError(f"output {str(output)!r} is a file of the model folder {str(real.parent)!r}, which it "
                         f"would break; give another path")
    if output.exists() and not output.is_file():  # /dev/null, a FIFO: the export would be renamed over it
        raise ValueError(f"output {str(output)!r} is not a regular file (a device, a pipe or a socket), which the "
                         f"export would replace, even with --overwrite; give a file path")
    # A link to nothing exists too: exists() follows it, and the final link() would find its name taken.
    if (output.exists() or output.is_symlink()) and not overwrite:
        raise ValueError(f"output {str(output)!r} exists; give another path, or overwrite it (--overwrite, "
                         f"overwrite=True)")
    blocking = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"{str(blocking)!r} is a file, so it cannot hold {str(output)!r}; give an output in a folder")
    if format == "exported" and output.suffix != ".pt2":  # torch.export.load warns at every load otherwise
        raise ValueError(f"torch.export's files end in .pt2; give an output like {str(output.with_suffix('.pt2'))!r}")
    if _FORMAT_OF_SUFFIX.get(output.suffix.lower(), format) != format:  # a reader would take it for the other
        raise ValueError(f"{output.suffix} is the suffix of {_FORMAT_OF_SUFFIX[output.suffix.lower()]} files, not of "
                         f"{format} ones; give an output like {str(output.with_suffix(_SUFFIXES[format]))!r}")
    model = model_or_path if isinstance(model_or_path, nn.Module) else from_pretrained(model_or_path)
    # torch.compile's wrapper: the tracers of ONNX and TorchScript refuse it ("FX to torch.jit.trace a
    # dynamo-optimized function"); the model it wraps, whose weights it shares, is what is exported
    model = model._orig_mod if isinstance(getattr(model, "_orig_mod", None), nn.Module) else model
    if format == "exported" and any(t.is_inference() for t in model.state_dict().values()):
        raise ValueError("the model's weights are inference tensors (made under torch.inference_mode), which "
                         "torch.export cannot trace; build or load the model outside inference_mode, or export "
                         "it with format 'onnx' or 'torchscript'")
    if isinstance(img_size, (tuple, list)) and len(img_size) != 2:
        raise ValueError(f"image size {img_size!r}: give one side, or (height, width)")
    if img_size is None:
        height, width = model.config.img_size
    else:  # a wrong size fails here, in one line, not deep inside a tracer
        height, width = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        check_img_size(model, height)
        check_img_size(model, width)
    # torch.export fixes a dimension of size 1 to a constant: a dynamic batch needs an example of 2.
    batch = max(batch_size, 2) if dynamic_batch and format == "exported" else batch_size
    weight = next(model.parameters())
    example = torch.randn(batch, model.config.in_chans, height, width, device=weight.device, dtype=weight.dtype)
    # Written in a temporary folder of its own under its own name and renamed: a failed export never
    # leaves a broken file where an earlier good one was, nor anything else, the folders it made included.
    made = [p for p in (output.parent, *output.parent.parents) if not p.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".tmp-{output.name}-"
    # Left by an export killed outright (SIGKILL); the name taken literally, since it may hold [ ] * ?
    for stale in output.parent.glob(glob.escape(prefix) + "*"):
        pid = stale.name[len(prefix):].partition("-")[0]
        if pid.isdigit() and not process_alive(int(pid)) and stale.is_dir() and \
                {p.name for p in stale.iterdir()} <= {output.name}:
            shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=output.parent)) / output.name
    except OSError as e:  # named after the folder, not after a temporary name the user never gave
        raise OSError(e.errno, f"{e.strerror} (cannot write in the output's folder)", str(output.parent)) from None
    was_training, done = model.training, False
    model.eval()
    try:
        # Found before tracing: TorchScript's writer aborts the process when the disk fills as it writes.
        need, free = sum(t.numel() * t.element_size() for t in model.state_dict().values()), \
            shutil.disk_usage(output.parent).free
        if free < need:
            raise OSError(errno.ENOSPC, f"No space left on device ({free / 2**20:.1f} MiB free, the weights alone "
                                        f"take {need / 2**20:.1f} MiB)", str(output))
        # The input checks and the table-resize test read shapes as Python values; the tracer warns
        # that they become constants, which they are for a fixed spatial size.
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            _EXPORTERS[format](model, example, tmp, dynamic_batch, _preprocessing(model, (height, width)))
        _put(tmp, output, overwrite)
        done = True
    except OSError as e:  # a full disk, a quota: named after the output, not the temporary file
        raise OSError(e.errno, e.strerror or str(e), str(output)) from None
    finally:
        model.train(was_training)
        shutil.rmtree(tmp.parent, ignore_errors=True)
        for folder in made if not done else ():  # deepest first; only if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
    return output


def _put(tmp: Path, output: Path, overwrite: bool) -> None:
    """Move the finished file to ``output``; without ``overwrite``, never over a file that appeared
    there while exporting (a hard link fails if the name is taken)."""
    if overwrite:
        os.replace(tmp, output)
        return
    try:
        os.link(tmp, output)
        return
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links: as near as it allows
        if not output.exists():
            os.replace(tmp, output)
            return
    raise ValueError(f"output {str(output)!r} appeared while exporting, and is kept; give another path, or "
                     f"overwrite it (--overwrite, overwrite=True)")


def check_img_size(model: nn.Module, img_size: int) -> None:
    """Refuse an input side ``model`` cannot take, in one line, before a tensor of that size exists.

    The rule of ``model.check_input`` (a multiple of the model's stride), applied to an empty
    meta-device batch, and the bound :data:`MAX_IMG_SIZE`.
    """
    stride = model.config.stride
    if isinstance(img_size, bool) or not isinstance(img_size, int) or not 0 < img_size <= MAX_IMG_SIZE:
        raise ValueError(f"image size {img_size!r}: give an integer multiple of the model's stride {stride} from "
                         f"{stride} to {MAX_IMG_SIZE // stride * stride}")
    model.check_input(torch.empty(1, model.config.in_chans, img_size, img_size, device="meta"))


def check_img_size_flag(model: nn.Module, size: int) -> None:
    """``--img-size SIDE`` of eval, predict and export, as :func:`check_img_size`, naming the flag's values
    near it: images are resized to it, so ``model.check_input``'s advice, to resize or crop them, does not apply."""
    stride = model.config.stride
    if type(size) is int and 0 < size <= MAX_IMG_SIZE and size % stride:
        near = [s for s in (size // stride * stride, (size // stride + 1) * stride) if stride <= s <= MAX_IMG_SIZE]
        raise ValueError(f"--img-size {size} is not a multiple of the model's stride {stride}; pass "
                         + " or ".join(f"--img-size {s}" for s in near))
    check_img_size(model, size)


def _preprocessing(model: nn.Module, size: tuple[int, int]) -> str:
    """What a server must do to an image before the graph (JSON): the model's ``pretrained_cfg`` and
    the input size, recorded in the file as :data:`PREPROCESSING_KEY`."""
    mean, std = model.pretrained_cfg.channel_stats(model.config.in_chans)
    return json_text(model.pretrained_cfg.to_dict() | dict(input_size=[model.config.in_chans, *size], mean=mean,
                                                            std=std))


def _onnx(model: nn.Module, example: torch.Tensor, output: Path, dynamic_batch: bool, preprocessing: str) -> None:
    try:
        import onnx
    except ImportError:
        raise ValueError("ONNX export needs the onnx package: pip install 'coatnet[export]'") from None
    from google.protobuf.message import EncodeError

    # A protobuf message holds at most 2 GiB: CoAtNet-5..7's weights alone are more in float32.
    too_big = (f"an ONNX file holds at most 2 GiB and {model.config.name}'s graph at "
               f"{example.shape[-2]}x{example.shape[-1]} is more; export it with --format exported")
    if sum(t.numel() * t.element_size() for t in model.state_dict().values()) >= 2**31:
        raise ValueError(too_big)
    if example.dtype == torch.bfloat16:  # the file would be written, and then not load
        raise ValueError("onnxruntime runs no bfloat16 convolutions: export the float32 model (model.float()), "
                         "or a bfloat16 one with format 'exported' or 'torchscript'")
    if example.dtype == torch.float64:  # the exporter fails on the attention's mask, its whole graph printed first
        raise ValueError("the ONNX exporter takes no float64 attention: export the float32 model (model.float()), "
                         "or a float64 one with format 'exported' or 'torchscript'")
    # A feature extractor's maps are named as its feature_info names their modules ("stem", "stages.0", ...)
    outputs = model.feature_info.module_name() if isinstance(model, FeatureExtractor) else ["logits"]
    axes = {name: {0: "batch"} for name in ("images", *outputs)} if dynamic_batch else None
    torch.onnx.export(model, (example,), str(output), dynamo=False, opset_version=17, input_names=["images"],
                      output_names=outputs, dynamic_axes=axes)
    try:
        graph = onnx.load(str(output))
        onnx.helper.set_model_props(graph, {PREPROCESSING_KEY: preprocessing})
        onnx.save(graph, str(output))
    except EncodeError:  # the weights fit, but not with the relative biases the graph stores
        raise ValueError(too_big) from None


@torch.jit.script_if_tracing
def _exported_size(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if x.dim() != 4 or x.shape[-2] != height or x.shape[-1] != width:
        raise ValueError("this model was exported for (N, C, " + str(height) + ", " + str(width) + ") batches, got "
                         + str(x.shape) + "; resize the images as its preprocessing.json says")
    return x


class _FixedSize(nn.Module):
    """The model behind a check of the input's size that the trace keeps (scripted into it). A trace
    fixes the relative-position biases of the grid it saw; without the check, a smaller input would
    run on them without a word, and give wrong logits."""

    def __init__(self, model: nn.Module, height: int, width: int):
        super().__init__()
        self.model, self.height, self.width = model, height, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(_exported_size(x, self.height, self.width))


class _Archive(io.RawIOBase):
    """The output file as torch.export's archive writer sees it (which streams into it): a write that
    fails (a full disk) is kept, to be raised once the writer is done, and what follows is dropped.
    The writer must not see it fail: it would throw a second error from its destructor, aborting the
    process (given a path too)."""

    def __init__(self, file: io.BufferedWriter):
        super().__init__()
        self.file, self.error = file, None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def write(self, data) -> int:
        if self.error is None:
            try:
                self.file.write(data)
            except OSError as e:
                self.error = e
        return len(data)

    @staticmethod
    @contextlib.contextmanager
    def at(output: Path):
        with open(output, "wb") as file:
            archive = _Archive(file)
            yield archive
        if archive.error is not None:
            raise archive.error


def _torchscript(model: nn.Module, example: torch.Tensor, output: Path, dynamic_batch: bool,
                 preprocessing: str) -> None:
    checked = _FixedSize(model, *example.shape[-2:])
    # Given a path: given a file, torch.jit.save builds the whole archive in memory first (twice the
    # weights). The free space is checked before (export_model); a disk filled meanwhile aborts.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream; asking for it is a choice
        torch.jit.save(torch.jit.trace(checked, example, check_trace=False), str(output),
                       _extra_files={PREPROCESSING_KEY: preprocessing})


def _exported(model: nn.Module, example: torch.Tensor, output: Path, dynamic_batch: bool,
              preprocessing: str) -> None:
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    program = torch.export.export(model, (example,), dynamic_shapes=shapes)
    with _Archive.at(output) as f:
        torch.export.save(program, f, extra_files={PREPROCESSING_KEY: preprocessing})


# what a model folder or checkpoint reads (a timm repository downloaded into a folder: its pytorch_model.bin too)
MODEL_FOLDER_FILES = tuple(dict.fromkeys((CONFIG, WEIGHTS, EMA_WEIGHTS, TRAIN_STATE, *TIMM_WEIGHTS)))
_EXPORTERS = {"onnx": _onnx, "torchscript": _torchscript, "exported": _exported}
_SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "exported": ".pt2"}
# Suffixes that name one format's files (TorchScript's .pt and .ts, as the README writes them): an export of
# another format is refused under them (an ONNX file as m.pt was read as corrupt weights by coatnet predict)
_FORMAT_OF_SUFFIX = {".onnx": "onnx", ".pt2": "exported", ".pt": "torchscript", ".ts": "torchscript"}


def run_export(args: argparse.Namespace) -> int:
    """``coatnet export``: a checkpoint or ``save_pretrained`` folder in, one file out, its preprocessing
    (overridden by the flags given) recorded in it."""
    from .evaluate import _one_process, _say_which, load_for_inference  # which imports this module

    _one_process(args)
    ckpt, model = load_for_inference(args)
    if ckpt.path.is_file() and os.path.realpath(args.output) == os.path.realpath(ckpt.path):
        # --overwrite means an earlier export (TorchScript's .pt is a weights file's suffix too), not the weights
        raise ValueError(f"output '{args.output}' is the weights file the model is read from; give another path")
    if args.img_size is not None:
        check_img_size_flag(model, args.img_size)
    path = export_model(model, args.format, args.output, img_size=args.img_size, batch_size=args.batch_size,
                        dynamic_batch=args.dynamic_batch, overwrite=args.overwrite)
    _say_which(ckpt, args)  # a run directory stands for its `last`, not its `best`: named, as eval and predict do
    print(f"wrote {path} ({args.format}{', any batch size' if args.dynamic_batch else ''})")
    return 0
