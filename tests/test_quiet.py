"""recsys.quiet drops the known harmless library messages it names, and nothing else."""

from __future__ import annotations

import logging
import os

from recsys.quiet import is_pooler_only_load_report, quiet_pooler_report

POOLER = """BertModel LOAD REPORT from: /models/minilm
Key                 | Status     |  |
--------------------+------------+--+-
pooler.dense.weight | UNEXPECTED |  |
pooler.dense.bias   | UNEXPECTED |  |

Notes:
- UNEXPECTED:\tcan be ignored when loading from different task/architecture"""

MISSING = POOLER.replace("pooler.dense.bias   | UNEXPECTED", "encoder.layer.0.attention.self.query.weight | MISSING")


def test_only_a_report_of_the_unexpected_pooler_is_recognised():
    assert is_pooler_only_load_report(POOLER)
    assert not is_pooler_only_load_report(MISSING)  # a missing weight must be seen
    assert not is_pooler_only_load_report("some other transformers warning")
    assert not is_pooler_only_load_report("BertModel LOAD REPORT from: x\nKey | Status\n---+---")


def test_the_filter_drops_the_pooler_report_and_passes_others(caplog):
    quiet_pooler_report()
    quiet_pooler_report()  # idempotent: one filter
    logger = logging.getLogger("transformers.modeling_utils")
    assert sum(f.__class__.__name__ == "_Drop" for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="transformers.modeling_utils"):
        logger.warning(POOLER)
        logger.warning(MISSING)
    assert len(caplog.records) == 1 and "MISSING" in caplog.records[0].getMessage()


def test_loading_the_shipped_minilm_prints_neither_report_nor_bar(capfd, caplog):
    from transformers.utils import logging as hf_logging

    from recsys.config import minilm_path
    from recsys.text.encoder import ItemEncoder

    with caplog.at_level(logging.INFO):
        ItemEncoder.from_pretrained(minilm_path())
    out, err = capfd.readouterr()
    said = out + err + caplog.text
    assert "LOAD REPORT" not in said and "Loading weights" not in said, said[-2000:]
    assert hf_logging.is_progress_bar_enabled()  # the bar is switched back on for other loads


def test_progress_bars_redraw_slowly_off_a_terminal(monkeypatch):
    """A job's log redirected to a file held a record per bar redraw (49 KB of a default job's
    78-line log); off a terminal tqdm's pace becomes one redraw in 30 s, unless the user set it."""
    from recsys.config import quiet_progress_off_terminal

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    quiet_progress_off_terminal()
    assert "TQDM_MININTERVAL" not in os.environ
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    quiet_progress_off_terminal()
    assert os.environ["TQDM_MININTERVAL"] == "30.0"
    monkeypatch.setenv("TQDM_MININTERVAL", "2")
    quiet_progress_off_terminal()
    assert os.environ["TQDM_MININTERVAL"] == "2"
