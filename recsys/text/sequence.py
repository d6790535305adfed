"""A user tower that reads the order of the history: a small transformer over item-text vectors.

``SequenceUserEncoder`` is ``UserEncoder`` (attention pooling that starts as the recency-weighted
mean) plus a sequential branch, as in UniSRec and Recformer: the history's item vectors are
projected to a narrow width, given learned position embeddings (position 0 = the most recent
item), passed through a few bidirectional transformer layers (all of a history precedes the event
it predicts, so no causal mask is needed), and the most recent position's output is projected
back to the item space and added to the pooled vector. That projection starts at zero, so at step
0 the tower equals the mean tower (the zero-shot baseline) and fine-tuning can only add to it.

Why a sequential branch at all: pooling scores each history item on its own (its position and its
content), so the user vector is a weighted sum of item vectors and the next item's score is a sum
of per-item terms. What follows a *pair* of items in a given order (A then B leads to C, B then A
to D) is not such a sum; attention between the history items can express it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recsys.errors import ConfigError, InputError, require_number, require_whole
from recsys.text.encoder import UserEncoder, pad_histories

#: ``text.user_tower`` values: the name of each user tower.
USER_TOWERS = ("mean", "sequence")


class SequenceUserEncoder(nn.Module):
    """Attention pooling over the history plus a zero-initialised transformer branch.

    Args:
        dim: the item vectors' width.
        max_history: most recent history items read (one position embedding each).
        recency_decay: the zero-shot pooling's decay (``UserEncoder``).
        width: the transformer's width (item vectors are projected to it and back).
        layers, heads: the transformer's depth and attention heads (``width % heads == 0``).
        dropout: dropout inside the transformer layers while training.
    """

    def __init__(
        self,
        dim: int,
        max_history: int = 20,
        recency_decay: float = 0.15,
        width: int = 64,
        layers: int = 1,
        heads: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_sequence_options(width=width, layers=layers, heads=heads, dropout=dropout)
        self.max_history = max_history
        self._sequence = {"recency_decay": recency_decay, "width": width, "layers": layers, "heads": heads}
        self._sequence["dropout"] = dropout
        self.pool = UserEncoder(dim, max_history, recency_decay)
        self.project = nn.Linear(dim, width)
        self.position = nn.Parameter(torch.randn(max_history, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=dropout, batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim, bias=False)
        nn.init.zeros_(self.out.weight)  # step 0: exactly the pooling tower

    def options(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this tower (``load``)."""
        return {"dim": self.out.out_features, "max_history": self.max_history, **self._sequence}

    def save(self, path: str | Path) -> None:
        """The weights and the options that rebuild them, in one safetensors file (written to a
        temporary name, then renamed)."""
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(tmp), metadata={"options": json.dumps(self.options())})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> SequenceUserEncoder:
        """The tower ``save`` wrote, in eval mode (``InputError`` naming the file if it is not one)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), "pt") as f:
                options = json.loads((f.metadata() or {})["options"])
            state = load_file(str(path))
            tower = cls(**options)
            tower.load_state_dict(state)
        except Exception as e:  # a foreign, truncated or mismatched file
            raise InputError(f"does not hold a sequence user tower ({e}); re-run training", file=str(path)) from e
        return tower.eval()

    def forward(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``history``: [B, L, d] embeddings, most recent first; ``mask``: [B, L] bool."""
        pooled = self.pool.pooled(history, mask)
        has = mask.any(1, keepdim=True)
        # A row without history would attend to nothing (NaN); it attends to its first slot, and
        # its output is zeroed below.
        keys = mask.clone()
        keys[:, 0] |= ~has[:, 0]
        h = self.project(history) + self.position[: history.shape[1]]
        h = self.transformer(h, src_key_padding_mask=~keys)
        seq = self.out(self.norm(h[:, 0])) * has
        return F.normalize(pooled + seq, dim=-1)

    def embed_histories(self, item_embeddings: torch.Tensor, histories) -> torch.Tensor:
        """User vectors from histories (item indices, oldest first), looked up in ``item_embeddings``."""
        hist, mask = pad_histories(histories, self.max_history)
        dev = item_embeddings.device
        return self(item_embeddings[hist.to(dev).clamp(min=0)], mask.to(dev))


def check_sequence_options(**options: Any) -> None:
    """``ConfigError`` naming the ``text.sequence`` option with a bad value."""
    for name in ("width", "layers", "heads"):
        require_whole(f"text.sequence.{name}", options.get(name), optional=True)
    width, heads = options.get("width"), options.get("heads")
    if width is not None and heads is not None and width % heads:
        raise ConfigError(f"text.sequence.width ({width}) must be a multiple of text.sequence.heads ({heads})")
    require_number("text.sequence.dropout", options.get("dropout"), 0, 1, high_open=True, optional=True)
    unknown = set(options) - {"width", "layers", "heads", "dropout"}
    if unknown:
        raise ConfigError(f"unknown text.sequence option(s): {', '.join(sorted(unknown))}")


def check_user_tower(kind: Any, sequence: Mapping[str, Any] | None = None) -> None:
    """``ConfigError`` for a ``text.user_tower`` that is not one of ``USER_TOWERS``, or bad
    ``text.sequence`` options."""
    if kind not in USER_TOWERS:
        raise ConfigError(f"text.user_tower must be one of {', '.join(USER_TOWERS)}, got {kind!r}")
    check_sequence_options(**dict(sequence or {}))


def user_tower(
    kind: str, dim: int, max_history: int, recency_decay: float, sequence: Mapping[str, Any] | None = None
) -> nn.Module:
    """The user tower named by ``text.user_tower`` (``sequence``: the ``text.sequence`` options)."""
    check_user_tower(kind, sequence)
    if kind == "sequence":
        return SequenceUserEncoder(dim, max_history, recency_decay, **dict(sequence or {}))
    return UserEncoder(dim, max_history, recency_decay)
