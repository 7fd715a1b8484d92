"""This machine: what device it has and what it measures (matmul peak, MFU), which
precision a run really uses, telemetry while training, and sharing the CPU cores."""
