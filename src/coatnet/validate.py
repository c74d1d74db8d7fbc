"""Checking settings at the edges (config files, keyword arguments, command-line flags) by their types.

A frozen dataclass declares what each field admits in its annotation: a ``Literal`` of choices, a
union with ``None``, or a number with a :class:`Range` (``Annotated[int, Range(1)]``). Its
``__post_init__`` calls :func:`check_fields`, which raises one ``ValueError`` that names the field,
the value and what it should be. A new field is validated by declaring its type, not by a new ``if``.
"""

from __future__ import annotations

import argparse
import math
import types
import typing
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Annotated, Callable, Literal, Union

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Range:
    """Bounds of a number: ``low <= x <= high``, each bound strict with ``low_open`` / ``high_open``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, x: float) -> bool:
        above = self.low is None or (x > self.low if self.low_open else x >= self.low)
        below = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return above and below

    def __str__(self) -> str:
        def number(x: float) -> str:  # an int in full (a seed's 64-bit bounds), a float as short as it reads
            return str(int(x)) if isinstance(x, int) or (float(x).is_integer() and abs(x) < 1e15) else f"{x:g}"

        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {number(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {number(self.high)}")
        return " and ".join(parts)


PositiveInt = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1, high_open=True)]  # a probability that must leave something: [0, 1)


def _admits(kind, value) -> bool:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Annotated:
        return _admits(args[0], value) and all(r.admits(value) for r in args[1:] if isinstance(r, Range))
    if origin is Literal:
        return value in args
    if origin in (Union, types.UnionType):
        return any(_admits(arg, value) for arg in args)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is str:
        return isinstance(value, str)
    return True  # tuples and nested configs check themselves


def _describe(kind) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Annotated:
        bounds = " and ".join(str(r) for r in args[1:] if isinstance(r, Range))
        return f"{_describe(args[0])} {bounds}".strip()
    if origin is Literal:
        return repr(args[0]) if len(args) == 1 else "one of " + ", ".join(map(repr, args))
    if origin in (Union, types.UnionType):  # None is a setting left out (a flag not given), not a value to give
        return " or ".join(_describe(arg) for arg in args if arg is not type(None)) or "None"
    if kind is type(None):
        return "None"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(kind, str(kind))


def check_fields(obj, label: Callable[[str], str] = str) -> None:
    """Raise ValueError for the first field of dataclass ``obj`` whose value its annotation does not
    admit; ``label`` names a field in the message (e.g. as the command-line flag that sets it)."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not _admits(hints[f.name], value):
            raise ValueError(f"{label(f.name)} must be {_describe(hints[f.name])}, got {value!r}")


def flag_type(kind) -> Callable[[str], object]:
    """An argparse ``type=`` admitting what ``kind`` admits (``PositiveInt``, ...): a command-line
    flag is validated by declaring its range, and a bad value is one line naming the flag."""
    base = typing.get_args(kind)[0] if typing.get_origin(kind) is Annotated else kind

    def parse(text: str):
        try:
            value = base(text)
        except ValueError:
            value = text
        if not _admits(kind, value):
            raise argparse.ArgumentTypeError(f"must be {_describe(kind)}, got {text!r}")
        return value

    return parse


def resolve_device(name: str | None) -> torch.device:
    """The device a ``--device`` flag names (None: CUDA where it is available, else the CPU), or one
    ValueError that says what to use instead."""
    import torch  # here: importing coatnet.cli, which imports this module, must not load torch (coatnet/__init__.py)

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda":
        count = cuda
    else:  # another accelerator (mps, xpu, ...), where this torch has one
        accelerator = getattr(torch, "accelerator", None)
        count = (accelerator.device_count() if accelerator and hasattr(accelerator, "is_available")
                 and accelerator.is_available() and accelerator.current_accelerator().type == device.type else 0)
    if count == 0:
        raise ValueError(f"--device {name}: this machine has no {device.type} device; use cpu{' or cuda' * bool(cuda)}")
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: this machine has {count} {device.type} device(s)")
    return device


def slow_bfloat16(device: torch.device) -> str | None:
    """Why bfloat16 is slower than float32 on ``device``, or None: an x86 CPU without AVX512-BF16 or
    AMX converts to float32 and back around every product (on 2 cores of such a Xeon, CoAtNet-0's
    training step 2.5x and its inference 3.4x slower than float32, its bfloat16 matmul 5x)."""
    import torch

    capabilities = getattr(torch.cpu, "get_capabilities", None)  # newer torch; without it, nothing is said
    if device.type != "cpu" or capabilities is None:
        return None
    cpu = capabilities()
    if cpu.get("architecture") != "x86_64" or cpu.get("avx512_bf16") or cpu.get("amx_bf16"):
        return None
    return "this CPU has no native bfloat16 (neither AVX512-BF16 nor AMX), so it is emulated: 2-3.5x slower than float32"
