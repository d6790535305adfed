"""Batch export: business rules, the fast block path vs recsys.rank, chunking, kill-and-resume,
new users and cold items."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from export_support import trained_run

from recsys.columns import Columns
from recsys.errors import ConfigError
from recsys.export.batch import export_recommendations
from recsys.export.engine import Engine, ExplainOptions
from recsys.pipeline_model import TrainedPipeline
from recsys.rank.rules import BusinessRules, apply_rules

# --- rules on a tiny known case ---------------------------------------------------------------


@pytest.fixture
def catalogue() -> pl.DataFrame:
    # Six items in two categories; i4 only from t=30, i5 only until t=50 (both available at 40).
    return pl.DataFrame(
        {
            Columns.Item: [f"i{i}" for i in range(6)],
            Columns.ItemIdx: np.arange(6, dtype=np.int32),
            "category": ["a", "a", "a", "b", "b", "b"],
            "available_from": [None, None, None, None, 30, None],
            "available_until": [None, None, None, None, None, 50],
        }
    )


def candidates() -> pl.DataFrame:
    # User 0 scores items 0..5 as 6,5,4,3,2,1; user 1 the other way round.
    return pl.DataFrame(
        {
            Columns.UserIdx: np.repeat([0, 1], 6).astype(np.int32),
            Columns.ItemIdx: np.tile(np.arange(6), 2).astype(np.int32),
            Columns.Score: np.concatenate([np.arange(6, 0, -1), np.arange(1, 7)]).astype(np.float32),
        }
    )


def lists(df: pl.DataFrame) -> dict[int, list[int]]:
    return {u: g.sort(Columns.Rank)[Columns.ItemIdx].to_list() for (u,), g in df.group_by(Columns.UserIdx)}


@pytest.mark.parametrize(
    ("rules", "expected", "removed"),
    [
        (BusinessRules(), {0: [0, 1, 2, 3, 4, 5], 1: [5, 4, 3, 2, 1, 0]}, {}),
        (BusinessRules(blocklist=["i0", "i5"]), {0: [1, 2, 3, 4], 1: [4, 3, 2, 1]}, {"item_rules_late": 4}),
        (BusinessRules(allowlist=["i1", "i3"]), {0: [1, 3], 1: [3, 1]}, {"item_rules_late": 8}),
        (BusinessRules(min_score=4.5), {0: [0, 1], 1: [5, 4]}, {"min_score": 8}),
        (BusinessRules(max_per_category=1), {0: [0, 3], 1: [5, 2]}, {"category_cap": 8}),
        (BusinessRules(at=75), {0: [0, 1, 2, 3, 4], 1: [4, 3, 2, 1, 0]}, {"item_rules_late": 2}),  # i5 expired
        (BusinessRules(at=10), {0: [0, 1, 2, 3, 5], 1: [5, 3, 2, 1, 0]}, {"item_rules_late": 2}),  # i4 not yet
        (
            BusinessRules(blocklist=["i0"], max_per_category=2, min_score=2.5, at=200),
            {0: [1, 2, 3], 1: [4, 3, 2]},
            {"item_rules_late": 4, "min_score": 2},
        ),
    ],
)
def test_each_rule_and_combined(catalogue, rules, expected, removed):
    compiled = rules.compile(catalogue, now=40)
    out = apply_rules(candidates(), compiled, k=10)
    assert lists(out) == expected
    assert {k: v for k, v in compiled.removed.items() if k in removed} == removed
    assert out[Columns.Rank].to_list() == [r for u in sorted(expected) for r in range(1, len(expected[u]) + 1)]


def test_k_cuts_after_the_rules(catalogue):
    out = apply_rules(candidates(), BusinessRules(max_per_category=1).compile(catalogue, 40), k=1)
    assert lists(out) == {0: [0], 1: [5]}


def test_masks_remove_seen_and_forbidden_items_before_top_n(catalogue):
    compiled = BusinessRules(blocklist=["i1"]).compile(catalogue, now=40)
    seen = sp.csr_matrix(([1.0], ([0], [0])), shape=(2, 6))
    scores = compiled.mask_scores(np.ones((2, 6), dtype=np.float32), seen)
    assert np.isneginf(scores[0, [0, 1]]).all() and np.isfinite(scores[0, 2:]).all()
    assert np.isneginf(scores[1, 1]) and np.isfinite(scores[1, [0, 2, 3, 4, 5]]).all()
    compiled.count_masked(2, seen)
    assert compiled.removed == {"blocklist": 2, "seen": 1}
    off = BusinessRules(filter_seen=False).compile(catalogue, now=40)
    assert np.isfinite(off.mask_scores(np.ones((2, 6), dtype=np.float32), seen)).all()


def test_unknown_category_column_is_a_config_error(catalogue):
    with pytest.raises(ConfigError, match="no 'genre' column"):
        BusinessRules(max_per_category=2, category_column="genre").compile(catalogue, 0)


# --- the trained pipeline ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline() -> TrainedPipeline:
    return TrainedPipeline.load(trained_run().pipeline_dir)


def engine(p: TrainedPipeline, k: int = 10, scorer: str = "fused", rules: BusinessRules | None = None) -> Engine:
    return Engine(p, (rules or BusinessRules()).compile(p.items, p.now), k, scorer, ExplainOptions())


def test_export_of_the_test_users_equals_the_evaluated_fused_lists():
    """The code that is evaluated is the code that is served: the evaluated test-stage pipeline,
    exported for the test users with the evaluation's exclusions (seen items, items not yet
    listed when the user came back), gives the run's evaluated fused lists row for row."""
    import scipy.sparse as sp

    run = trained_run()
    p = TrainedPipeline.load(run.output / "pipeline_evaluated")
    evaluated = pl.read_parquet(run.output / "recommendations.parquet")
    k = int(evaluated[Columns.Rank].max())
    users = sorted(evaluated[Columns.User].unique().to_list())
    ph = p.histories(users)
    exclude = sp.load_npz(run.test_exclusion).tocsr()[p.users.index(users)]
    no_window = BusinessRules(available_from_column="", available_until_column="")
    eng = Engine(p, no_window.compile(p.items, p.now), k, "fused", ExplainOptions(enabled=False, top_features=0))
    got = eng.recommend(ph, exclude=exclude)
    cols = [Columns.User, Columns.Item, Columns.Rank, Columns.Source]
    assert got.height == evaluated.height > 0
    assert got.select(cols).equals(evaluated.select(cols))
    np.testing.assert_allclose(got[Columns.Score].to_numpy(), evaluated[Columns.Score].to_numpy(), rtol=1e-6)


