"""Text-tower speed: model FLOP utilisation (MFU) of fine-tuning and encoding, on real tokens.

    python bench/text_tower.py                                  # the default step vs the old one
    python bench/text_tower.py --variants until_nov26,default,freeze3,layers3,len24 --rounds 3
    python bench/text_tower.py --int8                           # + dynamic int8 encoding, cosine to fp32
    python bench/text_tower.py --variants default --compiled    # + compiled catalogue passes (encoder.compile)
    python bench/text_tower.py --encoder tiny --steps 2 --rounds 1
    python bench/text_tower.py --device cuda --encoder minilm_shape --batch-size 64   # on a GPU (bf16)

In one run it measures (1) this machine's fp32 GEMM ceiling at the encoder's shapes, (2) the
real training step of ``TextTowerModule`` (forward, loss, backward, AdamW step) on batches from
``TextDataModule`` over the generated data, once per *variant* (module / encoder options),
(3) catalogue encoding with ``encode_tokens`` (with ``--compiled`` also through the compiled,
copy of the first variant's BERT, right after the eager pass of the same weights).
The machine is shared, so the phases are interleaved: every round measures the ceiling, then
``--steps`` steps of each variant on the same batches, then one catalogue pass; MFU is each
variant's FLOP rate over the mean ceiling.
With ``--device cuda`` the ceiling is measured in the encoder's CUDA precision (bf16), and MFU is
also given against a large square GEMM and the GPU's data-sheet peak.

FLOPs are counted on real (non-pad) tokens from the model config: per token and layer,
``8 d^2 + 4 d d_ff`` for the dense layers and ``4 T d`` for attention; a trained layer costs
3x its forward, a frozen one 1x (no backward). Padding is reported as its share of the
positions the dense layers actually compute (0 for the packed training forward).

Accuracy of the options: ``bench/text_tower.py quality --help`` (trains and evaluates only the
text tower, on the generated data or on Amazon-Scientific).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import recsys.config  # noqa: F401
from recsys.config import minilm_path
from recsys.errors import run_script
from recsys.text.encoder import ENCODE_BATCH


def gemm_ceiling(
    d: int, d_ff: int, rows: int = 2048, seconds: float = 2.0, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> float:
    """Best GFLOP/s of the encoder's dense shapes (rows x d @ d x d_ff and back) in ``dtype``."""
    best = 0.0
    for m, k, n in ((rows, d, d_ff), (rows, d_ff, d), (rows, d, d)):
        best = max(best, _gemm_rate(m, k, n, seconds / 3, device, dtype))
    return best


def _gemm_rate(m: int, k: int, n: int, seconds: float, device: str, dtype: torch.dtype) -> float:
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10 if device == "cuda" else 1):  # GPU calls queue up; sync once per ten
            a @ b
            reps += 1
        _sync(device)
    return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, no sparsity), for GPU MFU.
GPU_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def gpu_peak_tflops() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)


def layer_flops(config, seq_len: float) -> float:
    """Forward FLOPs of one transformer layer per token."""
    d, d_ff = config.hidden_size, config.intermediate_size
    return 8 * d * d + 4 * d * d_ff + 4 * seq_len * d


def flops_per_token(config, seq_len: float) -> float:
    return config.num_hidden_layers * layer_flops(config, seq_len)


# The job's default text tower (conf/encoder/minilm.yaml, conf/text/default.yaml): no dropout,
# packed tokens, one length bucket. Every variant below overrides some of it.
BASE: dict[str, Any] = {"dropout": 0.0, "packed": True, "module": {"length_buckets": 1}}
# "old" is the step before issue #6 (checkpoint dropout, one chunk padded to the batch's longest
# item, for-loop AdamW); "until_nov26" the default until 2026-11-26 (the same with fused AdamW);
# "unpacked" the default until packing (HF's padded forward, two length buckets).
CHECKPOINT = {"dropout": None, "packed": False, "module": {"length_buckets": 1}}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "unpacked": {"packed": False, "module": {"length_buckets": 2}},
    "old": {**CHECKPOINT, "module": {**CHECKPOINT["module"], "fused_optimizer": False}},
    "until_nov26": CHECKPOINT,
    "dropout": {"dropout": None},
    "freeze_emb": {"module": {"freeze_embeddings": True}},
    "buckets2": {"module": {"length_buckets": 2}},
    "buckets4": {"module": {"length_buckets": 4}},
    "freeze2": {"module": {"freeze_layers": 2}},
    "freeze3": {"module": {"freeze_layers": 3}},
    "layers4": {"num_layers": 4},
    "layers3": {"num_layers": 3},
    "len24": {"max_length": 24},
    "len16": {"max_length": 16},
}


