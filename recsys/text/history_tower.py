"""The text tower's user side for scoring: ``recsys.text.encoder.UserEncoder``'s trained weights
applied in numpy and a compiled loop, over the catalogue's vectors, without torch.

Evaluation (``TextRecommender``) and serving (the saved pipeline) both score users with it, so
the text scores that are evaluated are the ones that are served; the torch ``UserEncoder`` is
the training graph (``tests/test_export_fast.py`` checks both give the same vectors).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.errors import PIPELINE_REPAIR as REPAIR
from recsys.errors import InputError, reading
from recsys.recommender import fixed_block_matmul, recent_items

if TYPE_CHECKING:
    from recsys.text.recommender import TextRecommender


@dataclass
class HistoryTower:
    """A text tower's serving side: ``recsys.text.encoder.UserEncoder``'s trained weights and the
    catalogue's vectors, without the BERT that made them. Users come from histories, items are
    fixed at training time.

    The user encoder (attention pooling over the last ``max_history`` history vectors, a residual
    linear layer, L2 normalisation) is evaluated here in numpy and a compiled loop, not torch: the
    same weights and formula to float rounding (``tests/test_export_fast.py``), at about a fifth
    of the cost per block (4,096 users: 27 ms against 140 ms), and an export process or worker
    then never imports torch."""

    weights: dict[str, np.ndarray]  # UserEncoder's state dict: position_bias, content.*, residual.weight
    item_embeddings: np.ndarray  # [n_items, d] float32
    history_embeddings: np.ndarray | None = None  # the frozen history side, when the tower has one

    USER_ENCODER = "user_encoder.safetensors"
    ITEMS = "item_embeddings.npy"
    HISTORY = "history_embeddings.npy"

    @property
    def max_history(self) -> int:
        return len(self.weights["position_bias"])

    @classmethod
    def files(cls, info: Mapping[str, Any]) -> list[str]:
        """The files ``load`` reads, given what ``save`` returned (``info``). Pipelines saved
        before ``save`` recorded ``history_embeddings`` read that file only when it is there."""
        return [cls.USER_ENCODER, cls.ITEMS] + ([cls.HISTORY] if info.get("history_embeddings") else [])

    @classmethod
    def from_recommender(cls, m: TextRecommender) -> HistoryTower:
        hist = m.net.history_embeddings
        state = m.net.user_encoder.state_dict()
        return cls(
            {k: v.detach().cpu().numpy().astype(np.float32) for k, v in state.items()},
            m.item_embeddings.numpy().astype(np.float32),
            None if hist is None else hist.numpy().astype(np.float32),
        )

    def user_embeddings(self, seqs: Sequence[np.ndarray]) -> np.ndarray:
        """``[len(seqs), d]`` unit user vectors from histories (item indices, oldest first)."""
        from recsys.kernels import attention_pool

        side = self.item_embeddings if self.history_embeddings is None else self.history_embeddings
        side = np.ascontiguousarray(side, dtype=np.float32)
        w = self.weights
        # The content logit of a history item depends on the item alone: once per catalogue item.
        item_logit = (side @ w["content.weight"][0] + w["content.bias"][0]).astype(np.float32)
        recent = recent_items(seqs, self.max_history)
        pooled = attention_pool(side, item_logit, w["position_bias"], recent)
        out = pooled + fixed_block_matmul(pooled, np.ascontiguousarray(w["residual.weight"].T))
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def save(self, folder: Path) -> dict[str, Any]:
        from safetensors.numpy import save_file

        folder.mkdir(parents=True)
        save_file({k: np.ascontiguousarray(v) for k, v in self.weights.items()}, str(folder / self.USER_ENCODER))
        np.save(folder / self.ITEMS, self.item_embeddings, allow_pickle=False)
        if self.history_embeddings is not None:
            np.save(folder / self.HISTORY, self.history_embeddings, allow_pickle=False)
        return {
            "kind": "HistoryTower",
            "max_history": self.max_history,
            "history_embeddings": self.history_embeddings is not None,
        }

    @classmethod
    def load(cls, folder: Path, max_history: int) -> HistoryTower:
        from safetensors.numpy import load_file

        with reading(folder / cls.ITEMS):
            emb = np.load(folder / cls.ITEMS, allow_pickle=False)
        file = folder / cls.USER_ENCODER
        with reading(file):
            weights = load_file(str(file))
        d = emb.shape[1] if emb.ndim == 2 else -1
        # What UserEncoder(d, max_history).load_state_dict would have checked.
        shapes = {"position_bias": (max_history,), "content.weight": (1, d), "content.bias": (1,)}
        shapes["residual.weight"] = (d, d)
        got = {k: tuple(weights[k].shape) if k in weights else "missing" for k in shapes}
        if bad := [f"{k}: {got[k]}, not {v}" for k, v in shapes.items() if got[k] != v]:
            msg = f"does not hold a user encoder for {d}-wide item vectors ({'; '.join(bad)}); {REPAIR}"
            raise InputError(msg, file=str(file))
        weights = {k: np.ascontiguousarray(weights[k], dtype=np.float32) for k in shapes}
        hist = None
        if (folder / cls.HISTORY).is_file():
            with reading(folder / cls.HISTORY):
                hist = np.load(folder / cls.HISTORY, allow_pickle=False)
        return cls(weights, emb, hist)
