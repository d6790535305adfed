"""Two runs side by side: the same metrics, their paired differences and intervals.

Runs are compared user by user, so they must have been judged on the same question: the same
data, split, candidate set, filtering, list length and test events (``bundle.MUST_MATCH``). When
their protocol cards differ there, the comparison is refused with the differences listed.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from recsys.errors import InputError
from recsys.evaluation import plots
from recsys.evaluation.bundle import MUST_MATCH, Bundle
from recsys.evaluation.render import Document, Figure, Section, Table, Text
from recsys.evaluation.report import METRIC_LABEL, METRICS, Reporter, display, label, ordered, sampled, verdict


def check_comparable(a: Bundle, b: Bundle) -> None:
    """Raise ``InputError`` naming both runs and every protocol field that differs."""
    diff = a.protocol.mismatches(b.protocol)
    if diff:
        lines = "; ".join(f"{k}: {x!r} vs {y!r}" for k, (x, y) in diff.items())
        raise InputError(
            f"runs {a.protocol.run_id} and {b.protocol.run_id} cannot be compared: their protocol cards differ in "
            f"{sorted(diff)} ({lines}). Only runs evaluated on the same data, split, candidate set, filtering, "
            f"list length and test events are comparable (fields {list(MUST_MATCH)})."
        )
    if not np.array_equal(a.user_index, b.user_index):
        raise InputError(f"runs {a.protocol.run_id} and {b.protocol.run_id} evaluated different users")


def compare_document(reporter: Reporter, a: Bundle, b: Bundle) -> tuple[Document, dict[str, Any]]:
    """Run B against run A: ``B - A`` for every model both have, with paired 95 % intervals."""
    check_comparable(a, b)
    ev_a, ev_b = reporter.evaluate(a), reporter.evaluate(b)
    id_a, id_b = a.protocol.run_id, b.protocol.run_id
    models = ordered([m for m in ev_a.models if m in ev_b.per_user])
    boot = reporter.bootstrap(len(ev_a.n_relevant))
    h, k = reporter.headline_metric, reporter.headline_k
    names = [f"{x}_at_{kk}" for kk in reporter.ks for x in METRICS]
    numbers: dict[str, Any] = {"run_a": asdict(a.protocol), "run_b": asdict(b.protocol), "models": {}}
    head = Section("headline", "Headline")
    head.blocks.append(
        Text(
            # sampled(): runs of eval.max_users are judged on a sample (the same one: their
            # targets hash agrees), which the comparison says as the single-run report does.
            f"B = run {id_b}, A = run {id_a}; Δ = B − A per test user, averaged over {len(ev_a.n_relevant):,} "
            f"users{sampled(a.protocol)}, "
            f"95 % paired bootstrap interval ({reporter.n_bootstrap} resamples, seed {reporter.seed})."
        )
    )
    rows_head = []
    detail = Section("models", "Every metric")
    for m in models:
        mat_a = np.column_stack([ev_a.per_user[m][n] for n in names])
        mat_b = np.column_stack([ev_b.per_user[m][n] for n in names])
        cis = dict(zip(names, boot.intervals(mat_b, mat_a)))
        numbers["models"][m] = {
            n: {"a": ev_a.mean(m, n), "b": ev_b.mean(m, n), "b_minus_a": asdict(cis[n])} for n in names
        }
        line = verdict(f"{display(m)} (B)", f"{display(m)} (A)", h, cis[h])
        head.blocks.append(Text(line, emphasis=m == "fused"))
        ci = cis[h]
        rows_head.append(
            [display(m), ev_a.mean(m, h), ev_b.mean(m, h), f"{ci.mean:+.4f}", f"{ci.low:+.4f}..{ci.high:+.4f}"]
        )
        rows = []
        for n in names:
            c = cis[n]
            rows.append([label(n), ev_a.mean(m, n), ev_b.mean(m, n), f"{c.mean:+.4f}", f"{c.low:+.4f}..{c.high:+.4f}"])
        detail.blocks.append(Table(["metric", "A", "B", "B − A", "95% CI"], rows, display(m)))
    head.blocks.insert(1, Table(["model", f"A {label(h)}", f"B {label(h)}", "B − A", "95% CI"], rows_head))
    curves = {f"{m} · A": ev_a.curves[m] for m in models if m in ("fused", "als", "text")}
    curves.update({f"{m} · B": ev_b.curves[m] for m in models if m in ("fused", "als", "text")})
    head.blocks.append(
        Figure(
            "compare_curves",
            plots.metric_curves(curves, reporter.ks, max_k=reporter.ks[-1]),
            "NDCG@K and Recall@K of both runs (solid: A, dashed: B)",
        )
    )
    card = Section("protocol", "Protocol cards")
    pa, pb = asdict(a.protocol), asdict(b.protocol)
    card.blocks.append(Text("Rows marked * must agree for a valid comparison; the others may differ."))
    card.blocks.append(
        Table(
            ["field", "A", "B", "same"],
            [[f"{f} *" if f in MUST_MATCH else f, str(pa[f]), str(pb[f]), pa[f] == pb[f]] for f in sorted(pa)],
        )
    )
    doc = Document(
        title=f"Comparison: {a.protocol.data_name}, run B {id_b[:8]} vs run A {id_a[:8]}",
        subtitle=(
            f"A = {id_a} ({a.protocol.experiment}) · B = {id_b} ({b.protocol.experiment}) · "
            f"{a.protocol.n_test_users:,} test users{sampled(a.protocol)} · K = {k}"
        ),
        sections=[head, detail, card],
    )
    numbers["metric_labels"] = {n: label(n) for n in names}
    numbers["metrics"] = list(METRIC_LABEL)
    return doc, numbers
