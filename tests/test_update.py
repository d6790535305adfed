"""``python -m recsys.update``: new events and items into a trained pipeline, behind a gate."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
from export_support import REPO, trained_run

from recsys.cf.models import ALS, BPR, ItemKNN
from recsys.columns import Columns
from recsys.errors import InputError
from recsys.export.engine import Engine, ExplainOptions
from recsys.pipeline_model import TrainedPipeline
from recsys.rank.rules import BusinessRules

NAME = "recsys_update_test"
ITEM_COLUMNS = ["item_id", "title", "category", "description"]


def overrides(tmp: Path, events: Path, items: Path, *extra: str) -> list[str]:
    return [
        f"model_uri={trained_run().pipeline_dir}",
        f"register_name={NAME}",
        f"paths.mlruns_dir={tmp / 'mlruns'}",
        f"output={tmp / 'out'}",
        f"data.interactions={events}",
        f"data.items={items}",
        *extra,
    ]


def config(tmp: Path, events: Path, items: Path, *extra: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="update", overrides=overrides(tmp, events, items, *extra))


def champion() -> TrainedPipeline:
    return TrainedPipeline.load(trained_run().pipeline_dir)


def write(tmp: Path, events: pl.DataFrame, items: pl.DataFrame) -> tuple[Path, Path]:
    e, i = tmp / "events.csv", tmp / "items.csv"
    events.write_csv(e)
    items.write_csv(i)
    return e, i


def events_frame(rows: list[tuple[str, str, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            Columns.User: [r[0] for r in rows],
            Columns.Item: [r[1] for r in rows],
            Columns.Timestamp: [r[2] for r in rows],
            Columns.Event: ["click"] * len(rows),
        },
        schema={
            Columns.User: pl.String,
            Columns.Item: pl.String,
            Columns.Timestamp: pl.Int64,
            Columns.Event: pl.String,
        },
    )


def new_item(item_id: str, title: str = "Brand new yarn wool") -> pl.DataFrame:
    return pl.DataFrame({"item_id": [item_id], "title": [title], "category": ["knitting"], "description": ["crochet"]})


def top(p: TrainedPipeline, users: list[str], k: int = 10, given: pl.DataFrame | None = None) -> pl.DataFrame:
    rules = BusinessRules().compile(p.items, p.now)
    engine = Engine(p, rules, k, explain=ExplainOptions(enabled=False, top_features=0))
    return engine.recommend(p.histories(users, given))


def hit_events(p: TrainedPipeline, item: str, n_users: int, start: int, step: int = 60) -> list[tuple[str, str, int]]:
    users = p.users.ids[:n_users].tolist()
    return [(u, item, start + j * step) for j, u in enumerate(users)]


@pytest.mark.slow
def test_changed_text_is_reencoded_unchanged_is_not_and_a_new_hit_is_recommended(tmp_path):
    from recsys.update import run

    p = champion()
    old = p.items.head(3).select(ITEM_COLUMNS)
    changed = old.with_columns(
        pl.when(pl.col(Columns.Item) == old[Columns.Item][0])
        .then(pl.lit("An entirely different product"))
        .otherwise(pl.col("title"))
        .alias("title")
    )
    items = pl.concat([changed, new_item("NEW-HIT")])
    # Half the users buy the new item: a hit nobody could be recommended before.
    events = events_frame(hit_events(p, "NEW-HIT", len(p.users) // 2, p.now + 60))
    e, i = write(tmp_path, events, items)
    out = run(config(tmp_path, e, i, "gate.holdout=0.2"))
    # The changed text and the new item, not the two unchanged ones: by the fine-tuned tower, and
    # by the pre-fine-tuning encoder for the zero-shot feature this pipeline has.
    assert out["update/encoded_items"] == 2
    assert out["update/encoded_items_base"] == 2
    assert out["update/new_items"] == 1
    q = TrainedPipeline.load(tmp_path / "out" / "pipeline")
    vec = dict(zip(q.items[Columns.Item].to_list(), q.models["text"].item_embeddings, strict=True))
    before = dict(zip(p.items[Columns.Item].to_list(), p.models["text"].item_embeddings, strict=True))
    ids = old[Columns.Item].to_list()
    assert not np.allclose(vec[ids[0]], before[ids[0]])  # a new vector for the new text
    for item in ids[1:]:
        np.testing.assert_array_equal(vec[item], before[item])
    assert q.history.height == p.history.height + events.height
    # The new item reaches the users who have not bought it yet.
    others = p.users.ids[len(p.users) // 2 :].tolist()
    recs = top(q, others)
    share = recs.filter(pl.col(Columns.Item) == "NEW-HIT")[Columns.User].n_unique() / len(others)
    # Before the update nobody gets it (below); after it, a good share of the others do (29 % with
    # the smoke model's ranker, which weighs the new item's CF scores and popularity).
    assert share > 0.2, share
    assert not top(p, others).filter(pl.col(Columns.Item) == "NEW-HIT").height


@pytest.mark.slow
def test_gate_promotes_a_better_challenger(tmp_path):
    """Pre-holdout and held-out events are on a new item: only the challenger can recommend it."""
    from recsys.update import run

    p = champion()
    n = len(p.users)
    rows = hit_events(p, "NEW-HIT", n // 2, p.now + 60)
    rows += [(u, "NEW-HIT", p.now + 86400 + j) for j, u in enumerate(p.users.ids[n // 2 : n // 2 + 40].tolist())]
    e, i = write(tmp_path, events_frame(rows), new_item("NEW-HIT"))
    out = run(config(tmp_path, e, i, f"gate.holdout={40 / len(rows)}"))
    assert out["gate/users"] == 40
    assert out["gate/challenger_ndcg_at_10"] > out["gate/champion_ndcg_at_10"]
    # The paired difference and its interval, logged beside the verdict: clearly above 0 here.
    diff = out["gate/challenger_ndcg_at_10"] - out["gate/champion_ndcg_at_10"]
    assert out["gate/difference_ndcg_at_10"] == pytest.approx(diff)
    assert 0 < out["gate/difference_ndcg_at_10_ci95_low"] <= diff <= out["gate/difference_ndcg_at_10_ci95_high"]
    assert out["promoted"]
    client = mlflow.MlflowClient()
    version = out["version"]
    assert client.get_model_version_by_alias(NAME, "champion").version == int(version)
    assert client.get_model_version_by_alias(NAME, "challenger").version == int(version)


@pytest.mark.slow
def test_gate_keeps_the_champion_when_the_challenger_is_worse(tmp_path, capsys):
    """The held-out events are exactly the champion's own first choices, and the events before
    them push the challenger elsewhere: the champion scores NDCG 1, the challenger less."""
    from recsys.update import run

    p = champion()
    users = p.users.ids[:60].tolist()
    decoys = p.item_ids[:5].tolist()
    before = [(u, decoys[j % 5], p.now + 60 + j) for j, u in enumerate(p.users.ids.tolist())]
    known = pl.concat(
        [
            stored(p).filter(pl.col(Columns.User).is_in(users)),
            events_frame(before).select(
                Columns.User, Columns.Item, Columns.Timestamp, pl.lit(1.0, dtype=pl.Float32).alias(Columns.Weight)
            ),
        ]
    ).filter(pl.col(Columns.User).is_in(users))
    first = top(p, users, 1, known)
    after = [(u, i, p.now + 86400 + j) for j, (u, i) in enumerate(first.select(Columns.User, Columns.Item).iter_rows())]
    e, i = write(tmp_path, events_frame(before + after), p.items.head(1).select(ITEM_COLUMNS))
    out = run(config(tmp_path, e, i, f"gate.holdout={len(after) / (len(before) + len(after))}"))
    assert out["gate/champion_ndcg_at_10"] == pytest.approx(1.0)
    assert out["gate/challenger_ndcg_at_10"] < out["gate/champion_ndcg_at_10"]
    assert not out["promoted"]
    # The champion lacks these events: the next update of it must send them again, and says so.
    printed = capsys.readouterr().out
    assert f"@champion does not hold these {len(before) + len(after)} events and 0 new items" in printed
    assert str(e) in printed
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias(NAME, "challenger").version == int(out["version"])
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(NAME, "champion")  # never moved onto the challenger


def stored(p: TrainedPipeline) -> pl.DataFrame:
    from recsys.update import stored_events

    return stored_events(p)


def bad_cases(p: TrainedPipeline) -> dict[str, tuple[pl.DataFrame, pl.DataFrame, str, str]]:
    """name -> (events, items, file that is named, column that is named)."""
    u, item = p.users.ids[0], p.item_ids[0]
    later = p.now + 60
    ok_items = new_item("NEW-1")
    return {
        "event for an item with no text row": (
            events_frame([(u, "NOWHERE", later)]),
            ok_items,
            "events.csv",
            Columns.Item,
        ),
        "new item without text": (
            events_frame([(u, "NEW-1", later)]),
            ok_items.with_columns(pl.lit("").alias(c) for c in ("title", "category", "description")),
            "items.csv",
            "title",
        ),
        "older than the model": (events_frame([(u, item, p.now - 86400)]), ok_items, "events.csv", Columns.Timestamp),
        "duplicate event": (
            events_frame([(u, item, later), (u, item, later)]),
            ok_items,
            "events.csv",
            Columns.User,
        ),
        "event the model already holds": (held_event(p), ok_items, "events.csv", Columns.User),
    }


def held_event(p: TrainedPipeline) -> pl.DataFrame:
    """The model's last event (at its ``now``, so not older than its data), as a file row."""
    last = stored(p).filter(pl.col(Columns.Timestamp) == p.now).row(0, named=True)
    event = {w: e for e, w in p.event_weights.items()}[last[Columns.Weight]]
    return events_frame([(last[Columns.User], last[Columns.Item], p.now)]).with_columns(pl.lit(event).alias("event"))


