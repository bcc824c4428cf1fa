"""Does the tuned model follow instructions better than its base? Both answer the same held-out
instructions of the real corpus, greedy and with Dolly's sampling (seeded), and are scored side by
side: stop rate, repetition, ROUGE-L against the human reference, length (pipelines/behaviour.py).
The answers themselves are written beside the plots, one file per decoding and mode, to read.

It does so for each of --decodings: `dolly` (Dolly's own), `served` (what `dolly up` scores and
serves with by default), or settings over Dolly's such as frequency_penalty=0.6,presence_penalty=1.
Each checks the targets of the instruction-following issue on the greedy answers: the tuned model
ends at least 90% of its answers and never fewer than the base, repeats itself no more than the
base, and scores a ROUGE-L at least the base's in every category. With --temperatures, the tuned
model also answers at other sampling temperatures (the last decoding's other settings), to choose
sampling defaults that suit a small model. `dolly up` trains alike on a given seed, so a decoding
scored here on the models it trained scores as a fresh `dolly up` at that decoding would.

    .venv/bin/python bench/quality.py --workdir runs/up          # after `make run` (dolly up)
    .venv/bin/python bench/quality.py --workdir runs/up --decodings served frequency_penalty=0.6
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from rich.console import Console

REPO = Path(__file__).resolve().parents[1]


def targets(base, tuned) -> list[tuple[str, bool]]:
    """The issue's targets on greedy answers, each with whether it holds."""
    b, t = base.mode("greedy"), tuned.mode("greedy")
    checks = [
        (f"tuned ends >= 90% of its answers ({t.overall.stop_rate:.0%})", t.overall.stop_rate >= 0.9),
        (
            f"tuned ends no fewer than the base ({t.overall.stop_rate:.0%} vs {b.overall.stop_rate:.0%})",
            t.overall.stop_rate >= b.overall.stop_rate,
        ),
        (
            f"tuned repeats no more than the base ({t.overall.repetition:.3f} vs {b.overall.repetition:.3f})",
            t.overall.repetition <= b.overall.repetition,
        ),
    ]
    for category, scores in t.by_category.items():
        base_rouge = b.by_category[category].rouge_l
        checks.append((f"ROUGE-L {category}: tuned {scores.rouge_l:.3f} >= base {base_rouge:.3f}", scores.rouge_l >= base_rouge))
    return checks


def decoding_of(spec: str, max_tokens: int):
    """A --decodings value as a Decoding of at most `max_tokens` new tokens."""
    from contract.decoding import Decoding
    from contract.settings import parse_overrides
    from loop.configs import UpBehaviourConfig

    if spec == "dolly":
        settings = {}
    elif spec == "served":
        settings = UpBehaviourConfig().decoding.model_dump()
    else:
        settings = parse_overrides(spec.split(","))
    return Decoding(**settings | {"max_tokens": max_tokens})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "up", help="a `dolly up` workdir: its data and report")
    parser.add_argument("--model", help="tuned model (default: the workdir's report's tuned export)")
    parser.add_argument("--base", help="base model (default: the workdir's report's base)")
    parser.add_argument("--examples", type=int, default=64, help="held-out instructions answered (round-robin over categories)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--decodings",
        nargs="+",
        default=["dolly", "served"],
        help="decodings to score both models with: dolly, served, or KEY=VALUE,... over Dolly's (keys: contract.decoding.Decoding's)",
    )
    parser.add_argument(
        "--temperatures", type=float, nargs="*", default=[], help="also sample the tuned model at these temperatures"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "quality.json")
    args = parser.parse_args()

    from pipelines.answers import answer, heldout_prompts, write_samples
    from pipelines.behaviour import BehaviourConfig, behaviour_table, summarize
    from pipelines.evaluate import score_model, show_scores
    from pipelines.heldout import LoadedModel

    console = Console(width=200)
    data_dir = args.workdir / "data"
    report = json.loads((args.workdir / "report.json").read_text()) if (args.workdir / "report.json").exists() else {}
    base_ref = args.base or report["base"]["loss"]["model"]
    tuned_ref = args.model or str(sorted((args.workdir / "runs").glob("up-*/export"), key=lambda p: p.stat().st_mtime)[-1])
    tuned_lm = LoadedModel(tuned_ref)
    runs, seconds = [], {"base": 0.0, "tuned": 0.0}
    decodings = {spec: decoding_of(spec, args.max_new_tokens) for spec in args.decodings}
    for spec, decoding in decodings.items():
        config = BehaviourConfig(examples=args.examples, decoding=decoding)
        started = time.perf_counter()
        base, base_answers = score_model(base_ref, data_dir, config, max_examples=args.examples)
        seconds["base"] += time.perf_counter() - started
        started = time.perf_counter()
        tuned, tuned_answers = score_model(tuned_lm, data_dir, config, max_examples=args.examples)
        seconds["tuned"] += time.perf_counter() - started
        base, tuned = base.named(f"base ({base_ref})"), tuned.named("tuned")
        folder = args.out.parent / f"quality-{spec.replace(',', '-')}"
        folder.mkdir(parents=True, exist_ok=True)
        show_scores([base, tuned], folder, console)
        for mode, given in base_answers.items():  # as `dolly eval` writes them: the base's, then the tuned model's
            write_samples(given + tuned_answers[mode], folder / f"answers-{mode}.jsonl")
        checks = targets(base, tuned)
        console.print(f"[bold]Targets, greedy, {spec}: {decoding.greedy().describe()}[/]")
        for text, ok in checks:
            console.print(f"[{'green' if ok else 'red'}]{'PASS' if ok else 'FAIL'}[/] {text}")
        b, t = base.mode("greedy").overall, tuned.mode("greedy").overall
        console.print(
            f"greedy, tuned / base: stop rate {t.stop_rate / max(b.stop_rate, 1e-9):.2f}x, "
            f"repetition {t.repetition / max(b.repetition, 1e-9):.2f}x, ROUGE-L {t.rouge_l / max(b.rouge_l, 1e-9):.2f}x"
        )
        runs.append(
            {
                "decoding": spec,
                "settings": decoding.model_dump(),
                "base": base.model_dump(mode="json"),
                "tuned": tuned.model_dump(mode="json"),
                "targets": [{"check": text, "passed": ok} for text, ok in checks],
            }
        )

    sweeps = []
    if args.temperatures:
        prompts = heldout_prompts(tuned_lm, data_dir, args.examples)
        for temperature in args.temperatures:
            decoding = decodings[args.decodings[-1]].model_copy(update={"temperature": temperature})
            sweeps.append(
                summarize(answer(tuned_lm, prompts, decoding.params(), 42, 16), "sampled", decoding).model_copy(
                    update={"model": f"tuned, T={temperature:g}"}
                )
            )
        console.print(behaviour_table(sweeps, [f"T={t:g}" for t in args.temperatures]))

    args.out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
                "base_model": base_ref,
                "tuned_model": tuned_ref,
                "runs": runs,
                "sweeps": [s.model_dump(mode="json") for s in sweeps],
                "seconds": seconds,
            },
            indent=2,
        )
        + "\n"
    )
    console.print(f"Scores: {args.out}; base scored in {seconds['base']:.0f} s, tuned in {seconds['tuned']:.0f} s")


if __name__ == "__main__":
    main()
