"""The LightningModule that fine-tunes the item text tower on click/purchase sequences.

Objective: given a user's history, predict the next item against mixed negatives: the batch's
other targets plus ``TextDataModule.uniform_negatives`` items drawn uniformly from the catalogue
(sampled softmax). Targets are de-duplicated, so a popular item that is the target of several
rows is scored once and is never its own negative. The logQ correction subtracts the log of each
candidate's chance of being in the candidate set, so the tower learns the user's preference and
not the sampler's popularity. Each row's loss is weighted by its event (a purchase counts more).

Two ways to train the item side:

* ``train_bert=False`` (the job's default): the BERT is frozen, its catalogue vectors are computed once,
  and the item encoder's ``TextAdapter`` learns on top of them, with the history side read
  through the same adapter. A step costs a small MLP, not a BERT forward and backward.
* ``train_bert=True``: the BERT's weights are trained too (``freeze_layers`` keeps the lowest
  ones fixed); each step runs BERT on the batch's target items.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn

from recsys.errors import ConfigError
from recsys.text.distributed import encode_sharded, sum_over_ranks, world
from recsys.text.encoder import ENCODE_BATCH, TwoTower
from recsys.text.options import FROZEN_HISTORY_NEEDS_BERT, check_freeze_layers, check_interpolation, check_options


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's 0-based rank of its target, every other item scoring the same counted above it
    (equal scores are no evidence for the target), and whether the target's score is finite."""
    target = scores.gather(1, targets[:, None])
    return (scores >= target).sum(1) - 1, torch.isfinite(target.squeeze(1))


def validation_sums(
    per_row: dict[float, torch.Tensor],
    hits: dict[float, torch.Tensor],
    tail: torch.Tensor,
    deciles: torch.Tensor,
    start: torch.Tensor | None,
) -> torch.Tensor:
    """One validation's sums, a row per point (``per_row``: each point's NDCG@10 per validation
    row; ``hits``: its hits@10): NDCG, hits, rows, long-tail NDCG and rows; then for every point
    the per-row difference to it (sum, sum of squares); then, with the zero-shot ``start``'s rows,
    per decile-check group (``check_groups``) its rows and the difference's sum and sum of squares.
    Sums, so DDP's ranks add theirs up."""
    sums = []
    groups = check_groups(deciles, tail) if start is not None else []
    for a in per_row:
        sums += [per_row[a].sum(), hits[a].sum(), float(len(per_row[a])), per_row[a][tail].sum(), tail.sum()]
        for b in per_row:
            d = per_row[a] - per_row[b]
            sums += [d.sum(), (d * d).sum()]
        if start is not None:
            d = per_row[a] - start.to(per_row[a].device)
            for group in groups:
                sums += [float(group.sum()), d[group].sum(), (d[group] ** 2).sum()]
    return torch.stack([torch.as_tensor(x, dtype=torch.float64).cpu() for x in sums]) if sums else torch.zeros(0)


def mean_and_se(n: float, d_sum: float, d_sq: float) -> tuple[float, float]:
    """Mean and standard error of ``n`` >= 2 per-row differences given their sum and the sum of
    their squares (what DDP's ranks can add up)."""
    mean = d_sum / n
    var = max(d_sq / n - mean * mean, 0.0) * n / (n - 1)
    return mean, math.sqrt(var / n)


def check_groups(deciles: torch.Tensor, tail: torch.Tensor) -> list[torch.Tensor]:
    """The row groups of the decile check: each popularity decile (0: targets without a training
    event) and the long tail, which pools the deciles a popularity drift hits first."""
    return [*(deciles == k for k in range(11)), tail]


