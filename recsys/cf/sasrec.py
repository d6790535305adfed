"""SASRec: a causal transformer over the user's item ids that predicts the next item.

Kang & McAuley, "Self-Attentive Sequential Recommendation" (ICDM 2018), trained with the full
softmax over the catalogue (cross-entropy at every position of every history) rather than the
paper's binary loss with one sampled negative per position (not measured here: a catalogue of a
few thousand items affords the full softmax). So trained it is as strong a single model as ALS on
Amazon-Scientific's validation. Unlike the item-kNN models it learns which *order* of items leads
where, from every user's sequence at once; unlike the text tower it knows only ids, except where
it starts: with ``text_init_std``, the item embeddings start from the text tower's item vectors
(their top principal components), so that items with few events begin near the items their text
resembles rather than at random, as UniSRec and Recformer start sequential models from text.

The user's vector is the last position's output over their ``max_history`` most recent items,
computed from the history alone (no per-user parameters), so a served user is scored exactly as
an evaluated one, known or not. Items score by the dot product with the same embeddings the
inputs use. Saved as the network's weights in one npz (no pickle) plus its settings.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from recsys.cf.models import _Saved, configured_copy, show_progress, unit_rows
from recsys.errors import ConfigError, require_number, require_whole
from recsys.kernels import pair_scores
from recsys.recommender import ROW_BLOCK, History, ModelUpdate, Recommender, Updatable, fixed_block_matmul

if TYPE_CHECKING:
    import torch
    from torch import nn

#: past this many items the full softmax's logits (batch x positions x items) outgrow a
#: laptop's memory: 50,000 items at the default batch hold 0.5 GB of logits and as much again
#: of their gradients. Larger catalogues must sample (``negatives``).
FULL_SOFTMAX_ITEMS = 50_000

#: what a fit holds beyond the data (GB): torch's workspace and the network at a fixed cost, and
#: per logit (a batch's positions x the items scored) about 12 bytes: the logits, their softmax and
#: its gradient. Measured at the default width and batch on 20,000 users of 25 events: 0.33 / 1.11
#: GB at 5,000 / 30,000 items (0.89 GB at 50,000 items with histories half as long).
FIT_FIXED_GB = 0.18
FIT_BYTES_PER_LOGIT = 12

#: the ridge penalty of the map from text vectors to trained item vectors that places items a
#: network never saw (``with_items``). Chosen on Amazon-Scientific's validation with 5 % of the
#: items held out as new (``bench/sasrec_new_items.py``): ridge 0.1 / 1 / 10 / 100 gave NDCG@10 0.0916 /
#: 0.0914 / 0.0902 / 0.0897 against 0.0895 for the mean item vector.
TEXT_RIDGE = 0.1


def _network(n_items: int, dim: int, layers: int, heads: int, max_history: int, dropout: float) -> nn.Module:
    """The transformer, built here so that torch is imported only by a pipeline that has one."""
    import torch
    from torch import nn

    class Network(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.items = nn.Embedding(n_items + 1, dim, padding_idx=0)  # row 0: padding
            self.positions = nn.Embedding(max_history, dim)
            self.dropout = nn.Dropout(dropout)
            layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout, batch_first=True, norm_first=True)
            self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
            nn.init.normal_(self.items.weight, std=0.02)
            nn.init.normal_(self.positions.weight, std=0.02)
            with torch.no_grad():
                self.items.weight[0] = 0.0

        def forward(self, seq: torch.Tensor) -> torch.Tensor:
            """``seq``: [B, L] item index + 1, right-aligned (0 pads the left); [B, L, dim] out."""
            length = seq.shape[1]
            real = seq > 0
            # Positions count from the right (the newest item is always the last one), so a batch
            # trimmed of its left padding reads the same embeddings as a full-width one.
            x = self.items(seq) * math.sqrt(dim) + self.positions.weight[max_history - length :]
            x = self.dropout(x) * real.unsqueeze(-1)
            # Causal, padding hidden, and every position always sees itself: a row that could
            # attend to nothing is NaN in torch's inference path (and NaN times a zero
            # attention weight is still NaN in the next layer).
            eye = torch.eye(length, dtype=torch.bool)
            allowed = torch.tril(torch.ones(length, length, dtype=torch.bool)) & (real[:, None, :] | eye)
            mask = (~allowed).repeat_interleave(heads, 0)
            return self.norm(self.transformer(x, mask=mask))

    return Network()


def _item_table(network: nn.Module) -> np.ndarray:
    """The items' vectors (the embedding table without its padding row), float32, a copy: what
    every user vector is scored against. Taken once per network, not per served block."""
    return network.items.weight[1:].detach().numpy().astype(np.float32, copy=True)


def text_start(item_text: np.ndarray, dim: int, std: float) -> np.ndarray:
    """``[n_items, dim]`` float32: the centred text vectors on their top ``dim`` principal
    components, scaled to standard deviation ``std`` over all entries. From the ``d x d``
    covariance (not an SVD of the catalogue), each component's sign fixed by its largest
    entry. Text narrower than ``dim`` fills its first ``d`` columns; the rest start as the
    random embeddings do (normal, std 0.02, torch's stream)."""
    import torch

    x = np.asarray(item_text, dtype=np.float64)
    x = x - x.mean(0)
    k = min(dim, x.shape[1])
    _, vectors = np.linalg.eigh(x.T @ x)
    top = vectors[:, ::-1][:, :k]  # eigh sorts ascending
    top *= np.sign(top[np.abs(top).argmax(0), np.arange(k)])
    z = x @ top
    z *= std / max(float(z.std()), 1e-12)
    out = torch.empty(len(x), dim).normal_(std=0.02).numpy()
    out[:, :k] = z
    return out.astype(np.float32)


def text_projection(
    known_text: np.ndarray, vectors: np.ndarray, new_text: np.ndarray, ridge: float = TEXT_RIDGE
) -> np.ndarray:
    """``[len(new_text), dim]`` float32: the ridge regression of ``vectors`` (the trained items')
    on their text vectors ``known_text``, with intercept, applied to ``new_text``: where an item
    the network never saw would sit, judged by its text."""
    x = np.asarray(known_text, dtype=np.float64)
    y = np.asarray(vectors, dtype=np.float64)
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx
    weights = np.linalg.solve(xc.T @ xc + ridge * np.eye(x.shape[1]), xc.T @ (y - my))
    return ((np.asarray(new_text, dtype=np.float64) - mx) @ weights + my).astype(np.float32)


def right_aligned(histories: Sequence[np.ndarray], length: int) -> np.ndarray:
    """[len(histories), length] int64: each history's last ``length`` items + 1, at the right end."""
    out = np.zeros((len(histories), length), dtype=np.int64)
    for row, items in enumerate(histories):
        items = items[-length:]
        if len(items):
            out[row, length - len(items) :] = items + 1
    return out


class SASRec(_Saved, Updatable):
    """Self-attentive sequential recommendation over item ids (module docstring).

    Args:
        dim: embedding and transformer width.
        layers, heads: transformer depth and attention heads (``dim % heads == 0``).
        max_history: the most recent items read per user (one position embedding each); each
            user's last ``max_history + 1`` events are one training sequence.
        dropout: on the inputs and inside the transformer while training.
        epochs: passes over the users' sequences (a fixed count, chosen on validation: the
            fit never reads the stage's targets).
        learning_rate, batch_size: Adam's step size and sequences per step.
        negatives: None: the full softmax over the catalogue; N: N uniformly drawn items shared
            by a batch (uniform draws need no logQ correction), for catalogues past
            ``FULL_SOFTMAX_ITEMS``.
        text_init_std: None: item embeddings start random (normal, std 0.02); a value: they
            start from the item text vectors ``fit`` is given (``item_text``), projected on
            their top ``dim`` principal components and scaled to this standard deviation.
        length_buckets: each epoch's batches hold sequences of like length, trimmed of their
            common left padding (most histories are far shorter than ``max_history``), the
            loss weighted per position as in a random batch; false: random batches at full
            width. Amazon-Scientific: 2x faster, validation within noise (``bench/sasrec.py``).
        seed: weights, batch order, dropout and negatives (same seed, same scores).
        progress: a bar over the epochs; None: when stderr is a terminal.
    """

    name = "sasrec"
    kind = "SASRec"
    writes_into = True
    PARAMS = (
        "dim",
        "layers",
        "heads",
        "max_history",
        "dropout",
        "epochs",
        "learning_rate",
        "batch_size",
        "negatives",
        "seed",
    )  # not text_init_std or length_buckets: how a fit starts and proceeds, which the saved
    # network no longer needs (and pipelines saved before they existed still load); the run's
    # config.yaml records them

    def __init__(
        self,
        dim: int = 64,
        layers: int = 2,
        heads: int = 2,
        max_history: int = 20,
        dropout: float = 0.5,
        epochs: int = 25,
        learning_rate: float = 1e-3,
        batch_size: int = 128,
        negatives: int | None = None,
        text_init_std: float | None = None,
        length_buckets: bool = True,
        seed: int = 0,
        progress: bool | None = None,
    ) -> None:
        # ConfigError: one line and exit 2 from the entry points, before anything is fitted.
        for key, value in (("dim", dim), ("layers", layers), ("heads", heads), ("max_history", max_history)):
            require_whole(f"SASRec {key}", value)
        require_whole("SASRec epochs", epochs)
        require_whole("SASRec batch_size", batch_size)
        require_whole("SASRec negatives", negatives, optional=True)
        require_whole("SASRec seed", seed, low=0)
        require_number("SASRec dropout", dropout, 0, 1, high_open=True)
        require_number("SASRec learning_rate", learning_rate, 0, low_open=True)
        require_number("SASRec text_init_std", text_init_std, 0, low_open=True, optional=True)
        if dim % heads:
            raise ConfigError(f"SASRec dim ({dim}) must be a multiple of heads ({heads})")
        self.dim, self.layers, self.heads, self.max_history = dim, layers, heads, max_history
        self.dropout, self.epochs, self.learning_rate = float(dropout), epochs, float(learning_rate)
        self.batch_size, self.negatives, self.seed, self.progress = batch_size, negatives, seed, progress
        self.text_init_std = None if text_init_std is None else float(text_init_std)
        if not isinstance(length_buckets, bool):
            raise ConfigError(f"SASRec length_buckets must be true or false, got {length_buckets!r}")
        self.length_buckets = length_buckets

    @property
    def reads_item_text(self) -> bool:
        return self.text_init_std is not None

    def check_catalogue(self, n_items: int) -> None:
        if self.negatives is None and n_items > FULL_SOFTMAX_ITEMS:
            raise ConfigError(
                f"SASRec's full softmax over {n_items:,} items is past {FULL_SOFTMAX_ITEMS:,}: set its "
                "negatives (e.g. negatives=2048) to sample the catalogue instead"
            )

    def fit_memory_gb(self, n_items: int) -> float:
        scored = n_items if self.negatives is None else self.negatives + 1
        return FIT_FIXED_GB + FIT_BYTES_PER_LOGIT * self.batch_size * self.max_history * scored / 1e9

    def fit(self, history: History, start: SASRec | None = None, item_text: np.ndarray | None = None) -> SASRec:
        """``start``: continue from that model's network (its catalogue the first items of
        ``history``'s; ``with_items`` grows it) for ``epochs`` instead of fresh weights.
        ``item_text``: ``[n_items, d]`` text vectors of the catalogue, where the embeddings start
        (``text_init_std``); with ``start``, where the items its network never saw start
        (``with_items``)."""
        import torch
        import torch.nn.functional as F
        from tqdm.auto import tqdm

        n_items = history.n_items
        self.check_catalogue(n_items)
        if self.reads_item_text and start is None:
            if item_text is None:
                raise ValueError("SASRec with text_init_std needs the catalogue's item_text vectors to fit")
            if len(item_text) != n_items:
                raise ValueError(f"SASRec item_text has {len(item_text)} rows for {n_items} items")
        sequences = [s for s in history.sequences if len(s) >= 2]
        data = torch.from_numpy(right_aligned(sequences, self.max_history + 1))
        inputs, targets = data[:, :-1], data[:, 1:]
        # Its own random stream: the job's other draws stay as they were, and a refit repeats.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            rng = np.random.default_rng(self.seed)
            if start is None:
                self.network = net = self._build(n_items)
                if self.reads_item_text:
                    with torch.no_grad():
                        net.items.weight[1:] = torch.from_numpy(text_start(item_text, self.dim, self.text_init_std))
            else:
                self.network = net = start.with_items(n_items, item_text).network  # a copy
            opt = torch.optim.Adam(net.parameters(), lr=self.learning_rate)
            net.train()
            bar = tqdm(
                range(self.epochs),
                desc=f"{self.name} epochs",
                unit="epoch",
                leave=False,
                disable=not show_progress(self.progress),
                file=sys.stderr,
            )
            lengths = (inputs > 0).sum(1).numpy()
            # Bucketed batches hold few or many positions; the loss is summed over a batch's
            # positions and divided by what a random batch of its rows holds on average, so every
            # position weighs what it does in a random batch (a mean would weigh a batch of short
            # histories' positions up to max_history times as much).
            per_row = float(((inputs > 0) & (targets > 0)).sum()) / max(len(inputs), 1)
            reduction = "sum" if self.length_buckets else "mean"
            for _ in bar:
                for batch in self._batches(lengths, rng):
                    rows = torch.from_numpy(batch)
                    width = int(lengths[batch].max()) if self.length_buckets else inputs.shape[1]
                    x, y = inputs[rows, -width:], targets[rows, -width:]
                    predicts = (x > 0) & (y > 0)
                    h = net(x)[predicts]
                    y = y[predicts] - 1
                    table = net.items.weight[1:]
                    if self.negatives is None:
                        loss = F.cross_entropy(h @ table.T, y, reduction=reduction)
                    else:
                        drawn = torch.from_numpy(rng.integers(0, n_items, self.negatives))
                        logits = h @ table[drawn].T
                        logits = logits.masked_fill(drawn[None, :] == y[:, None], float("-inf"))  # hits
                        own = (h * table[y]).sum(-1, keepdim=True)
                        loss = F.cross_entropy(torch.cat([own, logits], 1), torch.zeros_like(y), reduction=reduction)
                    if self.length_buckets:
                        loss = loss / (len(batch) * per_row)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        net.eval()
        self.item_vectors = _item_table(net)
        self._embed(history)
        return self

    def _batches(self, lengths: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """One epoch's batches of sequence rows. ``length_buckets``: rows of like length together
        (a random order, stably sorted by length, cut into batches, the batches shuffled), so a
        batch trimmed of its left padding is narrow; else random batches."""
        order = rng.permutation(len(lengths))
        if self.length_buckets:
            order = order[np.argsort(lengths[order], kind="stable")]
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))] if self.length_buckets else batches

    def _build(self, n_items: int) -> nn.Module:
        return _network(n_items, self.dim, self.layers, self.heads, self.max_history, self.dropout)

    def _embed(self, history: History) -> None:
        """User vectors of every user of ``history`` (the last position over their recent items),
        ``ROW_BLOCK`` users at a time, the last block padded: the same products for a user
        whichever block it is in, so evaluated and served scores agree."""
        import torch

        seqs = right_aligned(history.sequences, self.max_history)
        users = np.zeros((len(seqs), self.dim), dtype=np.float32)
        block = np.zeros((ROW_BLOCK, self.max_history), dtype=np.int64)
        with torch.inference_mode():
            for start in range(0, len(seqs), ROW_BLOCK):
                part = seqs[start : start + ROW_BLOCK]
                block[:] = 0
                block[: len(part)] = part
                users[start : start + len(part)] = self.network(torch.from_numpy(block))[: len(part), -1].numpy()
        self.user_vectors = users
        self.note_history(history)

    def for_users(self, history: History, known: np.ndarray) -> SASRec:
        """Every user of ``history`` read from their events (known or not: no per-user weights)."""
        out = copy.copy(self)
        out._embed(history)
        return out

    def with_items(self, n_items: int, item_text: np.ndarray | None = None, ridge: float = TEXT_RIDGE) -> SASRec:
        """This network over a catalogue grown to ``n_items`` (an update: ``cf_mode=fold_in``
        keeps it, a warm refit continues from it). An item it never saw gets, as input and as
        output, the projection of its text onto the trained item vectors (``text_projection``)
        when ``item_text`` (``[n_items, d]``, the grown catalogue's text vectors) is given, so that
        it scores as the items its text resembles; else the mean trained item vector, so that it
        scores as an average item rather than as a random one. ``ridge``: the projection's
        penalty."""
        import torch

        old = self.network.items.weight.detach()
        known = len(old) - 1
        if n_items < known:
            raise ValueError(f"SASRec cannot shrink its catalogue from {known} to {n_items} items")
        if item_text is not None and len(item_text) != n_items:
            raise ValueError(f"SASRec item_text has {len(item_text)} rows for {n_items} items")
        out = copy.copy(self)
        out.network = copy.deepcopy(self.network)
        if item_text is not None and n_items > known:
            fresh = torch.from_numpy(text_projection(item_text[:known], old[1:].numpy(), item_text[known:], ridge))
        else:
            fresh = old[1:].mean(0, keepdim=True).expand(n_items - known, -1)
        table = torch.cat([old, fresh])
        out.network.items = torch.nn.Embedding.from_pretrained(table.clone(), freeze=False, padding_idx=0)
        out.item_vectors = _item_table(out.network)
        return out

    def refitted(self, name: str, configured: Recommender | None, update: ModelUpdate) -> SASRec:
        """The configured SASRec, continued from this network for ``warm_iterations`` epochs (the
        new items placed by their text first, ``with_items``); a cold refit that starts from text
        (``text_init_std``) needs the refreshed tower's item vectors, a ``ValueError`` without."""
        model = configured_copy(name, configured, SASRec, "SASRec model")
        start = None
        if update.warm_iterations is not None:
            model.epochs, start = update.warm_iterations, self
        elif model.reads_item_text and update.item_text is None:  # a cold fit starts from the tower's items
            raise ValueError(f"a cold refit of '{name}' starts from the text tower: pass its text_parts")
        return model.fit(update.history, start=start, item_text=update.item_text)

    def folded_in(self, name: str, configured: Recommender | None, update: ModelUpdate) -> SASRec:
        """The network kept, grown by the new items where their text puts them (``with_items``):
        it has no per-user weights, so users are read from their histories when served."""
        return self.with_items(update.history.n_items, update.item_text)

    def score_users(self, users: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return fixed_block_matmul(self.user_vectors[users], self.item_vectors.T, out)

    def score_pairs(self, users: np.ndarray, items: np.ndarray, chunk: int | None = None) -> np.ndarray:
        return pair_scores(self.user_vectors, self.item_vectors, users, items)

    def item_space(self) -> np.ndarray:
        return unit_rows(self.item_vectors)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy() for k, v in self.network.state_dict().items()}

    def restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        import torch

        n_items = len(arrays["items.weight"]) - 1
        self.network = self._build(n_items)
        self.network.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})
        self.network.eval()
        self.item_vectors = _item_table(self.network)
