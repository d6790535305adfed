"""Fine-tuning on frozen BERT vectors (the job's default): the adapter learns what zero-shot misses.

The world: every item's text is one *key* word among seven noise words drawn from one shared
pool, and every user only takes items with their key word. A mean-pooled BERT vector is mostly
noise words, so the zero-shot tower ranks a user's key items only a little above the rest; the
preference is learnable from the clicks alone (the key word is 1/8 of each text).
"""

from __future__ import annotations

import lightning as L
import numpy as np
import polars as pl
import pytest
import torch

from recsys.columns import Columns
from recsys.data import LeaveLastOutSplit
from recsys.errors import ConfigError
from recsys.recommender import History
from recsys.text.datamodule import TextDataModule
from recsys.text.encoder import ItemEncoder, TextAdapter, TwoTower
from recsys.text.fit import fine_tune, zero_shot_copy
from recsys.text.module import TextTowerModule
from recsys.text.options import budget, check_options
from recsys.text.recommender import TextRecommender

KEYS = ["red", "blue", "green", "gold"]


def key_world(items_per_key: int = 30, users_per_key: int = 25, events: int = 9, seed: int = 0):
    from recsys.data.synthetic import TOPICS

    rng = np.random.default_rng(seed)
    noise = [w for words in TOPICS.values() for w in words]
    texts, key_of_item = [], []
    for k, key in enumerate(KEYS):
        for _ in range(items_per_key):
            words = [key, *rng.choice(noise, 7, replace=False)]
            rng.shuffle(words)
            texts.append(" ".join(words))
            key_of_item.append(k)
    key_of_item = np.array(key_of_item)
    n_users = len(KEYS) * users_per_key
    rows = []
    for u in range(n_users):
        chosen = rng.choice(np.flatnonzero(key_of_item == u % len(KEYS)), events, replace=False)
        rows += [(u, int(i), 1_000 + t) for t, i in enumerate(chosen)]
    df = (
        pl.DataFrame(rows, schema=[Columns.UserIdx, Columns.ItemIdx, Columns.Timestamp], orient="row")
        .with_columns(pl.lit(1.0, dtype=pl.Float32).alias(Columns.Weight))
        .sort(Columns.UserIdx, Columns.Timestamp)
    )
    return texts, History(df, n_users, len(texts))


def heldout_ndcg(net: TwoTower, ids, lengths, history: History, targets: pl.DataFrame) -> float:
    """Mean NDCG@10 of each user's held-out target, full catalogue, seen items removed."""
    rec = TextRecommender.from_tokens(net, ids, lengths).fit(history)
    users = targets[Columns.UserIdx].to_numpy()
    scores = rec.score_users(users)
    for row, u in enumerate(users):
        scores[row, history.sequences[u]] = -np.inf
    target = scores[np.arange(len(users)), targets[Columns.ItemIdx].to_numpy()]
    rank = (scores > target[:, None]).sum(1)
    return float(np.where(rank < 10, 1.0 / np.log2(rank + 2.0), 0.0).mean())


