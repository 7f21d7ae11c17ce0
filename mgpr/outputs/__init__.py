"""The run directory and its fingerprint, per-rank storage, vector writers."""