def variant(name: str) -> dict[str, Any]:
    """``BASE`` with the variant's overrides (its ``module`` entries merged into BASE's)."""
    spec = VARIANTS[name]
    return {**BASE, **spec, "module": {**BASE["module"], **spec.get("module", {})}}


@dataclass
class Meter:
    seconds: float = 0.0
    steps: int = 0
    seqs: int = 0
    tokens: int = 0
    computed: int = 0  # positions computed, pad included
    flops: float = 0.0
    extra: dict = field(default_factory=dict)

    def add_pass(self, seqs: int, tokens: int, flops: float) -> None:
        """One catalogue pass's work (its time is added by the caller, around the pass only)."""
        self.seqs, self.tokens, self.flops = self.seqs + seqs, self.tokens + tokens, self.flops + flops


def load_generated(n_users: int = 2000, n_items: int = 1500, seed: int = 7):
    """The generated data as (texts, History)."""
    import polars as pl

    from recsys.columns import Columns
    from recsys.data.synthetic import generate
    from recsys.recommender import History

    inter, items = generate(n_users=n_users, n_items=n_items, seed=seed)
    texts = (items["title"] + ". " + items["category"] + ". " + items["description"]).to_list()
    item_index = {v: i for i, v in enumerate(items[Columns.Item].to_list())}
    users = {v: i for i, v in enumerate(sorted(set(inter[Columns.User].to_list())))}
    df = inter.with_columns(
        pl.col(Columns.User).replace_strict(users).alias(Columns.UserIdx),
        pl.col(Columns.Item).replace_strict(item_index).alias(Columns.ItemIdx),
        pl.lit(1.0).alias(Columns.Weight),
    ).sort(Columns.UserIdx, Columns.Timestamp)
    return texts, History(df, len(users), len(texts))


def make_encoder(
    kind: str, max_length: int, num_layers: int | None = None, dropout: float | None = None, packed: bool = True
):
    from recsys.text.encoder import ItemEncoder, load_tokenizer

    if kind == "minilm":
        return ItemEncoder.from_pretrained(
            minilm_path(), max_length=max_length, num_layers=num_layers, dropout=dropout, packed=packed
        )
    if kind == "minilm_shape":
        # MiniLM's config with random weights: the same shapes and FLOPs, for a machine that has
        # the config and tokenizer but not the 87 MB of weights (the GPU machine).
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        bert = BertModel(BertConfig.from_pretrained(minilm_path()), add_pooling_layer=False)
        tok = load_tokenizer(minilm_path())
        return ItemEncoder(bert, tok, max_length, num_layers=num_layers, dropout=dropout, packed=packed)
    return ItemEncoder.random(minilm_path(), max_length=max_length, dropout=dropout, packed=packed)


def computed_positions(mask: torch.Tensor, buckets: int, packed: bool) -> int:
    """Positions the dense layers compute for this batch when split as ``forward_bucketed`` does
    (a packed chunk computes its real tokens only, see ``PACK_MIN_PADDING``)."""
    from recsys.text.encoder import PACK_MIN_PADDING

    lengths = mask.sum(1)
    if buckets <= 1 or len(lengths) < 2 * buckets:
        chunks = [torch.arange(len(lengths))]
    else:
        chunks = torch.tensor_split(torch.argsort(lengths, descending=True, stable=True), buckets)
    total = 0
    for sel in chunks:
        real, padded = int(lengths[sel].sum()), len(sel) * int(lengths[sel].max())
        total += real if packed and 1 - real / padded >= PACK_MIN_PADDING else padded
    return total


