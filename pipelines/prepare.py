"""The corpus recipe: read -> validate -> format + tokenize -> split -> (pack) -> Parquet shards.

Runs on Ray Data, so the same code prepares 15k records on a laptop or millions on a cluster: the
Ray its caller connected to (`cluster.connect.ray_session`).
Every record read ends up kept or rejected with a reason; the counts are checked to reconcile
before anything is reported.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import ray
from rich.console import Console

from contract.errors import UserError
from contract.models import load_tokenizer, max_length_for, special_token_ids
from contract.records import Reject
from pipelines import manifest as mf
from pipelines.configs import PrepareConfig
from pipelines.packing import pack_batch
from pipelines.records import split_records
from pipelines.report import plot_token_lengths, print_report
from pipelines.sources import resolve_source
from pipelines.tokenize import process_batch

REJECTS_NAME = "rejects.jsonl"
PLOT_NAME = "token_lengths.png"
SINGLE_TASK_SORT_BYTES = 512 * 1024**2
SHARD_COLUMNS = ["input_ids", "labels", "category", "source", "line", "n_tokens", "truncated"]


class BadRecordsError(UserError):
    """--on-bad fail met malformed records."""


@dataclass
class PrepareResult:
    output_dir: Path
    manifest: dict
    reused: bool

    @property
    def data(self) -> mf.VerifiedData:
        """The shards as the next stage takes them: just written, or verified before reuse."""
        return mf.VerifiedData(self.output_dir, self.manifest)


def prepare(config: PrepareConfig, console: Console | None = None) -> PrepareResult:
    console = console or Console()
    out = Path(config.output_dir)
    started = time.perf_counter()

    with console.status("Resolving the source and hashing it"):
        source = resolve_source(config.source)
    console.print(
        f"[bold]Source[/] {config.source} ({source.kind}, {len(source.files)} file(s), sha256 {source.fingerprint[:12]})"
    )
    tokenizer = load_tokenizer(config.tokenizer)
    max_length, max_length_from = (
        (config.max_length, "--max-length") if config.max_length else max_length_for(config.model or config.tokenizer, tokenizer)
    )
    fingerprints = {
        "source": source.fingerprint,
        "tokenizer": mf.tokenizer_fingerprint(tokenizer),
        "contract": mf.contract_fingerprint(),
        "config": config.model_dump(mode="json", exclude={"output_dir", "force", "block_rows", "cpus_per_task", "concurrency"}),
        "max_length": max_length,
    }
    if not config.force and (reused := _reusable(out, fingerprints, tokenizer)) is not None:
        console.print(f"[green]Reusing[/] {out}: it already holds this exact preparation (pass force=true to redo it)")
        print_report(reused, out, console)
        return PrepareResult(out, reused, reused=True)

    for stale in ("train", "test", mf.MANIFEST_NAME, REJECTS_NAME, PLOT_NAME):
        path = out / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    display = {f: source.display_name(f) for f in source.files}
    context = ray.data.DataContext.get_current()
    # A status line per stage instead of Ray Data's bars: a preparation runs several small
    # datasets, and each would draw bars (or, off a terminal, log lines) of its own. Every
    # dataset below derives from this one, and keeps the context it was made with.
    bars, context.enable_progress_bars = context.enable_progress_bars, False
    try:
        read = ray.data.read_binary_files(source.files, include_paths=True, filesystem=source.filesystem)
    finally:
        context.enable_progress_bars = bars
    with console.status("Reading, validating and tokenizing the records"):
        blocks = (
            read.flat_map(lambda row: split_records(display[row["path"]], row["bytes"]), num_cpus=config.cpus_per_task)
            .repartition(target_num_rows_per_block=config.block_rows)
            .materialize()
        )
        records = blocks.map_batches(
            process_batch,
            fn_kwargs=dict(
                tokenizer_name=config.tokenizer,
                categories=config.categories,
                max_length=max_length,
                length_policy=config.length_policy,
                seed=config.seed,
            ),
            batch_format="numpy",
            num_cpus=config.cpus_per_task,
            # No more tasks than blocks: Ray Data warns of a pool larger than its input.
            compute=ray.data.TaskPoolStrategy(size=min(config.concurrency or os.cpu_count(), blocks.num_blocks())),
        ).materialize()
        summary = records.drop_columns(["raw", "input_ids", "labels"]).to_pandas()
    counts = _count(summary)

    reject_columns = ["source", "line", "reason", "detail", "raw"]
    rejects = records.filter(expr="reason != ''").select_columns(reject_columns).take_all()
    rejects = pd.DataFrame(rejects, columns=reject_columns).sort_values(["source", "line"])
    _write_rejects(out / REJECTS_NAME, rejects)
    defects = rejects[rejects["reason"] != Reject.TOO_LONG.value]
    if config.on_bad == "fail" and len(defects):
        first = defects.iloc[0]
        raise BadRecordsError(
            f"bad record at {first['source']}:{first['line']}: {first['reason']} ({first['detail']}). "
            f"{len(defects)} bad record(s) in all, listed in {out / REJECTS_NAME}. "
            "Fix them, or pass --on-bad skip to leave them out."
        )

    kept = summary[summary["reason"] == ""]
    if config.test_size >= len(kept):
        suggestion = max(1, len(kept) // 10)
        raise UserError(
            f"test_size={config.test_size} leaves no training data: only {len(kept)} records were kept. Hold out "
            f"fewer, e.g. --test-size {suggestion} (or test_size={suggestion}; prepare.test_size={suggestion} for dolly train)"
        )
    # Ordered by a seeded hash of their content, the first `test_size` examples are the test
    # split and the rest, in that order, the shuffled training set: exact in size, and the
    # same whatever the file order or partitioning.
    summary["split"] = ""
    summary.loc[kept.sort_values("split_key").index, "split"] = ["test"] * config.test_size + ["train"] * (
        len(kept) - config.test_size
    )
    with console.status("Splitting"):
        ordered = (
            _sort_by_split_key(records.filter(expr="reason == ''").materialize()).select_columns(SHARD_COLUMNS).materialize()
        )
        test, train = ordered.split_at_indices([config.test_size])
    if config.pack:
        train = train.map_batches(
            pack_batch,
            fn_kwargs={"max_length": max_length},
            batch_size=config.pack_window,
            batch_format="numpy",
            num_cpus=config.cpus_per_task,
        )
    with console.status("Writing shards"):
        for name, split in (("train", train), ("test", test)):
            split.write_parquet(str((out / name).absolute()))
            (out / name).mkdir(exist_ok=True)  # an empty split writes no file; training still expects the folder

    plot_token_lengths(summary[summary["reason"] == ""], max_length, out / PLOT_NAME)
    manifest = mf.write_manifest(
        out,
        {
            **_describe(config, source, tokenizer, fingerprints, max_length_from),
            "counts": counts,
            "splits": _split_stats(summary),
            "packing": _packing_stats(out / "train", max_length) if config.pack else None,
            "files": {"rejects": REJECTS_NAME, "plot": PLOT_NAME},
            "seconds": round(time.perf_counter() - started, 2),
        },
    )
    result = mf.read_manifest(out)
    print_report(result, out, console)
    console.print(f"[bold]Manifest[/] {manifest}")
    return PrepareResult(out, result, reused=False)


def _sort_by_split_key(ds: ray.data.Dataset) -> ray.data.Dataset:
    # Ray's distributed sort costs ~15 s of fixed overhead on a laptop; a corpus that fits in one
    # block (dolly-15k is ~45 MB) sorts in well under a second in a single task.
    if ds.size_bytes() > SINGLE_TASK_SORT_BYTES:
        return ds.sort("split_key")
    return ds.repartition(1).map_batches(lambda t: t.sort_by("split_key"), batch_size=None, batch_format="pyarrow")


def _count(summary: pd.DataFrame) -> dict:
    reasons = summary.loc[summary["reason"] != "", "reason"].value_counts().sort_index()
    counts = {
        "read": int(len(summary)),
        "kept": int((summary["reason"] == "").sum()),
        "rejected": {str(k): int(v) for k, v in reasons.items()},
        "truncated": int(summary["truncated"].sum()),
    }
    if counts["read"] != counts["kept"] + sum(counts["rejected"].values()):
        raise AssertionError(f"record counts do not reconcile: {counts}")
    return counts


def _write_rejects(path: Path, rejects: pd.DataFrame) -> None:
    with open(path, "w") as f:
        for row in rejects.to_dict("records"):
            f.write(
                json.dumps(
                    {
                        "source": row["source"],
                        "line": int(row["line"]),
                        "reason": row["reason"],
                        "detail": row["detail"],
                        "record": row["raw"],
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )


def _split_stats(summary: pd.DataFrame) -> dict:
    stats = {}
    for split in mf.SPLITS:
        rows = summary[summary["split"] == split]
        n = rows["n_tokens"]
        stats[split] = {
            "examples": int(len(rows)),
            "by_category": {str(k): int(v) for k, v in rows["category"].value_counts().sort_index().items()},
            "tokens": int(n.sum()),
            "response_tokens": int((n - rows["n_prompt_tokens"]).clip(lower=0).sum()),
            "mean_tokens": round(float(n.mean()), 1) if len(rows) else 0.0,
            "p50_tokens": int(n.quantile(0.5)) if len(rows) else 0,
            "p95_tokens": int(n.quantile(0.95)) if len(rows) else 0,
            "max_tokens": int(n.max()) if len(rows) else 0,
        }
    return stats


def _packing_stats(train_dir: Path, max_length: int) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(train_dir, columns=["n_tokens", "seq_lens"])
    rows = table.num_rows
    tokens = sum(table.column("n_tokens").to_pylist())
    examples = sum(len(s) for s in table.column("seq_lens").to_pylist())
    return {"rows": rows, "examples": examples, "fill": round(tokens / (rows * max_length), 4) if rows else 0.0}


def _describe(config, source, tokenizer, fingerprints, max_length_from) -> dict:
    return {
        "source": {
            "spec": config.source,
            "kind": source.kind,
            "fingerprint": source.fingerprint,
            "files": [{"path": source.display_name(f), "sha256": source.file_hashes[f]} for f in source.files],
        },
        "tokenizer": {
            "name_or_path": config.tokenizer,
            "fingerprint": fingerprints["tokenizer"],
            "vocab_size": len(tokenizer),
            "pad_token": tokenizer.pad_token,
            "special_tokens": special_token_ids(tokenizer),
        },
        "contract": {"fingerprint": fingerprints["contract"]},
        "config": fingerprints["config"],
        "max_length": {"value": fingerprints["max_length"], "from": max_length_from},
        "packed": config.pack,
    }


def _reusable(out: Path, fingerprints: dict, tokenizer) -> dict | None:
    """The existing manifest, if `out` holds a verified preparation of the same inputs."""
    try:
        manifest = mf.verify_manifest(out, tokenizer)
    except (mf.ManifestError, OSError, KeyError, json.JSONDecodeError):
        return None
    same = (
        manifest["source"]["fingerprint"] == fingerprints["source"]
        and manifest["config"] == fingerprints["config"]
        and manifest["max_length"]["value"] == fingerprints["max_length"]
    )
    return manifest if same else None
