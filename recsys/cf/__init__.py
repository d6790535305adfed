"""Collaborative filtering behind one interface: implicit ALS / BPR / item-kNN (cosine or sequential), EASE,
popularity."""

from recsys.cf.models import ALS, BPR, EASE, ItemKNN, Popularity, SequentialKNN

__all__ = ["ALS", "BPR", "EASE", "ItemKNN", "Popularity", "SequentialKNN"]
