"""The trained pipeline as one folder: save after training, load for export and serving.

What is stored (no pickle anywhere; see docs/export.md):

```
pipeline/
  meta.json            versions, sources, fusion settings, ranker features, event weights, "now"
  config.yaml          the resolved training config (recsys.update rebuilds the CF models and the
                       pre-fine-tuning encoder from it; serving does not read it)
  items.parquet        item_id, item_idx, text and the other item columns (category, windows ...)
  users.parquet        user_id, user_idx of the users known at training time
  history.parquet      user_idx, item_idx, timestamp, weight: the history it was fitted on (every event
                       when served after training, train + val for the evaluated pipeline)
  cf/<name>.npz        factors / similarity / counts of each CF model (numpy, allow_pickle=False)
  text/encoder/        BERT weights (safetensors) + config + tokenizer files (save_pretrained)
  text/user_encoder.safetensors, text/item_embeddings.npy
  text_extra/<name>/   a second text feature (e.g. the zero-shot tower): its user side and item
                       vectors only -- the catalogue is encoded at training time, so no BERT
  ranker/lightgbm.txt  the LightGBM model as text
```

At serving time every user-side quantity is derived from the history passed in (or the stored
one): ALS/BPR user factors are the trained ones for known users with their stored history and a
least-squares fold-in for anybody else; item-kNN and the text tower read the history directly.
"""

from __future__ import annotations

import json
import platform
import shutil
import types
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys.cf.models import ALS, BPR, ItemKNN, Popularity, user_rows
from recsys.columns import Columns
from recsys.data.dataset import IdMap
from recsys.data.validation import ROW, parse_timestamp, require_non_null
from recsys.errors import PIPELINE_REPAIR as REPAIR
from recsys.errors import ConfigError, InputError, reading
from recsys.kernels import pair_scores
from recsys.rank.ranker import LambdaMARTRanker
from recsys.recommender import History, NewItemText, Recommender, fixed_block_matmul
from recsys.text.history_tower import HistoryTower

# torch (and the text modules built on it) and lightgbm are imported where a text part or the
# ranker is loaded, not here: a single-stage factor export (ALS, BPR, item-kNN, popularity) and
# each of its worker processes load neither, which saves ~1.4 s of imports for each and ~1.4 s
# more for lightgbm's.
if TYPE_CHECKING:
    from recsys.text.encoder import TwoTower

FORMAT_VERSION = 1
HISTORY_COLUMNS = [Columns.UserIdx, Columns.ItemIdx, Columns.Timestamp, Columns.Weight]
TABLES = ("items.parquet", "users.parquet", "history.parquet")
RANKER_FILE = "ranker/lightgbm.txt"
CF_KINDS = ("ALS", "BPR", "ItemKNN", "Popularity")
# The entries ``load`` reads from meta.json and the JSON type each must have (``check_meta``).
META_FIELDS: dict[str, Any] = {
    "models": dict[str, dict],
    "source_order": list[str],
    "n_candidates": dict[str, int],
    "event_weights": dict[str, float],
    "now": int,
}
META_KEYS = tuple(META_FIELDS)
# Entries that may be absent or null: no text tower / no ranker / no run info.
META_OPTIONAL: dict[str, Any] = {"text": dict, "ranker": dict, "info": dict}
# Inside ``text``: ``load`` reads name and max_history; re-saving a loaded pipeline reads the rest.
TEXT_FIELDS: dict[str, Any] = {"name": str, "max_history": int, "max_length": int, "temperature": float}
RANKER_FIELDS: dict[str, Any] = {"features": list[str], "best_iteration": int}
# Inside each ``models`` entry, by kind (``kind`` itself is checked for every entry).
MODEL_FIELDS: dict[str, dict[str, Any]] = {"NewItemText": {"max_events": int}, "HistoryTower": {"max_history": int}}
# Read with ``.get`` (pipelines saved before it was recorded lack it), so only its type is checked.
TOWER_OPTIONAL: dict[str, Any] = {"history_embeddings": bool}
# Per kind, fields pipelines saved before they existed lack (read with ``.get``).
MODEL_OPTIONAL: dict[str, dict[str, Any]] = {"ItemKNN": {"recency_decay": float | None}}


