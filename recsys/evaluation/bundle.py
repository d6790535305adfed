"""The evaluation bundle: everything a report needs, written by training, read by ``recsys.evaluate``.

A training run's test stage is expensive; the report is not. So the run saves what it
evaluated -- every model's top-``max_k`` lists, the test targets, the item and user facts the
segments need, the text item embeddings (for diversity), the ranker's feature importances and a
protocol card -- as MLflow artifacts under ``evaluation/``. Reports and comparisons are then
recomputed from these files alone, without the models and without retraining.

Files (all compact dtypes; Amazon-Scientific, 8.4k test users x 7 models x 100: about 6 M rows):

==========================  ===============================================================
``recommendations.parquet`` ``user_idx, model, rank (1..max_k), item_idx, score, source``
                            (``source`` only for ``fused``: the candidate generator)
``targets.parquet``         ``user_idx, item_idx``: the held-out test events
``items.parquet``           ``item_idx, train_count`` (events in the test stage's history);
                            ``train_count == 0`` is a cold item
``users.parquet``           ``user_idx, history_length`` of every evaluated user
``item_embeddings.npy``     float16 ``[n_items, d]`` text-tower item vectors (may be absent)
``feature_importance.csv``  ``feature, gain`` of the fused ranker (may be absent)
``protocol.json``           the protocol card (``Protocol``)
==========================  ===============================================================
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.atomic import write_atomic, write_parquet_atomic, write_text_atomic
from recsys.columns import Columns
from recsys.errors import InputError

BUNDLE_DIR = "evaluation"
FILES = ("recommendations.parquet", "targets.parquet", "items.parquet", "users.parquet", "protocol.json")
MODEL = "model"
IMPRESSIONS = "impressions.parquet"
FINETUNING = "finetuning.json"  # optional: the text tower's training (validation curve, steps, minutes)
HISTORY_LENGTH = "history_length"
TRAIN_COUNT = "train_count"

# Two runs whose cards differ in any of these were not evaluated on the same question: their
# numbers cannot be compared user by user (or at all).
MUST_MATCH = (
    "data_hash",
    "split",
    "candidates",
    "seen_filtering",
    "availability_filtering",
    "targets_hash",
    "max_k",
)


@dataclass(frozen=True)
class Protocol:
    """What was evaluated and how: enough to tell whether two reports are comparable."""

    run_id: str
    experiment: str
    data_name: str
    data_hash: str
    n_users: int
    n_items: int
    split: dict[str, Any]
    split_counts: dict[str, int]
    seen_filtering: bool
    availability_filtering: bool
    ks: list[int]
    max_k: int
    seed: int
    git_sha: str
    git_dirty: bool
    targets_hash: str
    n_test_users: int
    n_test_events: int
    models: list[str]
    candidates: str = "full catalogue ranking (no sampled negatives)"
    # When the time-dependent features and statistics were taken (``recsys.pipeline.stage_history``).
    feature_time: str = "not recorded"
    # The test users the evaluated ones were drawn from (``eval.max_users``, a seeded sample
    # drawn without looking at outcomes); None: every test user was evaluated.
    test_users_sampled_from: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Protocol:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def mismatches(self, other: Protocol) -> dict[str, tuple[Any, Any]]:
        """Fields of ``MUST_MATCH`` that differ: ``{name: (mine, theirs)}``."""
        mine, theirs = asdict(self), asdict(other)
        return {k: (mine[k], theirs[k]) for k in MUST_MATCH if mine[k] != theirs[k]}


# Run outputs kept in the repository, not code: docs/reports/make.sh writes one report into the tree
# before the next report's job starts, which must not mark that job's code as changed.
GENERATED_PATHS = ("docs/reports",)


def git_version(root: str | Path) -> tuple[str, bool]:
    """``(HEAD sha, working tree has uncommitted changes)``; ``("unknown", False)`` outside git.
    Changes under ``GENERATED_PATHS`` do not count."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        excluded = [f":(top,exclude){p}" for p in GENERATED_PATHS]
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", ":(top)", *excluded],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return sha, bool(status.strip())