def train_on_key_world(
    tokenizer_path: str,
    lr: float = 3e-3,
    epochs: int = 6,
    interpolation=(1.0,),
    checkpoint_dir=None,
    min_z=0.0,
    decile_min_z=None,
    callbacks=(),
):
    L.seed_everything(0, verbose=False)
    texts, h = key_world()
    split = LeaveLastOutSplit(n_val=1, n_test=1).split(h.interactions)
    train = History(split.train, h.n_users, h.n_items)
    encoder = ItemEncoder.random(tokenizer=tokenizer_path, seed=0, adapter_hidden=64)
    ids, lengths = encoder.tokenize(texts)
    net = TwoTower(encoder, max_history=10)
    zero = zero_shot_copy(net)
    dm = TextDataModule(
        item_ids=ids,
        item_lengths=lengths,
        train=train,
        val=split.val,
        batch_size=32,
        steps_per_epoch=40,
        max_history=10,
        item_tokens=False,
        uniform_negatives=32,
    )
    trainer = L.Trainer(
        logger=False,
        enable_checkpointing=checkpoint_dir is not None,
        callbacks=[*callbacks, *([] if checkpoint_dir is None else [best_checkpoint(checkpoint_dir)])],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        max_epochs=epochs,
        deterministic=True,
    )

    def factory(net):
        return TextTowerModule(
            net=net,
            train_bert=False,
            lr_adapter=lr,
            lr_head=lr,
            warmup_steps=1,
            interpolation=interpolation,
            interpolation_min_z=min_z,
            decile_min_z=decile_min_z,
        )

    bert_before = {k: v.clone() for k, v in encoder.bert.state_dict().items()}
    net, metrics, curve = fine_tune(net, dm, factory, trainer)
    test_history = train.extend(split.val)
    return {
        "zero": heldout_ndcg(zero, ids, lengths, test_history, split.test),
        "tuned": heldout_ndcg(net, ids, lengths, test_history, split.test),
        "metrics": metrics,
        "curve": curve,
        "bert_unchanged": all(torch.equal(v, bert_before[k]) for k, v in encoder.bert.state_dict().items()),
        "net": net,
        "zero_net": zero,
        "datamodule": dm,
    }


def best_checkpoint(folder):
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=folder, filename="best", monitor="val/ndcg_at_10", mode="max")


def validate_as_is(net: TwoTower, dm: TextDataModule) -> float:
    """Validation NDCG@10 of ``net``'s weights as they are (no interpolation)."""
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    module = TextTowerModule(net=net, train_bert=False)
    return float(trainer.validate(module, datamodule=dm, verbose=False)[0]["val/ndcg_at_10"])


def trained_tensors(net: TwoTower) -> dict[str, torch.Tensor]:
    """The tensors the adapter path trains (the BERT's stay frozen)."""
    return {k: v for k, v in net.state_dict().items() if not k.startswith("item_encoder.bert.")}


def test_fine_tuning_learns_a_preference_the_zero_shot_tower_misses(tokenizer_path):
    out = train_on_key_world(tokenizer_path)
    # On held-out test events (never seen in training or early stopping): a large, learned gain.
    assert out["tuned"] >= 1.5 * out["zero"], out
    assert out["tuned"] - out["zero"] >= 0.1, out
    assert out["metrics"]["text/kept_zeroshot"] == 0.0
    assert out["bert_unchanged"]  # only the adapter and the user tower learned
    steps = [s for s, _, _ in out["curve"]]
    assert steps[0] == 0 and steps == sorted(steps) and out["metrics"]["text/steps"] == steps[-1] > 0


def test_without_learning_the_tuned_tower_is_the_zero_shot_one(tokenizer_path):
    """The control of the test above: with learning rates 0 nothing is gained, so the gain
    measured there comes from training and not from the evaluation."""
    out = train_on_key_world(tokenizer_path, lr=0.0, epochs=1)
    assert out["tuned"] == pytest.approx(out["zero"], abs=1e-6)


def test_the_kept_weights_are_the_interpolation_their_validation_chose(tokenizer_path, tmp_path):
    """Each validation scores points between the zero-shot start and the trained weights; the
    network ends at the best checkpoint's point, and its validation score is that point's."""
    out = train_on_key_world(tokenizer_path, lr=3e-2, epochs=3, interpolation=[0.25, 0.5, 1.0], checkpoint_dir=tmp_path)
    best = torch.load(tmp_path / "best.ckpt", map_location="cpu", weights_only=True)
    alpha = best["interpolation"]
    assert alpha in (0.25, 0.5, 1.0) and out["metrics"]["text/interpolation"] == alpha
    assert out["metrics"]["text/kept_zeroshot"] == 0.0
    start, raw = trained_tensors(out["zero_net"]), best["state_dict"]
    for k, v in trained_tensors(out["net"]).items():
        expected = start[k] + alpha * (raw[f"net.{k}"] - start[k])
        torch.testing.assert_close(v, expected, rtol=1e-6, atol=1e-7)
    # The kept weights score what their validation said (not the trained weights' score).
    assert validate_as_is(out["net"], out["datamodule"]) == pytest.approx(
        out["metrics"]["text/val_ndcg_at_10_finetuned"], abs=1e-6
    )


