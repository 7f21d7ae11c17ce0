"""Datasets, sample schema, shared-memory batch pool and loader (CPU side, no Lightning)."""
