"""``python -m recsys.update model_uri=models:/recsys@champion data.interactions=... data.items=...``

Brings a trained pipeline up to date with the events and items that came after it, without a
full retrain, and lets a gate decide whether it replaces the served model:

1. the new files are validated against the model (clear errors, nothing registered);
2. item texts that are new or changed are encoded (in a worker process, while the rest goes
   on), the others keep their vectors; the text towers' weights and the ranker are kept;
3. CF is refitted on every event (``cf_mode=refit``; ALS and BPR continue from the model's
   factors for ``warm_iterations``) or keeps its item side and folds the users in
   (``cf_mode=fold_in``); histories, popularity and item statistics take the new events;
4. the result is registered as a new version with alias ``challenger``, created with the gate's
   verdict as its tags (``gate``: passed or failed; ``gate_result``: the figures), and its
   ``meta.json`` names the data it was fitted on (``dataset_hash``, chained from the updated
   model's; ``training_dataset_hash`` and ``training_run_id``: the training it descends from);
5. the gate, decided before anything is registered: the newest ``gate.holdout`` share of the
   new events is held out, the update is rebuilt without them, and champion and that challenger
   rank for the held-out users, from the same histories and as of the same moment (the last
   event before the holdout). The ``champion`` alias moves to the new version only if the
   challenger's NDCG@k is not worse than the champion's by more than ``gate.tolerance``. Both
   figures, their paired difference and its 95 % bootstrap interval over the held-out users are
   printed beside the verdict and logged to MLflow (``gate/difference_ndcg_at_<k>``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import recsys.config  # noqa: E402  (registers resolvers; CONFIG_DIR)
from recsys.columns import Columns  # noqa: E402
from recsys.errors import ConfigError, InputError, exit_on_user_error, require_number, require_whole  # noqa: E402
from recsys.evaluation.bootstrap import Interval, PairedBootstrap  # noqa: E402

log = logging.getLogger("recsys.update")

CF_MODES = ("refit", "fold_in")
# The update has no data.missing_text: a new item needs a text (it reaches users through the text
# tower), and a known item's row is there to change its text. So the error says what to change.
MISSING_TEXT_HELP = (
    "an update encodes each new or changed item's text: give these items a text, or leave their rows "
    "out of this file (an item the model has keeps its text; a new item's events must then wait for it)"
)


@dataclass
class NewData:
    """The validated update: new and changed item rows, and new events (ids, not indices)."""

    items: pl.DataFrame  # item_id, text, the other item columns
    events: pl.DataFrame  # user_id, item_id, timestamp, weight; sorted by timestamp
    report: dict[str, int]


def read_new_data(pipeline, source, duplicates: str = "drop") -> NewData:
    """The update's files, checked against the model: every event's item has a text row (in the
    model or the new item file), new items have text, events already in the model (whatever their
    time) are dropped or refused as ``duplicates`` says, and no other event is older than the
    model's data."""
    from recsys.data import validation as v

    known = pl.Series(Columns.Item, pipeline.item_ids.tolist(), dtype=pl.String)
    # A header-only item file is an update without new or changed items (README).
    items, events = source.load_tables(known, allow_empty_items=True)
    # The loader added ``weight`` (from ``event``): the example rows show the columns as sent.
    sent = [c for c in events.columns if c != Columns.Weight]
    # Events the model already holds (same user, item, time and weight) are duplicates, whatever
    # their time: a rerun of an update, or a file overlapping the last one, repeats them. They are
    # told apart first, so that they meet ``duplicates`` and not the "older than the model" check
    # (which said "retrain to change the past" of events that are already in the model).
    stored = pipeline.history.select(
        pl.Series(Columns.User, pipeline.users.ids[pipeline.history[Columns.UserIdx].to_numpy()].tolist()),
        pl.Series(Columns.Item, pipeline.item_ids[pipeline.history[Columns.ItemIdx].to_numpy()].tolist()),
        Columns.Timestamp,
        Columns.Weight,
    )
    key = [Columns.User, Columns.Item, Columns.Timestamp, Columns.Weight]
    seen = events.join(stored, on=key, how="semi").sort(v.ROW)
    unseen = events.join(stored, on=key, how="anti").sort(v.ROW)
    old = unseen.filter(pl.col(Columns.Timestamp) < pipeline.now)
    if old.height:
        row, ex = v.example(unseen.select(sent), pl.col(Columns.Timestamp) < pipeline.now)
        end = datetime.fromtimestamp(pipeline.now, UTC).isoformat()
        raise source.in_file_terms(
            InputError(
                f"{old.height} event(s) are older than the model's data (it ends at {pipeline.now}, {end}): an "
                "update takes the events since the model was trained; retrain to change the past",
                file=source.interactions_path,
                column=Columns.Timestamp,
                row=row,
                example=ex,
            )
        )
    if seen.height:
        if duplicates == "error":
            first = seen.row(0, named=True)
            row = first.pop(v.ROW)
            ex = {c: first[c] for c in sent if c in first}
            raise source.in_file_terms(
                InputError(
                    f"{seen.height} event(s) are already in the model; set data.duplicates=drop to drop them",
                    file=source.interactions_path,
                    column=Columns.User,
                    row=row,
                    example=ex,
                )
            )
        log.info("%s: dropped %d event(s) the model already holds", source.interactions_path, seen.height)
        source.report["duplicates_of_model_events_dropped"] = seen.height
        events = unseen
    events = events.sort(Columns.Timestamp, v.ROW).select(key)
    return NewData(items.drop(v.ROW), events, dict(source.report))


