"""Small durable-file helpers shared by storage and the node's state files (DESIGN.md §3).

A state file is replaced atomically: write a temp file, fsync it, rename it over the old one,
fsync the directory. After a crash a reader sees either the old or the new content, never a mix,
and a rename that has returned is not undone.
"""

from __future__ import annotations

import os

TEMP_SUFFIX = ".tmp"


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make created, renamed and deleted names in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until every byte is written (a regular file may take fewer on a signal)."""
    view = memoryview(data).cast("B")
    while len(view):
        written = os.write(fd, view)
        view = view[written:]


def atomic_write(directory: str | os.PathLike[str], name: str, data: bytes, *,
                 sync_directory: bool = True) -> None:
    """Replace ``directory/name`` with ``data`` atomically and durably."""
    final = os.path.join(directory, name)
    temp = final + TEMP_SUFFIX
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, final)
    if sync_directory:
        fsync_directory(directory)


def remove_durably(directory: str | os.PathLike[str], names: list[str]) -> None:
    """Unlink the names that exist, then fsync the directory once."""
    removed = False
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
            removed = True
        except FileNotFoundError:
            pass
    if removed:
        fsync_directory(directory)
