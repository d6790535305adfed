"""The export's feature explanations (TreeSHAP per decision pattern) with and without the
cross-chunk pattern cache, and LightGBM's own ``pred_contrib`` as the reference.

    python bench/explain.py                     # 24,576 users in 6 chunks, a 100-tree ranker
    python bench/explain.py --trees 30 --rounds 3

Builds the generated pipeline of ``bench/export.py`` with a ranker of ``--trees`` trees (no early
stopping: the bench's early-stopped ranker keeps 1-30 trees depending on the draw, and a tuned
ranker, e.g. Amazon-Scientific's five bags, has hundreds), then exports the same chunks with
``max_cached=0`` and with the default cache, alternating, in one process with one thread. It
reports the ``explain_features`` and total seconds of each, checks that the outputs are the
same frames, and times one chunk's rows with LightGBM's plain ``pred_contrib``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from recsys.errors import run_script

sys.path.insert(0, str(Path(__file__).resolve().parent))

from export import build, make_engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--trees", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    import recsys.rank.explain as explain_module
    import recsys.rank.ranker as ranker_module

    fixed_init = ranker_module.LambdaMARTRanker.__init__

    def no_early_stop(self, *a, **kw):
        fixed_init(self, *a, **{**kw, "n_estimators": args.trees, "early_stopping_fraction": 0.0})

    ranker_module.LambdaMARTRanker.__init__ = no_early_stop
    folder = Path(tempfile.mkdtemp()) / "pipeline"
    built = build(folder, args.chunks * args.chunk, 5000, 10)
    print("built", built, file=sys.stderr)

    chunks = [[f"U{u:07d}" for u in range(c * args.chunk, (c + 1) * args.chunk)] for c in range(args.chunks)]
    result: dict = {"trees": built["best_iteration"], "users": args.chunks * args.chunk, "runs": {}}
    frames = {}
    for _ in range(args.rounds):
        for name, cap in (("no_cache", 0), ("cache", None)):
            engine = make_engine(folder, 100, "fused")
            ranker = engine.p.ranker
            kw = {} if cap is None else {"max_cached": cap}
            engine._shap = explain_module.PatternTreeShap(ranker.booster, ranker.best_iteration, **kw)
            frames[name] = [engine.recommend(engine.p.histories(users)) for users in chunks]
            t = engine.timings
            result["runs"].setdefault(name, []).append(
                {"explain_features_s": round(t["explain_features"], 2), "total_s": round(sum(t.values()), 2)}
            )
            print(name, result["runs"][name][-1], file=sys.stderr, flush=True)
    result["same_output"] = all(a.equals(b) for a, b in zip(frames["no_cache"], frames["cache"], strict=True))

    # LightGBM's own TreeSHAP on the rows the export explains in one chunk (ranks 1-3).
    captured = {}
    engine = make_engine(folder, 100, "fused")
    plain_explain = engine._feature_explanations

    def capture(df, x, rows):
        captured["x"] = x[rows[df["rank"].to_numpy() <= 3]]
        return plain_explain(df, x, rows)

    engine._feature_explanations = capture
    engine.recommend(engine.p.histories(chunks[0]))
    t0 = time.process_time()
    engine.p.ranker.booster.predict(captured["x"], num_iteration=engine.p.ranker.best_iteration, pred_contrib=True)
    result["plain_pred_contrib_one_chunk_s"] = round(time.process_time() - t0, 2)
    result["explained_rows_per_chunk"] = len(captured["x"])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    run_script(main)
