"""One module per task (classification, detection): output type, per-tile records, merge."""
