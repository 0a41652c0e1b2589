"""Property-based tests: packing never loses, duplicates or overfills; the assistant mask is exactly
the assistant text plus its end-of-turn token, for any conversation."""

from __future__ import annotations

import datasets
from conftest import trained_mask_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatsft.data.collate import IGNORE_INDEX, PaddingFreeCollator
from chatsft.data.encode import PrepOptions
from chatsft.data.packing import best_fit_decreasing, pack_dataset
from chatsft.data.prepare import prepare_dataset

lengths_and_capacity = st.integers(4, 64).flatmap(
    lambda cap: st.tuples(st.lists(st.integers(1, cap), min_size=1, max_size=60), st.just(cap))
)


@given(lengths_and_capacity)
def test_best_fit_decreasing_is_a_partition_within_capacity(args):
    lengths, capacity = args
    bins = best_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # Never worse than one bin per document, and at least the volume bound.
    assert -(-sum(lengths) // capacity) <= len(bins) <= len(lengths)


@given(lengths_and_capacity)
@settings(max_examples=40, deadline=None)
def test_packed_rows_keep_every_document_intact(args):
    lengths, capacity = args
    docs = [[1000 * d + t for t in range(n)] for d, n in enumerate(lengths)]
    masks = [[t % 2 == 0 for t in range(n)] for n in lengths]
    labels = [[t if m else -100 for t, m in zip(d, k)] for d, k in zip(docs, masks)]
    ds = datasets.Dataset.from_dict({"input_ids": docs, "labels": labels})
    packed = pack_dataset(ds, capacity)
    seen = []
    for row in packed:
        assert len(row["input_ids"]) <= capacity
        assert sum(row["seq_lengths"]) == len(row["input_ids"])
        start = 0
        for n in row["seq_lengths"]:
            doc = row["input_ids"][start : start + n]
            d = doc[0] // 1000
            assert doc == docs[d] and trained_mask_of(row)[start : start + n] == masks[d]
            seen.append(d)
            start += n
    assert sorted(seen) == list(range(len(lengths)))
    batch = PaddingFreeCollator()([packed[i] for i in range(len(packed))])
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == len(lengths)
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)


WORDS = st.sampled_from(
    ["the", "cat", "dog", "sat", "on", "a", "mat", "hi", "yo", "what", "is", "two", "plus"]
)
TEXT = st.lists(WORDS, min_size=1, max_size=6).map(" ".join)


@st.composite
def conversations(draw):
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(TEXT)})
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({"role": "user", "content": draw(TEXT)})
        msgs.append({"role": "assistant", "content": draw(TEXT)})
    return msgs


@given(conversations())
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_trained_tokens_are_exactly_assistant_text_and_end_of_turn(tokenizer, msgs):
    opts = PrepOptions(eos_token=tokenizer.eos_token, assistant_only_loss=True)
    ds, _ = prepare_dataset(datasets.Dataset.from_list([{"messages": msgs}]), tokenizer, opts)
    ids, mask = ds[0]["input_ids"], trained_mask_of(ds[0])
    trained = [t for t, m in zip(ids, mask) if m]
    expected = []
    for m in msgs:
        if m["role"] == "assistant":
            expected += tokenizer(m["content"], add_special_tokens=False)["input_ids"]
            expected.append(tokenizer.eos_token_id)
    assert trained == expected
