"""Typed configs of the batch pipelines. Every field is a documented lever with a default that
works; YAML files and `key=value` on the command line override them."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.records import DOLLY_CATEGORIES
from pipelines.sources import DOLLY_HUB_ID


class PrepareConfig(BaseModel):
    """`dolly data prepare`: corpus -> validated, tokenized, split Parquet shards + manifest."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(DOLLY_HUB_ID, description="Hub dataset id, local .jsonl/.json/.parquet file or folder, or s3:// / gs:// URI")
    output_dir: Path = Field(Path("runs/data"), description="where shards, manifest, rejects and plots are written")
    tokenizer: str = Field("EleutherAI/pythia-2.8b", description="base model's tokenizer: Hub id or local folder")
    model: str | None = Field(None, description="model whose config gives max_length (default: the tokenizer's folder)")
    max_length: int | None = Field(None, ge=16, description="longest example in tokens (default: from the model/tokenizer config, else 1024)")
    length_policy: Literal["drop", "truncate"] = Field("drop", description="over-length examples: drop them (as Dolly does) or truncate the response")
    categories: list[str] | None = Field(list(DOLLY_CATEGORIES), description="allowed categories; null accepts any")
    on_bad: Literal["skip", "fail"] = Field("skip", description="a malformed record: skip it (listed in rejects.jsonl) or stop the run")
    test_size: int = Field(1000, ge=0, description="held-out examples (Dolly used 200 to 1000)")
    seed: int = Field(42, description="seed of the train/test split and the training order")
    pack: bool = Field(False, description="pack several examples per training row (no attention or loss across them)")
    pack_window: int = Field(2048, ge=1, description="examples considered together when packing rows")
    block_rows: int = Field(2000, ge=1, description="records per Ray Data block: the unit of parallel work")
    cpus_per_task: float = Field(0.5, gt=0, description="logical CPUs each Ray Data task claims; fractional so data and training can share small machines")
    concurrency: int | None = Field(None, ge=1, description="most tokenization tasks at once (default: this machine's cores: more only thrash, as the tokenizer is multi-threaded)")
    force: bool = Field(False, description="prepare again even if output_dir already holds the same preparation")
