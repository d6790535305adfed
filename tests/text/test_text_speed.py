"""Text-tower speed features (issue #6) keep the numbers: de-duplicated and length-bucketed
encoding gives the naive loss and gradients, the embedding cache re-encodes exactly the changed
items, and the options (frozen layers, fewer layers, max_length auto, precision) do what they say."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recsys.errors import ConfigError
from recsys.text.cache import ItemEmbeddingCache
from recsys.text.datamodule import TextDataModule
from recsys.text.encoder import ItemEncoder, TwoTower, autocast_for, compute_dtype
from recsys.text.module import TextTowerModule

TEXTS = [
    "galaxy",
    "a red telescope for watching comets and the lunar eclipse from the observatory at night",
    "cast iron skillet",
    "yarn",
    "Zorvex premium compact dumbbell with a sturdy grip for everyday workout routines",
    "a blue telescope",
    "wool yarn for knitting a warm scarf",
    "dumbbell",
]


def count_encoded_rows(encoder: ItemEncoder) -> list[int]:
    """Rows (items) that pass through the BERT, appended per call."""
    calls: list[int] = []
    # At the ItemEncoder's BERT pass (``_embed``), not the BERT: the packed path reads the BERT's
    # weights without calling it; nor ``forward``: catalogue passes skip the adapter it adds.
    embed = encoder._embed

    def counted(bert, input_ids, attention_mask):
        calls.append(len(input_ids))
        return embed(bert, input_ids, attention_mask)

    encoder._embed = counted
    return calls


# --- de-duplication and length buckets: same loss and gradients as the naive computation ---------


def naive_loss(module: TextTowerModule, dm: TextDataModule, rows: list, history_table: torch.Tensor | None):
    """Per-occurrence reference: every target occurrence and every history item encoded on its own
    (no padding), candidates = the batch's distinct targets."""
    enc, net = module.net.item_encoder, module.net

    def one(item: int) -> torch.Tensor:
        n = int(dm.item_lengths[item])
        return enc(dm.item_ids[item : item + 1, :n].long(), torch.ones(1, n, dtype=torch.long))[0]

    targets = [r[1] for r in rows]
    candidates = sorted(set(targets))
    cand_vecs = torch.stack([one(i) for i in candidates])
    scale = net.log_inv_temperature.exp()
    losses, weights = [], []
    for hist, target, w, *_ in rows:
        recent = list(hist[-dm.max_history :])[::-1]
        hv = torch.stack([history_table[i] if history_table is not None else one(i) for i in recent])
        user = net.user_encoder(hv[None], torch.ones(1, len(recent), dtype=torch.bool))[0]
        columns = [one(target) if c == target else cand_vecs[j] for j, c in enumerate(candidates)]
        logits = torch.stack(columns) @ user * scale - module.logq_correction * dm.log_q[candidates]
        losses.append(F.cross_entropy(logits[None], torch.tensor([candidates.index(target)]))), weights.append(w)
    w = torch.tensor(weights)
    return (torch.stack(losses) * w).sum() / w.sum()


@pytest.mark.parametrize("encode_history", [False, True])
@pytest.mark.parametrize("buckets", [1, 3])
def test_dedup_and_buckets_give_the_naive_loss_and_gradients(block_world, tiny_encoder, encode_history, buckets):
    ids, lengths = tiny_encoder.tokenize(block_world.texts)
    h = block_world.history
    dm = TextDataModule(ids, lengths, h, h.interactions.head(0), max_history=5, encode_history=encode_history)
    rows = [dm.examples[j] for j in range(0, 120, 5)]
    rows += [(rows[0][0], rows[0][1], 4.0), (rows[3][0], rows[0][1], 1.0), (rows[5][0], rows[5][1], 2.0)]
    assert len({r[1] for r in rows}) < len(rows)  # repeated targets: there is something to de-duplicate
    net = TwoTower(tiny_encoder, max_history=5)
    with torch.no_grad():  # a non-trivial user tower, so its gradients are compared too
        for p in net.user_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    module = TextTowerModule(net, length_buckets=buckets)
    module.log = lambda *a, **k: None
    table = None if encode_history else F.normalize(torch.randn(h.n_items, tiny_encoder.dim), dim=-1)
    module.item_cache = table
    net.eval()  # no dropout: both computations must see the same function

    batch = dm.collate(rows)
    assert len(batch["item_input_ids"]) < len(rows) + (0 if not encode_history else 10**6)
    loss = module.training_step(batch, 0)
    grads = torch.autograd.grad(loss, [p for p in net.parameters() if p.requires_grad], allow_unused=True)
    ref = naive_loss(module, dm, rows, table)
    ref_grads = torch.autograd.grad(ref, [p for p in net.parameters() if p.requires_grad], allow_unused=True)

    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    named = [n for n, p in net.named_parameters() if p.requires_grad]
    for name, g, r in zip(named, grads, ref_grads, strict=True):
        if r is None:
            assert g is None or not g.any(), name
            continue
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    assert any(g is not None and g.abs().sum() > 0 for n, g in zip(named, grads, strict=True) if "encoder.layer.0" in n)


