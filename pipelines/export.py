"""The end of a run: one Hugging Face folder that `transformers.pipeline` loads as it is.

model.safetensors        consolidated 16-bit weights (gathered from every rank under ZeRO-3);
  config.json            with method=lora instead PEFT's adapter_model.safetensors and
                         adapter_config.json, which names the base (and, on request, the adapter
                         merged into its base in a second, plain folder)
tokenizer                the tokenizer with Dolly's special tokens, and Dolly's prompt as its chat template
generation_config.json   eos = the `### End` id, and the decoding it is served with (contract.decoding)
README.md                model card: base model, data fingerprint, hyperparameters, metrics
training.json            the same facts, for programs
"""

from __future__ import annotations

import copy
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from peft import PeftModel
from transformers import GenerationConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from contract import CHAT_TEMPLATE, END_KEY
from contract.decoding import Decoding
from contract.models import load_model
from contract.registry import TRAINING_FACTS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def export(engine, tokenizer, folder: Path, dtype: str, facts: dict, merged: Path | None = None) -> Path | None:
    """Every rank (ZeRO-3 gathers the weights from all of them); rank 0 writes `folder` (and for
    an adapter, `merged` if given) and returns it, the others return None. A folder appears
    complete or not at all."""
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if dist.get_rank() == 0 else None
    if dist.get_rank() != 0:
        return None
    state = {name: tensor.detach().to("cpu", DTYPES[dtype]).contiguous() for name, tensor in state.items()}
    model = engine.module
    with _staged(folder, tokenizer, facts) as staging:
        if isinstance(model, PeftModel):
            model.save_pretrained(staging, state_dict=state)  # PEFT keeps the adapter's tensors only
        else:
            _save_plain(model, staging, state, dtype)
    if merged is not None and isinstance(model, PeftModel):
        # From the saved adapter on a freshly loaded base, on the CPU of rank 0: under ZeRO-3 the
        # engine's own base is partitioned across ranks, and nothing else may change it. Training
        # is over: transformers must stop building models partitioned, which rank 0 alone cannot.
        unset_hf_deepspeed_config()
        plain = load_model(model.peft_config["default"].base_model_name_or_path, tokenizer, dtype=DTYPES[dtype])
        plain = PeftModel.from_pretrained(plain, folder).merge_and_unload()
        with _staged(merged, tokenizer, {**facts, "merged_from": str(folder)}) as staging:
            _save_plain(plain, staging, plain.state_dict(), dtype)
    return folder


@contextmanager
def _staged(folder: Path, tokenizer, facts: dict):
    """A staging folder to write the weights into; then the tokenizer, generation config and
    facts are added, and it is renamed to `folder`."""
    staging = folder.with_name(folder.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    yield staging
    # Any server that reads the chat template (vLLM, TGI, llama.cpp, transformers' pipeline) then
    # prompts the model as it was trained.
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(staging)
    generation_config(tokenizer).save_pretrained(staging)
    (staging / TRAINING_FACTS).write_text(json.dumps(facts, indent=2, default=str) + "\n")
    (staging / "README.md").write_text(model_card(facts))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def _save_plain(model, staging: Path, state: dict, dtype: str) -> None:
    saved_config = model.config
    model.config = copy.deepcopy(saved_config)
    model.config.dtype = DTYPES[dtype]
    model.config.use_cache = True  # training turned it off; generation wants it
    try:
        model.save_pretrained(staging, state_dict=state)
    finally:
        model.config = saved_config


def generation_config(tokenizer, decoding: Decoding = Decoding()) -> GenerationConfig:
    """`decoding` (Dolly's by default) stopping at `### End` (Dolly's slow answers ran to
    max_new_tokens whenever this was missed)."""
    return decoding.generation_config(eos_token_id=tokenizer.convert_tokens_to_ids(END_KEY), pad_token_id=tokenizer.pad_token_id)


def model_card(facts: dict) -> str:
    config, metrics, data = facts["config"], facts["metrics"], facts["data"]
    rows = "\n".join(f"| `{key}` | `{value}` |" for key, value in config.items())
    results = "\n".join(
        f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |" for key, value in metrics.items()
    )
    if config.get("method") == "lora" and "merged_from" not in facts:
        lora = config["lora"]
        how = (
            f"adapted with LoRA (r={lora['r']}, alpha={lora['alpha']}; PEFT) on a frozen base; Dolly's new "
            "tokens' embedding rows are trained with the adapter (PEFT's trainable tokens). This folder is the "
            "adapter: `dolly serve`, `dolly eval` and `contract.models.load_model` load it on its base"
        )
    elif "merged_from" in facts:
        how = f"adapted with LoRA and merged into its base (the adapter: {facts['merged_from']})"
    else:
        how = "fully fine-tuned"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
base_model: {config["base_model"]}
tags: [dolly, instruction-tuning, ray, deepspeed]
---

# {facts["run_name"]}

{config["base_model"]} {how} on an instruction corpus in Dolly 2.0's prompt format, with
Ray Train and DeepSpeed ZeRO-{config["zero_stage"]} ({config["precision"]}, {config["num_workers"]} workers).
Weights are {config["export_dtype"]} safetensors.

## Prompting and stopping it

The tokenizer's chat template is Dolly's prompt (`contract.prompt.CHAT_TEMPLATE`): the last user
message is the instruction, system messages and earlier turns become its `Input:` context, and
the generation prompt ends with `### Response:` and a newline. The generation config stops at the
`{END_KEY}` token (its `eos_token_id`). So chat endpoints prompt and stop it as it was trained:

- transformers: `pipeline("text-generation", model=FOLDER)([{{"role": "user", "content": "..."}}])`
- vLLM: `vllm serve FOLDER`, then `/v1/chat/completions` (it reads the template and the eos token)
- TGI: `text-generation-launcher --model-id FOLDER`, then its `/v1/chat/completions`
- llama.cpp: convert with `convert_hf_to_gguf.py FOLDER` (the template travels in the GGUF), then
  `llama-server -m MODEL.gguf --jinja`

A plain-completion endpoint needs the prompt written out: `contract.prompt.render_generation_prompt`
(or the template's output), with `{END_KEY}` as the stop sequence.

## Data

- data manifest: `{data["manifest_sha256"]}` (sha256 of `manifest.json` in `{data["dir"]}`)
- source fingerprint: `{data["source_fingerprint"]}`
- tokenizer fingerprint: `{data["tokenizer_fingerprint"]}`
- training rows: {data["train_rows"]}, packed: {data["packed"]}

## Final metrics

| metric | value |
|---|---:|
{results}

## Hyperparameters

| setting | value |
|---|---|
{rows}
"""
