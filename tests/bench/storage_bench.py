"""Storage benchmark (issue 2, item 6): the segment log beside plain os.write of the same bytes.

    python tests/bench/storage_bench.py [--size-mb 1024] [--sync-mb 256] [--tail-mb 64] [--dir DIR]

Prints, each in the same run and on the same disk:
  * append MB/s with 1 MiB batches and no flush, beside os.write of the same bytes;
  * append MB/s with flush() after every batch, beside os.write + os.fdatasync per batch;
  * read MB/s (sequential read(offset, 1 MiB)), beside os.pread of the same chunks;
  * reopen time of the cleanly closed --size-mb partition (target < 0.5 s for 1 GiB);
  * recovery time after a crash with --tail-mb unflushed, beside reading that tail with pread.
and the ratios against the targets (≥ 70 % without fsync, ≥ 50 % with).

Not collected by pytest (no test functions); the lead runs it for the record.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import crc32c
from tidelog.node.storage import PartitionLog
from tidelog.proto.records import Record, encode_batch, scan_batches

MIB = 1 << 20


def one_mib_batch() -> bytes:
    """One RecordBatch of just under 1 MiB (records of 1000 random bytes; uncompressed)."""
    value = os.urandom(1000)
    count = 1040
    while True:
        data = encode_batch([Record(0, 1_700_000_000_000 + i, None, value) for i in range(count)])
        if len(data) <= MIB:
            return data
        count -= 1


def rate(total_bytes: int, seconds: float) -> float:
    return total_bytes / MIB / seconds if seconds > 0 else float("inf")


def append_beside_plain(directory: Path, plain_path: Path, data: bytes, count: int,
                        sync: bool) -> tuple[float, float, PartitionLog]:
    """Append ``count`` batches to a log and write the same bytes to a plain file, alternating
    batch by batch so both see the same page cache and writeback state; returns both times."""
    plog = PartitionLog.open(directory)
    fd = os.open(plain_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    ours = plain = 0.0
    try:
        for _ in range(count):
            start = time.perf_counter()
            os.write(fd, data)
            if sync:
                os.fdatasync(fd)
            middle = time.perf_counter()
            plog.append(data, 1)
            if sync:
                plog.flush()
            ours += time.perf_counter() - middle
            plain += middle - start
    finally:
        os.close(fd)
    return ours, plain, plog


def plain_read(path: Path, chunk: int) -> tuple[float, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        start, position = time.perf_counter(), 0
        while position < size:
            position += len(os.pread(fd, chunk, position))
        return time.perf_counter() - start, size
    finally:
        os.close(fd)


def log_read(plog: PartitionLog, chunk: int) -> tuple[float, int]:
    start, offset, total = time.perf_counter(), plog.log_start_offset, 0
    end = plog.end_offset
    while offset < end:
        data = plog.read(offset, chunk)
        total += len(data)
        # The next offset is the last batch's base offset + lastOffsetDelta + 1; reading the
        # header fields here keeps the loop free of record decoding.
        offset = next_offset(data)
    return time.perf_counter() - start, total


def next_offset(data: bytes) -> int:
    return scan_batches(data, verify_crc=False)[-1].next_offset


def line(name: str, ours: float, plain: float, unit: str = "MB/s", target: float | None = None) -> None:
    ratio = ours / plain if plain else float("nan")
    verdict = ""
    if target is not None:
        verdict = "  (target ≥ {:.0%}: {})".format(target, "met" if ratio >= target else "MISSED")
    print(f"{name:<34} {ours:10.1f} {unit}   plain {plain:10.1f} {unit}   ratio {ratio:6.1%}{verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="partition size for append/read/reopen")
    parser.add_argument("--sync-mb", type=int, default=256, help="bytes written with a flush per batch")
    parser.add_argument("--tail-mb", type=int, default=64, help="unflushed tail recovered after a crash")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="tidelog-storage-bench-", dir=args.dir))
    data = one_mib_batch()
    count, sync_count, tail_count = args.size_mb, min(args.sync_mb, args.size_mb), args.tail_mb
    print(f"directory {root}; batch {len(data)} bytes; {count} batches "
          f"({count * len(data) / MIB:.0f} MiB), {sync_count} with flush, {tail_count} unflushed tail")
    try:
        # 1. append without fsync, beside os.write of the same bytes.
        plain_path = root / "plain.bin"
        append_seconds, plain_seconds, plog = append_beside_plain(
            root / "bench-0", plain_path, data, count, sync=False)
        line("append, no flush", rate(count * len(data), append_seconds),
             rate(count * len(data), plain_seconds), target=0.70)

        # 2. read back sequentially, 1 MiB at a time (page cache warm for both).
        read_seconds, read_bytes = log_read(plog, MIB)
        plain_read_seconds, plain_bytes = plain_read(plain_path, len(data))
        line("read, 1 MiB per call", rate(read_bytes, read_seconds), rate(plain_bytes, plain_read_seconds))

        # 3. reopen of the cleanly closed partition.
        plog.close()
        start = time.perf_counter()
        plog = PartitionLog.open(root / "bench-0")
        reopen = time.perf_counter() - start
        size_mib = plog.size_bytes / MIB
        plog.close()
        verdict = "met" if reopen < 0.5 or size_mib < 1024 else "MISSED"
        print(f"{'reopen after clean close':<34} {reopen * 1000:10.1f} ms     "
              f"({size_mib:.0f} MiB partition; target < 500 ms for 1 GiB: {verdict})")
        os.unlink(plain_path)

        # 4. append with flush after every batch, beside os.write + os.fdatasync.
        shutil.rmtree(root / "bench-0")
        sync_seconds, plain_sync_seconds, plog = append_beside_plain(
            root / "bench-1", root / "plain-sync.bin", data, sync_count, sync=True)
        os.unlink(root / "plain-sync.bin")
        line("append, flush() per batch", rate(sync_count * len(data), sync_seconds),
             rate(sync_count * len(data), plain_sync_seconds), target=0.50)

        # 5. crash with an unflushed tail, then recover (scan of the tail only).
        for _ in range(tail_count):
            plog.append(data, 1)
        tail_bytes = tail_count * len(data)
        plog._close_files()  # the process dies: nothing more is written
        start = time.perf_counter()
        plog = PartitionLog.open(root / "bench-1")
        recovery = time.perf_counter() - start
        end = plog.end_offset
        plog._close_files()
        # The least any recovery must do: read the unflushed tail and check its CRCs.
        active = max((root / "bench-1").glob("*.log"))
        fd = os.open(active, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            start = time.perf_counter()
            position = max(0, size - tail_bytes)
            while position < size:
                chunk = os.pread(fd, 8 * MIB, position)
                crc32c.crc32c(chunk)
                position += len(chunk)
            tail_read = time.perf_counter() - start
        finally:
            os.close(fd)
        print(f"{'recovery after crash':<34} {recovery * 1000:10.1f} ms   "
              f"plain {tail_read * 1000:10.1f} ms   (pread + CRC-32C of the {tail_bytes / MIB:.0f} MiB "
              f"unflushed tail of a {(sync_count + tail_count)} MiB log; recovered to offset {end}; "
              f"recovery also rescans up to recovery_point_interval_bytes of flushed data)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
