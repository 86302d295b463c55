"""CLI commands for transfer (`pretrain finetune | predict | probe | transfer`)."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the transfer commands on the main parser; each sets ``func`` to its handler."""