def test_validating_the_interpolation_leaves_training_unchanged(tokenizer_path):
    """The points are scored on borrowed weights: training goes on from the trained ones, so it
    follows the same path as without interpolation and each check scores at least as high."""
    plain = train_on_key_world(tokenizer_path, lr=3e-2, epochs=2)
    grid = train_on_key_world(tokenizer_path, lr=3e-2, epochs=2, interpolation=[0.5, 1.0])
    assert [s for s, _, _ in grid["curve"]] == [s for s, _, _ in plain["curve"]]
    assert all(g >= p - 1e-9 for (_, g, _), (_, p, _) in zip(grid["curve"], plain["curve"]))
    # Without a checkpoint the last weights stay, moved to the last check's point.
    alpha = grid["metrics"]["text/interpolation"]
    start, trained = trained_tensors(plain["zero_net"]), trained_tensors(plain["net"])
    for k, v in trained_tensors(grid["net"]).items():
        torch.testing.assert_close(v, start[k] + alpha * (trained[k] - start[k]), rtol=1e-5, atol=1e-6)


def test_a_point_short_of_the_trained_weights_must_beat_them_beyond_noise(tokenizer_path):
    """``interpolation_min_z``: the mean per-row gain over the trained weights against its paired
    standard error. A steady small gain passes, a larger but noisy one does not."""
    encoder = ItemEncoder.random(tokenizer=tokenizer_path, seed=0, adapter_hidden=16)
    module = TextTowerModule(net=TwoTower(encoder, max_history=10), train_bert=False, interpolation=[0.5, 1.0])

    def beats(diff):
        d = np.asarray(diff, dtype=float)
        return module._beats(float(d.sum()), float((d * d).sum()), float(len(d)))

    assert beats([0.01] * 50)  # no spread: any gain is beyond noise
    noisy = [0.5, -0.4] * 25  # mean +0.05, standard error about 0.064
    assert not beats(noisy)
    module.interpolation_min_z = 0.5
    assert beats(noisy)
    assert not beats([-0.01] * 50) and not beats([0.3])


def test_the_decile_check_keeps_no_point_that_loses_a_popularity_decile(tokenizer_path):
    """``decile_min_z``: a point that falls below the zero-shot start in a popularity decile or the
    long tail beyond the margin is not kept, even where it scores best overall; a passing point
    short of it need not beat it; where no point passes, none is kept."""
    from recsys.text.module import validation_sums

    encoder = ItemEncoder.random(tokenizer=tokenizer_path, seed=0, adapter_hidden=16)
    module = TextTowerModule(
        net=TwoTower(encoder, max_history=10), train_bert=False, interpolation=[0.5, 1.0], decile_min_z=2.0
    )
    rng = np.random.default_rng(0)
    deciles = torch.arange(1100) % 11
    tail = deciles <= 4
    start = torch.from_numpy(rng.uniform(0.0, 0.5, 1100))
    noise = torch.from_numpy(rng.normal(0.0, 0.01, 1100))
    steady = start + 0.02 + noise  # a little better everywhere
    popular = start + torch.where(deciles == 10, 0.6, -0.03) + noise  # best overall, loses deciles 0-9

    def choose(half, trained):
        per_row = {0.5: half, 1.0: trained}
        hits = {a: (v > 0.3).double() for a, v in per_row.items()}
        total = validation_sums(per_row, hits, tail, deciles, start).view(2, -1).tolist()
        return module._choose([0.5, 1.0], total, checking=True)

    best, worst = choose(steady, popular)
    assert best == 0.5 and worst[1.0] < -2 < worst[0.5]  # 0.5 scores less than 1.0 overall, yet is kept
    assert choose(popular, popular)[0] is None
    best, worst = choose(popular, steady)
    assert best == 1.0
    module.decile_min_z = 100.0  # a margin every point passes: the best overall again
    assert choose(steady, popular)[0] == 1.0
    # Without the start's rows (no check) the sums hold no groups, and the best point wins.
    total = validation_sums({1.0: popular}, {1.0: popular}, tail, deciles, None).view(1, -1).tolist()
    assert len(total[0]) == 5 + 2 and module._choose([1.0], total, checking=False)[0] == 1.0


