"""The report's figures (matplotlib, Agg backend), each returned as PNG bytes.

Sized to be read at 100 % zoom in a browser: 10-11 inches wide at 100 dpi, 11-12 pt text.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

# One colour per model, the same in every figure of every report.
MODEL_COLOURS = {
    "popularity": "#4d4d4d",
    "recent_popularity": "#8c8c8c",
    "als": "#1f77b4",
    "bpr": "#17becf",
    "itemknn": "#9467bd",
    "itemknn_recent": "#c5b0d5",
    "itemknn_next": "#e377c2",
    "text_zeroshot": "#bcbd22",
    "text": "#2ca02c",
    "fused": "#d62728",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede the pyplot import
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def colour(model: str) -> str:
    return MODEL_COLOURS.get(model, "#8c564b")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def metric_curves(curves: Mapping[str, Mapping[str, np.ndarray]], ks: Sequence[int], max_k: int = 50) -> bytes:
    """NDCG@K and Recall@K against K (1..max_k), one line per model; the report's ks marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, title in zip(axes, ("ndcg", "recall"), ("NDCG@K", "Recall@K")):
        for name, c in curves.items():
            # "model · B" (comparisons): the model's colour, dashed for the second run.
            model, _, run = name.partition(" · ")
            k = c["k"][:max_k]
            ax.plot(
                k,
                c[metric][:max_k],
                label=name,
                color=colour(model),
                lw=2.4 if model == "fused" else 1.6,
                ls="--" if run == "B" else "-",
            )
        for k in ks:
            ax.axvline(k, color="black", lw=0.6, ls=":")
        ax.set_xlabel("K (list length)")
        ax.set_title(title)
        ax.set_xlim(1, max_k)
        ax.set_ylim(bottom=0)
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=10, frameon=False)
    return _png(fig)


def validation_curve(steps: Sequence[int], values: Sequence[float], tail: Sequence[float]) -> bytes:
    """The text tower's validation NDCG@10 against its training step (step 0: zero-shot), for all
    targets and for the long tail (targets among the least popular items holding half of the
    training targets)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.plot(steps, values, marker="o", color=colour("text"), lw=1.8, label="fine-tuned, all targets")
    ax.plot(steps, tail, marker="s", color=colour("text"), lw=1.2, ls=":", label="fine-tuned, long tail")
    ax.axhline(values[0], color=colour("text_zeroshot"), lw=1.2, ls="--", label="zero-shot (step 0)")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation NDCG@10")
    ax.legend(loc="lower right", frameon=False)
    return _png(fig)


def segment_bars(
    panels: Sequence[tuple[str, list[str], Mapping[str, list[float]], list[int]]], metric_label: str
) -> bytes:
    """One row per segment kind: grouped bars of ``metric_label`` per model, sizes under the labels.

    ``panels``: ``(title, segment labels, {model: values}, users per segment)``. One panel per row
    so that ten deciles' labels and sizes never collide.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.1 * len(panels)), squeeze=False)
    for ax, (title, labels, values, sizes) in zip(axes[:, 0], panels):
        x = np.arange(len(labels))
        n = max(len(values), 1)
        w = 0.8 / n
        for j, (model, v) in enumerate(values.items()):
            ax.bar(x + (j - (n - 1) / 2) * w, v, w, label=model, color=colour(model))
        ax.set_xticks(x, [f"{lb}\nn={s:,}" for lb, s in zip(labels, sizes)], fontsize=10)
        pad = max(4 - len(labels), 0) / 2  # a two-segment panel keeps bars of normal width, centred
        ax.set_xlim(-0.6 - pad, len(labels) - 0.4 + pad)
        ax.set_title(f"by {title}")
        ax.set_ylabel(metric_label)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.1 * len(panels))))
    fig.legend(handles, names, loc="upper center", ncol=len(names), fontsize=10, frameon=False)
    return _png(fig)


def score_distributions(scores: Mapping[str, tuple[np.ndarray, np.ndarray]], k: int) -> bytes:
    """Per model, histograms of the scores of its top-``k`` items: hits vs the other items."""
    plt = _pyplot()
    models = list(scores)
    cols = min(4, len(models))
    rows = int(np.ceil(len(models) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.8 * rows), squeeze=False)
    for ax, model in zip(axes.ravel(), models):
        hit, miss = scores[model]
        finite = np.concatenate([hit, miss])
        finite = finite[np.isfinite(finite)]
        bins = np.histogram_bin_edges(finite, bins=30) if len(finite) else 10
        # stepfilled: one polygon per histogram instead of a rectangle per bin (faster to draw)
        ax.hist(
            miss[np.isfinite(miss)], bins=bins, density=True, histtype="stepfilled", color="#cfcfcf", label="not a hit"
        )
        # Hits as an outline over the filled misses: both shapes stay visible.
        ax.hist(hit[np.isfinite(hit)], bins=bins, density=True, histtype="step", lw=2, color=colour(model), label="hit")
        ax.set_title(f"{model} (hits: {len(hit)})")
        ax.set_yticks([])
    for ax in axes.ravel()[len(models) :]:
        ax.axis("off")
    axes[0][0].legend(fontsize=9)
    fig.suptitle(f"Scores of the top-{k} items (density)", y=1.0)
    fig.tight_layout()
    return _png(fig)


def feature_importance(features: Sequence[str], gain_share: Sequence[float], top: int = 20) -> bytes:
    """Horizontal bars of the ranker's gain share per feature, largest first."""
    plt = _pyplot()
    f, g = list(features)[:top][::-1], list(gain_share)[:top][::-1]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(f) + 1.2))
    ax.barh(f, np.asarray(g) * 100, color=colour("fused"))
    ax.set_xlabel("share of total gain (%)")
    ax.set_title(f"Fused ranker: feature importance (gain), top {len(f)}")
    return _png(fig)