def read_json_object(path: Path) -> dict[str, Any]:
    """A pipeline JSON file (``meta.json``, ``serving.json``) as a dict; an ``InputError``
    naming the file if it cannot be read or does not hold one JSON object."""
    with reading(path):
        data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise InputError(f"holds a JSON {type(data).__name__}, not an object; {REPAIR}", file=str(path))
    return data


def fits(value: Any, hint: Any) -> bool:
    """Whether ``value``, as parsed from JSON, has the type ``hint`` names (``int``, ``float``,
    ``str``, ``bool``, ``None``, ``list[...]`` / ``Sequence[...]``, ``dict[str, ...]`` and unions
    of them). JSON keeps booleans apart from numbers, so ``true`` is no int here, while an integer
    is a valid float. A hint it does not know passes: the code that reads the value decides."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if hint is None or hint is type(None):
        return value is None
    if hint is Any:
        return True
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, int | float)
    if origin in (list, Sequence):
        return isinstance(value, list) and all(fits(v, args[0]) for v in value)
    if origin in (dict, Mapping):
        return isinstance(value, dict) and all(fits(v, args[1]) for v in value.values())
    return isinstance(value, hint) if isinstance(hint, type) else True


def type_name(hint: Any) -> str:
    """``hint`` as a message shows it: ``list[str]``, ``int | None``."""
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("collections.abc.", "")


def check_field(file: Path, parent: Mapping[str, Any], path: str, hint: Any, required: bool = True) -> None:
    """An ``InputError`` naming ``file`` and the dotted ``path`` if the last key of ``path`` is
    missing from ``parent`` (when ``required``) or does not have the JSON type ``hint``."""
    key = path.rsplit(".", 1)[-1]
    if key not in parent:
        if required:
            raise InputError(f"field '{path}' is missing (expected {type_name(hint)}); {REPAIR}", file=str(file))
        return
    value = parent[key]
    if not fits(value, hint):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise InputError(
            f"field '{path}' must be {type_name(hint)}, found {type(value).__name__} {shown}; {REPAIR}",
            file=str(file),
        )


def check_meta(meta: Mapping[str, Any], file: Path) -> None:
    """Every field ``load`` (and a re-save of what it loaded) reads from ``meta.json``, present and
    of the right type, so a hand-edited entry fails here by name rather than deep in ``load``."""
    for key, hint in META_FIELDS.items():
        check_field(file, meta, key, hint)
    for key, hint in META_OPTIONAL.items():
        check_field(file, meta, key, hint | None, required=False)
    for name, info in meta["models"].items():
        check_field(file, info, f"models.{name}.kind", str)
        for key, hint in MODEL_FIELDS.get(info["kind"], {}).items():
            check_field(file, info, f"models.{name}.{key}", hint)
        for key, hint in TOWER_OPTIONAL.items():
            check_field(file, info, f"models.{name}.{key}", hint, required=False)
        for key, hint in MODEL_OPTIONAL.get(info["kind"], {}).items():
            check_field(file, info, f"models.{name}.{key}", hint, required=False)
    if meta.get("text"):
        for key, hint in TEXT_FIELDS.items():
            check_field(file, meta["text"], f"text.{key}", hint)
        for key, hint in TOWER_OPTIONAL.items():
            check_field(file, meta["text"], f"text.{key}", hint, required=False)
    if meta.get("ranker"):
        for key, hint in RANKER_FIELDS.items():
            check_field(file, meta["ranker"], f"ranker.{key}", hint)


# --- chunk-local scorers: the same scores as the trained models, for any set of users -------------


class FactorScorer(Recommender):
    """``user_factors @ item_factors.T`` for a block of users (ALS, BPR)."""

    writes_into = True

    def __init__(self, name: str, user_factors: np.ndarray, item_factors: np.ndarray) -> None:
        self.name, self.user_factors, self.item_factors = name, user_factors, item_factors

    def fit(self, history: History) -> FactorScorer:  # pragma: no cover - never refitted
        return self

    def score_users(self, users: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return fixed_block_matmul(self.user_factors[users], self.item_factors.T, out)

    def score_pairs(self, users: np.ndarray, items: np.ndarray, chunk: int = 2048) -> np.ndarray:
        return pair_scores(self.user_factors, self.item_factors, users, items)


class KNNScorer(Recommender):
    """Item-kNN: the user's history row (binary, or ``recency_rows``) times the item-item similarity."""

    writes_into = True

    def __init__(self, name: str, user_items: sp.csr_matrix, similarity: sp.csr_matrix) -> None:
        self.name, self.user_items, self.similarity = name, user_items, similarity

    def fit(self, history: History) -> KNNScorer:  # pragma: no cover
        return self

    def score_users(self, users: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if out is not None:
            out.fill(0.0)  # toarray adds the product's entries into it
        return (self.user_items[users] @ self.similarity).toarray(out=out)


class ConstantScorer(Recommender):
    """The same score row for everybody (popularity)."""

    def __init__(self, name: str, counts: np.ndarray) -> None:
        self.name, self.counts = name, counts

    def fit(self, history: History) -> ConstantScorer:  # pragma: no cover
        return self

    def constant_scores(self) -> np.ndarray:
        return self.counts

    def score_users(self, users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(users), len(self.counts)))

    def score_pairs(self, users: np.ndarray, items: np.ndarray, chunk: int = 2048) -> np.ndarray:
        return np.asarray(self.counts, dtype=np.float32)[items]


