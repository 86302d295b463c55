"""pretrain: pre-train your own foundation model, then put it to work."""

__version__ = "0.1.0"


class PretrainError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


class Interrupted(KeyboardInterrupt):
    """Stop at once on a signal (Ctrl-C, or SIGTERM / SIGINT a second time while training stops gracefully);
    the CLI exits with status 128 + ``signum`` (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
