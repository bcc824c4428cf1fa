"""Would scoring the base model beside the training shorten `dolly up` (issue 14)?

`dolly up` scores the base model (held-out loss, greedy and sampled answers) and then fine-tunes
it; the two do not depend on each other. This measures, in one Ray session and with `dolly up`'s
defaults (SmolLM2-135M, the CPU preset's demo: 30 steps, 64 examples scored), on data prepared
as `dolly up` prepares it:

  sequential   the base scoring, then the training (what `dolly up` does on CPU presets)
  overlapped   the same training, with the same scoring running beside it (on GPU presets)

Both trainings are fresh runs (no checkpoint reused); the scoring runs on a Ray worker with a
training worker's resources, as in `dolly up` (pipelines/scoring.py). Run it on an otherwise
idle machine.

    .venv/bin/python bench/overlap_bench.py --data ../shared/data/databricks-dolly-15k.jsonl

About 13 minutes on 2 cores. Prints a Markdown block for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a plain script, without relying on the editable install

from rich.console import Console  # noqa: E402

from cluster.connect import ray_session  # noqa: E402
from contract.models import resolve_base  # noqa: E402
from loop.configs import UpConfig  # noqa: E402
from pipelines.configs import PrepareConfig  # noqa: E402
from pipelines.prepare import prepare  # noqa: E402
from pipelines.scoring import RemoteScore, resources  # noqa: E402
from pipelines.train import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/databricks-dolly-15k.jsonl"), help="the corpus")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dolly-overlap-bench-") as tmp, ray_session(None):
        config = UpConfig(data=args.data, workdir=Path(tmp))
        base = resolve_base(config.base_model)
        train_config = config.train_config(Path(tmp) / "data")
        prepared = prepare(
            PrepareConfig(
                source=args.data, output_dir=Path(tmp) / "data", tokenizer=base, model=base, **train_config.prepare.model_dump()
            ),
            Console(file=io.StringIO()),
        ).data

        def score() -> RemoteScore:
            placement = resources(train_config)
            return RemoteScore(config.base_model, prepared, config.behaviour, placement, max_examples=config.eval_examples)

        def fine_tune(run_name: str) -> None:
            # Its own console: rich draws one live display per console, and the scoring's bars are live too.
            train(train_config.model_copy(update={"run_name": run_name}), Console(file=io.StringIO()), prepared)

        times = {}
        started = time.perf_counter()
        score().result(Console(file=io.StringIO()))
        times["scoring"] = time.perf_counter() - started
        started = time.perf_counter()
        fine_tune("sequential")
        times["training"] = time.perf_counter() - started
        started = time.perf_counter()
        scoring = score()
        fine_tune("overlapped")
        scoring.result(Console(file=io.StringIO()))
        times["overlapped"] = time.perf_counter() - started

    sequential = times["scoring"] + times["training"]
    print(f"\n### Base scoring beside training ({platform.node()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')})\n")
    print("| | time |\n|---|---|")
    print(f"| base scoring alone | {times['scoring']:.0f} s |")
    print(f"| training alone ({train_config.max_steps} steps) | {times['training']:.0f} s |")
    print(f"| **sequential** (scoring, then training) | **{sequential:.0f} s** |")
    print(
        f"| **overlapped** (scoring beside training) | **{times['overlapped']:.0f} s** ({times['overlapped'] / sequential:.2f}x) |"
    )


if __name__ == "__main__":
    main()
