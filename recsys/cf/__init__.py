"""Collaborative filtering: implicit ALS / BPR / item-kNN and popularity behind one interface."""

from recsys.cf.models import ALS, BPR, ItemKNN, Popularity

__all__ = ["ALS", "BPR", "ItemKNN", "Popularity"]
