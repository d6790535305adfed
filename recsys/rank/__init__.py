"""Fusion: candidate union from several recommenders, features, a learned LambdaMART ranker."""
