"""Names and messages from outside (file and class names, errors that quote them) as one line of
valid UTF-8, for figures, JSON files and the terminal alike."""

from __future__ import annotations

import unicodedata


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