def speed(args: argparse.Namespace) -> dict:
    from recsys.text.datamodule import TextDataModule
    from recsys.text.encoder import TwoTower, compute_dtype
    from recsys.text.module import TextTowerModule

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is visible")

    torch.manual_seed(0)
    texts, history = load_generated()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")

    runs = {}
    for name in names:
        spec = variant(name)
        enc = make_encoder(
            args.encoder,
            spec.get("max_length", args.max_length),
            spec.get("num_layers"),
            spec["dropout"],
            spec["packed"],
        )
        ids, lengths = enc.tokenize(texts)
        net = TwoTower(enc).to(device)
        dm = TextDataModule(ids, lengths, history, history.interactions.head(0), batch_size=args.batch_size)
        module = TextTowerModule(net, **spec["module"])
        module.item_cache = torch.nn.functional.normalize(torch.randn(len(texts), enc.dim), dim=-1).to(device)
        opt = module.configure_optimizers()["optimizer"]
        # Every variant trains on the same examples (the sampler is seeded): a fair comparison.
        # Batches are collated (and moved) before timing: the step is measured, not the loader.
        loader = iter(dm.train_dataloader())
        batches = [{k: v.to(device) for k, v in next(loader).items()} for _ in range(args.steps + 1)]
        net.train()
        frozen = sum(1 for layer in enc.bert.encoder.layer if not any(p.requires_grad for p in layer.parameters()))
        runs[name] = dict(module=module, opt=opt, batches=batches, enc=enc, ids=ids, lengths=lengths, frozen=frozen)

    def step(run: dict, batch: dict) -> None:
        loss = run["module"].training_step(batch, 0)
        loss.backward()
        run["opt"].step()
        run["opt"].zero_grad(set_to_none=True)
        _sync(device)

    for run in runs.values():
        # Warm-up (allocator, first-call overheads). A GPU also picks kernels per new shape (each
        # batch pads to its own width), so there every timed batch is run once beforehand.
        for batch in run["batches"] if device == "cuda" else run["batches"][:1]:
            step(run, batch)
    if device == "cuda":
        base = runs[names[0]]
        base["enc"]._encode_tokens(base["ids"], base["lengths"], batch_size=args.encode_batch_size)

    cfg0 = runs[names[0]]["enc"].bert.config
    dtype = compute_dtype(device, runs[names[0]]["enc"].precision)
    ceilings: list[float] = []
    meters = {name: Meter() for name in names}
    # Catalogue encoding, once per distinct encoding among the variants: catalogue passes never
    # pack and drop nothing, so only the depth and the token width tell them apart.
    encoders = {}
    for name, run in runs.items():
        encoders.setdefault((run["enc"].bert.config.num_hidden_layers, run["ids"].shape[1]), name)
    enc_meters = {name: Meter() for name in encoders.values()}
    compiled = None
    if args.compiled:
        # The first variant's BERT (shared, not copied) behind an encoder that compiles every
        # catalogue pass (``recsys.text.compiled``); its first pass pays the compile.
        from recsys.text.encoder import ItemEncoder

        base = runs[names[0]]
        enc0 = base["enc"]
        compiled = ItemEncoder(enc0.bert, enc0.tokenizer, enc0.max_length, precision=enc0.precision, compile=True)
        t0 = time.perf_counter()
        got = compiled._encode_tokens(base["ids"], base["lengths"], batch_size=args.encode_batch_size)
        compile_s = time.perf_counter() - t0
        ref = enc0._encode_tokens(base["ids"], base["lengths"], batch_size=args.encode_batch_size)
        compiled_diff = float((got - ref).abs().max())
        compiled_meter = Meter()
    for _ in range(args.rounds):
        ceilings.append(gemm_ceiling(cfg0.hidden_size, cfg0.intermediate_size, seconds=1.0, device=device, dtype=dtype))
        for name, run in runs.items():
            m, cfg = meters[name], run["enc"].bert.config
            buckets = run["module"].length_buckets
            for batch in run["batches"][1:]:
                mask = batch["item_attention_mask"]
                t0 = time.perf_counter()
                step(run, batch)
                dt = time.perf_counter() - t0
                m.seconds += dt
                m.extra.setdefault("rounds", [0.0] * args.rounds)[len(ceilings) - 1] += dt / (len(run["batches"]) - 1)
                lengths = mask.sum(1).float()
                n_tok = int(lengths.sum())
                mean_len = float((lengths * lengths).sum() / lengths.sum())  # attention width a token sees
                layers, frozen = cfg.num_hidden_layers, run["frozen"]
                m.flops += n_tok * layer_flops(cfg, mean_len) * (3 * (layers - frozen) + frozen)
                m.steps += 1
                m.seqs += len(lengths)
                m.tokens += n_tok
                m.computed += computed_positions(mask, buckets, run["enc"].packed)
        progress = {n: round(m.seconds / max(1, m.steps), 2) for n, m in meters.items()}
        print(
            f"round {len(ceilings)}: ceiling {ceilings[-1]:.1f} GFLOP/s, s/step {progress}", file=sys.stderr, flush=True
        )
        for name, em in enc_meters.items():
            run = runs[name]
            t0 = time.perf_counter()
            run["enc"]._encode_tokens(run["ids"], run["lengths"], batch_size=args.encode_batch_size)
            em.seconds += time.perf_counter() - t0
            lengths = run["lengths"].float()
            cfg = run["enc"].bert.config
            flops = sum(flops_per_token(cfg, float(n)) * float(n) for n in lengths.tolist())
            em.add_pass(len(lengths), int(lengths.sum()), flops)
            if compiled is not None and name == names[0]:
                # The training steps above changed the weights: one untimed pass makes the compiled
                # copy of the new ones (as a fine-tuning run's next pass would), then the timed
                # one. Neither timed pass hashes the weights (the job's cache does that once for
                # either path).
                weights = compiled.weights_fingerprint()
                compiled._encode_tokens(run["ids"][:256], run["lengths"][:256], args.encode_batch_size, weights=weights)
                t0 = time.perf_counter()
                compiled._encode_tokens(run["ids"], run["lengths"], args.encode_batch_size, weights=weights)
                compiled_meter.seconds += time.perf_counter() - t0
                compiled_meter.add_pass(len(lengths), int(lengths.sum()), flops)

    ceiling = sum(ceilings) / len(ceilings)
    out: dict[str, Any] = {
        "encoder": args.encoder,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "gemm_ceiling_gflops": round(ceiling, 1),
        "gemm_ceiling_per_round": [round(c, 1) for c in ceilings],
        "step_s_per_round": {n: [round(x, 4) for x in m.extra["rounds"]] for n, m in meters.items()},
        "train": {},
    }
    for name, m in meters.items():
        out["train"][name] = {
            "batch_size": args.batch_size,
            "encoder_seqs_per_s": round(m.seqs / m.seconds, 1),
            "examples_per_s": round(m.steps * args.batch_size / m.seconds, 1),
            "real_tokens_per_s": round(m.tokens / m.seconds, 1),
            "pad_share": round(1 - m.tokens / m.computed, 3),
            "gflops": round(m.flops / m.seconds / 1e9, 1),
            "mfu": round(m.flops / m.seconds / 1e9 / ceiling, 3),
            "step_s": round(m.seconds / m.steps, 3),
        }

    def encode_figures(em: Meter) -> dict[str, Any]:
        return {
            "batch_size": args.encode_batch_size,
            "seqs_per_s": round(em.seqs / em.seconds, 1),
            "real_tokens_per_s": round(em.tokens / em.seconds, 1),
            "gflops": round(em.flops / em.seconds / 1e9, 1),
            "mfu": round(em.flops / em.seconds / 1e9 / ceiling, 3),
        }

    encode = {name: encode_figures(em) for name, em in enc_meters.items()}
    if compiled is not None:
        cm = compiled_meter
        encode["compiled"] = {
            **encode_figures(cm),
            # against the eager passes of the same rounds and weights
            "speedup_vs_eager": round(cm.seqs / cm.seconds / encode[names[0]]["seqs_per_s"], 3),
            "first_pass_with_compile_s": round(compile_s, 1),
            "compiles": compiled.compiler.compiles,
            "max_abs_diff_to_eager": compiled_diff,
        }
    out["encode"] = encode[names[0]]  # the first variant's encoder
    out["encode_by_variant"] = encode
    if device == "cuda":
        # On a GPU the encoder's small GEMMs are far from the chip's peak, so MFU is also given
        # against the data-sheet peak and a large square GEMM measured here.
        peak = gpu_peak_tflops()
        big = _gemm_rate(8192, 8192, 8192, 2.0, device, dtype)
        out["gemm_8192_gflops"] = round(big, 1)
        out["datasheet_peak_gflops"] = peak * 1000 if peak else None
        for part in (*out["train"].values(), *encode.values()):
            part["mfu_vs_gemm_8192"] = round(part["gflops"] / big, 4)
            if peak:
                part["mfu_vs_datasheet"] = round(part["gflops"] / (peak * 1000), 4)
    if args.int8:
        base = runs[names[0]]
        n = args.int8_items
        out["int8"] = int8_check(base["enc"], base["ids"][:n], base["lengths"][:n])
    return out


