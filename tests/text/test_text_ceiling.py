"""``bench/text_ceiling.py``: the generated data's text ceiling, run for real on the default data
size with the tiny random encoder (its zero-shot row is then meaningless; the oracles are not).

What is checked is what docs/design.md concludes from the script: the facet is in the text and
worth knowing (topic + facet beats the topic alone), and popularity is most of what is left
(adding it to the oracle beats the oracle without it), at both stages.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a subprocess on the default data size: ~15 s
def test_text_ceiling_orders_the_oracles(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "bench/text_ceiling.py", "encoder=tiny", f"paths.data_dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    stages = re.split(r"^(validation|test): \d+ users$", out.stdout, flags=re.M)[1:]
    assert [stages[0], stages[2]] == ["validation", "test"], out.stdout
    for table in stages[1::2]:
        ndcg = {
            m.group(1).strip(): float(m.group(2))
            for m in re.finditer(r"^\| ([^|]+) \| ([0-9.]+) \|", table, flags=re.M)
        }
        assert len(ndcg) == 5, table
        assert ndcg["oracle: topic + facet"] > 1.5 * ndcg["oracle: topic"], table
        assert ndcg["oracle: topic + facet + popularity"] > 1.3 * ndcg["oracle: topic + facet"], table
        assert ndcg["popularity"] < ndcg["oracle: topic"], table


def test_text_ceiling_refuses_other_data() -> None:
    out = subprocess.run(
        [sys.executable, "bench/text_ceiling.py", "data=ml100k"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert "generated data" in out.stderr
