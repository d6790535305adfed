"""The text tower as plain ``nn.Module``s: usable for export and inference without Lightning.

* ``ItemEncoder``: BERT -> masked mean pooling -> L2 normalisation (for all-MiniLM-L6-v2 this
  reproduces the sentence-transformers embedding exactly, so step 0 is a sound zero-shot model).
* ``UserEncoder``: attention pooling over the user's history embeddings. Why attention and not a
  plain mean: a user's last items say more about the next one than old ones (a recency bias per
  position), and some history items say more than others (a content term). It is initialised
  to a recency-weighted mean, i.e. the zero-shot baseline, and cheap: it reads item embeddings,
  so at inference the catalogue is encoded once and users cost one small matmul each.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.errors import ConfigError


def _check_path(name_or_path: str) -> None:
    looks_local = os.sep in name_or_path or name_or_path.startswith(".")
    if looks_local and not Path(name_or_path).is_dir():
        raise ConfigError(f"encoder path does not exist or is not a folder: {name_or_path}")


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    _check_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:
        raise ConfigError(f"cannot load a tokenizer from '{name_or_path}': {str(e).splitlines()[0]}") from e


class ItemEncoder(nn.Module):
    """BERT + masked mean pooling + L2 norm. Holds its tokenizer (not a module) for convenience."""

    def __init__(self, bert: nn.Module, tokenizer, max_length: int = 32) -> None:
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, name_or_path: str, max_length: int = 32) -> ItemEncoder:
        """A local folder (or, with internet, a hub name) holding a BERT-style model."""
        from transformers import AutoModel

        tokenizer = load_tokenizer(name_or_path)
        try:
            bert = AutoModel.from_pretrained(name_or_path, add_pooling_layer=False)
        except Exception as e:
            raise ConfigError(f"cannot load a BERT model from '{name_or_path}': {str(e).splitlines()[0]}") from e
        if not hasattr(bert, "embeddings") or not hasattr(bert.config, "hidden_size"):
            raise ConfigError(f"'{name_or_path}' is not a BERT-style encoder ({type(bert).__name__})")
        # from_pretrained returns eval mode; switch back so dropout is on while fine-tuning.
        bert.train()
        return cls(bert, tokenizer, max_length)

    @classmethod
    def random(
        cls,
        tokenizer: str,
        hidden_size: int = 32,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 2,
        intermediate_size: int = 64,
        max_length: int = 32,
        seed: int = 0,
    ) -> ItemEncoder:
        """A tiny randomly initialised BERT (tests, smoke runs) with a real tokenizer."""
        from transformers import BertConfig, BertModel

        tok = load_tokenizer(tokenizer)
        config = BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max(64, max_length),
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            bert = BertModel(config, add_pooling_layer=False)
        return cls(bert, tok, max_length)

    @property
    def dim(self) -> int:
        return int(self.bert.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids padded to ``max_length`` and the real lengths, for the whole list at once."""
        enc = self.tokenizer(
            list(texts), max_length=self.max_length, truncation=True, padding="max_length", return_tensors="pt"
        )
        return enc["input_ids"].to(torch.int32), enc["attention_mask"].sum(1).to(torch.int32)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)

    @torch.no_grad()
    def encode_tokens(
        self, ids: torch.Tensor, lengths: torch.Tensor, batch_size: int = 128, progress: bool = False
    ) -> torch.Tensor:
        """Embeddings of pre-tokenised texts, in length order so each batch pads to little."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        order = torch.argsort(lengths, descending=True, stable=True)
        out = torch.empty(len(ids), self.dim)
        batches = range(0, len(ids), batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="encode items", unit="batch", leave=False)
        for start in batches:
            sel = order[start : start + batch_size]
            width = int(lengths[sel].max())
            batch_ids = ids[sel, :width].long().to(device)
            mask = (torch.arange(width) < lengths[sel, None]).long().to(device)
            out[sel] = self(batch_ids, mask).float().cpu()
        self.train(was_training)
        return out

    def encode(self, texts: Sequence[str], batch_size: int = 128, progress: bool = False) -> torch.Tensor:
        ids, lengths = self.tokenize(texts)
        return self.encode_tokens(ids, lengths, batch_size, progress)


class UserEncoder(nn.Module):
    """Attention pooling over history item embeddings (index 0 of the history = most recent)."""

    def __init__(self, dim: int, max_history: int = 20, recency_decay: float = 0.15) -> None:
        super().__init__()
        self.max_history = max_history
        self.position_bias = nn.Parameter(-recency_decay * torch.arange(max_history, dtype=torch.float32))
        self.content = nn.Linear(dim, 1)
        self.residual = nn.Linear(dim, dim, bias=False)
        for p in (self.content.weight, self.content.bias, self.residual.weight):
            nn.init.zeros_(p)

    def forward(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``history``: [B, L, d] embeddings, most recent first; ``mask``: [B, L] bool."""
        logits = self.position_bias[: history.shape[1]] + self.content(history).squeeze(-1)
        logits = logits.masked_fill(~mask, -1e4)
        pooled = (torch.softmax(logits, dim=1).unsqueeze(-1) * history).sum(1)
        pooled = pooled * mask.any(1, keepdim=True)  # users without history get the zero vector
        return F.normalize(pooled + self.residual(pooled), dim=-1)


class TwoTower(nn.Module):
    """Item and user towers sharing one embedding space; score = cosine / temperature."""

    def __init__(
        self,
        item_encoder: ItemEncoder,
        max_history: int = 20,
        temperature: float = 0.1,
        learn_temperature: bool = True,
        frozen_history: bool = False,
    ) -> None:
        super().__init__()
        self.item_encoder = item_encoder
        self.user_encoder = UserEncoder(item_encoder.dim, max_history)
        # frozen_history: the user side reads the catalogue as the encoder saw it before
        # fine-tuning (``history_embeddings``, set once), the item side is fine-tuned to that space.
        # Training and inference then see the same history vectors; with a shared, moving encoder
        # the history vectors used in training (cached, refreshed once an epoch) lag the ones
        # used at inference, and that gap cost more than fine-tuning gained (docs/design.md).
        # Only sound from a pretrained encoder: a random one has nothing worth freezing.
        self.frozen_history = frozen_history
        self.history_embeddings: torch.Tensor | None = None
        # Learned (as in CLIP): a fixed sharp temperature makes the zero-shot start over-confident,
        # and the first gradients then tear up its geometry instead of refining it.
        self.log_inv_temperature = nn.Parameter(
            torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_temperature
        )

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.log_inv_temperature.detach()))

    def user_embeddings(self, item_embeddings: torch.Tensor, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """User vectors from each user's history (item indices, oldest first).

        History items are looked up in ``history_embeddings`` when the history side is frozen,
        else in ``item_embeddings`` (the catalogue as the current encoder sees it).
        """
        if self.history_embeddings is not None:
            item_embeddings = self.history_embeddings.to(item_embeddings.device)
        hist, mask = pad_histories(histories, self.user_encoder.max_history)
        dev = item_embeddings.device
        hist, mask = hist.to(dev), mask.to(dev)
        return self.user_encoder(item_embeddings[hist.clamp(min=0)], mask)


def pad_histories(histories: Sequence[np.ndarray], max_history: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Last ``max_history`` items of each history, most recent first, padded with -1."""
    out = np.full((len(histories), max_history), -1, dtype=np.int64)
    for row, h in enumerate(histories):
        tail = np.asarray(h[-max_history:])[::-1]
        out[row, : len(tail)] = tail
    t = torch.from_numpy(out)
    return t, t >= 0
