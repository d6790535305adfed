"""The trained pipeline as one MLflow pyfunc model, logged and registered by the training run.

The model is a ``loader_module`` pyfunc: MLflow stores the pipeline folder
(``recsys.pipeline_model``) as the model's data and a copy of the ``recsys`` package as
its code, and calls ``_load_pyfunc(data_path)`` to load it. Nothing is pickled -- not even the
Python model object (a ``python_model=`` pyfunc would be cloudpickled).

``mlflow.pyfunc.load_model(uri).predict(df)`` takes a table of users and, optionally, their
histories, and returns the same rows ``python -m recsys.recommend`` writes for those users:

* ``user_id`` only (or ``item_id`` null): the stored history of a known user;
* ``user_id, item_id[, timestamp, event]`` rows: that history replaces the stored one (a new
  user gets recommendations through ALS fold-in and the text tower); with the param
  ``histories_mode=extend`` it is added to the stored one instead, as ``python -m
  recsys.recommend histories=`` does by default.

``params``: ``k``, ``scorer`` (``fused`` or one model name) and ``histories_mode``; the business
rules are the ones saved with the model (``serving.json``, by default seen filtering only).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

import numpy as np
import polars as pl

from recsys.columns import Columns
from recsys.data.validation import ROW, require_non_null
from recsys.errors import PIPELINE_REPAIR as REPAIR
from recsys.errors import InMemory, InputError, check_field, read_json_object
from recsys.export.engine import EXPLAIN_COLUMNS, FUSED, Engine, ExplainOptions, empty_output
from recsys.pipeline_model import TrainedPipeline, check_histories_mode
from recsys.rank.rules import BusinessRules

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

SERVING_FILE = "serving.json"
# The output columns that may hold missing values (the explanations: none for a user without
# history, no feature contributions past ``explain.feature_ranks``): what ``to_pandas`` keeps as None.
NULLABLE_COLUMNS = tuple(EXPLAIN_COLUMNS)
# The serving.json sections ``PipelineModel.engine`` passes as keyword arguments, and the class
# each goes to: its fields are the allowed keys and their annotations the allowed types.
SERVING_SECTIONS = {"rules": BusinessRules, "explain": ExplainOptions}
# What serving imports (recsys itself travels as code_paths). Pinned to the versions installed
# where the model was logged: MLflow's inference of them costs ~13 s and only guesses.
SERVING_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "polars",
    "pyarrow",
    "pandas",
    "numpy",
    "scipy",
    "implicit",
    "threadpoolctl",
    "lightgbm",
    "numba",  # the compiled loops: top-k (recsys/topk.py), rules and the export kernels
    "tqdm",
    "mlflow",
)


def pip_requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in SERVING_PACKAGES]


def serving_defaults(
    k: int = 20,
    scorer: str = FUSED,
    rules: Mapping[str, Any] | None = None,
    explain: Mapping[str, Any] | None = None,
    chunk_size: int = 4096,
) -> dict[str, Any]:
    return {
        "k": int(k),
        "scorer": scorer,
        "rules": dict(rules or {}),
        "explain": dict(explain or {}),
        "chunk_size": chunk_size,
    }


class PipelineModel:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(frame, params) -> recommendations``."""

    def __init__(self, pipeline: TrainedPipeline, serving: Mapping[str, Any]) -> None:
        self.pipeline = pipeline
        self.serving = dict(serving)
        self._engines: dict[tuple[int, str], Engine] = {}
        # Bound to the catalogue once, now, so what the rules point at (an allowlist or blocklist
        # file, the category column) fails when the model loads, not at the first predict.
        self._rules = BusinessRules(**self.serving.get("rules", {})).compile(pipeline.items, pipeline.now)

    def engine(self, k: int, scorer: str) -> Engine:
        key = (int(k), scorer)
        if key not in self._engines:
            rules = dataclasses.replace(self._rules, _counts=threading.local())  # each engine counts its own removals
            explain = ExplainOptions(**self.serving.get("explain", {}))
            self._engines[key] = Engine(self.pipeline, rules, k, scorer, explain)
        return self._engines[key]

    def predict(self, model_input: pd.DataFrame | pl.DataFrame, params: Mapping[str, Any] | None = None):
        """``model_input``: a pandas frame (what MLflow's pyfunc wrapper and the REST server pass;
        a polars frame works when this object is called directly, and a dict of equal-length
        lists is taken as the frame it spells) with ``user_id`` and optionally the history
        columns ``item_id``, ``timestamp``, ``event``. Returns the recommendations as the same kind
        of frame (pandas for a dict).

        ``timestamp``: Unix seconds as integers or whole floats (``df["timestamp"].astype(float)``
        works everywhere), ISO 8601 strings or datetimes; the signature takes any of them (its
        ``timestamp`` column is of MLflow's ``AnyType``; models logged before it was declared
        ``double`` accept floats only). Without a timestamp the rows happened "just now", in row
        order (``normalise_history``). A time more than a day ahead of this machine's clock
        (milliseconds read as seconds) is refused.

        ``params``: ``k``, ``scorer`` and ``histories_mode`` (``replace``, the default: a user's
        rows replace its stored history; ``extend``: they are added to it, and seen filtering
        covers both).

        A bad request (a user neither known nor given a history, a row without ``user_id``, ``k``
        < 1, an unknown scorer or histories_mode, a bad history row) raises an
        ``MlflowException(INVALID_PARAMETER_VALUE)`` carrying the ``InputError``'s message:
        ``mlflow models serve`` answers it with a 400 and that message.
        """
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            return self._predict(model_input, dict(params or {}))
        except InputError as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from e

    def _predict(self, model_input, params: dict[str, Any]):
        k = params.get("k")
        k = self.serving["k"] if k is None else k
        if isinstance(k, bool) or not isinstance(k, int | float) or k != int(k) or k < 1:
            raise InputError(f"param k must be a whole number >= 1, got {k!r}")
        scorer = str(params.get("scorer") or self.serving["scorer"])
        mode = check_histories_mode(str(params.get("histories_mode") or "replace"), "param histories_mode")
        df = input_frame(model_input)
        users, hist = split_input(df)
        given = set() if hist is None else set(hist[Columns.User].unique().to_list())
        known = self.pipeline.users.index([u for u in users if u not in given]) >= 0
        if not known.all():
            unknown = [u for u in users if u not in given][int(np.flatnonzero(~known)[0])]
            raise InputError(
                f"{int((~known).sum())} user(s) unknown to the model and given no history, e.g. {unknown!r}: "
                f"send their history as {Columns.Item}[, {Columns.Timestamp}, {Columns.Event}] rows",
                column=Columns.User,
            )
        out = recommend_frame(self.engine(int(k), scorer), df, int(self.serving.get("chunk_size", 4096)), mode)
        return out if isinstance(model_input, pl.DataFrame) else to_pandas(out)


