"""Fine-tune the text tower with a Lightning Trainer and return the best weights."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import lightning as L
import torch

from recsys.text.datamodule import TextDataModule
from recsys.text.encoder import TwoTower
from recsys.text.module import TextTowerModule

log = logging.getLogger(__name__)


def fine_tune(
    net: TwoTower,
    datamodule: TextDataModule,
    module_factory: Callable[..., TextTowerModule],
    trainer: L.Trainer,
) -> tuple[TwoTower, dict[str, float]]:
    """Train ``net`` in place; restore the checkpoint with the best validation NDCG@10.

    Returns the network and the validation metrics of the untouched (zero-shot) and the best
    fine-tuned weights, so a run shows what fine-tuning earned.
    """
    module = module_factory(net=net)
    zero = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    trainer.fit(module, datamodule=datamodule)
    ckpt = trainer.checkpoint_callback
    best_path = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
    if best_path:
        state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
        log.info("restored best text-tower checkpoint %s (val ndcg@10 %.4f)", best_path, float(ckpt.best_model_score))
    best = float(ckpt.best_model_score) if best_path else float(trainer.callback_metrics["val/ndcg_at_10"])
    net.eval()
    return net, {
        "text/val_ndcg_at_10_zeroshot": float(zero["val/ndcg_at_10"]),
        "text/val_ndcg_at_10_finetuned": best,
    }


def zero_shot_copy(net: TwoTower) -> TwoTower:
    """A frozen copy of the untrained network: the zero-shot baseline the report compares to."""
    return copy.deepcopy(net).eval()
