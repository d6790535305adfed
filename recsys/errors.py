"""User-facing errors. Entry points print these as one message (no traceback) and exit 2."""

from __future__ import annotations

import json
import numbers
import sys
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

T = TypeVar("T")


class InMemory(str):
    """The name of a table that is no file (a request's rows, a frame passed in Python): errors
    name it as it is ("the request, column 'user_id'"), not as "file the request"."""


class InputError(Exception):
    """Bad input found before any long work starts.

    The message always names the file, and where it applies the column and an example row, so
    a user can find the problem without reading our code.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        column: str | None = None,
        row: int | None = None,
        example: Mapping[str, Any] | None = None,
    ) -> None:
        self.message, self.file, self.column, self.row, self.example = message, file, column, row, example
        parts = []
        if file is not None:
            parts.append(str(file) if isinstance(file, InMemory) else f"file {file}")
        if column is not None:
            parts.append(f"column '{column}'")
        if row is not None:
            parts.append(f"row {row}")
        where = ", ".join(parts)
        text = f"{where}: {message}" if where else message
        if example is not None:
            text += f"\n  example: {dict(example)}"
        super().__init__(text)


class ConfigError(InputError):
    """A configuration value that cannot work (missing path, K larger than the catalogue ...)."""


def user_message(error: BaseException) -> str | None:
    """The one-line message an entry point prints for a data or config problem, else None.

    Hydra's ``instantiate`` wraps constructor errors, so the cause chain is searched; a missing
    mandatory config value (``???``) counts as a config problem too.
    """
    from omegaconf.errors import MissingMandatoryValue

    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, InputError | MissingMandatoryValue):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, MissingMandatoryValue):
        key = getattr(cause, "full_key", "") or str(cause).splitlines()[0]
        return f"the config value '{key}' is required (set it on the command line: {key}=...)"
    return None if cause is None else str(cause)


class TrialFailed(Exception):
    """A sweep's trial stopped on a data or config problem (the message is the one-line error).
    Here, not in ``recsys.train``: ``python -m recsys.train`` runs that module as ``__main__``,
    and the sweep's callback must catch the class the trial raised."""


def exit_on_user_error(run: Callable[[], T], raise_as: Callable[[str], Exception] | None = None) -> T:
    """Run an entry point's job and return what it returns; a data or config problem becomes one
    line on stderr and exit 2, or, with ``raise_as``, that exception of the message (no traceback
    of the cause: the message says it all)."""
    try:
        return run()
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        if raise_as is not None:
            raise raise_as(message) from None
        sys.exit(2)


def exit_on_ctrl_c(run: Callable[[], T], interrupted: str = "") -> T:
    """Run an entry point and return what it returns; Ctrl-C ends it with one line on stderr,
    ``interrupted`` added (what a rerun does with what was saved), and exit 130 (the shell's code
    for SIGINT), not a ``KeyboardInterrupt`` traceback."""
    try:
        return run()
    except KeyboardInterrupt:
        print(f"interrupted (Ctrl-C){'; ' + interrupted if interrupted else ''}", file=sys.stderr)
        sys.exit(130)


def run_script(main: Callable[[], T], interrupted: str = "") -> T:
    """The ``__main__`` of a script that is no Hydra entry point (the ``spark-submit`` script, the
    ablation table, the ``bench/`` scripts): a data or config problem is one line and exit 2,
    Ctrl-C one line and exit 130, as for the CLIs."""
    return exit_on_ctrl_c(lambda: exit_on_user_error(main), interrupted)


# --- config values checked by name (one wording everywhere) -----------------------------------


def require_whole(name: str, value: Any, low: int = 1, *, optional: bool = False) -> None:
    """A ``ConfigError`` naming ``name`` unless ``value`` is an integer >= ``low`` (``None`` too
    when ``optional``). ``True`` and ``2.0`` are not whole numbers here: YAML and Hydra's override
    grammar keep booleans and floats apart from integers, so either is a typo."""
    if value is None and optional:
        return
    # numbers.Integral: numpy's integers too (a value read from a table or an array).
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        null = " or null" if optional else ""
        raise ConfigError(f"{name} must be a whole number >= {low}{null}, got {value!r}")


