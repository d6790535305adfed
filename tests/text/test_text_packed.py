"""The packed BERT forward (recsys.text.packed) is BERT: the same pooled vectors and gradients as
the Hugging Face forward followed by masked mean pooling, on batches with padding on either side."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertModel

from recsys.text.encoder import ItemEncoder
from recsys.text.packed import packed_mean_pool, supports_packing


def tiny_bert(**overrides) -> BertModel:
    config = BertConfig(
        vocab_size=200,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        **overrides,
    )
    torch.manual_seed(0)
    return BertModel(config, add_pooling_layer=False)


def batch(lengths: list[int], width: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 200, (len(lengths), width), generator=g)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    if left:
        mask = mask.flip(1)
    return ids * mask, mask


def hf_mean_pool(bert: BertModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    return (hidden * m).sum(1) / m.sum(1)


@pytest.mark.parametrize("left", [False, True])
def test_packed_forward_gives_bert_mean_pooling(left):
    bert = tiny_bert().eval()
    ids, mask = batch([12, 3, 7, 12, 1, 9], 12, left=left)
    with torch.no_grad():
        torch.testing.assert_close(packed_mean_pool(bert, ids, mask), hf_mean_pool(bert, ids, mask))


def test_packed_forward_gives_bert_gradients():
    ref = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    bert = copy.deepcopy(ref)
    ids, mask = batch([10, 4, 10, 2, 6], 10)
    target = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    (hf_mean_pool(ref, ids, mask) * target).sum().backward()
    (packed_mean_pool(bert, ids, mask) * target).sum().backward()
    grads = dict(ref.named_parameters())
    for name, p in bert.named_parameters():
        if name.startswith("embeddings.token_type_embeddings"):
            # HF adds row 0 through an embedding lookup, packing adds the row itself: same gradient.
            torch.testing.assert_close(p.grad[0], grads[name].grad[0], rtol=1e-4, atol=1e-6)
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_forward_applies_dropout_only_in_training():
    bert = tiny_bert(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    ids, mask = batch([8, 5, 8], 8)
    bert.train()
    torch.manual_seed(0)
    a = packed_mean_pool(bert, ids, mask)
    b = packed_mean_pool(bert, ids, mask)
    assert not torch.allclose(a, b)
    bert.eval()
    with torch.no_grad():
        torch.testing.assert_close(packed_mean_pool(bert, ids, mask), hf_mean_pool(bert, ids, mask))


def test_only_plain_bert_is_packed(tokenizer_path):
    assert supports_packing(tiny_bert())
    assert not supports_packing(tiny_bert(is_decoder=True))
    assert not supports_packing(tiny_bert(chunk_size_feed_forward=4))
    assert not supports_packing(torch.nn.Linear(2, 2))
    packed = ItemEncoder.random(tokenizer_path, seed=0).eval()  # no dropout: comparable outputs
    plain = ItemEncoder.random(tokenizer_path, seed=0, packed=False).eval()
    assert packed.packed and not plain.packed
    ids, lengths = packed.tokenize(["a red telescope for watching comets", "yarn", "cast iron skillet for the oven"])
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    calls = []
    hook = packed.bert.register_forward_hook(lambda *a: calls.append(1))
    # Training (gradients on): the packed path, HF's BERT is not called; same vectors.
    torch.testing.assert_close(packed(ids.long(), mask), plain(ids.long(), mask), rtol=1e-5, atol=1e-6)
    assert calls == []
    # Inference (catalogue passes) and batches without padding: HF's forward.
    with torch.no_grad():
        packed(ids.long(), mask)
    packed(ids[:, :2].long(), mask[:, :2])
    assert calls == [1, 1]
    hook.remove()
