"""Data: loaders per format, validation, id maps, splits and the generated default data set."""

from recsys.data.dataset import Dataset, IdMap
from recsys.data.files import FileDataSource
from recsys.data.split import GlobalTimeSplit, LeaveLastOutSplit, Split
from recsys.data.synthetic import GeneratedDataSource

__all__ = [
    "Dataset",
    "FileDataSource",
    "GeneratedDataSource",
    "GlobalTimeSplit",
    "IdMap",
    "LeaveLastOutSplit",
    "Split",
]