# --- building the updated pipeline ------------------------------------------------------------------


@dataclass
class Catalogue:
    """The updated item table and which rows need their text encoded."""

    items: pl.DataFrame  # the model's items (updated) then the new ones, sorted by item_idx
    encode: np.ndarray  # item indices whose text is new or changed


def merge_items(old: pl.DataFrame, new: pl.DataFrame) -> Catalogue:
    """Known ids keep their index (their row replaced by the new one); new ids are appended in id
    order. ``encode``: rows whose text differs from the model's (or that are new)."""
    n = old.height
    index = old.select(Columns.Item, Columns.ItemIdx)
    fresh = new.join(index, on=Columns.Item, how="anti").sort(Columns.Item)
    fresh = fresh.with_columns(
        pl.int_range(n, n + fresh.height, dtype=old[Columns.ItemIdx].dtype).alias(Columns.ItemIdx)
    )
    changed = new.join(index, on=Columns.Item, how="inner")
    before = old.select(Columns.ItemIdx, pl.col(Columns.Text).alias("_old"))
    changed_idx = changed.join(before, on=Columns.ItemIdx).filter(pl.col(Columns.Text) != pl.col("_old"))[
        Columns.ItemIdx
    ]
    # A changed row keeps the model's values of the columns the new file leaves out or empty.
    updates = changed.select([c for c in changed.columns if c in old.columns and c != Columns.ItemIdx])
    known = old.update(updates, on=Columns.Item, how="left")
    items = pl.concat([known, fresh], how="diagonal_relaxed").sort(Columns.ItemIdx)
    items = items.select(
        [c for c in old.columns if c in items.columns] + [c for c in items.columns if c not in old.columns]
    )
    encode = np.sort(np.r_[changed_idx.to_numpy(), fresh[Columns.ItemIdx].to_numpy()]).astype(np.int64)
    return Catalogue(items, encode)


