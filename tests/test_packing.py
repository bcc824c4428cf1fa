"""Packing and flattening are only worth it if they change nothing but speed: on a real GPTNeoX, a
packed row, or a micro-batch flattened into one row, gives the same loss and logits as its
examples run one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig

from contract import IGNORE_INDEX
from pipelines.batches import example_lengths, flatten
from pipelines.packing import first_fit_decreasing, pack_batch
from pipelines.tokenize import tokenize_examples

RECORDS = [
    {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"},
    {
        "instruction": "Summarize this.",
        "context": "Cats sleep most of the day, and hunt at night.",
        "response": "Cats nap by day.",
        "category": "summarization",
    },
    {
        "instruction": "List three fruits.",
        "context": "",
        "response": "Apple, pear and plum, which all grow on trees in temperate climates.",
        "category": "brainstorming",
    },
    {"instruction": "Is the sky green?", "context": "", "response": "No.", "category": "classification"},
]


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        rotary_pct=0.25,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def examples(tokenizer):
    return tokenize_examples(tokenizer, RECORDS)


def packed_row(examples):
    batch = {
        "input_ids": np.array([np.array(i) for i, _ in examples], dtype=object),
        "labels": np.array([np.array(labels) for _, labels in examples], dtype=object),
    }
    table = pack_batch(batch, max_length=512)
    assert table.num_rows == 1, "all examples fit one row"
    return {name: table.column(name)[0].as_py() for name in table.column_names}


def loss_sum_and_count(model, input_ids, labels, position_ids=None):
    # use_cache=False, as in training: with a KV cache, transformers ignores packed position ids.
    out = model(
        input_ids=torch.tensor([input_ids]),
        labels=torch.tensor([labels]),
        use_cache=False,
        position_ids=None if position_ids is None else torch.tensor([position_ids]),
    )
    count = sum(1 for label in labels[1:] if label != IGNORE_INDEX)
    return out.loss.item() * count, count, out.logits[0]


@torch.no_grad()
def test_packed_loss_equals_the_loss_of_the_examples_run_separately(model, examples):
    separate = [loss_sum_and_count(model, ids, labels) for ids, labels in examples]
    expected = sum(s for s, _, _ in separate) / sum(c for _, c, _ in separate)

    row = packed_row(examples)
    packed_loss, _, packed_logits = loss_sum_and_count(model, row["input_ids"], row["labels"], row["position_ids"])
    # transformers computes the loss in float32 even for a float64 model: hence 1e-6.
    assert packed_loss / sum(c for _, c, _ in separate) == pytest.approx(expected, rel=1e-6)

    # Stronger than the mean: every example's logits are unchanged by its neighbours.
    offset = 0
    for length, (_, _, logits) in zip(row["seq_lens"], [separate[i] for i in _order(row, examples)]):
        torch.testing.assert_close(packed_logits[offset : offset + length], logits, rtol=1e-9, atol=1e-9)
        offset += length


@torch.no_grad()
def test_without_restarting_position_ids_attention_would_cross_examples(model, examples):
    """The control: the same row without per-example positions gives a different loss, so the
    equality above is the boundaries' doing."""
    separate = [loss_sum_and_count(model, ids, labels) for ids, labels in examples]
    expected = sum(s for s, _, _ in separate) / sum(c for _, c, _ in separate)
    row = packed_row(examples)
    crossed, count, _ = loss_sum_and_count(model, row["input_ids"], row["labels"])
    assert abs(crossed / count - expected) > 1e-4


@torch.no_grad()
def test_a_flattened_micro_batch_gives_every_example_the_logits_it_has_alone(model, examples):
    """padding_free: a packed row and two padded rows, flattened into one row, compute the same
    logits for each of their examples as the examples run one by one, and no pad at all."""
    row = packed_row(examples)
    ids, labels = examples[0]
    batch = {  # a Ray Data numpy batch of a packed training split: every row has position_ids
        "input_ids": np.array([np.array(row["input_ids"]), np.array(ids), np.array(examples[2][0])], dtype=object),
        "labels": np.array([np.array(row["labels"]), np.array(labels), np.array(examples[2][1])], dtype=object),
        "position_ids": np.array(
            [np.array(row["position_ids"]), np.arange(len(ids)), np.arange(len(examples[2][0]))], dtype=object
        ),
    }
    flat = flatten(batch)
    order = _order(row, examples) + [0, 2]
    lengths = [len(examples[i][0]) for i in order]
    assert flat["input_ids"].shape == (1, sum(lengths)) == (1, int(flat["n_tokens"]))
    assert sorted(example_lengths(batch)) == sorted(lengths), "what MFU's attention FLOPs count"

    logits = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False).logits[0]
    offset = 0
    for i, length in zip(order, lengths):
        alone = loss_sum_and_count(model, *examples[i])[2]
        torch.testing.assert_close(logits[offset : offset + length], alone, rtol=1e-9, atol=1e-9)
        offset += length
    # No label crosses a boundary: each example's first token is a masked prompt token.
    starts = np.cumsum([0] + lengths[:-1])
    assert (flat["labels"][0, starts] == IGNORE_INDEX).all()
    expected = torch.cat([torch.tensor(examples[i][1]) for i in order])
    assert torch.equal(flat["labels"][0], expected)


def _order(row, examples):
    """Indices of `examples` in the order they were packed into `row`."""
    order, offset = [], 0
    for length in row["seq_lens"]:
        ids = row["input_ids"][offset : offset + length]
        order.append(next(i for i, (e, _) in enumerate(examples) if list(e) == ids and i not in order))
        offset += length
    return order


def test_first_fit_decreasing_fills_rows_without_overflow():
    lengths = [700, 600, 500, 400, 300, 200, 100, 50]
    bins = first_fit_decreasing(lengths, capacity=1024)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    assert len(bins) == 3  # 2850 tokens need at least 3 rows of 1024


def test_an_example_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="more than the row capacity"):
        first_fit_decreasing([10, 2000], capacity=1024)
