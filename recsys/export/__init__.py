"""Recommendations for many users: the engine over a saved pipeline, batch and Spark exports, the
MLflow pyfunc model."""
