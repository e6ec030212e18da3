"""Client sub-commands of `tidelog`: topic, produce, consume, group, perf."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the client commands; each sets ``handler`` to a function of the args."""
