"""LoRA with PEFT: adapters on the base's linear layers, and Dolly's new tokens learned in place.

Dolly adds three tokens (`### End`, `### Instruction:`, `### Response:` + newline) that the base
has never seen. A frozen embedding would leave them where `init_special_tokens` put them, so the
model could never learn to say `### End`: PEFT's trainable tokens train those rows alone, in the
input embedding and, when it is a separate matrix (GPTNeoX's embed_out), in the output one, and
store them with the adapter. That costs 3 rows, not the whole matrix as `modules_to_save` would.

On a base tuned in Dolly's format (a `dolly up` export, dolly-v2) the rows are trained already and
the adapter is LoRA alone: the kind vLLM's LoRA serves (it loads no embedding rows).
"""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model

from pipelines.configs import LORA_TARGETS, LoraSettings


def adapt(model, settings: LoraSettings, token_ids: list[int], base_name: str) -> PeftModel:
    """`model` wrapped with LoRA adapters per `settings` and trainable rows for `token_ids` (none:
    LoRA alone); only those are left trainable. `base_name` is recorded in the adapter as the base
    to load it on."""
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules or LORA_TARGETS.get(model.config.model_type, "all-linear"),
        trainable_token_indices=_token_rows(model, token_ids) if token_ids else None,
    )
    model.name_or_path = base_name  # PEFT names the adapter's base after it
    return get_peft_model(model, config)


def _token_rows(model, token_ids: list[int]) -> dict[str, list[int]]:
    """{embedding module name: rows} for the input embedding, and for the output one unless it is
    tied to the input (PEFT then keeps the tied rows in step itself)."""
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    rows = {names[inputs]: list(token_ids)}
    if outputs is not None and outputs.weight is not inputs.weight:
        rows[names[outputs]] = list(token_ids)
    return rows


def quantization(compute_dtype):
    """QLoRA's base: NF4 weights with double quantization (the QLoRA paper's), computing in the
    run's precision."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype
    )


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
