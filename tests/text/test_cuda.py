"""The text tower on a CUDA GPU: bf16 autocast from the encoder's ``precision``, the Lightning
loop with ``accelerator="gpu"``, and the same known answer as on the CPU.

Skipped where no GPU is visible (CI has none); run on a GPU machine with ``pytest -m cuda``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.text.datamodule import TextDataModule
from recsys.text.encoder import ItemEncoder, TwoTower
from recsys.text.module import TextTowerModule

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CPU-only machines skip it"),
]


def _dense_output_dtype(encoder: ItemEncoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.dtype:
    seen: list[torch.dtype] = []
    hook = encoder.bert.encoder.layer[0].output.dense.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        encoder(ids, mask)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize(
    ("precision", "dtype", "min_cosine"), [("bf16", torch.bfloat16, 0.99), ("fp32", torch.float32, 0.9999)]
)
def test_encoder_uses_the_configured_dtype_on_cuda_and_matches_fp32_cpu(tokenizer_path, precision, dtype, min_cosine):
    enc = ItemEncoder.random(tokenizer=tokenizer_path, seed=0, precision={"cpu": "fp32", "cuda": precision}).eval()
    texts = ["a red telescope for comets", "cast iron skillet", "yarn", "compact dumbbell with a sturdy grip"]
    ids, lengths = enc.tokenize(texts)
    reference = enc.encode_tokens(ids, lengths)
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    assert _dense_output_dtype(enc, ids.long(), mask) == torch.float32  # the CPU stays fp32

    enc.cuda()
    with torch.no_grad():
        assert _dense_output_dtype(enc, ids.long().cuda(), mask.cuda()) == dtype
    got = enc.encode_tokens(ids, lengths)
    assert got.device.type == "cpu" and got.dtype == torch.float32
    cosine = (got * reference).sum(1)
    assert float(cosine.min()) >= min_cosine, cosine


def test_training_step_on_cuda_matches_cpu(block_world, tokenizer_path):
    """One real training step (dedup collate, bf16 autocast on the GPU): same loss and gradient direction."""
    enc = ItemEncoder.random(tokenizer=tokenizer_path, seed=0, dropout=0.0)
    ids, lengths = enc.tokenize(block_world.texts)
    h = block_world.history
    dm = TextDataModule(
        item_ids=ids, item_lengths=lengths, train=h, val=h.interactions.head(0), batch_size=32, max_history=10
    )
    batch = next(iter(dm.train_dataloader()))
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        net = TwoTower(ItemEncoder.random(tokenizer=tokenizer_path, seed=0, dropout=0.0), max_history=10).to(device)
        module = TextTowerModule(net=net)
        module.item_cache = torch.nn.functional.normalize(torch.randn(len(block_world.texts), net.item_encoder.dim))
        module.item_cache = module.item_cache.to(device)
        loss = module.training_step({k: v.to(device) for k, v in batch.items()}, 0)
        loss.backward()
        grad = net.item_encoder.bert.encoder.layer[0].attention.self.query.weight.grad
        results.append((float(loss.detach()), grad.detach().float().cpu().reshape(-1)))
    (cpu_loss, cpu_grad), (gpu_loss, gpu_grad) = results
    assert gpu_loss == pytest.approx(cpu_loss, rel=2e-2)
    cosine = float(torch.nn.functional.cosine_similarity(cpu_grad, gpu_grad, dim=0))
    assert cosine > 0.95, cosine


def test_gpu_fine_tuning_recommends_the_users_topic(block_world, tokenizer_path):
    """The CPU known-answer test, trained with ``accelerator="gpu"`` in bf16."""
    from conftest import fine_tune_block_tower
    from test_text import own_topic_counts

    untrained, trained, ids, lengths = fine_tune_block_tower(block_world, tokenizer_path, accelerator="gpu")
    # Lightning hands the module back on the CPU, where scoring and saving expect it.
    assert {p.device.type for p in trained.parameters()} == {"cpu"}
    after = own_topic_counts(trained, ids, lengths, block_world)
    before = own_topic_counts(untrained, ids, lengths, block_world)
    assert (after >= 8).mean() >= 0.9, np.bincount(after)
    assert before.mean() < 5, np.bincount(before)


def test_fine_tune_on_gpu_validates_there_and_restores_the_best_checkpoint(block_world, tiny_encoder, tmp_path):
    """``fine_tune`` as the job calls it: zero-shot validation, fit, best checkpoint, all on the GPU."""
    from test_text import assert_holds_the_best_checkpoint, fine_tune_with_best_checkpoint

    # cuBLAS is deterministic only with CUBLAS_WORKSPACE_CONFIG set; this test needs no bit-equality.
    gpu = dict(accelerator="gpu", devices=1, deterministic=False)
    net, out, metrics, ckpt = fine_tune_with_best_checkpoint(block_world, tiny_encoder, tmp_path, **gpu)

    assert out is net and {p.device.type for p in net.parameters()} == {"cpu"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values()), metrics
    assert metrics["text/kept_zeroshot"] == 0.0, metrics
    assert_holds_the_best_checkpoint(net, ckpt)


@pytest.mark.parametrize(("precision", "min_cosine"), [("bf16", 0.99), ("fp32", 0.9999)])
def test_packed_forward_on_cuda_matches_the_hf_forward(tokenizer_path, precision, min_cosine):
    """The pad-free forward (training, gradients on) under autocast on the GPU gives HF's vectors."""
    texts = ["a red telescope for watching comets at night", "yarn", "cast iron skillet", "dumbbell with a grip"]
    packed = ItemEncoder.random(tokenizer=tokenizer_path, seed=0, precision={"cuda": precision}).eval().cuda()
    plain = ItemEncoder.random(tokenizer=tokenizer_path, seed=0, precision={"cuda": precision}, packed=False)
    plain = plain.eval().cuda()
    ids, lengths = packed.tokenize(texts)
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long().cuda()
    a, b = packed(ids.long().cuda(), mask), plain(ids.long().cuda(), mask)
    assert a.dtype == b.dtype == torch.float32
    assert float((a * b).sum(1).min().detach()) >= min_cosine
