"""Offline evaluation: ranking metrics over full-catalogue rankings."""

from recsys.evaluation.metrics import metric_table, ranking_metrics

__all__ = ["metric_table", "ranking_metrics"]