def test_saved_pipeline_scores_as_the_trained_models(pipeline):
    """Save/load loses nothing any model scores with (the second text tower included): the loaded
    pipeline, over the stored histories, gives every training model's scores."""
    p = pipeline
    assert p.models["text_zeroshot"].bert is None and "score_text_zeroshot" in p.ranker.features
    assert {"score_text_nearest", "score_text_zeroshot_nearest"} <= set(p.ranker.features)
    # the order-aware item-kNN models keep their recency decay (scores below would differ without it)
    assert p.models["itemknn_recent"].recency_decay == p.models["itemknn_next"].recency_decay == 0.5
    assert p.models["ease"].recency_decay == 0.5 and (p.models["ease"].similarity.data < 0).any()  # EASE weights
    assert p.models["sasrec"].epochs == 3 and "score_sasrec" in p.ranker.features  # a network's weights
    scorers = p.scorers(p.histories(list(p.users.ids)))
    users = np.arange(len(p.users))
    with np.load(trained_run().train_scores) as trained:
        assert sorted(trained.files) == sorted(scorers)
        for name in trained.files:
            got = np.asarray(scorers[name].score_users(users))
            np.testing.assert_allclose(got, trained[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_loaded_pipeline_serves_without_its_bert_and_saves_it_again(pipeline, tmp_path):
    """Serving reads only the text tower's user side and item vectors; saving again still writes
    the BERT (the loaded folder's files, as they are) and gives the same scores back."""
    bert = pipeline.models["text"].bert
    assert bert.net is None and bert.folder == trained_run().pipeline_dir / "models" / "text" / "encoder"
    folder = pipeline.save(tmp_path / "again")
    assert (folder / "models" / "text" / "encoder" / "model.safetensors").is_file()
    for f in bert.folder.iterdir():
        assert (folder / "models" / "text" / "encoder" / f.name).read_bytes() == f.read_bytes(), f.name
    again = TrainedPipeline.load(folder)
    users = list(pipeline.users.ids[:50])
    a, b = pipeline.scorers(pipeline.histories(users)), again.scorers(again.histories(users))
    rows = np.arange(len(users))
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name].score_users(rows)), np.asarray(b[name].score_users(rows)))


@pytest.mark.parametrize("scorer", ["als", "itemknn", "text", "text_new", "text_popular"])
def test_single_stage_engine_reads_only_its_model(pipeline, tmp_path, scorer):
    """``Engine.load`` for one model reads that model (and the text tower that ``text_new`` and
    ``text_popular`` derive their scores from) and no ranker, and exports exactly what the whole
    pipeline exports with it."""
    rules = BusinessRules(max_per_category=3)
    part = loaded_engine(scorer=scorer, rules=rules)
    assert part.p.ranker is None and part.p.only is not None and scorer in part.p.only
    assert set(part.p.models) == ({scorer, "text"} if scorer.startswith("text_") else {scorer})
    users = list(pipeline.users.ids) + ["nobody"]
    whole = Engine(pipeline, rules.compile(pipeline.items, pipeline.now), 10, scorer, ExplainOptions())
    a = export_recommendations(part, users, tmp_path / "a.parquet", chunk_size=64, progress=False)
    b = export_recommendations(whole, users, tmp_path / "b.parquet", chunk_size=64, progress=False)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.manifest["rows"] > 0 or scorer == "text_new"  # no item is that cold in this small run
    with pytest.raises(ConfigError, match="load it whole"):
        part.p.save(tmp_path / "again")
    with pytest.raises(ConfigError, match=r"unknown model\(s\) \['nope'\]: the pipeline has \[.*'als'"):
        TrainedPipeline.load(trained_run().pipeline_dir, ["als", "nope"])
    with pytest.raises(ConfigError, match="'fused' is the ranker"):
        loaded_engine(scorer="nope")


