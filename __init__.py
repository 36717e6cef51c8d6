"""effc: a compiler for model-efficiency pipelines (see README.md)."""

__version__ = "0.1.0"
