"""Where log records go. A long dolly command keeps the screen for what a person reads (stage
headers, one progress bar per long stage, tables, the final panel) and sends every library's log
records (Ray, Ray Data, Serve, DeepSpeed, transformers, Python warnings) to one file, whose path it
prints at the start. What a person must act on reaches the screen as dolly's own message.

Libraries attach console handlers of their own, at import or when they start (ray.init, serve.run):
`reroute` moves them to the file, and the code that starts such a library calls it afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("dolly")
_file: logging.FileHandler | None = None


def to_file(path: Path) -> Path:
    """Send every log record of this process to `path` from now on (warnings too)."""
    global _file
    path.parent.mkdir(parents=True, exist_ok=True)
    if _file is not None:
        logging.getLogger().removeHandler(_file)
    _file = logging.FileHandler(path, encoding="utf-8")
    _file.setLevel(logging.INFO)
    _file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(_file)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    # transformers' and the Hub's tqdm bars (weights loading, downloads) write to the terminal
    # directly, not through logging; the stages draw their own progress.
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    reroute()
    return path


def reroute() -> None:
    """Loggers that print to the console print to the log file instead; nothing without `to_file`."""
    if _file is None:
        return
    manager = logging.root.manager
    for found in [logging.getLogger(), *(manager.loggerDict[name] for name in list(manager.loggerDict))]:
        if not isinstance(found, logging.Logger):
            continue  # a placeholder of a logger not created yet
        console = [h for h in found.handlers if _prints(h)]
        for handler in console:
            found.removeHandler(handler)
        if console:
            found.propagate = True


@contextlib.contextmanager
def off_screen() -> Iterator[None]:
    """While this runs, what is printed to stdout goes to the log file: Ray's driver prints Ray's
    notices there directly, not through logging (as Serve shuts down: "(raylet) Task
    ServeController.graceful_shutdown failed ... will be retried"), which no one needs to act on."""
    if _file is None:
        yield
        return
    with contextlib.redirect_stdout(_file.stream):
        yield


def _prints(handler: logging.Handler) -> bool:
    """A handler that writes to the terminal (Ray's writes to whatever sys.stderr is when it emits)."""
    if isinstance(handler, logging.FileHandler) or not isinstance(handler, logging.StreamHandler):
        return False
    return (
        handler.stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) or type(handler).__name__ == "PlainRayHandler"
    )
