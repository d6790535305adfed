"""recsys: a text-aware recommender (a fine-tuned BERT item tower, implicit CF and a learned
ranker). The entry points are ``python -m recsys.train``, ``recsys.recommend``,
``recsys.evaluate`` and ``recsys.update``; README.md shows them.

A regular package, not a namespace one: a served model carries its own copy of ``recsys`` on
``sys.path`` (MLflow's ``code_paths``), and a namespace package would take each submodule not
yet imported from whichever copy comes first, mixing two versions in one process.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("recsys")
except PackageNotFoundError:  # a copy on sys.path without its metadata (a served model's code)
    __version__ = "unknown"
