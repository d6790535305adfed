"""The sequence user tower (``text.user_tower=sequence``): it learns what the order of a history says.

The order world: the catalogue holds cue items and two groups of answer items. Every user's log is
a chain of triples ``x, y, answer``: two different cues, then an item of the group that a fixed
random tournament picks for the *ordered* pair (``x`` then ``y`` leads to one group, ``y`` then
``x`` to the other). The bag of a history is the same whichever order its cues came in, and a
pooled user vector is a weighted sum of its items, so the answer group's score is a convex
combination of per-cue terms: for two cues whose terms have the same sign it cannot depend on
their order. A transformer over the history can read the order. The control world draws the
answer group at random: no tower can learn it, and the sequence tower must not beat the mean
tower there (its gain above comes from training on order, not from the evaluation).
"""

from __future__ import annotations

import lightning as L
import numpy as np
import polars as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from recsys.columns import Columns
from recsys.errors import ConfigError
from recsys.recommender import History
from recsys.text.datamodule import TextDataModule
from recsys.text.encoder import ItemEncoder, TwoTower, UserEncoder
from recsys.text.fit import fine_tune
from recsys.text.module import TextTowerModule
from recsys.text.options import check_options
from recsys.text.recommender import TextRecommender
from recsys.text.sequence import SequenceUserEncoder, check_user_tower

CUES, GROUP = 6, 8  # cue items, items per answer group


def order_world(ordered: bool = True, n_users: int = 960, triples: int = 4, seed: int = 0):
    """Texts, the full history, and each user's last event (an answer) as the held-out target."""
    from recsys.data.synthetic import TOPICS

    rng = np.random.default_rng(seed)
    words = [w for ws in TOPICS.values() for w in ws]
    n_items = CUES + 2 * GROUP
    texts = [" ".join(rng.choice(words, 3, replace=False)) for _ in range(n_items)]
    upper = rng.integers(0, 2, (CUES, CUES))
    group = np.where(np.triu(np.ones((CUES, CUES), bool), 1), upper, 1 - upper.T)  # group[x, y] != group[y, x]
    rows = []
    for u in range(n_users):
        t = 0
        for _ in range(triples):
            x, y = rng.choice(CUES, 2, replace=False)
            g = group[x, y] if ordered else rng.integers(0, 2)
            answer = CUES + g * GROUP + rng.integers(0, GROUP)
            # Cues are random: their events weigh little in the loss, the answers are what is learnable.
            for item, w in ((x, 0.1), (y, 0.1), (answer, 1.0)):
                rows.append((u, int(item), 1_000 + t, w))
                t += 1
    df = (
        pl.DataFrame(rows, schema=[Columns.UserIdx, Columns.ItemIdx, Columns.Timestamp, Columns.Weight], orient="row")
        .with_columns(pl.col(Columns.Weight).cast(pl.Float32))
        .sort(Columns.UserIdx, Columns.Timestamp)
    )
    return texts, df, n_users, n_items


def heldout_ndcg(net: TwoTower, ids, lengths, history: History, targets: pl.DataFrame) -> float:
    """Mean NDCG@10 of each target, full catalogue, the user's seen items removed. Users are
    embedded by the training graph (``TwoTower.user_embeddings``): the sequence tower has no
    serving implementation yet (``HistoryTower`` reads the mean tower only)."""
    net.eval()
    with torch.no_grad():
        items = TextRecommender.from_tokens(net, ids, lengths).item_embeddings
        users_emb = net.user_embeddings(items, history.sequences).numpy()
    users = targets[Columns.UserIdx].to_numpy()
    scores = users_emb[users] @ items.numpy().T
    for row, u in enumerate(users):
        scores[row, history.sequences[u]] = -np.inf
    target = scores[np.arange(len(users)), targets[Columns.ItemIdx].to_numpy()]
    rank = (scores > target[:, None]).sum(1)
    return float(np.where(rank < 10, 1.0 / np.log2(rank + 2.0), 0.0).mean())


