"""pretrain: pre-train your own foundation model, then put it to work."""

__version__ = "0.1.0"


class PretrainError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""