@pytest.mark.parametrize(
    "case",
    [
        "event for an item with no text row",
        "new item without text",
        "older than the model",
        "duplicate event",
        "event the model already holds",
    ],
)
def test_bad_input_names_file_column_and_row_and_registers_nothing(tmp_path, case):
    from recsys.update import run

    events, items, file, column = bad_cases(champion())[case]
    e, i = write(tmp_path, events, items)
    with pytest.raises(InputError) as err:
        run(config(tmp_path, e, i, "data.duplicates=error"))
    msg = str(err.value)
    assert file in msg and f"column '{column}'" in msg and "row " in msg, msg
    assert not (tmp_path / "mlruns").exists()  # nothing logged, nothing registered
    assert not (tmp_path / "out").exists()


def header_only_items(tmp: Path, columns: list[str] = ITEM_COLUMNS) -> Path:
    path = tmp / "hdr.csv"
    path.write_text(",".join(columns) + "\n")
    return path


def test_a_header_only_item_file_is_an_update_without_new_items(tmp_path):
    """README: the item file "may hold header only". It was refused as an empty table."""
    from recsys.data.files import FileDataSource
    from recsys.update import read_new_data

    p = champion()
    e = tmp_path / "events.csv"
    events_frame(hit_events(p, p.item_ids[0], 3, p.now + 60)).write_csv(e)
    new = read_new_data(p, FileDataSource(str(e), str(header_only_items(tmp_path)), event_weights=p.event_weights))
    assert new.items.height == 0 and new.events.height == 3
    no_title = header_only_items(tmp_path, ["item_id", "description"])  # the header is still checked
    with pytest.raises(InputError) as err:
        read_new_data(p, FileDataSource(str(e), str(no_title), event_weights=p.event_weights))
    assert err.value.file == str(no_title) and err.value.column == "title", str(err.value)


