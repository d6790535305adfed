"""The text tower: encoder properties, batching, a real fine-tuning loop, and a known answer."""

from __future__ import annotations

import copy
import logging

import lightning as L
import numpy as np
import polars as pl
import pytest
import torch
from torch.utils.data import DataLoader

from recsys.columns import Columns
from recsys.data import LeaveLastOutSplit
from recsys.errors import InputError
from recsys.recommender import History
from recsys.text.datamodule import TextDataModule
from recsys.text.encoder import TwoTower, UserEncoder, pad_histories
from recsys.text.module import TextTowerModule
from recsys.text.recommender import TextRecommender

TEXTS = [
    "galaxy",
    "a red telescope for watching comets and the lunar eclipse from the observatory at night",
    "cast iron skillet",
    "yarn",
    "Zorvex premium compact dumbbell with a sturdy grip for everyday workout routines",
]


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        limit_val_batches=0,
        max_epochs=-1,
        deterministic=True,
    )
    return L.Trainer(**{**defaults, **kwargs})


# --- the item encoder ------------------------------------------------------------------------------


def test_embeddings_are_l2_normalised(tiny_encoder):
    emb = tiny_encoder.encode(TEXTS)
    assert emb.shape == (len(TEXTS), tiny_encoder.dim)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5, rtol=0)
    assert not torch.allclose(emb[0], emb[1], atol=1e-3)  # different texts, different vectors


def test_padding_does_not_change_embeddings(tiny_encoder):
    alone = torch.cat([tiny_encoder.encode([t]) for t in TEXTS])
    batched = tiny_encoder.encode(TEXTS, batch_size=len(TEXTS))  # short texts padded to the longest
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    # ... and padded all the way to max_length through forward().
    ids, lengths = tiny_encoder.tokenize(TEXTS)
    assert int(lengths.min()) < ids.shape[1]  # there is padding to test
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    tiny_encoder.eval()
    with torch.no_grad():
        full = tiny_encoder(ids.long(), mask)
    torch.testing.assert_close(full, alone, atol=1e-5, rtol=0)


def test_encode_tokens_matches_forward_and_keeps_input_order(tiny_encoder):
    ids, lengths = tiny_encoder.tokenize(TEXTS)
    tiny_encoder.train()
    got = tiny_encoder.encode_tokens(ids, lengths, batch_size=2)  # sorted by length inside: order must be restored
    assert tiny_encoder.training  # mode restored after encoding
    tiny_encoder.eval()
    with torch.no_grad():
        for j in range(len(TEXTS)):
            n = int(lengths[j])
            one = tiny_encoder(ids[j : j + 1, :n].long(), torch.ones(1, n, dtype=torch.long))
            torch.testing.assert_close(got[j : j + 1], one, atol=1e-5, rtol=0)


def test_tokenize_truncates_to_max_length(tiny_encoder):
    ids, lengths = tiny_encoder.tokenize(["word " * 200, "short"])
    assert ids.shape == (2, tiny_encoder.max_length)
    assert lengths.tolist()[0] == tiny_encoder.max_length and lengths.tolist()[1] < tiny_encoder.max_length


def test_random_encoder_is_seeded(tokenizer_path):
    from recsys.text.encoder import ItemEncoder

    a = ItemEncoder.random(tokenizer=tokenizer_path, seed=1).encode(TEXTS)
    b = ItemEncoder.random(tokenizer=tokenizer_path, seed=1).encode(TEXTS)
    c = ItemEncoder.random(tokenizer=tokenizer_path, seed=2).encode(TEXTS)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


# --- the user encoder ------------------------------------------------------------------------------


def test_pad_histories_most_recent_first():
    hist, mask = pad_histories([np.array([1, 2, 3]), np.array([], dtype=np.int64), np.arange(10)], 4)
    assert hist.tolist() == [[3, 2, 1, -1], [-1, -1, -1, -1], [9, 8, 7, 6]]
    assert mask.tolist() == [[True, True, True, False], [False] * 4, [True] * 4]


def test_user_encoder_starts_as_a_recency_weighted_mean():
    torch.manual_seed(0)
    enc = UserEncoder(dim=8, max_history=5, recency_decay=0.5)
    history = torch.nn.functional.normalize(torch.randn(2, 5, 8), dim=-1)
    mask = torch.tensor([[True, True, True, False, False], [False] * 5])
    out = enc(history, mask)
    w = torch.softmax(torch.tensor([0.0, -0.5, -1.0]), 0)
    expected = torch.nn.functional.normalize((w[:, None] * history[0, :3]).sum(0), dim=0)
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=0)
    assert torch.all(out[1] == 0)  # no history: the zero vector, not NaN


