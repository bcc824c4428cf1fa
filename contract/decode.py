"""Rows decoded together with one KV cache, joining and leaving between steps: the decode loop
of dynamic batching.

Prompts are left-padded so every row's next token sits in the last column; position ids count
only real tokens, so a padded row computes exactly what it would alone. A group of new prompts is
prefilled on its own and then joins the running rows (both sides left-padded to one length);
finished rows leave at once, so they cost nothing while the others go on. Each row counts the
tokens it has generated, for the frequency and presence penalties and for holding its stop tokens
back until it has `min_tokens`.

On a PEFT model holding several LoRA adapters, each row names its own (None: the base alone), and
every step computes each row with its adapter (PEFT's mixed-adapter batches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contract.sampling import SamplingParams, generators_for, hold_back_stops, penalize, sample


def finish_reason(token: int, generated: int, stop_ids: set[int], max_tokens: int) -> str | None:
    """How a row that has `generated` tokens so far ends at `token`: "stop" at a stop token (not
    part of the answer), "length" when `token` is its max_tokens-th, None while it goes on. Serving
    and evaluation both end answers by this, so scores describe what users get."""
    if token in stop_ids:
        return "stop"
    return "length" if generated + 1 >= max_tokens else None


# PEFT's name for "no adapter" in a mixed-adapter batch.
BASE_ROWS = "__base__"


class BatchDecoder:
    def __init__(self, model, pad_id: int, stop_ids: set[int] | frozenset[int] = frozenset()):
        self._model, self._pad_id, self._stop_ids = model, pad_id, frozenset(stop_ids)
        self._device = model.device
        self._peft = hasattr(model, "peft_config")  # a PeftModel: every row says which adapter it runs
        self._next_id = 0
        self._clear()

    def _clear(self) -> None:
        self.rows: list[int] = []  # the id `add` gave each row, in batch order
        self._params: list[SamplingParams] = []
        self._generators: list[torch.Generator | None] = []
        self._adapters: list[str] = []
        self._cache = None
        self._mask = None  # [rows, cache length]: 1 where a row has a real token
        self._last = None  # [rows, 1]: each row's newest token, not in the cache yet
        self._counts = None  # [rows, vocab]: how often each row has generated each token

    def _adapter_names(self, adapters: list[str]) -> dict:
        return {"adapter_names": adapters} if self._peft else {}

    @torch.inference_mode()
    def add(
        self, prompts: list[list[int]], params: list[SamplingParams], adapters: list[str | None] | None = None
    ) -> tuple[list[int], list[int]]:
        """Prefill new rows (each on its adapter, if any); their ids and first tokens."""
        adapters = [a or BASE_ROWS for a in adapters or [None] * len(prompts)]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long, device=self._device)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, device=self._device)
            mask[row, width - len(prompt) :] = 1
        out = self._model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,
            **self._adapter_names(adapters),
        )
        generators = generators_for(params, self._device)
        nothing_yet = torch.zeros(len(prompts), device=self._device)
        tokens = sample(hold_back_stops(out.logits[:, -1], nothing_yet, params, self._stop_ids), params, generators)
        counts = torch.zeros(len(prompts), out.logits.shape[-1], device=self._device)
        counts.scatter_add_(1, tokens[:, None], torch.ones_like(counts[:, :1]))
        new_ids = list(range(self._next_id, self._next_id + len(prompts)))
        self._next_id += len(prompts)
        if self._cache is None:
            self._cache, self._mask, self._last, self._counts = out.past_key_values, mask, tokens[:, None], counts
        else:
            self._join(out.past_key_values, mask, tokens[:, None])
            self._counts = torch.cat([self._counts, counts])
        self.rows += new_ids
        self._params += params
        self._generators += generators
        self._adapters += adapters
        return new_ids, tokens.tolist()

    @torch.inference_mode()
    def step(self) -> list[int]:
        """The next token of every row in `rows`."""
        positions = self._mask.sum(-1, keepdim=True)
        self._mask = torch.cat([self._mask, torch.ones_like(positions)], dim=-1)
        out = self._model(
            input_ids=self._last,
            attention_mask=self._mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
            **self._adapter_names(self._adapters),
        )
        self._cache = out.past_key_values
        logits = penalize(out.logits[:, -1], self._counts, self._params)
        logits = hold_back_stops(logits, self._counts.sum(-1), self._params, self._stop_ids)
        tokens = sample(logits, self._params, self._generators)
        self._last = tokens[:, None]
        self._counts.scatter_add_(1, self._last, torch.ones_like(self._counts[:, :1]))
        return tokens.tolist()

    def keep(self, rows: list[int]) -> None:
        """Go on with these rows only."""
        if rows == self.rows:
            return
        if not rows:
            self._clear()
            return
        index = [self.rows.index(r) for r in rows]
        selected = torch.tensor(index, device=self._device)
        # Columns that are padding in every remaining row are dropped with the rows.
        start = int(self._mask[selected].any(0).int().argmax())
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys[selected, :, start:], layer.values[selected, :, start:]
        self._mask, self._last, self._counts = self._mask[selected, start:], self._last[selected], self._counts[selected]
        self._params = [self._params[i] for i in index]
        self._generators = [self._generators[i] for i in index]
        self._adapters = [self._adapters[i] for i in index]
        self.rows = list(rows)

    def _join(self, cache, mask: torch.Tensor, last: torch.Tensor) -> None:
        length = max(self._mask.shape[1], mask.shape[1])

        def left_pad(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            pad = length - t.shape[-dim_from_end]
            return F.pad(t, (0, 0) * (dim_from_end - 1) + (pad, 0)) if pad else t

        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, 2), left_pad(theirs.keys, 2)])
            mine.values = torch.cat([left_pad(mine.values, 2), left_pad(theirs.values, 2)])
        self._mask = torch.cat([left_pad(self._mask, 1), left_pad(mask, 1)])
        self._last = torch.cat([self._last, last])
