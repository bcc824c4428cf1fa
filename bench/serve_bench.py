"""Serving, ours vs Dolly's way, side by side in one run (issue 4).

1. A closed-loop load generator on loopback (bounded in requests and in time) at concurrency 1, 8
   and 32, against:
   - ours: the Serve application (services/app.py) over HTTP with streaming, one model replica,
     for each engine of --engines (ENGINES: `dynamic`, `continuous`, and `continuous_top_k`, the
     continuous engine with `engine.continuous_top_k` on, which its requests then pay for);
   - with `vllm` among them, vLLM through Ray Serve LLM behind the same ingress (run this script
     from vLLM's environment then: `.venv-vllm/bin/python bench/serve_bench.py --engines dynamic,vllm`);
   - Dolly's way: one `generate` per request through an InstructionTextGenerationPipeline-style
     loop (Dolly's template, do_sample, top_p 0.92, top_k 0, eos = `### End`) on the same model
     in one process, one request at a time, as its pipeline serves them; it cannot stream, so its
     time to first token is its latency.
   At each level the sides run one after another, so that background load on the machine falls
   on all of them alike. Reported: output tokens/s, time to first token p50/p99, latency p50/p99,
   and ours / Dolly.
2. Serve's own overhead: a trivial deployment over HTTP against the same function called in
   process, p50 of sequential calls.

Run from the repository root (CPU: about 10 minutes on 2 cores):

    .venv/bin/python bench/serve_bench.py --tokenizer ../shared/tokenizer/pythia

The model is a random-weight Pythia shape (--shape, default pythia-14m-random) exported like a
trained one; random weights rarely say `### End`, so every answer runs to --max-tokens on both
sides alike. Prints a table per engine, then a Markdown block for bench/RESULTS.md; with both
`continuous` and `continuous_top_k` run, also the one against the other, measured side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a plain script, without relying on the editable install

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray import serve  # noqa: E402

from contract import END_KEY, generation, render_generation_prompt  # noqa: E402
from contract.models import load_model, load_tokenizer  # noqa: E402
from pipelines.export import generation_config  # noqa: E402
from services.app import build_app  # noqa: E402
from services.config import ServeConfig  # noqa: E402

LEVELS = (1, 8, 32)
ENGINES = {
    "dynamic": {"batching": "dynamic"},
    "continuous": {"batching": "continuous"},
    "continuous_top_k": {"batching": "continuous", "continuous_top_k": True},
    # vLLM through Ray Serve LLM (run this script from vLLM's environment: .venv-vllm/bin/python);
    # eager, as the tests start it (torch.compile would cost minutes per start on a CPU).
    "vllm": {
        "kind": "vllm",
        "vllm": {"engine_kwargs": {"enforce_eager": True}, "runtime_env": {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "2"}}},
    },
}
KEY = "bench-key"
PORT = 8765


@dataclass
class Sample:
    ttft: float
    latency: float
    tokens: int


def export_random_model(shape: str, tokenizer_path: str, folder: Path) -> Path:
    tokenizer = load_tokenizer(tokenizer_path)
    torch.manual_seed(0)
    load_model(shape, tokenizer).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    generation_config(tokenizer).save_pretrained(folder)
    return folder


def instructions(corpus: Path, n: int = 64) -> list[tuple[str, str]]:
    if not corpus.exists():
        return [(f"Explain idea number {i} in a few sentences.", "") for i in range(n)]
    with corpus.open() as f:
        records = [json.loads(line) for line, _ in zip(f, range(n))]
    return [(r["instruction"], r["context"][:600]) for r in records]


async def drive(concurrency: int, requests: int, max_seconds: float, one) -> tuple[list[Sample], float]:
    """`concurrency` closed-loop clients share `requests` calls of `one(i)`; none starts after max_seconds."""
    issued, samples = iter(range(requests)), []
    deadline = time.perf_counter() + max_seconds

    async def client():
        for i in issued:
            if time.perf_counter() > deadline:
                return
            samples.append(await one(i))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples, time.perf_counter() - started


def summary(samples: list[Sample], wall: float) -> dict:
    def pct(values, q):
        return float(np.percentile(values, q)) if values else float("nan")

    ttft, latency = [s.ttft for s in samples], [s.latency for s in samples]
    return {
        "requests": len(samples),
        "tokens_per_s": sum(s.tokens for s in samples) / wall,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "latency_p50": pct(latency, 50),
        "latency_p99": pct(latency, 99),
    }


def progress(who: str, level: int, result: dict) -> dict:
    print(f"{who}, concurrency {level}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
    return result


def ours(http: httpx.AsyncClient, prefix: str, prompts, max_tokens: int):
    """One streamed request to the Serve application at `prefix`."""

    async def one(i: int) -> Sample:
        instruction, context = prompts[i % len(prompts)]
        body = {
            "model": "bench",
            "prompt": instruction,
            "context": context,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        started, first, tokens = time.perf_counter(), None, 0
        async with http.stream(
            "POST", f"http://127.0.0.1:{PORT}{prefix}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
        ) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - started
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        latency = time.perf_counter() - started
        return Sample(first if first is not None else latency, latency, tokens)

    return one


class DollyWay:
    """Dolly's InstructionTextGenerationPipeline, one request at a time on one worker."""

    def __init__(self, folder: Path, prompts, max_tokens: int):
        self.tokenizer = load_tokenizer(str(folder))
        self.model = load_model(str(folder), self.tokenizer, dtype=torch.float32).eval()
        self.end_id = self.tokenizer.convert_tokens_to_ids(END_KEY)
        self.worker = ThreadPoolExecutor(max_workers=1)
        self.prompts, self.max_tokens = prompts, max_tokens

    def generate(self, instruction: str, context: str) -> int:
        ids = self.tokenizer(render_generation_prompt(instruction, context), return_tensors="pt")
        with torch.no_grad():
            out = self.model.generate(
                **ids,
                do_sample=True,
                top_p=generation.TOP_P,
                top_k=generation.TOP_K,
                max_new_tokens=self.max_tokens,
                eos_token_id=self.end_id,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        generated = out[0, ids["input_ids"].shape[1] :]
        self.tokenizer.decode(generated, skip_special_tokens=True)  # the response text, as the pipeline returns it
        return int((generated != self.end_id).sum())

    async def one(self, i: int) -> Sample:
        started = time.perf_counter()
        tokens = await asyncio.get_running_loop().run_in_executor(
            self.worker, self.generate, *self.prompts[i % len(self.prompts)]
        )
        latency = time.perf_counter() - started
        return Sample(latency, latency, tokens)


async def bench(sides: dict, max_seconds: float) -> dict[str, dict[int, dict]]:
    """Every side at each level in turn, so that the machine's background load falls on all alike."""
    for one in sides.values():
        await drive(2, 2, 60, one)  # warm-up: first batches, caches, connections
    results: dict[str, dict[int, dict]] = {name: {} for name in sides}
    for level in LEVELS:
        for name, one in sides.items():
            results[name][level] = progress(name, level, summary(*await drive(level, max(8, 2 * level), max_seconds, one)))
    return results


async def bench_serving(folder: Path, engines: list[str], prompts, args) -> dict[str, dict[int, dict]]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as http:
        sides = {"Dolly's way": DollyWay(folder, prompts, args.max_tokens).one}
        sides |= {engine: ours(http, f"/{engine}", prompts, args.max_tokens) for engine in engines}
        return await bench(sides, args.max_seconds)


class Trivial:
    async def __call__(self, request) -> str:
        return "ok"


async def timed_in_process(handler, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        await handler(None)
        times.append(time.perf_counter() - t)
    return times


def serve_overhead(calls: int) -> dict:
    serve.run(serve.deployment(Trivial, ray_actor_options={"num_cpus": 0.5}).bind(), name="trivial", route_prefix="/trivial")
    try:
        with httpx.Client() as http:
            http.get(f"http://127.0.0.1:{PORT}/trivial")
            over_http = []
            for _ in range(calls):
                t = time.perf_counter()
                http.get(f"http://127.0.0.1:{PORT}/trivial").raise_for_status()
                over_http.append(time.perf_counter() - t)
        in_process = asyncio.run(timed_in_process(Trivial(), calls))
    finally:
        serve.delete("trivial")
    return {"http_p50_ms": 1000 * statistics.median(over_http), "in_process_p50_ms": 1000 * statistics.median(in_process)}


def table(name: str, ours: dict, other: dict, other_name: str = "Dolly", our_name: str = "ours") -> str:
    rows = [
        f"| concurrency | {our_name} tok/s | {other_name} tok/s | {our_name} / {other_name} | TTFT p50 / p99 {our_name} (s) "
        f"| TTFT p50 / p99 {other_name} (s) | latency p50 / p99 {our_name} (s) | latency p50 / p99 {other_name} (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in LEVELS:
        o, d = ours[level], other[level]
        rows.append(
            f"| {level} | {o['tokens_per_s']:.1f} | {d['tokens_per_s']:.1f} | **{o['tokens_per_s'] / d['tokens_per_s']:.2f}x** "
            f"| {o['ttft_p50']:.3f} / {o['ttft_p99']:.3f} | {d['ttft_p50']:.3f} / {d['ttft_p99']:.3f} "
            f"| {o['latency_p50']:.3f} / {o['latency_p99']:.3f} | {d['latency_p50']:.3f} / {d['latency_p99']:.3f} |"
        )
    return f"{name}\n\n" + "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default=str(REPO.parent / "shared/tokenizer/pythia"))
    parser.add_argument(
        "--corpus",
        default=str(REPO.parent / "shared/data/databricks-dolly-15k.jsonl"),
        help="instructions to send (the first 64 records); synthetic ones if absent",
    )
    parser.add_argument("--shape", default="pythia-14m-random", help="random Pythia shape to serve")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per answer (Dolly's default: 256)")
    parser.add_argument("--max-seconds", type=float, default=120, help="no request starts later than this into a level")
    parser.add_argument("--engines", default="dynamic,continuous", help="engines to run, from: " + ", ".join(ENGINES))
    parser.add_argument("--overhead-calls", type=int, default=200)
    args = parser.parse_args()

    prompts = instructions(Path(args.corpus))
    engines = args.engines.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_random_model(args.shape, args.tokenizer, Path(tmp) / "model")
        (Path(tmp) / "keys").write_text(KEY)
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": PORT})
            for engine in engines:  # one application per engine, side by side
                config = ServeConfig(
                    model=str(folder),
                    served_model_name="bench",
                    auth={"api_keys_file": str(Path(tmp) / "keys")},
                    engine=ENGINES[engine] | {"max_batch_size": 32},
                    deployment={"min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 64, "max_queued_requests": -1},
                )
                serve.run(build_app(config), name=f"dolly-{engine}", route_prefix=f"/{engine}")
            results = asyncio.run(bench_serving(folder, engines, prompts, args))
            for engine in engines:
                serve.delete(f"dolly-{engine}")
            overhead = serve_overhead(args.overhead_calls)
        finally:
            serve.shutdown()
            ray.shutdown()

    load = os.getloadavg()
    print(
        f"\nMachine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"torch threads {torch.get_num_threads()}, load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
    )
    print(
        f"Model: {args.shape} (random weights), fp32, max_tokens {args.max_tokens}; requests per level: max(8, 2 x concurrency)\n"
    )
    for engine in engines:
        print(
            table(f"Ours, engine {engine} ({ENGINES[engine]}), vs Dolly's way:", results[engine], results["Dolly's way"]) + "\n"
        )
    if {"dynamic", "vllm"} <= set(engines):
        print(
            table("vLLM (engine.kind=vllm) vs ours (dynamic), side by side:", results["vllm"], results["dynamic"], "ours", "vLLM")
            + "\n"
        )
    if {"continuous", "continuous_top_k"} <= set(engines):
        title = "Continuous batching without top-k (ours) vs with it (engine.continuous_top_k=true), side by side:"
        print(table(title, results["continuous"], results["continuous_top_k"], "top-k") + "\n")
    print(
        f"Serve overhead (p50 of {args.overhead_calls} sequential calls): trivial deployment over HTTP "
        f"{overhead['http_p50_ms']:.2f} ms, the same function in process {1000 * overhead['in_process_p50_ms']:.1f} µs, "
        f"difference {overhead['http_p50_ms'] - overhead['in_process_p50_ms']:.2f} ms"
    )


if __name__ == "__main__":
    main()
