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
        UsageError: ``workers`` is empty.

    Example:
        >>> owner("alice", ["w1", "w2", "w3"]) in {"w1", "w2", "w3"}
        True
    """
    best: tuple[int, str] | None = None
    for worker in workers:
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

    Raises:
        UsageError: ``count`` is not a positive int.

    Example:
        >>> shard("alice", 1)
        1
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UsageError(f"the number of shards must be a positive int, not {count!r}")
    return int(owner(key, (str(number) for number in range(1, count + 1))))
