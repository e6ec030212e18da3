"""A single-file stand-in for `tidelog.node.storage.PartitionLog`, used only until it lands.

It implements the subset of the PartitionLog API the node uses, with the same names, so the
node runs end to end before segment storage exists. Delete this file once storage.py is in.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidelog.proto import records as codec


@dataclass(frozen=True, slots=True)
class AppendResult:
    base_offset: int
    last_offset: int


@dataclass(frozen=True, slots=True)
class _Entry:
    base_offset: int
    last_offset: int
    position: int
    size: int
    max_timestamp: int
    epoch: int


class PartitionLog:
    def __init__(self, directory: Path, file: Any, entries: list[_Entry], size: int) -> None:
        self._dir = directory
        self._file = file
        self._entries = entries
        self._size = size
        self._flushed = entries[-1].last_offset + 1 if entries else 0
        self._lock = threading.Lock()

    @classmethod
    def open(cls, directory: Path, config: Any = None) -> PartitionLog:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "00000000000000000000.log"
        data = path.read_bytes() if path.exists() else b""
        headers, valid = codec.scan_valid_prefix(data)
        file = open(path, "r+b" if path.exists() else "w+b")
        file.truncate(valid)
        file.seek(valid)
        entries = [_Entry(h.base_offset, h.last_offset, h.position, h.size, h.max_timestamp,
                          h.partition_leader_epoch) for h in headers]
        return cls(directory, file, entries, valid)

    @property
    def end_offset(self) -> int:
        return self._entries[-1].last_offset + 1 if self._entries else 0

    @property
    def log_start_offset(self) -> int:
        return 0

    @property
    def flushed_offset(self) -> int:
        return self._flushed

    def append(self, batches: bytes | bytearray | memoryview, epoch: int) -> AppendResult:
        buf = bytearray(batches)
        headers = codec.scan_batches(buf)
        base = self.end_offset
        codec.stamp_batches(buf, base, epoch)
        return self._write(buf, headers, base, epoch)

    def append_replicated(self, batches: bytes | bytearray | memoryview) -> AppendResult:
        buf = bytearray(batches)
        headers = codec.scan_batches(buf)
        return self._write(buf, headers, headers[0].base_offset, headers[0].partition_leader_epoch)

    def _write(self, buf: bytearray, headers: list[codec.BatchHeader], base: int, epoch: int) -> AppendResult:
        self._file.seek(self._size)
        self._file.write(buf)
        offset = base
        for h in headers:
            last = offset + h.last_offset_delta
            self._entries.append(_Entry(offset, last, self._size + h.position, h.size, h.max_timestamp, epoch))
            offset = last + 1
        self._size += len(buf)
        return AppendResult(base, offset - 1)

    def read(self, offset: int, max_bytes: int) -> bytes:
        start = next((e for e in self._entries if e.last_offset >= offset), None)
        if start is None:
            return b""
        index = self._entries.index(start)
        end = index
        total = 0
        while end < len(self._entries) and (end == index or total + self._entries[end].size <= max_bytes):
            total += self._entries[end].size
            end += 1
        self._file.flush()
        return os.pread(self._file.fileno(), total, start.position)

    def offset_for_timestamp(self, timestamp: int) -> int | None:
        for entry in self._entries:
            if entry.max_timestamp >= timestamp:
                return entry.base_offset
        return None

    def flush(self) -> None:
        with self._lock:
            target = self.end_offset
            self._file.flush()
            os.fdatasync(self._file.fileno())
            self._flushed = max(self._flushed, target)

    def close(self) -> None:
        self.flush()
        self._file.close()