def train_tower(
    tokenizer_path: str, ckpt_dir, user_tower: str, ordered: bool = True, steps: int = 300, lr: float = 3e-3
) -> dict:
    """Fine-tune on frozen tiny-BERT vectors (the job's path); users' last answers are held out,
    even users' for validation (early stopping, step-0 competition), odd users' for the test."""
    L.seed_everything(0, verbose=False)
    texts, df, n_users, n_items = order_world(ordered)
    last = df.group_by(Columns.UserIdx).agg(pl.col(Columns.Timestamp).max().alias("_last"))
    df = df.join(last, on=Columns.UserIdx)
    held = df.filter(pl.col(Columns.Timestamp) == pl.col("_last")).drop("_last")
    train = History(df.filter(pl.col(Columns.Timestamp) < pl.col("_last")).drop("_last"), n_users, n_items)
    val = held.filter(pl.col(Columns.UserIdx) % 2 == 0)
    test = held.filter(pl.col(Columns.UserIdx) % 2 == 1)
    encoder = ItemEncoder.random(tokenizer=tokenizer_path, seed=0, adapter_hidden=64)
    ids, lengths = encoder.tokenize(texts)
    # The user side is under test: the frozen "BERT" vectors are distinct random unit vectors (a
    # tiny random BERT gives near-parallel ones, cosine ~0.85, and the test would measure the
    # adapter's speed at pulling them apart). Training and evaluation both read them.
    base = torch.nn.functional.normalize(
        torch.randn(n_items, encoder.dim, generator=torch.Generator().manual_seed(1)), dim=-1
    )
    encoder.base_vectors = lambda *args, **kwargs: base.clone()
    sequence = {"width": 32, "layers": 1, "heads": 2, "dropout": 0.0}
    net = TwoTower(encoder, max_history=6, user_tower=user_tower, sequence=sequence)
    dm = TextDataModule(
        item_ids=ids,
        item_lengths=lengths,
        train=train,
        val=val,
        batch_size=64,
        steps_per_epoch=50,
        max_history=6,
        item_tokens=False,
        uniform_negatives=0,
    )
    # The job's selection: the best validation checkpoint is restored (the step-0 weights compete).
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/ndcg_at_10", mode="max", save_top_k=1)
    trainer = L.Trainer(
        logger=False,
        callbacks=[best],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        max_steps=steps,
        max_epochs=-1,
        deterministic=True,
    )

    def factory(net):
        return TextTowerModule(net=net, train_bert=False, lr_adapter=lr, lr_head=lr, warmup_steps=1)

    net, metrics, _ = fine_tune(net, dm, factory, trainer)
    return {"test": heldout_ndcg(net, ids, lengths, train, test), "metrics": metrics}


@pytest.mark.slow
def test_the_sequence_tower_learns_what_the_order_of_a_history_says(tokenizer_path, tmp_path):
    mean = train_tower(tokenizer_path, tmp_path / "mean", "mean")
    seq = train_tower(tokenizer_path, tmp_path / "seq", "sequence")
    # Held-out answers (never trained on, nor used for early stopping): a tower that knows the
    # group ranks the target among its 20 items; the pooled tower knows it for some cue pairs only.
    assert seq["test"] >= mean["test"] + 0.1, (mean, seq)
    assert seq["metrics"]["text/kept_zeroshot"] == 0.0


@pytest.mark.slow
def test_where_order_says_nothing_the_sequence_tower_gains_nothing(tokenizer_path, tmp_path):
    mean = train_tower(tokenizer_path, tmp_path / "mean", "mean", ordered=False)
    seq = train_tower(tokenizer_path, tmp_path / "seq", "sequence", ordered=False)
    # Both rank the same random targets: any difference is noise (+0.02 to +0.04 over 3 worlds,
    # where the ordered world gave +0.16 to +0.18).
    assert seq["test"] <= mean["test"] + 0.06, (mean, seq)


