"""The text tower's options that the job checks by name before any work starts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from recsys.errors import ConfigError, require_number, require_whole


def check_options(
    budget_minutes: float | None,
    data: Mapping[str, Any],
    module: Mapping[str, Any],
    net: Mapping[str, Any] | None = None,
    served: bool = True,
) -> None:
    """The text tower's options checked by name before any work starts (``ConfigError``).

    ``served``: the tower will be exported for serving (the job), which reads the mean user tower
    only; ``False`` for validation-only runs (``bench/text_val.py``).
    """
    budget(budget_minutes)
    if net is not None:
        from recsys.text.sequence import check_user_tower

        tower = net.get("user_tower", "mean")
        check_user_tower(tower, net.get("sequence"))
        if served and tower != "mean":
            # Fail here, not at the model export after all the training.
            raise ConfigError(
                f"text.user_tower={tower} cannot be served yet: the exported pipeline's user tower "
                "(recsys.pipeline_model.HistoryTower) evaluates the mean tower only; use "
                "text.user_tower=mean in the job, or bench/text_val.py for validation runs"
            )
        # Used only when the network and module are built, after the CF fit: refused here instead.
        if "max_history" in net:
            require_whole("text.max_history", net["max_history"])
        if "temperature" in net:
            require_number("text.temperature", net["temperature"], 0, low_open=True)
        if net.get("frozen_history") and not module.get("train_bert", True):
            raise ConfigError(FROZEN_HISTORY_NEEDS_BERT)
    check_data_options(
        **{
            k: data[k]
            for k in ("batch_size", "steps_per_epoch", "val_users", "uniform_negatives", "val_batch_size")
            if k in data
        }
    )
    require_whole("text.module.train_threads", module.get("train_threads"), optional=True)
    require_whole("text.module.freeze_layers", module.get("freeze_layers"), 0, optional=True)
    if "interpolation" in module:
        check_interpolation(module["interpolation"], module.get("train_bert", True))
    rates = ("lr_adapter", "lr_encoder", "lr_head", "weight_decay")
    for name in ("interpolation_min_z", "decile_min_z", "popularity_debias", "logq_correction", *rates):
        require_number(f"text.module.{name}", module.get(name), 0, optional=True)


# The adapter moves the history vectors too; frozen ones would differ from the vectors the served
# tower reads. Refused by the job's first check and by ``TextTowerModule``.
FROZEN_HISTORY_NEEDS_BERT = (
    "text.frozen_history=true needs text.module.train_bert=true (the adapter path "
    "reads history items through the adapter): set text.frozen_history=false"
)


def check_interpolation(values: Any, train_bert: bool) -> list[float]:
    """``text.module.interpolation`` as a sorted list of distinct numbers in (0, 2], or a
    ``ConfigError`` naming it."""
    name = "text.module.interpolation"
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
        raise ConfigError(f"{name} must be a non-empty list of numbers in (0, 2] like [0.25, 0.5, 1.0], got {values!r}")
    for v in values:
        require_number(name, v, 0, 2, low_open=True)
    grid = sorted({float(v) for v in values})
    if train_bert and grid != [1.0]:
        # Each point would need its own BERT catalogue pass at every validation.
        raise ConfigError(
            f"{name}={list(values)} needs the adapter path (text.module.train_bert=false); with "
            f"train_bert=true set {name}=[1.0]"
        )
    return grid


def check_freeze_layers(freeze_layers: int | None, n_layers: int) -> None:
    """``ConfigError`` unless ``text.module.freeze_layers`` is within the encoder's ``n_layers``
    transformer layers (after ``encoder.num_layers``): the job checks it as soon as the encoder is
    built, before any model is fitted."""
    require_whole("text.module.freeze_layers", freeze_layers, 0, optional=True)
    if freeze_layers is not None and freeze_layers > n_layers:
        raise ConfigError(
            f"text.module.freeze_layers must be in 0..{n_layers} (the encoder's transformer layers), "
            f"got {freeze_layers}"
        )


def check_data_options(**options: object) -> None:
    """``ConfigError`` naming the ``text.data`` option with a bad value."""
    for name, v in options.items():
        require_whole(f"text.data.{name}", v, 0 if name == "uniform_negatives" else 1)


def budget(minutes: float | None) -> timedelta | None:
    """``text.budget_minutes`` as the Trainer's ``max_time`` (``None``: no time limit)."""
    if minutes is None:
        return None
    require_number("text.budget_minutes", minutes, 0, low_open=True, optional=True)
    return timedelta(minutes=float(minutes))
