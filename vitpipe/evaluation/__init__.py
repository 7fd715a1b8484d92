"""Scoring a trained network on a split (accuracy, per-class, confusion, inference speed)
and what it looks at (attention rollout for ViTs, Grad-CAM for CNNs)."""