class EmbeddingScorer(Recommender):
    """Text tower: user vectors (from history) . item vectors (from text)."""

    def __init__(self, name: str, user_embeddings: np.ndarray, item_embeddings: np.ndarray) -> None:
        self.name, self.user_embeddings, self.item_embeddings = name, user_embeddings, item_embeddings

    def fit(self, history: History) -> EmbeddingScorer:  # pragma: no cover
        return self

    writes_into = True

    def score_users(self, users: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return fixed_block_matmul(self.user_embeddings[users], self.item_embeddings.T, out)

    def score_pairs(self, users: np.ndarray, items: np.ndarray, chunk: int = 2048) -> np.ndarray:
        return pair_scores(self.user_embeddings, self.item_embeddings, users, items)


def fold_in(item_factors: np.ndarray, user_items: sp.csr_matrix, regularization: float, alpha: float) -> np.ndarray:
    """ALS user factors for histories nobody trained on: one exact least-squares solve per user,
    by implicit's public ``recalculate_user`` (the solve its ALS makes for every user in its last
    half-iteration, confidence ``alpha * weight``), so a known user's folded-in vector is close
    to its trained one.
    """
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    y = np.ascontiguousarray(item_factors, dtype=np.float32)
    ui = sp.csr_matrix(user_items, dtype=np.float32)
    ui.sort_indices()
    if ui.shape[0] == 0:
        return np.zeros((0, y.shape[1]), dtype=np.float32)
    with threadpool_limits(1, "blas"):  # implicit warns when BLAS has a thread pool of its own
        als = AlternatingLeastSquares(
            factors=y.shape[1], regularization=float(regularization), alpha=float(alpha), num_threads=1
        )
        als.item_factors = y
        return np.asarray(als.recalculate_user(np.arange(ui.shape[0]), ui), dtype=np.float32)


# --- the pipeline --------------------------------------------------------------------------------


@dataclass
class PipelineHistories:
    """The users of one request/chunk, renumbered 0..n-1, with the history each one has."""

    user_ids: list[str]
    known: np.ndarray  # global user index for users served from their stored history, else -1
    history: History  # chunk-local user indices


@dataclass
class TrainedPipeline:
    """Everything the test stage used to rank, in a form that can be saved and served."""

    items: pl.DataFrame  # item_id, item_idx, text, ... sorted by item_idx
    users: IdMap
    history: pl.DataFrame  # HISTORY_COLUMNS, sorted by user_idx, timestamp
    factor_models: dict[str, dict[str, Any]]  # name -> {user_factors, item_factors, regularization, alpha, kind}
    knn_models: dict[str, sp.csr_matrix]  # name -> item-item similarity
    constant_models: dict[str, np.ndarray]  # name -> score row
    net: TwoTower | None
    item_embeddings: np.ndarray | None  # [n_items, d] float32, from the fine-tuned item tower
    text_name: str | None
    ranker: LambdaMARTRanker | None
    n_candidates: dict[str, int]  # in config order: the first source proposing an item is its ``source``
    event_weights: dict[str, float]
    now: int  # reference time: end of the stored history (user/item idle days are relative to it)
    meta: dict[str, Any] = field(default_factory=dict)
    source_order: list[str] = field(default_factory=list)  # every model, in training order
    new_item_models: dict[str, int] = field(default_factory=dict)  # name -> max_events (NewItemText)
    history_towers: dict[str, HistoryTower] = field(default_factory=dict)  # further text features
    knn_recency: dict[str, float] = field(default_factory=dict)  # item-kNN name -> recency_decay, if set
    # The text tower's serving side (user encoder + item vectors): all that scoring needs. A loaded
    # pipeline leaves ``net`` (the BERT) on disk in ``text_folder`` until it is saved again, so an
    # export process and each of its workers skip importing and reading a model they never run.
    text_tower: HistoryTower | None = None
    text_folder: Path | None = None
    # Set by ``load(models=...)``: the only models read (no ranker either); None: everything.
    only: frozenset[str] | None = None

    # ---- construction from a training run --------------------------------------------------------

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
        from recsys.text.recommender import TextRecommender

        factor, knn, const, new_items, towers, recency = {}, {}, {}, {}, {}, {}
        net, text_name, text_tower = None, None, None
        for name, m in models.items():
            if isinstance(m, NewItemText):
                new_items[name] = int(m.max_events)
            elif isinstance(m, ALS | BPR):
                factor[name] = {
                    "user_factors": np.asarray(m.user_factors, dtype=np.float32),
                    "item_factors": np.asarray(m.item_factors, dtype=np.float32),
                    "regularization": float(m.regularization),
                    "alpha": float(getattr(m, "alpha", 1.0)),
                    "kind": type(m).__name__,
                }
            elif isinstance(m, ItemKNN):
                knn[name] = sp.csr_matrix(m.similarity, dtype=np.float32)
                if m.recency_decay is not None:
                    recency[name] = float(m.recency_decay)
            elif isinstance(m, Popularity):
                const[name] = np.asarray(m.counts, dtype=np.float32)
            elif isinstance(m, TextRecommender):
                if net is not None:  # the first is the tower (text_new, explanations); others are features
                    towers[name] = HistoryTower.from_recommender(m)
                else:
                    net, text_name, text_tower = m.net, name, HistoryTower.from_recommender(m)
            else:
                raise ConfigError(f"cannot save model '{name}' of type {type(m).__name__} in a pipeline")
        df = history.interactions
        hist = df.select(
            pl.col(Columns.UserIdx).cast(pl.Int32),
            pl.col(Columns.ItemIdx).cast(pl.Int32),
            pl.col(Columns.Timestamp).cast(pl.Int64),
            pl.col(Columns.Weight).cast(pl.Float32),
        )
        now = int(df[Columns.Timestamp].max()) if df.height else 0
        return cls(
            items=items.sort(Columns.ItemIdx),
            users=users,
            history=hist,
            factor_models=factor,
            knn_models=knn,
            knn_recency=recency,
            constant_models=const,
            net=net,
            item_embeddings=None if text_tower is None else text_tower.item_embeddings,
            text_name=text_name,
            ranker=ranker,
            n_candidates=dict(n_candidates),
            event_weights={k: float(v) for k, v in event_weights.items()},
            now=now,
            meta=dict(meta or {}),
            source_order=list(models),
            new_item_models=new_items,
            history_towers=towers,
            text_tower=text_tower,
        )

    @property
    def n_items(self) -> int:
        return self.items.height

    @property
    def item_ids(self) -> np.ndarray:
        return np.asarray(self.items[Columns.Item].to_list(), dtype=object)

    @property
    def model_names(self) -> list[str]:
        return list(self.source_order)

    # ---- save / load -------------------------------------------------------------------------------

    def save(self, path: str | Path, config_yaml: str | None = None) -> Path:
        """Write the folder (see the module docstring). ``path`` must not exist or be empty."""
        path = Path(path)
        if self.only is not None:
            raise ConfigError(f"this pipeline was loaded with only {sorted(self.only)}: load it whole to save it")
        if path.exists() and any(path.iterdir()):
            raise ConfigError(f"pipeline folder {path} exists and is not empty")
        # Read before anything is written: a loaded pipeline whose BERT is gone leaves no folder.
        encoder = None  # the text tower's (BERT, tokenizer, max_length, temperature)
        adapter = None  # the item encoder's TextAdapter weights, when it has one
        encoder_dir = None  # a loaded pipeline's saved BERT folder (BERT, tokenizer, adapter), copied as it is
        if self.net is not None:  # fresh from training
            enc = self.net.item_encoder
            encoder = (enc.bert, enc.tokenizer, enc.max_length, self.net.temperature)
            adapter = enc.adapter.state_dict() if enc.adapter is not None else None
        elif self.text_folder is not None:  # a loaded pipeline: its BERT folder (serving never reads it)
            tm = read_json_object(self.text_folder.parent / "meta.json")["text"]
            encoder_dir = self.text_folder / "encoder"
            if not encoder_dir.is_dir():
                missing = f"missing the text tower's BERT ({encoder_dir.name}/); {REPAIR}"
                raise InputError(missing, file=str(self.text_folder))
            encoder = (None, None, tm["max_length"], tm["temperature"])
        (path / "cf").mkdir(parents=True, exist_ok=True)
        self.items.write_parquet(path / "items.parquet")
        self.users.to_frame(Columns.User, Columns.UserIdx).write_parquet(path / "users.parquet")
        self.history.write_parquet(path / "history.parquet")
        for name, f in self.factor_models.items():
            np.savez(
                path / "cf" / f"{name}.npz",
                user_factors=f["user_factors"],
                item_factors=f["item_factors"],
                regularization=np.float64(f["regularization"]),
                alpha=np.float64(f["alpha"]),
            )
        for name, s in self.knn_models.items():
            np.savez(path / "cf" / f"{name}.npz", data=s.data, indices=s.indices, indptr=s.indptr, shape=s.shape)
        for name, c in self.constant_models.items():
            np.savez(path / "cf" / f"{name}.npz", counts=c)
        text_meta = None
        if encoder is not None:
            bert, tok, max_length, temperature = encoder
            # The tower's serving side (user encoder weights, item vectors, the frozen history
            # side when there is one): taken from the trained tower, or loaded with the pipeline.
            tower = self.text_tower.save(path / "text")
            if encoder_dir is not None:
                shutil.copytree(encoder_dir, path / "text" / "encoder")
            else:
                bert.save_pretrained(path / "text" / "encoder", safe_serialization=True)
                tok.save_pretrained(path / "text" / "encoder")
            if adapter is not None:  # what new item texts go through after the BERT (recsys.update)
                from safetensors.torch import save_file

                weights = {k: v.detach().cpu().contiguous() for k, v in adapter.items()}
                save_file(weights, str(path / "text" / "encoder" / ADAPTER_FILE))
            text_meta = {
                "name": self.text_name,
                "max_length": max_length,
                "max_history": tower["max_history"],
                "temperature": temperature,
                "history_embeddings": tower["history_embeddings"],
            }
        towers_meta = {name: t.save(path / "text_extra" / name) for name, t in self.history_towers.items()}
        ranker_meta = None
        if self.ranker is not None:
            (path / RANKER_FILE).parent.mkdir()
            self.ranker.booster.save_model(str(path / RANKER_FILE), num_iteration=-1)
            ranker_meta = {"features": self.ranker.features, "best_iteration": self.ranker.best_iteration}
        meta = {
            "format_version": FORMAT_VERSION,
            "models": {
                **{n: {"kind": f["kind"]} for n, f in self.factor_models.items()},
                **{n: {"kind": "ItemKNN", "recency_decay": self.knn_recency.get(n)} for n in self.knn_models},
                **{n: {"kind": "Popularity"} for n in self.constant_models},
                **({self.text_name: {"kind": "TextRecommender"}} if self.text_name else {}),
                **{n: {"kind": "NewItemText", "max_events": e} for n, e in self.new_item_models.items()},
                **towers_meta,
            },
            "source_order": self.source_order,
            "n_candidates": self.n_candidates,
            "event_weights": self.event_weights,
            "now": self.now,
            "text": text_meta,
            "ranker": ranker_meta,
            "python": platform.python_version(),
            "info": self.meta,
        }
        # Keys in insertion order: the candidate sources' order decides each row's ``source``.
        (path / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        if config_yaml is not None:
            (path / "config.yaml").write_text(config_yaml)
        return path

    @staticmethod
    def files(meta: Mapping[str, Any]) -> dict[str, str]:
        """Every file ``load`` reads besides ``meta.json`` (relative to the folder, ``/``
        separated) and what it holds, from the folder's ``meta.json``. An unknown model kind is a
        ``ValueError`` here, before anything is read."""
        out = dict.fromkeys(TABLES, "a table written by training")
        for name, info in meta["models"].items():
            kind = info["kind"]
            if kind in CF_KINDS:
                out[f"cf/{name}.npz"] = f"the {kind} model '{name}'"
            elif kind == "HistoryTower":
                out |= {f"text_extra/{name}/{f}": f"the text feature '{name}'" for f in HistoryTower.files(info)}
            elif kind not in ("TextRecommender", "NewItemText"):  # those two are read from text/
                raise ValueError(f"unknown model kind {kind} (model '{name}')")
        if meta.get("text"):
            text = meta["text"]
            out |= {f"text/{f}": f"the text tower '{text['name']}'" for f in HistoryTower.files(text)}
        if meta.get("ranker"):
            out[RANKER_FILE] = "the LightGBM ranker"
        return out

    @classmethod
    def load(cls, path: str | Path, models: Collection[str] | None = None) -> TrainedPipeline:
        """Read a folder written by ``save``. Reads no pickle (numpy with ``allow_pickle=False``).

        ``models``: read only these models (and the text tower a ``NewItemText`` among them
        needs), and no ranker: what a single-stage export scores with. Such a pipeline
        recommends with those models only and cannot be saved. Default: everything.

        Checks first that every file it will read is there (``files``) and raises one
        ``InputError`` naming the folder and all the missing ones; a file that is there but
        cannot be read is an ``InputError`` naming that file. Before that, every field it reads
        from ``meta.json`` is checked (``check_meta``): a missing or wrongly typed one is an
        ``InputError`` naming meta.json and the field's dotted path."""
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise InputError("not a saved pipeline (no meta.json)", file=str(path))
        meta = read_json_object(meta_path)
        if meta.get("format_version") != FORMAT_VERSION:
            raise InputError(f"pipeline format {meta.get('format_version')} != {FORMAT_VERSION}", file=str(meta_path))
        if absent := [k for k in META_KEYS if k not in meta]:
            raise InputError(f"has no {absent} entries; {REPAIR}", file=str(meta_path))
        check_meta(meta, meta_path)
        with reading(meta_path):  # an unknown kind or a malformed "models" entry is meta.json's fault
            files = cls.files(meta)
        if missing := [f"{rel} ({what})" for rel, what in files.items() if not (path / rel).is_file()]:
            raise InputError(
                f"pipeline folder lacks {len(missing)} file(s): {', '.join(missing)}; {REPAIR}", file=str(path)
            )
        wanted = None if models is None else cls._needed(meta, models)
        with reading(path / "items.parquet"):
            items = pl.read_parquet(path / "items.parquet")
        with reading(path / "users.parquet"):
            users_df = pl.read_parquet(path / "users.parquet").sort(Columns.UserIdx)
            users = IdMap(np.asarray(users_df[Columns.User].to_list(), dtype=object))
        with reading(path / "history.parquet"):
            history = pl.read_parquet(path / "history.parquet")
        factor, knn, const, recency = {}, {}, {}, {}
        text_tower, text_name = None, None
        new_items, towers = {}, {}
        for name, info in meta["models"].items():
            kind = info["kind"]
            if wanted is not None and name not in wanted:
                continue
            if kind == "NewItemText":
                new_items[name] = int(info["max_events"])
            elif kind == "HistoryTower":
                towers[name] = HistoryTower.load(path / "text_extra" / name, int(info["max_history"]))
            elif kind in CF_KINDS:
                cf = path / "cf" / f"{name}.npz"
                with reading(cf), np.load(cf, allow_pickle=False) as z:
                    if kind in ("ALS", "BPR"):
                        factor[name] = {
                            "user_factors": z["user_factors"],
                            "item_factors": z["item_factors"],
                            "regularization": float(z["regularization"]),
                            "alpha": float(z["alpha"]),
                            "kind": kind,
                        }
                    elif kind == "ItemKNN":
                        knn[name] = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
                        if info.get("recency_decay") is not None:
                            recency[name] = float(info["recency_decay"])
                    else:
                        const[name] = z["counts"]
        if meta.get("text") and (wanted is None or meta["text"]["name"] in wanted):
            text_tower, text_name = HistoryTower.load(path / "text", meta["text"]["max_history"]), meta["text"]["name"]
        ranker = None
        if meta.get("ranker") and wanted is None:
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
            factor_models=factor,
            knn_models=knn,
            knn_recency=recency,
            constant_models=const,
            net=None,
            item_embeddings=None if text_tower is None else text_tower.item_embeddings,
            text_name=text_name,
            ranker=ranker,
            n_candidates=dict(meta["n_candidates"]),
            event_weights=dict(meta["event_weights"]),
            now=int(meta["now"]),
            meta=dict(meta.get("info", {})),
            source_order=list(meta["source_order"]),
            new_item_models=new_items,
            history_towers=towers,
            text_tower=text_tower,
            text_folder=path / "text" if text_tower is not None else None,
            only=None if wanted is None else frozenset(wanted),
        )

    @staticmethod
    def _needed(meta: Mapping[str, Any], models: Collection[str]) -> set[str]:
        """``models`` and the text tower a ``NewItemText`` among them scores through."""
        if unknown := sorted(set(models) - set(meta["models"])):
            raise ConfigError(
                f"unknown model(s) {unknown}: the pipeline has {meta['source_order']} "
                "(as an export's scorer, 'fused' is the ranker over all of them)"
            )
        out = set(models)
        if any(meta["models"][n]["kind"] == "NewItemText" for n in out) and meta.get("text"):
            out.add(meta["text"]["name"])
        return out

    # ---- serving ---------------------------------------------------------------------------------

    def histories(self, user_ids: list[str], given: pl.DataFrame | None = None) -> PipelineHistories:
        """Users to serve, each with the history passed in ``given`` (which replaces the stored
        one) or else the stored one (users unknown and without history get an empty one).

        ``given``: ``user_id, item_id`` and optionally ``timestamp`` (default: row order) and
        ``event`` (default: the lightest event type) or ``weight``.
        """
        gidx = self.users.index(user_ids)
        n = len(user_ids)
        frames = []
        supplied = np.zeros(n, dtype=bool)
        if given is not None and given.height:
            g = normalise_history(given, self.event_weights)
            pos = pl.DataFrame(
                {Columns.User: list(user_ids), Columns.UserIdx: np.arange(n, dtype=np.int32)},
                schema={Columns.User: pl.String, Columns.UserIdx: pl.Int32},
            )
            item_map = self.items.select(Columns.Item, pl.col(Columns.ItemIdx).cast(pl.Int32))
            g = g.join(pos, on=Columns.User, how="inner").join(item_map, on=Columns.Item, how="inner")
            supplied[g[Columns.UserIdx].unique().to_numpy()] = True
            frames.append(g.select(HISTORY_COLUMNS))
        stored = np.flatnonzero((gidx >= 0) & ~supplied)
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
        """Every model (or those in ``only``, plus what they need), able to score the users of
        ``ph`` (chunk-local indices). A single-stage export asks for one model and skips the
        others' user-side work (the text tower over every history, ALS fold-ins)."""
        h = ph.history
        out: dict[str, Recommender] = {}
        matrix = h.matrix
        wanted = set(self.source_order if only is None else only)
        if wanted & set(self.new_item_models) and self.text_name:
            wanted.add(self.text_name)
        for name in self.source_order:
            if name not in wanted:
                continue
            if name in self.factor_models:
                f = self.factor_models[name]
                uf = np.zeros((h.n_users, f["item_factors"].shape[1]), dtype=np.float32)
                known = ph.known >= 0
                uf[known] = f["user_factors"][ph.known[known]]
                new = np.flatnonzero(~known)
                if len(new):
                    uf[new] = fold_in(f["item_factors"], matrix[new], f["regularization"], f["alpha"])
                out[name] = FactorScorer(name, uf, f["item_factors"])
            elif name in self.knn_models:
                rows = user_rows(h, self.knn_recency.get(name))
                out[name] = KNNScorer(name, rows, self.knn_models[name])
            elif name in self.constant_models:
                out[name] = ConstantScorer(name, self.constant_models[name])
            elif name == self.text_name:
                out[name] = EmbeddingScorer(name, self.text_tower.user_embeddings(h.sequences), self.item_embeddings)
            elif name in self.history_towers:
                tower = self.history_towers[name]
                out[name] = EmbeddingScorer(name, tower.user_embeddings(h.sequences), tower.item_embeddings)
            elif name in self.new_item_models:
                if self.text_name not in out:
                    raise ConfigError(f"'{name}' needs the text tower '{self.text_name}' before it")
                stored = History(self.history, len(self.users), self.n_items)
                out[name] = NewItemText(out[self.text_name], self.new_item_models[name]).fit(stored)
        return out


ADAPTER_FILE = "item_adapter.safetensors"


def load_adapter(folder: Path) -> dict[str, Any] | None:
    """The item encoder's ``TextAdapter`` weights saved beside its BERT (``None``: it has none)."""
    file = folder / "encoder" / ADAPTER_FILE
    if not file.is_file():
        return None
    from safetensors.torch import load_file

    with reading(file):
        return load_file(str(file))


def load_bert(folder: Path) -> tuple[Any, Any]:
    """The text tower's BERT and tokenizer, saved under ``folder/encoder``: only ``recsys.update``
    reads them, to encode new item texts (serving has the vectors, ``text_tower``)."""
    from transformers import AutoModel, AutoTokenizer

    enc_dir = folder / "encoder"
    if not enc_dir.is_dir():  # serving never reads it, so load let it pass; saving again needs it
        raise InputError(f"missing the text tower's BERT ({enc_dir.name}/); {REPAIR}", file=str(folder))
    with reading(enc_dir):
        bert = AutoModel.from_pretrained(str(enc_dir), add_pooling_layer=False, use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(str(enc_dir))
    return bert, tok


def normalise_history(df: pl.DataFrame, event_weights: Mapping[str, float]) -> pl.DataFrame:
    """``user_id, item_id, timestamp, weight`` from a user-supplied history table."""
    for col in (Columns.User, Columns.Item):
        if col not in df.columns:
            raise InputError(f"history table has no '{col}' column (columns: {df.columns})", column=col)
    out = df.with_columns(pl.col(Columns.User).cast(pl.String), pl.col(Columns.Item).cast(pl.String))
    for col in (Columns.User, Columns.Item):
        require_non_null(out, col, "history table")  # a null user id would be served as "None"
    if Columns.Timestamp not in out.columns:
        out = out.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias(Columns.Timestamp))
    else:
        out = parse_timestamp(out, Columns.Timestamp, "history table")
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
