"""Training batches from shard rows: padded or packed rows become the tensors a causal LM takes.

Rows are right-padded, so under the causal mask no real token ever attends to a pad, and pads
carry label -100; so no attention mask is passed. That is also what lets transformers isolate
the examples of a packed row: it builds block-diagonal attention from restarting `position_ids`
only when there is no attention mask (and `use_cache=False`). Padded and packed rows therefore
go through one code path: input_ids, labels, position_ids.
"""

from __future__ import annotations

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from contract import IGNORE_INDEX

# Dolly pads batches to a multiple of 8 (tensor-core-friendly shapes).
PAD_MULTIPLE = 8


def collate(batch: dict[str, np.ndarray], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A Ray Data numpy batch of shard rows -> input_ids, labels, position_ids (int64, [rows, length])
    and n_tokens (the non-pad tokens, for throughput)."""
    rows = [np.asarray(ids) for ids in batch["input_ids"]]
    length = -(-max(len(r) for r in rows) // PAD_MULTIPLE) * PAD_MULTIPLE
    shape = (len(rows), length)
    input_ids = np.full(shape, pad_token_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    # Pads continue counting past the row's last position: no restart, so they join no example.
    position_ids = np.tile(np.arange(length, dtype=np.int64), (len(rows), 1))
    packed = "position_ids" in batch
    for i, ids in enumerate(rows):
        n = len(ids)
        input_ids[i, :n] = ids
        labels[i, :n] = batch["labels"][i]
        if packed:
            position_ids[i, :n] = batch["position_ids"][i]
            position_ids[i, n:] += int(position_ids[i, n - 1]) + 1 - n
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "n_tokens": torch.tensor(sum(len(r) for r in rows)),
    }


class Collate(NumpyBatchCollateFn):
    """`collate` for `iter_torch_batches`, which then moves the tensors to the worker's device."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return collate(batch, self.pad_token_id)
