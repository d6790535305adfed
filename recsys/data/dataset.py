"""The validated, indexed data set every later stage works on."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import polars as pl

from recsys.columns import Columns


@dataclass(frozen=True)
class IdMap:
    """External string ids <-> dense indices 0..n-1, in sorted id order (so it is reproducible)."""

    ids: np.ndarray  # object array of str, index = dense id

    @classmethod
    def from_values(cls, values: pl.Series) -> IdMap:
        return cls(np.asarray(values.unique().sort().to_list(), dtype=object))

    def __len__(self) -> int:
        return len(self.ids)

    def to_frame(self, id_col: str, idx_col: str) -> pl.DataFrame:
        return pl.DataFrame(
            {id_col: self.ids.tolist(), idx_col: np.arange(len(self.ids), dtype=np.int32)},
            schema={id_col: pl.String, idx_col: pl.Int32},
        )

    def index(self, ids: list[str] | np.ndarray) -> np.ndarray:
        """Dense indices of ``ids``; -1 for unknown ids."""
        lookup = self._lookup
        return np.array([lookup.get(v, -1) for v in ids], dtype=np.int64)

    @cached_property
    def _lookup(self) -> dict[str, int]:
        # Built once: the export asks for every chunk's users (a dict of 100k ids cost 60 ms).
        return {v: i for i, v in enumerate(self.ids)}


def listing_times(items: pl.DataFrame) -> np.ndarray | None:
    """Each item's listing time (``available_from``, unix seconds) in ``item_idx`` order, NaN for
    items listed from the start; None when the catalogue gives no listing time at all."""
    if Columns.AvailableFrom not in items.columns or items[Columns.AvailableFrom].null_count() == items.height:
        return None
    listed = items.sort(Columns.ItemIdx)[Columns.AvailableFrom]
    return listed.cast(pl.Float64).fill_null(float("nan")).to_numpy()


@dataclass(frozen=True)
class Dataset:
    """Interactions and items after validation, with dense indices attached.

    ``interactions``: user_id, item_id, timestamp, event, weight, user_idx, item_idx, sorted by
    user_idx, timestamp and then load order (so ties keep the order of the file).
    ``items``: item_id, item_idx, text (+ the raw text fields), sorted by item_idx; it may hold
    items nobody interacted with yet: cold-start items, reachable through their text only.
    """

    interactions: pl.DataFrame
    items: pl.DataFrame
    users: IdMap
    item_ids: IdMap
    name: str
    impressions: pl.DataFrame | None = None

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def texts(self) -> list[str]:
        return self.items[Columns.Text].to_list()

    def fingerprint(self) -> str:
        """A short content hash, logged with every run so two results are visibly comparable."""
        h = hashlib.sha256()
        cols = [Columns.User, Columns.Item, Columns.Timestamp, Columns.Event]
        h.update(self.interactions.select(cols).write_csv().encode())
        h.update(self.items.select(Columns.Item, Columns.Text).write_csv().encode())
        return h.hexdigest()[:16]