@pytest.mark.slow  # trains the shared run through config()
def test_a_missing_events_file_is_named_not_the_item_file(tmp_path):
    from recsys.update import run

    missing = tmp_path / "events_since.csv"
    with pytest.raises(InputError, match="not found") as err:
        run(config(tmp_path, missing, header_only_items(tmp_path)))
    assert err.value.file == str(missing) and "hdr.csv" not in str(err.value), str(err.value)
    assert not (tmp_path / "mlruns").exists()


def test_update_errors_name_the_columns_as_the_file_does(tmp_path):
    """With ``data.column_map`` the checks against the model speak of ``time``, not ``timestamp``."""
    from recsys.data.files import FileDataSource
    from recsys.update import read_new_data

    p = champion()
    names = {"user_id": "customer", "item_id": "sku", "timestamp": "time"}
    e = tmp_path / "events.csv"
    events_frame([(p.users.ids[0], p.item_ids[0], p.now - 86400)]).rename(names).write_csv(e)
    items = header_only_items(tmp_path, ["sku", *ITEM_COLUMNS[1:]])
    source = FileDataSource(str(e), str(items), event_weights=p.event_weights, column_map=names)
    with pytest.raises(InputError, match="older than the model") as err:
        read_new_data(p, source)
    msg = str(err.value)
    assert err.value.column == "time" and "column 'time'" in msg and "maps timestamp to 'time'" in msg, msg
    assert {"customer", "sku", "time", "event"} <= set(err.value.example), msg
    assert not set(names) & set(err.value.example), msg


