"""Orchestration: Lightning wiring (Trainer, DataModule, LightningModule), signals, SLURM."""
