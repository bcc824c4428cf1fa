"""The run folder: where every command writes by default, relative to the folder it is run in.
The one home of these paths; each command's settings can point anywhere else (a shared volume on
a cluster, an s3:// URI for checkpoints).

    runs/data/        `dolly data prepare`: shards, manifest, rejected records, plots
    runs/train/       `dolly train`: checkpoints (storage_path), run logs and the export (output_dir)
    runs/mlruns/      MLflow's file store (mlflow=true)
    runs/eval/        `dolly eval`: a report per model
    runs/registry/    registered models, NAME/N/, and what serving reads
    runs/feedback.db  what people wrote and rated on the chat page (SQLite)
    runs/logs/        each command's library logs
    runs/up/          `dolly up`: its data, runs, scores, API key and retrain.yaml
    runs/retrain/     `dolly retrain`: the combined corpus, its data, runs and reports
"""

from __future__ import annotations

from pathlib import Path

RUNS = Path("runs")
DATA = RUNS / "data"
TRAIN = RUNS / "train"
MLRUNS = RUNS / "mlruns"
EVAL = RUNS / "eval"
REGISTRY = RUNS / "registry"
FEEDBACK_DB = RUNS / "feedback.db"
LOGS = RUNS / "logs"
UP = RUNS / "up"
RETRAIN = RUNS / "retrain"
