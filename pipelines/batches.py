"""Training batches from shard rows: padded or packed rows become the tensors a causal LM takes.

Rows are right-padded, so under the causal mask no real token ever attends to a pad, and pads
carry label -100; so no attention mask is passed. That is also what lets transformers isolate
the examples of a packed row: it builds block-diagonal attention from restarting `position_ids`
only when there is no attention mask (and `use_cache=False`). Padded and packed rows therefore
go through one code path: input_ids, labels, position_ids.

`flatten` is the padding-free alternative: a micro-batch becomes one row of all its examples,
end to end, with positions restarting at each (transformers' DataCollatorWithFlattening). No
pad is computed, and flash-attention's variable-length kernel, which transformers uses for a
one-row batch of restarting positions, computes no masked block either.

Ray-free (numpy, torch, transformers), so the GPU check (bench/gpu/) builds the same batches.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DataCollatorWithFlattening

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


def flatten(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A Ray Data numpy batch of shard rows -> one row ([1, tokens]) holding every example of the
    batch, positions restarting at each, and n_tokens. A packed row is split back into its
    examples at its restarting positions first."""
    examples = []
    for i, ids in enumerate(batch["input_ids"]):
        ids, labels = np.asarray(ids), np.asarray(batch["labels"][i])
        starts = np.flatnonzero(np.asarray(batch["position_ids"][i]) == 0)[1:] if "position_ids" in batch else []
        examples += [
            {"input_ids": e.tolist(), "labels": lab.tolist()} for e, lab in zip(np.split(ids, starts), np.split(labels, starts))
        ]
    flat = DataCollatorWithFlattening(return_tensors="pt", separator_id=IGNORE_INDEX)(examples)
    return {
        "input_ids": flat["input_ids"],
        "labels": flat["labels"],
        "position_ids": flat["position_ids"],
        "n_tokens": torch.tensor(flat["input_ids"].shape[1]),
    }


def example_lengths(batch: dict[str, np.ndarray]) -> list[int]:
    """The unpadded length of every example in a Ray Data numpy batch of shard rows: a packed
    row's examples start where its positions restart at 0."""
    lengths = []
    for i, ids in enumerate(batch["input_ids"]):
        starts = np.flatnonzero(np.asarray(batch["position_ids"][i]) == 0) if "position_ids" in batch else np.array([0])
        lengths += np.diff(np.append(starts, len(ids))).tolist()
    return lengths
