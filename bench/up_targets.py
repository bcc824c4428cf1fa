"""What a person chatting gets from `dolly up`'s defaults (issue 26's targets), across seeds.

For each seed `dolly up` runs whole, as `make run` does, in a workdir of its own (the split and
the training order follow `train.prepare.seed`), and its own report is read: the tuned model's
held-out answers, greedy and sampled at the decoding it scores (and then serves) with, against the
base's. The targets, on every seed:

  - greedy and sampled answers each end at least 90% of the time, and at most 10% of them loop;
  - ROUGE-L at least the base's in every category, in both modes.

The targets are at the served defaults, so the answers are scored at the API's budget of 256 new
tokens (`behaviour.decoding.max_tokens`; a setting given after the seeds overrides it), not at
the 128 with which `dolly up` scores to save time. An answer ending between the two counts as
ending here; the model `dolly up` serves is chosen on these same answers.

    .venv/bin/python bench/up_targets.py --data ../shared/data/databricks-dolly-15k.jsonl
    .venv/bin/python bench/up_targets.py --data ... --seeds 42 train.method=lora    # another recipe

About 20 minutes a seed on 2 cores. Prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script, without relying on the editable install

STOP_TARGET, LOOP_TARGET = 0.9, 0.1


def rouge_below_base(report: dict, tuned: dict) -> list[str]:
    """The categories where `tuned` (one mode's answers) has a lower ROUGE-L than the base's in
    that mode, each with both scores."""
    base = next(b for b in report["base"]["behaviour"] if b["mode"] == tuned["mode"])["by_category"]
    return [
        f"{category} {scores['rouge_l']:.3f} < {base[category]['rouge_l']:.3f}"
        for category, scores in tuned["by_category"].items()
        if scores["rouge_l"] < base[category]["rouge_l"]
    ]


def checks(report: dict) -> list[tuple[str, bool]]:
    """The targets on one seed's `dolly up` report, each with whether it holds."""
    results = []
    for tuned in report["tuned"]["behaviour"]:
        mode, overall, below = tuned["mode"], tuned["overall"], rouge_below_base(report, tuned)
        results.append((f"{mode} ends {overall['stop_rate']:.0%} >= 90%", overall["stop_rate"] >= STOP_TARGET))
        results.append((f"{mode} loops {overall['loop_rate']:.0%} <= 10%", overall["loop_rate"] <= LOOP_TARGET))
        results.append((f"{mode} ROUGE-L >= base in every category" + (f" ({'; '.join(below)})" if below else ""), not below))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the corpus dolly up trains on")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="train.prepare.seed of each run")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-up", help="a folder of runs, one per seed")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "up_targets.json")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dolly up settings beyond its defaults")
    args = parser.parse_args()

    from ray import serve
    from rich.console import Console

    from cluster.connect import free_port, ray_session
    from contract import generation, registry
    from contract.decoding import Decoding
    from contract.settings import load_config
    from loop.configs import UpConfig
    from loop.up import up

    console = Console(width=160)
    seeds = []
    with ray_session():  # one Ray for every seed: each `up` uses it and leaves it running
        for seed in args.seeds:
            workdir = args.workdir / f"seed-{seed}"
            flags = dict(data=args.data, workdir=str(workdir), registry=str(workdir / "registry"), port=free_port())
            served_budget = f"behaviour.decoding.max_tokens={generation.MAX_NEW_TOKENS}"
            overrides = [served_budget, *args.overrides, f"train.prepare.seed={seed}", "open_browser=false"]
            config = load_config(UpConfig, None, flags, overrides)
            started = time.perf_counter()
            urls = up(config, console, block=False)
            seconds = time.perf_counter() - started
            serve.shutdown()
            report = json.loads((workdir / "report.json").read_text())
            served = Decoding.of_model(registry.resolve(urls["model"], config.registry)[0]).describe()
            seeds.append(
                dict(seed=seed, seconds=seconds, model=urls["model"], served=served, report=report, checks=checks(report))
            )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
                "overrides": args.overrides,
                "seeds": seeds,
            },
            indent=2,
        )
        + "\n"
    )
    print(table(seeds))
    failed = [f"seed {s['seed']}: {text}" for s in seeds for text, ok in s["checks"] if not ok]
    print("\nAll targets hold on every seed." if not failed else "\nMissed:\n- " + "\n- ".join(failed))
    print(f"\nScores: {args.out}")


def table(seeds: list[dict]) -> str:
    """A Markdown row per seed and mode, the base beside the tuned model, and the worst seed."""
    lines = [
        "| seed | mode | stop (base) | loops (base) | ROUGE-L (base) | categories at least the base's | served with | wall |",
        "|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    worst: dict[str, dict] = {}
    for s in seeds:
        base = {b["mode"]: b for b in s["report"]["base"]["behaviour"]}
        for tuned in s["report"]["tuned"]["behaviour"]:
            mode, t, b = tuned["mode"], tuned["overall"], base[tuned["mode"]]["overall"]
            held = len(tuned["by_category"]) - len(rouge_below_base(s["report"], tuned))
            lines.append(
                f"| {s['seed']} | {mode} | {t['stop_rate']:.0%} ({b['stop_rate']:.0%}) | {t['loop_rate']:.0%} "
                f"({b['loop_rate']:.0%}) | {t['rouge_l']:.3f} ({b['rouge_l']:.3f}) | {held} of {len(tuned['by_category'])} "
                f"| {s['served']} | {s['seconds'] / 60:.1f} min |"
            )
            w = worst.setdefault(mode, dict(stop=1.0, loops=0.0))
            w["stop"], w["loops"] = min(w["stop"], t["stop_rate"]), max(w["loops"], t["loop_rate"])
    for mode, w in worst.items():
        lines.append(f"| worst | {mode} | {w['stop']:.0%} | {w['loops']:.0%} | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
