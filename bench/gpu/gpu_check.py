"""The GPU check (issue 12): one H100/H200 whose Python has torch and transformers, but neither Ray
nor DeepSpeed nor vLLM nor network, in under 8 minutes. Every module it imports is free of all
three (tests/test_gpu_check.py runs it with them unimportable).

1. Training steps of the pythia-1.4b and pythia-2.8b shapes (random weights, bf16) on the token
   lengths of real Dolly examples, through each attention path of `TrainConfig`:
   - padded + sdpa: Dolly's batches of 8 examples (`padded_batch`), each padded to its longest
     (`pipelines.batches.collate`), several micro-batches per step;
   - packed + sdpa: the same examples in rows of 2048 tokens (`pipelines.packing.pack_batch`), one
     micro-batch; transformers builds a block-diagonal mask from the restarting position_ids;
   - flattened + sdpa, + flash_attention_2 (where flash_attn is installed), + flex_attention: the
     same examples as one row (`pipelines.batches.flatten`, `padding_free`).
   Every path trains on the same examples in the same steps, with the same weights: the optimizer
   (plain torch AdamW, no DeepSpeed) runs at lr 0, so it does all its work and changes nothing,
   and the paths' losses must agree. Reported: non-pad tokens/s, MFU (`pipelines.flops`, attention
   weighted by each example's own length) against two peaks: the bf16 peak of a large matmul
   measured here, and the spec peak the training loop's MFU uses (the preset of this device,
   `pipelines.presets`; none on a CPU or a device no preset names); the step time, the warm-up
   steps apart (flex_attention compiles there: once, then again for dynamic lengths), peak memory
   and the loss.
2. Decoding, Dolly's sampling (T 1, top_p 0.92, top_k 0, 256 new tokens): a burst of 1, 8 and 32
   requests arriving at once, in process.
   - ours: `contract.decode.BatchDecoder` as the dynamic-batching engine drives a burst: the group
     prefilled as one, then one step for all rows, each row leaving at the step it ends;
   - Dolly's way: one `model.generate` per request, one after another, as its pipeline serves
     them. It cannot stream, so its time to first token is its latency. One queue of 32 serves all
     three levels: served one at a time, the first 8 of 32 are timed as a burst of 8 would be.
   Reported: output tokens/s and time to first token p50 / p99.
3. The figures as JSON (--out) and as the Markdown tables bench/RESULTS.md records.

The device machine cannot read ../shared, so the example lengths travel in a file made here:

    .venv/bin/python bench/gpu/gpu_check.py lengths       # writes bench/out/dolly_lengths.json
    python3 bench/gpu/gpu_check.py run --out $OUT/gpu_check.json   # there (bench/README.md)

`run --smoke` is the same run with tiny shapes on whatever device there is (tests/test_gpu_check.py
runs it on CPU).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import random
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a plain script, from a copy of the repository without an install

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils import is_flash_attn_2_available  # noqa: E402

from contract import END_KEY, IGNORE_INDEX, generation  # noqa: E402
from contract.decode import BatchDecoder, finish_reason  # noqa: E402
from contract.models import pythia_config, random_pythia_size  # noqa: E402
from contract.sampling import SamplingParams  # noqa: E402
from pipelines.batches import collate, flatten  # noqa: E402
from pipelines.flops import attention_length, flops_per_token  # noqa: E402
from pipelines.packing import first_fit_decreasing, pack_batch  # noqa: E402
from pipelines.presets import PRESETS  # noqa: E402

LENGTHS = REPO / "bench" / "out" / "dolly_lengths.json"
PATHS = (
    ("padded", "sdpa"),
    ("packed", "sdpa"),
    ("flattened", "sdpa"),
    ("flattened", "flash_attention_2"),
    ("flattened", "flex_attention"),
)
LEVELS = (1, 8, 32)
ORDINARY_IDS = 50_000  # random token ids are drawn below this: plain Pythia tokens, none of Dolly's special ones


@dataclass(frozen=True)
class Settings:
    train_shapes: tuple[str, ...]
    decode_shape: str
    row_tokens: int  # packed row capacity; longer examples are left out
    packed_rows: int  # rows per step: the h100 preset's micro_batch_size
    padded_batch: int  # examples per padded micro-batch: the h100 preset's micro_batch_size
    warmup: int  # steps per path before the timed ones
    steps: int  # timed steps per path
    new_tokens: int
    matmul: int  # side of the square matmul that measures the peak


FULL = Settings(
    train_shapes=("pythia-1.4b-random", "pythia-2.8b-random"),
    decode_shape="pythia-1.4b-random",
    row_tokens=2048,
    packed_rows=8,
    padded_batch=8,
    warmup=2,  # flex_attention compiles in the first and again, for dynamic lengths, in the second
    steps=4,
    new_tokens=generation.MAX_NEW_TOKENS,
    matmul=8192,
)
SMOKE = Settings(
    train_shapes=("pythia-14m-random",),
    decode_shape="pythia-14m-random",
    row_tokens=384,
    packed_rows=2,
    padded_batch=4,
    warmup=1,
    steps=1,
    new_tokens=8,
    matmul=1024,
)


def write_lengths(corpus: Path, tokenizer_path: str, out: Path, records: int | None) -> None:
    """(tokens, prompt tokens) of every Dolly example that training keeps (shorter than Pythia's
    2048-token context, Dolly's rule), and the ids the check needs from the tokenizer."""
    from contract.models import load_tokenizer
    from contract.records import RecordError, validate_record
    from pipelines.tokenize import tokenize_examples

    tokenizer = load_tokenizer(tokenizer_path)
    valid = []
    with corpus.open() as f:
        for line in itertools.islice(f, records):
            try:
                valid.append(validate_record(line, None))
            except RecordError:
                continue
    context = pythia_config("1.4b").max_position_embeddings  # 2048, as every Pythia size
    examples = [(len(ids), labels.count(IGNORE_INDEX)) for ids, labels in tokenize_examples(tokenizer, valid)]
    kept = [e for e in examples if e[0] < context]
    out.parent.mkdir(parents=True, exist_ok=True)
    facts = {"corpus": corpus.name, "records": len(valid), "kept": len(kept), "end_id": tokenizer.convert_tokens_to_ids(END_KEY)}
    out.write_text(json.dumps(facts | {"pad_id": tokenizer.pad_token_id, "examples": kept}))
    print(f"{out}: {len(kept)} of {len(valid)} examples (tokens, prompt tokens)")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measured_peak_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n**3 * 10 / (time.perf_counter() - started) / 1e12


def spec_peak(device_name: str) -> tuple[str | None, float | None]:
    """(preset, its peak TFLOP/s) of the device so named ("NVIDIA H100 80GB HBM3" -> h100), as the
    training loop's MFU uses it; (None, None) where no preset names it (a CPU, an H200)."""
    for name, preset in PRESETS.items():
        if preset.peak_tflops and re.search(rf"\b{name}\b", device_name, re.IGNORECASE):
            return name, preset.peak_tflops
    return None, None


def random_model(shape: str, device: torch.device, dtype: torch.dtype):
    """Pythia's shape with random weights, built on the device (far faster than on the host).
    Pythia's 50,304-row vocabulary: the 24 rows Dolly's export trims cost nothing measurable."""
    with device:
        return AutoModelForCausalLM.from_config(pythia_config(random_pythia_size(shape)), dtype=dtype, attn_implementation="sdpa")


# ---------------------------------------------------------------------------- 1. training steps


def training_steps(lengths: list[list[int]], settings: Settings, count: int, seed: int = 0) -> list[list[dict]]:
    """`count` steps, each the examples of `packed_rows` packed rows: random token ids of real
    Dolly lengths, loss on the response only. Rows come in random order, as training reads them."""
    rng = random.Random(seed)
    pool = [e for e in lengths if e[0] <= settings.row_tokens]
    rng.shuffle(pool)
    window = pool[:2048]  # packed over one window, as preparation packs
    bins = first_fit_decreasing([n for n, _ in window], settings.row_tokens)
    rng.shuffle(bins)
    groups = [bins[i : i + settings.packed_rows] for i in range(0, settings.packed_rows * count, settings.packed_rows)]
    ids = torch.Generator().manual_seed(seed)
    steps = []
    for group in groups:
        examples = []
        for i in sorted(i for b in group for i in b):  # the window's shuffled order, as Dolly's batches come
            n, prompt = window[i]
            tokens = torch.randint(1, ORDINARY_IDS, (n,), generator=ids).numpy()
            examples.append({"input_ids": tokens, "labels": np.concatenate([np.full(prompt, IGNORE_INDEX), tokens[prompt:]])})
        steps.append(examples)
    return steps


def micro_batches(examples: list[dict], layout: str, settings: Settings, pad_id: int) -> list[dict]:
    columns = {key: [e[key] for e in examples] for key in ("input_ids", "labels")}
    if layout == "padded":
        b = settings.padded_batch
        return [collate({k: v[i : i + b] for k, v in columns.items()}, pad_id) for i in range(0, len(examples), b)]
    packed = pack_batch(columns, max_length=settings.row_tokens).to_pydict()
    return [collate(packed, pad_id) if layout == "packed" else flatten(packed)]


def train_step(model, optimizer, batches: list[dict]) -> torch.Tensor:
    """One optimizer step over the micro-batches; the loss is the mean over all their label tokens."""
    label_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    loss = torch.zeros((), device=model.device)
    for b in batches:
        inputs = {k: b[k].to(model.device) for k in ("input_ids", "labels", "position_ids")}
        out = model(**inputs, use_cache=False, num_items_in_batch=label_tokens)
        out.loss.backward()
        loss += out.loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def unavailable(attention: str, device: torch.device) -> str | None:
    if attention == "flash_attention_2" and not is_flash_attn_2_available():
        return "not installed (flash_attn)" if device.type == "cuda" else "needs CUDA"
    if attention == "flex_attention" and device.type != "cuda":
        return "needs CUDA (flex_attention has no backward on CPU)"
    return None


def bench_training(shape: str, steps: list[list[dict]], settings: Settings, device, dtype, peaks: dict, pad_id: int):
    """Each attention path's rows; `peaks`: TFLOP/s of one device by name ("measured", "spec"),
    None where unknown."""
    model = random_model(shape, device, dtype).train()
    model.config.use_cache = False  # required for packed rows; useless in training anyway
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=device.type == "cuda")
    rows = []
    for layout, attention in PATHS:
        row = {"shape": shape, "path": f"{layout} + {attention}", "layout": layout, "attention": attention}
        reason = unavailable(attention, device)
        if reason:
            rows.append(row | {"status": reason})
            print(f"{shape}, {row['path']}: {reason}", flush=True)
            continue
        model.set_attn_implementation(attention)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, losses, tokens, positions = [], [], 0, 0
        for i, examples in enumerate(steps):
            batches = micro_batches(examples, layout, settings, pad_id)
            sync(device)
            started = time.perf_counter()
            losses.append(train_step(model, optimizer, batches).item())
            times.append(time.perf_counter() - started)
            if i >= settings.warmup:
                tokens += sum(int(b["n_tokens"]) for b in batches)
                positions += sum(b["input_ids"].numel() for b in batches)
        timed = sum(times[settings.warmup :])
        tokens_per_s = tokens / timed
        # Padded positions are computed but are not useful work: MFU counts non-pad tokens only, as
        # the training loop does, and attention over each example's own length.
        seq_len = attention_length(len(e["input_ids"]) for examples in steps[settings.warmup :] for e in examples)
        c = model.config
        flops = tokens_per_s * flops_per_token(
            layers=c.num_hidden_layers, hidden=c.hidden_size, vocab=c.vocab_size, n_params=n_params, seq_len=seq_len
        )
        row |= {
            "status": "ok",
            "tokens_per_s": tokens_per_s,
            **{f"mfu_{name}": flops / (peak * 1e12) if peak else None for name, peak in peaks.items()},
            "step_s": timed / settings.steps,
            "warmup_s": sum(times[: settings.warmup]),
            "tokens_per_step": tokens / settings.steps,
            "positions_per_step": positions / settings.steps,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "loss": statistics.fmean(losses),
        }
        rows.append(row)
        print(f"{shape}, {row['path']}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
    del model, optimizer
    release(device)
    return rows


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- 2. decoding


@dataclass
class Sample:
    ttft: float  # seconds from the burst's arrival to this request's first token
    latency: float  # ... to its last
    tokens: int


def our_burst(model, prompts: list[list[int]], params: SamplingParams, stop_ids: set[int], pad_id: int) -> list[Sample]:
    decoder = BatchDecoder(model, pad_id, stop_ids)
    sync(model.device)
    started = time.perf_counter()
    rows, tokens = decoder.add(prompts, [params] * len(prompts))
    first = time.perf_counter() - started
    produced, ended = dict.fromkeys(rows, 0), {}
    while True:
        for row, token in zip(rows, tokens):
            finish = finish_reason(token, produced[row], stop_ids, params.max_tokens)
            if finish != "stop":
                produced[row] += 1
            if finish:
                ended[row] = time.perf_counter() - started
        rows = [r for r in rows if r not in ended]
        if not rows:
            return [Sample(first, ended[r], produced[r]) for r in ended]
        decoder.keep(rows)
        tokens = decoder.step()


def dolly_queue(model, prompts: list[list[int]], new_tokens: int, end_id: int, pad_id: int) -> list[Sample]:
    """Dolly's InstructionTextGenerationPipeline, one request after another from one queue."""
    samples = []
    started = time.perf_counter()
    for prompt in prompts:
        ids = torch.tensor([prompt], device=model.device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            top_p=generation.TOP_P,
            top_k=generation.TOP_K,
            max_new_tokens=new_tokens,
            eos_token_id=end_id,
            pad_token_id=pad_id,
        )
        latency = time.perf_counter() - started
        samples.append(Sample(latency, latency, int((out[0, ids.shape[1] :] != end_id).sum())))
    return samples


def summary(engine: str, level: int, samples: list[Sample]) -> dict:
    ttft = [s.ttft for s in samples]
    return {
        "engine": engine,
        "concurrency": level,
        "tokens_per_s": sum(s.tokens for s in samples) / max(s.latency for s in samples),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "tokens": sum(s.tokens for s in samples),
    }


@torch.inference_mode()
def bench_decoding(lengths: list[list[int]], settings: Settings, device, dtype, end_id: int, pad_id: int) -> list[dict]:
    model = random_model(settings.decode_shape, device, dtype).eval()
    ids = torch.Generator().manual_seed(1)
    fitting = [prompt for n, prompt in lengths if n <= settings.row_tokens][: max(LEVELS)]
    prompts = [torch.randint(1, ORDINARY_IDS, (n,), generator=ids).tolist() for n in fitting]
    params = SamplingParams(max_tokens=settings.new_tokens)  # Dolly's: T 1, top_p 0.92, top_k 0
    torch.manual_seed(0)
    our_burst(model, prompts[:2], SamplingParams(max_tokens=4), {end_id}, pad_id)  # warm-up: kernels, allocator
    dolly_queue(model, prompts[:1], 4, end_id, pad_id)
    rows = [summary("ours", level, our_burst(model, prompts[:level], params, {end_id}, pad_id)) for level in LEVELS]
    queue = dolly_queue(model, prompts, settings.new_tokens, end_id, pad_id)
    rows += [summary("Dolly's generate", level, queue[:level]) for level in LEVELS]
    for row in rows:
        print(f"decode, {row['engine']}, concurrency {row['concurrency']}: {row['tokens_per_s']:.1f} tok/s", flush=True)
    del model
    release(device)
    return rows


# ---------------------------------------------------------------------------- 3. report


def tables(report: dict) -> str:
    spec = (
        f"the {report['spec_preset']} preset's spec peak of {report['spec_peak_tflops']:.4g} TFLOP/s (the training loop's)"
        if report["spec_peak_tflops"]
        else "no spec peak (no preset names this device)"
    )
    lines = [
        f"Training steps, {report['dtype']}, {report['optimizer']}; MFU against the measured peak of "
        f"{report['measured_peak_tflops']:.4g} TFLOP/s and against {spec}:",
        "",
        "| shape | path | non-pad tokens/s | MFU (measured peak) | MFU (spec peak) | step (s) | warm-up steps (s) "
        "| tokens / positions per step | peak memory (GiB) | loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["train"]:
        if r["status"] != "ok":
            lines.append(f"| {r['shape']} | {r['path']} | {r['status']} | | | | | | | |")
            continue
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        mfu_spec = f"{100 * r['mfu_spec']:.1f}%" if r["mfu_spec"] is not None else "-"
        lines.append(
            f"| {r['shape']} | {r['path']} | {r['tokens_per_s']:,.0f} | {100 * r['mfu_measured']:.1f}% | {mfu_spec} | {r['step_s']:.3f} "
            f"| {r['warmup_s']:.1f} | {r['tokens_per_step']:,.0f} / {r['positions_per_step']:,.0f} | {memory} | {r['loss']:.4f} |"
        )
    lines += [
        "",
        f"Decoding, {report['decode_shape']}, Dolly's sampling, {report['new_tokens']} new tokens, a burst of requests at once:",
        "",
        *decode_table(report["decode"], "Dolly's generate", "Dolly"),
    ]
    return "\n".join(lines)


def decode_table(rows: list[dict], other: str, name: str) -> list[str]:
    """The Markdown table of decoding `rows` (summary's), ours against the engine `other`, headed `name`."""
    decode = {(r["engine"], r["concurrency"]): r for r in rows}
    lines = [
        f"| concurrency | ours tok/s | {name} tok/s | ours / {name} | TTFT p50 / p99 ours (s) | TTFT p50 / p99 {name} (s) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for level in LEVELS:
        o, d = decode["ours", level], decode[other, level]
        lines.append(
            f"| {level} | {o['tokens_per_s']:.1f} | {d['tokens_per_s']:.1f} | **{o['tokens_per_s'] / d['tokens_per_s']:.2f}x** "
            f"| {o['ttft_p50_s']:.3f} / {o['ttft_p99_s']:.3f} | {d['ttft_p50_s']:.3f} / {d['ttft_p99_s']:.3f} |"
        )
    return lines


def run(lengths_file: Path, out: Path, settings: Settings) -> None:
    started = time.perf_counter()
    facts = json.loads(lengths_file.read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU: exact enough for the losses to agree tightly
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    preset, spec = spec_peak(name)
    peak = measured_peak_tflops(device, dtype, settings.matmul)
    print(f"{name}: {peak:.1f} TFLOP/s measured ({settings.matmul}^3 {dtype} matmul), spec {spec or '-'}", flush=True)
    steps = training_steps(facts["examples"], settings, settings.warmup + settings.steps)
    peaks = {"measured": peak, "spec": spec}
    train = [
        row
        for shape in settings.train_shapes
        for row in bench_training(shape, steps, settings, device, dtype, peaks, facts["pad_id"])
    ]
    decode = bench_decoding(facts["examples"], settings, device, dtype, facts["end_id"], facts["pad_id"])
    report = {
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "optimizer": "plain torch AdamW at lr 0 (no DeepSpeed)",
        "measured_peak_tflops": peak,
        "spec_preset": preset,
        "spec_peak_tflops": spec,
        "settings": asdict(settings),
        "decode_shape": settings.decode_shape,
        "new_tokens": settings.new_tokens,
        "examples": f"{facts['kept']} Dolly example lengths from {facts['corpus']}",
        "train": train,
        "decode": decode,
    }
    report["wall_s"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\n{tables(report)}\n\nwall {report['wall_s']:.0f} s; {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    lengths = commands.add_parser("lengths", help="write the Dolly example lengths (here, where ../shared is)")
    lengths.add_argument("--corpus", type=Path, default=REPO.parent / "shared/data/databricks-dolly-15k.jsonl")
    lengths.add_argument("--tokenizer", default=str(REPO.parent / "shared/tokenizer/pythia"))
    lengths.add_argument("--records", type=int, default=None, help="the first N records only (default: all)")
    lengths.add_argument("--out", type=Path, default=LENGTHS)
    check = commands.add_parser("run", help="the check (on the GPU machine)")
    check.add_argument("--lengths", type=Path, default=LENGTHS, help="written by the lengths command")
    check.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "gpu_check.json")
    check.add_argument("--smoke", action="store_true", help="tiny shapes, short rows, few steps: seconds on a CPU")
    args = parser.parse_args()
    if args.command == "lengths":
        write_lengths(args.corpus, args.tokenizer, args.out, args.records)
    else:
        run(args.lengths, args.out, SMOKE if args.smoke else FULL)


if __name__ == "__main__":
    main()
