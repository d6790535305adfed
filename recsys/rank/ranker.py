"""The fusion ranker: LightGBM trees over one query group per user (LambdaRank, softmax or logistic loss)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from recsys.columns import Columns
from recsys.errors import ConfigError, InputError, require_whole
from recsys.threads import usable_cores

if TYPE_CHECKING:
    import lightgbm as lgb


# LightGBM objectives over the same query groups: LambdaRank's pairwise NDCG gradients, the
# listwise softmax cross-entropy, or one logistic loss per row (the groups then only stop early).
OBJECTIVES = ("lambdarank", "rank_xendcg", "binary")


class LambdaMARTRanker:
    """Learns to order each user's candidates so the held-out next item comes first.

    Trained on the candidates of one or more labelled stages with their held-out targets as
    labels (one query per user and stage); a seeded ``early_stopping_fraction`` of those users
    is held back to choose the number of trees, so the trees are not picked on the rows they
    were fitted on. With ``refit_full`` the final model is then retrained on all users with that
    many trees (scaled by ``1 / (1 - fraction)`` for the larger data): one target per user makes
    labels scarce, and the held-back fifth is worth having (Amazon-Scientific: fused NDCG@10
    0.1051 -> 0.1058 in the same setting).

    With ``bags`` > 1 it is a cross-validated bag instead: the users are cut into ``bags`` seeded
    folds, one model per fold is fitted on the other folds and early-stopped on its own, and the
    models are averaged. Every user is then both fitted on and used to stop on, and averaging
    models fitted on different users lowers the variance a few thousand labelled users leave. The
    average is stored as one LightGBM model (the trees of all bags, leaf values divided by
    ``bags``), so prediction, SHAP explanations and the saved pipeline see one ordinary booster.
    ``early_stopping_fraction`` and ``refit_full`` do not apply to bags (each fold stops its model).
    """

    def __init__(
        self,
        n_estimators: int = 400,
        learning_rate: float = 0.05,
        num_leaves: int = 31,
        min_child_samples: int = 100,
        feature_fraction: float = 0.9,
        early_stopping_rounds: int = 40,
        early_stopping_fraction: float = 0.2,
        eval_at: int = 10,
        refit_full: bool = True,
        bags: int = 1,
        seed: int = 0,
        n_jobs: int | None = None,
        objective: str = "lambdarank",
    ) -> None:
        # Config values: one line and exit 2 from the entry points.
        if objective not in OBJECTIVES:
            raise ConfigError(f"ranker.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        require_whole("ranker.bags", bags)
        require_whole("ranker.n_jobs", n_jobs, optional=True)
        self.params = dict(
            objective=objective,
            learning_rate=learning_rate,
            num_leaves=num_leaves,
            min_data_in_leaf=min_child_samples,
            feature_fraction=feature_fraction,
            eval_at=[eval_at],
            metric="ndcg",
            seed=seed,
            deterministic=True,
            force_row_wise=True,
            num_threads=1,
            verbosity=-1,
        )
        self.n_estimators = n_estimators
        self.early_stopping_rounds = early_stopping_rounds
        self.early_stopping_fraction = early_stopping_fraction
        self.refit_full = refit_full
        self.bags = bags
        self.seed = seed
        # Bags trained at once, each on one thread (LightGBM releases the GIL): the models do not
        # depend on it. None: the cores this process may use.
        self.n_jobs = n_jobs or usable_cores()
        self.stop_score: float | None = None

    def fit(self, frame: pl.DataFrame, features: Sequence[str], label: str = "label") -> LambdaMARTRanker:
        import lightgbm as lgb

        self.features = list(features)
        # One query per user and labelled stage (``Columns.Stage``, when the frame has several);
        # users, not queries, are held back or cut into folds, so a user's stages stay together.
        query = query_keys(frame)
        # Queries whose target is not among the candidates teach nothing to a ranker.
        frame = frame.filter(pl.col(label).sum().over(query) > 0).sort(*query, Columns.ItemIdx)
        if frame.height == 0:
            raise InputError(
                "no validation target is among the candidates: the ranker has nothing to learn "
                "(raise rank.n_candidates or check the split)"
            )
        users = frame[Columns.UserIdx].unique().sort().to_numpy()
        rng = np.random.default_rng(self.seed)
        if self.bags > 1:
            return self._fit_bags(frame, users, rng, label)
        held = rng.choice(users, int(len(users) * self.early_stopping_fraction), replace=False)
        is_held = frame[Columns.UserIdx].is_in(held.tolist())
        train = self._dataset(frame.filter(~is_held), label)
        valid_sets, callbacks = [], []
        stop_part = frame.filter(is_held)
        if stop_part.height:
            valid_sets = [self._dataset(stop_part, label, reference=train)]
            callbacks = [lgb.early_stopping(self.early_stopping_rounds, verbose=False)]
        self.booster = lgb.train(
            self.params, train, num_boost_round=self.n_estimators, valid_sets=valid_sets, callbacks=callbacks
        )
        self.best_iteration = int(self.booster.best_iteration or self.n_estimators)
        self.stop_score = self._stop_score(self.booster, stop_part, label) if stop_part.height else None
        if self.refit_full and stop_part.height:
            rounds = max(1, round(self.best_iteration / (1.0 - self.early_stopping_fraction)))
            self.booster = lgb.train(self.params, self._dataset(frame, label), num_boost_round=rounds)
            self.best_iteration = rounds
        return self

    def _fit_bags(self, frame: pl.DataFrame, users: np.ndarray, rng: np.random.Generator, label: str):
        import lightgbm as lgb

        if len(users) < 2 * self.bags:
            raise InputError(
                f"ranker.bags={self.bags} needs at least {2 * self.bags} users with a target, got {len(users)}"
            )
        # One binning for every bag (bins from all rows), so the merged model has one feature map.
        # Each bag's rows are a subset of those binned rows (whole queries: folds are by user),
        # so no bag converts its rows to a float64 matrix again: at 10x the generated data that
        # was a ~0.6 GB matrix per bag, two bags at a time.
        everything = self._dataset(frame, label, keep_raw=False).construct()
        fold_of = dict(zip(rng.permutation(users).tolist(), np.arange(len(users)) % self.bags, strict=True))
        fold = frame[Columns.UserIdx].replace_strict(fold_of, return_dtype=pl.Int64).to_numpy()

        # Every LightGBM call on these threads names the same thread count (``num_threads`` 1,
        # early-stopping scores included, ``_stop_score``): LightGBM keeps one process-wide count
        # that each call sets, and a prediction that sized its per-thread buffers for one count
        # while another thread's booster set a different one read past them (a segfault in
        # lib_lightgbm.so, once in some hundreds of five-bag fits). The subsets of the one shared
        # Dataset are built one at a time (LightGBM does not document that as thread-safe, and it
        # costs little), with the bag's own parameters so that training changes none of them, and
        # each bag then trains on its own data only.
        building = threading.Lock()

        def fit_bag(k: int) -> tuple[str, float]:
            part = fold == k
            params = {**self.params, "seed": self.seed + k}
            with building:
                train = everything.subset(np.flatnonzero(~part).astype(np.int32), params=params).construct()
                stop = everything.subset(np.flatnonzero(part).astype(np.int32), params=params).construct()
            booster = lgb.train(
                params,
                train,
                num_boost_round=self.n_estimators,
                valid_sets=[stop],
                callbacks=[lgb.early_stopping(self.early_stopping_rounds, verbose=False)],
            )
            model = booster.model_to_string(num_iteration=booster.best_iteration or self.n_estimators)
            score = self._stop_score(booster, frame.filter(pl.Series(part)), label)
            booster.free_dataset()  # a finished bag's data is not kept while the others train
            return model, score

        with ThreadPoolExecutor(max_workers=min(self.n_jobs, self.bags)) as pool:
            models, scores = zip(*pool.map(fit_bag, range(self.bags)), strict=True)
        self.stop_score = float(np.mean(scores))
        self.booster = lgb.Booster(model_str=average_models(models))
        self.best_iteration = self.booster.num_trees()
        return self

    def _stop_score(self, booster, held: pl.DataFrame, label: str) -> float:
        """NDCG@``eval_at`` of the users held back for early stopping (a bag's own fold), at the
        chosen number of trees: the ranker's out-of-sample validation score among the candidates,
        what ``hparams_search=ranker`` maximises (averaged over the bags).

        Only the validation stage's queries count. An earlier labelled stage's target is an event
        the text tower was fine-tuned on, so its text score there is better than the tower can do
        on events it never saw; those queries still stop the trees, but a score that a sweep
        picks settings by reads only held-out events."""
        if Columns.Stage in held.columns:
            held = held.filter(pl.col(Columns.Stage) == 0)
        if held.height == 0:  # every held-back user has its target in an earlier stage only
            return float("nan")
        scores = booster.predict(
            self.matrix(held),
            num_iteration=booster.best_iteration or None,
            raw_score=True,
            num_threads=self.params["num_threads"],  # the bags' threads must agree (_fit_bags)
        )
        return ndcg_at(held, scores, label, self.params["eval_at"][0])

    def _dataset(self, df: pl.DataFrame, label: str, reference=None, keep_raw: bool = True):
        import lightgbm as lgb

        groups = df.group_by(query_keys(df), maintain_order=True).len()["len"].to_numpy()
        return lgb.Dataset(
            df.select(self.features).to_numpy(),
            label=df[label].to_numpy(),
            group=groups,
            feature_name=self.features,
            reference=reference,
            free_raw_data=not keep_raw,
        )

    def matrix(self, frame: pl.DataFrame) -> np.ndarray:
        """The ranker's input: ``features`` of ``frame`` as float64, nulls as NaN."""
        return frame.select(self.features).to_numpy()

    def predict_matrix(self, x: np.ndarray, booster: lgb.Booster | None = None) -> np.ndarray:
        """The trees' raw score (for ``binary`` the log-odds, not the probability): the score that
        TreeSHAP's contributions add up to. ``booster``: a copy of this one (one per thread)."""
        booster = self.booster if booster is None else booster
        return booster.predict(x, num_iteration=self.best_iteration, raw_score=True).astype(np.float32)

    def predict(self, frame: pl.DataFrame) -> np.ndarray:
        return self.predict_matrix(self.matrix(frame))

    def feature_importance(self) -> pl.DataFrame:
        gain = self.booster.feature_importance("gain", iteration=self.best_iteration)
        return pl.DataFrame({"feature": self.features, "gain": gain.astype(np.float64)}).sort(
            "gain", "feature", descending=[True, False]
        )


def ndcg_at(frame: pl.DataFrame, scores: np.ndarray, label: str, k: int) -> float:
    """Mean NDCG@``k`` over ``frame``'s queries (``query_keys``, each with a positive label)
    ordered by ``scores``, binary relevance, ties in row order (as LightGBM's own metric, which
    this reproduces), by the evaluation's ``metrics_from_hits``."""
    from recsys.evaluation.metrics import metrics_from_hits

    keys = query_keys(frame)
    per_query = (
        frame.select(*keys, (pl.col(label) > 0).alias("_rel"))
        .with_columns(pl.Series("_score", scores, dtype=pl.Float64), pl.int_range(pl.len()).alias("_row"))
        .sort("_score", "_row", descending=[True, False])
        .group_by(keys, maintain_order=True)
        .agg(pl.col("_rel").head(k).alias("top"), pl.col("_rel").sum().alias("n_rel"))
    )
    lengths = per_query["top"].list.len().to_numpy().astype(np.int64)
    hits = np.zeros((per_query.height, k), dtype=bool)
    rows = np.repeat(np.arange(per_query.height), lengths)
    cols = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    hits[rows, cols] = per_query["top"].explode().to_numpy()
    return float(metrics_from_hits(hits, per_query["n_rel"].to_numpy(), [k])[f"ndcg_at_{k}"].mean())


def query_keys(frame: pl.DataFrame) -> list[str]:
    """The columns that make one ranking problem: the user, and the labelled stage if present."""
    return [Columns.UserIdx, Columns.Stage] if Columns.Stage in frame.columns else [Columns.UserIdx]


def average_models(models: Sequence[str]) -> str:
    """One LightGBM model string whose prediction is the mean of ``models`` (same features).

    A GBDT predicts the sum of its trees' leaf values, so the trees of all models with every leaf
    value (and internal node value, which TreeSHAP reads as the node's expectation) divided by
    their number predict the mean, and explain it exactly. ``tree_sizes`` is dropped: LightGBM
    then reads the trees one after another instead of by byte offsets.
    """
    scale = 1.0 / len(models)
    header, trees, tail = None, [], None
    for text in models:
        head, _, rest = text.partition("\nTree=")
        body, _, end = ("Tree=" + rest).partition("end of trees")
        if header is None:
            header = "\n".join(x for x in head.split("\n") if not x.startswith("tree_sizes="))
            tail = "end of trees" + end
        for block in body.split("Tree=")[1:]:
            lines = block.rstrip("\n").split("\n")[1:]  # drop the old tree number
            for i, line in enumerate(lines):
                key, _, values = line.partition("=")
                if key in ("leaf_value", "internal_value"):
                    lines[i] = key + "=" + " ".join(repr(float(v) * scale) for v in values.split())
            trees.append(lines)
    blocks = [f"Tree={i}\n" + "\n".join(lines) + "\n\n\n" for i, lines in enumerate(trees)]
    return header + "\n\n" + "".join(blocks) + tail
