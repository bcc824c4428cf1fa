"""Training's progress on the driver's screen. Ray keeps the workers' output in its log files
(cluster/connect.py), so rank 0 sends what a person reads through a Ray queue instead: each
step's loss, each logged row of metrics, and its few messages (a resume, the export). The driver
draws one bar from them (step, loss, tokens/s, time left) with the rows as lines above it; off a
terminal (CI, a pipe) only the lines, plainly.
"""

from __future__ import annotations

import threading
from queue import Empty

import ray
from ray.util.queue import Queue
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressFeed:
    """Rank 0's end: what it puts on the queue for the driver's `TrainProgress`."""

    def __init__(self, queue: Queue):
        self._queue = queue

    def start(self, step: int) -> None:
        self._queue.put({"kind": "start", "step": step})

    def step(self, step: int, loss: float) -> None:
        self._queue.put({"kind": "step", "step": step, "loss": loss})

    def metrics(self, step: int, metrics: dict) -> None:
        self._queue.put({"kind": "metrics", "step": step, "metrics": metrics})

    def say(self, text: str) -> None:
        self._queue.put({"kind": "say", "text": text})


class TrainProgress:
    """The driver's end, around `trainer.fit()`: `feed` goes to rank 0 in the train loop's config."""

    def __init__(self, console: Console, total_steps: int, description: str = "train"):
        # No CPU of its own: on a small machine every CPU is a training worker's or Ray Data's.
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._console = console
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps  loss {task.fields[loss]}  {task.fields[rate]} tokens/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._task = self._progress.add_task(description, total=total_steps, loss="-", rate="-")
        self._total = total_steps
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="train-progress", daemon=True)

    @property
    def feed(self) -> ProgressFeed:
        return ProgressFeed(self.queue)

    def __enter__(self) -> TrainProgress:
        self._progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._progress.stop()
        ray.kill(self.queue.actor)

    def _drain(self) -> None:
        while True:
            try:
                event = self.queue.get(timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            self._show(event)

    def _show(self, event: dict) -> None:
        kind = event["kind"]
        if kind == "start":  # a resumed run starts where its checkpoint was
            self._progress.reset(self._task, completed=event["step"], total=self._total)
        elif kind == "step":
            self._progress.update(self._task, completed=event["step"], loss=f"{event['loss']:.3f}")
            if event["step"] >= self._total:
                # The last step: its clock stops here, not after the final evaluation and export.
                self._progress.stop_task(self._task)
        elif kind == "metrics":
            metrics = event["metrics"]
            if "tokens_per_s" in metrics:
                self._progress.update(self._task, rate=f"{metrics['tokens_per_s']:,.0f}")
            self._progress.console.print(
                f"step {event['step']}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float | int))
            )
        else:
            self._progress.console.print(event["text"])
