"""Training metrics: what they are (throughput, MFU, memory) and where they go (console progress
bar, JSON lines, TensorBoard, MLflow), plus the loss curve drawn at the end. The FLOPs behind
MFU are counted in pipelines/flops.py.

Only rank 0 writes; the values it writes are already reduced over all ranks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import psutil
import torch

from pipelines.progress import ProgressFeed

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"


def memory_gib() -> float:
    """Peak device memory of this worker (GPU), else its resident host memory (CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


class MetricsSink:
    """Rank 0's writer: the driver's screen (`pipelines.progress`), metrics.jsonl, TensorBoard, and
    MLflow when configured."""

    def __init__(self, log_dir: Path, feed: ProgressFeed, start_step: int, params: dict, mlflow_uri: str | None):
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(log_dir / METRICS_FILE, "a")  # noqa: SIM115 (open for the run, closed by close())
        self.tensorboard = SummaryWriter(str(log_dir / "tensorboard"))
        self.feed = feed
        feed.start(start_step)
        self.mlflow = None
        if mlflow_uri:
            import mlflow

            # MLflow 3 refuses its file store unless asked (it wants a database server; the
            # file store needs nothing running and is what a single run needs).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(mlflow_uri)
            mlflow.set_experiment(params["run_name"])
            mlflow.start_run(run_name=params["run_name"])
            mlflow.log_params({k: str(v) for k, v in params.items()})
            self.mlflow = mlflow

    def progress(self, step: int, loss: float) -> None:
        self.feed.step(step, loss)

    def say(self, text: str) -> None:
        self.feed.say(text)

    def write(self, step: int, metrics: dict) -> None:
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            self.tensorboard.add_scalar(key, value, step)
        self.tensorboard.flush()
        if self.mlflow:
            self.mlflow.log_metrics(metrics, step=step)
        self.feed.metrics(step, metrics)

    def close(self, artifacts: list[Path]) -> None:
        self.tensorboard.close()
        self.jsonl.close()
        if self.mlflow:
            for path in artifacts:
                self.mlflow.log_artifact(str(path))
            self.mlflow.end_run()


def read_history(log_dir: Path) -> list[dict]:
    """The run's metrics by step; after a resume, the values of the steps it redid win."""
    path = log_dir / METRICS_FILE
    if not path.exists():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        by_step[row["step"]] = {**by_step.get(row["step"], {}), **row}
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(history: list[dict], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train_loss", "train"), ("eval_loss", "held-out")):
        points = [(row["step"], row[key]) for row in history if key in row]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "eval_loss" else None, markersize=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per response token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
