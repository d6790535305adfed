"""The fine-tuned text tower as a ``Recommender``: catalogue encoded once, users from history."""

from __future__ import annotations

import numpy as np
import torch

from recsys.recommender import History, Recommender
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
        """Scores by the serving implementation of the tower (``HistoryTower``, what a saved
        pipeline holds): the scores evaluated are the scores served."""
        self.tower = HistoryTower.from_recommender(self).fit(history)
        self.user_embeddings = self.tower.user_embeddings
        return self

    def score_users(self, users: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self.tower.score_users(users, out)

    def score_pairs(self, users: np.ndarray, items: np.ndarray, chunk: int = 2048) -> np.ndarray:
        return self.tower.score_pairs(users, items)

    def item_space(self) -> np.ndarray:
        return self.tower.item_space()

    def users_without_history(self, users: np.ndarray) -> np.ndarray | None:
        return self.tower.users_without_history(users)
