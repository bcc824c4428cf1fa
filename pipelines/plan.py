"""What crosses the driver/worker boundary of a training run, typed: the plan the driver works out
before any worker starts, and the state a checkpoint carries so a restarted worker group goes on
where it left off."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from pipelines.flops import RunEstimate


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataFacts(_Record):
    """The data a run trained on, written into its export's training facts."""

    dir: str
    manifest_sha256: str  # of manifest.json: which preparation, exactly
    source_fingerprint: str
    tokenizer_fingerprint: str
    train_rows: int
    packed: bool


class TrainPlan(_Record):
    total_steps: int
    micro_batches_per_epoch: int
    run_uri: str  # storage_path/run_name: where the run's checkpoints are
    n_params: int
    trainable_params: int
    peak_flops: float | None  # FLOP/s of one device at the run's precision, for MFU; None: unknown
    estimate: RunEstimate | None  # the run's time and GPU-hours before it started; None: no peak to price it at
    hyperparameters: dict  # the TrainConfig, for the metrics sinks
    data: DataFacts


class Resume(_Record):
    checkpoint: str
    step: int
    workers: int  # that wrote the checkpoint; another number than the run's means it was converted


class TrainState(_Record):
    """Saved in every checkpoint (DeepSpeed's client_state) and restored with it."""

    step: int = 0
    # Training rows consumed, all workers together, in the run's data order: a resume skips as many,
    # with any number of workers.
    rows: int = 0
    tokens: int = 0
    resumes: list[Resume] = []
    unverified_checkpoints: int = 0  # checkpoints that failed verification and were not reported