def test_buckets_do_not_change_embeddings(tiny_encoder):
    ids, lengths = tiny_encoder.tokenize(TEXTS)
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    tiny_encoder.eval()
    with torch.no_grad():
        alone = torch.cat(
            [tiny_encoder(ids[j : j + 1, : int(n)].long(), mask[j : j + 1, : int(n)]) for j, n in enumerate(lengths)]
        )
        for buckets in (1, 2, 4):
            got = tiny_encoder.forward_bucketed(ids.long(), mask, buckets)
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
    calls = count_encoded_rows(tiny_encoder)
    with torch.no_grad():
        tiny_encoder.forward_bucketed(ids.long(), mask, 4)
    assert calls == [2, 2, 2, 2]  # four chunks, each trimmed to its own longest item


# --- the embedding cache ------------------------------------------------------------------------


def test_cache_re_encodes_exactly_the_changed_items(tokenizer_path, tmp_path):
    cache = ItemEmbeddingCache(directory=str(tmp_path / "emb"))
    enc = ItemEncoder.random(tokenizer=tokenizer_path, seed=0, embedding_cache=cache)
    plain = ItemEncoder.random(tokenizer=tokenizer_path, seed=0)  # same weights, no cache
    calls = count_encoded_rows(enc)

    first = enc.encode(TEXTS, batch_size=3)
    assert sum(calls) == len(TEXTS)
    torch.testing.assert_close(first, plain.encode(TEXTS), atol=1e-6, rtol=0)

    calls.clear()
    again = enc.encode(TEXTS)
    assert sum(calls) == 0
    torch.testing.assert_close(again, first, atol=0, rtol=0)

    # Two texts edited, one item added, one repeated text: exactly the three new texts are encoded.
    changed = [*TEXTS, "a brand new star chart"]
    changed[2], changed[5] = "cast iron skillet, enamelled", "a green telescope"
    changed.append(changed[0])
    calls.clear()
    got = enc.encode(changed)
    assert sum(calls) == 3
    torch.testing.assert_close(got, plain.encode(changed), atol=1e-6, rtol=0)
    assert cache.encoded_items == len(TEXTS) + 3

    # New weights: nothing cached is valid any more.
    weight = enc.bert.encoder.layer[0].intermediate.dense.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(1.5)
    calls.clear()
    moved = enc.encode(TEXTS)
    assert sum(calls) == len(TEXTS)
    assert not torch.allclose(moved, first, atol=1e-4)

    # The zero-shot copy shares the store; a new process (a new cache on the same folder) too.
    calls.clear()
    with torch.no_grad():
        weight.copy_(saved)
    twin = copy.deepcopy(enc)
    assert twin.embedding_cache is cache
    twin_calls = count_encoded_rows(twin)
    twin.encode(TEXTS)
    assert sum(twin_calls) == 0
    fresh = ItemEncoder.random(
        tokenizer=tokenizer_path, seed=0, embedding_cache=ItemEmbeddingCache(str(tmp_path / "emb"))
    )
    fresh_calls = count_encoded_rows(fresh)
    torch.testing.assert_close(fresh.encode(changed), got, atol=0, rtol=0)
    assert sum(fresh_calls) == 0


def test_cache_misses_when_truncation_changes(tokenizer_path):
    cache = ItemEmbeddingCache()
    enc = ItemEncoder.random(tokenizer=tokenizer_path, seed=0, max_length=32, embedding_cache=cache)
    enc.encode(TEXTS)
    enc.max_length = 8  # the long texts now read differently; the short ones do not
    calls = count_encoded_rows(enc)
    enc.encode(TEXTS)
    long_texts = sum(1 for n in ItemEncoder.random(tokenizer=tokenizer_path, max_length=64).tokenize(TEXTS)[1] if n > 8)
    assert sum(calls) == long_texts > 0


