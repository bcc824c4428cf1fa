"""Training throughput on CPU: non-pad tokens/s of `dolly train` with 2 workers, for ZeRO 0, 2
and 3 side by side, and for packed against padded rows on the corpus's real length mix; and
(`--runs methods`) method=full against method=lora on one real model with `dolly up`'s CPU demo
settings: tokens/s, peak memory per worker, and how each result answers (the behavioural scores
that `dolly up` gates on, greedy, on held-out instructions).

Every figure is measured by the training loop itself (the `tokens_per_s` it logs: non-pad tokens
of all workers over wall time, data waits included), over the steps after a warm-up window, so
start-up (Ray, DeepSpeed's JIT ops, model init) is left out.

    .venv/bin/python bench/train_bench.py --corpus ../shared/data/databricks-dolly-15k.jsonl --tokenizer ../shared/tokenizer/pythia
    .venv/bin/python bench/train_bench.py --runs methods    # LoRA vs full on SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


def sample_corpus(corpus: Path, out: Path, records: int, seed: int) -> Path:
    """A seeded random sample of the corpus: the real length mix, small enough for CPU."""
    lines = corpus.read_text().splitlines()
    out.write_text("\n".join(random.Random(seed).sample(lines, records)) + "\n")
    return out


def measure(config, warmup_steps: int) -> dict:
    from pipelines.metrics import read_history
    from pipelines.train import train

    started = time.perf_counter()
    train(config)
    history = [row for row in read_history(config.output_dir / config.run_name) if row["step"] > warmup_steps]
    return {
        "tokens_per_s": statistics.mean(row["tokens_per_s"] for row in history),
        "windows": [round(row["tokens_per_s"], 1) for row in history],
        "data_wait": statistics.mean(row["data_wait"] for row in history),
        "memory_gib": max(row["memory_gib"] for row in history),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=SHARED / "data" / "databricks-dolly-15k.jsonl")
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizer" / "pythia"))
    parser.add_argument("--records", type=int, default=400, help="corpus sample size")
    parser.add_argument("--max-length", type=int, default=512, help="longest example (and packed row) in tokens")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run; the first half is warm-up")
    parser.add_argument("--models", nargs="+", default=["pythia-14m-random", "pythia-70m-random"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", nargs="+", choices=["stages", "methods"], default=["stages", "methods"])
    parser.add_argument("--methods-model", default="smollm2-135m-instruct", help="a real model, for method=full vs lora")
    parser.add_argument("--answers", type=int, default=32, help="held-out instructions each method's result answers")
    args = parser.parse_args()

    from cluster.connect import ray_session
    from pipelines.configs import PrepareConfig, TrainConfig
    from pipelines.prepare import prepare

    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    results: dict[str, dict] = {}
    with ray_session():
        sample = sample_corpus(args.corpus, work / "sample.jsonl", args.records, args.seed)
        if "methods" in args.runs:
            results |= compare_methods(args, sample, work)
        if "stages" not in args.runs:
            print(methods_markdown(results, args))
            (work / "results.json").write_text(json.dumps(results, indent=2))
            return
        data = {}
        for packed in (False, True):
            data[packed] = prepare(
                PrepareConfig(
                    source=str(sample),
                    output_dir=work / f"data-{'packed' if packed else 'padded'}",
                    tokenizer=args.tokenizer,
                    max_length=args.max_length,
                    test_size=20,
                    pack=packed,
                    seed=args.seed,
                )
            ).output_dir
        warmup = args.steps // 2
        runs = [(model, stage, False) for model in args.models for stage in (0, 2, 3)]
        runs += [(model, 2, True) for model in args.models]
        for model, stage, packed in runs:
            name = f"{model}-zero{stage}-{'packed' if packed else 'padded'}"
            config = TrainConfig(
                base_model=model,
                tokenizer=args.tokenizer,
                data_dir=data[packed],
                num_workers=2,
                zero_stage=stage,
                precision="fp32",
                micro_batch_size=args.micro_batch_size,
                max_steps=args.steps,
                warmup_steps=0,
                lr=1e-4,
                log_every=warmup,
                eval_every=10**6,
                checkpoint_every=10**6,
                storage_path=str(work / "storage"),
                output_dir=work / "out",
                run_name=name,
                register_as=None,
                preflight=False,
                seed=args.seed,
            )
            results[name] = measure(config, warmup)
            print(name, results[name], flush=True)

    print(markdown(results, args))
    if "methods" in args.runs:
        print(methods_markdown(results, args))
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"raw results: {work / 'results.json'}")


def compare_methods(args, sample: Path, work: Path) -> dict[str, dict]:
    """method=full and method=lora on the same model, rows and steps, as `dolly up` trains on CPU."""
    from loop.configs import UpBehaviourConfig
    from pipelines.configs import PrepareConfig, TrainConfig
    from pipelines.evaluate import score_model
    from pipelines.prepare import prepare
    from pipelines.presets import PRESETS

    demo = dict(PRESETS["cpu"].demo)
    settings = demo.pop("prepare")
    data = prepare(
        PrepareConfig(
            source=str(sample), output_dir=work / "data-methods", tokenizer=args.methods_model, test_size=args.answers, **settings
        )
    ).output_dir
    results = {}
    for method in ("full", "lora"):
        name = f"{args.methods_model}-{method}"
        config = TrainConfig(
            base_model=args.methods_model,
            data_dir=data,
            method=method,
            precision="fp32",
            **{k: v for k, v in demo.items() if not (k == "lr" and method == "lora")},  # LoRA takes its own rate
            log_every=5,
            eval_every=10**6,
            storage_path=str(work / "storage"),
            output_dir=work / "out",
            run_name=name,
            register_as=None,
            seed=args.seed,
        )
        results[name] = measure(config, warmup_steps=5)
        export = work / "out" / name / "export"
        scores, _ = score_model(str(export), data, UpBehaviourConfig(modes=["greedy"], examples=args.answers))
        [greedy] = scores.behaviour
        results[name] |= {"heldout_loss": scores.loss.overall.loss, **greedy.overall.model_dump()}
        print(name, results[name], flush=True)
    return results


def methods_markdown(results: dict, args) -> str:
    full, lora = (results[f"{args.methods_model}-{m}"] for m in ("full", "lora"))
    rows = [
        ("non-pad tokens/s", "tokens_per_s", "{:,.0f}"),
        ("peak memory per worker (GiB)", "memory_gib", "{:.2f}"),
        ("held-out loss", "heldout_loss", "{:.3f}"),
        ("answers that end (stop rate)", "stop_rate", "{:.0%}"),
        ("answers that loop", "loop_rate", "{:.0%}"),
        ("ROUGE-L vs the reference", "rouge_l", "{:.3f}"),
        (f"words per answer (the references: {full['reference_words']:.0f})", "words", "{:.0f}"),
    ]
    lines = [f"| {args.methods_model}, `dolly up`'s CPU demo | full | lora | lora / full |", "|---|---:|---:|---:|"]
    for label, key, form in rows:
        ratio = f"{lora[key] / full[key]:.2f}x" if full[key] else "-"
        lines.append(f"| {label} | {form.format(full[key])} | {form.format(lora[key])} | {ratio} |")
    return "\n".join(lines)


def markdown(results: dict, args) -> str:
    def tps(model: str, stage: int, packed: bool = False) -> float:
        return results[f"{model}-zero{stage}-{'packed' if packed else 'padded'}"]["tokens_per_s"]

    lines = [
        f"- Machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), {platform.system()}",
        f"- Settings: {args.records} records sampled from the corpus (seed {args.seed}), max_length {args.max_length}, "
        f"2 CPU workers (gloo), fp32, micro_batch_size {args.micro_batch_size}, {args.steps} steps per run, "
        f"tokens/s averaged over the steps after the first {args.steps // 2}",
        "",
        "| non-pad tokens/s (padded rows) | ZeRO-0 | ZeRO-2 | ZeRO-3 | ZeRO-3 / ZeRO-0 |",
        "|---|---:|---:|---:|---:|",
    ]
    for model in args.models:
        lines.append(
            f"| {model} | {tps(model, 0):,.0f} | {tps(model, 2):,.0f} | {tps(model, 3):,.0f} | "
            f"{tps(model, 3) / tps(model, 0):.2f}x |"
        )
    lines += ["", "| ZeRO-2, non-pad tokens/s | padded | packed | packed / padded |", "|---|---:|---:|---:|"]
    for model in args.models:
        lines.append(
            f"| {model} | {tps(model, 2):,.0f} | {tps(model, 2, True):,.0f} | **{tps(model, 2, True) / tps(model, 2):.2f}x** |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