@pytest.mark.slow
def test_a_factor_export_imports_neither_torch_nor_lightgbm():
    """What makes a single-stage ALS export's worker processes start in a fraction of a second
    (CHANGELOG.md, 2026-11-26): loading its engine, in a fresh interpreter, imports neither."""
    code = (
        "import sys\n"
        "from recsys.export.batch import export_recommendations\n"
        "from recsys.export.engine import Engine\n"
        "from recsys.rank.rules import BusinessRules\n"
        f"e = Engine.load({str(trained_run().pipeline_dir)!r}, BusinessRules(), 10, 'als')\n"
        "e.recommend(e.p.histories(list(e.p.users.ids[:20])))\n"
        "print(sorted(m for m in ('torch', 'lightgbm', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_output_schema_order_and_no_seen_items(pipeline, tmp_path):
    p = pipeline
    res = export_recommendations(engine(p), list(p.users.ids), tmp_path / "r.parquet", chunk_size=64, progress=False)
    df = pl.read_parquet(res.path)
    assert df.columns[:5] == [Columns.User, Columns.Item, Columns.Score, Columns.Rank, Columns.Source]
    assert df.equals(df.sort(Columns.User, Columns.Rank))
    assert df.group_by(Columns.User).agg(pl.col(Columns.Rank).max())[Columns.Rank].max() == 10
    seen = p.history.join(p.users.to_frame(Columns.User, Columns.UserIdx), on=Columns.UserIdx).join(
        p.items.select(Columns.Item, pl.col(Columns.ItemIdx).cast(pl.Int32)), on=Columns.ItemIdx
    )
    assert df.join(seen, on=[Columns.User, Columns.Item], how="inner").height == 0
    assert df["explain_item"].null_count() < df.height  # most rows name a history item
    assert df.filter(pl.col(Columns.Rank) <= 3)["explain_features"].null_count() == 0  # feature_ranks=3
    m = json.loads(res.manifest_path.read_text())
    assert m["rows"] == df.height and m["users"] == len(p.users) and m["k"] == 10
    assert m["removed_by_rule"]["seen"] > 0
    assert not list(tmp_path.glob(".r.parquet*")), "temporary parts left behind"


def test_given_histories_extend_the_stored_ones_unless_replace_is_asked(pipeline, tmp_path):
    """Regression: ``histories=`` replaced a known user's stored history in the batch export
    (the docs said it extends it), so the items the user already had came back in its list.
    ``export_recommendations`` (and so the CLI) now extends by default: the stored events plus
    the given ones, all filtered as seen; ``histories_mode="replace"`` is the old behaviour."""
    p = pipeline
    counts = p.history.group_by(Columns.UserIdx).len().sort("len", descending=True)
    user = str(p.users.ids[int(counts[Columns.UserIdx][0])])
    stored = set(p.item_ids[p.history.filter(pl.col(Columns.UserIdx) == counts[Columns.UserIdx][0])[Columns.ItemIdx]])
    new = [i for i in p.item_ids.tolist() if i not in stored][:2]
    given = pl.DataFrame({Columns.User: [user, user], Columns.Item: new})
    eng = engine(p, k=50)

    def listed(mode: str | None) -> set[str]:
        kw = {} if mode is None else {"histories_mode": mode}
        out = export_recommendations(eng, [user], tmp_path / f"{mode}.parquet", histories=given, progress=False, **kw)
        return set(pl.read_parquet(out.path)[Columns.Item].to_list())

    extended, replaced = listed(None), listed("replace")
    assert not extended & (stored | set(new)), "extend (the default): stored and given items are both seen"
    assert replaced & stored and not replaced & set(new), "replace: only the given items are seen"
    ph = p.histories([user], given, "extend")
    assert (
        ph.history.interactions.height
        == len(p.history.filter(pl.col(Columns.UserIdx) == counts[Columns.UserIdx][0])) + 2
    )
    assert ph.known.tolist() == [-1]  # folded in: its trained factors were fitted without the new events
    with pytest.raises(ConfigError, match=r"histories_mode must be one of \['extend', 'replace'\], got 'append'"):
        p.histories([user], given, "append")


def test_a_history_without_timestamps_is_served_as_just_now(pipeline):
    """Regression: rows without a timestamp were dated 1970 (0, 1, 2 ...), so the ranker's
    idle-days features saw a user idle for 56 years. They now mean "just now": the same list as
    the same rows stamped at the pipeline's ``now``, in row order."""
    p = pipeline
    bare = pl.DataFrame({Columns.User: ["newcomer"] * 3, Columns.Item: p.item_ids[:3].tolist()})
    stamped = bare.with_columns(pl.Series(Columns.Timestamp, [p.now - 2, p.now - 1, p.now]))
    e = engine(p, k=10)
    got, expected = e.recommend(p.histories(["newcomer"], bare)), e.recommend(p.histories(["newcomer"], stamped))
    assert got.height == 10
    assert got.equals(expected)


def test_millisecond_timestamps_are_refused_by_the_python_api(pipeline, tmp_path):
    """Regression: only the CLI's file reader refused milliseconds; ``TrainedPipeline.histories``
    and ``export_recommendations`` served them as seconds in the year 55970."""
    from recsys.errors import InputError

    p = pipeline
    given = pl.DataFrame({Columns.User: ["newcomer"], Columns.Item: [p.item_ids[0]], Columns.Timestamp: [p.now * 1000]})
    with pytest.raises(InputError, match="divide by 1000"):
        p.histories(["newcomer"], given)
    with pytest.raises(InputError, match="divide by 1000"):
        export_recommendations(engine(p), ["newcomer"], tmp_path / "r.parquet", histories=given, progress=False)


def test_a_string_of_user_ids_is_refused(pipeline, tmp_path):
    """Regression: ``export_recommendations(engine, "U00001", ...)`` exported the users 'U',
    '0', '1' (a str is a sequence of characters); it is a TypeError saying what to pass."""
    user = str(pipeline.users.ids[0])
    with pytest.raises(TypeError, match=rf"got the string '{user}'.*pass \['{user}'\]"):
        export_recommendations(engine(pipeline), user, tmp_path / "r.parquet", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_reads_histories_and_users_with_the_models_column_map(pipeline, tmp_path):
    """Regression: ``histories=`` (and a ``users=`` table) ignored the model's
    ``data.column_map``, which ``recsys.update`` applies: files in the training files' column
    names were refused. Now they are read with it, and a ``column_map`` setting replaces it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import recsys.config
    from recsys import recommend

    run = trained_run()
    folder = tmp_path / "model"  # the trained pipeline, but for a config.yaml with a column map
    folder.mkdir()
    for f in run.pipeline_dir.iterdir():
        if f.name != "config.yaml":
            (folder / f.name).symlink_to(f)
    config = OmegaConf.load(run.pipeline_dir / "config.yaml")
    config.data.column_map = {"user_id": "customer", "item_id": "sku"}
    OmegaConf.save(config, folder / "config.yaml")
    user, item = str(pipeline.users.ids[0]), str(pipeline.item_ids[0])
    (tmp_path / "h.csv").write_text(f"customer,sku\n{user},{item}\nnewbie,{item}\n")
    (tmp_path / "u.csv").write_text(f"customer\n{user}\nnewbie\n")
    (tmp_path / "h2.csv").write_text(f"client,sku\nnewbie,{item}\n")

    def export(*args: str):
        overrides = [f"model_uri={folder}", "progress=false", "workers=1", "k=5", *args]
        with initialize_config_dir(config_dir=recsys.config.CONFIG_DIR, version_base="1.3"):
            return recommend.run(compose("recommend", overrides=overrides))

    out = export(f"histories={tmp_path / 'h.csv'}", f"users={tmp_path / 'u.csv'}", f"output={tmp_path / 'a.parquet'}")
    recs = pl.read_parquet(out.path)
    assert set(recs[Columns.User]) == {user, "newbie"} and item not in set(recs[Columns.Item])
    out = export(
        f"histories={tmp_path / 'h2.csv'}",
        "column_map={user_id: client, item_id: sku}",
        f"output={tmp_path / 'b.parquet'}",
    )
    assert "newbie" in set(pl.read_parquet(out.path)[Columns.User])


def test_threads_sharing_an_engine_get_their_own_blocks(pipeline):
    """The engine keeps its dense score arrays from block to block (``Engine._block``), one set
    per thread: two threads recommending with one engine (a server's pyfunc model) get what
    they get one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    eng = engine(pipeline)
    ids = list(pipeline.users.ids)
    groups = [ids[i::4] for i in range(4)]
    alone = [eng.recommend(pipeline.histories(g)) for g in groups]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda g: eng.recommend(pipeline.histories(g)), groups))
            for a, b in zip(alone, got, strict=True):
                assert a.equals(b)


def test_chunking_gives_the_same_output(pipeline, tmp_path):
    p = pipeline
    rules = BusinessRules(max_per_category=3, blocklist=list(p.item_ids[:5]))
    users = list(p.users.ids[:90])
    one = export_recommendations(
        engine(p, rules=rules), users, tmp_path / "one.parquet", chunk_size=1000, progress=False
    )
    many = export_recommendations(
        engine(p, rules=rules), users, tmp_path / "many.parquet", chunk_size=7, progress=False
    )
    assert pl.read_parquet(one.path).equals(pl.read_parquet(many.path))
    assert many.manifest["parts"] == 13
    assert one.manifest["removed_by_rule"] == many.manifest["removed_by_rule"]


def read_parts(folder) -> pl.DataFrame:
    return pl.read_parquet(sorted(folder.glob("part-*.parquet")))


def test_parts_layout_holds_the_rows_of_the_file_layout(pipeline, tmp_path):
    p = pipeline
    rules = BusinessRules(max_per_category=3)
    users = list(p.users.ids[:90])
    one = export_recommendations(engine(p, rules=rules), users, tmp_path / "one.parquet", chunk_size=40, progress=False)
    parts = export_recommendations(
        engine(p, rules=rules), users, tmp_path / "parts.parquet", chunk_size=40, progress=False, layout="parts"
    )
    assert parts.path.is_dir() and len(list(parts.path.glob("part-*.parquet"))) == 3
    got = read_parts(parts.path)
    assert got.equals(pl.read_parquet(one.path))
    assert pl.read_parquet(parts.path / "*.parquet").equals(got)  # as a reader globs it
    assert dict(got.schema) == dict(pl.read_parquet(one.path).schema)
    assert parts.manifest["layout"] == "parts" and one.manifest["layout"] == "file"
    assert parts.manifest["rows"] == got.height and parts.manifest["removed_by_rule"] == one.manifest["removed_by_rule"]
    assert not list(tmp_path.glob(".parts.parquet*")), "temporary parts left behind"


def test_parts_layout_replaces_an_earlier_output(pipeline, tmp_path):
    p = pipeline
    out = tmp_path / "recs.parquet"
    out.write_text("an older export")  # a file of the other layout
    first = export_recommendations(
        engine(p), list(p.users.ids[:30]), out, chunk_size=10, progress=False, layout="parts"
    )
    assert out.is_dir() and read_parts(out)[Columns.User].n_unique() == 30
    # Again, with fewer users: the folder is replaced as a whole (no stale part-00002 left).
    export_recommendations(engine(p), list(p.users.ids[:15]), out, chunk_size=10, progress=False, layout="parts")
    assert sorted(f.name for f in out.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert read_parts(out)[Columns.User].n_unique() == 15
    assert first.manifest["parts"] == 3
    empty = export_recommendations(engine(p), [], tmp_path / "none.parquet", progress=False, layout="parts")
    assert read_parts(empty.path).columns == read_parts(out).columns and read_parts(empty.path).height == 0
    assert not list(tmp_path.glob(".*.parts-*"))


def test_bad_layouts_are_refused_before_any_work(pipeline, tmp_path):
    from recsys.errors import ConfigError

    with pytest.raises(ConfigError, match="layout must be one of"):
        export_recommendations(engine(pipeline), ["u1"], tmp_path / "r.parquet", layout="folder")
    (tmp_path / "dir.parquet").mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        export_recommendations(engine(pipeline), ["u1"], tmp_path / "dir.parquet")
    assert list(tmp_path.iterdir()) == [tmp_path / "dir.parquet"]  # no parts folder started


KILL_SCRIPT = """
import glob, os, signal, sys
from recsys.export.batch import export_recommendations
from recsys.export.engine import Engine, ExplainOptions
from recsys.pipeline_model import TrainedPipeline
from recsys.rank.rules import BusinessRules
p = TrainedPipeline.load(sys.argv[1])
e = Engine(p, BusinessRules().compile(p.items, p.now), 10, "fused", ExplainOptions())
kill_at, layout = int(sys.argv[3]), sys.argv[4]
def after(i):
    if i == kill_at:
        work = glob.glob(os.path.join(os.path.dirname(sys.argv[2]), ".recs.parquet.parts-*"))[0]
        with open(os.path.join(work, "part-00003.parquet.tmp"), "wb") as f:
            f.write(b"half a part")  # as if killed while writing the next part
        os.kill(os.getpid(), signal.SIGKILL)
users = list(p.users.ids)
export_recommendations(e, users, sys.argv[2], chunk_size=40, progress=False, after_part=after, layout=layout)
"""


def output_bytes(path) -> list[bytes]:
    """The output's bytes: the file, or each file of a parts folder in name order."""
    return [f.read_bytes() for f in sorted(path.iterdir())] if path.is_dir() else [path.read_bytes()]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["file", "parts"])
def test_kill_and_resume_gives_identical_bytes(pipeline, tmp_path, layout):
    out = tmp_path / "recs.parquet"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(trained_run().pipeline_dir), str(out), "2", layout], env=env
    )
    assert killed.returncode == -9
    assert not out.exists(), "a killed export must not publish anything"
    parts = sorted(tmp_path.glob(".recs.parquet.parts-*/part-*.parquet"))
    assert len(parts) == 3
    # Resume in this process (same arguments), then compare with an uninterrupted run.
    resumed = export_recommendations(
        engine(pipeline), list(pipeline.users.ids), out, chunk_size=40, progress=False, layout=layout
    )
    assert resumed.manifest["parts_resumed"] == 3
    fresh = export_recommendations(
        engine(pipeline),
        list(pipeline.users.ids),
        tmp_path / "fresh" / "recs.parquet",
        chunk_size=40,
        progress=False,
        layout=layout,
    )
    assert output_bytes(out) == output_bytes(fresh.path) and len(output_bytes(out)) == (5 if layout == "parts" else 1)
    assert resumed.manifest["removed_by_rule"] == fresh.manifest["removed_by_rule"]
    assert not list(tmp_path.glob(".recs.parquet.parts-*"))