def test_an_output_folder_holding_a_saved_pipeline_is_refused_before_any_work(tmp_path):
    """The challenger is saved to ``output/pipeline`` last and never over an earlier one: a rerun
    with the same ``output`` is refused before the model or the new files are read."""
    from hydra import compose, initialize_config_dir

    from recsys.errors import ConfigError
    from recsys.update import run

    earlier = tmp_path / "out" / "pipeline"
    earlier.mkdir(parents=True)
    (earlier / "meta.json").write_text("{}")
    missing = tmp_path / "missing"  # no model, no files: an error if anything read them
    overrides = [f"model_uri={missing}", f"output={tmp_path / 'out'}", f"paths.mlruns_dir={tmp_path / 'mlruns'}"]
    overrides += [f"data.interactions={missing}.csv", f"data.items={missing}.csv"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="update", overrides=overrides)
    with pytest.raises(ConfigError, match=r"pipeline folder .*out/pipeline exists and is not empty.*\(output=\.\.\.\)"):
        run(cfg)
    assert (earlier / "meta.json").read_text() == "{}"
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_fold_in_keeps_the_item_side_and_folds_the_users_in(tmp_path):
    from recsys.update import run

    p = champion()
    buyers = len(p.users) // 2
    events = events_frame(hit_events(p, "NEW-HIT", buyers, p.now + 60))
    e, i = write(tmp_path, events, new_item("NEW-HIT"))
    run(config(tmp_path, e, i, "cf_mode=fold_in"))
    q = TrainedPipeline.load(tmp_path / "out" / "pipeline")
    assert {n for n, m in p.models.items() if isinstance(m, ALS | BPR)} == {"als", "bpr"}
    for name in ("als", "bpr"):
        f, g = p.models[name], q.models[name]
        np.testing.assert_array_equal(g.item_factors[: p.n_items], f.item_factors)
        assert not g.item_factors[p.n_items :].any()  # CF has not learnt the new item
        np.testing.assert_array_equal(g.user_factors[buyers:], f.user_factors[buyers:])
        assert not np.allclose(g.user_factors[:buyers], f.user_factors[:buyers])
    knn = [n for n, m in p.models.items() if isinstance(m, ItemKNN)]
    for name in knn:
        assert (q.models[name].similarity[: p.n_items, : p.n_items] != p.models[name].similarity).nnz == 0
    # The item statistics took the events: the new item is what most users bought lately, so it is
    # the popularity models' first item for the others (whether the ranker then lists it depends
    # on the weights it learned for popularity against CF, which knows nothing of the item).
    for name in ("popularity", "recent_popularity"):
        assert q.items[Columns.Item][int(np.argmax(q.models[name].counts))] == "NEW-HIT", name


@pytest.mark.slow
def test_a_cold_refit_starts_sasrec_from_the_refreshed_text_towers_item_vectors(tmp_path, monkeypatch):
    # The champion's SASRec starts from text (text_init_std): refitted cold (no warm_iterations)
    # over the grown catalogue, it starts from the text tower's vectors of every item, the new one's too.
    from recsys.cf.sasrec import SASRec
    from recsys.update import run

    p = champion()
    given = []
    fit = SASRec.fit

    def spy(self, history, start=None, item_text=None):
        given.append((start, item_text))
        return fit(self, history, start=start, item_text=item_text)

    monkeypatch.setattr(SASRec, "fit", spy)
    e, i = write(tmp_path, events_frame(hit_events(p, "NEW-HIT", 20, p.now + 60)), new_item("NEW-HIT"))
    run(config(tmp_path, e, i, "warm_iterations=null"))
    q = TrainedPipeline.load(tmp_path / "out" / "pipeline")
    assert q.n_items == p.n_items + 1 and given and all(start is None for start, _ in given)
    served = q.models["text"].item_space()
    assert any(np.array_equal(text, served) for _, text in given)  # the challenger's fit (the gate's too)


