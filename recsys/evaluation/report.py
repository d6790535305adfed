"""The offline evaluation report of one run, computed from its evaluation bundle.

Sections: headline (fused vs the best single component and vs popularity, paired bootstrap
CIs), accuracy at every K, impression metrics (where the data has impressions), beyond accuracy,
ablation, segments, ranker insight, protocol card, score distributions. ``Reporter.write``
produces ``report.html`` (self-contained), ``report.md`` (+ ``plots/*.png``) and ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.atomic import write_atomic, write_text_atomic
from recsys.errors import ConfigError
from recsys.evaluation import plots
from recsys.evaluation.beyond import beyond_accuracy
from recsys.evaluation.bootstrap import Interval, PairedBootstrap
from recsys.evaluation.bundle import Bundle, Protocol
from recsys.evaluation.impressions import impression_metrics, summarize
from recsys.evaluation.metrics import curves, hits_matrix, metrics_from_hits, relevance_matrix
from recsys.evaluation.render import Document, Figure, Section, Table, Text, figures, to_html, to_markdown
from recsys.evaluation.segments import build_segments

log = logging.getLogger(__name__)

FUSED = "fused"
ORDER = (
    "popularity",
    "recent_popularity",
    "als",
    "bpr",
    "itemknn",
    "itemknn_recent",
    "itemknn_next",
    "ease",
    "sasrec",
    "text_zeroshot",
    "text",
    "text_zeroshot_nearest",
    "text_nearest",
    FUSED,
)
# The candidates for "best single component": every model but fused and the text features that
# only rework a tower's scores (the zero-shot tower is the fine-tuning's baseline).
COMPONENTS = tuple(m for m in ORDER if m not in {"text_zeroshot", "text_zeroshot_nearest", "text_nearest", FUSED})
DISPLAY = {
    "popularity": "popularity",
    "recent_popularity": "recent popularity",
    "als": "ALS",
    "bpr": "BPR",
    "itemknn": "item-kNN",
    "itemknn_recent": "item-kNN (recent)",
    "itemknn_next": "item-kNN (next)",
    "ease": "EASE",
    "sasrec": "SASRec",
    "text_zeroshot": "text (zero-shot)",
    "text": "text",
    "text_zeroshot_nearest": "text (zero-shot, nearest item)",
    "text_nearest": "text (nearest item)",
    FUSED: "fused",
}
METRICS = ("recall", "ndcg", "mrr", "hitrate", "precision", "map")
METRIC_LABEL = {
    "recall": "Recall",
    "ndcg": "NDCG",
    "mrr": "MRR",
    "hitrate": "HitRate",
    "precision": "Precision",
    "map": "MAP",
}
BEYOND = {
    "coverage": "catalogue coverage",
    "novelty": "novelty (bits)",
    "diversity": "intra-list diversity",
    "popularity_percentile": "popularity percentile",
    "gini": "Gini of exposure",
}


def label(metric: str) -> str:
    """``ndcg_at_10`` -> ``NDCG@10``."""
    name, _, k = metric.partition("_at_")
    return f"{METRIC_LABEL.get(name, name)}@{k}" if k else METRIC_LABEL.get(name, name)


def display(model: str) -> str:
    return DISPLAY.get(model, model)


def ordered(models: Sequence[str]) -> list[str]:
    known = [m for m in ORDER if m in models]
    return known + sorted(m for m in models if m not in ORDER)


def verdict(a: str, b: str, metric: str, ci: Interval) -> str:
    """One line a reader can quote: who wins, by how much, and how sure we are."""
    what = str(ci)
    if ci.low > 0:
        return f"{display(a)} beats {display(b)} on {label(metric)} by {what}"
    if ci.high < 0:
        return f"{display(a)} loses to {display(b)} on {label(metric)} by {what}"
    return f"{display(a)} and {display(b)} do not differ significantly on {label(metric)}: {what}"


@dataclass
class Evaluation:
    """Per-user metrics of every model of one bundle (rows in ``bundle.user_index`` order);
    ``scores``: each list's first ``beyond_k`` scores."""

    bundle: Bundle
    relevant: list[np.ndarray]
    n_relevant: np.ndarray
    lists: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    hits: dict[str, np.ndarray]
    per_user: dict[str, dict[str, np.ndarray]]
    curves: dict[str, dict[str, np.ndarray]]

    @property
    def models(self) -> list[str]:
        return ordered(list(self.per_user))

    def mean(self, model: str, metric: str) -> float:
        return float(self.per_user[model][metric].mean())


