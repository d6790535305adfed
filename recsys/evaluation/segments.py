"""Segments of the test set: users by history length, target items by coldness and popularity.

User segments partition the evaluated users. Item segments partition the *catalogue*, and so the
test events: a model is scored on a segment with only the targets whose item falls in it counting
as relevant, over the users who have at least one such target. A recommended item of another
segment is then simply not a hit, as in the full evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

# History-length buckets, fixed (not quantiles) so that two reports' buckets mean the same thing.
HISTORY_EDGES = (1, 3, 6, 11, 21, 51)
COLD, WARM = "cold", "warm"  # cold: no event in the history the models learnt from


@dataclass(frozen=True)
class Segment:
    """One segment: which users are scored, and which of their (hit) positions count.

    ``item_mask`` (over the catalogue) is None for a user segment: every target counts.
    """

    kind: str
    label: str
    users: np.ndarray  # bool over the evaluated users
    item_mask: np.ndarray | None
    n_items: int | None = None


def history_bucket_labels(lengths: np.ndarray, edges: Sequence[int] = HISTORY_EDGES) -> np.ndarray:
    """Bucket label of each history length: ``0``, ``1-2``, ``3-5`` ... ``51+``.

    >>> history_bucket_labels(np.array([0, 1, 2, 3, 60])).tolist()
    ['0', '1-2', '1-2', '3-5', '51+']
    """
    bounds = [0, *edges]
    labels = ["0"] + [f"{lo}-{hi - 1}" if hi - 1 > lo else str(lo) for lo, hi in zip(edges[:-1], edges[1:])]
    labels.append(f"{edges[-1]}+")
    idx = np.searchsorted(np.asarray(bounds), np.asarray(lengths), side="right") - 1
    return np.asarray(labels, dtype=object)[idx]


def ordered_history_labels(edges: Sequence[int] = HISTORY_EDGES) -> list[str]:
    return history_bucket_labels(np.array([0, *edges])).tolist()


def popularity_decile_numbers(train_count: np.ndarray) -> np.ndarray:
    """Per item: 0 (no training event) or its decile 1 (least popular) .. 10 among the warm items.
    Items with equal counts share a decile (average rank), so ties never split arbitrarily; a
    decile may then be empty or larger than a tenth.

    >>> popularity_decile_numbers(np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])).tolist()[:3]
    [0, 1, 2]
    """
    counts = np.asarray(train_count)
    out = np.zeros(len(counts), dtype=np.int64)
    warm = counts > 0
    if warm.any():
        pct = (rankdata(counts[warm], method="average") - 0.5) / warm.sum()
        out[warm] = np.floor(pct * 10).astype(np.int64) + 1
    return out


def popularity_deciles(train_count: np.ndarray) -> np.ndarray:
    """Per item: ``cold`` (no training event) or decile ``D1`` (least popular) .. ``D10`` among
    the warm items (``popularity_decile_numbers``).

    >>> popularity_deciles(np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])).tolist()[:3]
    ['cold', 'D1', 'D2']
    """
    numbers = popularity_decile_numbers(train_count)
    return np.where(numbers == 0, "cold", np.char.add("D", numbers.astype(str))).astype(object)


def decile_order() -> list[str]:
    return ["cold", *[f"D{d}" for d in range(1, 11)]]


def build_segments(
    history_length: np.ndarray,
    train_count: np.ndarray,
    relevant_items: list[np.ndarray],
) -> list[Segment]:
    """All segments of a test set.

    Args:
        history_length: per evaluated user, events in the test stage's history.
        train_count: per catalogue item, events in that history.
        relevant_items: per evaluated user, the item indices of their test targets.
    """
    segments: list[Segment] = []
    labels = history_bucket_labels(history_length)
    for label in ordered_history_labels():
        mask = labels == label
        if mask.any():
            segments.append(Segment("user history length", label, mask, None))
    cold = np.asarray(train_count) == 0
    deciles = popularity_deciles(train_count)
    for kind, item_labels, order in (
        ("target item", np.where(cold, COLD, WARM).astype(object), [WARM, COLD]),
        ("target item popularity", deciles, decile_order()),
    ):
        for label in order:
            item_mask = item_labels == label
            users = np.array([bool(item_mask[r].any()) for r in relevant_items], dtype=bool)
            if users.any():
                segments.append(Segment(kind, label, users, item_mask, int(item_mask.sum())))
    return segments
