"""Pack tokenized documents into rows of at most max_length tokens (best-fit decreasing, global).

A packed row keeps its documents' boundaries in `seq_lengths`; the collator restarts position ids at
each boundary and the attention keeps documents apart, so packing changes speed, never the loss.
"""

from __future__ import annotations

import bisect

import datasets


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of document indices, each summing to at most `capacity`. O(n log n) searches.

    Longest first, each into the fullest bin that still has room: near-optimal fill (BFD uses at
    most 11/9 OPT + 1 bins) without the cross-document truncation of greedy concatenation.
    """
    if any(n > capacity for n in lengths):
        raise ValueError("a document is longer than the packing capacity; truncate first")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    space: list[tuple[int, int]] = []  # (free space, bin id), sorted
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(space, (n, -1))
        if k == len(space):
            bins.append([i])
            bisect.insort(space, (capacity - n, len(bins) - 1))
        else:
            free, b = space.pop(k)
            bins[b].append(i)
            bisect.insort(space, (free - n, b))
    return bins


PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")


def pack_rows(
    ids: list[list[int]], labels: list[list[int]], max_length: int, strategy: str = "bfd"
) -> dict[str, list]:
    """Documents → rows of at most max_length tokens: input_ids, labels and seq_lengths (the
    document pieces of each row, which the collator keeps apart). No token is dropped.

    bfd / bfd_split: whole documents, best-fit decreasing, rows in order of their first document.
    wrapped: the documents in order as one stream cut every max_length tokens (TRL's "wrapped"): no
    row has room left, but a document cut at a row end continues in the next row without its
    beginning, and each piece's first token is not trained (nothing before it in the row)."""
    if strategy == "wrapped":
        return _wrapped_rows(ids, labels, max_length)
    bins = best_fit_decreasing([len(x) for x in ids], max_length)
    # Keep the bins in a fixed order (by first document) so the data order does not depend on sizes.
    bins.sort(key=min)
    rows: dict[str, list] = {"input_ids": [], "labels": [], "seq_lengths": []}
    for b in bins:
        docs = sorted(b)
        rows["input_ids"].append([t for d in docs for t in ids[d]])
        rows["labels"].append([t for d in docs for t in labels[d]])
        rows["seq_lengths"].append([len(ids[d]) for d in docs])
    return rows


def _wrapped_rows(
    ids: list[list[int]], labels: list[list[int]], max_length: int
) -> dict[str, list]:
    rows: dict[str, list] = {"input_ids": [], "labels": [], "seq_lengths": []}
    row_ids: list[int] = []
    row_labels: list[int] = []
    lengths: list[int] = []
    for doc_ids, doc_labels in zip(ids, labels):
        start = 0
        while start < len(doc_ids):
            take = min(max_length - len(row_ids), len(doc_ids) - start)
            row_ids += doc_ids[start : start + take]
            row_labels += doc_labels[start : start + take]
            lengths.append(take)
            start += take
            if len(row_ids) == max_length:
                rows["input_ids"].append(row_ids)
                rows["labels"].append(row_labels)
                rows["seq_lengths"].append(lengths)
                row_ids, row_labels, lengths = [], [], []
    if row_ids:
        rows["input_ids"].append(row_ids)
        rows["labels"].append(row_labels)
        rows["seq_lengths"].append(lengths)
    return rows


def pack_dataset(
    dataset: datasets.Dataset, max_length: int, strategy: str = "bfd"
) -> datasets.Dataset:
    """Rows of concatenated documents with `seq_lengths` (see pack_rows)."""
    rows = pack_rows(dataset["input_ids"], dataset["labels"], max_length, strategy)
    return datasets.Dataset.from_dict(rows)
