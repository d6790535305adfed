"""Compiled catalogue passes (``encoder.compile``): same vectors as the eager forward, a new
compiled copy for new weights, ``auto`` only for large passes, and an eager fallback."""

from __future__ import annotations

import copy
import logging
import shutil

import pytest
import torch

from recsys.errors import ConfigError
from recsys.text.compiled import InferenceCompiler
from recsys.text.encoder import ItemEncoder

# Inductor builds its kernels with the system's C++ compiler; without one the encoder falls back to
# the eager forward (tested below), and there is nothing compiled to check.
needs_cxx = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="torch.compile needs a C++ compiler"
)

TEXTS = [
    f"item {i}: {' '.join(['red', 'blue', 'wool', 'steel', 'glass'][: 1 + i % 5])} part {i * 7}" for i in range(13)
]


def spy_compiled_batches(enc: ItemEncoder) -> list[int]:
    """Rows of each batch that ``enc`` ran through its compiled copy (not its own BERT)."""
    rows: list[int] = []
    inner = enc._embed

    def embed(bert, ids, mask):
        if bert is not enc.bert:
            rows.append(len(ids))
        return inner(bert, ids, mask)

    enc._embed = embed
    return rows


@needs_cxx
@pytest.mark.slow
def test_compiled_passes_give_the_eager_vectors_and_follow_new_weights(tokenizer_path):
    enc = ItemEncoder.random(tokenizer=tokenizer_path, seed=3, compile=True)
    plain = ItemEncoder.random(tokenizer=tokenizer_path, seed=3, compile=False)
    rows = spy_compiled_batches(enc)
    attention = enc.bert.config._attn_implementation

    got = enc.encode(TEXTS, batch_size=4)
    torch.testing.assert_close(got, plain.encode(TEXTS, batch_size=4), atol=1e-5, rtol=0)
    assert rows == [4, 4, 4]  # the last batch (one item) runs eagerly: no size-1 specialisation
    assert enc.compiler.compiles == 1
    # only the compiled copy's attention and Linear layers were rewritten
    assert enc.bert.config._attn_implementation == attention
    assert sum(type(m) is torch.nn.Linear for m in enc.bert.modules()) == 6 * 2  # 2 layers, 6 each

    # New weights (a fine-tuning step): the compiled copy must not keep the old ones.
    with torch.no_grad():
        for a, b in zip(enc.bert.parameters(), plain.bert.parameters(), strict=True):
            noise = 0.05 * torch.randn_like(a)
            a.add_(noise)
            b.add_(noise)
    again = enc.encode(TEXTS, batch_size=4)
    torch.testing.assert_close(again, plain.encode(TEXTS, batch_size=4), atol=1e-5, rtol=0)
    assert (again - got).abs().max() > 1e-3
    assert enc.compiler.compiles == 2
    enc.encode(TEXTS, batch_size=4)
    assert enc.compiler.compiles == 2  # same weights: the same compiled copy

    twin = copy.deepcopy(enc)  # e.g. the zero-shot network: compiles from its own weights
    assert twin.compiler.mode is True and twin.compiler.compiles == 0


@pytest.mark.slow
@needs_cxx
def test_auto_compiles_only_passes_of_at_least_min_items(tokenizer_path):
    enc = ItemEncoder.random(tokenizer=tokenizer_path, seed=0, compile="auto", compile_min_items=10)
    rows = spy_compiled_batches(enc)
    enc.encode(TEXTS[:9], batch_size=4)
    assert enc.compiler.compiles == 0 and rows == []
    enc.encode(TEXTS[:10], batch_size=4)
    assert enc.compiler.compiles == 1 and rows == [4, 4, 2]
    assert not InferenceCompiler(True).wanted(10**6, torch.device("cuda"))  # CPU passes only
    assert not InferenceCompiler(False).wanted(10**6, torch.device("cpu"))


def test_a_failing_compile_falls_back_to_eager_with_a_warning(tokenizer_path, monkeypatch, caplog):
    class Broken(torch.nn.Module):
        def forward(self, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr("recsys.text.compiled.torch.compile", lambda module, **kw: Broken())
    enc = ItemEncoder.random(tokenizer=tokenizer_path, seed=1, compile=True)
    plain = ItemEncoder.random(tokenizer=tokenizer_path, seed=1, compile=False)
    with caplog.at_level(logging.WARNING, logger="recsys.text.compiled"):
        got = enc.encode(TEXTS, batch_size=4)
    torch.testing.assert_close(got, plain.encode(TEXTS, batch_size=4), atol=1e-6, rtol=0)
    assert "compiled encoding failed" in caplog.text and "RuntimeError: InvalidCxxCompiler" in caplog.text
    assert enc.compiler.failed and not enc.compiler.wanted(10**6, torch.device("cpu"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compile": "yes"}, "encoder.compile must be true, false or 'auto'"),
        ({"compile": 1}, "encoder.compile must be true, false or 'auto'"),
        ({"compile_min_items": 0}, "encoder.compile_min_items must be a whole number >= 1"),
        ({"compile_min_items": 2.5}, "encoder.compile_min_items must be a whole number >= 1"),
    ],
)
def test_bad_compile_options_are_refused_by_name(tokenizer_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ItemEncoder.random(tokenizer=tokenizer_path, **kwargs)
