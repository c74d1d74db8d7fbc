"""Ctrl-C and SIGTERM as a stop request that cannot be lost.

Python raises KeyboardInterrupt wherever its handler happens to run. Where that is inside a hook
called from C, such as logging's after-fork hook when a data loader forks its workers, the
exception is printed ("Exception ignored in ...") and dropped, and the run goes on as if nothing
had been asked. So the request is also recorded, and a long loop asks for it at points of its own
(:func:`raise_if_requested`, training's steps), where it is raised again and not lost.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

_requested = False


def _stop(signum, frame) -> None:
    global _requested
    _requested = True
    raise KeyboardInterrupt


def raise_if_requested() -> None:
    """Raise KeyboardInterrupt where a stop was asked for and its first one was dropped."""
    if _requested:
        raise KeyboardInterrupt


@contextmanager
def stop_on_ctrl_c_and_sigterm():
    """SIGTERM (a timeout, a job scheduler) stops what runs inside as Ctrl-C does, and both are recorded.
    Only the main thread may set a handler (inside another one nothing changes), and one set outside Python
    (None) could not be put back. Ctrl-C keeps what it was given: ignored, in a job a shell put in the
    background; a handler of a program's own."""
    global _requested
    signals = [signal.SIGTERM] * (signal.getsignal(signal.SIGTERM) is not None)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signals.append(signal.SIGINT)
    ours = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _stop) for s in signals} if ours else {}
    hook = sys.unraisablehook
    # The dropped KeyboardInterrupt's "Exception ignored" traceback is not said: it is raised again
    sys.unraisablehook = lambda unraisable: None if _requested and issubclass(
        unraisable.exc_type, KeyboardInterrupt) else hook(unraisable)
    _requested = False
    try:
        yield
    finally:
        _requested = False
        sys.unraisablehook = hook
        for s, handler in previous.items():
            signal.signal(s, handler)