@pytest.mark.slow
def test_a_grown_catalogue_a_refitted_model_cannot_fit_is_refused_before_any_encoding(tmp_path, monkeypatch):
    from recsys.errors import ConfigError
    from recsys.update import TextRefresher, run

    p = champion()
    monkeypatch.setattr("recsys.cf.sasrec.FULL_SOFTMAX_ITEMS", p.n_items)  # the one new item is too many
    monkeypatch.setattr(TextRefresher, "start", lambda *a: pytest.fail("new texts encoded before the check"))
    e, i = write(tmp_path, events_frame(hit_events(p, "NEW-HIT", 20, p.now + 60)), new_item("NEW-HIT"))
    with pytest.raises(ConfigError, match=rf"full softmax over {p.n_items + 1:,} items is past {p.n_items:,}"):
        run(config(tmp_path, e, i))
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cf_mode=fold_in", "warm_iterations=1"])
def test_sasrec_places_a_new_item_by_its_refreshed_text(tmp_path, mode):
    # Kept (fold_in) or continued from (a warm refit), the network gets the new item from the
    # text projection of the refreshed tower's vectors, not the mean item vector.
    from recsys.cf.sasrec import SASRec
    from recsys.update import run

    p = champion()
    e, i = write(tmp_path, events_frame(hit_events(p, "NEW-HIT", 20, p.now + 60)), new_item("NEW-HIT"))
    run(config(tmp_path, e, i, mode))
    q = TrainedPipeline.load(tmp_path / "out" / "pipeline")
    name = next(n for n, m in p.models.items() if isinstance(m, SASRec))
    placed = p.models[name].with_items(q.n_items, q.models["text"].item_space())
    mean = p.models[name].with_items(q.n_items)
    if mode == "cf_mode=fold_in":  # the network kept as placed
        np.testing.assert_allclose(q.models[name].item_vectors, placed.item_vectors, rtol=1e-6)
    else:  # one epoch on from there: nearer the placed start than the mean one
        got = q.models[name].item_vectors[-1]
        assert np.linalg.norm(got - placed.item_vectors[-1]) < np.linalg.norm(got - mean.item_vectors[-1])


@pytest.mark.slow
def test_texts_encoded_in_a_worker_process_are_those_encoded_in_process():
    """``python -m recsys.update`` encodes in a worker process (it has not imported transformers);
    the vectors are the in-process ones, and only the new and changed rows differ from the model's."""
    from omegaconf import OmegaConf

    from recsys.update import EncoderWorker, TextRefresher, merge_items

    p = champion()
    folder = trained_run().pipeline_dir
    changed_id = p.items[Columns.Item][0]
    new = pl.DataFrame(
        {Columns.Item: [changed_id, "NEW-X"], Columns.Text: ["An entirely different product", "Brand new yarn wool"]}
    )
    catalogue = merge_items(p.items, new)
    assert catalogue.encode.tolist() == [0, p.n_items]
    config = OmegaConf.load(folder / "config.yaml")
    parts = {}
    for in_process in (True, False):
        bert = p.models["text"].bert
        texts = TextRefresher(folder, "text", bert.max_length, config, None if in_process else EncoderWorker())
        texts.start(catalogue, p.n_items)
        parts[in_process] = texts.refresh(p, catalogue)
        assert (texts.encoded, texts.encoded_base) == (2, 2)
    a, b = parts[True], parts[False]
    assert set(a) == set(b) == {"text", "text_zeroshot"}
    for name, tower in a.items():
        np.testing.assert_allclose(tower.item_embeddings, b[name].item_embeddings, atol=1e-6)
    emb, old = a["text"].item_embeddings, p.models["text"].item_embeddings
    np.testing.assert_array_equal(emb[1 : p.n_items], old[1:])
    assert not np.allclose(emb[0], old[0])
    assert emb.shape == (p.n_items + 1, old.shape[1])


def test_gate_ranks_champion_and_challenger_as_of_the_same_moment():
    """The gate ranked each pipeline as of its own ``now`` (the end of its stored history): the
    champion's availability windows were checked, and its users' idle days counted, at the
    champion's end, though the histories the gate gave it ran on to the holdout; the
    challenger's at the holdout's start. Two pipelines that know the same events and differ only
    in ``now`` scored differently; they must score the same."""
    import dataclasses

    from recsys.update import NewData, run_gate

    p = champion()
    hit = p.item_ids[int(np.argmax(p.models["popularity"].counts))]
    # The most popular item, listed (again) a day before the champion's end.
    items = p.items.with_columns(
        pl.when(pl.col(Columns.Item) == hit).then(pl.lit(p.now - 86400)).otherwise(None).alias("available_from")
    )
    champ = dataclasses.replace(p, items=items)
    earlier = dataclasses.replace(p, items=items, now=p.now - 2 * 86400)  # the same events, an earlier clock
    seen = stored(p).filter(pl.col(Columns.Item) == hit)[Columns.User].unique()
    fresh = [u for u in p.users.ids.tolist() if u not in set(seen.to_list())][:40]
    before = events_frame([(u, p.item_ids[0], p.now + 60 + j) for j, u in enumerate(fresh)])
    before = before.select(
        Columns.User, Columns.Item, Columns.Timestamp, pl.lit(1.0, dtype=pl.Float32).alias(Columns.Weight)
    )
    holdout = events_frame([(u, hit, p.now + 86400 + j) for j, u in enumerate(fresh)])
    gate = run_gate(champ, earlier, NewData(p.items.head(0), before, {}), holdout, 10, 0.0)
    assert gate.champion_recall > 0  # the hit is in some lists: the windows matter
    assert gate.challenger == gate.champion and gate.challenger_recall == gate.champion_recall, gate
    # The paired difference over the same users: exactly zero here, reported with the verdict.
    assert gate.n_users == 40 and (gate.difference.low, gate.difference.high) == (0.0, 0.0)
    assert "+0.0000 (95% CI +0.0000..+0.0000) over 40 users (tolerance 0.0)" in gate.describe(10)


