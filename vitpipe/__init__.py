"""vitpipe: what Vision Transformers cost to train from scratch versus fine-tune."""

__version__ = "0.1.0"