def int8_check(enc, ids: torch.Tensor, lengths: torch.Tensor) -> dict:
    """Dynamic int8 (``quantize_dynamic`` on every Linear, or on the FFN only): speed and cosine."""
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from torch.ao.quantization import quantize_dynamic

    enc.eval()
    t0 = time.perf_counter()
    ref = enc._encode_tokens(ids, lengths)
    fp32_s = time.perf_counter() - t0
    out = {"fp32_seqs_per_s": round(len(ids) / fp32_s, 1)}
    for label, only_ffn in (("all_linear", False), ("ffn_only", True)):
        q = copy.deepcopy(enc)
        if only_ffn:
            for layer in q.bert.encoder.layer:
                layer.intermediate = quantize_dynamic(layer.intermediate, {torch.nn.Linear}, dtype=torch.qint8)
                layer.output.dense = quantize_dynamic(
                    torch.nn.Sequential(layer.output.dense), {torch.nn.Linear}, dtype=torch.qint8
                )[0]
        else:
            q.bert = quantize_dynamic(q.bert, {torch.nn.Linear}, dtype=torch.qint8)
        t0 = time.perf_counter()
        got = q._encode_tokens(ids, lengths)
        s = time.perf_counter() - t0
        cos = (got * ref).sum(1)
        out[label] = {
            "seqs_per_s": round(len(ids) / s, 1),
            "speedup": round(fp32_s / s, 2),
            "cosine_mean": round(float(cos.mean()), 4),
            "cosine_min": round(float(cos.min()), 4),
            "cosine_p01": round(float(cos.quantile(0.01)), 4),
        }
    return out