def test_a_new_item_without_text_says_what_an_update_can_do(tmp_path):
    """The error said ``set data.missing_text=drop or keep``, a setting the update does not have
    (both ``data.missing_text=...`` and ``+data.missing_text=...`` are refused)."""
    from recsys.update import run

    events, items, *_ = bad_cases(champion())["new item without text"]
    e, i = write(tmp_path, events, items)
    with pytest.raises(InputError) as err:
        run(config(tmp_path, e, i))
    msg = str(err.value)
    assert "data.missing_text" not in msg, msg
    assert "give these items a text, or leave their rows out of this file" in msg, msg


def test_update_error_examples_are_the_file_rows_and_the_model_end_is_also_iso(tmp_path):
    """The "older than the model's data" error gave the model's end in Unix seconds only, and its
    example row, like that of "already in the model", showed a ``weight`` column the file does
    not have (the loader derives it from ``event``)."""
    from datetime import UTC, datetime

    from recsys.data.files import FileDataSource
    from recsys.update import read_new_data

    p = champion()
    sent = {"user_id", "item_id", "timestamp", "event"}
    items = header_only_items(tmp_path)
    cases = {"older": (events_frame([(p.users.ids[0], p.item_ids[0], p.now - 86400)]), "older than the model")}
    cases["held"] = (held_event(p), "already in the model")
    for name, (events, match) in cases.items():
        e = tmp_path / f"{name}.csv"
        events.write_csv(e)
        source = FileDataSource(str(e), str(items), event_weights=p.event_weights)
        with pytest.raises(InputError, match=match) as err:
            read_new_data(p, source, "error")
        assert set(err.value.example) == sent, str(err.value)
    err = pytest.raises(InputError, read_new_data, p, FileDataSource(str(tmp_path / "older.csv"), str(items)))
    end = datetime.fromtimestamp(p.now, UTC).isoformat()
    assert f"(it ends at {p.now}, {end})" in str(err.value), str(err.value)


def test_an_event_for_an_unknown_item_says_it_is_neither_in_the_model_nor_in_the_item_file(tmp_path):
    """The error said the id "has no row in items.csv", as if the item file were the only place
    an update's item may be: it may be in the model's catalogue too."""
    from recsys.data.files import FileDataSource
    from recsys.update import read_new_data

    p = champion()
    e = tmp_path / "events.csv"
    events_frame([(p.users.ids[0], "NOWHERE", p.now + 60)]).write_csv(e)
    items = header_only_items(tmp_path)
    with pytest.raises(InputError) as err:
        read_new_data(p, FileDataSource(str(e), str(items), event_weights=p.event_weights))
    msg = str(err.value)
    assert f"neither in the model's catalogue nor in {items} (add its row, with its text, to that file)" in msg, msg
    assert err.value.example[Columns.Item] == "NOWHERE", msg


