"""Wall time and peak memory per stage of a job, logged as ``time/<stage>_s`` and ``mem/<stage>_peak_mb``.

The peak of a stage is the process's high-water mark of resident memory (``VmHWM``) since the
previous stage ended: Linux resets that mark when ``5`` is written to ``/proc/self/clear_refs``.
Where that file is missing or read-only the recorded figure is the peak since the process started
(``peak_is_per_stage`` is then False).
"""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_rss_mb() -> float | None:
    """The process's peak resident memory (MB) since start or the last ``reset_peak_rss``; None off Linux."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Restart the peak-memory mark at the current resident size; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class StageTimings(dict):
    """``{stage: seconds}``; setting an entry closes that stage and records its peak memory.

    Stages are contiguous: a stage's memory window runs from the previous ``timings[...] = ``
    (or the creation of this object) to its own, so work between two timed blocks is charged to
    the next stage. ``total`` is not a window: its peak is the largest of all.

    >>> t = StageTimings()
    >>> t["load"] = 1.5
    >>> dict(t), sorted(t.peak_mb) == (["load"] if t.peak_mb else [])
    ({'load': 1.5}, True)
    """

    def __init__(self) -> None:
        super().__init__()
        self.peak_mb: dict[str, float] = {}
        self.peak_is_per_stage = reset_peak_rss()

    def __setitem__(self, stage: str, seconds: float) -> None:
        super().__setitem__(stage, seconds)
        peak = peak_rss_mb()
        if peak is None:
            return
        if stage == "total":
            self.peak_mb[stage] = max([peak, *self.peak_mb.values()])
            return
        self.peak_mb[stage] = peak
        if self.peak_is_per_stage:
            reset_peak_rss()

    def metrics(self) -> dict[str, float]:
        """``time/<stage>_s`` and ``mem/<stage>_peak_mb`` for MLflow."""
        out = {f"time/{k}_s": v for k, v in self.items()}
        out.update({f"mem/{k}_peak_mb": v for k, v in self.peak_mb.items()})
        return out