# --- batching --------------------------------------------------------------------------------------


def fake_tokens(n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Item i has tokens [101, 1000 + i, 2000 + i, ...] of length 3 + i % 4: recognisable in a batch."""
    lengths = torch.tensor([3 + i % 4 for i in range(n_items)], dtype=torch.int32)
    ids = torch.zeros((n_items, 8), dtype=torch.int32)
    for i in range(n_items):
        n = int(lengths[i])
        ids[i, :n] = torch.tensor([101] + [1000 * (p + 1) + i for p in range(n - 2)] + [102])
    return ids, lengths


@pytest.mark.parametrize("encode_history", [False, True])
def test_collate_encodes_each_item_once_and_maps_back(block_world, encode_history):
    ids, lengths = fake_tokens(block_world.n_items)
    dm = TextDataModule(
        item_ids=ids, item_lengths=lengths, train=block_world.history, val=block_world.history.interactions.head(0),
        max_history=5, encode_history=encode_history,
    )  # fmt: skip
    # Rows with repeated targets (a popular item is the target of several rows).
    rows = [dm.examples[j] for j in range(12)]
    rows += [(rows[0][0], rows[0][1], 4.0), (rows[3][0], rows[0][1], 1.0), (rows[5][0], rows[5][1], 1.0)]
    batch = dm.collate(rows)
    targets = batch["targets"]
    assert targets.tolist() == [r[1] for r in rows]
    assert batch["weights"].tolist() == [r[2] for r in rows]

    enc_ids, enc_mask = batch["item_input_ids"], batch["item_attention_mask"]
    width = enc_ids.shape[1]
    encoded_items = [int(row[1] - 1000) for row in enc_ids]  # the item each encoded row belongs to
    assert len(set(encoded_items)) == len(encoded_items), "an item is encoded twice"
    needed = set(targets.tolist())
    if encode_history:
        needed |= {int(i) for i in batch["history"][batch["history_mask"]]}
    assert set(encoded_items) == needed
    for row, item in enumerate(encoded_items):
        assert int(enc_mask[row].sum()) == int(lengths[item])
        assert torch.equal(enc_ids[row], ids[item, :width].long())
    assert width == int(lengths[list(needed)].max())  # padded to the longest in the batch only

    pos = batch["target_pos"]
    assert [encoded_items[p] for p in pos.tolist()] == targets.tolist()
    if encode_history:
        hpos, hmask = batch["history_pos"], batch["history_mask"]
        assert (hpos[~hmask] == -1).all()
        assert [encoded_items[p] for p in hpos[hmask].tolist()] == batch["history"][hmask].tolist()
        # Negatives: the batch's distinct targets, each once.
        negatives = batch["negatives"].tolist()
        assert sorted(encoded_items[p] for p in negatives) == sorted(set(targets.tolist()))
    else:
        assert "history_pos" not in batch


def test_next_item_examples_use_only_earlier_events(block_world):
    ids, lengths = fake_tokens(block_world.n_items)
    h = block_world.history
    dm = TextDataModule(item_ids=ids, item_lengths=lengths, train=h, val=h.interactions.head(0), max_history=3)
    # Each user has 8 events -> 7 (prefix -> next) pairs.
    assert len(dm.examples) == h.n_users * 7
    for j in range(0, len(dm.examples), 5):
        hist, target, _, _ = dm.examples[j]
        seq = None
        for s in h.sequences:
            idx = np.flatnonzero(s == target)
            if len(idx) and len(hist) and np.array_equal(s[max(0, idx[0] - len(hist)) : idx[0]], hist):
                seq = s
        assert seq is not None, "history is not the events right before the target"
        assert 1 <= len(hist) <= 3


# --- the Lightning loop ----------------------------------------------------------------------------


class FixedBatch(TextDataModule):
    """The same batch again and again: the loss must go down if the loop learns."""

    n_steps = 30

    def train_dataloader(self) -> DataLoader:
        rows = [self.examples[j] for j in range(0, 7 * 32, 7)]
        return DataLoader([rows] * self.n_steps, batch_size=None, collate_fn=self.collate)


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("freeze_embeddings", [False, True])
def test_training_updates_bert_and_lowers_the_loss(block_world, tiny_encoder, freeze_embeddings):
    L.seed_everything(0, verbose=False)
    ids, lengths = tiny_encoder.tokenize(block_world.texts)
    net = TwoTower(tiny_encoder, max_history=10)
    before = copy.deepcopy(net.item_encoder.bert.state_dict())
    h = block_world.history
    dm = FixedBatch(item_ids=ids, item_lengths=lengths, train=h, val=h.interactions.head(0), max_history=10)
    module = TextTowerModule(
        net=net, lr_encoder=1e-3, lr_head=1e-2, warmup_steps=1, freeze_embeddings=freeze_embeddings
    )
    recorder = LossRecorder()
    trainer(max_steps=FixedBatch.n_steps, callbacks=[recorder]).fit(module, datamodule=dm)

    assert len(recorder.losses) == FixedBatch.n_steps
    first, last = recorder.losses[0], float(np.mean(recorder.losses[-5:]))
    assert last < 0.7 * first, recorder.losses

    after = net.item_encoder.bert.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # The transformer itself is fine-tuned, not only the user tower.
    assert any(k.startswith("encoder.layer.0.attention") for k in changed), sorted(changed)
    assert any(k.startswith("encoder.layer.1.") for k in changed)
    word = "embeddings.word_embeddings.weight"
    assert (word in changed) != freeze_embeddings


def fine_tune_with_best_checkpoint(block_world, encoder, tmp_path, **trainer_kwargs):
    """``fine_tune`` as the job calls it (zero-shot validation, fit, best checkpoint) on the block
    world's leave-last-out split, 3 epochs; ``trainer_kwargs`` pick the device.

    Returns ``(net, fine_tune's network, its metrics, the best-checkpoint callback)``.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    from recsys.text.fit import fine_tune

    L.seed_everything(0, verbose=False)
    h = block_world.history
    split = LeaveLastOutSplit(n_val=1, n_test=1).split(h.interactions)
    train = History(split.train, h.n_users, h.n_items)
    ids, lengths = encoder.tokenize(block_world.texts)
    net = TwoTower(encoder, max_history=10)
    dm = TextDataModule(
        item_ids=ids, item_lengths=lengths, train=train, val=split.val, batch_size=16, steps_per_epoch=3, max_history=10
    )
    ckpt = ModelCheckpoint(
        dirpath=tmp_path, filename="best", monitor="val/ndcg_at_10", mode="max", save_weights_only=True
    )
    t = trainer(
        max_epochs=3,
        limit_val_batches=None,
        enable_checkpointing=True,
        callbacks=[ckpt],
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    factory = lambda net: TextTowerModule(net=net, lr_encoder=1e-3, lr_head=1e-2, warmup_steps=1)  # noqa: E731
    out, metrics, _ = fine_tune(net, dm, factory, t)
    return net, out, metrics, ckpt


def assert_holds_the_best_checkpoint(net, ckpt) -> None:
    state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, state[f"net.{key}"], atol=0, rtol=0)


def test_fine_tune_restores_the_best_checkpoint(block_world, tiny_encoder, tmp_path):
    net, out, metrics, ckpt = fine_tune_with_best_checkpoint(block_world, tiny_encoder, tmp_path)

    assert out is net and not net.training
    ndcgs = {"text/val_ndcg_at_10_zeroshot", "text/val_ndcg_at_10_finetuned", "text/kept_zeroshot"}
    extra = {"text/steps", "text/minutes", "text/zeroshot_minutes", "text/train_minutes", "text/interpolation"}
    assert set(metrics) == ndcgs | extra | {"text/planned_steps", "text/budget_ended"}
    assert metrics["text/planned_steps"] == 9 and metrics["text/budget_ended"] == 0.0  # no budget here
    assert metrics["text/interpolation"] == 1.0  # this module validates the trained weights only
    parts = metrics["text/zeroshot_minutes"] + metrics["text/train_minutes"]
    assert metrics["text/train_minutes"] > 0 and parts == pytest.approx(metrics["text/minutes"], rel=0.05, abs=1e-3)
    assert all(0.0 <= metrics[k] <= 1.0 for k in ndcgs)
    assert metrics["text/steps"] == 9  # 3 epochs of 3 steps
    assert metrics["text/val_ndcg_at_10_finetuned"] == pytest.approx(float(ckpt.best_model_score))
    # This tiny world is learnable: fine-tuning beats the random start, so the best checkpoint wins.
    assert metrics["text/kept_zeroshot"] == 0.0
    assert_holds_the_best_checkpoint(net, ckpt)


def test_a_time_budget_that_ends_training_early_is_logged_and_said(block_world, tiny_encoder, tmp_path, caplog):
    """When ``text.budget_minutes`` (the Trainer's max_time), not the planned length or early
    stopping, ends fine-tuning, the steps follow the machine's speed: the run says so (a metric
    the report reads, and a warning naming the setting), where it passed silently before."""
    from datetime import timedelta

    with caplog.at_level(logging.WARNING, logger="recsys.text.fit"):
        _, _, metrics, _ = fine_tune_with_best_checkpoint(
            block_world, tiny_encoder, tmp_path, max_time=timedelta(microseconds=1)
        )
    assert metrics["text/budget_ended"] == 1.0
    assert metrics["text/steps"] < metrics["text/planned_steps"] == 9
    assert "text.budget_minutes ended fine-tuning at step" in caplog.text and "of the 9 planned" in caplog.text


def test_fine_tune_keeps_the_zero_shot_weights_when_no_epoch_beats_them(block_world, tiny_encoder, tmp_path, caplog):
    """Step 0 competes: a fine-tuning that only hurts (lr far too high) must not replace it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from recsys.text.fit import fine_tune

    L.seed_everything(0, verbose=False)
    h = block_world.history
    split = LeaveLastOutSplit(n_val=1, n_test=1).split(h.interactions)
    train = History(split.train, h.n_users, h.n_items)
    ids, lengths = tiny_encoder.tokenize(block_world.texts)
    net = TwoTower(tiny_encoder, max_history=10)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    dm = TextDataModule(
        item_ids=ids, item_lengths=lengths, train=train, val=split.val, batch_size=16, steps_per_epoch=3, max_history=10
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/ndcg_at_10", mode="max")
    t = trainer(max_epochs=1, limit_val_batches=None, enable_checkpointing=True, callbacks=[ckpt])

    class NeverBetter(TextTowerModule):
        """Validation during fit reports 0: no epoch beats the zero-shot pass run before fit."""

        def on_validation_epoch_end(self) -> None:
            if self.trainer.state.fn == "fit":
                self._val = {}
                self.log("val/ndcg_at_10", 0.0)
            else:
                super().on_validation_epoch_end()

    factory = lambda net: NeverBetter(net=net, lr_encoder=1e-3, lr_head=1e-2, warmup_steps=1)  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="recsys.text.fit"):
        _, metrics, _ = fine_tune(net, dm, factory, t)
    assert metrics["text/kept_zeroshot"] == 1.0
    # The hint names the learning rate of the weights this path trains (the BERT's here).
    assert "text.module.lr_encoder" in caplog.text and "lr_adapter" not in caplog.text
    assert metrics["text/val_ndcg_at_10_finetuned"] <= metrics["text/val_ndcg_at_10_zeroshot"]
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)


# --- known answer: one-topic users get their topic after fine-tuning ------------------------------


def own_topic_counts(net, ids, lengths, world, k: int = 10) -> np.ndarray:
    rec = TextRecommender.from_tokens(net, ids, lengths).fit(world.history)
    users = np.arange(world.n_users)
    items, _ = rec.recommend(users, k, exclude=world.history.matrix)
    return (world.block_of_item[items] == world.block_of_user[:, None]).sum(1)


def test_fine_tuned_tower_recommends_the_users_topic(block_world, block_towers):
    """Users who consumed only one topic (e.g. astronomy) get that topic's unseen items first."""
    untrained, trained, ids, lengths = block_towers
    after = own_topic_counts(trained, ids, lengths, block_world)
    before = own_topic_counts(untrained, ids, lengths, block_world)
    # One probe user per topic, and nearly every user, gets >= 8 of the top 10 from its own topic.
    probes = [int(np.flatnonzero(block_world.block_of_user == b)[0]) for b in range(4)]
    assert all(after[u] >= 8 for u in probes), after[probes]
    assert (after >= 8).mean() >= 0.9, np.bincount(after)
    # The control: the same tiny BERT before training is near chance (2.5 of 10).
    assert all(before[u] < 8 for u in probes), before[probes]
    assert before.mean() < 5, np.bincount(before)


def test_text_recommender_scores_cold_items(block_world, block_towers):
    """An item nobody consumed is still scored from its text, like any other item."""
    untrained, trained, ids, lengths = block_towers
    h = block_world.history
    cold = np.flatnonzero(h.item_counts == 0)
    assert len(cold) == 4  # one per block, never seen in training either
    scores = TextRecommender.from_tokens(trained, ids, lengths).fit(h).score_users(np.arange(h.n_users))
    for item in cold:
        own = block_world.block_of_user == block_world.block_of_item[item]
        assert scores[own, item].mean() > scores[~own, item].mean() + 0.1


def test_frozen_history_side_keeps_the_starting_catalogue_vectors(block_world, tiny_encoder):
    """With ``frozen_history`` the user side reads the catalogue as encoded before fine-tuning,
    in training and at inference alike, while the item side (the BERT weights) does change."""
    L.seed_everything(0, verbose=False)
    h = block_world.history
    split = LeaveLastOutSplit(n_val=1, n_test=1).split(h.interactions)
    train = History(split.train, h.n_users, h.n_items)
    ids, lengths = tiny_encoder.tokenize(block_world.texts)
    net = TwoTower(tiny_encoder, max_history=10, frozen_history=True)
    start = tiny_encoder.encode_tokens(ids, lengths)
    dm = TextDataModule(
        item_ids=ids, item_lengths=lengths, train=train, val=split.val, batch_size=16, steps_per_epoch=5, max_history=10
    )
    module = TextTowerModule(net=net, lr_encoder=1e-3, lr_head=1e-2, warmup_steps=1)
    trainer(max_epochs=1, limit_val_batches=None).fit(module, datamodule=dm)
    torch.testing.assert_close(net.history_embeddings, start)
    after = tiny_encoder.encode_tokens(ids, lengths)
    assert (after - start).abs().max() > 1e-3  # the item side was trained
    rec = TextRecommender(net.eval(), after).fit(train)
    expected = net.user_encoder(*_history_vectors(start, train, 10))
    np.testing.assert_allclose(rec.user_embeddings, expected.detach().numpy(), atol=1e-6)


def _history_vectors(table: torch.Tensor, history: History, max_history: int):
    hist, mask = pad_histories(history.sequences, max_history)
    return table[hist.clamp(min=0)], mask


def test_validation_never_ranks_items_listed_after_the_event(block_world, tiny_encoder):
    """Like the test evaluation: an item listed after the user's validation event is no candidate."""
    h = block_world.history
    split = LeaveLastOutSplit(n_val=1, n_test=1).split(h.interactions)
    train = History(split.train, h.n_users, h.n_items)
    ids, lengths = tiny_encoder.tokenize(block_world.texts)
    listed = np.full(h.n_items, np.nan)
    listed[:5] = split.val["timestamp"].max() + 1  # items 0-4 appear after every validation event
    listed[5] = split.val["timestamp"].min() - 1  # item 5 was there all along
    dm = TextDataModule(item_ids=ids, item_lengths=lengths, train=train, val=split.val, available_from=listed)
    batch = next(iter(dm.val_dataloader()))
    assert batch["unavailable"][:, :5].all()
    assert not batch["unavailable"][:, 5:].any()


def test_validation_leaves_out_users_without_history_and_counts_ties_against_the_target(block_world, tiny_encoder):
    """Regression: under a global time cut, a validation user without an earlier event scored every
    item alike and the tie ranked the target first: NDCG 1 for each such user (0.71 of one
    MovieLens run's validation NDCG@10, which early stopping then followed)."""
    from recsys.text.module import target_ranks

    h = block_world.history
    split = LeaveLastOutSplit(n_val=1, n_test=1).split(h.interactions)
    train = History(split.train.filter(pl.col(Columns.UserIdx) >= 5), h.n_users, h.n_items)  # 0-4: none
    ids, lengths = tiny_encoder.tokenize(block_world.texts)
    dm = TextDataModule(item_ids=ids, item_lengths=lengths, train=train, val=split.val)
    rows = sum(len(b["targets"]) for b in dm.val_dataloader())
    assert rows == split.val.filter(pl.col(Columns.UserIdx) >= 5).height
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.1, 0.9, 0.3, 0.9], [0.2, -torch.inf, 0.1, 0.0]])
    rank, finite = target_ranks(scores, torch.tensor([2, 1, 1]))
    assert rank.tolist()[:2] == [3, 1] and finite.tolist() == [True, True, False]
    nobody = History(split.train.head(0), h.n_users, h.n_items)
    with pytest.raises(InputError, match="none of the .* validation users has an event before"):
        TextDataModule(item_ids=ids, item_lengths=lengths, train=nobody, val=split.val).val_dataloader()


@pytest.mark.parametrize("decay", [0.15, 0.5])
def test_zero_shot_user_vector_is_the_recency_weighted_mean_of_its_history(tiny_encoder, decay):
    net = TwoTower(tiny_encoder, max_history=4, recency_decay=decay).eval()
    items = torch.nn.functional.normalize(
        torch.randn(6, tiny_encoder.dim, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    history = np.array([5, 1, 2, 3, 4])  # oldest first; the tower reads the last 4, newest weighted most
    got = net.user_embeddings(items, [history])[0]
    recent = torch.tensor([4, 3, 2, 1])
    weights = torch.exp(-decay * torch.arange(4.0))
    want = torch.nn.functional.normalize((weights[:, None] * items[recent]).sum(0), dim=0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