# Speed/accuracy options as Hydra overrides of the job's config, for the quality mode.
UNTIL_NOV26 = ["encoder.dropout=null", "encoder.packed=false", "text.module.length_buckets=1"]
OPTIONS: dict[str, list[str]] = {
    "default": [],
    "old": [*UNTIL_NOV26, "text.module.fused_optimizer=false"],
    "until_nov26": UNTIL_NOV26,
    "unpacked": ["encoder.packed=false", "text.module.length_buckets=2"],
    "dropout": ["encoder.dropout=null"],
    "freeze_emb": ["text.module.freeze_embeddings=true"],
    "buckets4": ["text.module.length_buckets=4"],
    "freeze2": ["text.module.freeze_layers=2"],
    "freeze3": ["text.module.freeze_layers=3"],
    "layers4": ["encoder.num_layers=4"],
    "layers3": ["encoder.num_layers=3"],
    "len24": ["encoder.max_length=24"],
    "len16": ["encoder.max_length=16"],
    "auto95": ["encoder.max_length=auto", "encoder.max_length_percentile=95"],
}


def quality(argv: list[str]) -> None:
    """Fine-tune and evaluate only the text tower, once per option: speed and NDCG@10 together.

    python bench/text_tower.py quality --experiment bert_ranker --options default,freeze3,layers3
    python bench/text_tower.py quality --experiment scientific --options default,freeze3

    The same data, split, encoder, text-tower and trainer config as ``recsys.train
    +experiment=NAME`` (no CF, no ranker, no MLflow): validation NDCG@10 of the zero-shot and
    the chosen weights (the job keeps the zero-shot weights when no epoch beats them), test
    NDCG@10 / Recall@10 of the text tower on the practical protocol, the fine-tuning time and
    the training-step time. Ratios between options of one run are what to compare.
    """
    import tempfile

    import lightning as L
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from recsys.evaluation import ranking_metrics
    from recsys.pipeline import check_split, relevance_matrix, stage_exclusion
    from recsys.recommender import History
    from recsys.text.fit import SeedEachStep, fine_tune
    from recsys.text.recommender import TextRecommender

    ap = argparse.ArgumentParser(prog="text_tower.py quality", description=quality.__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="bert_ranker")
    ap.add_argument("--options", default="default,freeze3,layers3", help=f"comma list of {sorted(OPTIONS)}")
    ap.add_argument("--zeroshot-only", action="store_true", help="evaluate each option's start, no fine-tuning")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every option")
    args = ap.parse_args(argv)
    root = Path(__file__).resolve().parents[1]

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.seconds, self.steps, self._t = 0.0, 0, 0.0

        def on_train_batch_start(self, *a) -> None:
            self._t = time.perf_counter()

        def on_train_batch_end(self, *a) -> None:
            self.seconds += time.perf_counter() - self._t
            self.steps += 1

    rows = []
    for name in args.options.split(","):
        tmp = tempfile.mkdtemp(prefix="text_quality_")
        overrides = [f"+experiment={args.experiment}", f"paths.output_dir={tmp}", *OPTIONS[name], *args.overrides]
        with initialize_config_dir(str(root / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        torch.use_deterministic_algorithms(True, warn_only=True)
        data = instantiate(cfg.data).load()
        split = instantiate(cfg.split).split(data.interactions)
        _, test_users = check_split(data, split)
        encoder = instantiate(cfg.encoder)
        ids, lengths = encoder.tokenize(data.texts)
        net = instantiate(cfg.text.net)(encoder)
        hist_val = History(split.train, data.n_users, data.n_items)
        listed = None
        if "available_from" in data.items.columns:
            import polars as pl

            listed = data.items["available_from"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        dm = instantiate(cfg.text.data)(
            item_ids=ids, item_lengths=lengths, train=hist_val, val=split.val, available_from=listed
        )
        timer = StepTimer()
        callbacks = [
            ModelCheckpoint(dirpath=tmp, filename="best", monitor="val/ndcg_at_10", mode="max", save_weights_only=True),
            EarlyStopping(monitor="val/ndcg_at_10", mode="max", patience=cfg.text.callbacks.early_stopping.patience),
            SeedEachStep(cfg.seed),
            timer,
        ]
        trainer = instantiate(
            cfg.trainer, callbacks=callbacks, logger=False, enable_progress_bar=False, enable_checkpointing=True
        )
        t0 = time.perf_counter()
        if args.zeroshot_only:  # the option's starting point only (e.g. fewer layers), no training
            zero = trainer.validate(instantiate(cfg.text.module)(net=net), datamodule=dm, verbose=False)[0]
            score = float(zero["val/ndcg_at_10"])
            val = {
                "text/val_ndcg_at_10_zeroshot": score,
                "text/val_ndcg_at_10_finetuned": score,
                "text/kept_zeroshot": 1,
            }
            net.eval()
        else:
            net, val, _ = fine_tune(net, dm, instantiate(cfg.text.module), trainer)
        fit_s = time.perf_counter() - t0
        hist_test = hist_val.extend(split.val)
        rec = TextRecommender.from_tokens(net, ids, lengths).fit(hist_test)
        exclude = stage_exclusion(hist_test, data.items, split.test)
        items, _ = rec.recommend(test_users, 10, exclude=exclude)
        m = ranking_metrics(items, relevance_matrix(split.test, test_users, data.n_items), ks=(10,))
        row = {
            "option": name,
            "finetune_s": round(fit_s, 1),
            "train_step_s": round(timer.seconds / max(1, timer.steps), 3),
            "steps": timer.steps,
            "val_ndcg10_zeroshot": round(val["text/val_ndcg_at_10_zeroshot"], 4),
            "val_ndcg10_finetuned": round(val["text/val_ndcg_at_10_finetuned"], 4),
            "kept_zeroshot": bool(val["text/kept_zeroshot"]),
            "test_ndcg10": round(float(m["ndcg_at_10"].mean()), 4),
            "test_recall10": round(float(m["recall_at_10"].mean()), 4),
            "max_length": encoder.max_length,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"experiment": args.experiment, "overrides": args.overrides, "rows": rows}, indent=2))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["quality"]:
        quality(argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encode-batch-size", type=int, default=ENCODE_BATCH, help="items per catalogue batch")
    ap.add_argument(
        "--encoder",
        choices=["minilm", "minilm_shape", "tiny"],
        default="minilm",
        help="minilm_shape: MiniLM's config with random weights (same FLOPs; no weights needed)",
    )
    ap.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: the encoder's precision for cuda (bf16)"
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="steps of each variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--variants", default="old,default", help=f"comma list of {sorted(VARIANTS)}")
    ap.add_argument(
        "--compiled", action="store_true", help="also time compiled catalogue passes (encoder.compile=true)"
    )
    ap.add_argument("--int8", action="store_true", help="also measure dynamic int8 encoding and its cosine to fp32")
    ap.add_argument("--int8-items", type=int, default=1500, help="catalogue items the int8 check encodes")
    args = ap.parse_args(argv)
    print(json.dumps(speed(args), indent=2))


if __name__ == "__main__":
    run_script(main)
