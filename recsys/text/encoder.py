"""The text tower as plain ``nn.Module``s: usable for export and inference without Lightning.

* ``ItemEncoder``: BERT -> masked mean pooling -> L2 normalisation (for all-MiniLM-L6-v2 this
  reproduces the sentence-transformers embedding exactly, so step 0 is a sound zero-shot model).
* ``TextAdapter``: a residual MLP on the pooled BERT vector, initialised to the identity. With
  the BERT frozen it is what fine-tuning trains: the catalogue's BERT vectors are computed once
  and each step costs a small MLP instead of a BERT forward and backward, so a CPU minute buys
  thousands of steps; and the tower starts exactly at the zero-shot vectors and can only refine
  them (weight decay pulls the residual back toward zero, i.e. toward the zero-shot geometry).
* ``UserEncoder``: attention pooling over the user's history embeddings. Why attention and not a
  plain mean: a user's last items say more about the next one than old ones (a recency bias per
  position), and some history items say more than others (a content term). It is initialised
  to a recency-weighted mean, i.e. the zero-shot baseline, and cheap: it reads item embeddings,
  so at inference the catalogue is encoded once and users cost one small matmul each.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.errors import ConfigError, require_number, require_whole
from recsys.recommender import recent_items
from recsys.text.compiled import InferenceCompiler
from recsys.text.packed import packed_mean_pool, supports_packing

if TYPE_CHECKING:
    from recsys.text.cache import ItemEmbeddingCache

log = logging.getLogger(__name__)

# Compute dtype per device type: bf16 autocast pays on GPUs; on these CPUs (no AVX-512 bf16) it is
# 7x slower in the forward and 18x in a training step than fp32, so CPU stays fp32.
DEFAULT_PRECISION: dict[str, str] = {"cpu": "fp32", "cuda": "bf16"}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Catalogue passes go in length-sorted batches of this many items (sorting keeps the padding small
# at any size). Measured on 2 cores, same process (docs/benchmarks.md): on a quiet machine 128 took
# 3.4 s for the generated catalogue, 512 took 4.3 s (its activations leave the cache); under heavy
# load 512 was the faster one (fewer OpenMP barriers to wait at). The quiet machine decides.
ENCODE_BATCH = 128
# The packed forward pays a gather/scatter per layer (~4 % of a CPU pass), so it runs only where
# padding costs more: training batches padded by at least this share (a MiniLM step on the
# generated data pads 22 % in one length bucket: packed, 1.15-1.27x per step against HF's forward
# with two buckets). Catalogue passes (no gradient) never pack: their length-sorted batches pad
# ~2 %, and packed they measured 0.97x on the CPU and 0.6-0.8x on an H200 (CHANGELOG.md,
# "Text tower: packed training forward").
PACK_MIN_PADDING = 0.05


def compute_dtype(device: torch.device | str, precision: Mapping[str, str] | None = None) -> torch.dtype:
    """``precision[device type]`` as a dtype (fp32 for devices not listed)."""
    kind = torch.device(device).type
    name = (precision if precision is not None else DEFAULT_PRECISION).get(kind, "fp32")
    if name not in _DTYPES:
        raise ConfigError(f"precision for {kind} must be one of {sorted(_DTYPES)}, got '{name}'")
    return _DTYPES[name]


def autocast_for(device: torch.device | str, precision: Mapping[str, str] | None = None):
    """The autocast context of ``precision[device type]`` (a no-op for fp32)."""
    dtype = compute_dtype(device, precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _check_path(name_or_path: str) -> None:
    looks_local = os.sep in name_or_path or name_or_path.startswith(".")
    if looks_local and not Path(name_or_path).is_dir():
        raise ConfigError(f"encoder path does not exist or is not a folder: {name_or_path}")


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    _check_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:
        raise ConfigError(f"cannot load a tokenizer from '{name_or_path}': {str(e).splitlines()[0]}") from e


class TextAdapter(nn.Module):
    """``normalize(z + up(gelu(down(z))))`` with ``up`` zero-initialised: the identity at step 0.
    No dropout: it computes the same in train and eval mode."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z + self.up(F.gelu(self.down(z))), dim=-1)


