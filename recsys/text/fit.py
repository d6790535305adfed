"""Fine-tune the text tower with a Lightning Trainer and return the best weights.

Crash safety: with a ``resume_dir`` the trainer's checkpoints live in a folder named by a hash
of the run's configuration and data (``ResumeDir``), not in the timestamped run folder. A run
killed during training, started again with the same command, finds ``last.ckpt`` there and
continues from it (weights, optimiser, scheduler, loop counters, early-stopping and best-checkpoint
state). Each epoch's sample order (``EpochSampler``) and each step's dropout (``SeedEachStep``)
depend only on (seed, epoch / step), so the resumed run ends with the same weights as an
uninterrupted one.
See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger

from recsys.text.datamodule import TextDataModule, epoch_seed
from recsys.text.encoder import TwoTower
from recsys.text.module import TextTowerModule

log = logging.getLogger(__name__)

LAST = "last.ckpt"
DONE = "done.json"  # written when training finished: a rerun reuses the result instead of training again


class RunLogger(MLFlowLogger):
    """Lightning's MLflow logger writing into a run that the job owns (``Tracker.start``).

    Lightning's ``finalize`` at the end of ``fit`` marks the run FINISHED (or FAILED): the job
    then showed as finished in MLflow during ranking, evaluation and the model save, and one
    killed after fine-tuning stayed FINISHED, without its test metrics or model. The run's status
    is left to its owner, which ends it when the whole job ends (FAILED on an error)."""

    def finalize(self, status: str = "success") -> None:
        if self._initialized and self._checkpoint_callback:  # what the base does besides ending the run
            self._scan_and_log_checkpoints(self._checkpoint_callback)


class SeedEachStep(L.Callback):
    """Reseed torch's global generator (dropout) before every training step from ``(seed, step)``.

    Lightning checkpoints do not hold the random state, and how many numbers are drawn between an
    epoch's start and its first step differs after a resume (the data loader's iterator draws one
    when it is created). Reseeding per step makes each step's dropout masks the same whether the
    run got there in one go or resumed from a checkpoint.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # + rank: DDP ranks drop different units (rank 0 draws what a single process draws).
        torch.manual_seed(epoch_seed(self.seed, trainer.global_step, stream=1) + trainer.global_rank)


