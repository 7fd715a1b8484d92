"""The per-step series a training run writes (train.tsv, eval.tsv), which `dvc plots` draws."""

from __future__ import annotations

from pathlib import Path

from vitpipe.atomic import write_text

# data_ms: host milliseconds spent making the step's batches (gather, augment, pin, copy launch;
# in the background when the input pipeline prefetches); data_wait_ms: how long the step
# waited for them. A wait near data_ms means the input path, not the model, sets the pace.
TRAIN_COLUMNS = (
    "step",
    "loss",
    "lr",
    "img_per_s",
    "img_per_s_per_device",
    "elapsed_s",
    "eta_s",
    "memory_mb",
    "data_ms",
    "data_wait_ms",
)
EVAL_COLUMNS = ("step", "val_acc", "val_loss", "elapsed_s")


class StepLog:
    """A TSV that `dvc plots` reads. Its rows also go into every checkpoint, so a resumed run
    rewrites exactly the rows up to its checkpoint, whatever happened to the file."""

    def __init__(self, path: Path, columns, rows: list[str]):
        self.columns, self.rows = columns, list(rows)
        write_text(path, "\t".join(columns) + "\n" + "".join(r + "\n" for r in self.rows))
        self.file = open(path, "a")

    def write(self, **row):
        line = "\t".join(_fmt(row[c]) for c in self.columns)
        self.rows.append(line)
        self.file.write(line + "\n")

    def flush(self):
        self.file.flush()

    def close(self):
        self.file.close()


def _fmt(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:.6g}"