def input_frame(model_input: Any) -> pl.DataFrame:
    """``predict``'s input as polars: a pandas or polars frame, or a dict of equal-length lists
    (column -> values); anything else, or a dict polars cannot make a table of, is an
    ``InputError`` saying what to send."""
    import pandas as pd

    if isinstance(model_input, pl.DataFrame):
        return model_input
    if isinstance(model_input, pd.DataFrame):
        df = model_input
        if len(df) == 1 and len(df.columns) and all(_is_sequence(v) for v in df.iloc[0]):
            # MLflow's pyfunc wrapper turns a dict of lists into one row holding the lists.
            lengths = {len(v) for v in df.iloc[0]}
            if len(lengths) != 1:
                raise InputError(f"the input dict's lists differ in length ({sorted(lengths)}): one value per row")
            df = pd.DataFrame({c: list(df[c].iloc[0]) for c in df.columns})
        if Columns.Timestamp in df.columns and df[Columns.Timestamp].dtype == object:
            # Seconds and ISO strings in one column (JSON mixes them freely): as text, which
            # ``parse_timestamp`` reads as it reads a CSV column (pyarrow refused the mix).
            df = df.assign(**{Columns.Timestamp: df[Columns.Timestamp].map(_timestamp_text)})
        return pl.from_pandas(df)
    if isinstance(model_input, Mapping):
        try:
            return pl.DataFrame(dict(model_input))
        except Exception as e:  # polars raises several types (shape, type) for a dict it cannot take
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(
                f"the input dict is no table ({first}): send a pandas DataFrame, or a dict of equal-length lists "
                f"such as {{'{Columns.User}': ['U00001', 'new'], '{Columns.Item}': [None, 'I00010']}}"
            ) from e
    raise InputError(
        f"the input is a {type(model_input).__name__}: send a pandas DataFrame with a '{Columns.User}' column "
        f"(and optionally {Columns.Item}, {Columns.Timestamp}, {Columns.Event})"
    )


def _is_sequence(value: Any) -> bool:
    return isinstance(value, list | tuple | np.ndarray)


def _timestamp_text(value: Any) -> str | None:
    """One cell of a mixed ``timestamp`` column as the text a CSV would hold: whole seconds as
    digits, a datetime in ISO 8601, a string as it is, a missing value as None."""
    import datetime

    import pandas as pd

    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NaT:
        return None
    if isinstance(value, bool):
        return str(value)  # refused by the parser, as in a file
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return str(int(value)) if float(value).is_integer() else str(value)
    if isinstance(value, datetime.datetime | pd.Timestamp):
        return value.isoformat()
    return str(value)