# --- workers: threads and processes ------------------------------------------------------------


def loaded_engine(k: int = 10, scorer: str = "fused", rules: BusinessRules | None = None) -> Engine:
    return Engine.load(trained_run().pipeline_dir, rules or BusinessRules(), k, scorer, ExplainOptions())


def test_engine_load_refuses_a_fractional_k_and_takes_rules_as_a_mapping():
    """Regression: ``Engine.load(folder, rules, k=2.5)`` served lists of 2 (the pyfunc path refuses
    2.5), and rules given as a dict failed with ``'dict' object has no attribute 'compile'``."""
    folder = trained_run().pipeline_dir
    for k in (2.5, True, 0):
        with pytest.raises(ConfigError, match=f"k must be a whole number >= 1, got {k!r}"):
            Engine.load(folder, BusinessRules(), k)
    engine = Engine.load(folder, {"filter_seen": True, "max_per_category": 2}, np.int64(3))
    assert engine.k == 3 and engine.rules.rules.max_per_category == 2
    with pytest.raises(TypeError, match="rules must be a BusinessRules or a mapping"):
        Engine.load(folder, [("filter_seen", True)], 3)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["threads", "processes"])
@pytest.mark.parametrize("scorer", ["fused", "als"])
def test_workers_give_the_same_bytes(tmp_path, scorer, parallel):
    users = list(TrainedPipeline.load(trained_run().pipeline_dir).users.ids)
    rules = BusinessRules(max_per_category=3)
    one = export_recommendations(
        loaded_engine(scorer=scorer, rules=rules), users, tmp_path / "w1" / "r.parquet", chunk_size=15, progress=False
    )
    seen: list[int] = []

    def slow_parent(i: int) -> None:
        seen.append(i)
        if len(seen) == 1:  # wait for the worker (it loads the pipeline first) to write a part too
            deadline = time.monotonic() + 120
            while len(list((tmp_path / "w2").glob(".r.parquet.parts-*/part-*.parquet"))) < 2:
                assert time.monotonic() < deadline, "the worker wrote no part"
                time.sleep(0.05)

    two = export_recommendations(
        loaded_engine(scorer=scorer, rules=rules),
        users,
        tmp_path / "w2" / "r.parquet",
        chunk_size=15,
        progress=False,
        workers=2,
        after_part=slow_parent,
        parallel=parallel,
    )
    assert two.manifest["workers"] == 2 and one.manifest["workers"] == 1
    assert two.manifest["parallel"] == parallel
    assert min(two.manifest["parts_by_process"]) > 0, two.manifest["parts_by_process"]
    assert sorted(seen) == list(range(two.manifest["parts"]))  # every part reported once
    assert one.path.read_bytes() == two.path.read_bytes()
    assert one.manifest["removed_by_rule"] == two.manifest["removed_by_rule"]
    assert one.manifest["rows"] == two.manifest["rows"] > 0


