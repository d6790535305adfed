"""Item embeddings keyed by the item's tokens and the encoder's weights.

A run encodes the catalogue many times with weights it has already seen: the zero-shot
validation and the start of fine-tuning read the same weights, the restored best checkpoint is
one of the validated epochs, the zero-shot report is the starting weights again; a rerun of the
job, or a scoring run after a catalogue update, starts from the same weights with mostly the
same texts. Keyed by both, a vector can never be stale: new weights miss every entry, a changed
or new text misses its own entry, and only those items are encoded.

The key of an item is a hash of its token ids (its text as the encoder reads it, after
truncation), so a different tokenizer or ``max_length`` also misses. The weights key is
``ItemEncoder.weights_fingerprint()`` (a hash of every tensor of the BERT state).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from recsys.text.encoder import ENCODE_BATCH

if TYPE_CHECKING:
    from recsys.text.encoder import ItemEncoder

log = logging.getLogger(__name__)

KEY_BYTES = 16  # an item key's length: a blake2b digest of its token ids


def item_keys(ids: torch.Tensor, lengths: torch.Tensor) -> list[bytes]:
    """One ``KEY_BYTES``-byte hash per item of its real (non-pad) token ids."""
    arr = ids.to(torch.int32).numpy()
    return [
        hashlib.blake2b(arr[j, : int(n)].tobytes(), digest_size=KEY_BYTES).digest()
        for j, n in enumerate(lengths.tolist())
    ]


def _stored_key(k: np.bytes_) -> bytes:
    """A key as read back from a table file. The file holds them as numpy ``S16`` strings, which
    drop trailing zero bytes when read, so a key ending in ``b"\\x00"`` (one item in 256) would
    never match its item again and be re-encoded by every run: pad it back to full length."""
    return bytes(k).ljust(KEY_BYTES, b"\x00")


class ItemEmbeddingCache:
    """In memory, and on disk under ``directory`` (one ``<weights hash>.npz`` per encoder state).

    Args:
        directory: where tables persist between runs (``None``: this process only).
        max_versions: encoder states kept in memory (least recently used dropped first); a
            fine-tuning run meets one per validated epoch.

    ``encoded_items`` counts the items actually run through the encoder, for logs and tests.
    Shared, not copied, by ``copy.deepcopy``: the zero-shot copy of a network and the network
    itself look up the same store, which is sound because every entry is keyed by weights.
    """

    def __init__(self, directory: str | None = None, max_versions: int = 4) -> None:
        self.directory = Path(directory) if directory else None
        self.max_versions = max_versions
        self._tables: OrderedDict[str, dict[bytes, np.ndarray]] = OrderedDict()
        self.encoded_items = 0
        self.hits = 0

    def __deepcopy__(self, memo: dict) -> ItemEmbeddingCache:
        return self

    def _table(self, weights: str) -> dict[bytes, np.ndarray]:
        if weights in self._tables:
            self._tables.move_to_end(weights)
            return self._tables[weights]
        table: dict[bytes, np.ndarray] = {}
        path = self._path(weights)
        if path is not None and path.is_file():
            try:
                with np.load(path, allow_pickle=False) as f:
                    table = dict(zip((_stored_key(k) for k in f["keys"]), f["vectors"], strict=True))
            except Exception as e:  # a damaged file is only a cache miss
                log.warning("ignoring unreadable embedding cache %s (%s)", path, e)
        self._tables[weights] = table
        while len(self._tables) > self.max_versions:
            self._tables.popitem(last=False)
        return table

    def _path(self, weights: str) -> Path | None:
        return self.directory / f"{weights}.npz" if self.directory is not None else None

    def _save(self, weights: str, table: dict[bytes, np.ndarray]) -> None:
        path = self._path(weights)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        keys = np.array(list(table), dtype=f"S{KEY_BYTES}")
        np.savez(tmp, keys=keys, vectors=np.stack(list(table.values())).astype(np.float32))
        os.replace(tmp, path)  # readers see the old table or the new one, never half of one

    def store(self, encoder: ItemEncoder, ids: torch.Tensor, lengths: torch.Tensor, vectors: torch.Tensor) -> None:
        """Vectors of ``encoder``'s current weights computed elsewhere (other DDP ranks' shares of
        the catalogue), so a later pass in this process finds them."""
        weights = encoder.weights_fingerprint()
        table = self._table(weights)
        table.update(zip(item_keys(ids, lengths), vectors.float().numpy(), strict=True))
        self._save(weights, table)

    def encode(
        self,
        encoder: ItemEncoder,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        batch_size: int = ENCODE_BATCH,
        progress: bool = False,
    ) -> torch.Tensor:
        """``encoder.encode_tokens(ids, lengths)``, encoding only the items not cached yet."""
        weights = encoder.weights_fingerprint()
        table = self._table(weights)
        keys = item_keys(ids, lengths)
        missing: dict[bytes, int] = {}
        for j, k in enumerate(keys):
            if k not in table and k not in missing:
                missing[k] = j
        if missing:
            rows = torch.tensor(list(missing.values()), dtype=torch.long)
            vectors = encoder._encode_tokens(ids[rows], lengths[rows], batch_size, progress, weights).numpy()
            table.update(zip(missing, vectors, strict=True))
            self._save(weights, table)
        self.encoded_items += len(missing)
        self.hits += len(keys) - len(missing)
        log.debug(
            "embedding cache %s: %d items encoded, %d cached", weights[:8], len(missing), len(keys) - len(missing)
        )
        if not keys:
            return torch.empty(0, encoder.dim)
        return torch.from_numpy(np.stack([table[k] for k in keys]))
