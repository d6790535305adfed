"""Known, harmless messages of the libraries the job runs, filtered where they are emitted.

Each filter drops one message whose cause is a deliberate choice of this package, and nothing
else, so that a warning a user does see is worth reading:

* transformers' load report when all it lists is the checkpoint's pooler: the encoder loads the
  BERT with ``add_pooling_layer=False`` (it mean-pools the token vectors), so the pooler's weights
  are left out on purpose. A report naming any other key (a missing or mismatched weight) passes.
* Lightning's advertisement for its cloud logger, printed whenever a Trainer is built: the job
  logs to MLflow.
* Lightning's own use of a deprecated torch pytree class (``LeafSpec``), a warning on every fit
  that no setting of ours can change.
* Lightning's second copy of each of its messages: its package logger prints them (``INFO: ...``)
  and, where the application has configured logging (Hydra's job logging), the root logger prints
  them again. There they go to the root logger only (and so into the job's log file too).
"""

from __future__ import annotations

import logging
import warnings

_LOAD_REPORT = "LOAD REPORT"
_LIGHTNING_TIP = "Tip: For seamless cloud logging"


def is_pooler_only_load_report(message: str) -> bool:
    """Whether ``message`` is transformers' load report listing only unexpected pooler weights."""
    if _LOAD_REPORT not in message:
        return False
    rows = [[cell.strip() for cell in line.split("|")] for line in message.splitlines() if "|" in line]
    keys = [r for r in rows if r[0] and r[0] != "Key" and set(r[0]) - set("-+")]
    return bool(keys) and all(r[0].startswith("pooler.") and len(r) > 1 and "UNEXPECTED" in r[1] for r in keys)


class _Drop(logging.Filter):
    def __init__(self, test) -> None:
        super().__init__()
        self.test = test

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.test(record.getMessage())


_POOLER = _Drop(is_pooler_only_load_report)
_TIP = _Drop(lambda message: _LIGHTNING_TIP in message)


def quiet_pooler_report() -> None:
    """Drop the pooler-only load report of ``AutoModel.from_pretrained(..., add_pooling_layer=False)``."""
    logger = logging.getLogger("transformers.modeling_utils")
    if _POOLER not in logger.filters:
        logger.addFilter(_POOLER)


def quiet_lightning() -> None:
    """Drop Lightning's cloud-logger tip and its ``LeafSpec`` deprecation warning (idempotent)."""
    import lightning.pytorch  # noqa: F401  (its import points rank_zero's logger at its own module)
    import lightning_utilities.core.rank_zero as rank_zero

    for logger in {rank_zero.log, logging.getLogger("lightning.fabric.utilities.rank_zero")}:
        if _TIP not in logger.filters:
            logger.addFilter(_TIP)
    if logging.getLogger().handlers:  # configured by the application: one copy, the root's
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
