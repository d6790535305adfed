"""The text tower's user side for scoring: ``recsys.text.encoder.UserEncoder``'s trained weights
applied in numpy and a compiled loop, over the catalogue's vectors, without torch.

Evaluation (``TextRecommender``) and serving (the saved pipeline) both score users with it, so
the text scores that are evaluated are the ones that are served; the torch ``UserEncoder`` is
the training graph (``tests/export/test_export_fast.py`` checks both give the same vectors).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.errors import PIPELINE_REPAIR as REPAIR
from recsys.errors import InputError, reading
from recsys.kernels import pair_scores
from recsys.recommender import History, Recommender, fixed_block_matmul, recent_items

if TYPE_CHECKING:
    from recsys.text.recommender import TextRecommender

ADAPTER_FILE = "item_adapter.safetensors"


@dataclass
class TowerBert:
    """The BERT (and item adapter) a tower's item vectors came from, saved beside it in
    ``encoder/``: serving never runs it, ``recsys.update`` encodes new item texts with it.
    ``net``: a freshly trained ``TwoTower``; ``folder``: a loaded tower's ``encoder/``, copied
    as it is when the tower is saved again."""

    max_length: int
    temperature: float
    net: Any = None
    folder: Path | None = None

    def check(self) -> None:
        """A loaded tower whose BERT is gone cannot be saved again: say so before writing."""
        if self.net is None and not (self.folder is not None and self.folder.is_dir()):
            raise InputError(f"missing the text tower's BERT (encoder/); {REPAIR}", file=str(self.folder))

    def save(self, folder: Path) -> None:
        if self.net is None:
            shutil.copytree(self.folder, folder)
            return
        enc = self.net.item_encoder
        enc.bert.save_pretrained(folder, safe_serialization=True)
        enc.tokenizer.save_pretrained(folder)
        if enc.adapter is not None:  # what new item texts go through after the BERT (recsys.update)
            from safetensors.torch import save_file

            weights = {k: v.detach().cpu().contiguous() for k, v in enc.adapter.state_dict().items()}
            save_file(weights, str(folder / ADAPTER_FILE))


def load_bert(folder: Path) -> tuple[Any, Any, dict[str, Any] | None]:
    """A saved tower's BERT, tokenizer and item adapter weights (None: it has none), from
    ``folder/encoder``: only ``recsys.update`` reads them, to encode new item texts."""
    from transformers import AutoTokenizer

    from recsys.text.encoder import load_bert_model

    enc_dir = folder / "encoder"
    if not enc_dir.is_dir():
        raise InputError(f"missing the text tower's BERT ({enc_dir.name}/); {REPAIR}", file=str(folder))
    with reading(enc_dir):
        bert = load_bert_model(str(enc_dir), use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(str(enc_dir))
    adapter = None
    if (file := enc_dir / ADAPTER_FILE).is_file():
        from safetensors.torch import load_file

        with reading(file):
            adapter = load_file(str(file))
    return bert, tok, adapter


@dataclass
class HistoryTower(Recommender):
    """A text tower's serving side: ``recsys.text.encoder.UserEncoder``'s trained weights and the
    catalogue's vectors, without the BERT that made them. Users come from histories, items are
    fixed at training time.

    The user encoder (attention pooling over the last ``max_history`` history vectors, a residual
    linear layer, L2 normalisation) is evaluated here in numpy and a compiled loop, not torch: the
    same weights and formula to float rounding (``tests/export/test_export_fast.py``), at about a fifth
    of the cost per block (4,096 users: 27 ms against 140 ms), and an export process or worker
    then never imports torch.

    Saved as kind ``TextTower``, with its BERT (``bert``) when it has one: the first text tower
    of a pipeline (item vectors for new texts, ``text_new``); a further one (the zero-shot
    feature) is the vectors alone."""

    weights: dict[str, np.ndarray]  # UserEncoder's state dict: position_bias, content.*, residual.weight
    item_embeddings: np.ndarray  # [n_items, d] float32
    history_embeddings: np.ndarray | None = None  # the frozen history side, when the tower has one
    bert: TowerBert | None = None

    kind = "TextTower"
    writes_into = True
    USER_ENCODER = "user_encoder.safetensors"
    ITEMS = "item_embeddings.npy"
    HISTORY = "history_embeddings.npy"

    @property
    def max_history(self) -> int:
        return len(self.weights["position_bias"])

    @classmethod
    def files(cls, info: Mapping[str, Any]) -> list[str]:
        """The files ``load`` reads, given what ``save`` returned (``info``); the BERT in
        ``encoder/`` is read only to save the tower again."""
        return [cls.USER_ENCODER, cls.ITEMS] + ([cls.HISTORY] if info["history_embeddings"] else [])

    @classmethod
    def saved_fields(cls) -> dict[str, Any]:
        return {"max_history": int, "history_embeddings": bool, "bert": dict | None}

    @classmethod
    def from_recommender(cls, m: TextRecommender, with_bert: bool = False) -> HistoryTower:
        """``m``'s serving side; ``with_bert``: saved with the BERT its item vectors came from."""
        hist = m.net.history_embeddings
        state = m.net.user_encoder.state_dict()
        bert = TowerBert(m.net.item_encoder.max_length, float(m.net.temperature), net=m.net) if with_bert else None
        return cls(
            {k: v.detach().cpu().numpy().astype(np.float32) for k, v in state.items()},
            m.item_embeddings.numpy().astype(np.float32),
            None if hist is None else hist.numpy().astype(np.float32),
            bert,
        )

    def fit(self, history: History) -> HistoryTower:
        self.user_embeddings = self.encode_users(history.sequences)
        self.note_history(history)
        return self

    def for_users(self, history: History, known: np.ndarray) -> HistoryTower:
        return copy.copy(self).fit(history)

    def score_users(self, users: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return fixed_block_matmul(self.user_embeddings[users], self.item_embeddings.T, out)

    def score_pairs(self, users: np.ndarray, items: np.ndarray, chunk: int = 2048) -> np.ndarray:
        return pair_scores(self.user_embeddings, self.item_embeddings, users, items)

    def item_space(self) -> np.ndarray:
        return np.ascontiguousarray(self.item_embeddings, dtype=np.float32)  # unit vectors already

    def encode_users(self, seqs: Sequence[np.ndarray]) -> np.ndarray:
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

        if self.bert is not None:
            self.bert.check()
        folder.mkdir(parents=True)
        save_file({k: np.ascontiguousarray(v) for k, v in self.weights.items()}, str(folder / self.USER_ENCODER))
        np.save(folder / self.ITEMS, self.item_embeddings, allow_pickle=False)
        if self.history_embeddings is not None:
            np.save(folder / self.HISTORY, self.history_embeddings, allow_pickle=False)
        info = {
            "kind": self.kind,
            "max_history": self.max_history,
            "history_embeddings": self.history_embeddings is not None,
        }
        info["bert"] = None
        if self.bert is not None:
            self.bert.save(folder / "encoder")
            info["bert"] = {"max_length": int(self.bert.max_length), "temperature": float(self.bert.temperature)}
        return info

    @classmethod
    def load(cls, folder: Path, info: Mapping[str, Any]) -> HistoryTower:
        from safetensors.numpy import load_file

        max_history = int(info["max_history"])

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
        if info["history_embeddings"]:
            with reading(folder / cls.HISTORY):
                hist = np.load(folder / cls.HISTORY, allow_pickle=False)
        bert = info.get("bert")
        bert = None if bert is None else TowerBert(bert["max_length"], bert["temperature"], folder=folder / "encoder")
        return cls(weights, emb, hist, bert)