def require_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    """A ``ConfigError`` naming ``name`` unless ``value`` is an int or float within the bounds
    (``low_open`` / ``high_open``: the bound itself is excluded; ``None`` passes when
    ``optional``)."""
    if value is None and optional:
        return
    number = not isinstance(value, bool) and isinstance(value, int | float)
    inside = number and (
        (low is None or (value > low if low_open else value >= low))
        and (high is None or (value < high if high_open else value <= high))
    )
    if not inside:
        if low is not None and high is not None:
            bounds = f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            bounds = f" {'>' if low_open else '>='} {low}"
        elif high is not None:
            bounds = f" {'<' if high_open else '<='} {high}"
        else:
            bounds = ""
        null = " or null" if optional else ""
        raise ConfigError(f"{name} must be a number{bounds}{null}, got {value!r}")


# What a reader of a broken pipeline folder can do about it: the files are only ever written
# together, by ``TrainedPipeline.save`` at the end of training.
PIPELINE_REPAIR = (
    "the folder is not a complete saved pipeline (training writes every file of it when it saves "
    "the pipeline): re-run training (python -m recsys.train), or point at a complete pipeline folder"
)


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turns a failure to read or parse one file of a saved pipeline into an ``InputError`` naming it."""
    try:
        yield
    except InputError:
        raise
    except Exception as e:  # numpy, polars, safetensors, lightgbm and torch each raise their own types
        detail = (str(e).strip().splitlines() or [""])[0]
        raise InputError(f"cannot be read ({type(e).__name__}: {detail}); {PIPELINE_REPAIR}", file=str(path)) from e


# --- the JSON files of a saved pipeline (meta.json, serving.json) ---------------------------------


def read_json_object(path: Path) -> dict[str, Any]:
    """A pipeline JSON file (``meta.json``, ``serving.json``) as a dict; an ``InputError``
    naming the file if it cannot be read or does not hold one JSON object."""
    with reading(path):
        data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise InputError(f"holds a JSON {type(data).__name__}, not an object; {PIPELINE_REPAIR}", file=str(path))
    return data


def fits(value: Any, hint: Any) -> bool:
    """Whether ``value``, as parsed from JSON, has the type ``hint`` names (``int``, ``float``,
    ``str``, ``bool``, ``None``, ``list[...]`` / ``Sequence[...]``, ``dict[str, ...]`` and unions
    of them). JSON keeps booleans apart from numbers, so ``true`` is no int here, while an integer
    is a valid float. A hint it does not know passes: the code that reads the value decides."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if hint is None or hint is type(None):
        return value is None
    if hint is Any:
        return True
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, int | float)
    if origin in (list, Sequence):
        return isinstance(value, list) and all(fits(v, args[0]) for v in value)
    if origin in (dict, Mapping):
        return isinstance(value, dict) and all(fits(v, args[1]) for v in value.values())
    return isinstance(value, hint) if isinstance(hint, type) else True


def type_name(hint: Any) -> str:
    """``hint`` as a message shows it: ``list[str]``, ``int | None``."""
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("collections.abc.", "")


def check_field(file: Path, parent: Mapping[str, Any], path: str, hint: Any, required: bool = True) -> None:
    """An ``InputError`` naming ``file`` and the dotted ``path`` if the last key of ``path`` is
    missing from ``parent`` (when ``required``) or does not have the JSON type ``hint``."""
    key = path.rsplit(".", 1)[-1]
    if key not in parent:
        if required:
            raise InputError(
                f"field '{path}' is missing (expected {type_name(hint)}); {PIPELINE_REPAIR}", file=str(file)
            )
        return
    value = parent[key]
    if not fits(value, hint):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise InputError(
            f"field '{path}' must be {type_name(hint)}, found {type(value).__name__} {shown}; {PIPELINE_REPAIR}",
            file=str(file),
        )
