"""Issue 25's feasibility run (bench/RESULTS.md): Ray Serve LLM on CPU: vLLM's CPU build behind `build_openai_app`, on a local Ray with logical CPUs only.
Usage: serve_llm.py [--eager] [--model ID FOLDER]... [--lora s3://BUCKET] ; serves on 127.0.0.1:18000 until killed."""

import argparse
import os
import signal
import sys
import time

import ray
from ray import serve
from ray.serve.llm import LLMConfig, build_openai_app


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", action="append", nargs=2, metavar=("ID", "FOLDER"), required=True, help="repeatable")
    p.add_argument("--eager", action="store_true")
    p.add_argument("--port", type=int, default=18000)
    p.add_argument("--lora", help="dynamic_lora_loading_path (Ray Serve LLM wants a cloud URI)")
    a = p.parse_args()
    models = a.model

    # address="local": a cluster of our own, never one that other work on this machine started; logical CPUs
    # Each LLM replica reserves 2 (its actor 1 + the engine bundle 1, merged in one bundle), the ingress 1.
    ray.init(address="local", num_cpus=2 * len(models) + 1, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})  # not 8000: other Serve tests here use it
    configs = [
        LLMConfig(
            model_loading_config={"model_id": model_id, "model_source": folder},
            # kind=cpu -> CPUAccelerator: {"CPU": 1} bundles and the 'mp' executor (llm_config.py / vllm_models.py)
            accelerator_config={"kind": "cpu"},
            deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
            engine_kwargs={"dtype": "bfloat16", "max_model_len": 1024, "max_num_seqs": 4, "enforce_eager": a.eager}
            | ({"enable_lora": True, "max_lora_rank": 8, "max_loras": 1} if a.lora else {}),
            lora_config={"dynamic_lora_loading_path": a.lora} if a.lora else None,
            # the replica reads the adapters' S3 (s3_lora.sh's local moto) with boto3, configured by AWS_* env vars
            runtime_env={
                "env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"} | {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
            },
        )
        for model_id, folder in models
    ]
    t0 = time.perf_counter()
    app = build_openai_app(
        {"llm_configs": configs, "ingress_deployment_config": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}}
    )
    serve.run(app, blocking=False)
    print(f"READY in {time.perf_counter() - t0:.1f}s", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(1)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
