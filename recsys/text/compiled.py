"""Compiled catalogue passes: a copy of the BERT through ``torch.compile`` (inductor).

Why: a CPU catalogue pass is ~74 % GEMM time; the rest is bias copies, GELU, residual adds,
LayerNorm, attention and head transposes between them (CHANGELOG.md, "Text tower:
compiled catalogue passes"). Inductor keeps the GEMMs (MKL's ``mm``) and fuses the elementwise work between them
into a few C++ loops: GELU, residual add + LayerNorm, the biases (the GEMMs run without them,
``_MatmulThenBias``), and, with attention written as plain matmul + softmax (``eager`` attention)
instead of SDPA's CPU kernel, the mask and the softmax.
A MiniLM pass then ran 1.05-1.08x faster than the eager forward in
``bench/text_tower.py --compiled`` (encoding MFU 0.755 against 0.702, mean of 8 runs), with the
same vectors to ~2e-7.

Why a copy: the attention implementation is switched on the copy's config only, so training
keeps its own forward. The copy does not follow later weight updates, so a new one is made per
weights fingerprint. Inductor reuses its graph for it (the weights are graph inputs), so that
costs little after the first compile in a process, which takes ~15-35 s on 2 cores. At ~7 %
saved, that pays only for passes of ~200k items and more (``min_items``), or for many passes
in one process (``mode=True``).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from recsys.errors import ConfigError, require_whole

log = logging.getLogger(__name__)


class InferenceCompiler:
    """Keeps one compiled copy of a BERT, for the weights it was copied with.

    Args:
        mode: ``True`` compile every CPU catalogue pass, ``False`` never, ``"auto"`` only passes
            of at least ``min_items`` items (where the compile time pays for itself).
        min_items: the ``"auto"`` threshold.

    Copies of an encoder (``copy.deepcopy``, the zero-shot network) start without a compiled
    module: it is made again, from their own weights, when they need one.
    """

    def __init__(self, mode: bool | str = "auto", min_items: int = 200_000) -> None:
        if not (mode is True or mode is False or mode == "auto"):
            raise ConfigError(f"encoder.compile must be true, false or 'auto', got {mode!r}")
        require_whole("encoder.compile_min_items", min_items)
        self.mode, self.min_items = mode, min_items
        self._weights: str | None = None
        self._module: nn.Module | None = None
        self.compiles = 0  # compiled copies made (a new one per new set of weights): logs, tests
        self.failed = False

    def __deepcopy__(self, memo: dict) -> InferenceCompiler:
        return InferenceCompiler(self.mode, self.min_items)

    def wanted(self, n_items: int, device: torch.device) -> bool:
        """Whether a pass over ``n_items`` items on ``device`` should run compiled."""
        if self.failed or self.mode is False or device.type != "cpu":
            return False  # GPUs: not measured here; their passes are not the bottleneck
        return self.mode is True or n_items >= self.min_items

    def module(self, bert: nn.Module, weights: str) -> nn.Module:
        """The compiled copy of ``bert`` for the weights whose fingerprint is ``weights``."""
        if self._weights != weights or self._module is None:
            twin = copy.deepcopy(bert).eval()
            for p in twin.parameters():
                p.requires_grad_(False)
            if hasattr(twin, "config") and hasattr(twin.config, "_attn_implementation"):
                twin.config._attn_implementation = "eager"  # matmul + softmax: inductor fuses it
            _bias_after_matmul(twin)
            # dynamic: one graph for every batch size and width (catalogue batches vary in both)
            self._module = torch.compile(twin, dynamic=True)
            self._weights = weights
            self.compiles += 1
            log.info("compiling the item encoder for catalogue passes (once per set of weights)")
        return self._module

    def disable(self, error: BaseException) -> None:
        """Give up compiling in this process (e.g. no C++ compiler): passes run eagerly."""
        self.failed, self._module, self._weights = True, None, None
        first = (str(error).splitlines() or [""])[0][:300]
        log.warning("compiled encoding failed, encoding without it: %s: %s", type(error).__name__, first)


class _MatmulThenBias(nn.Module):
    """``nn.Linear`` as ``x @ W.T + b``: compiled, the GEMM writes no bias (``addmm`` copies it into
    its output first, a pass over the output) and the add joins the pointwise kernel that follows
    (GELU, residual add + LayerNorm, the heads' transpose). Pass medians measured 1.08-1.16x
    against eager with it, 1.06-1.07x with ``addmm``, in alternating scripts (docs/benchmarks.md)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight.t())
        return y if self.bias is None else y + self.bias


def _bias_after_matmul(module: nn.Module) -> None:
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, _MatmulThenBias(child))
