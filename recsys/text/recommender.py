"""The fine-tuned text tower as a ``Recommender``: catalogue encoded once, users from history."""

from __future__ import annotations

import numpy as np
import torch

from recsys.kernels import pair_scores
from recsys.recommender import History, Recommender, fixed_block_matmul
from recsys.text.encoder import ENCODE_BATCH, TwoTower
from recsys.text.history_tower import HistoryTower


class TextRecommender(Recommender):
    """Scores = user vector (from the history) . item vector (from the item's text).

    Items without any interaction are scored like any other: this is how cold-start items
    get recommended.
    """

    name = "text"
    writes_into = True

    def __init__(self, net: TwoTower, item_embeddings: torch.Tensor) -> None:
        self.net = net
        self.item_embeddings = item_embeddings.float()

    @classmethod
    def from_tokens(
        cls, net: TwoTower, item_ids: torch.Tensor, item_lengths: torch.Tensor, batch_size: int = ENCODE_BATCH
    ) -> TextRecommender:
        return cls(net, net.item_encoder.encode_tokens(item_ids, item_lengths, batch_size, progress=True))

    def fit(self, history: History) -> TextRecommender:
        """User vectors from ``history`` by the serving implementation of the user tower
        (``HistoryTower``): the scores evaluated are the scores served."""
        self.tower = HistoryTower.from_recommender(self)
        self._items = self.tower.item_embeddings
        self.user_embeddings = self.tower.user_embeddings(history.sequences)
        return self

    def score_users(self, users: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return fixed_block_matmul(self.user_embeddings[users], self._items.T, out)

    def score_pairs(self, users: np.ndarray, items: np.ndarray, chunk: int = 2048) -> np.ndarray:
        return pair_scores(self.user_embeddings, self._items, users, items)
