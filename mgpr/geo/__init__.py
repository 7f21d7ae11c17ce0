"""Raster headers and windowed reads, the pure tile grid, pixel <-> map coordinates.

No torch, no Lightning, no CLI: checked by the import-linter contract in pyproject.toml.
"""