def test_fine_tuning_with_the_decile_check_still_learns_a_preference(tokenizer_path):
    """The key world's preference is the same at every popularity: the check lets it through."""
    out = train_on_key_world(tokenizer_path, decile_min_z=2.0)
    assert out["metrics"]["text/kept_zeroshot"] == 0
    assert out["tuned"] > out["zero"] + 0.05, out


def test_with_an_unreachable_margin_the_trained_weights_are_kept(tokenizer_path):
    """The control: a margin no point can pass leaves the trained weights, as without the grid."""
    plain = train_on_key_world(tokenizer_path, lr=3e-2, epochs=2)
    strict = train_on_key_world(tokenizer_path, lr=3e-2, epochs=2, interpolation=[0.25, 0.5, 1.0], min_z=1e9)
    assert strict["metrics"]["text/interpolation"] == 1.0
    assert strict["curve"] == plain["curve"]
    for k, v in trained_tensors(strict["net"]).items():
        torch.testing.assert_close(v, trained_tensors(plain["net"])[k], rtol=0, atol=0)


def test_the_catalogue_pass_while_fine_tuning_shows_a_progress_bar(tokenizer_path, capfd):
    """The frozen BERT's catalogue pass (the zero-shot validation) is minutes at 150k items."""
    encoder = ItemEncoder.random(tokenizer=tokenizer_path, seed=0, adapter_hidden=16)
    ids, lengths = encoder.tokenize(["red tool kit", "blue glass jar"])
    module = TextTowerModule(net=TwoTower(encoder, max_history=10), train_bert=False)
    capfd.readouterr()
    vectors = module._encode(encoder.base_vectors)(ids, lengths)
    assert vectors.shape[0] == 2 and "encode items" in capfd.readouterr().err


def test_adapter_starts_as_the_identity(tokenizer_path):
    z = torch.nn.functional.normalize(torch.randn(7, 32), dim=-1)
    torch.testing.assert_close(TextAdapter(32, 16)(z), z)
    encoder = ItemEncoder.random(tokenizer=tokenizer_path, seed=0, adapter_hidden=16)
    plain = ItemEncoder.random(tokenizer=tokenizer_path, seed=0)
    torch.testing.assert_close(
        encoder.encode(["red telescope", "blue yarn"]), plain.encode(["red telescope", "blue yarn"])
    )


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda p: ItemEncoder.random(tokenizer=p, adapter_hidden=0), "encoder.adapter_hidden"),
        (lambda p: budget(0), "text.budget_minutes"),
        (lambda p: budget("soon"), "text.budget_minutes"),
    ],
)
def test_bad_fine_tuning_options_are_named(tokenizer_path, make, name):
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        make(tokenizer_path)


def test_bad_datamodule_options_are_named(tokenizer_path):
    texts, h = key_world(items_per_key=3, users_per_key=2, events=3)
    encoder = ItemEncoder.random(tokenizer=tokenizer_path, seed=0)
    ids, lengths = encoder.tokenize(texts)
    with pytest.raises(ConfigError, match=r"text\.data\.uniform_negatives"):
        TextDataModule(item_ids=ids, item_lengths=lengths, train=h, val=h.interactions, uniform_negatives=-1)
    with pytest.raises(ConfigError, match=r"text\.data\.steps_per_epoch"):
        TextDataModule(item_ids=ids, item_lengths=lengths, train=h, val=h.interactions, steps_per_epoch=0)


