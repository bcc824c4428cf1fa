"""vLLM against ours on one GPU (issue 25): gpu_check.py's decoding, with vLLM's engine beside our
BatchDecoder, side by side in one run on the same random model, the same Dolly-length prompts and
Dolly's sampling (T 1, top_p 0.92, top_k 0): a burst of 1, 8 and 32 requests arriving at once.
Reported: output tokens/s and time to first token p50 / p99, ours / vLLM.

vLLM runs as Ray Serve LLM runs it, its AsyncLLM engine (paged KV cache, continuous batching,
CUDA graphs), here in process and without Ray: the HTTP and Serve in front are the same on both
engines (bench/serve_bench.py measures them). Both engines hold the model at once, so the levels
alternate between them: vLLM's KV cache takes --gpu-memory-utilization of the GPU, ours what is
left.

It needs vLLM, which the device image lacks (its CUDA wheels are far over what can be carried
there): run it on a GPU node of k8s/'s vLLM image (Dockerfile.vllm), with the lengths file made
here. `--smoke` runs tiny shapes on vLLM's CPU build (`make vllm`; tests/test_gpu_check.py).

    .venv/bin/python bench/gpu/gpu_check.py lengths                   # bench/out/dolly_lengths.json
    python bench/gpu/vllm_decode.py --out vllm_decode.json            # there
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_check, which puts the repository on the path

import gpu_check  # noqa: E402
import torch  # noqa: E402
from gpu_check import (  # noqa: E402
    FULL,
    LENGTHS,
    LEVELS,
    ORDINARY_IDS,
    SMOKE,
    Sample,
    decode_table,
    our_burst,
    random_model,
    summary,
)

from contract.sampling import SamplingParams  # noqa: E402

_REQUEST_IDS = itertools.count()


async def vllm_burst(engine, prompts: list[list[int]], params: SamplingParams, stop_ids: set[int]) -> list[Sample]:
    from vllm import SamplingParams as VLLMParams

    sampling = VLLMParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k or -1,  # vLLM's "off"
        max_tokens=params.max_tokens,
        stop_token_ids=sorted(stop_ids),
        detokenize=False,  # token ids in, token ids out: no tokenizer, as in ours
    )
    started = time.perf_counter()

    async def one(prompt: list[int]) -> Sample:
        first, ids = None, []
        async for out in engine.generate({"prompt_token_ids": prompt}, sampling, request_id=str(next(_REQUEST_IDS))):
            ids = out.outputs[0].token_ids
            if first is None and ids:
                first = time.perf_counter() - started
        produced = len(ids) - (bool(ids) and ids[-1] in stop_ids)  # vLLM returns the stop token; ours counts none
        return Sample(first, time.perf_counter() - started, produced)

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def vllm_engine(folder: Path, dtype: torch.dtype, context: int, memory_share: float, gpu: bool):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=str(folder),
        skip_tokenizer_init=True,
        dtype=str(dtype).removeprefix("torch."),
        max_model_len=context,
        max_num_seqs=max(LEVELS),
        gpu_memory_utilization=memory_share,
        enforce_eager=not gpu,  # on a CPU torch.compile costs minutes; on a GPU CUDA graphs are vLLM's way
    )
    return AsyncLLM.from_engine_args(args)


async def bench(lengths: list[list[int]], settings, device, dtype, end_id: int, pad_id: int, memory_share: float) -> list[dict]:
    model = random_model(settings.decode_shape, device, dtype).eval()
    ids = torch.Generator().manual_seed(1)
    fitting = [prompt for n, prompt in lengths if n <= settings.row_tokens][: max(LEVELS)]
    prompts = [torch.randint(1, ORDINARY_IDS, (n,), generator=ids).tolist() for n in fitting]
    params = SamplingParams(max_tokens=settings.new_tokens)  # Dolly's: T 1, top_p 0.92, top_k 0
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True)  # the same weights, for vLLM to load
        context = max(map(len, prompts)) + settings.new_tokens
        engine = vllm_engine(Path(folder), dtype, context, memory_share, device.type == "cuda")
        try:
            with torch.inference_mode():
                our_burst(model, prompts[:2], SamplingParams(max_tokens=4), {end_id}, pad_id)  # warm-up
            await vllm_burst(engine, prompts[:2], SamplingParams(max_tokens=4), {end_id})
            rows = []
            for level in LEVELS:  # the engines alternate, so that anything else on the machine falls on both
                with torch.inference_mode():
                    rows.append(summary("ours", level, our_burst(model, prompts[:level], params, {end_id}, pad_id)))
                rows.append(summary("vLLM", level, await vllm_burst(engine, prompts[:level], params, {end_id})))
                for row in rows[-2:]:
                    print(f"decode, {row['engine']}, concurrency {level}: {row['tokens_per_s']:.1f} tok/s", flush=True)
        finally:
            engine.shutdown()
            del engine  # now, while vLLM's modules are there: its __del__ shuts down again and fails at exit
            gc.collect()
    return rows


def table(report: dict) -> str:
    heading = (
        f"Decoding on {report['device']}, {report['decode_shape']} ({report['dtype']}), Dolly's sampling, "
        f"{report['new_tokens']} new tokens, a burst of requests at once, vLLM {report['vllm']}:"
    )
    return "\n".join([heading, "", *decode_table(report["decode"], "vLLM", "vLLM")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=Path, default=LENGTHS, help="written by `gpu_check.py lengths`")
    parser.add_argument("--out", type=Path, default=gpu_check.REPO / "bench" / "out" / "vllm_decode.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few tokens: vLLM's CPU build runs it")
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.5, help="the GPU's share vLLM takes (its KV cache); ours uses the rest"
    )
    args = parser.parse_args()
    import vllm

    settings = SMOKE if args.smoke else FULL
    facts = json.loads(args.lengths.read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    decode = asyncio.run(
        bench(facts["examples"], settings, device, dtype, facts["end_id"], facts["pad_id"], args.gpu_memory_utilization)
    )
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "decode_shape": settings.decode_shape,
        "new_tokens": settings.new_tokens,
        "decode": decode,
        "wall_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\n{table(report)}\n\nwall {report['wall_s']:.0f} s; {args.out}")


if __name__ == "__main__":
    main()
