"""Rendezvous hashing: every feed has one owner, and a change of workers moves as few feeds as it can."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatfeed import UsageError
from chatfeed.bridge import owner, shard

KEYS = [f"user-{number}" for number in range(20_000)]
names = st.text(min_size=1, max_size=12)


@given(st.sets(names, min_size=1, max_size=12), st.lists(names, min_size=1, max_size=30))
@settings(max_examples=200, deadline=None)
def test_every_feed_has_one_owner_and_it_does_not_depend_on_the_workers_order(
    workers: set[str], keys: list[str]
) -> None:
    for key in keys:
        chosen = owner(key, sorted(workers))
        assert chosen in workers
        assert owner(key, sorted(workers, reverse=True)) == chosen


@given(st.sets(names, min_size=2, max_size=12), st.lists(names, min_size=1, max_size=30), st.data())
@settings(max_examples=200, deadline=None)
def test_a_leaving_worker_moves_only_its_own_feeds_and_a_joining_one_takes_only_feeds(
    workers: set[str], keys: list[str], data: st.DataObject
) -> None:
    leaving = data.draw(st.sampled_from(sorted(workers)))
    rest = workers - {leaving}
    for key in keys:
        before, after = owner(key, workers), owner(key, rest)
        if before != leaving:
            assert after == before  # only the leaver's feeds move
        # Joining is leaving backwards: a feed that moves, moves to the newcomer.
        assert before in (after, leaving)


@pytest.mark.parametrize("count", [1, 2, 5, 10])
def test_going_from_n_to_n_plus_1_shards_moves_about_1_in_n_plus_1_feeds_all_to_the_new_one(count: int) -> None:
    before = [shard(key, count) for key in KEYS]
    after = [shard(key, count + 1) for key in KEYS]
    moved = [new for old, new in zip(before, after, strict=True) if old != new]
    assert set(moved) <= {count + 1}
    assert abs(len(moved) / len(KEYS) - 1 / (count + 1)) < 0.02  # the minimum, within noise
    sizes = [after.count(number) for number in range(1, count + 2)]
    assert max(sizes) / min(sizes) < 1.1  # and the shards are even


def test_the_weights_are_the_documented_digest() -> None:
    # Another language can compute the same owner: BLAKE2b-64 of the length-prefixed worker and key.
    def weight(worker: str, key: str) -> int:
        data = b"".join(b"%d:%s" % (len(part), part) for part in (worker.encode(), key.encode()))
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")

    for key in KEYS[:200]:
        assert owner(key, ["a", "b", "c"]) == max(["a", "b", "c"], key=lambda worker: weight(worker, key))
    assert [shard(key, 5) for key in ("alice", "bob", "user-1", "user-2")] == [2, 5, 3, 2]


def test_bad_arguments_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="at least one worker"):
        owner("alice", [])
    for count in (0, -1, True, 2.0):
        with pytest.raises(UsageError, match="number of shards"):
            shard("alice", count)  # type: ignore[arg-type]


def test_a_shard_count_beyond_the_bound_and_keys_or_workers_that_are_not_str_are_usage_errors() -> None:
    assert shard("alice", 1_000) in range(1, 1_001)
    for count in (1_001, 100_000_000):  # a hash per shard and feed: the command line would hang
        with pytest.raises(UsageError, match=r"^the number of shards must be an int from 1 to 1,000, not "):
            shard("alice", count)
    with pytest.raises(UsageError, match="a feed's key is a str, not int"):
        shard(1, 2)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="a feed's key is a str, not bytes"):
        owner(b"alice", ["w1"])  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="a worker's name is a str, not int"):
        owner("alice", ["w1", 2])  # type: ignore[list-item]