def load_bert_model(name_or_path: str, **kwargs: Any) -> nn.Module:
    """``AutoModel.from_pretrained`` without its pooler (``add_pooling_layer=False``) and without
    the noise of that load: transformers' report of the pooler left out on purpose, and its
    "Loading weights" bar, a line of every run (in a log file, of every worker) for a load of
    under a second. Training and ``recsys.update`` load the BERT here."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from recsys.quiet import quiet_pooler_report

    quiet_pooler_report()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return AutoModel.from_pretrained(name_or_path, add_pooling_layer=False, **kwargs)
    finally:
        if bar:
            hf_logging.enable_progress_bar()


class ItemEncoder(nn.Module):
    """BERT + masked mean pooling + L2 norm (+ an optional ``TextAdapter``). Holds its tokenizer.

    Args:
        max_length: tokens per item, or ``"auto"``: the ``max_length_percentile`` of the
            catalogue's token lengths, fixed (and logged) by the first ``tokenize`` call.
        num_layers: keep only the first N transformer layers (a speed/accuracy option).
        precision: compute dtype per device type (``{"cpu": "fp32", "cuda": "bf16"}``).
        embedding_cache: item vectors keyed by text and weights (``ItemEmbeddingCache``), so
            repeated catalogue passes encode only items whose text or encoder changed.
        dropout: replaces every dropout probability of the BERT (hidden and attention) while
            fine-tuning; ``None`` keeps the checkpoint's. Inference never drops anything.
        packed: while training, run a plain BERT on its real tokens only (``recsys.text.packed``:
            no compute on padding) for batches padded by at least ``PACK_MIN_PADDING``; the same
            vectors and gradients up to float rounding. Other architectures, inference, or
            ``False`` use the Hugging Face forward.
        compile: run catalogue passes (inference on the CPU) through a compiled copy of the
            BERT (``recsys.text.compiled``): ``True``, ``False``, or ``"auto"``, only
            passes of at least ``compile_min_items`` items, where the ~30 s first compile pays off.
        adapter_hidden: width of the ``TextAdapter`` on top of the pooled vector (``None``: no
            adapter). The embedding cache holds the BERT's vectors; the adapter is applied after it.
    """

    def __init__(
        self,
        bert: nn.Module,
        tokenizer,
        max_length: int | str = 32,
        max_length_percentile: float = 99.0,
        num_layers: int | None = None,
        precision: Mapping[str, str] | None = None,
        embedding_cache: ItemEmbeddingCache | None = None,
        dropout: float | None = None,
        packed: bool = True,
        compile: bool | str = "auto",
        compile_min_items: int = 200_000,
        adapter_hidden: int | None = None,
    ) -> None:
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer
        if max_length != "auto" and (
            isinstance(max_length, bool) or not (isinstance(max_length, int) and max_length > 0)
        ):
            raise ConfigError(f"encoder.max_length must be a positive integer or 'auto', got {max_length!r}")
        self.max_length: int | str = max_length
        # Checked here, when the job builds the encoder, not at the catalogue's tokenisation after the CF fit.
        require_number("encoder.max_length_percentile", max_length_percentile, 0, 100)
        self.max_length_percentile = max_length_percentile
        require_whole("encoder.num_layers", num_layers, optional=True)
        if num_layers is not None:
            layers = bert.encoder.layer
            if not 1 <= num_layers <= len(layers):
                raise ConfigError(f"encoder.num_layers must be in 1..{len(layers)}, got {num_layers}")
            bert.encoder.layer = nn.ModuleList(list(layers)[:num_layers])
            bert.config.num_hidden_layers = num_layers
        self.precision = dict(precision) if precision is not None else dict(DEFAULT_PRECISION)
        self.embedding_cache = embedding_cache
        require_number("encoder.dropout", dropout, 0, 1, high_open=True, optional=True)
        if dropout is not None:
            for m in bert.modules():
                if isinstance(m, nn.Dropout):
                    m.p = float(dropout)  # BERT's sdpa attention reads its dropout module's p too
            bert.config.hidden_dropout_prob = bert.config.attention_probs_dropout_prob = float(dropout)
        self.packed = bool(packed) and supports_packing(bert)
        self.compiler = InferenceCompiler(compile, compile_min_items)
        require_whole("encoder.adapter_hidden", adapter_hidden, optional=True)
        self.adapter = TextAdapter(self.dim, adapter_hidden) if adapter_hidden else None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        max_length: int | str = 32,
        max_length_percentile: float = 99.0,
        num_layers: int | None = None,
        precision: Mapping[str, str] | None = None,
        embedding_cache: ItemEmbeddingCache | None = None,
        dropout: float | None = None,
        packed: bool = True,
        compile: bool | str = "auto",
        compile_min_items: int = 200_000,
        adapter_hidden: int | None = None,
    ) -> ItemEncoder:
        """A local folder (or, with internet, a hub name) holding a BERT-style model."""
        tokenizer = load_tokenizer(name_or_path)
        try:
            bert = load_bert_model(name_or_path)
        except Exception as e:
            raise ConfigError(f"cannot load a BERT model from '{name_or_path}': {str(e).splitlines()[0]}") from e
        if not hasattr(bert, "embeddings") or not hasattr(bert.config, "hidden_size"):
            raise ConfigError(f"'{name_or_path}' is not a BERT-style encoder ({type(bert).__name__})")
        # from_pretrained returns eval mode; switch back so dropout is on while fine-tuning.
        bert.train()
        return cls(
            bert,
            tokenizer,
            max_length,
            max_length_percentile,
            num_layers,
            precision,
            embedding_cache,
            dropout,
            packed,
            compile,
            compile_min_items,
            adapter_hidden,
        )

    @classmethod
    def random(
        cls,
        tokenizer: str,
        hidden_size: int = 32,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 2,
        intermediate_size: int = 64,
        max_length: int | str = 32,
        seed: int = 0,
        precision: Mapping[str, str] | None = None,
        embedding_cache: ItemEmbeddingCache | None = None,
        dropout: float | None = None,
        packed: bool = True,
        compile: bool | str = "auto",
        compile_min_items: int = 200_000,
        adapter_hidden: int | None = None,
    ) -> ItemEncoder:
        """A tiny randomly initialised BERT (tests, smoke runs) with a real tokenizer."""
        from transformers import BertConfig, BertModel

        tok = load_tokenizer(tokenizer)
        config = BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max(64, max_length) if isinstance(max_length, int) else 512,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            bert = BertModel(config, add_pooling_layer=False)
        return cls(
            bert,
            tok,
            max_length,
            precision=precision,
            embedding_cache=embedding_cache,
            dropout=dropout,
            packed=packed,
            compile=compile,
            compile_min_items=compile_min_items,
            adapter_hidden=adapter_hidden,
        )

    @property
    def dim(self) -> int:
        return int(self.bert.config.hidden_size)

    def resolve_max_length(self, texts: Sequence[str]) -> int:
        """Fix ``max_length="auto"`` from the token lengths of ``texts`` (a percentile, logged).

        Every padded position costs as much as a real token in the dense layers, so the longest
        texts should not set the width of every batch; truncating the top 1 % cuts a few tokens
        from a few items.
        """
        if self.max_length != "auto":
            return int(self.max_length)
        limit = int(getattr(self.bert.config, "max_position_embeddings", 512))
        lengths = np.array([len(x) for x in self.tokenizer(list(texts), truncation=False)["input_ids"]])
        chosen = int(min(limit, max(8, np.ceil(np.percentile(lengths, self.max_length_percentile)))))
        log.info(
            "encoder max_length auto: %d tokens (p%g of %d texts; median %d, max %d; %.1f%% truncated)",
            chosen,
            self.max_length_percentile,
            len(lengths),
            int(np.median(lengths)),
            int(lengths.max()),
            100.0 * float((lengths > chosen).mean()),
        )
        self.max_length = chosen
        return chosen

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids padded to ``max_length`` and the real lengths, for the whole list at once."""
        max_length = self.resolve_max_length(texts)
        enc = self.tokenizer(
            list(texts), max_length=max_length, truncation=True, padding="max_length", return_tensors="pt"
        )
        return enc["input_ids"].to(torch.int32), enc["attention_mask"].sum(1).to(torch.int32)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.adapt(self._embed(self.bert, input_ids, attention_mask))

    def adapt(self, base: torch.Tensor) -> torch.Tensor:
        """The adapter on BERT vectors (``base``); the identity without one."""
        return base if self.adapter is None else self.adapter(base.to(self.adapter.up.weight.device))

    def _embed(self, bert: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``forward`` through ``bert``: this encoder's own, or its compiled copy."""
        with autocast_for(input_ids.device, self.precision):
            if self.packed and torch.is_grad_enabled() and self._padding(attention_mask) >= PACK_MIN_PADDING:
                pooled = packed_mean_pool(bert, input_ids, attention_mask)
            else:
                hidden = bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                hidden = hidden.float()  # pooled in fp32, as the packed path does
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled.float(), dim=-1)

    @staticmethod
    def _padding(attention_mask: torch.Tensor) -> float:
        return 1.0 - float(attention_mask.sum()) / max(1, attention_mask.numel())

    def forward_bucketed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, buckets: int = 4) -> torch.Tensor:
        """``forward`` on length-sorted chunks, each padded only to its own longest item.

        A training batch keeps its random composition (its targets are each other's negatives,
        so grouping them by length would also group the negatives by length); the padding goes
        instead by splitting the batch's unique items into ``buckets`` chunks of similar length.
        Same vectors as ``forward`` up to float rounding, in the input order.
        """
        lengths = attention_mask.sum(1)
        if buckets <= 1 or len(lengths) < 2 * buckets:
            return self(input_ids, attention_mask)
        order = torch.argsort(lengths, descending=True, stable=True)
        parts = []
        for sel in torch.tensor_split(order, buckets):
            width = int(lengths[sel].max())
            parts.append(self(input_ids[sel, :width], attention_mask[sel, :width]))
        return torch.cat(parts)[torch.argsort(order)]

    def weights_fingerprint(self) -> str:
        """A hash of the encoder's weights (and of anything else that changes its output)."""
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        h.update(repr((type(self.bert).__name__, self.bert.config.num_hidden_layers)).encode())
        for name, t in self.bert.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()

    @torch.no_grad()
    def encode_tokens(
        self, ids: torch.Tensor, lengths: torch.Tensor, batch_size: int = ENCODE_BATCH, progress: bool = False
    ) -> torch.Tensor:
        """Embeddings of pre-tokenised texts, in length order so each batch pads to little.

        With an ``embedding_cache``, only items whose tokens are not yet cached under the current
        weights are encoded.
        """
        base = self.base_vectors(ids, lengths, batch_size, progress)
        if self.adapter is None:
            return base
        # In blocks: the adapter's hidden activations for a whole large catalogue need not exist at once.
        return torch.cat([self.adapt(b).float().cpu() for b in torch.split(base, 65536)]) if len(base) else base

    @torch.no_grad()
    def base_vectors(
        self, ids: torch.Tensor, lengths: torch.Tensor, batch_size: int = ENCODE_BATCH, progress: bool = False
    ) -> torch.Tensor:
        """The BERT's pooled vectors, without the adapter (through the cache when there is one)."""
        if self.embedding_cache is not None:
            return self.embedding_cache.encode(self, ids, lengths, batch_size, progress)
        return self._encode_tokens(ids, lengths, batch_size, progress)

    @torch.no_grad()
    def _encode_tokens(
        self,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        batch_size: int = ENCODE_BATCH,
        progress: bool = False,
        weights: str | None = None,
    ) -> torch.Tensor:
        """``encode_tokens`` without the cache; ``weights``: ``weights_fingerprint()`` if the
        caller has it already (the compiled path needs it)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        order = torch.argsort(lengths, descending=True, stable=True)
        out = torch.empty(len(ids), self.dim)
        batches = range(0, len(ids), batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="encode items", unit="batch", leave=False)
        compiled = None
        if self.compiler.wanted(len(ids), device):
            compiled = self.compiler.module(self.bert, weights or self.weights_fingerprint())
        for start in batches:
            sel = order[start : start + batch_size]
            width = int(lengths[sel].max())
            batch_ids = ids[sel, :width].long().to(device)
            mask = (torch.arange(width) < lengths[sel, None]).long().to(device)
            # Size-1 dimensions would be specialised by the compiler (a new ~30 s compile): eager.
            if compiled is not None and len(sel) > 1 and width > 1:
                try:
                    out[sel] = self._embed(compiled, batch_ids, mask).float().cpu()
                    continue
                except Exception as e:  # no C++ compiler, an unsupported op...: same pass, eagerly
                    self.compiler.disable(e)
                    compiled = None
            out[sel] = self._embed(self.bert, batch_ids, mask).float().cpu()
        self.train(was_training)
        return out

    def encode(self, texts: Sequence[str], batch_size: int = ENCODE_BATCH, progress: bool = False) -> torch.Tensor:
        ids, lengths = self.tokenize(texts)
        return self.encode_tokens(ids, lengths, batch_size, progress)


class UserEncoder(nn.Module):
    """Attention pooling over history item embeddings (index 0 of the history = most recent)."""

    def __init__(self, dim: int, max_history: int = 20, recency_decay: float = 0.15) -> None:
        super().__init__()
        self.max_history = max_history
        self.position_bias = nn.Parameter(-recency_decay * torch.arange(max_history, dtype=torch.float32))
        self.content = nn.Linear(dim, 1)
        self.residual = nn.Linear(dim, dim, bias=False)
        for p in (self.content.weight, self.content.bias, self.residual.weight):
            nn.init.zeros_(p)

    def forward(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``history``: [B, L, d] embeddings, most recent first; ``mask``: [B, L] bool."""
        return F.normalize(self.pooled(history, mask), dim=-1)

    def pooled(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The user vector before L2 normalisation."""
        logits = self.position_bias[: history.shape[1]] + self.content(history).squeeze(-1)
        logits = logits.masked_fill(~mask, -1e4)
        pooled = (torch.softmax(logits, dim=1).unsqueeze(-1) * history).sum(1)
        pooled = pooled * mask.any(1, keepdim=True)  # users without history get the zero vector
        return pooled + self.residual(pooled)

    def embed_histories(self, item_embeddings: torch.Tensor, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """User vectors from histories (item indices, oldest first), looked up in ``item_embeddings``."""
        hist, mask = pad_histories(histories, self.max_history)
        dev = item_embeddings.device
        return self(item_embeddings[hist.to(dev).clamp(min=0)], mask.to(dev))


class TwoTower(nn.Module):
    """Item and user towers sharing one embedding space; score = cosine / temperature."""

    def __init__(
        self,
        item_encoder: ItemEncoder,
        max_history: int = 20,
        temperature: float = 0.1,
        learn_temperature: bool = True,
        frozen_history: bool = False,
        recency_decay: float = 0.15,
        user_tower: str = "mean",
        sequence: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from recsys.text.sequence import user_tower as make_user_tower

        self.item_encoder = item_encoder
        # recency_decay sets the zero-shot user vector (a recency-weighted mean of the history);
        # how fast interest decays is a property of the data: chosen per data set on validation.
        # user_tower="sequence" adds a transformer over the history that starts at zero
        # (recsys.text.sequence), so both towers start as that mean.
        self.user_tower = user_tower
        self.user_encoder = make_user_tower(user_tower, item_encoder.dim, max_history, recency_decay, sequence)
        # frozen_history: the user side reads the catalogue as the encoder saw it before
        # fine-tuning (``history_embeddings``, set once), the item side is fine-tuned to that space.
        # Training and inference then see the same history vectors; with a shared, moving encoder
        # the history vectors used in training (cached, refreshed once an epoch) lag the ones
        # used at inference, and that gap cost more than fine-tuning gained (docs/design.md).
        # Only sound from a pretrained encoder: a random one has nothing worth freezing.
        self.frozen_history = frozen_history
        self.history_embeddings: torch.Tensor | None = None
        # Learned (as in CLIP): a fixed sharp temperature makes the zero-shot start over-confident,
        # and the first gradients then tear up its geometry instead of refining it.
        self.log_inv_temperature = nn.Parameter(
            torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_temperature
        )

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.log_inv_temperature.detach()))

    def user_embeddings(self, item_embeddings: torch.Tensor, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """User vectors from each user's history (item indices, oldest first).

        History items are looked up in ``history_embeddings`` when the history side is frozen,
        else in ``item_embeddings`` (the catalogue as the current encoder sees it).
        """
        if self.history_embeddings is not None:
            item_embeddings = self.history_embeddings.to(item_embeddings.device)
        return self.user_encoder.embed_histories(item_embeddings, histories)


def pad_histories(histories: Sequence[np.ndarray], max_history: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Last ``max_history`` items of each history, most recent first, padded with -1, and the mask."""
    t = torch.from_numpy(recent_items(histories, max_history))
    return t, t >= 0
