"""Names and messages from outside (file and class names, errors that quote them) as one line of
valid UTF-8, for figures, JSON files and the terminal alike; and the JSON every file and ``--json``
output is written as."""

from __future__ import annotations

import json
import math
import unicodedata


def json_text(value, **kwargs) -> str:
    """``json.dumps`` of ``value`` (``kwargs`` as its), with every float that is not finite (a loss
    that diverged: NaN, inf) written as null. Python's own NaN and Infinity are no JSON: strict
    readers (jq, JavaScript's JSON.parse, serde) refuse the whole file for them. Every JSON the
    package writes goes through here, so that each says a missing number the same way."""
    try:
        return json.dumps(value, allow_nan=False, **kwargs)
    except ValueError:  # a non-finite float somewhere (rare): only then is the value walked
        return json.dumps(_finite(value), allow_nan=False, **kwargs)


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def printable(name: str) -> str:
    """``name`` as valid UTF-8 on one line, for figures, JSON files and the terminal.

    Folder names that are not UTF-8 are read with surrogate escapes (``os.fsdecode``), which
    fonts cannot draw and strict JSON readers refuse: their bytes are shown as ``\\xNN``. Control
    characters and line separators (a newline in a file name) are escaped too (``\\n``), so that a
    name stays one line of an output or an error; the rest is shown as it is, also what
    ``str.isprintable`` refuses (an ideographic space, a zero-width joiner).
    """
    try:
        text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name gives, e.g. from a hand-written config.json
        text = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in text)