def to_pandas(out: pl.DataFrame) -> pd.DataFrame:
    """``out`` as pandas, with the columns that can be missing (``NULLABLE_COLUMNS``) backed by
    pyarrow, so that a missing value is ``None`` there. NumPy-backed, pandas holds it as NaN (its
    default strings too, from pandas 3), which the REST server (``to_dict`` then ``json.dump``)
    writes as a bare ``NaN`` token that strict JSON parsers reject; ``None`` is written ``null``.
    The other columns are never missing and keep pandas' default dtypes."""
    frame = out.to_pandas()
    for name in NULLABLE_COLUMNS:
        frame[name] = out[name].to_pandas(use_pyarrow_extension_array=True)
    return frame


def split_input(df: pl.DataFrame) -> tuple[list[str], pl.DataFrame | None]:
    """Users (sorted) and the history rows (``None`` if the frame holds no items). A row without
    a ``user_id`` is refused (an ``InputError`` naming its row, 1-based in the request), not
    dropped: a request whose rows silently go missing answers for fewer users than it asked."""
    if Columns.User not in df.columns:
        raise InputError(f"input has no '{Columns.User}' column (columns: {df.columns})", column=Columns.User)
    if ROW not in df.columns:
        df = df.with_row_index(ROW, offset=1)  # so that an error names the request's row
    df = df.with_columns(pl.col(Columns.User).cast(pl.String))
    require_non_null(df, Columns.User, InMemory("the request"))
    users = sorted(df[Columns.User].unique().to_list())
    if Columns.Item not in df.columns:
        return users, None
    hist = df.filter(pl.col(Columns.Item).is_not_null())
    drop = [c for c in hist.columns if hist[c].dtype == pl.Null]
    return users, (hist.drop(drop) if hist.height else None)


def recommend_frame(engine: Engine, df: pl.DataFrame, chunk_size: int = 4096, mode: str = "replace") -> pl.DataFrame:
    """The recommendations for ``df``'s users, ``chunk_size`` at a time; ``mode``: what their
    history rows do to a stored history (``TrainedPipeline.histories``)."""
    users, hist = split_input(df)
    frames = []
    for start in range(0, len(users), chunk_size):
        block = users[start : start + chunk_size]
        given = hist.filter(pl.col(Columns.User).is_in(block)) if hist is not None else None
        frames.append(engine.recommend(engine.p.histories(block, given, mode)))
    return pl.concat(frames) if frames else empty_output()


def _load_pyfunc(data_path: str) -> PipelineModel:
    """MLflow's entry point for a ``loader_module`` pyfunc."""
    path = Path(data_path)
    serving = read_serving(path / SERVING_FILE)  # before the pipeline: a bad file fails at once
    return PipelineModel(TrainedPipeline.load(path), serving)


def read_serving(path: Path) -> dict[str, Any]:
    """The serving settings saved with the model (``serving_defaults`` when there is no file);
    an ``InputError`` naming the file if it cannot be read, lacks a setting ``predict`` needs, or
    has a ``rules`` / ``explain`` key the rules or explanations do not take (``check_section``)."""
    if not path.is_file():
        return serving_defaults()
    serving = read_json_object(path)
    if absent := [key for key in ("k", "scorer") if key not in serving]:
        raise InputError(f"has no {absent} setting(s); {REPAIR}", file=str(path))
    for section, cls in SERVING_SECTIONS.items():
        check_section(path, serving, section, cls)
    return serving


