"""Data: loaders per format, validation, id maps, splits and the generated default data set."""

from recsys.data.dataset import Dataset, IdMap, listing_times
from recsys.data.files import FileDataSource
from recsys.data.mind import MindDataSource
from recsys.data.movielens import MovieLensDataSource
from recsys.data.recbole import RecBoleDataSource
from recsys.data.split import FixedSplit, GlobalTimeSplit, LeaveLastOutSplit, Split
from recsys.data.synthetic import GeneratedDataSource

__all__ = [
    "Dataset",
    "FileDataSource",
    "FixedSplit",
    "GeneratedDataSource",
    "GlobalTimeSplit",
    "IdMap",
    "LeaveLastOutSplit",
    "MindDataSource",
    "MovieLensDataSource",
    "RecBoleDataSource",
    "Split",
    "listing_times",
]