def test_cache_folder_finds_keys_ending_in_a_zero_byte(tokenizer_path, tmp_path):
    """Regression: the table file stored keys as numpy ``S16`` strings, which drop trailing zero
    bytes when read back, so an item whose key ends in ``b"\\x00"`` (one in 256) missed the
    folder's cache in every later run and was encoded again."""
    from recsys.text.cache import item_keys

    enc = ItemEncoder.random(tokenizer=tokenizer_path, seed=0)
    texts = [f"catalogue item {i}" for i in range(2000)]
    keys = item_keys(*enc.tokenize(texts))
    texts = [t for t, k in zip(texts, keys, strict=True) if k.endswith(b"\x00")][:3] + TEXTS
    assert len(texts) > len(TEXTS)

    def run() -> tuple[torch.Tensor, int]:  # a new process: a new cache on the same folder
        cache = ItemEmbeddingCache(directory=str(tmp_path / "emb"))
        vectors = ItemEncoder.random(tokenizer=tokenizer_path, seed=0, embedding_cache=cache).encode(texts)
        return vectors, cache.encoded_items

    first, encoded = run()
    assert encoded == len(texts)
    again, encoded = run()
    assert encoded == 0
    torch.testing.assert_close(again, first, atol=0, rtol=0)


# --- options ------------------------------------------------------------------------------------


def test_max_length_auto_takes_a_percentile_and_logs_it(tokenizer_path, caplog):
    enc = ItemEncoder.random(tokenizer=tokenizer_path, max_length="auto")
    enc.max_length_percentile = 90.0
    texts = [" ".join(["word"] * n) for n in range(1, 101)]  # 1..100 words: n + 2 tokens
    with caplog.at_level(logging.INFO, logger="recsys.text.encoder"):
        ids, lengths = enc.tokenize(texts)
    assert enc.max_length == 93  # ceil of the 90th percentile of 3..102 (92.1)
    assert ids.shape == (100, 93) and int(lengths.max()) == 93
    assert "max_length auto: 93 tokens" in caplog.text and "9.0% truncated" in caplog.text  # 94..102
    enc.tokenize(["short"])  # fixed after the first call
    assert enc.max_length == 93
    with pytest.raises(ConfigError, match="max_length"):
        ItemEncoder.random(tokenizer=tokenizer_path, max_length="long")


def test_precision_is_chosen_per_device(tokenizer_path):
    assert compute_dtype("cpu") == torch.float32  # bf16 is 7-18x slower on these CPUs
    assert compute_dtype("cuda") == torch.bfloat16
    assert compute_dtype(torch.device("cuda", 0), {"cuda": "fp32"}) == torch.float32
    assert not isinstance(autocast_for("cpu"), torch.autocast)
    with pytest.raises(ConfigError, match="precision"):
        compute_dtype("cpu", {"cpu": "int3"})
    # The path is wired into forward: a bf16 mapping for CPU runs the BERT's matmuls in bf16.
    dtypes: list[torch.dtype] = []
    enc = ItemEncoder.random(tokenizer=tokenizer_path, precision={"cpu": "bf16"})
    enc.bert.encoder.layer[0].intermediate.dense.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    out = enc.encode(TEXTS)
    assert dtypes == [torch.bfloat16] and out.dtype == torch.float32
    fp32 = ItemEncoder.random(tokenizer=tokenizer_path).encode(TEXTS)
    assert 0 < (out - fp32).abs().max() < 0.05


def test_the_config_maps_cpu_to_fp32_and_gpu_to_bf16(repo_root):
    from omegaconf import OmegaConf

    for name in ("minilm", "tiny"):
        node = OmegaConf.load(repo_root / "conf" / "encoder" / f"{name}.yaml")
        assert dict(node.precision) == {"cpu": "fp32", "cuda": "bf16"}


def test_freeze_layers_trains_only_the_upper_layers(block_world, tiny_encoder):
    ids, lengths = tiny_encoder.tokenize(block_world.texts)
    h = block_world.history
    dm = TextDataModule(ids, lengths, h, h.interactions.head(0), max_history=5)
    net = TwoTower(tiny_encoder, max_history=5)
    module = TextTowerModule(net, freeze_layers=1, lr_encoder=1e-2, warmup_steps=1)
    module.log = lambda *a, **k: None
    module.item_cache = F.normalize(torch.randn(h.n_items, tiny_encoder.dim), dim=-1)
    opt = module.configure_optimizers()["optimizer"]
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    before = copy.deepcopy(net.state_dict())
    for j in range(3):
        module.training_step(dm.collate([dm.examples[i] for i in range(j * 16, j * 16 + 16)]), 0).backward()
        opt.step()
        opt.zero_grad()
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    bert = "item_encoder.bert."
    assert not any(k.startswith((bert + "embeddings", bert + "encoder.layer.0.")) for k in changed)
    assert any(k.startswith(bert + "encoder.layer.1.") for k in changed)
    assert all(id(p) not in optimised for p in net.item_encoder.bert.encoder.layer[0].parameters())


