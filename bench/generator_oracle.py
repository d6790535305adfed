"""The generated data's ceiling as a recommender, for the benchmarks (``text_ceiling.py``,
``fusion_sweep.py --oracle``): the generator's own probability of each item being a user's next
event (``recsys.data.synthetic.World.next_event_log_probs``), knowing the user's true topics,
facet and taste group, every item's popularity and its freshness at the target's time. Sorting
by that probability maximises the expected NDCG of a single held-out item, so no model of the job
can be expected to rank better."""

from __future__ import annotations

import numpy as np
import polars as pl

from recsys.columns import Columns
from recsys.data import Dataset
from recsys.data.synthetic import BASE_TS, SPAN, World
from recsys.recommender import History, Recommender

USERS_PER_PASS = 256  # [users, items] float64 temporaries: ~40 MB each at 150,000 items


class GeneratorOracle(Recommender):
    """Scores a stage's users at the time of their target (the first one, where a user has several)."""

    name = "generator"

    def __init__(self, world: World, data: Dataset, targets: pl.DataFrame) -> None:
        self.world = world
        # The generated ids are "U<number>" and "I<number>"; dense indices follow their string order.
        self.user_number = np.array([int(u[1:]) for u in data.users.ids])
        self.item_number = np.array([int(i[1:]) for i in data.item_ids.ids])
        first = targets.group_by(Columns.UserIdx).agg(pl.col(Columns.Timestamp).min())
        self.when = np.zeros(data.n_users)
        self.when[first[Columns.UserIdx].to_numpy()] = (first[Columns.Timestamp].to_numpy() - BASE_TS) / SPAN

    def fit(self, history: History) -> GeneratorOracle:
        self.seen = [self.item_number[s] for s in history.sequences]
        return self

    def score_users(self, users: np.ndarray) -> np.ndarray:
        out = np.empty((len(users), len(self.item_number)), dtype=np.float32)
        for s in range(0, len(users), USERS_PER_PASS):
            block = users[s : s + USERS_PER_PASS]
            seen = [self.seen[u] for u in block]
            logp = self.world.next_event_log_probs(self.user_number[block], self.when[block], seen)
            out[s : s + len(block)] = np.maximum(logp[:, self.item_number], -1e30)  # dense item order
        return out
