"""Which worker holds which feed: rendezvous (highest-random-weight) hashing.

Pure functions, no I/O. Every worker computes, for a feed, a weight per
worker and takes the feed if its own weight is the highest: with the same
list of workers, every process agrees on the owner without talking. When a
worker joins, it takes only the feeds whose new highest weight is its own
(about ``1/n`` of them); when one leaves, only its feeds move. `shard` is the
static form: workers are the numbers 1 to ``count``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from ..exceptions import UsageError

__all__ = ["owner", "shard"]

_MAX_SHARDS = 1_000
"""The most shards `shard` splits feeds into: each feed costs one hash per shard.

About 1.3 ms a feed at 1,000 shards (13 s for a tokens file of 10,000
feeds, on one core of a busy 2-core machine); and 1,000 bridges of about 10,000
feeds each are 10 million feeds, beyond what static shards are for.
"""


def _weight(worker: str, key: str) -> int:
    # Length-prefixed, as the dedup ids are: no two (worker, key) pairs give the same bytes.
    parts = [worker.encode("utf-8", "surrogatepass"), key.encode("utf-8", "surrogatepass")]
    data = b"".join(b"%d:%s" % (len(part), part) for part in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def owner(key: str, workers: Iterable[str]) -> str:
    """Return the worker that holds feed ``key`` among ``workers``: the one of highest weight.

    The weight of a worker for a key is the BLAKE2b digest (8 bytes, read as
    a big-endian unsigned integer) of the worker's name and the key, each
    written as the decimal length of its UTF-8, a colon, and its UTF-8. Ties
    (which 64-bit digests make vanishingly rare) go to the greater name.

    Raises:
        UsageError: ``key`` or a worker is not a str, or ``workers`` is empty.

    Example:
        >>> owner("alice", ["w1", "w2", "w3"]) in {"w1", "w2", "w3"}
        True
    """
    if not isinstance(key, str):
        raise UsageError(f"a feed's key is a str, not {type(key).__name__}")
    best: tuple[int, str] | None = None
    for worker in workers:
        if not isinstance(worker, str):
            raise UsageError(f"a worker's name is a str, not {type(worker).__name__}")
        candidate = (_weight(worker, key), worker)
        if best is None or candidate > best:
            best = candidate
    if best is None:
        raise UsageError("a feed's owner is chosen among at least one worker")
    return best[1]


def shard(key: str, count: int) -> int:
    """Return the shard, from 1 to ``count``, of feed ``key``: its owner among the workers ``"1"`` to ``str(count)``.

    Going from ``count`` to ``count + 1`` shards moves about ``1/(count + 1)``
    of the feeds, all of them to the new shard.

    It costs ``count`` hashes, about 1.3 µs each: a tokens file of 10,000
    feeds takes about 0.15 s to split into 10 shards, 1.3 s into 100, and
    13 s into 1,000, the most it splits into.

    Raises:
        UsageError: ``key`` is not a str, or ``count`` is not an int from 1 to 1,000.

    Example:
        >>> shard("alice", 1)
        1
    """
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= _MAX_SHARDS:
        raise UsageError(f"the number of shards must be an int from 1 to {_MAX_SHARDS:,}, not {count!r}")
    if not isinstance(key, str):
        raise UsageError(f"a feed's key is a str, not {type(key).__name__}")
    return int(owner(key, (str(number) for number in range(1, count + 1))))
