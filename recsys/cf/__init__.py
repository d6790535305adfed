"""Collaborative filtering behind one interface: implicit ALS / BPR / item-kNN (cosine or sequential), EASE,
SASRec, popularity."""

from recsys.cf.models import ALS, BPR, EASE, ItemKNN, Popularity, SequentialKNN
from recsys.cf.sasrec import SASRec

__all__ = ["ALS", "BPR", "EASE", "ItemKNN", "Popularity", "SASRec", "SequentialKNN"]
