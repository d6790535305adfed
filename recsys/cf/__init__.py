"""Collaborative filtering: implicit ALS / BPR / item-kNN (cosine or sequential) and popularity behind one interface."""

from recsys.cf.models import ALS, BPR, ItemKNN, Popularity, SequentialKNN

__all__ = ["ALS", "BPR", "ItemKNN", "Popularity", "SequentialKNN"]
