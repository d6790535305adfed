"""The trained pipeline as one folder: save after training, load for export and serving.

A saved pipeline is its models, each saving and loading itself (``Recommender.save`` /
``load``), plus the ranker, the id maps and the history users are served from. No pickle
anywhere (docs/export.md):

```
pipeline/
  meta.json            versions, every model's kind and parameters (in training order), the
                       candidate sources, ranker features, event weights, "now"
  config.yaml          the resolved training config (recsys.update rebuilds the CF models and the
                       pre-fine-tuning encoder from it; serving does not read it)
  items.parquet        item_id, item_idx, text and the other item columns (category, windows ...)
  users.parquet        user_id, user_idx of the users known at training time
  history.parquet      user_idx, item_idx, timestamp, weight: the history it was fitted on (every event
                       when served after training, train + val for the evaluated pipeline)
  models/<name>/       each model's own files: model.npz (ALS, BPR, item-kNN, popularity, SASRec), or a
                       text tower's user encoder and item vectors (safetensors, npy), the first
                       one with its BERT in encoder/ (save_pretrained)
  ranker/lightgbm.txt  the LightGBM model as text
```

At serving time every user-side quantity is derived from the history passed in (or the stored
one), by each model's ``for_users``: ALS/BPR keep the trained factors of known users with their
stored history and fold in anybody else; item-kNN, SASRec and the text tower read the history
directly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.cf.models import ALS, BPR, ItemKNN, Popularity
from recsys.cf.sasrec import SASRec
from recsys.columns import Columns
from recsys.data.dataset import IdMap
from recsys.data.validation import ROW, check_future, parse_timestamp, require_non_null
from recsys.errors import PIPELINE_REPAIR as REPAIR
from recsys.errors import ConfigError, InMemory, InputError, check_field, read_json_object, reading
from recsys.rank.ranker import LambdaMARTRanker
from recsys.recommender import (
    DerivedScores,
    History,
    NearestText,
    NewItemText,
    PopularText,
    Recommender,
    derived_bases,
)
from recsys.text.history_tower import HistoryTower

FORMAT_VERSION = 2
HISTORY_COLUMNS = [Columns.UserIdx, Columns.ItemIdx, Columns.Timestamp, Columns.Weight]
TABLES = ("items.parquet", "users.parquet", "history.parquet")
RANKER_FILE = "ranker/lightgbm.txt"
# What given history rows do to a known user's stored history (``TrainedPipeline.histories``).
HISTORIES_MODES = ("extend", "replace")
# Every kind a pipeline can hold, by the name meta.json gives it (``Recommender.kind``).
KINDS: dict[str, type[Recommender]] = {
    m.kind: m for m in (ALS, BPR, ItemKNN, Popularity, SASRec, HistoryTower, NewItemText, PopularText, NearestText)
}
# What ``load`` reads from meta.json, with its JSON type (checked before anything else is read).
META_FIELDS: dict[str, Any] = {
    "models": dict[str, dict],
    "n_candidates": dict[str, int],
    "event_weights": dict[str, float],
    "now": int,
    "ranker": dict | None,
    "info": dict | None,
}
RANKER_FIELDS: dict[str, Any] = {"features": list[str], "best_iteration": int}


def check_meta(meta: Mapping[str, Any], file: Path) -> None:
    """Every field ``load`` reads from ``meta.json``, present and of the right type, so a
    hand-edited entry fails here by name rather than deep in ``load``."""
    for key, hint in META_FIELDS.items():
        check_field(file, meta, key, hint)
    for name, info in meta["models"].items():
        check_field(file, info, f"models.{name}.kind", str)
        if info["kind"] not in KINDS:
            raise InputError(
                f"models.{name}.kind '{info['kind']}' is none of {sorted(KINDS)}; {REPAIR}", file=str(file)
            )
        for key, hint in KINDS[info["kind"]].saved_fields().items():
            check_field(file, info, f"models.{name}.{key}", hint)
    for key, hint in RANKER_FIELDS.items() if meta["ranker"] else ():
        check_field(file, meta["ranker"], f"ranker.{key}", hint)


@dataclass
class PipelineHistories:
    """The users of one request/chunk, renumbered 0..n-1, with the history each one has."""

    user_ids: list[str]
    known: np.ndarray  # global user index for users served from their stored history, else -1
    history: History  # chunk-local user indices


@dataclass
class TrainedPipeline:
    """What the test stage ranked with, as models that save, load and serve themselves."""

    items: pl.DataFrame  # item_id, item_idx, text, ... sorted by item_idx
    users: IdMap
    history: pl.DataFrame  # HISTORY_COLUMNS, sorted by user_idx, timestamp
    models: dict[str, Recommender]  # in training order; each of a kind in ``KINDS``
    ranker: LambdaMARTRanker | None
    n_candidates: dict[str, int]  # in config order: the first source proposing an item is its ``source``
    event_weights: dict[str, float]
    now: int  # reference time: end of the stored history (user/item idle days are relative to it)
    meta: dict[str, Any] = field(default_factory=dict)
    # Set by ``load(models=...)``: the only models read (no ranker either); None: everything.
    only: frozenset[str] | None = None

    @classmethod
    def from_training(
        cls,
        items: pl.DataFrame,
        users: IdMap,
        history: History,
        models: Mapping[str, Recommender],
        n_candidates: Mapping[str, int],
        ranker: LambdaMARTRanker | None,
        event_weights: Mapping[str, float],
        meta: Mapping[str, Any] | None = None,
    ) -> TrainedPipeline:
        """The fitted models as they are, but the text towers: their serving side
        (``HistoryTower``), the first with the BERT its item vectors came from."""
        from recsys.text.recommender import TextRecommender

        served: dict[str, Recommender] = {}
        for name, m in models.items():
            if isinstance(m, TextRecommender):
                first = not any(isinstance(s, HistoryTower) for s in served.values())
                served[name] = HistoryTower.from_recommender(m, with_bert=first)
            elif m.kind is None:
                raise ConfigError(f"cannot save model '{name}' of type {type(m).__name__} in a pipeline")
            else:
                served[name] = m
        for name, base in derived_bases(models).items():  # derived from a text model: over its serving side
            served[name] = models[name].over(served[base])
        df = history.interactions
        hist = df.select(
            pl.col(Columns.UserIdx).cast(pl.Int32),
            pl.col(Columns.ItemIdx).cast(pl.Int32),
            pl.col(Columns.Timestamp).cast(pl.Int64),
            pl.col(Columns.Weight).cast(pl.Float32),
        )
        return cls(
            items=items.sort(Columns.ItemIdx),
            users=users,
            history=hist,
            models=served,
            ranker=ranker,
            n_candidates=dict(n_candidates),
            event_weights={k: float(v) for k, v in event_weights.items()},
            now=int(df[Columns.Timestamp].max()) if df.height else 0,
            meta=dict(meta or {}),
        )

    @property
    def n_items(self) -> int:
        return self.items.height

    @property
    def item_ids(self) -> np.ndarray:
        return np.asarray(self.items[Columns.Item].to_list(), dtype=object)

    @property
    def model_names(self) -> list[str]:
        return list(self.models)

    @property
    def text_name(self) -> str | None:
        """The text tower saved with its BERT (what ``recsys.update`` encodes new texts with)."""
        return next((n for n, m in self.models.items() if isinstance(m, HistoryTower) and m.bert), None)

    @property
    def derived(self) -> dict[str, str]:
        """Each model whose scores are another's rewritten (``Recommender.derived_from``) -> that one."""
        return derived_bases(self.models)

    def replace(self, models: Mapping[str, Recommender], **changes: Any) -> TrainedPipeline:
        """This pipeline with ``models`` in place of those of the same names and ``changes`` to
        its other fields; each derived model (``text_new``, ``text_popular``) is rebuilt over its
        (new) base model and refitted on the (new) history."""
        out = dataclasses.replace(self, models={n: models.get(n, m) for n, m in self.models.items()}, **changes)
        stored = History(out.history, len(out.users), out.n_items)
        for name, base in self.derived.items():
            out.models[name] = self.models[name].over(out.models[base]).fit(stored)
        return out

    # ---- save / load -------------------------------------------------------------------------------

    @staticmethod
    def check_target(path: str | Path, setting: str | None = None) -> None:
        """A ``ConfigError`` unless ``save`` may write ``path`` (absent, or an empty folder): a
        saved pipeline is never overwritten. The entry points call it before their long work,
        naming the ``setting`` that chooses the folder."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            where = f" ({setting}=...)" if setting else ""
            raise ConfigError(
                f"pipeline folder {path} exists and is not empty: a saved pipeline is never "
                f"overwritten; give the job a new output folder{where} or move that one away"
            )

    def save(self, path: str | Path, config_yaml: str | None = None) -> Path:
        """Write the folder (see the module docstring) under a temporary name, then rename it:
        a failure leaves nothing behind. ``path`` must not exist or be empty."""
        path = Path(path)
        if self.only is not None:
            raise ConfigError(f"this pipeline was loaded with only {sorted(self.only)}: load it whole to save it")
        self.check_target(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self._write(tmp, config_yaml)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    def _write(self, path: Path, config_yaml: str | None) -> None:
        (path / "models").mkdir(parents=True)
        self.items.write_parquet(path / "items.parquet")
        self.users.to_frame(Columns.User, Columns.UserIdx).write_parquet(path / "users.parquet")
        self.history.write_parquet(path / "history.parquet")
        derived = self.derived
        infos = {}
        for name, m in self.models.items():
            infos[name] = m.save(path / "models" / name)
            if name in derived:
                infos[name]["restricts"] = derived[name]  # the model it is derived from
        ranker_meta = None
        if self.ranker is not None:
            (path / RANKER_FILE).parent.mkdir()
            self.ranker.booster.save_model(str(path / RANKER_FILE), num_iteration=-1)
            ranker_meta = {"features": self.ranker.features, "best_iteration": self.ranker.best_iteration}
        meta = {
            "format_version": FORMAT_VERSION,
            "models": infos,
            "n_candidates": self.n_candidates,
            "event_weights": self.event_weights,
            "now": self.now,
            "ranker": ranker_meta,
            "python": platform.python_version(),
            "info": self.meta,
        }
        # Keys in insertion order: the candidate sources' order decides each row's ``source``.
        (path / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        if config_yaml is not None:
            (path / "config.yaml").write_text(config_yaml)

    @staticmethod
    def files(meta: Mapping[str, Any]) -> dict[str, str]:
        """Every file ``load`` reads besides ``meta.json`` (relative to the folder, ``/``
        separated) and what it holds, from the folder's (checked) ``meta.json``."""
        out = dict.fromkeys(TABLES, "a table written by training")
        for name, info in meta["models"].items():
            out |= {f"models/{name}/{f}": f"the {info['kind']} model '{name}'" for f in KINDS[info["kind"]].files(info)}
        if meta["ranker"]:
            out[RANKER_FILE] = "the LightGBM ranker"
        return out

    @classmethod
    def load(cls, path: str | Path, models: Collection[str] | None = None) -> TrainedPipeline:
        """Read a folder written by ``save``. Reads no pickle (numpy with ``allow_pickle=False``).

        ``models``: read only these models (and the one a derived model among them is derived from), and no
        ranker: what a single-stage export scores with. Such a pipeline recommends with those
        models only and cannot be saved. Default: everything.

        Every field it reads from ``meta.json`` is checked first (``check_meta``): a missing or
        wrongly typed one is an ``InputError`` naming meta.json and the field's dotted path.
        Then every file it will read must be there (``files``): one ``InputError`` names the
        folder and all the missing ones; a file that is there but cannot be read is an
        ``InputError`` naming that file."""
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise InputError("not a saved pipeline (no meta.json)", file=str(path))
        meta = read_json_object(meta_path)
        if meta.get("format_version") != FORMAT_VERSION:
            raise InputError(f"pipeline format {meta.get('format_version')} != {FORMAT_VERSION}", file=str(meta_path))
        check_meta(meta, meta_path)
        if missing := [f"{rel} ({what})" for rel, what in cls.files(meta).items() if not (path / rel).is_file()]:
            raise InputError(
                f"pipeline folder lacks {len(missing)} file(s): {', '.join(missing)}; {REPAIR}", file=str(path)
            )
        wanted = cls._needed(meta, models)
        with reading(path / "items.parquet"):
            items = pl.read_parquet(path / "items.parquet")
        with reading(path / "users.parquet"):
            users_df = pl.read_parquet(path / "users.parquet").sort(Columns.UserIdx)
            users = IdMap(np.asarray(users_df[Columns.User].to_list(), dtype=object))
        with reading(path / "history.parquet"):
            history = pl.read_parquet(path / "history.parquet")
        loaded: dict[str, Recommender] = {}
        for name, info in meta["models"].items():
            if name not in wanted:
                continue
            kind = KINDS[info["kind"]]
            if issubclass(kind, DerivedScores):  # no files: refitted on the stored history
                stored = History(history, len(users), items.height)
                loaded[name] = kind.from_saved(loaded[info["restricts"]], info).fit(stored)
            else:
                loaded[name] = kind.load(path / "models" / name, info)
        ranker = None
        if meta["ranker"] and models is None:
            import lightgbm as lgb

            ranker = LambdaMARTRanker()
            with reading(path / RANKER_FILE):
                ranker.booster = lgb.Booster(model_file=str(path / RANKER_FILE))
            ranker.features = list(meta["ranker"]["features"])
            ranker.best_iteration = int(meta["ranker"]["best_iteration"])
        return cls(
            items=items,
            users=users,
            history=history,
            models=loaded,
            ranker=ranker,
            n_candidates=dict(meta["n_candidates"]),
            event_weights=dict(meta["event_weights"]),
            now=int(meta["now"]),
            meta=dict(meta["info"] or {}),
            only=None if models is None else frozenset(wanted),
        )

    @staticmethod
    def _needed(meta: Mapping[str, Any], models: Collection[str] | None) -> set[str]:
        """``models`` (None: all) and the models the derived ones among them are derived from."""
        if models is None:
            return set(meta["models"])
        if unknown := sorted(set(models) - set(meta["models"])):
            raise ConfigError(
                f"unknown model(s) {unknown}: the pipeline has {list(meta['models'])} "
                "(as an export's scorer, 'fused' is the ranker over all of them)"
            )
        return set(models) | {meta["models"][n]["restricts"] for n in models if "restricts" in meta["models"][n]}

    # ---- serving ---------------------------------------------------------------------------------

    def histories(
        self, user_ids: list[str], given: pl.DataFrame | None = None, mode: str = "replace"
    ) -> PipelineHistories:
        """Users to serve, each with the history passed in ``given`` and/or the stored one (users
        unknown and without history get an empty one).

        ``given``: ``user_id, item_id`` and optionally ``timestamp`` (default: "just now", see
        ``normalise_history``) and ``event`` (default: the lightest event type) or ``weight``.
        ``mode`` (``HISTORIES_MODES``) says what ``given`` rows do to a known user's stored
        history: ``replace`` it (what the pyfunc model does by default) or ``extend`` it (the stored
        events plus the given ones: what ``python -m recsys.recommend histories=`` does by default,
        so that seen filtering covers both). Either way a user with given rows is folded in (no
        trained factors), as the history its factors were fitted on is not the one served.
        """
        mode = check_histories_mode(mode)
        gidx = self.users.index(user_ids)
        n = len(user_ids)
        frames = []
        supplied = np.zeros(n, dtype=bool)
        given_rows = None
        if given is not None and given.height:
            g = normalise_history(given, self.event_weights, now=self.now)
            pos = pl.DataFrame(
                {Columns.User: list(user_ids), Columns.UserIdx: np.arange(n, dtype=np.int32)},
                schema={Columns.User: pl.String, Columns.UserIdx: pl.Int32},
            )
            item_map = self.items.select(Columns.Item, pl.col(Columns.ItemIdx).cast(pl.Int32))
            g = g.join(pos, on=Columns.User, how="inner").join(item_map, on=Columns.Item, how="inner")
            supplied[g[Columns.UserIdx].unique().to_numpy()] = True
            given_rows = g.select(HISTORY_COLUMNS)
        # extend: every known user's stored rows; replace: only those of users given none.
        stored = np.flatnonzero((gidx >= 0) & (~supplied if mode == "replace" else True))
        if len(stored):
            # The stored users' row ranges, gathered in chunk order: already sorted by (chunk
            # user, timestamp), as the sort below would leave them. Filtering the whole stored
            # history instead cost time in proportion to all users, at every chunk (~10 ms per
            # chunk at 100k users: quadratic over an export).
            cols, indptr = self._stored_history
            lo, hi = indptr[gidx[stored]], indptr[gidx[stored] + 1]
            lengths = hi - lo
            rows = np.repeat(lo - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
            part = {c: v[rows] for c, v in cols.items()}
            part[Columns.UserIdx] = np.repeat(stored, lengths).astype(cols[Columns.UserIdx].dtype)
            frames.append(pl.DataFrame(part, schema=self.history.select(HISTORY_COLUMNS).schema))
        if given_rows is not None:
            # After the stored rows: with extend, a given event at the same second as a stored one
            # stays after it in the stable sort below (the given events are the newer ones).
            frames.append(given_rows)
        df = pl.concat(frames) if frames else self.history.select(HISTORY_COLUMNS).head(0)
        if given is not None and given.height:
            df = df.sort(Columns.UserIdx, Columns.Timestamp, maintain_order=True)
        known = np.where(supplied, -1, gidx)
        return PipelineHistories(list(user_ids), known, History(df, n, self.n_items))

    @cached_property
    def _stored_history(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The stored history's ``HISTORY_COLUMNS`` as numpy, sorted by (user_idx, timestamp)
        (as saved; sorted here if not), and where each user's rows start (``indptr``)."""
        h = self.history.select(HISTORY_COLUMNS)
        u, t = h[Columns.UserIdx].to_numpy(), h[Columns.Timestamp].to_numpy()
        if np.any((np.diff(u) < 0) | ((np.diff(u) == 0) & (np.diff(t) < 0))):
            h = h.sort(Columns.UserIdx, Columns.Timestamp, maintain_order=True)
        cols = {c: h[c].to_numpy() for c in HISTORY_COLUMNS}
        indptr = np.searchsorted(cols[Columns.UserIdx], np.arange(len(self.users) + 1))
        return cols, indptr

    def scorers(self, ph: PipelineHistories, only: Collection[str] | None = None) -> dict[str, Recommender]:
        """Every model (or those in ``only``, plus what they need), scoring the users of ``ph``
        (chunk-local indices) by its ``for_users``. A single-stage export asks for one model and
        skips the others' user-side work (the text tower over every history, ALS fold-ins)."""
        derived = self.derived
        wanted = set(self.models if only is None else only)
        wanted |= {derived[n] for n in wanted if n in derived}
        out: dict[str, Recommender] = {}
        for name, m in self.models.items():
            if name in derived and name in wanted:  # over the base served here, reading the given histories
                out[name] = m.over(out[derived[name]]).for_users(ph.history, ph.known)
            elif name in wanted:
                out[name] = m.for_users(ph.history, ph.known)
        return out


def check_histories_mode(mode: str, setting: str = "histories_mode") -> str:
    """``mode`` if it is one of ``HISTORIES_MODES``, else a ``ConfigError`` naming ``setting``."""
    if mode not in HISTORIES_MODES:
        raise ConfigError(
            f"{setting} must be one of {list(HISTORIES_MODES)}, got {mode!r}: extend adds the given events to a "
            "known user's stored history, replace serves the given events alone"
        )
    return mode


def normalise_history(
    df: pl.DataFrame,
    event_weights: Mapping[str, float],
    now: int | None = None,
    file: str = InMemory("the given history"),
) -> pl.DataFrame:
    """``user_id, item_id, timestamp, weight`` from a user-supplied history table (``file``
    names it in errors).

    Every entry point's given histories pass here (the pyfunc model, REST, ``histories=`` of the
    CLI and ``TrainedPipeline.histories``), so they are refused alike: an empty id, an event type
    the model does not know, a timestamp that is no integer Unix seconds / ISO 8601 / datetime,
    or one more than a day after this machine's clock or ``now``, whichever is later
    (milliseconds read as seconds land there).

    Without a ``timestamp`` column the rows happened "just now", in row order: row ``i`` of a
    user's ``n`` rows is stamped ``now - (n - 1 - i)`` seconds. ``now``: the pipeline's ``now``
    (the end of its stored history, what the ranker's idle-days features count from); None: this
    machine's clock. Stamping them 0, 1, 2 ... instead dated them 1970, and the ranker saw a user
    idle for 56 years."""
    for col in (Columns.User, Columns.Item):
        if col not in df.columns:
            raise InputError(f"{file} has no '{col}' column (columns: {df.columns})", column=col)
    out = df.with_columns(pl.col(Columns.User).cast(pl.String), pl.col(Columns.Item).cast(pl.String))
    for col in (Columns.User, Columns.Item):
        require_non_null(out, col, file)  # a null user id would be served as "None"
    if Columns.Timestamp not in out.columns:
        now = int(time.time()) if now is None else int(now)
        per_user = pl.int_range(pl.len(), dtype=pl.Int64).over(Columns.User)
        count = pl.len().over(Columns.User).cast(pl.Int64)
        out = out.with_columns((now - (count - 1 - per_user)).alias(Columns.Timestamp))
    else:
        out = parse_timestamp(out, Columns.Timestamp, file)
        # Refused here, not only by the CLI's file reader: pyfunc, REST and the Python API too.
        # Up to the pipeline's own end time is never "the future" (rows stamped "just now" by
        # an earlier call come back here), even where its data is dated ahead of this clock.
        check_future(out, Columns.Timestamp, file, "error", max(int(time.time()), now or 0), {}, setting=None)
    if Columns.Weight not in out.columns:
        if Columns.Event in out.columns:
            unknown = out.filter(~pl.col(Columns.Event).is_in(list(event_weights)))
            if unknown.height:
                raise InputError(
                    f"event outside {sorted(event_weights)}",
                    column=Columns.Event,
                    example={k: v for k, v in unknown.row(0, named=True).items() if k != ROW},
                )
            weights = pl.col(Columns.Event).replace_strict(event_weights, return_dtype=pl.Float32)
        else:
            weights = pl.lit(min(event_weights.values()), dtype=pl.Float32)
        out = out.with_columns(weights.alias(Columns.Weight))
    return out.select(
        Columns.User,
        Columns.Item,
        pl.col(Columns.Timestamp).cast(pl.Int64),
        pl.col(Columns.Weight).cast(pl.Float32),
    )
