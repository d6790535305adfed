"""The fusion ranker: LightGBM LambdaMART with one query group per user."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from recsys.columns import Columns
from recsys.errors import InputError


class LambdaMARTRanker:
    """Learns to order each user's candidates so the held-out next item comes first.

    Trained on one stage's candidates with that stage's held-out targets as labels; a seeded
    ``early_stopping_fraction`` of those users is held back to choose the number of trees, so
    the trees are not picked on the rows they were fitted on. With ``refit_full`` the final model
    is then retrained on all users with that many trees (scaled by ``1 / (1 - fraction)`` for the
    larger data): one target per user makes labels scarce, and the held-back fifth is worth
    having (Amazon-Scientific: fused NDCG@10 0.1051 -> 0.1058 in the same setting).
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
        seed: int = 0,
    ) -> None:
        self.params = dict(
            objective="lambdarank",
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
        self.seed = seed

    def fit(self, frame: pl.DataFrame, features: Sequence[str], label: str = "label") -> LambdaMARTRanker:
        import lightgbm as lgb

        self.features = list(features)
        # Users whose target is not among the candidates teach nothing to a ranker.
        frame = frame.filter(pl.col(label).sum().over(Columns.UserIdx) > 0).sort(Columns.UserIdx, Columns.ItemIdx)
        if frame.height == 0:
            raise InputError(
                "no validation target is among the candidates: the ranker has nothing to learn "
                "(raise rank.n_candidates or check the split)"
            )
        users = frame[Columns.UserIdx].unique().sort().to_numpy()
        rng = np.random.default_rng(self.seed)
        held = rng.choice(users, int(len(users) * self.early_stopping_fraction), replace=False)
        is_held = frame[Columns.UserIdx].is_in(held.tolist())

        def dataset(df: pl.DataFrame, reference=None) -> lgb.Dataset:
            groups = df.group_by(Columns.UserIdx, maintain_order=True).len()["len"].to_numpy()
            return lgb.Dataset(
                df.select(self.features).to_numpy(),
                label=df[label].to_numpy(),
                group=groups,
                feature_name=self.features,
                reference=reference,
                free_raw_data=False,
            )

        train = dataset(frame.filter(~is_held))
        valid_sets, callbacks = [], []
        stop_part = frame.filter(is_held)
        if stop_part.height:
            valid_sets = [dataset(stop_part, reference=train)]
            callbacks = [lgb.early_stopping(self.early_stopping_rounds, verbose=False)]
        self.booster = lgb.train(
            self.params, train, num_boost_round=self.n_estimators, valid_sets=valid_sets, callbacks=callbacks
        )
        self.best_iteration = int(self.booster.best_iteration or self.n_estimators)
        if self.refit_full and stop_part.height:
            rounds = max(1, round(self.best_iteration / (1.0 - self.early_stopping_fraction)))
            self.booster = lgb.train(self.params, dataset(frame), num_boost_round=rounds)
            self.best_iteration = rounds
        return self

    def predict(self, frame: pl.DataFrame) -> np.ndarray:
        x = frame.select(self.features).to_numpy()
        return self.booster.predict(x, num_iteration=self.best_iteration).astype(np.float32)

    def feature_importance(self) -> pl.DataFrame:
        gain = self.booster.feature_importance("gain", iteration=self.best_iteration)
        return pl.DataFrame({"feature": self.features, "gain": gain.astype(np.float64)}).sort(
            "gain", "feature", descending=[True, False]
        )
