"""vitpipe: what Vision Transformers cost to train from scratch versus fine-tune.

The version is the installed distribution's (importlib.metadata.version("vitpipe")).
"""
