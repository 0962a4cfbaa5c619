"""Multipart part sizes: S3's limits and the size of each part, as pure arithmetic.

Part sizes step up every 1,000 parts, from 8 MiB, so that 10,000 parts (S3's limit) reach
`max_archive_size`: every archive below about 8 GiB compressed uses 8 MiB parts, buffers are
re-allocated at most nine times, and a stream of unknown length can still reach the maximum.
No AWS import: the config schema checks `max_archive_size` with the same rule the upload
applies, without depending on the S3 adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_PART = 8 * 1024 * 1024  # above S3's 5 MiB minimum; the size most S3 clients default to
MAX_PART = 5 * 1024**3  # S3's maximum part size
MAX_PARTS = 10_000  # S3's maximum part count
MAX_OBJECT = 5 * 1024**4  # S3's maximum object size


@dataclass(frozen=True)
class PartSizer:
    """Part n (1-based) is `base + ((n - 1) // STEP) * growth` bytes: constant for 1,000 parts."""

    base: int
    growth: int

    STEP = 1000

    @classmethod
    def for_max(cls, max_size: int, base: int = MIN_PART) -> PartSizer:
        if max_size > MAX_OBJECT:
            raise ValueError(f"max archive size {max_size} exceeds S3's 5 TiB object limit")
        extra = max_size - MAX_PARTS * base
        if extra <= 0:
            return cls(base, 0)
        # Capacity = N*base + STEP*growth*(0+1+…+9) >= max_size; 64 KiB-aligned steps.
        blocks = MAX_PARTS // cls.STEP
        growth = -(-extra // (cls.STEP * blocks * (blocks - 1) // 2))
        growth = -(-growth // 65536) * 65536
        return cls(base, growth)

    def size(self, n: int) -> int:
        return min(self.base + ((n - 1) // self.STEP) * self.growth, MAX_PART)

    def capacity(self) -> int:
        return sum(self.size(n) for n in range(1, MAX_PARTS + 1))