def test_the_logq_correction_counts_only_the_negatives_drawn(tokenizer_path):
    """The uniform draw joins batches that carry catalogue indices (the adapter path); a BERT
    path encoding only its targets draws none, so its logQ is the in-batch share alone."""
    texts, h = key_world(items_per_key=3, users_per_key=2, events=3)
    encoder = ItemEncoder.random(tokenizer=tokenizer_path, seed=0)
    ids, lengths = encoder.tokenize(texts)

    def module(**kw):
        return TextDataModule(
            item_ids=ids, item_lengths=lengths, train=h, val=h.interactions, batch_size=8, uniform_negatives=4, **kw
        )

    indices, tokens, encoded = module(item_tokens=False), module(item_tokens=True), module(encode_history=True)
    assert indices.uniform_negatives == encoded.uniform_negatives == 4 and tokens.uniform_negatives == 0
    share = tokens.log_popularity.double().exp()
    in_batch = torch.log(-torch.expm1(8 * torch.log1p(-share)))  # 1 - (1 - share)^B: no draw
    torch.testing.assert_close(tokens.log_q.double(), in_batch, rtol=1e-5, atol=1e-6)
    assert bool((indices.log_q > tokens.log_q).all())
    rows = [(h.sequences[u][:-1], int(h.sequences[u][-1]), 1.0) for u in range(4)]
    assert "negatives" not in tokens.collate(rows)
    assert "negatives" in indices.collate(rows)


def test_the_logq_correction_is_each_items_chance_of_being_a_candidate(tokenizer_path):
    """A step's candidates are its distinct targets and uniform draws, so an item's chance to be one
    is at most 1: the expected count (batch x share, over 3 for the popular items here) pushed
    the popular items' logits down by its log, and the tower learned to lift them back up."""
    texts, h = key_world(items_per_key=5, users_per_key=25, events=5)
    encoder = ItemEncoder.random(tokenizer=tokenizer_path, seed=0)
    ids, lengths = encoder.tokenize(texts)
    dm = TextDataModule(item_ids=ids, item_lengths=lengths, train=h, val=h.interactions, batch_size=64,
                        item_tokens=False, uniform_negatives=4)  # fmt: skip
    rng = np.random.default_rng(0)
    seen = np.zeros(h.n_items)
    steps = 1500
    for _ in range(steps):
        batch = dm.collate([dm.examples[j] for j in rng.integers(len(dm.examples), size=64)])
        seen[batch["item_index"][batch["negatives"]].numpy()] += 1
    chance = dm.log_q.double().exp().numpy()
    assert chance.max() < 1 and (64 * dm.log_popularity.exp().numpy()).max() > 3
    # The share is smoothed by one event per item, the draw counted exactly: close, not equal.
    np.testing.assert_allclose(seen / steps, chance, atol=0.05)