class TextTowerModule(L.LightningModule):
    """Args:
    net: the two-tower network (its BERT weights are trained, not frozen).
    lr_encoder: learning rate of the BERT weights; lr_head: of the user tower.
    warmup_steps: linear warm-up of both learning rates.
    freeze_embeddings: keep BERT's word embeddings fixed (about 20 % faster on CPU).
    freeze_layers: also keep the embedding layer and the lowest N transformer layers fixed: no
        backward pass and no optimiser state for them (a speed/accuracy option).
    length_buckets: encode each step's unique items in this many length-sorted chunks, each
        padded to its own longest item (1 = one chunk padded to the batch's longest).
    fused_optimizer: AdamW's fused kernel (one pass over each tensor; the default for-loop
        implementation on CPU spent ~14 % of a MiniLM step in ~10 small kernels per parameter).
    logq_correction: weight of the sampling correction: in-batch negatives are drawn in
        proportion to popularity, so without it the tower learns to push popular items down
        (1.0 = full correction, 0.0 = plain in-batch softmax).
    popularity_debias: add this times each candidate's log share of the training targets to the
        training logits. The logQ correction makes sampled softmax estimate the full softmax,
        whose scores rank by popularity as much as by preference; with the popularity added
        back in training, the learned score is the preference over popularity (1: pointwise
        mutual information), which the ranker cannot get from its popularity and CF features
        and which carries over to the long tail and to new items.
    train_bert: train the BERT's weights (slow on a CPU) or only the adapter on its frozen vectors.
    train_threads: torch's intra-op threads while training on frozen vectors (``None``: unchanged).
        Its matrices are small: more threads add synchronisation, and on a busy machine
        oversubscribed OpenMP threads made a step 5-15x slower.
    lr_adapter: learning rate of the item encoder's adapter.
    interpolation: each validation scores the weights ``a`` of the way from the zero-shot start
        to the trained ones, ``start + a * (trained - start)``, for every ``a`` here, and keeps
        the best (``val/interpolation``); the best checkpoint carries its ``a``, and
        ``apply_interpolation`` moves the restored weights there (refine, don't overwrite: on
        Amazon-Scientific the trained weights lose to their start while half-way scores above
        it). ``(1.0,)``: the trained weights only. The adapter path only: with ``train_bert``
        each ``a`` would cost a BERT catalogue pass.
    interpolation_min_z: a point short of the largest one that passes the decile check (the
        trained weights, where they pass) is kept at a check only if its mean per-row validation
        gain over that one exceeds this many paired standard errors (the best of several points
        would otherwise pick noise on a small validation set).
    decile_min_z: a point (a check's trained weights or one of its interpolations) is kept only
        if neither a popularity decile of the validation targets (by training events; items
        without any are one more) nor the long tail scores below the zero-shot start by more
        than this many paired standard errors: the report's test of the towers, asked on
        validation. ``None``: no check. Where no point passes, the check scores as the start
        (and cannot beat it).
    """

    def __init__(
        self,
        net: TwoTower,
        lr_encoder: float = 5e-5,
        lr_head: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 10,
        freeze_embeddings: bool = False,
        encode_batch_size: int = ENCODE_BATCH,
        logq_correction: float = 1.0,
        freeze_layers: int = 0,
        length_buckets: int = 1,
        fused_optimizer: bool = True,
        train_bert: bool = True,
        lr_adapter: float = 1e-3,
        popularity_debias: float = 0.0,
        train_threads: int | None = None,
        interpolation: Sequence[float] = (1.0,),
        interpolation_min_z: float = 2.0,
        decile_min_z: float | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.interpolation = check_interpolation(interpolation, train_bert)
        check_options(None, {}, {"interpolation_min_z": interpolation_min_z, "decile_min_z": decile_min_z})
        self.interpolation_min_z = float(interpolation_min_z)
        self.decile_min_z = None if decile_min_z is None else float(decile_min_z)
        self.train_bert, self.lr_adapter = bool(train_bert), lr_adapter
        self.popularity_debias = float(popularity_debias)
        check_options(None, {}, {"train_threads": train_threads, "popularity_debias": popularity_debias})
        self.train_threads = train_threads
        self._threads_before: int | None = None
        self.lr_encoder, self.lr_head, self.weight_decay = lr_encoder, lr_head, weight_decay
        self.warmup_steps, self.encode_batch_size = warmup_steps, encode_batch_size
        self.logq_correction = logq_correction
        self.length_buckets, self.fused_optimizer = length_buckets, fused_optimizer
        bert = self.net.item_encoder.bert
        if not self.train_bert:
            if self.net.frozen_history:
                raise ConfigError(FROZEN_HISTORY_NEEDS_BERT)
            bert.requires_grad_(False)
        if freeze_embeddings:
            bert.embeddings.word_embeddings.weight.requires_grad_(False)
        if freeze_layers:
            check_freeze_layers(freeze_layers, len(bert.encoder.layer))
            # Nothing below the first trained layer needs a gradient, so autograd skips their backward.
            for m in (bert.embeddings, *bert.encoder.layer[:freeze_layers]):
                m.requires_grad_(False)
        # The zero-shot start of every trained tensor, for ``interpolation``.
        self.start = {n: p.detach().clone() for n, p in self._trained()} if self.interpolation != [1.0] else {}
        self.alpha = 1.0  # the interpolation of the last validation's best score
        self.item_cache: torch.Tensor | None = None
        self.base_cache: torch.Tensor | None = None  # the frozen BERT's catalogue vectors
        #: (global step, validation NDCG@10, its long-tail part) after every validation
        self.val_curve: list[tuple[int, float, float]] = []
        self._val: dict[float, list[list[torch.Tensor]]] = {}  # per interpolation: NDCG and hit rows
        self._val_tail: list[torch.Tensor] = []  # whether each validation row's target is long-tail
        self._val_deciles: list[torch.Tensor] = []  # each validation row's target decile
        # The zero-shot validation's rows (this rank's share, in its order) and logged scores: the
        # decile check compares every later point with them.
        self._start_rows: torch.Tensor | None = None
        self._start_scores: tuple[float, float, float] | None = None
        # per interpolation: its catalogue vectors and user tower, during a validation
        self._points: dict[float, tuple[torch.Tensor, torch.nn.Module]] = {}

    # -- weights between the zero-shot start and the trained ones ------------------------------
    def _trained(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def _set_interpolation(self, alpha: float, trained: dict[str, torch.Tensor]) -> None:
        for n, p in self._trained():
            if alpha == 1.0:  # bit for bit: start + (trained - start) rounds, and training goes on from here
                p.copy_(trained[n])
            else:
                start = self.start[n].to(p.device)
                p.copy_(start + alpha * (trained[n] - start))

    def apply_interpolation(self, alpha: float) -> None:
        """Move the (restored best) trained weights ``alpha`` of the way from their start."""
        if alpha != 1.0:
            self._set_interpolation(alpha, {n: p.detach().clone() for n, p in self._trained()})
        self.alpha = alpha

    def _alphas(self) -> list[float]:
        # Before any step (the zero-shot validation) every point of the line is the start.
        if self.start and self.trainer.state.fn == TrainerFn.FITTING:
            return self.interpolation
        return [1.0]

    # -- item embeddings of the whole catalogue, for history items and validation -------------
    def refresh_cache(self) -> None:
        dm = self.trainer.datamodule
        enc = self.net.item_encoder
        # Under DDP each rank encodes its share of the catalogue; every rank gets all of it.
        if not self.train_bert:
            if self.base_cache is None:  # the BERT never changes: one catalogue pass per fit
                vectors = encode_sharded(self._encode(enc.base_vectors), dm.item_ids, dm.item_lengths, self.device)
                if world()[1] > 1 and enc.embedding_cache is not None:  # the job's later passes find them all
                    enc.embedding_cache.store(enc, dm.item_ids, dm.item_lengths, vectors)
                self.base_cache = vectors.to(self.device)
            with torch.no_grad():
                self.item_cache = enc.adapt(self.base_cache).float()
        else:
            vectors = encode_sharded(self._encode(enc.encode_tokens), dm.item_ids, dm.item_lengths, self.device)
            self.item_cache = vectors.to(self.device)
        if self.net.frozen_history and self.net.history_embeddings is None:
            # The first pass (zero-shot validation or fit start) fixes the history side for good.
            self.net.history_embeddings = self.item_cache.detach().cpu().clone()

    def _encode(self, encode):
        # A bar on the first rank: the BERT's catalogue pass is the job's longest step without one
        # at 100x (minutes for 150k titles); items the embedding cache holds are not counted.
        progress = world()[0] == 0
        return lambda ids, lengths: encode(ids, lengths, self.encode_batch_size, progress)

    @property
    def history_cache(self) -> torch.Tensor:
        if self.net.history_embeddings is not None:
            return self.net.history_embeddings.to(self.device)
        return self.item_cache

    def on_fit_start(self) -> None:
        if self.train_threads is not None and not self.train_bert:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.train_threads)
        self.refresh_cache()

    def on_fit_end(self) -> None:
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    # The frozen history side is data, not a parameter: it travels in the checkpoint so a
    # resumed run reads the same history vectors as the run it continues.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.net.history_embeddings is not None:
            checkpoint["history_embeddings"] = self.net.history_embeddings
        # Saved after a validation: the best checkpoint's weights are those of its best ``a``.
        checkpoint["interpolation"] = self.alpha

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "history_embeddings" in checkpoint:
            self.net.history_embeddings = checkpoint["history_embeddings"]

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.train_bert:
            items = self.net.item_encoder.forward_bucketed(
                batch["item_input_ids"], batch["item_attention_mask"], self.length_buckets
            )
        else:
            items = self.net.item_encoder.adapt(self.base_cache[batch["item_index"]])
        if "history_pos" in batch:
            pos = batch["history_pos"]
            hist = items[pos.clamp(min=0)]
            negatives = batch["negatives"]
        else:
            hist = self.history_cache[batch["history"].clamp(min=0)]
            negatives = None
        users = self.net.user_encoder(hist, batch["history_mask"])
        candidates = items if negatives is None else items[negatives]
        scale = self.net.log_inv_temperature.clamp(max=math.log(100.0)).exp()
        logits = users @ candidates.T * scale
        logits = logits - self.logq_correction * batch["candidate_logq"][None, :]
        if self.popularity_debias:
            logits = logits + self.popularity_debias * batch["candidate_log_popularity"][None, :]
        labels = batch["target_pos"]
        if negatives is not None:
            labels = torch.searchsorted(negatives, labels)
        if "candidate_unavailable" in batch:
            unavailable = batch["candidate_unavailable"].clone()
            # A row's own target always counts, even where its event predates the item's listing.
            unavailable[torch.arange(len(labels), device=labels.device), labels] = False
            logits = logits.masked_fill(unavailable.to(logits.device), -torch.inf)
        loss_rows = F.cross_entropy(logits, labels, reduction="none")
        w = batch["weights"]
        loss = (loss_rows * w).sum() / w.sum()
        # sync_dist: under DDP the logged loss is the mean over the ranks' batches.
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(w), sync_dist=True)
        return loss

    # -- validation: full ranking over the catalogue, seen items removed ----------------------
    def on_validation_epoch_start(self) -> None:
        self.refresh_cache()
        alphas = self._alphas()
        self._val = {a: [[], []] for a in alphas}
        self._val_tail, self._val_deciles = [], []
        # Each point's catalogue vectors (the adapter over the frozen BERT's vectors: a small MLP)
        # and user tower, made once per validation; then the trained weights back for training.
        self._points = {1.0: (self.item_cache, self.net.user_encoder)}
        if alphas != [1.0]:
            trained = {n: p.detach().clone() for n, p in self._trained()}
            for a in alphas:
                if a != 1.0:
                    self._set_interpolation(a, trained)
                    with torch.no_grad():
                        items = self.net.item_encoder.adapt(self.base_cache).float()
                    self._points[a] = (items, copy.deepcopy(self.net.user_encoder))
            self._set_interpolation(1.0, trained)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        seen = batch["seen"]
        self._val_tail.append(self.trainer.datamodule.tail.to(seen.device)[batch["targets"]])
        self._val_deciles.append(self.trainer.datamodule.decile.to(seen.device)[batch["targets"]])
        for a, rows_out in self._val.items():
            items, user_encoder = self._points[a]
            hist = (items if self.net.history_embeddings is None else self.history_cache)[batch["history"].clamp(min=0)]
            users = user_encoder(hist, batch["history_mask"])
            scores = users @ items.T
            rows = torch.arange(len(seen), device=seen.device)[:, None].expand_as(seen)
            scores[rows[seen >= 0], seen[seen >= 0]] = -torch.inf
            if "unavailable" in batch:
                scores = scores.masked_fill(batch["unavailable"].to(scores.device), -torch.inf)
            rank, finite = target_ranks(scores, batch["targets"])
            hit = (rank < 10) & finite
            rows_out[0].append(torch.where(hit, 1.0 / torch.log2(rank.float() + 2.0), 0.0))
            rows_out[1].append(hit.float())

    def on_validation_epoch_end(self) -> None:
        alphas = list(self._val)

        def cat(parts: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=self.device)

        per_row = {a: cat(v[0]) for a, v in self._val.items()}
        hits = {a: cat(v[1]) for a, v in self._val.items()}
        tail = cat(self._val_tail, torch.bool)
        deciles = cat(self._val_deciles, torch.long)
        self._val, self._points, self._val_tail, self._val_deciles = {}, {}, [], []
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        checking = (
            self.decile_min_z is not None
            and fitting
            and self._start_rows is not None
            and len(self._start_rows) == len(deciles)
        )
        # Sums and counts over every rank's share of the validation users (DDP): all ranks log
        # the same metric and pick the same point, so early stopping and the best checkpoint agree.
        start = self._start_rows if checking else None
        sums = validation_sums(per_row, hits, tail, deciles, start)
        total = sum_over_ranks(sums.to(self.device)).view(len(alphas), -1).tolist() if len(sums) else []
        if not total or not total[0][2]:
            return
        if not fitting:  # the zero-shot validation: what every point is checked against
            self._start_rows = per_row[alphas[0]].detach().clone()
            row = total[0]
            self._start_scores = (row[0] / row[2], row[1] / row[2], row[3] / row[4] if row[4] else 0.0)
        best, worst = self._choose(alphas, total, checking)
        if best is not None:
            n_ndcg, n_hit, rows, n_tail, tail_rows = total[alphas.index(best)][:5]
            self.alpha, kept_z = best, worst[best]
            scores = (n_ndcg / rows, n_hit / rows, n_tail / tail_rows if tail_rows else 0.0)
        else:  # every point lost a decile: this check is worth the start, which it cannot beat
            self.alpha, kept_z = 0.0, 0.0
            scores = self._start_scores
        ndcg, recall, tail_ndcg = (torch.tensor(float(x)) for x in scores)
        # Equal on every rank already; sync_dist only tells Lightning so.
        self.log("val/ndcg_at_10", ndcg, prog_bar=True, sync_dist=True)
        self.log("val/recall_at_10", recall, sync_dist=True)
        # The long-tail check: validation targets among the least popular items holding half of
        # the training targets (``TextDataModule.tail``).
        self.log("val/ndcg_at_10_tail", tail_ndcg, sync_dist=True)
        if checking:
            self.log("val/decile_min_z", kept_z, sync_dist=True)  # the kept point's lowest decile
        if len(alphas) > 1 or checking:
            self.log("val/interpolation", self.alpha, sync_dist=True)
        if not self.trainer.sanity_checking:
            self.val_curve.append((int(self.trainer.global_step), float(ndcg), float(tail_ndcg)))

    def _choose(
        self, alphas: list[float], total: list[list[float]], checking: bool
    ) -> tuple[float | None, dict[float, float]]:
        """The point a validation keeps (``None``: none passes the decile check) and each point's
        lowest z-score in that check. ``total``: per point, the rank-summed validation sums.

        The decile check first; then a point short of the largest passing one is kept only where
        it beats that one by more than ``interpolation_min_z`` paired standard errors over the
        validation rows (the best of several points at every check would otherwise pick noise
        on a small validation set). Ties go to the larger point."""
        n = len(alphas)
        worst = {a: self._worst_decile_z(total[i][5 + 2 * n :]) if checking else math.inf for i, a in enumerate(alphas)}
        passing = [a for a in alphas if not checking or worst[a] >= -self.decile_min_z]
        if not passing:
            return None, worst
        ref = max(passing)
        r = alphas.index(ref)
        rows = total[0][2]
        eligible = [
            a
            for i, a in enumerate(alphas)
            if a in passing and (a == ref or self._beats(*total[i][5 + 2 * r : 7 + 2 * r], rows))
        ]
        return max(eligible, key=lambda a: (total[alphas.index(a)][0], a)), worst

    def _beats(self, d_sum: float, d_sq: float, rows: float) -> bool:
        """Whether a mean per-row gain (``d_sum``, ``d_sq``: the sum of the differences and of
        their squares) exceeds ``interpolation_min_z`` of its standard error."""
        if rows < 2:
            return False
        mean, se = mean_and_se(rows, d_sum, d_sq)
        return mean > self.interpolation_min_z * se

    @staticmethod
    def _worst_decile_z(sums: list[float]) -> float:
        """The lowest z-score (mean difference to the start over its standard error) among the
        groups (``check_groups``): ``sums`` holds (rows, sum, sum of squares) per group. A group
        of fewer than two rows says nothing; one whose rows all moved alike counts by its sign."""
        worst = math.inf
        for k in range(0, len(sums), 3):
            n, d_sum, d_sq = sums[k : k + 3]
            if n < 2:
                continue
            mean, se = mean_and_se(n, d_sum, d_sq)
            z = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
            worst = min(worst, z)
        return worst

    def configure_optimizers(self):
        enc = self.net.item_encoder
        bert = [p for p in enc.bert.parameters() if p.requires_grad]
        adapter = [p for p in enc.adapter.parameters()] if enc.adapter is not None else []
        head = [*self.net.user_encoder.parameters(), self.net.log_inv_temperature]
        head = [p for p in head if p.requires_grad]
        params = [*bert, *adapter, *head]
        fused = self.fused_optimizer and all(p.device.type in ("cpu", "cuda") for p in params)
        groups = [
            {"params": bert, "lr": self.lr_encoder},
            {"params": adapter, "lr": self.lr_adapter},
            {"params": head, "lr": self.lr_head},
        ]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=self.weight_decay, fused=fused or None)
        warm = max(1, self.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