def test_the_sequence_tower_starts_as_the_mean_tower():
    torch.manual_seed(0)
    d, max_history = 16, 5
    seq, mean = SequenceUserEncoder(d, max_history, recency_decay=0.3), UserEncoder(d, max_history, 0.3)
    hist = torch.nn.functional.normalize(torch.randn(4, max_history, d), dim=-1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    seq.train()  # dropout on: the zero output projection still hides the branch
    torch.testing.assert_close(seq(hist, mask), mean(hist, mask))
    assert torch.isfinite(seq(hist, mask)).all()  # the user without history gets no NaN
    assert seq(hist, mask)[2].abs().sum() == 0


def test_the_sequence_tower_reads_order_once_trained():
    """After any change to its output projection, swapping two history items changes the user."""
    torch.manual_seed(0)
    seq = SequenceUserEncoder(16, 4, dropout=0.0).eval()
    torch.nn.init.normal_(seq.out.weight)
    hist = torch.nn.functional.normalize(torch.randn(1, 4, 16), dim=-1)
    mask = torch.ones(1, 4, dtype=torch.bool)
    swapped = hist[:, [1, 0, 2, 3]]
    assert not torch.allclose(seq(hist, mask), seq(swapped, mask))
    # The pooling tower alone, with equal position weights, cannot tell the two orders apart.
    seq.pool.position_bias.data.zero_()
    torch.nn.init.zeros_(seq.out.weight)
    torch.testing.assert_close(seq(hist, mask), seq(swapped, mask))


@pytest.mark.parametrize(
    ("net", "name"),
    [
        ({"user_tower": "transformer"}, "text.user_tower"),
        ({"user_tower": "sequence", "sequence": {"layers": 0}}, "text.sequence.layers"),
        ({"user_tower": "sequence", "sequence": {"width": 30, "heads": 4}}, "text.sequence.width"),
        ({"user_tower": "sequence", "sequence": {"dropout": 1.5}}, "text.sequence.dropout"),
        ({"user_tower": "sequence", "sequence": {"depth": 2}}, "text.sequence"),
    ],
)
def test_bad_user_tower_options_are_named_before_any_work(net, name):
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        check_options(1.5, {}, {}, net, served=False)
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        check_user_tower(net["user_tower"], net.get("sequence"))


def test_the_job_refuses_a_user_tower_its_export_cannot_serve():
    """The job exports the tower for serving, whose user side is the mean tower's formula: a
    sequence tower would fail there, after all the training, so the job refuses it up front."""
    with pytest.raises(ConfigError, match=r"text\.user_tower=sequence cannot be served"):
        check_options(1.5, {}, {}, {"user_tower": "sequence"})
    check_options(1.5, {}, {}, {"user_tower": "sequence"}, served=False)
    check_options(1.5, {}, {}, {"user_tower": "mean"})


def test_the_sequence_tower_saves_and_loads_itself(tmp_path):
    """What serving needs: one file rebuilds the tower, and the users it embeds are the same."""
    from recsys.errors import InputError

    torch.manual_seed(0)
    tower = SequenceUserEncoder(16, 5, recency_decay=0.3, width=8, layers=2, heads=2).eval()
    torch.nn.init.normal_(tower.out.weight)  # a trained branch, not the zero start
    items = torch.nn.functional.normalize(torch.randn(30, 16), dim=-1)
    histories = [np.array([3, 1, 4, 1, 5, 9, 2]), np.array([], dtype=np.int64), np.array([7])]
    tower.save(tmp_path / "user_tower.safetensors")
    loaded = SequenceUserEncoder.load(tmp_path / "user_tower.safetensors")
    assert loaded.options() == tower.options() and not loaded.training
    torch.testing.assert_close(loaded.embed_histories(items, histories), tower.embed_histories(items, histories))
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00")
    with pytest.raises(InputError, match="bad.safetensors"):
        SequenceUserEncoder.load(tmp_path / "bad.safetensors")