def test_an_item_listed_after_an_event_is_no_negative_of_it(tokenizer_path):
    """A training row's softmax holds only the items listed by its event's time (validation and
    the test rank those alone): an item listed later gets no gradient from earlier rows, where
    before every older event pushed it down."""
    texts, h = key_world(items_per_key=8, users_per_key=2, events=4)
    unused = np.setdiff1d(np.arange(h.n_items), h.interactions[Columns.ItemIdx].to_numpy())
    assert len(unused) >= 2
    encoder = ItemEncoder.random(tokenizer=tokenizer_path, seed=0, adapter_hidden=16)
    ids, lengths = encoder.tokenize(texts)
    listed = np.full(h.n_items, np.nan)
    listed[unused] = 1_002.0  # events happen at 1_000 .. 1_003

    def late_item_gradient(available_from, rows):
        dm = TextDataModule(item_ids=ids, item_lengths=lengths, train=h, val=h.interactions, batch_size=8,
                            max_history=5, item_tokens=False, uniform_negatives=h.n_items,
                            available_from=available_from)  # fmt: skip
        batch = dm.collate(rows)
        module = TextTowerModule(TwoTower(encoder, max_history=5), train_bert=False, warmup_steps=1)
        module.log = lambda *a, **k: None
        module.base_cache = torch.randn(h.n_items, encoder.dim, generator=torch.Generator().manual_seed(0))
        module.base_cache.requires_grad_(True)
        loss = module.training_step(batch, 0)
        assert torch.isfinite(loss)
        loss.backward()
        return batch, module.base_cache.grad[unused].abs().sum()

    examples = TextDataModule(item_ids=ids, item_lengths=lengths, train=h, val=h.interactions, max_history=5).examples
    rows = [examples[j] for j in range(len(examples))]
    early = [r for r in rows if r[3] < 1_002]
    batch, grad = late_item_gradient(listed, early)
    candidates = batch["item_index"][batch["negatives"]]
    assert batch["candidate_unavailable"].all(0).tolist() == np.isin(candidates, unused).tolist()
    assert grad == 0
    _, grad = late_item_gradient(None, early)  # without listing times they are everyone's negatives
    assert grad > 0
    # Rows at or after the listing may choose the item, so it is their negative again.
    later = [r for r in rows if r[3] >= 1_002]
    batch, grad = late_item_gradient(listed, later)
    assert not batch["candidate_unavailable"].any() and grad > 0
    # A target listed after its own event (inconsistent data) still counts: the loss stays finite.
    listed[early[0][1]] = 2_000.0
    late_item_gradient(listed, early)


@pytest.mark.parametrize(
    ("data", "module", "name"),
    [
        ({"uniform_negatives": "many"}, {}, "text.data.uniform_negatives"),
        ({"batch_size": 0}, {}, "text.data.batch_size"),
        ({}, {"train_threads": 0}, "text.module.train_threads"),
        ({}, {"popularity_debias": -1}, "text.module.popularity_debias"),
        ({}, {"decile_min_z": -1}, "text.module.decile_min_z"),
        ({}, {"decile_min_z": "strict"}, "text.module.decile_min_z"),
        # Regression: these were refused (or crashed) only after the CF fit, without their name.
        ({"val_batch_size": 0}, {}, "text.data.val_batch_size"),
        ({}, {"freeze_layers": -1}, "text.module.freeze_layers"),
        ({}, {"lr_head": -1.0}, "text.module.lr_head"),
        ({}, {"lr_encoder": -1.0}, "text.module.lr_encoder"),
        ({}, {"weight_decay": -0.1}, "text.module.weight_decay"),
        ({}, {"interpolation": [0.0, 1.0]}, "text.module.interpolation"),
        ({}, {"interpolation": []}, "text.module.interpolation"),
        ({}, {"interpolation": "half"}, "text.module.interpolation"),
        ({}, {"interpolation": [0.5, 3]}, "text.module.interpolation"),
        ({}, {"interpolation_min_z": -1}, "text.module.interpolation_min_z"),
        # Each point would need its own BERT catalogue pass at every validation.
        ({}, {"interpolation": [0.5, 1.0], "train_bert": True}, "text.module.interpolation"),
    ],
)
def test_the_job_checks_text_options_before_any_work(data, module, name):
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        check_options(1.5, data, module)


@pytest.mark.parametrize(
    ("net", "module", "name"),
    [
        ({"temperature": 0.0}, {}, "text.temperature"),
        ({"max_history": 0}, {}, "text.max_history"),
        ({"frozen_history": True}, {"train_bert": False}, "text.frozen_history"),
    ],
)
def test_the_job_checks_text_network_options_before_any_work(net, module, name):
    """Regression: a zero temperature, an empty history window and a frozen history side without a
    trained BERT were refused (or crashed) only when the network or module was built, after the CF fit."""
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        check_options(1.5, {}, module, net)
    check_options(1.5, {}, {"train_bert": True}, {"frozen_history": True})


