"""BERT's forward pass on packed (pad-free) tokens, reading the weights of a Hugging Face BERT.

Why: every dense layer of a transformer (the Q/K/V, output and feed-forward projections: ~95 % of
MiniLM's FLOPs at our lengths) works token by token, so a padded position costs as much as a
real one. A batch of item texts padded to its longest item computes 10-25 % padding even after
length bucketing. Here the real tokens are gathered into one ``[tokens, d]`` matrix once; only
attention, which mixes the tokens of one text, sees the padded ``[batch, heads, width, d_head]``
layout, for the length of one ``scaled_dot_product_attention`` call per layer.

The HF module stays the storage (its state dict, checkpoints and ``save_pretrained`` are
unchanged); this is only another way to run it, equal to ``BertModel`` followed by masked mean
pooling up to float rounding (``tests/text/test_text_packed.py``), in training (dropout included) and
inference. Architectures it does not cover fall back to the HF forward (``supports_packing``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def supports_packing(bert: nn.Module) -> bool:
    """A plain BERT encoder: absolute positions, no decoder or cross-attention, no FFN chunking."""
    config = getattr(bert, "config", None)
    if config is None or getattr(config, "model_type", None) != "bert":
        return False
    return (
        getattr(config, "position_embedding_type", "absolute") == "absolute"
        and not getattr(config, "is_decoder", False)
        and not getattr(config, "add_cross_attention", False)
        and not getattr(config, "chunk_size_feed_forward", 0)
        and hasattr(bert, "embeddings")
        and hasattr(bert, "encoder")
    )


def packed_mean_pool(bert: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of BERT's last hidden states, ``[batch, hidden]``, computed on real tokens only."""
    batch, width = input_ids.shape
    keep = attention_mask.reshape(-1) > 0
    where = keep.nonzero().squeeze(1)  # flat positions of the real tokens
    row = where // width
    # HF numbers positions 0..width-1 whatever the padding side; the same here.
    position = where - row * width
    emb = bert.embeddings
    x = emb.word_embeddings(input_ids.reshape(-1)[where]) + emb.position_embeddings(position)
    x = x + emb.token_type_embeddings.weight[0]
    x = emb.dropout(emb.LayerNorm(x))
    # Keys at padded positions are masked; padded query rows are computed and thrown away.
    key_mask = attention_mask[:, None, None, :].bool()
    for layer in bert.encoder.layer:
        x = _layer(layer, x, where, batch, width, key_mask)
    x = x.float()  # pool in fp32 (under bf16 autocast the sum over a text would round)
    summed = x.new_zeros(batch, x.shape[1]).index_add_(0, row, x)
    return summed / attention_mask.sum(1, keepdim=True).clamp(min=1).float()


def _layer(
    layer: nn.Module, x: torch.Tensor, where: torch.Tensor, batch: int, width: int, key_mask: torch.Tensor
) -> torch.Tensor:
    att = layer.attention.self
    heads, d_head = att.num_attention_heads, att.attention_head_size
    # Three GEMMs, not one fused: on these CPUs (MKL, d=384) a 3x wider GEMM was no faster.
    q, k, v = (
        _padded(proj(x), where, batch, width).view(batch, width, heads, d_head).transpose(1, 2)
        for proj in (att.query, att.key, att.value)
    )
    p = att.dropout.p if att.training else 0.0
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p, scale=att.scaling)
    ctx = ctx.transpose(1, 2).reshape(batch * width, heads * d_head).index_select(0, where)
    out = layer.attention.output
    x = out.LayerNorm(out.dropout(out.dense(ctx)) + x)
    hidden = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
    out = layer.output
    return out.LayerNorm(out.dropout(out.dense(hidden)) + x)


def _padded(x: torch.Tensor, where: torch.Tensor, batch: int, width: int) -> torch.Tensor:
    """``[tokens, d]`` back to ``[batch * width, d]`` with zeros at the padded positions."""
    return x.new_zeros(batch * width, x.shape[1]).index_copy(0, where, x)
