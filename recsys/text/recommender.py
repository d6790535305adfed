"""The fine-tuned text tower as a ``Recommender``: catalogue encoded once, users from history."""

from __future__ import annotations

import numpy as np
import torch

from recsys.recommender import History, Recommender, pair_dots
from recsys.text.encoder import ENCODE_BATCH, TwoTower


class TextRecommender(Recommender):
    """Scores = user vector (from the history) . item vector (from the item's text).

    Items without any interaction are scored like any other: this is how cold-start items
    get recommended.
    """

    name = "text"

    def __init__(self, net: TwoTower, item_embeddings: torch.Tensor, user_chunk: int = 4096) -> None:
        self.net = net
        self.item_embeddings = item_embeddings.float()
        self.user_chunk = user_chunk

    @classmethod
    def from_tokens(
        cls, net: TwoTower, item_ids: torch.Tensor, item_lengths: torch.Tensor, batch_size: int = ENCODE_BATCH
    ) -> TextRecommender:
        return cls(net, net.item_encoder.encode_tokens(item_ids, item_lengths, batch_size, progress=True))

    @torch.no_grad()
    def fit(self, history: History) -> TextRecommender:
        self.net.eval()
        seqs = history.sequences
        parts = [
            self.net.user_embeddings(self.item_embeddings, seqs[s : s + self.user_chunk])
            for s in range(0, len(seqs), self.user_chunk)
        ]
        self.user_embeddings = torch.cat(parts).numpy() if parts else np.zeros((0, self.item_embeddings.shape[1]))
        self._items = self.item_embeddings.numpy()
        return self

    def score_users(self, users: np.ndarray) -> np.ndarray:
        return self.user_embeddings[users] @ self._items.T

    def score_pairs(self, users: np.ndarray, items: np.ndarray, chunk: int = 2048) -> np.ndarray:
        return pair_dots(self.user_embeddings, self._items, users, items)


class NewItemText(Recommender):
    """The text tower restricted to items with at most ``max_events`` events in the history.

    A candidate source for cold start: new items compete with hundreds of warm items of the same
    topic in the plain text ranking and rarely reach its top-N; here they compete only with each
    other, and the ranker decides how many of them deserve a slot. Not a ranker feature (its
    scores are the text tower's, already there), hence ``is_feature = False``.
    """

    name = "text_new"
    is_feature = False

    def __init__(self, text: Recommender, max_events: int = 0) -> None:
        self.text = text
        self.max_events = max_events

    def fit(self, history: History) -> NewItemText:
        """``text`` must already be fitted on the same history."""
        self.warm = history.item_counts > self.max_events
        return self

    def score_users(self, users: np.ndarray) -> np.ndarray:
        scores = np.array(self.text.score_users(users), dtype=np.float32, copy=True)
        scores[:, self.warm] = -np.inf
        return scores