def test_freeze_layers_is_checked_against_the_encoder_by_name(tokenizer_path):
    """Regression: more frozen layers than the encoder has was a bare ``ValueError`` without the
    setting's name, raised when the module was built after the CF fit."""
    from recsys.text.options import check_freeze_layers

    with pytest.raises(ConfigError, match=r"text\.module\.freeze_layers must be in 0\.\.2"):
        check_freeze_layers(3, 2)
    check_freeze_layers(2, 2)
    net = TwoTower(ItemEncoder.random(tokenizer=tokenizer_path, adapter_hidden=8))  # 2 layers
    with pytest.raises(ConfigError, match=r"text\.module\.freeze_layers"):
        TextTowerModule(net=net, train_bert=True, freeze_layers=3)


def test_max_length_percentile_is_checked_by_name(tokenizer_path):
    """Regression: a percentile outside 0..100 was numpy's ``ValueError`` at tokenisation, after the CF fit."""
    with pytest.raises(ConfigError, match=r"encoder\.max_length_percentile"):
        ItemEncoder(ItemEncoder.random(tokenizer=tokenizer_path).bert, None, "auto", max_length_percentile=150.0)


@pytest.mark.slow
def test_a_bad_text_option_stops_the_cli_before_training(tmp_path):
    """The real CLI: exit 2 and the option's name, before any data is generated or model fitted."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "recsys.train", "+experiment=smoke", f"paths.root_dir={tmp_path}",
           f"hydra.run.dir={tmp_path}/out", "text.data.uniform_negatives=-5"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "text.data.uniform_negatives" in out.stderr
    assert not (tmp_path / "data").exists()  # the generated data set was not even made


@pytest.mark.slow
def test_too_many_frozen_layers_stop_the_job_before_any_model_is_fitted(tmp_path, caplog):
    """Regression: ``text.module.freeze_layers`` past the encoder's layers (2 in the tiny BERT) was
    a ``ValueError`` traceback after the MLflow run was opened and CF was fitted. The job as
    ``python -m recsys.train`` runs it, in this process (the CLI's one-line errors have their own
    tests)."""
    import logging

    from reliability_support import QUICK, train_in_process

    from recsys.errors import user_message

    with caplog.at_level(logging.INFO), pytest.raises(ConfigError) as refused:
        train_in_process(tmp_path, "out", *QUICK, "text.module.freeze_layers=5")
    assert "text.module.freeze_layers must be in 0..2" in user_message(refused.value)
    assert "fitted" not in caplog.text  # no CF model was fitted
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # nor any MLflow run started


def test_frozen_history_needs_a_trained_bert(tokenizer_path):
    net = TwoTower(ItemEncoder.random(tokenizer=tokenizer_path, adapter_hidden=8), frozen_history=True)
    with pytest.raises(ConfigError, match=r"text\.frozen_history"):
        TextTowerModule(net=net, train_bert=False)


def test_ctrl_c_in_fine_tuning_is_a_keyboard_interrupt_not_lightnings_exit(tokenizer_path):
    """Lightning answers Ctrl-C in ``fit`` with ``sys.exit(1)`` and SIGINT ignored from then on:
    the job then ended its MLflow run FAILED and printed no word of the interrupt. ``fine_tune``
    raises it again as the ``KeyboardInterrupt`` it was, with Python's SIGINT handler back."""
    import signal

    from lightning.pytorch.callbacks import Callback

    class CtrlC(Callback):
        def on_train_batch_end(self, trainer, *args, **kwargs):
            self.trainer = trainer
            if trainer.global_step == 2:
                raise KeyboardInterrupt

    ctrl_c = CtrlC()
    with pytest.raises(KeyboardInterrupt):
        train_on_key_world(tokenizer_path, epochs=2, callbacks=[ctrl_c])
    assert ctrl_c.trainer.interrupted and signal.getsignal(signal.SIGINT) is signal.default_int_handler
