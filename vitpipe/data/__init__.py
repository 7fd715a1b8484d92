"""Data: sources (where images come from), the prepared store (what training reads),
and the fractal generator (formula-driven images for pretraining without natural data)."""