def check_section(path: Path, serving: Mapping[str, Any], section: str, cls: type) -> None:
    """``serving[section]`` (optional) holds only keyword arguments of the dataclass ``cls``, each
    of its annotated type; else an ``InputError`` naming the file and the key. Checked at load:
    ``cls(**...)`` runs, and a wrong type surfaces, only at the first ``predict``."""
    check_field(path, serving, section, dict, required=False)
    allowed = [f.name for f in dataclasses.fields(cls)]
    if unknown := [key for key in serving.get(section, {}) if key not in allowed]:
        raise InputError(
            f"'{section}' has unknown key(s) {unknown} (allowed: {', '.join(allowed)}); {REPAIR}", file=str(path)
        )
    hints = get_type_hints(cls)
    for key in serving.get(section, {}):
        check_field(path, serving[section], f"{section}.{key}", hints[key])


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema(
        [
            ColSpec("string", Columns.User),
            ColSpec("string", Columns.Item, required=False),
            # Any type: double refused integer seconds (pandas' int64, what JSON numbers become),
            # long refused floats (pandas turns an integer column with a gap into floats), and
            # both refused ISO strings and datetimes. ``normalise_history`` checks every form.
            ColSpec(AnyType(), Columns.Timestamp, required=False),
            ColSpec("string", Columns.Event, required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", Columns.User),
            ColSpec("string", Columns.Item),
            ColSpec("double", Columns.Score),
            ColSpec("integer", Columns.Rank),
            ColSpec("string", Columns.Source),
            ColSpec("string", "explain_item", required=False),
            ColSpec("float", "explain_similarity", required=False),
            ColSpec("string", "explain_features", required=False),
        ]
    )
    # No defaults: a request without them gets the model's (serving.json); k=0 is then an error, not "unset".
    params = ParamSchema(
        [ParamSpec("k", "long", None), ParamSpec("scorer", "string", None), ParamSpec("histories_mode", "string", None)]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def log_pipeline(
    pipeline: TrainedPipeline,
    folder: str | Path,
    serving: Mapping[str, Any],
    config_yaml: str | None = None,
    register_name: str | None = None,
    alias: str | None = None,
    name: str = "model",
    version_tags: Mapping[str, str] | None = None,
) -> str:
    """Save ``pipeline`` under ``folder``, log it to the active MLflow run as one pyfunc model,
    register it (if ``register_name``) and point ``alias`` at the new version. Returns its URI.
    ``version_tags``: tags the version is created with, in the same registry write (a job killed
    just after never leaves the version without them)."""
    import mlflow

    folder = Path(folder)
    pipeline.save(folder, config_yaml=config_yaml)
    (folder / SERVING_FILE).write_text(json.dumps(dict(serving), indent=2, sort_keys=True))
    info = _log(mlflow, folder, name, example=input_example(pipeline))
    uri = info.model_uri
    if register_name:
        # What log_model(registered_model_name=...) does, with the tags it cannot pass to the version.
        version = mlflow.register_model(
            info.model_uri, register_name, tags=dict(version_tags) if version_tags else None
        ).version
        if alias:
            mlflow.MlflowClient().set_registered_model_alias(register_name, alias, str(version))
        uri = f"models:/{register_name}/{version}"
        log.info("registered %s version %s%s", register_name, version, f" as @{alias}" if alias else "")
    return uri


def input_example(pipeline: TrainedPipeline) -> tuple[Any, dict[str, Any]]:
    """What the model's page shows and ``serving_input_example.json`` holds: two known users and
    ``k``; MLflow runs it through the loaded model once when logging, so it is also a check."""
    import pandas as pd

    return pd.DataFrame({Columns.User: [str(u) for u in pipeline.users.ids[:2]]}), {"k": 5}


def _log(mlflow, folder: Path, name: str = "model", example=None):
    import warnings

    from recsys.config import PACKAGE_DIR

    with warnings.catch_warnings():
        # MLflow's own check of the example's column labels, deprecated by pandas (not our input).
        warnings.filterwarnings("ignore", message=".*Operation with range is deprecated.*")
        return mlflow.pyfunc.log_model(
            input_example=example,
            name=name,
            loader_module="recsys.export.pyfunc",
            data_path=str(folder),
            code_paths=[str(PACKAGE_DIR)],
            pip_requirements=pip_requirements(),
            signature=signature(),
        )


def log_trained_pipeline(
    cfg, data, history, models, fusion, out_dir: str | Path, name: str = "model", folder: str = "pipeline"
) -> str:
    """A pipeline of ``recsys.train`` as an MLflow model: ``model`` (registered as configured) is
    the served one; any other ``name`` is logged to the run only (``model_evaluated``)."""
    from omegaconf import OmegaConf

    from recsys.tracking import mask_secrets

    node = cfg.get("model") or {}
    run = __import__("mlflow").active_run()
    event_weights = (cfg.data.get("event_weights") if "data" in cfg else None) or {"click": 1.0, "purchase": 4.0}
    config_yaml = OmegaConf.to_yaml(OmegaConf.create(mask_secrets(OmegaConf.to_container(cfg, resolve=True))))
    import hashlib

    meta = {
        "run_id": run.info.run_id if run else None,
        "dataset": data.name,
        "dataset_hash": data.fingerprint(),
        "config_hash": hashlib.sha256(config_yaml.encode()).hexdigest()[:16],
    }
    pipeline = TrainedPipeline.from_training(
        data.items, data.users, history, models, fusion.n_candidates, fusion.ranker, dict(event_weights), meta
    )
    serving = serving_defaults(
        k=node.get("k", cfg.export.k),
        scorer=node.get("scorer", FUSED),
        rules=OmegaConf.to_container(node.rules, resolve=True) if node.get("rules") else None,
    )
    served = name == "model"
    return log_pipeline(
        pipeline,
        Path(out_dir) / folder,
        serving,
        config_yaml=config_yaml,
        register_name=node.get("register_name") if served else None,
        alias=node.get("alias") if served else None,
        name=name,
    )
