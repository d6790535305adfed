"""Tokenisation and batching for fine-tuning the text tower on next-item prediction.

Items are tokenised once for the whole catalogue (padded to ``max_length`` in memory); each
batch encodes every *unique* item it needs once, trimmed to the longest one in the batch.
"""

from __future__ import annotations

import logging
import zlib

import lightning as L
import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from recsys.columns import Columns
from recsys.errors import ConfigError, InputError
from recsys.evaluation.segments import popularity_decile_numbers
from recsys.recommender import History
from recsys.text.distributed import world
from recsys.text.encoder import pad_histories
from recsys.text.options import check_data_options

log = logging.getLogger(__name__)


class NextItemExamples(Dataset):
    """Every (history prefix -> next event) pair of the training history: rows of (history items,
    target item, event weight, event time)."""

    def __init__(self, history: History, max_history: int) -> None:
        df = history.interactions
        self.items = df[Columns.ItemIdx].to_numpy().astype(np.int64)
        self.weights = df[Columns.Weight].to_numpy().astype(np.float32)
        self.times = df[Columns.Timestamp].to_numpy().astype(np.float64)
        users = df[Columns.UserIdx].to_numpy()
        starts = np.searchsorted(users, users, side="left")
        # A target needs at least one earlier event of the same user.
        self.positions = np.flatnonzero(np.arange(len(users)) > starts)
        self.starts = starts
        self.max_history = max_history

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, j: int) -> tuple[np.ndarray, int, float, float]:
        p = self.positions[j]
        lo = max(self.starts[p], p - self.max_history)
        return self.items[lo:p], int(self.items[p]), float(self.weights[p]), float(self.times[p])


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit seed that depends only on ``(seed, epoch, stream)``."""
    state = np.random.SeedSequence([abs(int(seed)), int(epoch), int(stream)]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


class EpochSampler(Sampler[int]):
    """``num_samples`` distinct random indices per epoch, a function of ``(seed, epoch)`` only.

    Lightning calls ``set_epoch`` before every training epoch (also after resuming from a
    checkpoint), so epoch 3 draws the same examples in the same order whether the run got there in
    one go or was killed and resumed. A sampler holding one generator that advances from epoch to
    epoch would restart at epoch 0's order after a resume.

    Under DDP (``replicas`` processes) every rank draws from the same permutation and takes its own
    block of it: the ranks' examples are disjoint and equally many (a rank with fewer steps would
    leave the others waiting in the gradient all-reduce).
    """

    def __init__(self, n: int, num_samples: int, seed: int = 0, rank: int = 0, replicas: int = 1) -> None:
        self.n, self.num_samples, self.seed = n, min(num_samples, n // replicas), seed
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        start = self.rank * self.num_samples
        return iter(torch.randperm(self.n, generator=g)[start : start + self.num_samples].tolist())

    def __len__(self) -> int:
        return self.num_samples


class TextDataModule(L.LightningDataModule):
    """Train batches of next-item pairs, validation batches of (train history -> val target).

    Args:
        item_ids, item_lengths: the tokenised catalogue (``ItemEncoder.tokenize``).
        train: the history the tower learns from.
        val: validation targets (one stage's held-out events), scored against the full catalogue.
        batch_size: next-item pairs per step; the other targets in the batch are the negatives.
        steps_per_epoch: pairs drawn per epoch = steps_per_epoch * batch_size (without
            replacement within an epoch), so an epoch costs the same whatever the data size.
        max_history: most recent history items the user tower reads.
        encode_history: also back-propagate through the history items' encoder (slower, about
            as many encoder passes per step as unique history items); otherwise history items
            use embeddings refreshed at every validation.
        val_users: at most this many validation users (a seeded sample) per validation.
        item_tokens: batches carry the items' tokens (for a module that runs BERT); ``False``:
            catalogue indices only (``item_index``), with the history items among the batch's
            items, for the adapter on frozen BERT vectors.
        uniform_negatives: catalogue items drawn uniformly per step as extra negatives beside the
            batch's targets (mixed negatives): in-batch negatives alone are popular items, and a
            tower trained only against them learns little about the long tail. Drawn where the
            batch's items are looked up or encoded with its history items (``item_tokens=False``
            or ``encode_history``); a BERT path that encodes only the targets draws none, and its
            logQ correction counts the in-batch negatives alone.
    """

    def __init__(
        self,
        item_ids: torch.Tensor,
        item_lengths: torch.Tensor,
        train: History,
        val: pl.DataFrame,
        batch_size: int = 64,
        steps_per_epoch: int = 30,
        max_history: int = 20,
        encode_history: bool = False,
        val_users: int = 1000,
        val_batch_size: int = 256,
        seed: int = 0,
        available_from: np.ndarray | None = None,
        item_tokens: bool = True,
        uniform_negatives: int = 0,
    ) -> None:
        super().__init__()
        check_data_options(batch_size=batch_size, steps_per_epoch=steps_per_epoch, val_users=val_users,
                      uniform_negatives=uniform_negatives)  # fmt: skip
        self.item_tokens = bool(item_tokens)
        # The draw joins the batch's item set, which exists only where history items are in it;
        # log_q below must count only negatives that are drawn.
        drawn = bool(encode_history) or not self.item_tokens
        self.uniform_negatives = min(int(uniform_negatives), len(item_ids)) if drawn else 0
        self.item_ids, self.item_lengths = item_ids, item_lengths
        # When each item was first listed (NaN = always): validation, like the test evaluation,
        # never ranks an item for a moment before it existed, and training never offers one as a
        # negative of an earlier event. A copy: the input may be read-only.
        self.available_from = (
            None if available_from is None else torch.tensor(np.asarray(available_from, dtype=np.float64))
        )
        self.train, self.val = train, val
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.max_history, self.encode_history = max_history, encode_history
        self.val_users, self.val_batch_size, self.seed = val_users, val_batch_size, seed
        self._told_without_history = False
        self.examples = NextItemExamples(train, max_history)
        # log of each item's chance to be a candidate of a step: the batch's targets (each drawn
        # with the item's share of training targets) and the uniform draw, de-duplicated, so the
        # chance is 1 - (1 - share)^batch_size * (1 - 1/n_items)^uniform_negatives. The module
        # subtracts it (logQ correction, Yi et al., RecSys 2019). The expected count
        # (batch_size * share + ...) is the same for rare items, but exceeds 1 for popular ones,
        # which are in every step's candidates once: it pushed their logits down by its log, so
        # the tower learned to lift them (docs/design.md, "The chance of being a candidate").
        counts = np.bincount(self.examples.items[self.examples.positions], minlength=len(item_ids))
        share = (counts + 1.0) / (counts.sum() + len(counts))
        missed = batch_size * np.log1p(-share) + self.uniform_negatives * np.log1p(-1.0 / len(counts))
        self.log_q = torch.from_numpy(np.log(-np.expm1(missed))).float()
        self.log_popularity = torch.from_numpy(np.log(share)).float()
        # The long tail for validation's check: the least popular items that together hold half
        # of the training targets (the next-item events; cold items included).
        order = np.argsort(counts, kind="stable")
        cum = np.cumsum(counts[order])
        self.tail = torch.zeros(len(counts), dtype=torch.bool)
        self.tail[torch.from_numpy(order[cum <= cum[-1] / 2])] = True
        # Each item's popularity decile by its training events (0: none), as the report's segment
        # table has it for the test: the module's decile check (``decile_min_z``) reads it.
        events = np.bincount(self.examples.items, minlength=len(counts))
        self.decile = torch.from_numpy(popularity_decile_numbers(events))

    def _gather_items(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unique items, their dynamically padded tokens, and each input's position among them."""
        uniq, inverse = torch.unique(items, return_inverse=True)
        lengths = self.item_lengths[uniq]
        width = int(lengths.max())
        ids = self.item_ids[uniq, :width].long()
        mask = (torch.arange(width) < lengths[:, None]).long()
        return uniq, ids, mask, inverse

    def collate(self, rows: list[tuple[np.ndarray, int, float, float]]) -> dict[str, torch.Tensor]:
        hist, hmask = pad_histories([r[0] for r in rows], self.max_history)
        targets = torch.tensor([r[1] for r in rows], dtype=torch.long)
        batch = {
            "history": hist,
            "history_mask": hmask,
            "targets": targets,
            "weights": torch.tensor([r[2] for r in rows], dtype=torch.float32),
        }
        if self.encode_history or not self.item_tokens:
            negatives = self._uniform_negatives(targets)
            items = torch.cat([targets, negatives, hist[hmask]])
            uniq, inverse = torch.unique(items, return_inverse=True)
            if self.item_tokens:
                _, ids, mask, _ = self._gather_items(uniq)
            else:
                batch["item_index"] = uniq
            batch["target_pos"] = inverse[: len(targets)]
            hpos = torch.full_like(hist, -1)
            hpos[hmask] = inverse[len(targets) + len(negatives) :]
            batch["history_pos"] = hpos
            # Candidates are the batch's targets and the uniform draw, not its history items.
            batch["negatives"] = torch.unique(inverse[: len(targets) + len(negatives)])
            candidates = uniq[batch["negatives"]]
        else:
            candidates, ids, mask, inverse = self._gather_items(targets)
            batch["target_pos"] = inverse
        batch["candidate_logq"] = self.log_q[candidates]
        if self.available_from is not None:
            # A candidate listed after a row's event was no choice then: it is no negative of that
            # row (the softmax of the moment, as validation and the test score it). Otherwise the
            # items listed late, which the last events want most, are pushed down by every older
            # event: on the generated data the tuned tower lost 0.009 validation NDCG@10 on
            # targets without a training event (docs/design.md).
            batch["candidate_unavailable"] = self._listed_after([r[3] for r in rows], candidates)
        batch["candidate_log_popularity"] = self.log_popularity[candidates]
        if self.item_tokens:
            batch["item_input_ids"], batch["item_attention_mask"] = ids, mask
        return batch

    def _uniform_negatives(self, targets: torch.Tensor) -> torch.Tensor:
        """The step's uniform draw, a function of the seed and the batch's targets only, so a run
        resumed from a checkpoint draws the same negatives as the run it continues."""
        if not self.uniform_negatives:
            return torch.zeros(0, dtype=torch.long)
        if self.uniform_negatives >= len(self.item_ids):
            return torch.arange(len(self.item_ids))
        key = zlib.crc32(targets.numpy().tobytes())
        g = torch.Generator().manual_seed(epoch_seed(self.seed, key, stream=2))
        return torch.randint(len(self.item_ids), (self.uniform_negatives,), generator=g)

    def train_dataloader(self) -> DataLoader:
        rank, replicas = world()  # batch_size and steps_per_epoch are per process
        sampler = EpochSampler(len(self.examples), self.steps_per_epoch * self.batch_size, self.seed, rank, replicas)
        return DataLoader(self.examples, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader:
        df = self.val
        users = df[Columns.UserIdx].unique().sort().to_numpy()
        # A user without training events has nothing for the tower to read: every item scores
        # alike for them, at every step, so they would only dilute the metric and the sample.
        with_history = self.train.user_counts[users] > 0
        if not with_history.all():
            if not with_history.any():
                raise InputError(
                    f"none of the {len(users)} validation users has an event before their validation events: "
                    "the text tower has no history to validate on (a time cut before most users' first event?)"
                )
            if not self._told_without_history:
                log.info(
                    "text tower validation: %d of %d validation users have no earlier event and are left out",
                    int((~with_history).sum()),
                    len(users),
                )
                self._told_without_history = True
            users = users[with_history]
        if len(users) > self.val_users:
            users = np.sort(np.random.default_rng(self.seed).choice(users, self.val_users, replace=False))
        targets = df.filter(pl.col(Columns.UserIdx).is_in(users)).sort(Columns.UserIdx, Columns.Timestamp)
        rows = [
            (self.train.sequences[u], int(i), int(t))
            for u, i, t in zip(
                targets[Columns.UserIdx].to_numpy(),
                targets[Columns.ItemIdx].to_numpy(),
                targets[Columns.Timestamp].to_numpy(),
                strict=True,
            )
        ]
        rank, size = world()
        if len(rows) < size:  # a rank without validation rows would skip validation and stall the others
            raise ConfigError(f"{len(rows)} validation events for {size} fine-tuning processes: use fewer processes")
        rows = rows[rank::size]  # each rank scores its share; the module sums the metric over ranks
        return DataLoader(rows, batch_size=self.val_batch_size, shuffle=False, collate_fn=self._collate_val)

    def _collate_val(self, rows: list[tuple[np.ndarray, int, int]]) -> dict[str, torch.Tensor]:
        hist, hmask = pad_histories([r[0] for r in rows], self.max_history)
        width = max(1, max(len(r[0]) for r in rows))
        seen = torch.full((len(rows), width), -1, dtype=torch.long)
        for j, (h, _, _) in enumerate(rows):
            seen[j, : len(h)] = torch.from_numpy(np.asarray(h, dtype=np.int64))
        batch = {
            "history": hist,
            "history_mask": hmask,
            "seen": seen,
            "targets": torch.tensor([r[1] for r in rows], dtype=torch.long),
        }
        if self.available_from is not None:
            batch["unavailable"] = self._listed_after([r[2] for r in rows])
        return batch

    def _listed_after(self, times: list[float], items: torch.Tensor | None = None) -> torch.Tensor:
        """``[row, item]``: whether the item (of ``items``; all by default) was listed after the
        row's event time. Items listed from the start (NaN) compare False."""
        listed = self.available_from if items is None else self.available_from[items]
        return listed[None, :] > torch.tensor(times, dtype=torch.float64)[:, None]
