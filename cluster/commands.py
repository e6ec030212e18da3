"""`tidelog node …` and `tidelog cluster …` sub-commands."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the node and cluster commands; each sets ``handler`` to a function of the args."""
