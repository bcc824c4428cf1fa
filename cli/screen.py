"""A long command's screen: its own output on the terminal, and every library's log records in a
file named at the start (contract/logs.py)."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from rich.console import Console

from contract import logs, runs

LOG_DIR = runs.LOGS


def log_to_file(command: str, console: Console | None = None) -> Path:
    """Library logs of this command to runs/logs/<command>-<time>.log, said on the screen."""
    path = (LOG_DIR / f"{command}-{datetime.datetime.now():%Y%m%d-%H%M%S}.log").absolute()
    logs.to_file(path)
    import torch

    if not torch.cuda.is_available():
        # DeepSpeed's detection otherwise warns on the terminal, at import and in every worker,
        # that it found no GPU; said this way, it uses the CPU without a word.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    (console or Console()).print(f"[dim]Library logs: {path}[/]", highlight=False)
    return path
