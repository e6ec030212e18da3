"""Which partition a produced record goes to (Kafka's defaults).

A keyed record goes to ``positive(murmur2(key)) % partitions``, bit for bit as Kafka's Java
client (``BuiltInPartitioner.partitionForKey``) does, so a key lands on the same partition
number whichever client wrote it. Records without a key stick to one partition until about a
batch's worth of bytes went there, then move on (KIP-794's uniform sticky partitioner without
its load weighting): large batches, yet an even spread over time.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

_M = 0x5BD1E995
_SEED = 0x9747B28C
_MASK32 = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2``: the 32-bit MurmurHash2 as a signed int."""
    length = len(data)
    h = (_SEED ^ length) & _MASK32
    end = length & ~3
    for i in range(0, end, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * _M) & _MASK32
        k ^= k >> 24
        k = (k * _M) & _MASK32
        h = ((h * _M) & _MASK32) ^ k
    extra = length & 3
    if extra == 3:
        h ^= data[end + 2] << 16
    if extra >= 2:
        h ^= data[end + 1] << 8
    if extra >= 1:
        h ^= data[end]
        h = (h * _M) & _MASK32
    h ^= h >> 13
    h = (h * _M) & _MASK32
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for_key(key: bytes, num_partitions: int) -> int:
    # Kafka's Utils.toPositive masks the sign bit rather than taking abs().
    return (murmur2(key) & 0x7FFFFFFF) % num_partitions


class StickyPartitioner:
    """Chooses partitions for records without a key, per topic.

    Not thread-safe by itself: the producer calls it under its accumulator lock.
    """

    def __init__(self, batch_size: int, rng: random.Random | None = None) -> None:
        self._batch_size = batch_size
        self._rng = rng or random.Random()
        self._current: dict[str, int] = {}
        self._bytes: dict[str, int] = {}

    def choose(
        self,
        topic: str,
        num_partitions: int,
        size: int,
        available: Callable[[], Sequence[int]] | None = None,
    ) -> int:
        """The partition for a record of ``size`` bytes; after a batch's worth, move on.

        ``available`` (partitions with a known leader) is only called when a new partition is
        chosen, which keeps the per-record cost to a dict lookup.
        """
        current = self._current.get(topic)
        if current is None or current >= num_partitions:
            current = self._choose(topic, num_partitions, available() if available else None, None)
        total = self._bytes[topic] + size
        if total >= self._batch_size:
            self._choose(topic, num_partitions, available() if available else None, current)
        else:
            self._bytes[topic] = total
        return current

    def _choose(
        self,
        topic: str,
        num_partitions: int,
        available: Sequence[int] | None,
        previous: int | None,
    ) -> int:
        pool = [p for p in (available or ()) if p < num_partitions] or list(range(num_partitions))
        if previous is not None and len(pool) > 1:
            pool = [p for p in pool if p != previous]
        chosen = self._rng.choice(pool)
        self._current[topic] = chosen
        self._bytes[topic] = 0
        return chosen