class Reporter:
    """Builds and writes the report of a run (or the comparison of two).

    Args:
        ks: cut-offs of the accuracy tables.
        headline_metric: the metric of the verdict lines, ablation and segments (e.g. ``ndcg_at_10``).
        beyond_k: list length for coverage, novelty, diversity and popularity bias.
        n_bootstrap: paired bootstrap resamples of the users for every interval.
        seed: seed of the resamples (same seed, same bundle -> same report numbers).
    """

    def __init__(
        self,
        ks: Sequence[int] = (5, 10, 20, 50),
        headline_metric: str = "ndcg_at_10",
        beyond_k: int = 10,
        n_bootstrap: int = 1000,
        seed: int = 0,
    ) -> None:
        self.ks = sorted({int(k) for k in ks})
        if not self.ks or self.ks[0] < 1:
            raise ConfigError(f"reporter.ks must be positive cut-offs, got {list(ks)}")
        known = {f"{m}_at_{k}" for m in METRICS for k in self.ks}
        if headline_metric not in known:
            raise ConfigError(
                f"reporter.headline_metric '{headline_metric}' is not one of the reported metrics "
                f"(metric_at_K with metric in {list(METRICS)} and K in {self.ks})"
            )
        if n_bootstrap < 1:
            raise ConfigError(f"reporter.n_bootstrap must be at least 1, got {n_bootstrap}")
        self.headline_metric = headline_metric
        self.headline_k = int(headline_metric.rsplit("_", 1)[1])
        self.beyond_k = int(beyond_k)
        self.n_bootstrap = int(n_bootstrap)
        self.seed = int(seed)

    # --- numbers ----------------------------------------------------------------------------

    def evaluate(self, bundle: Bundle) -> Evaluation:
        p = bundle.protocol
        longest = max(self.ks[-1], self.beyond_k)
        if longest > p.max_k:
            raise ConfigError(
                f"run {p.run_id}: its lists hold {p.max_k} items, the report asks for K={longest} "
                "(lower reporter.ks / reporter.beyond_k, or retrain with a larger eval.max_k)"
            )
        relevant = bundle.relevant_items()
        matrix = relevance_matrix(bundle.targets, bundle.user_index, p.n_items)
        n_rel = np.diff(matrix.indptr)
        ev = Evaluation(bundle, relevant, n_rel, {}, {}, {}, {}, {})
        for model in ordered(bundle.models):
            items, scores = bundle.lists(model)
            hits = hits_matrix(items, matrix)
            # Only the score plot reads scores, at beyond_k: 12 MB a model at 300,000 users, not 120.
            ev.lists[model], ev.scores[model], ev.hits[model] = items, scores[:, : self.beyond_k].copy(), hits
            ev.per_user[model] = metrics_from_hits(hits, n_rel, self.ks)
            ev.curves[model] = curves(hits, n_rel)
        return ev

    def bootstrap(self, n: int) -> PairedBootstrap:
        return PairedBootstrap(n, self.n_bootstrap, self.seed)

    def metric_names(self) -> list[str]:
        return [f"{m}_at_{k}" for k in self.ks for m in METRICS]

    def intervals(self, ev: Evaluation, a: str, b: str, boot: PairedBootstrap) -> dict[str, Interval]:
        names = self.metric_names()
        mat_a = np.column_stack([ev.per_user[a][n] for n in names])
        mat_b = np.column_stack([ev.per_user[b][n] for n in names])
        return dict(zip(names, boot.intervals(mat_a, mat_b)))

    def best_component(self, ev: Evaluation) -> str | None:
        present = [m for m in COMPONENTS if m in ev.per_user]
        if not present:
            return None
        return max(present, key=lambda m: (ev.mean(m, self.headline_metric), -COMPONENTS.index(m)))

    # --- the document ------------------------------------------------------------------------

    def document(self, bundle: Bundle) -> tuple[Document, dict[str, Any]]:
        """The report and its numbers (``metrics.json``)."""
        ev = self.evaluate(bundle)
        p = bundle.protocol
        boot = self.bootstrap(len(ev.n_relevant))
        numbers: dict[str, Any] = {
            "protocol": asdict(p),
            "report": {
                "ks": self.ks,
                "headline_metric": self.headline_metric,
                "beyond_k": self.beyond_k,
                "n_bootstrap": self.n_bootstrap,
                "seed": self.seed,
            },
            "models": {m: {n: ev.mean(m, n) for n in self.metric_names()} for m in ev.models},
        }
        sections = [
            self._headline(ev, boot, numbers),
            self._accuracy(ev),
            self._impressions(bundle, numbers),
            self._beyond(ev, numbers),
            self._ablation(ev, boot, numbers),
            self._segments(ev, numbers),
            self._finetuning(ev, bundle, boot, numbers),
            self._ranker(bundle, numbers),
            self._protocol(bundle),
            self._scores(ev),
        ]
        doc = Document(
            title=f"Offline evaluation: {p.data_name} ({p.experiment})",
            subtitle=(
                f"run {p.run_id} · {p.n_test_users:,} test users{sampled(p)} · {p.candidates} · "
                f"seen items {'removed' if p.seen_filtering else 'kept'} · code {p.git_sha[:10]}"
                f"{' (uncommitted changes)' if p.git_dirty else ''}"
            ),
            sections=[x for x in sections if x is not None],
        )
        return doc, numbers

    def _headline(self, ev: Evaluation, boot: PairedBootstrap, numbers: dict[str, Any]) -> Section:
        s = Section("headline", "Headline")
        if FUSED not in ev.per_user:
            s.blocks.append(Text("This run has no fused model: no headline comparison."))
            return s
        best = self.best_component(ev)
        # Besides the best component, the simple baselines: recent popularity is the strongest of
        # them on timestamped data.
        baselines = [best, "recent_popularity", "popularity"]
        rivals = [m for m in dict.fromkeys(baselines) if m is not None and m in ev.per_user]
        cis = {r: self.intervals(ev, FUSED, r, boot) for r in rivals}
        numbers["headline"] = {
            "best_component": best,
            "comparisons": {r: {n: asdict(ci) for n, ci in c.items()} for r, c in cis.items()},
            "verdicts": [verdict(FUSED, r, self.headline_metric, cis[r][self.headline_metric]) for r in rivals],
        }
        for line in numbers["headline"]["verdicts"]:
            s.blocks.append(Text(line, emphasis=True))
        s.blocks.append(
            Text(
                f"Best single component by {label(self.headline_metric)}: {display(best)}. Differences are "
                f"fused minus the other model, averaged over the {len(ev.n_relevant):,} test users; intervals "
                f"are 95 % paired bootstrap intervals ({self.n_bootstrap} resamples of the users, seed {self.seed})."
            )
        )
        cols = ["metric", "fused"]
        for r in rivals:
            cols += [display(r), f"Δ vs {display(r)}", "95% CI"]
        rows = []
        for n in self.metric_names():
            row: list[Any] = [label(n), ev.mean(FUSED, n)]
            for r in rivals:
                ci = cis[r][n]
                row += [ev.mean(r, n), f"{ci.mean:+.4f}", f"{ci.low:+.4f}..{ci.high:+.4f}"]
            rows.append(row)
        s.blocks.append(Table(cols, rows, "Fused vs the best single component and the popularity baselines"))
        return s

    def _accuracy(self, ev: Evaluation) -> Section:
        s = Section("accuracy", "Accuracy at K")
        s.blocks.append(
            Text(
                "Binary relevance against the held-out test events; full-catalogue rankings. MRR@K counts the "
                "first hit within the top K; MAP@K divides by min(#relevant, K)."
            )
        )
        for k in self.ks:
            cols = ["model", *[METRIC_LABEL[m] + f"@{k}" for m in METRICS]]
            rows = [[display(m), *[ev.mean(m, f"{x}_at_{k}") for x in METRICS]] for m in ev.models]
            s.blocks.append(Table(cols, rows, f"K = {k}"))
        s.blocks.append(
            Figure(
                "curves",
                plots.metric_curves(ev.curves, self.ks, max_k=min(self.ks[-1], ev.bundle.protocol.max_k)),
                "NDCG@K and Recall@K for K = 1..max(ks), one line per model (dotted: the K of the tables)",
            )
        )
        return s

    def _impressions(self, bundle: Bundle, numbers: dict[str, Any]) -> Section:
        s = Section("impressions", "Impression metrics")
        scores = bundle.impression_scores
        if scores is None or scores.height == 0:
            s.blocks.append(
                Text(
                    "Omitted: this run's data has no impressions (lists of items shown, clicked or not). "
                    "AUC, MRR and nDCG@5/10 per impression (the MIND protocol) are reported for data that has them."
                )
            )
            return s
        s.blocks.append(
            Text(
                "Per impression of the test users (shown at or after their first held-out event; candidates already "
                "in their history dropped), every model scores the candidates shown; AUC, MRR and nDCG@5/10 per "
                "impression, averaged over the impressions where each is defined: MRR and nDCG over those with a "
                "click, AUC over those with a click and a non-click."
            )
        )
        present = ordered(scores["model"].unique().to_list())
        table: dict[str, dict[str, float]] = {}
        for m in present:
            per = impression_metrics(scores.filter(pl.col("model") == m), ks=(5, 10))
            table[m] = summarize(per)
        numbers["impressions"] = table
        # The impressions without a click count in none of the means: the clicked count is
        # what MRR and nDCG are averaged over.
        cols = ["model", "AUC", "MRR", "nDCG@5", "nDCG@10", "impressions", "with a click", "with AUC"]
        rows = [
            [
                display(m),
                t["auc"],
                t["mrr"],
                t["ndcg_at_5"],
                t["ndcg_at_10"],
                t["n_impressions"],
                t["n_impressions_clicked"],
                t["n_impressions_auc"],
            ]
            for m, t in table.items()
        ]
        s.blocks.append(Table(cols, rows))
        return s

    def _beyond(self, ev: Evaluation, numbers: dict[str, Any]) -> Section:
        k = self.beyond_k
        s = Section("beyond", f"Beyond accuracy (top {k})")
        emb = ev.bundle.item_embeddings
        counts = ev.bundle.items["train_count"].to_numpy()
        values = {m: beyond_accuracy(ev.lists[m][:, :k], counts, emb) for m in ev.models}
        numbers["beyond"] = {"k": k, **values}
        s.blocks.append(
            Text(
                "Coverage: share of the catalogue recommended to anyone. Novelty: mean -log2 of the item's "
                "(smoothed) share of training events. Diversity: 1 - mean cosine between the text-tower "
                "embeddings of the items of a list. Popularity percentile: mean training-popularity percentile "
                "of recommended items (50 = median item). Gini: inequality of exposure over the catalogue."
                + ("" if emb is not None else " This run saved no item embeddings: diversity is not available.")
            )
        )
        rows = [[display(m), *[values[m][key] for key in BEYOND]] for m in ev.models]
        s.blocks.append(Table(["model", *BEYOND.values()], rows))
        return s

    def _ablation(self, ev: Evaluation, boot: PairedBootstrap, numbers: dict[str, Any]) -> Section:
        k, h = self.headline_k, self.headline_metric
        s = Section("ablation", "Ablation")
        s.blocks.append(
            Text(
                f"Every model of this run at K = {k}; the last columns: each model minus fused on {label(h)} with "
                "its paired 95 % interval. The same table for other runs and data sets is in their reports."
            )
        )
        rows, table = [], {}
        for m in ev.models:
            ci = boot.interval(ev.per_user[m][h], ev.per_user[FUSED][h]) if FUSED in ev.per_user else None
            means = [ev.mean(m, f"{x}_at_{k}") for x in METRICS]
            rows.append(
                [display(m), *means, "–" if ci is None or m == FUSED else f"{ci.mean:+.4f}",
                 "–" if ci is None or m == FUSED else f"{ci.low:+.4f}..{ci.high:+.4f}"]
            )  # fmt: skip
            table[m] = {"means": dict(zip(METRICS, means)), "vs_fused": None if ci is None else asdict(ci)}
        numbers["ablation"] = table
        cols = ["model", *[f"{METRIC_LABEL[x]}@{k}" for x in METRICS], f"Δ {label(h)} vs fused", "95% CI"]
        s.blocks.append(Table(cols, rows))
        return s

    def _segments(self, ev: Evaluation, numbers: dict[str, Any]) -> Section:
        h = self.headline_metric
        s = Section("segments", "Segments")
        s.blocks.append(
            Text(
                "User segments (history length = events before the test stage) split the test users. Item "
                "segments split the catalogue, and so the test events: a segment scores each user who has a "
                "target in it, counting only those targets as relevant. Cold = the item had no event in the "
                "history the test stage's models learnt from (train + validation). Popularity deciles are over "
                "the warm items, ties sharing a decile. "
                f"Δ = fused minus ALS on {label(h)}, paired 95 % bootstrap interval within the segment."
            )
        )
        models = ev.models
        out, panels = [], {}
        for kind, segment_rows in self._segment_values(ev, models).items():
            rows = []
            for sg, n_events, vals in segment_rows:
                ci = None
                if FUSED in vals and "als" in vals:
                    ci = PairedBootstrap(int(sg.users.sum()), self.n_bootstrap, self.seed).interval(
                        vals[FUSED], vals["als"]
                    )
                means = {m: float(v.mean()) for m, v in vals.items()}
                rows.append(
                    [sg.label, int(sg.users.sum()), n_events, sg.n_items if sg.n_items is not None else "–",
                     *[means[m] for m in models],
                     "–" if ci is None else f"{ci.mean:+.4f}", "–" if ci is None else f"{ci.low:+.4f}..{ci.high:+.4f}"]
                )  # fmt: skip
                out.append(
                    {
                        "kind": kind,
                        "segment": sg.label,
                        "users": int(sg.users.sum()),
                        "target_events": n_events,
                        "items": sg.n_items,
                        h: means,
                        "fused_minus_als": None if ci is None else asdict(ci),
                    }
                )
                panels.setdefault(kind, []).append((sg.label, means, int(sg.users.sum())))
            cols = [
                "segment",
                "users",
                "target events",
                "items",
                *[display(m) for m in models],
                "Δ fused−ALS",
                "95% CI",
            ]
            s.blocks.append(Table(cols, rows, f"{kind}: {label(h)}"))
        numbers["segments"] = out
        # The bars the headline talks about: popularity, ALS, the best single component, text, fused.
        best = self.best_component(ev)
        shown = [m for m in dict.fromkeys(("popularity", "als", best, "text", FUSED)) if m in models]
        fig_panels = [
            (kind, [x[0] for x in v], {m: [x[1][m] for x in v] for m in shown}, [x[2] for x in v])
            for kind, v in panels.items()
        ]
        s.blocks.append(
            Figure("segments", plots.segment_bars(fig_panels, label(h)), f"{label(h)} per segment (n = users)")
        )
        return s

    def _segment_values(self, ev: Evaluation, models: Sequence[str]) -> dict[str, list[tuple[Any, int, dict]]]:
        """Per segment kind: (segment, its target events, per-user headline metric of each model)."""
        h, k = self.headline_metric, self.headline_k
        b = ev.bundle
        segs = build_segments(b.users["history_length"].to_numpy(), b.items["train_count"].to_numpy(), ev.relevant)
        out: dict[str, list[tuple[Any, int, dict]]] = {}
        for sg in segs:
            if sg.item_mask is None:
                n_rel = ev.n_relevant[sg.users]
            else:
                n_rel = np.array([int(sg.item_mask[r].sum()) for r, u in zip(ev.relevant, sg.users) if u])
            vals = {}
            for m in models:
                hits = ev.hits[m][sg.users]
                if sg.item_mask is not None:
                    items = ev.lists[m][sg.users]
                    hits = hits & sg.item_mask[np.where(items >= 0, items, 0)] & (items >= 0)
                vals[m] = metrics_from_hits(hits, n_rel, [k])[h]
            out.setdefault(sg.kind, []).append((sg, int(n_rel.sum()), vals))
        return out

    def _finetuning(
        self, ev: Evaluation, bundle: Bundle, boot: PairedBootstrap, numbers: dict[str, Any]
    ) -> Section | None:
        """The fine-tuned text tower against its zero-shot start, on every segment."""
        if not {"text", "text_zeroshot"} <= set(ev.per_user):
            return None
        h = self.headline_metric
        s = Section("finetuning", "Fine-tuning: the text tower against its zero-shot start")
        ft = bundle.finetuning or {}
        if ft:
            # text.budget_minutes=null (a run of fixed length) has no time budget: said so, not
            # printed as "budget: None min".
            limit = ft.get("budget_minutes")
            budget = "no time budget" if limit is None else f"budget: {limit} min"
            s.blocks.append(
                Text(
                    f"Fine-tuning took {ft.get('text/minutes', float('nan')):.1f} min and "
                    f"{int(ft.get('text/steps', 0)):,} steps ({budget}"
                    + (
                        f" for training, which took {ft['text/train_minutes']:.1f}; the zero-shot validation, the "
                        f"BERT's catalogue pass included, {ft['text/zeroshot_minutes']:.1f}"
                        if "text/train_minutes" in ft and "text/zeroshot_minutes" in ft
                        else ""
                    )
                    + ")"
                    + _budget_note(ft)
                    + ". Validation "
                    f"NDCG@10: zero-shot {ft.get('text/val_ndcg_at_10_zeroshot', float('nan')):.4f}, fine-tuned "
                    f"{ft.get('text/val_ndcg_at_10_finetuned', float('nan')):.4f}"
                    + (
                        " — no fine-tuned epoch beat the zero-shot weights, which were kept."
                        if ft.get("text/kept_zeroshot")
                        else _interpolation_note(ft.get("text/interpolation"))
                    )
                )
            )
        s.blocks.append(
            Text(
                f"Δ = fine-tuned minus zero-shot on {label(h)}, paired 95 % bootstrap interval over the users of "
                "each segment (the same test users and targets for both towers)."
            )
        )
        # ``boot``: the report's resamples of every test user (the same as a new one would draw, at
        # no second [n_bootstrap, users] weight matrix).
        overall = boot.interval(ev.per_user["text"][h], ev.per_user["text_zeroshot"][h])
        rows = [["all test users", len(ev.n_relevant), ev.mean("text_zeroshot", h), ev.mean("text", h),
                 f"{overall.mean:+.4f}", f"{overall.low:+.4f}..{overall.high:+.4f}"]]  # fmt: skip
        out = [{"kind": "all", "segment": "all test users", "users": len(ev.n_relevant), "ci": asdict(overall)}]
        for kind, segment_rows in self._segment_values(ev, ["text_zeroshot", "text"]).items():
            for sg, _, vals in segment_rows:
                n = int(sg.users.sum())
                ci = PairedBootstrap(n, self.n_bootstrap, self.seed).interval(vals["text"], vals["text_zeroshot"])
                rows.append([f"{kind}: {sg.label}", n, float(vals["text_zeroshot"].mean()), float(vals["text"].mean()),
                             f"{ci.mean:+.4f}", f"{ci.low:+.4f}..{ci.high:+.4f}"])  # fmt: skip
                out.append({"kind": kind, "segment": sg.label, "users": n, "ci": asdict(ci)})
        cols = ["segment", "users", "zero-shot", "fine-tuned", "Δ", "95% CI"]
        s.blocks.append(Table(cols, rows, f"{label(h)}: zero-shot vs fine-tuned text tower"))
        numbers["finetuning"] = {"training": {k: v for k, v in ft.items() if k != "curve"}, "segments": out}
        curve = ft.get("curve") or []
        if len(curve) > 1:
            steps, values, tail = (list(x) for x in zip(*curve))
            s.blocks.append(
                Figure(
                    "finetuning_curve",
                    plots.validation_curve(steps, values, tail),
                    "Validation NDCG@10 by training step, all targets and the long tail",
                )
            )
        return s

    def _ranker(self, bundle: Bundle, numbers: dict[str, Any]) -> Section:
        s = Section("ranker", "Ranker insight")
        imp = bundle.feature_importance
        if imp is None or imp.height == 0:
            s.blocks.append(Text("This run saved no feature importances."))
            return s
        imp = imp.sort("gain", "feature", descending=[True, False])
        total = float(imp["gain"].sum()) or 1.0
        share = (imp["gain"] / total).to_list()
        numbers["feature_importance"] = [
            {"feature": f, "gain": g, "share": sh} for f, g, sh in zip(imp["feature"], imp["gain"], share)
        ]
        s.blocks.append(
            Text("Total split gain per feature of the fused LambdaMART ranker (up to its early-stopped iteration).")
        )
        s.blocks.append(
            Figure("feature_importance", plots.feature_importance(imp["feature"].to_list(), share), "Gain share")
        )
        rows = [[f, f"{g:,.1f}", f"{sh * 100:.1f} %"] for f, g, sh in zip(imp["feature"], imp["gain"], share)]
        s.blocks.append(Table(["feature", "gain", "share"], rows))
        return s

    def _protocol(self, bundle: Bundle) -> Section:
        s = Section("protocol", "Protocol card")
        s.blocks.append(Text("Two reports are comparable when the rows marked * agree (compare mode checks them)."))
        s.blocks.append(Table(["field", "value"], protocol_rows(bundle)))
        return s

    def _scores(self, ev: Evaluation) -> Section:
        k = self.beyond_k
        s = Section("scores", "Score distributions")
        data = {}
        for m in ev.models:
            sc, hit = ev.scores[m][:, :k], ev.hits[m][:, :k]
            valid = ev.lists[m][:, :k] >= 0
            data[m] = (sc[hit & valid].astype(np.float64), sc[~hit & valid].astype(np.float64))
        s.blocks.append(
            Text(
                "Scores are on each model's own scale (popularity: counts; CF and text: dot products; fused: "
                "ranker output). A model whose hits sit at the top of its score range is well calibrated for ranking."
            )
        )
        s.blocks.append(Figure("scores", plots.score_distributions(data, k), f"Scores of the top-{k} items"))
        return s

    # --- files -------------------------------------------------------------------------------

    def write(self, bundle: Bundle, folder: str | Path) -> list[Path]:
        """``report.html``, ``report.md``, ``plots/*.png`` and ``metrics.json`` in ``folder``."""
        doc, numbers = self.document(bundle)
        return write_document(doc, numbers, folder)