def encode_with_saved_bert(text_folder: str, max_length: int, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``texts``' vectors by the model's saved BERT: ``(base, tuned)``, the BERT's pooled vectors
    and the fine-tuned item side (the saved adapter on them; the same without one). Run in a
    worker process by ``TextRefresher`` (torch and transformers are imported there only)."""
    import torch

    from recsys.text.encoder import ItemEncoder
    from recsys.text.history_tower import load_bert

    bert, tok, adapter = load_bert(Path(text_folder))
    hidden = int(adapter["down.weight"].shape[0]) if adapter is not None else None
    encoder = ItemEncoder(bert, tok, max_length=max_length, adapter_hidden=hidden)
    if adapter is not None:
        encoder.adapter.load_state_dict(adapter)
    encoder.eval()
    base = encoder.base_vectors(*encoder.tokenize(texts))
    with torch.no_grad():
        tuned = encoder.adapt(base).float()
    return base.numpy(), tuned.numpy()


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(cos.min()) if len(cos) else 1.0


class EncoderWorker:
    """A process that imports torch and transformers as soon as it starts (most of the cost of
    encoding a few texts), then runs one ``encode_with_saved_bert`` job it is sent. Started first
    thing, it imports while this process reads the model and the new files. A daemon: it dies
    with this process, whatever stops it."""

    def __init__(self) -> None:
        import multiprocessing

        # By its import name, not ``__main__``'s (``python -m recsys.update`` may run under a wrapper).
        from recsys.update import _encoder_worker

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no fork of polars' threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_encoder_worker, args=(child,), name="recsys-update-encoder", daemon=True)
        self._proc.start()
        child.close()

    def submit(self, text_folder: str, max_length: int, texts: list[str]) -> None:
        self._conn.send((text_folder, max_length, texts))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            ok, value = self._conn.recv()
        except EOFError:
            code = self._proc.exitcode
            raise RuntimeError(f"the text encoder process ended without a result (exit code {code})") from None
        finally:
            self.close()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Let the process go: one still waiting for a job ends now, one that has answered ends
        by itself (not waited for: tearing torch down takes a second or more)."""
        if self._conn.closed:
            return
        if self._proc.is_alive():
            with contextlib.suppress(OSError):  # it has just ended
                self._conn.send(None)
        self._conn.close()


def _encoder_worker(conn) -> None:
    """``EncoderWorker``'s process: imports, then one job (or ``None``: nothing to do)."""
    import torch  # noqa: F401
    import transformers.modeling_utils  # noqa: F401  (the bulk of loading any Hugging Face model)

    import recsys.text.encoder  # noqa: F401

    job = conn.recv()
    if job is None:
        return
    try:
        conn.send((True, encode_with_saved_bert(*job)))
    except Exception as e:  # noqa: BLE001  (handed to the parent, which raises it)
        try:
            conn.send((False, e))
        except Exception:  # noqa: BLE001  (an exception that does not pickle)
            conn.send((False, RuntimeError(f"{type(e).__name__}: {e}")))


class TextRefresher:
    """Item vectors for a changed catalogue. Rows whose text is unchanged keep their stored
    vectors (by index: ``merge_items`` keeps every known item's); only the new or changed texts
    (``Catalogue.encode``) run through a BERT, and nothing is loaded when there are none.

    Item side: the fine-tuned tower's BERT and adapter, saved with the model. Frozen history side
    and zero-shot feature: the pre-fine-tuning encoder. That is the saved BERT without its
    adapter when this reproduces the stored vectors of up to 8 unchanged items (a frozen BERT:
    one pass serves both sides), else the encoder rebuilt from the model's config (checked the
    same way). ``encoded`` / ``encoded_base`` count the texts each side encoded.

    With a ``worker`` (``EncoderWorker``), ``start`` hands it the encoding, which goes on while
    this process loads the model and refits CF; without one it encodes in ``start``.
    """

    CHECK_ROWS = 8

    def __init__(
        self, folder: Path, name: str, max_length: int, config: DictConfig | None, worker: EncoderWorker | None = None
    ) -> None:
        self.text_folder = folder / "models" / name  # the saved tower, with its BERT in encoder/
        self.name, self.max_length = name, max_length
        self.config = config
        self.worker = worker
        self.encoded = 0
        self.encoded_base = 0
        self._job = None
        self._rows = np.zeros(0, dtype=np.int64)
        self._check = np.zeros(0, dtype=np.int64)

    @staticmethod
    def stored_base(pipeline) -> np.ndarray | None:
        """``pipeline``'s stored pre-fine-tuning item table (frozen history side or zero-shot feature)."""
        from recsys.text.history_tower import HistoryTower

        t = pipeline.models[pipeline.text_name]
        if t.history_embeddings is not None:
            return t.history_embeddings
        others = [m for m in pipeline.models.values() if isinstance(m, HistoryTower) and m is not t]
        return others[0].item_embeddings if others else None

    def start(self, catalogue: Catalogue, n_items: int) -> None:
        """Begin encoding ``catalogue``'s new and changed texts, and up to ``CHECK_ROWS`` of the
        model's ``n_items`` whose text is unchanged (to check the history side against)."""
        self._rows = catalogue.encode
        if not len(self._rows):
            if self.worker is not None:
                self.worker.close()
            return
        unchanged = np.setdiff1d(np.arange(n_items), self._rows)
        if len(unchanged):
            pick = np.linspace(0, len(unchanged) - 1, min(self.CHECK_ROWS, len(unchanged))).astype(int)
            self._check = unchanged[np.unique(pick)]
        texts = catalogue.items[Columns.Text].gather(np.r_[self._rows, self._check]).to_list()
        if self.worker is None:
            self._job = encode_with_saved_bert(str(self.text_folder), self.max_length, texts)
        else:
            self.worker.submit(str(self.text_folder), self.max_length, texts)

    def _result(self) -> tuple[np.ndarray, np.ndarray]:
        return self._job if self.worker is None else self.worker.result()

    def base_from_config(self, pipeline, texts: list[str]) -> np.ndarray:
        """``texts`` (then the check rows') by the encoder in the model's config, checked."""
        from hydra.utils import instantiate

        if self.config is None or "encoder" not in self.config:
            raise ConfigError("the model's config.yaml has no encoder: cannot encode new texts for its history side")
        encoder = instantiate(self.config.encoder)
        encoder.max_length = self.max_length
        encoder.embedding_cache = None
        check = pipeline.items[Columns.Text].gather(self._check).to_list()
        got = encoder.encode_tokens(*encoder.tokenize(texts + check)).numpy()
        cos = cosine_min(got[len(texts) :], self.stored_base(pipeline)[self._check])
        if cos < 0.999:
            raise ConfigError(
                "the encoder in the model's config.yaml does not reproduce the model's pre-fine-tuning item "
                f"vectors (cosine {cos:.3f}): it has changed since training; retrain instead of updating"
            )
        return got[: len(texts)]

    def refresh(self, pipeline, catalogue: Catalogue) -> dict[str, Any]:
        """``pipeline``'s text towers, by name, for ``catalogue.items`` (``start`` first; this
        waits for its vectors)."""
        from recsys.text.history_tower import HistoryTower

        p = pipeline
        n_old, n, rows = p.n_items, catalogue.items.height, self._rows
        tuned_new = base_new = None
        if len(rows):
            base, tuned = self._result()
            tuned_new = tuned[: len(rows)]
            self.encoded = len(rows)
            stored = self.stored_base(p)
            if stored is not None:
                if cosine_min(base[len(rows) :], stored[self._check]) >= 0.999:
                    base_new = base[: len(rows)]
                else:  # a fine-tuned BERT: the history side comes from the encoder it started from
                    base_new = self.base_from_config(p, catalogue.items[Columns.Text].gather(rows).to_list())
                self.encoded_base = len(rows)

        def table(old: np.ndarray, fresh: np.ndarray | None) -> np.ndarray:
            out = np.empty((n, old.shape[1]), dtype=np.float32)
            out[:n_old] = old
            if fresh is not None:
                out[rows] = fresh
            return out

        t = p.models[p.text_name]
        hist = table(t.history_embeddings, base_new) if t.history_embeddings is not None else None
        towers = {p.text_name: HistoryTower(t.weights, table(t.item_embeddings, tuned_new), hist, t.bert)}
        for name, m in p.models.items():
            if isinstance(m, HistoryTower) and m is not t:
                towers[name] = HistoryTower(m.weights, table(m.item_embeddings, base_new), m.history_embeddings)
        return towers


def updated_pipeline(
    pipeline,
    new: NewData,
    texts: TextRefresher | None,
    cf: Mapping[str, Any],
    mode: str = "refit",
    catalogue: Catalogue | None = None,
    text_parts: Mapping[str, Any] | None = None,
    warm_iterations: int | None = None,
):
    """``pipeline`` with ``new`` folded in (see the module docstring). ``cf``: the unfitted CF
    models by name, as training instantiated them. ``catalogue`` / ``text_parts``: the merged
    items and their vectors (``TextRefresher.refresh``); None: made here. ``warm_iterations``
    (refit): factor models continue from ``pipeline``'s factors, SASRec from its network, for
    this many iterations (epochs) instead of a cold fit with the configured ones."""
    from recsys.data.dataset import IdMap
    from recsys.recommender import History, ModelUpdate, Updatable

    p = pipeline
    catalogue = catalogue or merge_items(p.items, new.items)
    items = catalogue.items
    if text_parts is None:
        text_parts = {}
        if p.text_name is not None:
            texts.start(catalogue, p.n_items)
            text_parts = texts.refresh(p, catalogue)
    old_users = p.users.ids
    fresh_users = np.setdiff1d(np.asarray(new.events[Columns.User].unique().to_list(), dtype=object), old_users)
    users = IdMap(np.concatenate([old_users, np.sort(fresh_users)]).astype(object))
    events = new.events.with_columns(
        pl.Series(Columns.UserIdx, users.index(new.events[Columns.User].to_list()), dtype=pl.Int32),
        pl.col(Columns.Item)
        .replace_strict(items[Columns.Item], items[Columns.ItemIdx].cast(pl.Int32), return_dtype=pl.Int32)
        .alias(Columns.ItemIdx),
    )
    history = (
        pl.concat([p.history, events.select(p.history.columns)], how="vertical_relaxed")
        .with_columns(pl.col(Columns.UserIdx).cast(pl.Int32), pl.col(Columns.ItemIdx).cast(pl.Int32))
        .sort(Columns.UserIdx, Columns.Timestamp, maintain_order=True)
    )
    hist = History(history, len(users), items.height)
    models = dict(text_parts)
    # The refreshed tower's item vectors: where SASRec places the items its network never saw
    # (with_items), and where a cold refit of one that starts from text starts.
    tower = text_parts.get(p.text_name) if p.text_name is not None else None
    text_vectors = tower.item_space() if tower is not None else None
    touched = np.unique(events[Columns.UserIdx].to_numpy())
    update = ModelUpdate(hist, touched, warm_iterations, text_vectors)
    for name, m in p.models.items():
        if isinstance(m, Updatable):  # CF and popularity: the text towers are text_parts' already
            way = m.refitted if mode == "refit" else m.folded_in
            models[name] = way(name, cf.get(name), update)
    return p.replace(models, items=items, users=users, history=history, now=int(history[Columns.Timestamp].max()))


# --- the gate -------------------------------------------------------------------------------------


def holdout_split(new: NewData, share: float) -> tuple[NewData, pl.DataFrame]:
    """The newest ``share`` of the new events (by time; whole timestamps) held out, and the rest."""
    if not 0.0 < share < 1.0:
        raise ConfigError(f"gate.holdout must be in (0, 1), got {share}")
    ts = new.events[Columns.Timestamp]
    cut = ts.quantile(1.0 - share, "higher")
    before = new.events.filter(pl.col(Columns.Timestamp) < cut)
    after = new.events.filter(pl.col(Columns.Timestamp) >= cut)
    return NewData(new.items, before, new.report), after


def gate_metrics(
    pipeline, known: pl.DataFrame, targets: pl.DataFrame, k: int, at: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-user NDCG@k and Recall@k (the users of ``targets``, sorted) of ``pipeline``'s fused
    lists, each user ranked from ``known`` (their events before the holdout), seen items removed. An item the pipeline
    does not know cannot be recommended (a miss), nor read in a history.

    ``at`` (default: the end of ``known``): the moment the lists are made for, the holdout's
    start. The users' idle days and the items' availability windows are taken as of it, whatever
    the pipeline's own ``now`` (the end of its stored history): the champion's ends before the
    events the gate gives it, and as of its ``now`` its users would have had negative idle days
    and items listed since would have stayed out. The item statistics stay the pipeline's own
    (what it knows of the items: the champion has not seen the new events)."""
    import dataclasses

    from recsys.evaluation.metrics import ranking_metrics
    from recsys.export.engine import Engine, ExplainOptions
    from recsys.rank.rules import BusinessRules

    users = sorted(targets[Columns.User].unique().to_list())
    given = known.filter(pl.col(Columns.User).is_in(users))
    at = int(known[Columns.Timestamp].max()) if at is None else int(at)
    # The engine reads the user features' and the rules' moment from ``now``: a shallow copy
    # with the gate's moment, the pipeline itself untouched (the challenger is saved later).
    pipeline = dataclasses.replace(pipeline, now=at)
    rules = BusinessRules().compile(pipeline.items, at)
    engine = Engine(pipeline, rules, k, explain=ExplainOptions(enabled=False, top_features=0))
    recs = engine.recommend(pipeline.histories(users, given))
    pos = {u: j for j, u in enumerate(users)}
    item_pos: dict[str, int] = {}
    for i in pl.concat([recs[Columns.Item], targets[Columns.Item]]).unique().to_list():
        item_pos[i] = len(item_pos)
    lists = np.full((len(users), k), -1, dtype=np.int64)
    for u, i, r in recs.select(Columns.User, Columns.Item, Columns.Rank).iter_rows():
        lists[pos[u], int(r) - 1] = item_pos[i]
    import scipy.sparse as sp

    rows = [pos[u] for u in targets[Columns.User].to_list()]
    cols = [item_pos[i] for i in targets[Columns.Item].to_list()]
    relevant = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(users), len(item_pos)))
    relevant.data[:] = 1.0
    m = ranking_metrics(lists, relevant, [k])
    return m[f"ndcg_at_{k}"], m[f"recall_at_{k}"]


def stored_events(pipeline) -> pl.DataFrame:
    """The pipeline's history as ``user_id, item_id, timestamp, weight``."""
    h = pipeline.history
    return pl.DataFrame(
        {
            Columns.User: pipeline.users.ids[h[Columns.UserIdx].to_numpy()].tolist(),
            Columns.Item: pipeline.item_ids[h[Columns.ItemIdx].to_numpy()].tolist(),
            Columns.Timestamp: h[Columns.Timestamp],
            Columns.Weight: h[Columns.Weight],
        },
        schema={
            Columns.User: pl.String,
            Columns.Item: pl.String,
            Columns.Timestamp: pl.Int64,
            Columns.Weight: pl.Float32,
        },
    )


@dataclass
class GateResult:
    """NDCG@k (decides) and Recall@k (reported) of champion and challenger on the holdout."""

    champion: float
    challenger: float
    tolerance: float
    n_users: int
    champion_recall: float = float("nan")
    challenger_recall: float = float("nan")
    # challenger - champion NDCG@k over the same users, with its paired 95 % bootstrap interval:
    # reported beside the decision, which a gate of a few dozen users often makes on noise.
    difference: Interval | None = None

    @property
    def promote(self) -> bool:
        return self.challenger >= self.champion - self.tolerance

    def describe(self, k: int) -> str:
        """The printed verdict's figures: both NDCG@k, the paired difference and the tolerance."""
        diff = "" if self.difference is None else f", {self.difference} over {self.n_users} users"
        return (
            f"gate NDCG@{k} champion {self.champion:.4f} vs challenger {self.challenger:.4f}{diff} "
            f"(tolerance {self.tolerance})"
        )


def run_gate(
    champion, challenger_before, new_before: NewData, holdout: pl.DataFrame, k: int, tolerance: float
) -> GateResult:
    """Champion and a challenger built without the holdout, on the same held-out events, both as
    of the same moment: the last event before the holdout (``gate_metrics``)."""
    known = pl.concat([stored_events(champion), new_before.events])
    targets = holdout.select(Columns.User, Columns.Item).unique()
    at = int(known[Columns.Timestamp].max())
    champion_ndcg, champion_recall = gate_metrics(champion, known, targets, k, at)
    challenger_ndcg, challenger_recall = gate_metrics(challenger_before, known, targets, k, at)
    n = len(champion_ndcg)
    difference = PairedBootstrap(n, seed=0).interval(challenger_ndcg, champion_ndcg) if n else None
    return GateResult(
        champion=float(np.mean(champion_ndcg)) if n else float("nan"),
        challenger=float(np.mean(challenger_ndcg)) if n else float("nan"),
        tolerance=tolerance,
        n_users=n,
        champion_recall=float(np.mean(champion_recall)) if n else float("nan"),
        challenger_recall=float(np.mean(challenger_recall)) if n else float("nan"),
        difference=difference,
    )


# --- the command ----------------------------------------------------------------------------------


def dataset_hash(parent: str | None, new: NewData) -> str:
    """The ``dataset_hash`` of an update: the content hash of what it was fitted on, its parent's
    ``dataset_hash`` chained with the update's events (duplicates of the parent's dropped) and its
    item rows (by id). The same model updated with the same files gets the same hash; any other
    data, a different one. Training's hash (``Dataset.fingerprint``) names the data set it read,
    so an update keeping it named data the served model had not all seen."""
    h = hashlib.sha256(str(parent).encode())
    h.update(new.events.select(Columns.User, Columns.Item, Columns.Timestamp, Columns.Weight).write_csv().encode())
    h.update(new.items.select(Columns.Item, Columns.Text).sort(Columns.Item).write_csv().encode())
    return h.hexdigest()[:16]


def provenance(parent: Mapping[str, Any], new: NewData, run_id: str, updated_from: str) -> dict[str, Any]:
    """The ``meta.json`` info of an update of a pipeline whose info is ``parent``: what the served
    model was fitted on (``dataset_hash``, ``run_id``: this update's) and what its training was
    (``training_run_id``, ``training_dataset_hash``, the same through a chain of updates).
    ``dataset`` and ``config_hash`` stay the training's: the data set's name and the model's
    configuration, which an update does not change."""
    if "training_dataset_hash" in parent:
        first = {k: parent.get(k) for k in ("training_run_id", "training_dataset_hash")}
    else:
        # An update made before these keys has the training's dataset_hash but its own run_id.
        trained = "updated_from" not in parent
        first = {
            "training_run_id": parent.get("run_id") if trained else None,
            "training_dataset_hash": parent.get("dataset_hash"),
        }
    return {
        **parent,
        **first,
        "dataset_hash": dataset_hash(parent.get("dataset_hash"), new),
        "updated_from": updated_from,
        "run_id": run_id,
    }


def model_name(model_uri: str, configured: str | None) -> str:
    if configured:
        return configured
    if model_uri.startswith("models:/"):
        return model_uri[len("models:/") :].split("@")[0].split("/")[0]
    raise ConfigError(f"register_name is needed to register an update of '{model_uri}' (not a models:/ URI)")


def pinned_uri(model_uri: str, tracking: str) -> str:
    """``model_uri`` with a registry alias replaced by the version it points at now
    (``models:/recsys@champion`` -> ``models:/recsys/3``); any other URI as it is. What the update
    records as where it came from: the alias moves (to this very update, when the gate promotes
    it), so the alias alone would not say which version was updated."""
    if not model_uri.startswith("models:/") or "@" not in model_uri:
        return model_uri
    import mlflow
    from mlflow.exceptions import MlflowException

    name, alias = model_uri[len("models:/") :].split("@", 1)
    try:
        version = mlflow.MlflowClient(tracking_uri=tracking).get_model_version_by_alias(name, alias).version
    except MlflowException as e:
        raise InputError(f"cannot resolve '{model_uri}' in {tracking}: {str(e).splitlines()[0]}") from e
    return f"models:/{name}/{version}"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Update as configured; returns the figures logged to MLflow."""
    t_start = time.perf_counter()
    mode = str(cfg.cf_mode)
    if mode not in CF_MODES:
        raise ConfigError(f"cf_mode must be one of {list(CF_MODES)}, got {mode!r}")
    require_number("gate.tolerance", cfg.gate.tolerance, 0)
    tolerance = float(cfg.gate.tolerance)
    warm = cfg.get("warm_iterations")
    require_whole("warm_iterations", warm, optional=True)
    # Importing torch and transformers is most of what encoding a few new texts costs: a worker
    # process does that from the start, while this one reads the model and the new files. A
    # caller that has them imported already encodes in process.
    worker = None if "transformers" in sys.modules else EncoderWorker()
    try:
        return _run(cfg, t_start, mode, tolerance, warm, worker)
    finally:
        if worker is not None:
            worker.close()


def update_experiment(tracking: str | None, mlruns_dir: str, name: str) -> str:
    """The id of the update runs' experiment ``name``; sets the tracking URI.

    With the project's own backend (``tracking_uri: null``) it is made as training makes its
    experiments, artifacts in ``mlruns/artifacts``. ``mlflow.set_experiment`` alone would give a
    new experiment MLflow's default artifact root, ``./mlruns`` of the folder the command was
    launched from: the challenger model then landed outside ``paths.mlruns_dir``."""
    import mlflow

    if tracking is None:
        from recsys.tracking import Tracker

        return Tracker(mlruns_dir, name).experiment_id()
    mlflow.set_tracking_uri(tracking)
    return mlflow.set_experiment(name).experiment_id


def _run(cfg: DictConfig, t_start: float, mode: str, tolerance: float, warm: int | None, worker) -> dict[str, Any]:
    from hydra.utils import instantiate

    from recsys.data.files import FileDataSource
    from recsys.export.pyfunc import SERVING_FILE, log_pipeline, read_serving
    from recsys.pipeline_model import TrainedPipeline, read_json_object
    from recsys.recommend import resolve_model
    from recsys.tracking import tracking_uri

    tracking = cfg.tracking_uri or tracking_uri(cfg.paths.mlruns_dir)
    TrainedPipeline.check_target(Path(cfg.output) / "pipeline", "output")  # where the challenger goes
    name = model_name(str(cfg.model_uri), cfg.register_name)
    # The version behind an alias, pinned before the model is read: the lineage the update records.
    updated_from = pinned_uri(str(cfg.model_uri), tracking)
    folder, source = resolve_model(updated_from, tracking)
    # The tables alone (no models, no ranker) to check the new files against, before any long work.
    tables = TrainedPipeline.load(folder, models=[])
    config = OmegaConf.load(folder / "config.yaml") if (folder / "config.yaml").is_file() else None
    data_cfg = config.data if config is not None and "data" in config else {}
    files = FileDataSource(
        interactions=str(cfg.data.interactions),
        items=str(cfg.data["items"]),
        text_fields=list(cfg.data.text_fields or data_cfg.get("text_fields") or ["title", "description"]),
        event_weights=tables.event_weights,
        column_map=dict(cfg.data.column_map or data_cfg.get("column_map") or {}),
        text_separator=str(data_cfg.get("text_separator", ". ")),
        duplicates=str(cfg.data.duplicates),
        future_timestamps=str(cfg.data.future_timestamps),
        missing_text_help=MISSING_TEXT_HELP,
    )
    new = read_new_data(tables, files, str(cfg.data.duplicates))
    if new.events.height == 0:
        held = new.report.get("duplicates_of_model_events_dropped", 0)
        why = f": all {held} event(s) are already in the model (was this update applied before?)" if held else ""
        raise InputError(f"no new events{why}: nothing to update", file=files.interactions_path)
    new_before, holdout = holdout_split(new, float(cfg.gate.holdout))
    catalogue = merge_items(tables.items, new.items)
    saved = read_json_object(folder / "meta.json")["models"]
    cf = {n: instantiate(node) for n, node in config.cf.items()} if config is not None and "cf" in config else {}
    if mode == "refit":  # a grown catalogue a refitted model cannot fit is refused before any encoding
        for refitted in sorted(saved.keys() & cf.keys()):
            cf[refitted].check_catalogue(catalogue.items.height)
    # The new and changed texts are encoded (in a worker) while the model is loaded and CF is
    # refitted, for the challenger and for the gate's challenger without the holdout.
    texts = None
    if text := next((n for n, m in saved.items() if m.get("bert")), None):
        texts = TextRefresher(folder, text, int(saved[text]["bert"]["max_length"]), config, worker)
        texts.start(catalogue, tables.n_items)
    elif worker is not None:
        worker.close()
    champion = TrainedPipeline.load(folder)
    timings: dict[str, float] = {"load": time.perf_counter() - t_start}
    # A cold refit of a model that starts from the text tower's item vectors (SASRec's
    # text_init_std) waits for them first, and so does a SASRec that new items join (it places
    # them by their text); otherwise CF is refitted while they are encoded.
    t0 = time.perf_counter()
    cold_text = mode == "refit" and warm is None and any(m.reads_item_text for m in cf.values())
    grown_sasrec = catalogue.items.height > tables.n_items and any(m.get("kind") == "SASRec" for m in saved.values())
    parts = texts.refresh(champion, catalogue) if texts is not None and (cold_text or grown_sasrec) else {}
    waited = time.perf_counter() - t0
    t0 = time.perf_counter()
    challenger = updated_pipeline(champion, new, texts, cf, mode, catalogue, parts, warm)
    before = updated_pipeline(champion, new_before, texts, cf, mode, catalogue, parts, warm)
    timings["update"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if texts is not None:
        parts = parts or texts.refresh(champion, catalogue)
        challenger, before = challenger.replace(parts), before.replace(parts)
    timings["text_wait"] = waited + time.perf_counter() - t0
    t0 = time.perf_counter()
    gate = run_gate(champion, before, new_before, holdout, int(cfg.gate.k), tolerance)
    timings["gate"] = time.perf_counter() - t0

    k = int(cfg.gate.k)
    figures = {
        f"gate/champion_ndcg_at_{k}": gate.champion,
        f"gate/challenger_ndcg_at_{k}": gate.challenger,
        f"gate/champion_recall_at_{k}": gate.champion_recall,
        f"gate/challenger_recall_at_{k}": gate.challenger_recall,
        "gate/tolerance": tolerance,
        "gate/users": gate.n_users,
        **(
            {}
            if gate.difference is None
            else {
                f"gate/difference_ndcg_at_{k}": gate.difference.mean,
                f"gate/difference_ndcg_at_{k}_ci95_low": gate.difference.low,
                f"gate/difference_ndcg_at_{k}_ci95_high": gate.difference.high,
            }
        ),
        "gate/promoted": float(gate.promote),
        "update/new_events": new.events.height,
        "update/new_items": int(catalogue.items.height - champion.n_items),
        "update/encoded_items": texts.encoded if texts is not None else 0,
        "update/encoded_items_base": texts.encoded_base if texts is not None else 0,
        "update/changed_or_new_texts": len(catalogue.encode),
        **{f"time/{key}_s": v for key, v in timings.items()},
    }
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    import mlflow

    from recsys.tracking import tracked_run

    experiment = update_experiment(cfg.tracking_uri, cfg.paths.mlruns_dir, str(cfg.experiment))
    # The gate has decided before anything is written: the run gets its figures and the version its
    # verdict first, so a job killed at any point after leaves nothing that hides either. A killed
    # run is marked KILLED by the next run of the experiment (tracked_run); the version has the
    # verdict from its creation, and only @champion says what is served.
    gate_tag = "passed" if gate.promote else "failed"
    with tracked_run(cfg.paths.mlruns_dir, experiment, run_name="update") as active:
        run_id = active.info.run_id
        mlflow.log_params(
            {
                "model_uri": str(cfg.model_uri),
                "updated_from": updated_from,
                "champion_run": source.get("run_id"),
                "cf_mode": mode,
                "warm_iterations": warm,
                "gate.k": k,
                "data.interactions": files.interactions_path,
                "data.items": files.items_path,
            }
        )
        mlflow.log_params({f"gate.{key}": v for key, v in OmegaConf.to_container(cfg.gate).items() if key != "k"})
        mlflow.log_metrics(figures)
        challenger.meta = provenance(champion.meta, new, run_id, updated_from)
        mlflow.set_tags(
            {"dataset": str(challenger.meta.get("dataset")), "dataset_hash": challenger.meta["dataset_hash"]}
        )
        serving = read_serving(folder / SERVING_FILE)
        config_yaml = (folder / "config.yaml").read_text() if (folder / "config.yaml").is_file() else None
        t0 = time.perf_counter()
        version_tags = {"gate": gate_tag, "gate_result": gate.describe(k), "updated_from": updated_from}
        uri = log_pipeline(
            challenger,
            out / "pipeline",
            serving,
            config_yaml,
            register_name=name,
            alias="challenger",
            version_tags=version_tags,
        )
        figures["time/log_s"] = time.perf_counter() - t0
        figures["time/total_s"] = time.perf_counter() - t_start
        version = uri.rsplit("/", 1)[-1]
        if gate.promote:
            mlflow.MlflowClient().set_registered_model_alias(name, "champion", version)
        mlflow.log_metrics({key: figures[key] for key in ("time/log_s", "time/total_s")})
        mlflow.set_tags({"gate": "promoted" if gate.promote else "kept champion", "model_version": version})
    verdict = "promoted to @champion" if gate.promote else "champion kept"
    print(
        f"update: {new.events.height} events, {figures['update/new_items']} new items, "
        f"{figures['update/encoded_items']} texts encoded; {name} version {version} @challenger; "
        f"{gate.describe(k)}: {verdict}"
    )
    if not gate.promote:
        # A daily feed sends only the day's events: the next update of @champion would then leave
        # these out for good (once it is promoted they are older than the model), and its events
        # may name items only this update's item file held.
        print(
            f"update: @champion does not hold these {new.events.height} events and "
            f"{figures['update/new_items']} new items: send them again with the next update of it "
            f"({files.interactions_path}, {files.items_path})"
        )
    return {**figures, "version": version, "promoted": gate.promote}


@recsys.config.entry_point("update")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: run(cfg))


if __name__ == "__main__":
    main()
