"""How an answer is decoded, as one typed value: the sampling settings serving, evaluation, the
behavioural scores and the exported model all take from here (by default Dolly's
InstructionTextGenerationPipeline: contract.generation's constants).

A model carries its own in the export's generation_config.json, as transformers' `generate` and
vLLM read a model's generation config for their defaults: `generation_config` writes it and
`of_model` reads it back. transformers' GenerationConfig keeps the OpenAI penalties it has no
field for as plain attributes, so they travel in the same file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from contract import generation

if TYPE_CHECKING:  # torch and transformers load where decoding happens, not where settings are read
    from transformers import GenerationConfig

    from contract.sampling import SamplingParams

GENERATION_CONFIG = "generation_config.json"
# Its keys a decoding sets (the OpenAI penalties are ours: transformers keeps them as attributes).
_GENERATION_KEYS = ("do_sample", "temperature", "top_p", "top_k", "max_new_tokens", "frequency_penalty", "presence_penalty")


class Decoding(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(generation.TEMPERATURE, ge=0, le=2, description="0 means greedy decoding")
    top_p: float = Field(generation.TOP_P, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(generation.TOP_K, ge=0, description="0 disables top-k, as in Dolly")
    max_tokens: int = Field(generation.MAX_NEW_TOKENS, ge=1, description="new tokens at most (Dolly's max_new_tokens)")
    frequency_penalty: float = Field(
        0.0, ge=-2, le=2, description="OpenAI's: lower a token's logit by this per time it was generated (0: off, as Dolly)"
    )
    presence_penalty: float = Field(
        0.0, ge=-2, le=2, description="OpenAI's: lower a token's logit by this once it was generated (0: off, as Dolly)"
    )

    def greedy(self) -> Decoding:
        return self.model_copy(update={"temperature": 0.0})

    def params(self, **request) -> SamplingParams:
        """The sampling parameters of one request that sets `request` (seed, stop, min_tokens...)."""
        from contract.sampling import SamplingParams

        return SamplingParams(**self.model_dump(), **request)

    def describe(self) -> str:
        """E.g. "T 0.7, top_p 0.92, frequency penalty 0.3, at most 128 new tokens"."""
        parts = ["greedy"] if self.temperature == 0 else [f"T {self.temperature:g}", f"top_p {self.top_p:g}"]
        parts += [f"top_k {self.top_k}"] if self.top_k and self.temperature else []
        parts += [f"frequency penalty {self.frequency_penalty:g}"] if self.frequency_penalty else []
        parts += [f"presence penalty {self.presence_penalty:g}"] if self.presence_penalty else []
        return ", ".join(parts + [f"at most {self.max_tokens} new tokens"])

    def generation_config(self, eos_token_id: int, pad_token_id: int) -> GenerationConfig:
        """This decoding as a model's generation_config.json, stopping at `eos_token_id` (`### End`)."""
        from transformers import GenerationConfig

        return GenerationConfig(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **self._generation_keys())

    def write_to(self, folder: Path) -> None:
        """Make this the decoding the model in `folder` carries: the sampling keys of its
        generation_config.json replaced, its stop and pad ids (and anything else) kept."""
        path = Path(folder) / GENERATION_CONFIG
        found = json.loads(path.read_text()) if path.is_file() else {}
        kept = {k: v for k, v in found.items() if k not in _GENERATION_KEYS}
        path.write_text(json.dumps(kept | self._generation_keys(), indent=2, sort_keys=True) + "\n")

    def _generation_keys(self) -> dict:
        sampled = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k} if self.temperature else {}
        penalties = {k: getattr(self, k) for k in ("frequency_penalty", "presence_penalty") if getattr(self, k)}
        return {"do_sample": self.temperature > 0, **sampled, "max_new_tokens": self.max_tokens, **penalties}

    @classmethod
    def of_model(cls, folder: Path) -> Decoding:
        """The decoding a model folder carries; Dolly's for what its generation_config.json (if
        any) leaves out. Greedy where it says do_sample false."""
        path = Path(folder) / GENERATION_CONFIG
        found = json.loads(path.read_text()) if path.is_file() else {}
        fields = {"max_tokens": found.get("max_new_tokens")} | {
            k: found.get(k) for k in ("temperature", "top_p", "top_k", "frequency_penalty", "presence_penalty")
        }
        if found.get("do_sample") is False:
            fields["temperature"] = 0.0
        return cls(**{k: v for k, v in fields.items() if v is not None})
