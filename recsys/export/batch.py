"""Chunked, restartable batch export: parts under a temporary folder, one atomic publish.

Layout while running (beside the output):

```
.recommendations.parquet.parts-<fingerprint>/
  plan.json              what is being exported (the fingerprint's inputs)
  part-00000.parquet     finished chunks (written as .tmp, then renamed: a part that exists is whole)
  part-00000.json        that chunk's row count and rule counts
```

When every part exists they are concatenated, in order, into ``recommendations.parquet.tmp``,
renamed to ``recommendations.parquet``, the manifest ``recommendations.manifest.json`` is written
the same way, and the parts folder is removed. A rerun with the same arguments after a kill finds
the folder (same fingerprint) and computes only the missing parts; the output is byte-identical
to an uninterrupted run because each part depends only on its users and the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from recsys.columns import Columns
from recsys.export.engine import OUTPUT_SCHEMA, Engine

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    path: Path
    manifest_path: Path
    manifest: dict[str, Any]


def frame_hash(df: pl.DataFrame | None) -> str | None:
    if df is None:
        return None
    h = hashlib.sha256()
    h.update(json.dumps(df.columns).encode())
    h.update(df.write_csv().encode())
    return h.hexdigest()[:16]


def _write_atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def export_recommendations(
    engine: Engine,
    user_ids: Sequence[str],
    out_path: str | Path,
    histories: pl.DataFrame | None = None,
    chunk_size: int = 4096,
    info: dict[str, Any] | None = None,
    progress: bool = True,
    after_part: Callable[[int], None] | None = None,
) -> ExportResult:
    """Write top-K for ``user_ids`` (exported in sorted order) to ``out_path`` plus a manifest.

    Args:
        engine: the loaded pipeline with its rules, K and scorer.
        user_ids: users to export; each gets its stored history unless ``histories`` has rows
            for it (which then replace it -- new users need them).
        histories: ``user_id, item_id[, timestamp, event]`` rows.
        chunk_size: users per part (memory grows with it, not with the number of users).
        info: recorded in the manifest and the fingerprint (model URI, run id, config hash ...).
        after_part: called with the part number after each part is written (tests use it).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    users = sorted(set(map(str, user_ids)))
    info = dict(info or {})
    plan = {
        "info": info,
        "k": engine.k,
        "scorer": engine.scorer,
        "rules": engine.rules.rules.describe(),
        "explain": vars(engine.explain),
        "chunk_size": chunk_size,
        "n_users": len(users),
        "users_hash": hashlib.sha256("\n".join(users).encode()).hexdigest()[:16],
        "histories_hash": frame_hash(histories),
    }
    fingerprint = hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()[:16]
    work = out_path.parent / f".{out_path.name}.parts-{fingerprint}"
    work.mkdir(exist_ok=True)
    (work / "plan.json").write_text(json.dumps(plan, indent=2, sort_keys=True, default=str))
    if histories is not None:
        histories = histories.with_columns(pl.col(Columns.User).cast(pl.String))

    starts = list(range(0, len(users), chunk_size))
    parts = [work / f"part-{i:05d}.parquet" for i in range(len(starts))]
    resumed = sum(p.exists() for p in parts)
    if resumed:
        log.info("resuming %s: %d of %d parts already written", out_path, resumed, len(parts))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(users), unit="user", desc="export", smoothing=0.1)
    t0 = time.perf_counter()
    for i, start in enumerate(starts):
        block = users[start : start + chunk_size]
        if not parts[i].exists():
            engine.rules.removed.clear()
            given = None
            if histories is not None:
                given = histories.filter(pl.col(Columns.User).is_in(block))
            t1 = time.perf_counter()
            ph = engine.p.histories(block, given)
            engine.timings["history"] += time.perf_counter() - t1
            df = engine.recommend(ph)
            t1 = time.perf_counter()
            stats = {"rows": df.height, "users": len(block), "removed": dict(engine.rules.removed)}
            (work / f"part-{i:05d}.json").write_text(json.dumps(stats, sort_keys=True))
            tmp = parts[i].with_suffix(".parquet.tmp")
            # Parts are temporary and read back once, by the publish step, which compresses the
            # output: a zstd part cost 0.67 CPU-s to write and read back per 400k rows, an
            # uncompressed one 0.13 s.
            df.write_parquet(tmp, statistics=False, compression="uncompressed")
            os.replace(tmp, parts[i])
            engine.timings["write_part"] += time.perf_counter() - t1
            if after_part is not None:
                after_part(i)
        if bar is not None:
            bar.update(len(block))
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0

    rows, removed = 0, Counter()
    for i in range(len(parts)):
        stats = json.loads((work / f"part-{i:05d}.json").read_text())
        rows += stats["rows"]
        removed.update(stats["removed"])
    t1 = time.perf_counter()
    _concat_parts(parts, out_path)
    engine.timings["publish"] += time.perf_counter() - t1
    manifest = {
        **info,
        "output": str(out_path.resolve()),
        "k": engine.k,
        "scorer": engine.scorer,
        "rules": engine.rules.rules.describe(),
        "removed_by_rule": dict(sorted(removed.items())),
        "explain": vars(engine.explain),
        "rows": rows,
        "users": len(users),
        "chunk_size": chunk_size,
        "parts": len(parts),
        "parts_resumed": resumed,
        "fingerprint": fingerprint,
        "columns": list(OUTPUT_SCHEMA),
        "seconds": round(elapsed, 3),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    manifest_path = out_path.with_name(out_path.name.removesuffix(".parquet") + ".manifest.json")
    _write_atomic_bytes(manifest_path, json.dumps(manifest, indent=2, default=str).encode())
    shutil.rmtree(work, ignore_errors=True)
    return ExportResult(out_path, manifest_path, manifest)


def _concat_parts(parts: Sequence[Path], out_path: Path) -> None:
    """Append the parts, in order, into one parquet file, then rename it into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    schema = pl.DataFrame(schema=OUTPUT_SCHEMA).to_arrow().schema
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for p in parts:
                table = pq.read_table(p)
                if table.num_rows:
                    writer.write_table(table.cast(schema))
            if not parts:
                writer.write_table(pa.Table.from_pylist([], schema=schema))
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