def sampled(p: Protocol) -> str:
    """The subtitle's note on an evaluation of a sample of the test users (``eval.max_users``)."""
    if not p.test_users_sampled_from:
        return ""
    return f" (a seeded random sample of the {p.test_users_sampled_from:,}, drawn without looking at outcomes)"


def protocol_rows(bundle: Bundle) -> list[list[Any]]:
    from recsys.evaluation.bundle import MUST_MATCH

    d = asdict(bundle.protocol)
    return [[f"{k} *" if k in MUST_MATCH else k, _value(v)] for k, v in sorted(d.items())]


def _value(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items()) or "–"
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    return str(v)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        return _json_safe(x.item())
    return x


def write_document(doc: Document, numbers: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write the HTML, markdown, PNGs and JSON of ``doc`` atomically; returns the files."""
    folder = Path(folder)
    out = []
    for fig in figures(doc):
        out.append(write_atomic(folder / "plots" / f"{fig.name}.png", lambda tmp, b=fig.png: tmp.write_bytes(b)))
    out.append(write_text_atomic(to_markdown(doc, "plots"), folder / "report.md"))
    out.append(write_text_atomic(json.dumps(_json_safe(numbers), indent=2, sort_keys=True), folder / "metrics.json"))
    out.append(write_text_atomic(to_html(doc), folder / "report.html"))
    return out


def _budget_note(ft: Mapping[str, Any]) -> str:
    """What ended a fine-tuning that its time budget cut short of its planned steps: the steps
    then follow the machine's speed and load, which the reader of a figure should know."""
    if not ft.get("text/budget_ended"):
        return ""
    planned = ft.get("text/planned_steps")
    of = f" at step {int(ft.get('text/steps', 0)):,} of the {int(planned):,} planned" if planned is not None else ""
    return (
        f"; the time budget ended it{of}, so the steps follow the machine's speed and load "
        "(text.budget_minutes=null repeats on any machine)"
    )


def _interpolation_note(alpha: float | None) -> str:
    """The end of the fine-tuning sentence: where between the zero-shot start and the trained
    weights the kept ones lie (``text.module.interpolation``), when not at the trained ones."""
    if alpha is None or alpha == 1.0:
        return "."
    return f" (weights {alpha:g} of the way from the zero-shot start to the trained ones: text.module.interpolation)."
