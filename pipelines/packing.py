"""Packing: several examples in one row, so that a batch is tokens rather than padding.

Each example keeps its own position ids (restarting at 0) and its length in `seq_lens`. Given
position ids that restart, transformers builds a block-diagonal causal mask (or flash-attention's
varlen boundaries), so attention never crosses from one example into the next. The loss cannot
cross either: every example starts with prompt tokens, whose labels are -100.
"""

from __future__ import annotations

import numpy as np

from pipelines.tokenize import IGNORE_INDEX


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


def pack_batch(batch: dict[str, np.ndarray], *, max_length: int) -> dict[str, list]:
    """Pack a batch of tokenized examples into rows of at most `max_length` tokens
    (a Ray Data `map_batches` function)."""
    input_ids, labels = list(batch["input_ids"]), list(batch["labels"])
    packed: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": [], "n_tokens": []}
    for members in first_fit_decreasing([len(x) for x in input_ids], max_length):
        for i in members:
            if labels[i][0] != IGNORE_INDEX:
                raise ValueError("a packed example must start with a masked prompt token")
        packed["input_ids"].append(np.concatenate([input_ids[i] for i in members]).astype(np.int32))
        packed["labels"].append(np.concatenate([labels[i] for i in members]).astype(np.int32))
        packed["position_ids"].append(np.concatenate([np.arange(len(input_ids[i])) for i in members]).astype(np.int32))
        packed["seq_lens"].append(np.array([len(input_ids[i]) for i in members], dtype=np.int32))
        packed["n_tokens"].append(int(sum(len(input_ids[i]) for i in members)))
    return packed
