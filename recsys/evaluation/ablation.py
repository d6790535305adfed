"""One ablation table over several reports (runs, data sets), from their ``metrics.json``.

python -m recsys.evaluation.ablation docs/reports/*/metrics.json > docs/reports/ablation.md
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recsys.errors import InputError, run_script
from recsys.evaluation.render import Document, Section, Table, Text, to_markdown
from recsys.evaluation.report import METRIC_LABEL, METRICS, display, label, ordered


def ablation_rows(numbers: dict[str, Any]) -> list[list[Any]]:
    """Rows ``data, run, model, metrics at the headline K..., Δ vs fused, CI`` of one report."""
    p = numbers["protocol"]
    rows = []
    for model in ordered(list(numbers["ablation"])):
        entry = numbers["ablation"][model]
        ci = entry["vs_fused"]
        delta = "–" if ci is None or model == "fused" else f"{ci['mean']:+.4f} ({ci['low']:+.4f}..{ci['high']:+.4f})"
        means = [entry["means"][m] for m in METRICS]
        rows.append([f"{p['data_name']} ({p['experiment']})", p["run_id"][:8], display(model), *means, delta])
    return rows


def ablation_document(paths: Sequence[str | Path]) -> Document:
    if not paths:
        raise InputError("give the metrics.json files of the reports to tabulate")
    reports = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"no report numbers at {path}")
        reports.append(json.loads(path.read_text()))
    heads = {r["report"]["headline_metric"] for r in reports}
    if len(heads) != 1:
        raise InputError(f"the reports use different headline metrics {sorted(heads)}: their tables do not line up")
    h = heads.pop()
    k = h.rsplit("_", 1)[1]
    cols = ["data", "run", "model", *[f"{METRIC_LABEL[m]}@{k}" for m in METRICS], f"Δ {label(h)} vs fused (95% CI)"]
    rows = [row for r in reports for row in ablation_rows(r)]
    text = Text(
        "Every model of every reported run; differences are paired (same users) within a run, never across "
        "data sets. Each run's report holds its protocol card."
    )
    return Document(
        "Ablation: every run, every data set",
        f"{len(reports)} report(s)",
        [Section("ablation", "Ablation", [text, Table(cols, rows)])],
    )


def main(argv: Sequence[str]) -> None:
    run_script(lambda: print(to_markdown(ablation_document(argv))))


if __name__ == "__main__":
    main(sys.argv[1:])
