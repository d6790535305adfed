"""``bench/text_ceiling.py``: the generated data's text ceiling, run for real on the default data
size with the tiny random encoder (its zero-shot row is then meaningless; the oracles are not).

What is checked is what docs/design.md concludes from the script: the facet is in the text and
worth knowing (topic + facet beats the topic alone), popularity is most of what is left (adding
it to the oracle beats the oracle without it), and the generator's own probabilities rank above
every other scorer at both stages, the user's hidden state inferred from the history above ALS
and the text oracles even with each item's popularity counted from its events. Without
popularity (``posterior_pmi``, the ceiling of a popularity-debiased tower) it stays below
``posterior``, lower again without the items' freshness, and knowing the taste groups (which the
text does not show) is worth much over the classes the text shows. Each stage is
scored on the job's seeded sample of ``eval.max_users`` users, as the job evaluates.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a subprocess on the default data size: ~20 s
def test_text_ceiling_orders_the_oracles(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "bench/text_ceiling.py", "encoder=tiny", f"paths.data_dir={tmp_path}", "eval.max_users=2500"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    stages = re.split(r"^(validation|test): (\d+) users$", out.stdout, flags=re.M)[1:]
    assert [stages[0], stages[3]] == ["validation", "test"], out.stdout
    assert [stages[1], stages[4]] == ["2500", "2500"], out.stdout  # of about 3,000 each
    for table in stages[2::3]:
        ndcg = {
            m.group(1).strip(): float(m.group(2))
            for m in re.finditer(r"^\| ([^|]+) \| ([0-9.]+) \|", table, flags=re.M)
        }
        assert len(ndcg) == 14, table
        assert ndcg["oracle_facet"] > 1.5 * ndcg["oracle_topic"], table
        assert ndcg["oracle_facet_pop"] > 1.3 * ndcg["oracle_facet"], table
        assert ndcg["popularity"] < ndcg["oracle_topic"], table
        # Knowing the user's hidden state beats inferring it, which beats counting popularity too.
        assert ndcg["generator"] > ndcg["posterior"] > ndcg["posterior_counts"], table
        assert ndcg["posterior"] > ndcg["posterior_pmi"] > ndcg["posterior_pmi_static"], table
        assert ndcg["posterior_counts"] > ndcg["posterior_counts_static"], table
        assert ndcg["posterior_pmi_static"] > 1.3 * max(ndcg["posterior_pmi_text"], ndcg["oracle_facet"]), table
        others = [v for name, v in ndcg.items() if not name.startswith(("generator", "posterior"))]
        assert ndcg["posterior_counts"] > 1.2 * max(others), table


def test_text_ceiling_refuses_an_unknown_scorer() -> None:
    cmd = [sys.executable, "bench/text_ceiling.py", "--scorers", "als,oracle", "--base", "als"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown scorer(s) ['oracle']" in out.stderr, out.stderr[-2000:]


def test_text_ceiling_refuses_other_data() -> None:
    out = subprocess.run(
        [sys.executable, "bench/text_ceiling.py", "data=ml100k"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert "generated data" in out.stderr