def test_worker_processes_need_an_engine_that_can_be_rebuilt(pipeline, tmp_path):
    """Processes load the pipeline again from ``Engine.load``'s recipe; threads share the
    caller's engine, so any engine will do for them."""
    from recsys.errors import ConfigError

    users = list(pipeline.users.ids)
    with pytest.raises(ConfigError, match="Engine.load"):
        export_recommendations(
            engine(pipeline), users, tmp_path / "r.parquet", chunk_size=50, workers=2, parallel="processes"
        )
    threads = export_recommendations(engine(pipeline), users, tmp_path / "t.parquet", chunk_size=50, workers=2)
    one = export_recommendations(engine(pipeline), users, tmp_path / "o.parquet", chunk_size=50)
    assert threads.manifest["workers"] == 2 and threads.path.read_bytes() == one.path.read_bytes()
    with pytest.raises(ConfigError, match="parallel must be one of"):
        export_recommendations(engine(pipeline), users, tmp_path / "f.parquet", workers=2, parallel="fork")


def test_a_failing_thread_fails_the_export_with_its_own_error(pipeline, tmp_path, monkeypatch):
    """A worker thread's error stops the export and is raised as it was (an ``InputError``
    stays one, for the CLI's message); nothing is published."""
    import threading

    from recsys.errors import InputError
    from recsys.export import batch

    compute = batch._Job.compute

    def failing(self, engine, i):
        if threading.current_thread() is not threading.main_thread():
            raise InputError("a bad row in this part", file="histories.csv", column="item_id")
        compute(self, engine, i)

    monkeypatch.setattr(batch._Job, "compute", failing)
    with pytest.raises(InputError, match="a bad row in this part"):
        export_recommendations(
            engine(pipeline), list(pipeline.users.ids), tmp_path / "r.parquet", chunk_size=20, progress=False, workers=2
        )
    assert not (tmp_path / "r.parquet").exists()
    alive = [t.name for t in threading.enumerate() if t.name.startswith("recsys-export")]
    assert not alive, "an export thread outlived the export"