def targets_hash(targets: pl.DataFrame) -> str:
    """Hash of the (user, item) test pairs: same hash = the same users judged on the same events."""
    pairs = targets.select(pl.col(Columns.UserIdx).cast(pl.Int64), pl.col(Columns.ItemIdx).cast(pl.Int64)).sort(
        Columns.UserIdx, Columns.ItemIdx
    )
    return hashlib.sha256(pairs.write_csv().encode()).hexdigest()[:16]


# Users per part of ``recommendation_parts``: the long table is built and written a part at a
# time (~0.8 M rows of one model), never whole (24 M rows at 10x the generated data).
_PART_USERS = 8192


def recommendation_parts(
    users: np.ndarray,
    recommended: Mapping[str, np.ndarray],
    scores: Mapping[str, np.ndarray],
    sources: np.ndarray | None = None,
    fused: str = "fused",
) -> Iterator[pl.DataFrame]:
    """The rows of ``recommendation_frame``, in its order, as consecutive parts: one model's lists
    of up to ``_PART_USERS`` users each."""
    users = np.asarray(users)
    for name in sorted(recommended):
        all_items, all_scores = recommended[name], scores[name]
        k = all_items.shape[1]
        for lo in range(0, max(len(users), 1), _PART_USERS):
            items = all_items[lo : lo + _PART_USERS]
            keep = items.ravel() >= 0
            df = pl.DataFrame(
                {
                    Columns.UserIdx: np.repeat(users[lo : lo + _PART_USERS], k)[keep].astype(np.int32),
                    MODEL: pl.repeat(name, int(keep.sum()), dtype=pl.String, eager=True),
                    Columns.Rank: np.tile(np.arange(1, k + 1, dtype=np.int16), len(items))[keep],
                    Columns.ItemIdx: items.ravel()[keep].astype(np.int32),
                    Columns.Score: np.asarray(all_scores[lo : lo + _PART_USERS], dtype=np.float32).ravel()[keep],
                }
            )
            if name == fused and sources is not None:
                # Strings through codes: converting ~1 M Python strings one by one takes seconds.
                part = sources[lo : lo + _PART_USERS, :k].ravel()[keep].astype(str)
                labels, codes = np.unique(part, return_inverse=True)
                source = pl.Series(Columns.Source, labels.tolist(), dtype=pl.String).gather(codes)
            else:
                source = pl.repeat(None, df.height, dtype=pl.String, eager=True).alias(Columns.Source)
            yield df.with_columns(source).with_columns(pl.col(MODEL, Columns.Source).cast(pl.Categorical))


def recommendation_frame(
    users: np.ndarray,
    recommended: Mapping[str, np.ndarray],
    scores: Mapping[str, np.ndarray],
    sources: np.ndarray | None = None,
    fused: str = "fused",
) -> pl.DataFrame:
    """Long table of every model's lists (-1 padding dropped), sorted by model, user, rank."""
    return pl.concat(list(recommendation_parts(users, recommended, scores, sources, fused)))


def write_recommendations(
    path: str | Path,
    users: np.ndarray,
    recommended: Mapping[str, np.ndarray],
    scores: Mapping[str, np.ndarray],
    sources: np.ndarray | None = None,
) -> Path:
    """``recommendation_frame`` written to ``path`` (atomically) a part at a time, one row group
    each: the memory of one part, not of the whole table and its parquet copy."""
    import pyarrow.parquet as pq

    def write(tmp: Path) -> None:
        writer = None
        try:
            for part in recommendation_parts(users, recommended, scores, sources):
                table = part.to_arrow()
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                writer.write_table(table.cast(writer.schema))
        finally:
            if writer is not None:
                writer.close()

    return write_atomic(path, write)


