"""Progress bars for the job's loops over users: candidates and features, ranking, evaluation.

Each of these scores users x catalogue in blocks. On the default data set a loop takes well
under a second and a bar would only flicker; at 100x the evaluation alone runs for minutes
(about 5 ns a cell), so a bar is shown once a loop's cells reach ``MIN_CELLS``.
"""

from __future__ import annotations

from typing import Any

#: users x items x passes from which a loop shows a bar: about a second of scoring on 2 cores
#: (the 10x data set's loops show one, the default data set's do not).
MIN_CELLS = 2e8


def user_bar(desc: str, users: int, n_items: int, passes: int = 1) -> Any:
    """A tqdm bar (stderr) counting ``users * passes`` user rows, or a disabled one (same
    interface, prints nothing) when ``users * n_items * passes`` is under ``MIN_CELLS``."""
    from tqdm.auto import tqdm

    total = users * passes
    small = total * n_items < MIN_CELLS
    return tqdm(total=total, desc=desc, unit="user", leave=False, smoothing=0.1, disable=small)