THREAD_ERROR_SCRIPT = """
import threading
from recsys.errors import InputError
from recsys.export import batch

class Job:
    def compute(self, engine, i):
        if threading.current_thread() is not threading.main_thread():
            raise InputError("a bad row in this part")

class Engine:
    threads, timings = 1, {}

try:
    batch._compute_parts(Engine(), Job(), list(range(6)), 1, "threads", lambda i, who: None)
except InputError as e:
    print("InputError:", e)
"""


def test_a_thread_error_is_raised_as_it_was_in_a_fresh_interpreter():
    """Regression: the pool's error handler named ``concurrent.futures.process``, which an export
    with threads never imports, and turned a thread's error into an AttributeError."""
    out = subprocess.run([sys.executable, "-c", THREAD_ERROR_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("InputError: a bad row in this part"), out.stdout


def test_export_threads_run_at_the_engines_thread_limits(pipeline, monkeypatch, tmp_path):
    """Every export thread's BLAS and OpenMP run at the engine's 1 thread, and the caller's
    settings come back after. BLAS's pool is process-wide and threadpoolctl lets only the
    thread that limited it first change it: without the caller holding the limits, a worker
    thread's own limits are a no-op for BLAS."""
    import threading

    from threadpoolctl import threadpool_info, threadpool_limits

    def settings() -> dict[str, set[int]]:
        out: dict[str, set[int]] = {}
        for i in threadpool_info():
            out.setdefault(i["user_api"], set()).add(i["num_threads"])
        return out

    seen: dict[str, list] = {}
    e = engine(pipeline)
    recommend = e._recommend

    def recording(ph, exclude=None):  # inside Engine.recommend's limits
        seen.setdefault(threading.current_thread().name, []).append(settings())
        return recommend(ph, exclude)

    monkeypatch.setattr(e, "_recommend", recording)
    with threadpool_limits(2):  # a known setting, other than the engine's 1
        before = settings()
        export_recommendations(
            e, list(pipeline.users.ids), tmp_path / "r.parquet", chunk_size=10, progress=False, workers=2
        )
        after = settings()
    assert before["blas"] == {2} and after == before
    assert len(seen) == 2, seen.keys()  # the caller and one worker thread computed parts
    for name, calls in seen.items():
        for s in calls:
            assert s["blas"] == {1} and s.get("openmp", {1}) == {1}, (name, s)


def test_ranker_matrix_in_kept_memory_equals_polars_to_numpy(pipeline):
    """The ranker's feature matrix, written into memory kept from block to block, holds what
    ``to_numpy`` gives (nulls as NaN, ints and float32 widened), for a block larger than the
    last and then a smaller one, and does not keep rows of the larger one."""
    e = engine(pipeline)
    names = pipeline.ranker.features
    rng = np.random.default_rng(0)

    def frame(n: int) -> pl.DataFrame:
        cols = {}
        for j, name in enumerate(names):
            v = rng.normal(size=n)
            kind = j % 3
            s = pl.Series(name, (v * 100).astype(np.int32) if kind == 0 else v, strict=False)
            s = s.cast(pl.Float32) if kind == 1 else s
            if j % 2 == 0:  # nulls in every other column
                s = s.scatter(rng.choice(n, n // 5, replace=False), None)
            cols[name] = s
        return pl.DataFrame(cols).with_columns(pl.lit(1).alias("not_a_feature"))

    for n in (300, 700, 200):
        f = frame(n)
        x = e._ranker_matrix(f)
        assert x.shape == (n, len(names)) and x.dtype == np.float64
        assert np.array_equal(x, f.select(names).to_numpy(), equal_nan=True)
    assert len(e._local.ranker_x) == 700 * len(names)  # grown once, then reused


def test_other_threads_rank_with_their_own_copy_of_the_ranker(pipeline):
    """LightGBM's predict sets the iteration range on the booster it is called on, so threads
    sharing an engine must not share its booster; each other thread's copy predicts the same."""
    import threading

    e = engine(pipeline)
    x = np.random.default_rng(0).normal(size=(200, len(pipeline.ranker.features)))
    own = e._booster()
    got = {}

    def other() -> None:
        got["booster"] = e._booster()
        got["again"] = e._booster()
        got["pred"] = got["booster"].predict(x, num_iteration=pipeline.ranker.best_iteration)
        got["shap"] = e._tree_shap()(x)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert own is pipeline.ranker.booster
    assert got["booster"] is not own and got["again"] is got["booster"]
    assert np.array_equal(got["pred"], own.predict(x, num_iteration=pipeline.ranker.best_iteration))
    assert np.array_equal(got["shap"], e._tree_shap()(x))


def test_a_failing_worker_fails_the_export(tmp_path):
    e = loaded_engine()
    e.recipe = dataclasses.replace(e.recipe, folder=str(tmp_path / "no-such-pipeline"))  # workers cannot load it

    def wait_for_the_worker(i: int) -> None:  # keep the export running until the worker has failed
        import multiprocessing

        deadline = time.monotonic() + 120
        while multiprocessing.active_children() and time.monotonic() < deadline:
            time.sleep(0.05)

    with pytest.raises(RuntimeError, match="export worker failed"):
        export_recommendations(
            e,
            list(e.p.users.ids),
            tmp_path / "r.parquet",
            chunk_size=20,
            progress=False,
            workers=2,
            after_part=wait_for_the_worker,
            parallel="processes",
        )
    assert not (tmp_path / "r.parquet").exists()


KILL_WORKERS_SCRIPT = """
import multiprocessing, os, signal, sys
from recsys.export.batch import export_recommendations
from recsys.export.engine import Engine, ExplainOptions
from recsys.rank.rules import BusinessRules
e = Engine.load(sys.argv[1], BusinessRules(), 10, "fused", ExplainOptions())
written = []
def after(i):
    written.append(i)
    if len(written) == 4:
        with open(sys.argv[3], "w") as f:
            f.write(" ".join(str(p.pid) for p in multiprocessing.active_children()))
        os.kill(os.getpid(), signal.SIGKILL)
users, out, parallel = list(e.p.users.ids), sys.argv[2], sys.argv[4]
export_recommendations(e, users, out, chunk_size=20, progress=False, after_part=after, workers=2, parallel=parallel)
"""


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["threads", "processes"])
def test_kill_and_resume_with_workers_gives_identical_bytes(pipeline, tmp_path, parallel):
    out = tmp_path / "recs.parquet"
    pids = tmp_path / "workers.txt"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_WORKERS_SCRIPT, str(trained_run().pipeline_dir), str(out), str(pids), parallel]
    )
    assert killed.returncode == -9
    assert not out.exists(), "a killed export must not publish anything"
    workers = [int(x) for x in pids.read_text().split()]
    assert len(workers) == (1 if parallel == "processes" else 0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{w}") for w in workers):
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{w}") for w in workers), "a worker outlived the killed export"
    parts = sorted(tmp_path.glob(".recs.parquet.parts-*/part-*.parquet"))
    assert 4 <= len(parts) < 10
    resumed = export_recommendations(
        loaded_engine(), list(pipeline.users.ids), out, chunk_size=20, progress=False, workers=2
    )
    assert resumed.manifest["parts_resumed"] == len(parts)
    fresh = export_recommendations(
        engine(pipeline), list(pipeline.users.ids), tmp_path / "fresh" / "recs.parquet", chunk_size=20, progress=False
    )
    assert out.read_bytes() == fresh.path.read_bytes()
    assert resumed.manifest["removed_by_rule"] == fresh.manifest["removed_by_rule"]
    assert not list(tmp_path.glob(".recs.parquet.parts-*"))


# --- new users and cold items, on the block world (conftest) -----------------------------------


@pytest.fixture(scope="module")
def block_pipeline(block_world, block_towers, tmp_path_factory) -> tuple[TrainedPipeline, int]:
    """ALS + item-kNN + popularity + the fine-tuned tiny text tower on the block world, with
    item 0 (block 0) made cold: none of its events are in the history."""
    from recsys.cf.models import ALS, ItemKNN, Popularity
    from recsys.data.dataset import IdMap
    from recsys.recommender import History
    from recsys.text.recommender import TextRecommender

    _, trained, ids, lengths = block_towers
    w = block_world
    cold = 0
    hist = History(w.history.interactions.filter(pl.col(Columns.ItemIdx) != cold), w.n_users, w.n_items)
    models = {
        "als": ALS(factors=8, iterations=10).fit(hist),
        "itemknn": ItemKNN(neighbours=20).fit(hist),
        "popularity": Popularity().fit(hist),
        "text": TextRecommender.from_tokens(trained, ids, lengths).fit(hist),
    }
    items = pl.DataFrame(
        {
            Columns.Item: [f"item{i:03d}" for i in range(w.n_items)],
            Columns.ItemIdx: np.arange(w.n_items, dtype=np.int32),
            Columns.Text: w.texts,
            "category": [f"b{b}" for b in w.block_of_item],
        }
    )
    users = IdMap(np.asarray([f"user{u:03d}" for u in range(w.n_users)], dtype=object))
    p = TrainedPipeline.from_training(items, users, hist, models, {}, None, {"click": 1.0})
    folder = p.save(tmp_path_factory.mktemp("block") / "pipeline")
    assert not [f for f in folder.rglob("*") if f.suffix in (".pkl", ".pickle", ".pt", ".bin")]
    return TrainedPipeline.load(folder), cold


def test_cold_item_reaches_users_whose_history_matches_its_text(block_pipeline, block_world, tmp_path):
    p, cold = block_pipeline
    assert p.history.filter(pl.col(Columns.ItemIdx) == cold).height == 0
    out = export_recommendations(
        engine(p, k=20, scorer="text"), list(p.users.ids), tmp_path / "text.parquet", progress=False
    ).path
    df = pl.read_parquet(out).with_columns(pl.col(Columns.User).str.slice(4).cast(pl.Int64).alias("u"))
    got = set(df.filter(pl.col(Columns.Item) == f"item{cold:03d}")["u"].to_list())
    block = block_world.block_of_user
    own = np.flatnonzero(block == block_world.block_of_item[cold])
    # A user has 17 unseen items of its own topic plus the cold one: top-20 holds them all when the
    # text tower separates topics, and holds the cold item only when its text is scored like theirs.
    assert len(got & set(own)) >= 0.8 * len(own), "the cold item should reach the users of its topic"
    assert len(got - set(own)) <= 0.1 * (len(block) - len(own))
    # ALS cannot know the cold item: it never recommends it.
    als = engine(p, k=10, scorer="als").recommend(p.histories(list(p.users.ids)))
    assert f"item{cold:03d}" not in set(als[Columns.Item].to_list())


@pytest.mark.parametrize("scorer", ["text", "als", "itemknn"])
def test_new_user_with_a_history_gets_its_topic(block_pipeline, block_world, scorer):
    p, _ = block_pipeline
    block = 2
    hist_items = np.flatnonzero(block_world.block_of_item == block)[:5]
    given = pl.DataFrame({Columns.User: ["newcomer"] * 5, Columns.Item: [f"item{i:03d}" for i in hist_items]})
    out = engine(p, k=10, scorer=scorer).recommend(p.histories(["newcomer"], given))
    rec = out[Columns.Item].str.slice(4).cast(pl.Int64).to_numpy()
    assert len(rec) == 10 and not set(rec) & set(hist_items)
    assert (block_world.block_of_item[rec] == block).mean() >= 0.8