def write_bundle(
    folder: str | Path,
    *,
    protocol: Protocol,
    users: np.ndarray,
    recommended: Mapping[str, np.ndarray],
    scores: Mapping[str, np.ndarray],
    sources: np.ndarray | None,
    targets: pl.DataFrame,
    history: pl.DataFrame,
    n_items: int,
    item_embeddings: np.ndarray | None = None,
    feature_importance: pl.DataFrame | None = None,
    impression_scores: pl.DataFrame | None = None,
    finetuning: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write the bundle into ``folder`` (each file atomically); returns the files written.

    ``history`` is the test stage's history (train + validation events): it defines cold items,
    item popularity and users' history lengths.
    """
    folder = Path(folder)
    out = [
        write_recommendations(folder / FILES[0], users, recommended, scores, sources),
        write_parquet_atomic(
            targets.select(pl.col(Columns.UserIdx).cast(pl.Int32), pl.col(Columns.ItemIdx).cast(pl.Int32)).sort(
                Columns.UserIdx, Columns.ItemIdx
            ),
            folder / FILES[1],
        ),
    ]
    counts = np.bincount(history[Columns.ItemIdx].to_numpy(), minlength=n_items).astype(np.int32)
    out.append(
        write_parquet_atomic(
            pl.DataFrame({Columns.ItemIdx: np.arange(n_items, dtype=np.int32), TRAIN_COUNT: counts}), folder / FILES[2]
        )
    )
    lengths = history.group_by(Columns.UserIdx).len()
    user_frame = (
        pl.DataFrame({Columns.UserIdx: np.asarray(users, dtype=np.int32)})
        .join(
            lengths.select(pl.col(Columns.UserIdx).cast(pl.Int32), pl.col("len").alias(HISTORY_LENGTH)),
            on=Columns.UserIdx,
            how="left",
        )
        .with_columns(pl.col(HISTORY_LENGTH).fill_null(0).cast(pl.Int32))
        .sort(Columns.UserIdx)
    )
    out.append(write_parquet_atomic(user_frame, folder / FILES[3]))
    if item_embeddings is not None:
        emb = np.asarray(item_embeddings, dtype=np.float16)
        out.append(write_atomic(folder / "item_embeddings.npy", lambda tmp: _save_npy(tmp, emb)))
    if feature_importance is not None:
        out.append(write_text_atomic(feature_importance.write_csv(), folder / "feature_importance.csv"))
    if impression_scores is not None:  # data with impressions: every model's score of every candidate
        out.append(write_parquet_atomic(impression_scores, folder / IMPRESSIONS))
    if finetuning is not None:  # the text tower's training: validation curve, steps, minutes
        out.append(write_text_atomic(json.dumps(finetuning, indent=2, default=float), folder / FINETUNING))
    # Last: readers take protocol.json as the sign that the bundle is complete (files are logged
    # to MLflow in this order, and a report may be asked for while a run is still logging).
    out.append(write_text_atomic(protocol.to_json(), folder / FILES[4]))
    return out


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save(path) would append ".npy" to the temporary name
        np.save(f, array)


@dataclass
class Bundle:
    """A bundle read back from a folder."""

    protocol: Protocol
    # Every model's lists: ``read_bundle`` gives a scan of the file, of which ``lists`` reads one
    # model's rows at a time (a report holds one model's long table, not all of them: 24 M rows at
    # 10x the generated data); ``.lazy().collect()`` reads everything.
    recommendations: pl.LazyFrame | pl.DataFrame
    targets: pl.DataFrame
    items: pl.DataFrame
    users: pl.DataFrame
    item_embeddings: np.ndarray | None
    feature_importance: pl.DataFrame | None
    impression_scores: pl.DataFrame | None = None  # impression_id, clicked, model, score
    finetuning: dict[str, Any] | None = None  # the text tower's validation curve, steps and minutes

    @property
    def models(self) -> list[str]:
        return list(self.protocol.models)

    @property
    def user_index(self) -> np.ndarray:
        return self.users[Columns.UserIdx].to_numpy()

    def lists(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        """``[n_users, max_k]`` int32 item indices (padded with -1) and scores (NaN) of ``model``,
        rows in ``user_index`` order."""
        if model not in self.models:
            raise InputError(f"run {self.protocol.run_id}: no model '{model}' in its evaluation bundle ({self.models})")
        users = self.user_index
        df = self.recommendations.lazy().filter(pl.col(MODEL) == model).collect()
        items = np.full((len(users), self.protocol.max_k), -1, dtype=np.int32)  # as stored
        scores = np.full(items.shape, np.nan, dtype=np.float32)
        row = np.searchsorted(users, df[Columns.UserIdx].to_numpy())
        col = df[Columns.Rank].to_numpy().astype(np.int64) - 1
        items[row, col] = df[Columns.ItemIdx].to_numpy()
        scores[row, col] = df[Columns.Score].to_numpy()
        return items, scores

    def relevant_items(self) -> list[np.ndarray]:
        """Per user (``user_index`` order), the distinct item indices of their test targets.

        Distinct: relevance is binary (``relevance_matrix`` merges a user's repeated target), so
        an item a user picked twice in the test period is one relevant item. Counted twice, the
        segments' ideal DCG and recall denominators held it twice, and a perfect list scored
        below 1 in the item segments while the same user scored 1 overall."""
        t = self.targets.unique([Columns.UserIdx, Columns.ItemIdx]).sort(Columns.UserIdx, Columns.ItemIdx)
        users = t[Columns.UserIdx].to_numpy()
        bounds = np.searchsorted(users, np.r_[self.user_index.astype(np.int64), np.iinfo(np.int64).max], side="left")
        items = t[Columns.ItemIdx].to_numpy().astype(np.int64)
        return [items[bounds[j] : bounds[j + 1]] for j in range(len(self.user_index))]


def read_bundle(folder: str | Path, run_id: str = "?") -> Bundle:
    """Read a bundle; a missing file is an ``InputError`` naming the run and the file."""
    folder = Path(folder)
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise InputError(
            f"run {run_id}: its evaluation bundle lacks {missing} (in {folder}); runs trained before the "
            "evaluation bundle existed cannot be reported -- retrain them"
        )
    protocol = Protocol.from_dict(json.loads((folder / "protocol.json").read_text()))
    emb_path, imp_path = folder / "item_embeddings.npy", folder / "feature_importance.csv"
    return Bundle(
        protocol=protocol,
        recommendations=pl.scan_parquet(folder / FILES[0]),
        targets=pl.read_parquet(folder / FILES[1]),
        items=pl.read_parquet(folder / FILES[2]).sort(Columns.ItemIdx),
        users=pl.read_parquet(folder / FILES[3]).sort(Columns.UserIdx),
        item_embeddings=np.load(emb_path) if emb_path.is_file() else None,
        feature_importance=pl.read_csv(imp_path) if imp_path.is_file() else None,
        impression_scores=pl.read_parquet(folder / IMPRESSIONS) if (folder / IMPRESSIONS).is_file() else None,
        finetuning=json.loads((folder / FINETUNING).read_text()) if (folder / FINETUNING).is_file() else None,
    )


def split_description(split: Mapping[str, Any]) -> dict[str, Any]:
    """The split's config without Hydra's ``_target_`` noise: ``{"type": "LeaveLastOutSplit", ...}``."""
    d = dict(split)
    target = str(d.pop("_target_", "unknown"))
    return {"type": target.rsplit(".", 1)[-1], **{k: v for k, v in sorted(d.items())}}


def make_protocol(
    *,
    run_id: str,
    experiment: str,
    data_name: str,
    data_hash: str,
    n_users: int,
    n_items: int,
    split: Mapping[str, Any],
    split_counts: Mapping[str, int],
    seen_filtering: bool,
    availability_filtering: bool,
    ks: Sequence[int],
    max_k: int,
    seed: int,
    targets: pl.DataFrame,
    models: Sequence[str],
    root: str | Path,
    feature_time: str = "not recorded",
    test_users_sampled_from: int | None = None,
    code: tuple[str, bool] | None = None,
) -> Protocol:
    """The protocol card. ``code``: ``git_version`` as the run started (the tree may change while it
    runs: a report written, a doc edited); None: asked of ``root`` now."""
    sha, dirty = git_version(root) if code is None else code
    return Protocol(
        run_id=run_id,
        experiment=experiment,
        data_name=data_name,
        data_hash=data_hash,
        n_users=int(n_users),
        n_items=int(n_items),
        split=split_description(split),
        split_counts={k: int(v) for k, v in split_counts.items()},
        seen_filtering=bool(seen_filtering),
        availability_filtering=bool(availability_filtering),
        ks=[int(k) for k in ks],
        max_k=int(max_k),
        seed=int(seed),
        git_sha=sha,
        git_dirty=dirty,
        targets_hash=targets_hash(targets),
        n_test_users=int(targets[Columns.UserIdx].n_unique()),
        n_test_events=int(targets.height),
        models=list(models),
        feature_time=feature_time,
        test_users_sampled_from=test_users_sampled_from,
    )
