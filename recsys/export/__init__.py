"""Batch export of recommendations."""

from recsys.export.writer import recommendations_frame, write_parquet_atomic

__all__ = ["recommendations_frame", "write_parquet_atomic"]