def config_key(config: Mapping[str, Any], volatile: list[str], *extra: str) -> str:
    """Hash of a resolved config, with any string under a ``volatile`` path (the run folder, the
    MLflow folder) replaced by a placeholder, so that the same command maps to the same key."""
    prefixes = [str(Path(p)) for p in volatile if p]

    def scrub(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {str(k): scrub(v) for k, v in x.items() if k != "hydra"}
        if isinstance(x, list | tuple):
            return [scrub(v) for v in x]
        if isinstance(x, str) and any(x == p or x.startswith(p + os.sep) for p in prefixes):
            return "<volatile>"
        return x

    payload = json.dumps([scrub(config), *extra], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class ResumeDir:
    """The checkpoint folder of one configuration, held under an exclusive lock while training.

    Two runs of the same configuration at once would overwrite each other's ``last.ckpt``: the
    second one gets ``path = None`` (it trains without resume support, in its run folder) instead.
    The lock is an ``flock`` on ``.lock``; the kernel drops it when the process dies, even by
    ``kill -9``.
    """

    def __init__(self, root: str | Path | None, key: str) -> None:
        self.path: Path | None = Path(root) / key if root is not None else None
        self._lock = None

    def acquire(self) -> ResumeDir:
        import fcntl

        assert self.path is not None
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / ".lock", "a")  # noqa: SIM115 (held open for the run's lifetime)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            log.warning("another run with the same configuration holds %s; this run cannot be resumed", self.path)
            self.path = None
            return self
        self._lock = f
        return self

    def finish(self, keep_best_in: Path | None = None) -> None:
        """The whole run succeeded: keep ``best.ckpt`` in the run folder, drop the resume state."""
        if self.path is None:
            return
        best = self.path / "best.ckpt"
        if keep_best_in is not None and best.is_file():
            keep_best_in.mkdir(parents=True, exist_ok=True)
            shutil.move(best, keep_best_in / "best.ckpt")
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _readable_checkpoint(path: Path) -> dict | None:
    """The checkpoint's loop counters, or None (with a warning) if it cannot be read."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return {"epoch": int(ckpt["epoch"]), "global_step": int(ckpt["global_step"])}
    except Exception as e:  # a file cut short by a crash outside Lightning's atomic save
        bad = path.with_suffix(".unreadable")
        os.replace(path, bad)
        log.warning("cannot read %s (%s); moved it to %s and training from the start", path, e, bad.name)
        return None


def fine_tune(
    net: TwoTower,
    datamodule: TextDataModule,
    module_factory: Callable[..., TextTowerModule],
    trainer: L.Trainer,
    resume_dir: Path | None = None,
) -> tuple[TwoTower, dict[str, float], list[tuple[int, float, float]]]:
    """Train ``net`` in place; restore the checkpoint with the best validation NDCG@10.

    With ``resume_dir`` (the folder the trainer's checkpoint callbacks write to), a ``last.ckpt``
    left there by a killed run is resumed, and a finished training (``done.json``) is reused.

    Returns the network, the validation metrics of the untouched (zero-shot) and the best
    fine-tuned weights with the steps and minutes spent, so a run shows what fine-tuning earned
    and at what cost, and the validation curve (global step, NDCG@10, its long-tail part), step 0
    first. When no
    epoch beats the zero-shot weights on validation, those are kept (``text/kept_zeroshot`` = 1).
    """
    module = module_factory(net=net)
    t0 = time.perf_counter()
    with _own_folder(resume_dir):
        zero = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    module.val_curve.clear()  # the curve starts at step 0 with this score, added below
    # The zero-shot validation holds the BERT's catalogue pass (minutes at 10^5 items); the time
    # budget (the Trainer's max_time) bounds what follows, so both are logged apart.
    t_train = time.perf_counter()
    # Step 0 competes too: if no epoch beats the zero-shot weights on validation, keep those.
    initial = copy.deepcopy(net.state_dict())
    ckpt = _monitor_checkpoint(trainer)
    done = resume_dir / DONE if resume_dir is not None else None
    if done is not None and done.is_file():
        info = json.loads(done.read_text())
        best_path, best_score = info["best_path"], info["best_score"]
        steps, curve = int(info.get("steps", 0)), [tuple(x) for x in info.get("curve", [])]
        planned, budget_ended = info.get("planned_steps"), bool(info.get("budget_ended", False))
        log.info("training of this configuration already finished in an earlier run; reusing %s", resume_dir)
        if not best_path:
            best_path = str(resume_dir / LAST)
    else:
        ckpt_path = None
        last = resume_dir / LAST if resume_dir is not None else None
        if last is not None and last.is_file():
            state = _readable_checkpoint(last)
            if state is not None:
                ckpt_path = str(last)
                log.info(
                    "resuming from %s (epoch %d of %s done, step %d)",
                    last,
                    state["epoch"] + 1,
                    trainer.max_epochs,
                    state["global_step"],
                )
        with _own_folder(resume_dir), _ctrl_c_stays_an_interrupt(trainer):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        if not trainer.is_global_zero:  # another rank of a distributed fit: rank 0 keeps the result
            return net, {}, []
        best_path = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
        if best_path:
            best_score = float(ckpt.best_model_score)
        else:  # no validation ran during fit (a time budget spent before the first epoch ended)
            best_score = float(trainer.callback_metrics.get("val/ndcg_at_10", float("-inf")))
        steps, curve = int(trainer.global_step), list(module.val_curve)
        planned = _planned_steps(trainer)
        budget_ended = _budget_spent(trainer) and (planned is None or steps < planned)
        if done is not None:
            tmp = done.with_suffix(".tmp")
            info = {
                "best_path": best_path,
                "best_score": best_score,
                "steps": steps,
                "curve": curve,
                "planned_steps": planned,
                "budget_ended": budget_ended,
            }
            tmp.write_text(json.dumps(info))
            os.replace(tmp, done)
    if best_path:
        # weights_only=True: a checkpoint is never unpickled as arbitrary Python objects.
        best = torch.load(best_path, map_location="cpu", weights_only=True)
        module.load_state_dict(best["state_dict"])
        # The checkpoint holds the trained weights; its score is that of the point between them
        # and the zero-shot start that its validation chose (``text.module.interpolation``).
        module.apply_interpolation(float(best.get("interpolation", 1.0)))
        log.info(
            "restored best text-tower checkpoint %s (val ndcg@10 %.4f, interpolation %g)",
            best_path,
            best_score,
            module.alpha,
        )
    else:  # the last weights stay: their score is that of the last validation's point
        module.apply_interpolation(module.alpha)
    if budget_ended:
        log.warning(
            "text.budget_minutes ended fine-tuning at step %d%s: the steps trained follow this machine's speed "
            "and load, so a rerun of the same seed can keep another checkpoint; raise text.budget_minutes, or set "
            "it to null, for a run that repeats",
            steps,
            ""
            if planned is None
            else f" of the {planned:,} planned (trainer.max_epochs validations of text.data.steps_per_epoch steps)",
        )
    zero_score = float(zero["val/ndcg_at_10"])
    kept_zero_shot = best_score <= zero_score
    if kept_zero_shot:
        net.load_state_dict(initial)
        module.alpha = 0.0
        rate = "lr_encoder" if module.train_bert else "lr_adapter"
        log.warning(
            "fine-tuning did not beat the zero-shot encoder on validation (ndcg@10 %.4f <= %.4f): keeping the "
            "zero-shot weights (try a lower text.module.%s, or a larger text.budget_minutes)",
            best_score,
            zero_score,
            rate,
        )
    net.eval()
    t_end = time.perf_counter()
    metrics = {
        "text/val_ndcg_at_10_zeroshot": zero_score,
        "text/val_ndcg_at_10_finetuned": float(best_score),
        "text/kept_zeroshot": float(kept_zero_shot),
        # How far from the zero-shot start the kept weights lie (1: the trained ones; 0: the start).
        "text/interpolation": float(module.alpha),
        "text/steps": float(steps),
        # Whether the time budget ended training before its planned length (the steps then
        # follow the machine's speed), and that length (absent: only early stopping bounded it).
        "text/budget_ended": float(budget_ended),
        "text/minutes": (t_end - t0) / 60.0,
        "text/zeroshot_minutes": (t_train - t0) / 60.0,
        "text/train_minutes": (t_end - t_train) / 60.0,
    }
    if planned is not None:
        metrics["text/planned_steps"] = float(planned)
    return net, metrics, [(0, zero_score, float(zero.get("val/ndcg_at_10_tail", float("nan")))), *curve]


@contextlib.contextmanager
def _ctrl_c_stays_an_interrupt(trainer: Any) -> Iterator[None]:
    """Lightning answers Ctrl-C in ``fit`` with its own shutdown, then ``sys.exit(1)`` with SIGINT
    ignored from then on. Raised again as the ``KeyboardInterrupt`` it was, with Python's handler
    back, so the job ends its MLflow run KILLED and its entry point says it was interrupted,
    as for a Ctrl-C anywhere else in the job."""
    try:
        yield
    except SystemExit:
        if not trainer.interrupted:
            raise
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt from None


@contextlib.contextmanager
def _own_folder(resume_dir: Path | None):
    """Without Lightning's warning that the checkpoint folder is not empty when that folder is
    the resume folder: it always holds the run's lock, and on a rerun the checkpoint this run
    resumes from (which the log names)."""
    with warnings.catch_warnings():
        if resume_dir is not None:
            name = re.escape(str(resume_dir.name))
            warnings.filterwarnings("ignore", message=f"Checkpoint directory .*{name} exists and is not empty")
        yield


def _planned_steps(trainer: L.Trainer) -> int | None:
    """The steps the trainer was set to run (``max_steps``, or ``max_epochs`` x steps per
    epoch), or None when nothing bounds them but early stopping and the time budget."""
    total = trainer.estimated_stepping_batches
    return None if total == float("inf") else int(total)


def _budget_spent(trainer: L.Trainer) -> bool:
    """Whether training used up the time budget (the Trainer's ``max_time``: its ``Timer``
    callback), which then ended it unless the planned length was reached too."""
    from lightning.pytorch.callbacks import Timer

    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    remaining = timer.time_remaining("train") if timer is not None else None
    return remaining is not None and remaining <= 0


def _monitor_checkpoint(trainer: L.Trainer):
    """The checkpoint callback that keeps the best validation score (not the resume one)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    found = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor is not None]
    return found[0] if found else trainer.checkpoint_callback


def zero_shot_copy(net: TwoTower) -> TwoTower:
    """A frozen copy of the untrained network: the zero-shot baseline the report compares to."""
    return copy.deepcopy(net).eval()


def open_resume_dir(root: str | Path | None, config: Mapping[str, Any], volatile: list[str], *extra: str) -> ResumeDir:
    """The locked resume folder of this configuration (``root=None``: resuming is off)."""
    if root is None:
        return ResumeDir(None, "")
    return ResumeDir(root, config_key(config, volatile, *extra)).acquire()
