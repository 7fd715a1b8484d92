"""Resumable training state: the checkpoint file format (digest-checked), the store keyed by
a run's fingerprint, its durable mirror, and the `vitpipe checkpoints` command."""