def test_events_the_model_holds_are_duplicates_whatever_their_time(tmp_path):
    """A rerun of an update, or a file overlapping the last one, repeats events the model holds.
    ``data.duplicates`` (default drop) says what to do with them; they were refused as "older
    than the model's data ... retrain to change the past" unless they were at the model's end."""
    from recsys.data.files import FileDataSource
    from recsys.update import read_new_data

    p = champion()
    names = {w: e for e, w in p.event_weights.items()}
    held = stored(p).filter(pl.col(Columns.Timestamp) < p.now - 86400).head(3)
    repeated = held.select(
        Columns.User, Columns.Item, Columns.Timestamp, pl.col(Columns.Weight).replace_strict(names).alias(Columns.Event)
    )
    fresh = events_frame(hit_events(p, p.item_ids[0], 2, p.now + 60))
    e = tmp_path / "events.csv"
    pl.concat([repeated, fresh]).write_csv(e)
    items = header_only_items(tmp_path)

    new = read_new_data(p, FileDataSource(str(e), str(items), event_weights=p.event_weights))
    assert new.events.select(Columns.User, Columns.Item, Columns.Timestamp).equals(
        fresh.select(Columns.User, Columns.Item, Columns.Timestamp)
    )
    assert new.report["duplicates_of_model_events_dropped"] == 3

    with pytest.raises(InputError, match="3 event\\(s\\) are already in the model") as err:
        read_new_data(p, FileDataSource(str(e), str(items), event_weights=p.event_weights), duplicates="error")
    assert err.value.row == 1 and err.value.column == Columns.User, str(err.value)

    # A new event older than the model is still refused, named by its own row.
    older = events_frame([(p.users.ids[0], p.item_ids[1], p.now - 1)])
    pl.concat([repeated, older]).write_csv(e)
    with pytest.raises(InputError, match="1 event\\(s\\) are older than the model's data") as err:
        read_new_data(p, FileDataSource(str(e), str(items), event_weights=p.event_weights))
    assert err.value.row == 4, str(err.value)


@pytest.mark.slow
def test_an_update_from_an_alias_records_the_version_it_updated(tmp_path):
    """``updated_from`` (the saved pipeline's meta.json, the update run's params) was the URI as
    given, ``models:/NAME@challenger``: the alias moves on (here to this very update), so the
    lineage named no version. It is now the version the alias pointed at."""
    import json

    from recsys.update import run

    p = champion()
    first = tmp_path / "first"
    e, i = write(first.parent, events_frame(hit_events(p, p.item_ids[0], 10, p.now + 60)), new_item("NEW-1"))
    v1 = run(config(first, e, i))["version"]
    mlruns = f"paths.mlruns_dir={first / 'mlruns'}"
    e2 = tmp_path / "events2.csv"
    events_frame(hit_events(p, "NEW-1", 10, p.now + 86400)).write_csv(e2)
    out = run(
        config(tmp_path / "second", e2, header_only_items(tmp_path), f"model_uri=models:/{NAME}@challenger", mlruns)
    )
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias(NAME, "challenger").version == int(out["version"]) != int(v1)
    meta = json.loads((tmp_path / "second" / "out" / "pipeline" / "meta.json").read_text())
    assert meta["info"]["updated_from"] == f"models:/{NAME}/{v1}", meta["info"]
    params = client.get_run(meta["info"]["run_id"]).data.params
    assert params["updated_from"] == f"models:/{NAME}/{v1}" and params["model_uri"] == f"models:/{NAME}@challenger"


def test_an_update_records_the_data_it_was_fitted_on_and_the_training_it_descends_from():
    """An update's meta.json kept the training's dataset_hash: the exported manifest of an updated
    model named data that lacked the update's events. Its hash now chains the parent's with the
    update's events and items; the training's stays, as training_dataset_hash."""
    from recsys.update import NewData, provenance

    trained = {"run_id": "train-run", "dataset": "generated", "dataset_hash": "f9c3a043c64708fd", "config_hash": "c"}
    events = events_frame([("U1", "I1", 100), ("U2", "I2", 160)]).select(
        Columns.User, Columns.Item, Columns.Timestamp, pl.lit(1.0, dtype=pl.Float32).alias(Columns.Weight)
    )
    items = pl.DataFrame({Columns.Item: ["I9"], Columns.Text: ["Brand new yarn wool"]})
    new = NewData(items, events, {})
    first = provenance(trained, new, "update-run", "models:/recsys/1")
    assert first["dataset_hash"] != trained["dataset_hash"]
    assert first["run_id"] == "update-run" and first["updated_from"] == "models:/recsys/1"
    assert first["training_dataset_hash"] == trained["dataset_hash"]
    assert first["training_run_id"] == "train-run"
    assert first["dataset"] == "generated" and first["config_hash"] == "c"
    # The same data gives the same hash; other events, or other item texts, another.
    assert provenance(trained, new, "another-run", "models:/recsys/1")["dataset_hash"] == first["dataset_hash"]
    fewer = NewData(items, events.head(1), {})
    assert provenance(trained, fewer, "update-run", "models:/recsys/1")["dataset_hash"] != first["dataset_hash"]
    renamed = NewData(items.with_columns(pl.lit("Old yarn").alias(Columns.Text)), events, {})
    assert provenance(trained, renamed, "update-run", "models:/recsys/1")["dataset_hash"] != first["dataset_hash"]
    # An update of the update chains on from it and still names the training.
    second = provenance(first, new, "update-run-2", "models:/recsys/2")
    assert second["dataset_hash"] not in (first["dataset_hash"], trained["dataset_hash"])
    assert second["training_dataset_hash"] == trained["dataset_hash"] and second["training_run_id"] == "train-run"
    # An update made before these keys: its dataset_hash was the training's, its run_id its own.
    old = {**trained, "run_id": "old-update-run", "updated_from": "models:/recsys/1"}
    after_old = provenance(old, new, "update-run-3", "models:/recsys/2")
    assert after_old["training_dataset_hash"] == trained["dataset_hash"] and after_old["training_run_id"] is None


