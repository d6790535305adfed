"""Text-tower speed: model FLOP utilisation (MFU) of fine-tuning and encoding, on real tokens.

    python bench/text_tower.py                       # MiniLM, the default experiment's batch size
    python bench/text_tower.py --steps 20 --batch-size 32 --encoder tiny

In one run it measures (1) this machine's fp32 GEMM ceiling at the encoder's shapes, (2) the
real training step of ``TextTowerModule`` (forward, loss, backward, AdamW step) on batches from
``TextDataModule`` over the generated data, (3) catalogue encoding with ``encode_tokens``.
FLOPs are counted on real (non-pad) tokens from the model config: per token and layer,
``8 d^2 + 4 d d_ff`` for the dense layers and ``4 T d`` for attention; training = 3x forward.
The ratio (MFU) is the figure that counts: absolute speeds vary +-30 % on shared machines.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import recsys.config  # noqa: F401
from recsys.columns import Columns
from recsys.config import minilm_path
from recsys.data.synthetic import generate


def gemm_ceiling(d: int, d_ff: int, rows: int = 2048, seconds: float = 2.0) -> float:
    """Best fp32 GFLOP/s of the encoder's dense shapes (rows x d @ d x d_ff and back)."""
    best = 0.0
    for m, k, n in ((rows, d, d_ff), (rows, d_ff, d), (rows, d, d)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            a @ b
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    return best


def flops_per_token(config, seq_len: float) -> float:
    d, d_ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    return layers * (8 * d * d + 4 * d * d_ff + 4 * seq_len * d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", choices=["minilm", "tiny"], default="minilm")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--encode-history", action="store_true")
    ap.add_argument("--freeze-embeddings", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)

    from recsys.data import Dataset, FileDataSource  # noqa: F401
    from recsys.recommender import History
    from recsys.text.datamodule import TextDataModule
    from recsys.text.encoder import ItemEncoder, TwoTower
    from recsys.text.module import TextTowerModule

    if args.encoder == "minilm":
        enc = ItemEncoder.from_pretrained(minilm_path(), max_length=args.max_length)
    else:
        enc = ItemEncoder.random(minilm_path(), max_length=args.max_length)
    cfg = enc.bert.config
    inter, items = generate(n_users=2000, n_items=1500, seed=7)
    texts = (items["title"] + ". " + items["category"] + ". " + items["description"]).to_list()
    item_index = {v: i for i, v in enumerate(items[Columns.Item].to_list())}
    users = {v: i for i, v in enumerate(sorted(set(inter[Columns.User].to_list())))}
    import polars as pl

    df = inter.with_columns(
        pl.col(Columns.User).replace_strict(users).alias(Columns.UserIdx),
        pl.col(Columns.Item).replace_strict(item_index).alias(Columns.ItemIdx),
        pl.lit(1.0).alias(Columns.Weight),
    ).sort(Columns.UserIdx, Columns.Timestamp)
    history = History(df, len(users), len(texts))
    ids, lengths = enc.tokenize(texts)

    ceiling = gemm_ceiling(cfg.hidden_size, cfg.intermediate_size)

    net = TwoTower(enc)
    dm = TextDataModule(
        ids, lengths, history, df.head(0), batch_size=args.batch_size, encode_history=args.encode_history
    )
    module = TextTowerModule(net, freeze_embeddings=args.freeze_embeddings)
    module.item_cache = enc.encode_tokens(ids, lengths)
    opt = module.configure_optimizers()["optimizer"]
    loader = iter(dm.train_dataloader())
    net.train()

    def step(batch):
        loss = module.training_step(batch, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(next(loader))  # warm-up (allocator, first-call overheads)
    tokens = seqs = 0
    pad_tokens = 0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        try:
            batch = next(loader)
        except StopIteration:
            loader = iter(dm.train_dataloader())
            batch = next(loader)
        mask = batch["item_attention_mask"]
        tokens += int(mask.sum())
        pad_tokens += mask.numel()
        seqs += mask.shape[0]
        step(batch)
    train_s = time.perf_counter() - t0
    mean_len = tokens / seqs
    train_flops = 3 * flops_per_token(cfg, mean_len) * tokens
    train_mfu = train_flops / train_s / 1e9 / ceiling

    t0 = time.perf_counter()
    enc.encode_tokens(ids, lengths, batch_size=128)
    enc_s = time.perf_counter() - t0
    enc_tokens = int(lengths.sum())
    enc_flops = flops_per_token(cfg, float(lengths.float().mean())) * enc_tokens
    enc_mfu = enc_flops / enc_s / 1e9 / ceiling

    out = {
        "encoder": args.encoder,
        "threads": torch.get_num_threads(),
        "gemm_ceiling_gflops": round(ceiling, 1),
        "train": {
            "batch_size": args.batch_size,
            "encoder_seqs_per_s": round(seqs / train_s, 1),
            "examples_per_s": round(args.steps * args.batch_size / train_s, 1),
            "real_tokens_per_s": round(tokens / train_s, 1),
            "pad_share": round(1 - tokens / pad_tokens, 3),
            "gflops": round(train_flops / train_s / 1e9, 1),
            "mfu": round(train_mfu, 3),
        },
        "encode": {
            "seqs_per_s": round(len(texts) / enc_s, 1),
            "real_tokens_per_s": round(enc_tokens / enc_s, 1),
            "gflops": round(enc_flops / enc_s / 1e9, 1),
            "mfu": round(enc_mfu, 3),
        },
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
