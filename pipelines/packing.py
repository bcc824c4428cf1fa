"""Packing: several examples in one row, so that a batch is tokens rather than padding.

Each example keeps its own position ids (restarting at 0) and its length in `seq_lens`. Given
position ids that restart, transformers builds a block-diagonal causal mask (sdpa, eager, flex),
so attention never crosses from one example into the next, provided the forward pass has no
attention mask and `use_cache=False` (with a KV cache, transformers skips the packed-sequence
check). Flash-attention finds the boundaries only in a one-row batch: TrainConfig therefore
refuses it with several rows per micro-batch unless they are flattened into one
(`padding_free`, pipelines/batches.py). The loss cannot cross either: every example starts with prompt tokens,
whose labels are -100.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from contract import IGNORE_INDEX

_IDS = pa.list_(pa.int32())
PACKED_SCHEMA = pa.schema(
    [("input_ids", _IDS), ("labels", _IDS), ("position_ids", _IDS), ("seq_lens", _IDS), ("n_tokens", pa.int32())]
)


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins of at most `capacity` tokens (first-fit decreasing).

    Bins come out in order of their first (longest) example; indices in a bin keep input order,
    so a shuffled input stays shuffled within rows.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"example {i} has {lengths[i]} tokens, more than the row capacity {capacity}")
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


def pack_batch(batch: dict[str, np.ndarray], *, max_length: int) -> pa.Table:
    """Pack a batch of tokenized examples into rows of at most `max_length` tokens
    (a Ray Data `map_batches` function)."""
    input_ids, labels = list(batch["input_ids"]), list(batch["labels"])
    packed: dict[str, list] = {name: [] for name in PACKED_SCHEMA.names}
    for members in first_fit_decreasing([len(x) for x in input_ids], max_length):
        for i in members:
            if labels[i][0] != IGNORE_INDEX:
                raise ValueError("a packed example must start with a masked prompt token")
        packed["input_ids"].append(np.concatenate([input_ids[i] for i in members]))
        packed["labels"].append(np.concatenate([labels[i] for i in members]))
        packed["position_ids"].append(np.concatenate([np.arange(len(input_ids[i])) for i in members]))
        packed["seq_lens"].append([len(input_ids[i]) for i in members])
        packed["n_tokens"].append(sum(len(input_ids[i]) for i in members))
    # An explicit schema keeps plain Parquet list columns (not Ray's tensor extension type), so
    # any Parquet reader can open the shards.
    return pa.table(packed, schema=PACKED_SCHEMA)