def test_num_layers_keeps_the_lower_layers(tokenizer_path):
    full = ItemEncoder.random(tokenizer=tokenizer_path, num_hidden_layers=3, seed=0)
    short = ItemEncoder.random(tokenizer=tokenizer_path, num_hidden_layers=3, seed=0)
    short = ItemEncoder(short.bert, short.tokenizer, num_layers=2)
    assert len(short.bert.encoder.layer) == 2 and short.bert.config.num_hidden_layers == 2
    for k, v in short.bert.state_dict().items():
        torch.testing.assert_close(v, full.bert.state_dict()[k])
    assert not torch.allclose(short.encode(TEXTS), full.encode(TEXTS), atol=1e-4)
    with pytest.raises(ConfigError, match="num_layers"):
        ItemEncoder(full.bert, full.tokenizer, num_layers=4)


def test_fused_adamw_takes_the_same_steps(block_world, tokenizer_path):
    states = []
    for fused in (False, True):
        enc = ItemEncoder.random(tokenizer=tokenizer_path, seed=0)
        ids, lengths = enc.tokenize(block_world.texts)
        h = block_world.history
        dm = TextDataModule(ids, lengths, h, h.interactions.head(0), max_history=5)
        net = TwoTower(enc, max_history=5).eval()
        module = TextTowerModule(net, fused_optimizer=fused, lr_encoder=1e-3, warmup_steps=1)
        module.log = lambda *a, **k: None
        module.item_cache = F.normalize(torch.ones(h.n_items, enc.dim), dim=-1)
        opt = module.configure_optimizers()["optimizer"]
        assert bool(opt.defaults.get("fused")) == fused
        for j in range(3):
            module.training_step(dm.collate([dm.examples[i] for i in range(j * 16, j * 16 + 16)]), 0).backward()
            opt.step()
            opt.zero_grad()
        states.append(net.state_dict())
    start = TwoTower(ItemEncoder.random(tokenizer=tokenizer_path, seed=0), max_history=5).state_dict()
    moved = 0
    for k in states[0]:
        # Each step moves a weight by up to lr (1e-3); the kernels differ only in rounding.
        torch.testing.assert_close(states[1][k], states[0][k], atol=1e-5, rtol=1e-4)
        moved += int(not torch.equal(states[0][k], start[k]))
    assert moved > 10
    assert np.isfinite(float(states[0]["log_inv_temperature"]))


def test_a_fine_tuning_run_encodes_the_catalogue_once_per_new_weights(block_world, tokenizer_path, tmp_path):
    """Zero-shot validation = fit start = zero-shot report, and the restored best epoch was
    validated: with the cache, the catalogue is encoded once for the start and once per epoch."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from recsys.data import LeaveLastOutSplit
    from recsys.recommender import History
    from recsys.text.fit import fine_tune, zero_shot_copy
    from recsys.text.recommender import TextRecommender

    L.seed_everything(0, verbose=False)
    cache = ItemEmbeddingCache()
    enc = ItemEncoder.random(tokenizer=tokenizer_path, seed=0, embedding_cache=cache)
    h = block_world.history
    split = LeaveLastOutSplit(n_val=1, n_test=1).split(h.interactions)
    train = History(split.train, h.n_users, h.n_items)
    ids, lengths = enc.tokenize(block_world.texts)
    net = TwoTower(enc, max_history=10)
    zero = zero_shot_copy(net)
    dm = TextDataModule(ids, lengths, train, split.val, batch_size=16, steps_per_epoch=3, max_history=10)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/ndcg_at_10", mode="max")
    epochs = 2
    trainer = L.Trainer(
        max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", callbacks=[ckpt], num_sanity_val_steps=0, deterministic=True,
    )  # fmt: skip
    factory = lambda net: TextTowerModule(net=net, lr_encoder=1e-3, lr_head=1e-2, warmup_steps=1)  # noqa: E731
    fine_tune(net, dm, factory, trainer)
    TextRecommender.from_tokens(net, ids, lengths)
    TextRecommender.from_tokens(zero, ids, lengths)
    assert cache.encoded_items == h.n_items * (1 + epochs)
    assert cache.hits == h.n_items * 3  # fit start, the restored weights, the zero-shot report


def test_dropout_option_sets_every_dropout_and_zero_makes_training_deterministic(tokenizer_path):
    enc = ItemEncoder.random(tokenizer=tokenizer_path, seed=0, dropout=0.0)
    assert all(m.p == 0.0 for m in enc.bert.modules() if isinstance(m, torch.nn.Dropout))
    ids, lengths = enc.tokenize(TEXTS)
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    enc.train()
    first, second = enc(ids.long(), mask), enc(ids.long(), mask)
    torch.testing.assert_close(first, second)  # nothing dropped, so no randomness left
    noisy = ItemEncoder.random(tokenizer=tokenizer_path, seed=0, dropout=0.5).train()
    assert not torch.allclose(noisy(ids.long(), mask), noisy(ids.long(), mask))
    with pytest.raises(ConfigError, match="dropout"):
        ItemEncoder.random(tokenizer=tokenizer_path, dropout=1.5)