@pytest.mark.slow
def test_the_export_of_an_updated_model_names_the_data_the_update_was_fitted_on(tmp_path):
    import json

    from hydra import compose, initialize_config_dir

    from recsys.recommend import run as recommend
    from recsys.update import run

    p = champion()
    e, i = write(tmp_path, events_frame(hit_events(p, p.item_ids[0], 10, p.now + 60)), new_item("NEW-1"))
    version = run(config(tmp_path, e, i))["version"]
    meta = json.loads((tmp_path / "out" / "pipeline" / "meta.json").read_text())["info"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="recommend",
            overrides=[
                f"model_uri=models:/{NAME}/{version}",
                f"paths.mlruns_dir={tmp_path / 'mlruns'}",
                f"output={tmp_path / 'recs' / 'recommendations.parquet'}",
                "k=5",
                "progress=false",
            ],
        )
    manifest = recommend(cfg).manifest
    assert manifest["dataset_hash"] == meta["dataset_hash"] != p.meta["dataset_hash"]
    assert manifest["training_dataset_hash"] == p.meta["dataset_hash"]
    assert manifest["training_run_id"] == p.meta["run_id"]
    assert manifest["run_id"] == meta["run_id"] != p.meta["run_id"]  # the update's run
    assert manifest["updated_from"] == str(trained_run().pipeline_dir)
    client = mlflow.MlflowClient()
    assert client.get_run(meta["run_id"]).data.tags["dataset_hash"] == meta["dataset_hash"]


# The update in a process of its own, killed (as by kill -9) once its model version is registered,
# when it sets the version's first alias.
KILLED_AFTER_REGISTERING = """
import os, signal, sys

import mlflow
from hydra import compose, initialize_config_dir

from recsys.update import run


def kill(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


mlflow.MlflowClient.set_registered_model_alias = kill
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    run(compose(config_name="update", overrides=sys.argv[2:]))
"""


@pytest.mark.slow
def test_an_update_killed_after_registering_leaves_its_verdict_and_its_run_is_ended_next_time(tmp_path):
    """Killed between registering its version and the gate's alias moves, an update left a version
    with nothing saying whether it had passed the gate, and its MLflow run RUNNING for ever. The
    version now carries the verdict from its creation, and the next update marks the run KILLED."""
    import subprocess
    import sys

    from recsys.tracking import tracking_uri
    from recsys.update import run

    p = champion()
    e, i = write(tmp_path, events_frame(hit_events(p, p.item_ids[0], 10, p.now + 60)), new_item("NEW-1"))
    args = overrides(tmp_path, e, i, f"output={tmp_path / 'killed'}")
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_REGISTERING, str(REPO / "conf"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri(tmp_path / "mlruns"))
    (version,) = client.search_model_versions(f"name='{NAME}'")
    assert not version.aliases  # killed before @challenger (and @champion) were set
    assert version.tags["gate"] in ("passed", "failed"), version.tags
    assert version.tags["gate_result"].startswith("gate NDCG@10 champion"), version.tags
    killed = client.get_run(version.run_id)
    assert killed.info.status == "RUNNING"
    assert "gate/champion_ndcg_at_10" in killed.data.metrics  # the gate's figures came first
    out = run(config(tmp_path, e, i))
    assert client.get_run(version.run_id).info.status == "KILLED"
    assert client.get_model_version(NAME, out["version"]).tags["gate"] == ("passed" if out["promoted"] else "failed")
