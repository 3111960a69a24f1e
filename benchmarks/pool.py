"""Pool benchmark: one `chatfeed.Pool` of thousands of feeds in one process, against one server process.

For each number of feeds N, a :class:`chatfeed.testing.FeedServer` in a
process of its own (N tokens, a listen backlog of 4,096, no compression)
serves one ``chatfeed.Pool`` of N feeds in another process, which measures:

- start-up: how long ``async with pool`` takes to return (every feed
  authenticated) at ``connect_rate``, and how many connections the server
  accepted that did not end up authenticated (its failed handshakes; zero is
  the target), with the attempts that failed on the pool's side;
- memory per idle authenticated feed: resident memory once all N are up,
  less the baseline, over N; compared with N bare websockets connections with
  a reader task each (``scale.py``'s, opened at the same rate), measured by a
  fresh pair of processes; and the objects per feed that the garbage
  collector tracks, by type, for both;
- idle CPU over a window of whole ping intervals, so that every feed is
  pinged as often as it is in the steady state (by the pool, and by the
  server, whose websockets pings too);
- the storm: the server drops every connection at once; the time from the
  first drop seen to the last feed back, the waits the backoff drew
  (``Disconnected.retry_in``) over its jitter window ``[0, initial]``, and the
  longest garbage collection pause meanwhile. Twice: as is, then again after
  ``gc.freeze()`` (which moves the objects alive after start-up out of the
  collector's sight), once every feed has been up for ``reset_after``.

And, in this process, throughput: 100 pool feeds reading F frames each from
the firehose server (``firehose.py``) against one ``Client`` reading 100 F,
each with one async handler, timed from the moment every feed is
authenticated.

Usage:
    ``python benchmarks/pool.py`` (1,000 and 10,000 feeds, 40 s idle, a few
    minutes) or ``python benchmarks/pool.py --smoke`` (10 feeds, a few
    seconds). From Python: ``run_pool([1000], idle_seconds=40.0)``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from scale import (
    HISTOGRAM_BUCKETS,
    _children,
    _cpu_seconds,
    _emit,
    _GcPauses,
    _histogram,
    _object_counts,
    _objects_per_item,
    _other_tasks,
    _raise_fd_limit,
    _run_bare,
    _settled_rss_kib,
    _Start,
    _start_server,
)

if TYPE_CHECKING:
    import chatfeed

__all__ = ["measure_pool_throughput", "run_pool"]

FULL: dict[str, Any] = {
    "counts": [1000, 10_000],
    "connect_rate": 1000.0,
    "idle": 40.0,  # two ping intervals (20 s, the default of the pool's pings and of the server's)
    "backoff_initial": 2.0,
    "throughput": (100, 5000, 5),  # feeds, frames per feed, rounds
}
SMOKE: dict[str, Any] = {
    "counts": [10],
    "connect_rate": 1000.0,
    "idle": 0.5,
    "backoff_initial": 0.1,
    "throughput": (10, 2000, 1),
}


_SCRIPT = os.path.abspath(__file__)
_HOST = "127.0.0.1"
_START_TIMEOUT = 20.0
_COMMAND_TIMEOUT = 15.0
_CLOSE_TIMEOUT = 60.0


def _backoff_of(initial: float) -> dict[str, float]:
    # A second failure in a row would wait up to 2 * initial: reset_after lets
    # the second storm start from a first failure again.
    return {"initial": initial, "maximum": 5 * initial, "reset_after": 2 * initial}


def _startup_timeout(count: int, rate: float) -> float:
    return 30.0 + 2 * count / rate


def _reconnect_timeout(count: int, rate: float, initial: float) -> float:
    return 30.0 + 5 * initial + 2 * count / rate


def _child_deadline(count: int, rate: float, idle_seconds: float, initial: float) -> float:
    """Seconds after which a child kills itself, whatever happens."""
    return (
        _START_TIMEOUT
        + _startup_timeout(count, rate)
        + idle_seconds
        + 2 * (_reconnect_timeout(count, rate, initial) + 3 * initial)
        + _CLOSE_TIMEOUT
        + 60.0
    )


# The pool process


class _FailedAttempts(logging.Handler):
    """Counts the connection attempts that failed, from the records of the feeds' backoff.

    Installed for the start-up only: it turns on chatfeed's INFO records,
    which an application that logs at INFO pays for too.
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0
        self._logger = logging.getLogger("chatfeed")
        self._level = self._logger.level

    def __enter__(self) -> _FailedAttempts:
        self._logger.addHandler(self)
        self._logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("reconnecting in"):
            self.count += 1


class _Storm:
    """Timestamps each feed's drop and return, with handlers of the pool (one set for every feed).

    The handlers are plain functions, called inline in each feed's receive
    loop, so the times are taken when the feed itself sees the event.
    """

    def __init__(self, count: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.count = count
        self.armed = False
        self.early_disconnects = 0
        self.stopped: asyncio.Future[None] = self.loop.create_future()
        self.lost_at: list[float | None] = [None] * count
        self.back_at: list[float | None] = [None] * count
        self.retry_in: list[float | None] = [None] * count
        self.back = 0
        self.all_back: asyncio.Future[None] = self.loop.create_future()

    def arm(self) -> None:
        """Get ready for the next drop."""
        for timestamps in (self.lost_at, self.back_at, self.retry_in):
            timestamps[:] = [None] * self.count
        self.back = 0
        self.all_back = self.loop.create_future()
        self.armed = True

    def attach(self, pool: chatfeed.Pool) -> None:

        @pool.on("disconnected")
        def on_disconnected(event: chatfeed.Disconnected, feed: str) -> None:
            index = int(feed)
            if not self.armed:
                self.early_disconnects += 1  # dropped before the benchmark's own drop: reported, not timed
            elif self.lost_at[index] is None:
                self.lost_at[index] = self.loop.time()
                self.retry_in[index] = event.retry_in

        @pool.on("connected")
        def on_connected(event: chatfeed.Connected, feed: str) -> None:
            index = int(feed)
            if self.armed and self.lost_at[index] is not None and self.back_at[index] is None:
                self.back_at[index] = self.loop.time()
                self.back += 1
                if self.back == self.count:
                    self.armed = False
                    self.all_back.set_result(None)

        @pool.on("feed_stopped")
        def on_feed_stopped(event: chatfeed.FeedStopped, feed: str) -> None:
            if not self.stopped.done():
                self.stopped.set_exception(RuntimeError(f"feed {feed} stopped: {event.error!r}"))

    async def wait_all_back(self, timeout: float) -> None:
        done, _ = await asyncio.wait(
            [self.all_back, self.stopped], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if self.stopped in done:
            self.stopped.result()
        if self.all_back not in done:
            raise TimeoutError(f"not all back within {timeout:g} s ({self.back} of {self.count})")

    def results(self) -> dict[str, Any]:
        lost = [at for at in self.lost_at if at is not None]
        back = [at for at in self.back_at if at is not None]
        pairs = zip(self.lost_at, self.back_at, strict=True)
        return {
            "all_back_seconds": max(back) - min(lost),
            "delays": [end - start for start, end in pairs if start is not None and end is not None],
            "scheduled_delays": [delay for delay in self.retry_in if delay is not None],
        }


GC_MODES = {
    "default": "as is",
    "freeze": "`gc.freeze()` after start-up",
    "freeze, no full collection": "`gc.freeze()`, and no automatic full collection during the storm",
}
"""How the garbage collector is set for each storm, in order, with a label for the tables."""

_NEVER = 1_000_000
"""A third ``gc`` threshold that the young collections of a storm never reach."""


def _tracked_objects() -> int:
    """Objects the garbage collector tracks, frozen ones included (after a collection)."""
    return len(gc.get_objects()) + gc.get_freeze_count()


def _collections() -> list[int]:
    return [generation["collections"] for generation in gc.get_stats()]


async def _measure_pool(port: int, count: int, idle_seconds: float, rate: float, initial: float) -> None:
    import chatfeed

    url = f"ws://{_HOST}:{port}"
    loop = asyncio.get_running_loop()
    settings = _backoff_of(initial)
    backoff = chatfeed.Backoff(
        initial=settings["initial"], maximum=settings["maximum"], reset_after=settings["reset_after"]
    )

    # A pool of one first, so that lazy imports and caches filled on first
    # use are in the baseline and not charged to the N feeds.
    warm_up = chatfeed.Pool(url, reconnect=False)
    warm_up.add("warm-up", token="token-0")
    async with warm_up:
        pass
    storm = _Storm(count)
    pool = chatfeed.Pool(url, connect_rate=rate, reconnect=backoff)
    storm.attach(pool)  # the pool's handlers, shared by every feed: nothing per feed
    rss_before = _settled_rss_kib()
    objects_before = _object_counts()
    tracked_before = _tracked_objects()

    for index in range(count):
        pool.add(str(index), token=f"token-{index}")
    with _FailedAttempts() as failed_attempts:
        started = loop.time()
        await asyncio.wait_for(pool.__aenter__(), _startup_timeout(count, rate))
    try:
        startup_seconds = loop.time() - started
        up = pool.statistics()
        if up.up != count:
            raise RuntimeError(f"only {up.up} of {count} feeds up after start-up ({up.failed} failed)")
        rss_after = _settled_rss_kib()
        _emit(
            "connected",
            startup_seconds=startup_seconds,
            failed_attempts=failed_attempts.count,
            connections=up.connections,
            warm_up_connections=1,
            rss_before_kib=rss_before,
            rss_after_kib=rss_after,
            objects_per_feed=_objects_per_item(objects_before, _object_counts(), count),
            tasks_per_feed=_other_tasks() / count,
            tracked_objects_per_feed=(_tracked_objects() - tracked_before) / count,
        )

        cpu_start, wall_start = _cpu_seconds(), time.monotonic()
        await asyncio.sleep(idle_seconds)
        _emit(
            "idle",
            cpu_seconds=_cpu_seconds() - cpu_start,
            wall_seconds=time.monotonic() - wall_start,
            early_disconnects=storm.early_disconnects,
        )

        thresholds = gc.get_threshold()
        up_since = loop.time()
        for mode in GC_MODES:
            # Every feed up for reset_after, so that the drop is a first failure again.
            await asyncio.sleep(max(up_since + backoff.reset_after + min(initial, 0.5) - loop.time(), 0.0))
            if mode != "default":
                # What the last storm left frozen is let go, what is alive now frozen.
                gc.unfreeze()
                gc.collect()
                gc.freeze()
            if mode == "freeze, no full collection":
                gc.set_threshold(thresholds[0], thresholds[1], _NEVER)
            storm.arm()
            cpu_start, collections = _cpu_seconds(), _collections()
            _emit("ready", gc=mode)
            with _GcPauses() as pauses:
                await storm.wait_all_back(_reconnect_timeout(count, rate, initial))
            up_since = loop.time()
            cpu_seconds, collected = _cpu_seconds() - cpu_start, _collections()
            gc.set_threshold(*thresholds)
            _emit(
                "reconnected",
                gc=mode,
                cpu_seconds=cpu_seconds,
                gc_seconds=pauses.total,
                gc_longest_pause_seconds=pauses.longest,
                gc_collections=[after - before for before, after in zip(collections, collected, strict=True)],
                # After a full collection: what the storm left frozen is still there.
                rss_kib=_settled_rss_kib(),
                tracked_objects_per_feed=(_tracked_objects() - tracked_before) / count,
                **storm.results(),
            )
        gc.unfreeze()
        rss_released = _settled_rss_kib()
    finally:
        await pool.close()
    _emit("done", leftover_tasks=_other_tasks(), rss_kib=rss_released)


# The parent


def _pool_args(port: int, count: int, idle_seconds: float, rate: float, initial: float, deadline: float) -> list[str]:
    return [
        "--port",
        str(port),
        "--count",
        str(count),
        "--idle",
        f"{idle_seconds:g}",
        "--rate",
        f"{rate:g}",
        "--initial",
        f"{initial:g}",
        "--deadline",
        f"{deadline:g}",
    ]


def _failed_on_server(before: dict[str, Any], after: dict[str, Any], expected: int) -> dict[str, int]:
    """What the server saw between two ``stats``, when ``expected`` connections should have come up."""
    accepted = int(after["accepted"] - before["accepted"])
    handshakes = int(after["handshakes"] - before["handshakes"])
    return {
        "accepted": accepted,
        "handshakes": handshakes,
        "auth_frames": int(after["auth_frames"] - before["auth_frames"]),
        "clients": int(after["clients"]),
        "logged_errors": int(after["logged_errors"] - before["logged_errors"]),
        # Every connection accepted beyond one per feed is an attempt that
        # failed: before the handshake completed, or after it, before auth.
        "failed": accepted - expected,
    }


def _run_pool_pair(
    start: _Start, python: str, count: int, idle_seconds: float, rate: float, initial: float
) -> dict[str, Any]:
    deadline = _child_deadline(count, rate, idle_seconds, initial)
    server, port = _start_server(start, python, count, deadline)
    server.send("stats")
    at_start = server.read("stats", _COMMAND_TIMEOUT)
    client = start(python, f"pool of {count}", _pool_args(port, count, idle_seconds, rate, initial, deadline), _SCRIPT)
    connected = client.read("connected", _START_TIMEOUT + _startup_timeout(count, rate))
    server.send("stats")
    at_up = server.read("stats", _COMMAND_TIMEOUT)
    # The warm-up pool's connection came before the N.
    warm_up = connected["warm_up_connections"]
    at_start = {**at_start, **{name: at_start[name] + warm_up for name in ("accepted", "handshakes", "auth_frames")}}
    startup_on_server = _failed_on_server(at_start, at_up, count)
    idle = client.read("idle", idle_seconds + _COMMAND_TIMEOUT)
    storms = []
    for _ in GC_MODES:
        ready = client.read("ready", _COMMAND_TIMEOUT + 5 * initial + 0.01 * count)
        server.send("drop")
        dropped = server.read("dropped", _COMMAND_TIMEOUT)
        reconnected = client.read("reconnected", _reconnect_timeout(count, rate, initial) + _COMMAND_TIMEOUT)
        server.send("stats")
        at_back = server.read("stats", _COMMAND_TIMEOUT)
        storms.append(
            {
                "gc": ready["gc"],
                "dropped": dropped["clients"],
                "server": _failed_on_server(at_up, at_back, count),
                "server_cpu_seconds": at_back["cpu_seconds"] - dropped["cpu_seconds"],
                **reconnected,
            }
        )
        at_up = at_back
    done = client.read("done", _CLOSE_TIMEOUT)
    connected["rss_released_kib"] = done["rss_kib"]
    client.finish(_CLOSE_TIMEOUT)
    server.send("quit")
    server.finish(_CLOSE_TIMEOUT)
    return {
        "connected": connected,
        "startup_server": startup_on_server,
        "idle": idle,
        "storms": storms,
        "leftover_tasks": done["leftover_tasks"],
    }


def _per_item_kib(connected: dict[str, Any], count: int) -> float:
    return float(connected["rss_after_kib"] - connected["rss_before_kib"]) / count


def _storm_summary(storm: dict[str, Any], initial: float) -> dict[str, Any]:
    delays: list[float] = storm["delays"]
    scheduled: list[float] = storm["scheduled_delays"]
    return {
        "gc": storm["gc"],
        "all_back_seconds": round(float(storm["all_back_seconds"]), 3),
        "scheduled_spread": round((max(scheduled) - min(scheduled)) / initial, 3),
        "reconnect_spread": round((max(delays) - min(delays)) / initial, 3),
        "gc_longest_pause_seconds": round(float(storm["gc_longest_pause_seconds"]), 4),
        "gc_seconds": round(float(storm["gc_seconds"]), 3),
        "gc_collections": storm["gc_collections"],
        "rss_after_kib": storm["rss_kib"],
        "tracked_objects_per_feed_after": round(float(storm["tracked_objects_per_feed"]), 1),
        "client_cpu_seconds": round(float(storm["cpu_seconds"]), 3),
        "server_cpu_seconds": round(float(storm["server_cpu_seconds"]), 3),
        "dropped_by_server": storm["dropped"],
        "server": storm["server"],
        "reconnect_delay_min_seconds": round(min(delays), 4),
        "reconnect_delay_max_seconds": round(max(delays), 4),
        "scheduled_histogram": _histogram(scheduled, initial),
        "reconnect_histogram": _histogram(delays, initial),
    }


def run_pool(
    counts: list[int],
    idle_seconds: float,
    *,
    connect_rate: float = 1000.0,
    backoff_initial: float = 2.0,
    python: str = sys.executable,
) -> list[dict[str, Any]]:
    """Measure a pool of each of ``counts`` feeds, and as many bare websockets connections.

    For each count, a fresh server and pool process, then a fresh server and
    bare-connections process.

    Args:
        counts: Numbers of feeds, e.g. ``[1000, 10000]``.
        idle_seconds: How long the feeds idle while their CPU is measured.
        connect_rate: The pool's ``connect_rate``, and the bare connections' opening rate.
        backoff_initial: ``Backoff.initial`` of the feeds: the jitter window of the storm.
        python: The interpreter for the child processes; it must import chatfeed.

    Returns:
        One dict per count, in order: ``feeds``, ``pool_rss_per_feed_kib``,
        ``bare_rss_per_connection_kib``, ``rss_ratio`` (pool / bare),
        ``idle_cpu_percent`` (of one core), ``startup_seconds``,
        ``startup_failed_handshakes`` (server side), ``storms`` (as is, then
        after ``gc.freeze()``: ``all_back_seconds``, ``scheduled_spread``,
        ``gc_longest_pause_seconds``, ...) and ``details``.

    Raises:
        RuntimeError: A child failed, or did not answer in time; all are killed.
    """
    results: list[dict[str, Any]] = []
    for count in counts:
        if count < 1:
            raise ValueError(f"feed counts must be positive, not {count}")
        with _children() as start:
            print(f"pool: {count} feeds...", file=sys.stderr, flush=True)
            pool = _run_pool_pair(start, python, count, idle_seconds, connect_rate, backoff_initial)
            print(f"pool: {count} bare websockets connections...", file=sys.stderr, flush=True)
            bare = _run_bare(start, python, count, connect_rate)
        pool_kib = _per_item_kib(pool["connected"], count)
        bare_kib = _per_item_kib(bare["connected"], count)
        idle = pool["idle"]
        connected = pool["connected"]
        results.append(
            {
                "feeds": count,
                "pool_rss_per_feed_kib": round(pool_kib, 2),
                "bare_rss_per_connection_kib": round(bare_kib, 2),
                "rss_ratio": round(pool_kib / bare_kib, 3) if bare_kib > 0 else None,
                "idle_cpu_percent": round(100.0 * float(idle["cpu_seconds"]) / float(idle["wall_seconds"]), 3),
                "startup_seconds": round(float(connected["startup_seconds"]), 3),
                "startup_failed_handshakes": pool["startup_server"]["failed"],
                "storms": [_storm_summary(storm, backoff_initial) for storm in pool["storms"]],
                "details": {
                    "connect_rate": connect_rate,
                    "backoff": _backoff_of(backoff_initial),
                    "idle_seconds": round(float(idle["wall_seconds"]), 3),
                    "idle_cpu_seconds": round(float(idle["cpu_seconds"]), 4),
                    "disconnects_before_drop": idle["early_disconnects"],
                    "startup_server": pool["startup_server"],
                    "startup_failed_attempts_seen_by_pool": connected["failed_attempts"],
                    "startup_connections": connected["connections"],
                    "bare_connect_seconds": round(float(bare["connected"]["connect_seconds"]), 3),
                    "pool_rss_kib": [connected["rss_before_kib"], connected["rss_after_kib"]],
                    "bare_rss_kib": [bare["connected"]["rss_before_kib"], bare["connected"]["rss_after_kib"]],
                    "pool_objects_per_feed": connected["objects_per_feed"],
                    "bare_objects_per_connection": bare["connected"]["objects_per_connection"],
                    "pool_tasks_per_feed": round(connected["tasks_per_feed"], 3),
                    "pool_tracked_objects_per_feed": round(float(connected["tracked_objects_per_feed"]), 1),
                    "pool_rss_released_kib": connected["rss_released_kib"],
                    "bare_tasks_per_connection": round(bare["connected"]["tasks_per_connection"], 3),
                    "leftover_tasks": {"pool": pool["leftover_tasks"], "bare": bare["leftover_tasks"]},
                },
            }
        )
    return results


# Throughput, in this process


def measure_pool_throughput(url: str, feeds: int, frames_per_feed: int, rounds: int) -> dict[str, dict[str, float]]:
    """Frames per second through one async handler: ``feeds`` pool feeds against one client, alternating.

    Each consumer reads ``feeds * frames_per_feed`` frames from the firehose
    server at ``url``; the clock starts once every connection is
    authenticated, and counts the frames handled from then on.

    Returns:
        Medians per consumer (``"client"``, ``"pool"``): ``frames_per_second``
        and ``cpu_us_per_frame``.
    """
    total = feeds * frames_per_feed
    samples: dict[str, list[tuple[float, float]]] = {"client": [], "pool": []}
    for _ in range(rounds):
        samples["client"].append(asyncio.run(_client_throughput(url, total)))
        samples["pool"].append(asyncio.run(_pool_throughput(url, feeds, frames_per_feed)))
    return {
        name: {
            "frames_per_second": statistics.median(rate for rate, _ in values),
            "cpu_us_per_frame": statistics.median(cpu for _, cpu in values),
        }
        for name, values in samples.items()
    }


class _Counting:
    """Counts frames until ``total``; says how many came before the clock started."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.received = 0
        self.done = asyncio.Event()
        self.at_start = 0
        self.started = 0.0
        self.cpu = 0.0

    def start(self) -> None:
        self.at_start, self.started, self.cpu = self.received, time.perf_counter(), _cpu_seconds()

    def count(self) -> None:
        self.received += 1
        if self.received == self.total:
            self.done.set()

    async def result(self) -> tuple[float, float]:
        await self.done.wait()
        elapsed, used = time.perf_counter() - self.started, _cpu_seconds() - self.cpu
        frames = self.total - self.at_start
        if frames == 0:
            raise RuntimeError(f"all {self.total} frames came before the clock started: ask for more")
        return frames / elapsed, used / frames * 1e6


async def _client_throughput(url: str, total: int) -> tuple[float, float]:
    import chatfeed

    counting = _Counting(total)
    client = chatfeed.Client(url, token=f"firehose:{total}", reconnect=False)

    @client.on("new_message")
    async def count_it(event: chatfeed.NewMessage) -> None:
        counting.count()

    async with client:
        counting.start()
        return await counting.result()


async def _pool_throughput(url: str, feeds: int, frames_per_feed: int) -> tuple[float, float]:
    import chatfeed

    counting = _Counting(feeds * frames_per_feed)
    pool = chatfeed.Pool(url, connect_rate=100_000.0, reconnect=False)
    for index in range(feeds):
        pool.add(str(index), token=f"firehose:{frames_per_feed}")

    @pool.on("new_message")
    async def count_it(event: chatfeed.NewMessage, feed: str) -> None:
        counting.count()

    async with pool:
        counting.start()
        return await counting.result()


@contextlib.contextmanager
def _firehose() -> Iterator[str]:
    from throughput import firehose_server

    with firehose_server() as url:
        yield url


# The command line


def _table(results: list[dict[str, Any]], throughput: dict[str, dict[str, float]] | None) -> str:
    header = (
        f"{'feeds':>6} {'pool KiB/feed':>14} {'bare KiB/conn':>14} {'ratio':>6} {'idle CPU %':>10} "
        f"{'start-up s':>10} {'failed handshakes':>17}"
    )
    lines = [header, "-" * len(header)]
    for row in results:
        lines.append(
            f"{row['feeds']:>6} {row['pool_rss_per_feed_kib']:>14} {row['bare_rss_per_connection_kib']:>14} "
            f"{row['rss_ratio']:>6} {row['idle_cpu_percent']:>10} {row['startup_seconds']:>10} "
            f"{row['startup_failed_handshakes']:>17}"
        )
    lines.append("")
    header = (
        f"{'feeds':>6} {'gc':>26} {'all back s':>10} {'drawn':>6} {'longest GC ms':>13} {'GC s':>6} "
        f"{'collections':>16} {'RSS after MiB':>13} {'objects/feed':>12}"
    )
    lines += [header, "-" * len(header)]
    for row in results:
        for storm in row["storms"]:
            lines.append(
                f"{row['feeds']:>6} {storm['gc']:>26} {storm['all_back_seconds']:>10} {storm['scheduled_spread']:>6} "
                f"{storm['gc_longest_pause_seconds'] * 1000:>13.1f} {storm['gc_seconds']:>6} "
                f"{' '.join(map(str, storm['gc_collections'])):>16} {storm['rss_after_kib'] / 1024:>13.1f} "
                f"{storm['tracked_objects_per_feed_after']:>12}"
            )
    lines.append("")
    lines.append(f"Waits drawn, {HISTOGRAM_BUCKETS} buckets over the jitter window; reconnects seen:")
    for row in results:
        for storm in row["storms"]:
            lines.append(
                f"{row['feeds']:>6} {storm['gc']:>26}: drawn {storm['scheduled_histogram']}"
                f" seen {storm['reconnect_histogram']}"
            )
    if throughput is not None:
        client, pool = throughput["client"], throughput["pool"]
        lines.append("")
        lines.append(
            f"throughput: client {client['frames_per_second']:,.0f} frames/s "
            f"({client['cpu_us_per_frame']:.2f} µs/frame), pool {pool['frames_per_second']:,.0f} frames/s "
            f"({pool['cpu_us_per_frame']:.2f} µs/frame): ratio "
            f"{pool['frames_per_second'] / client['frames_per_second']:.3f}"
        )
    return "\n".join(lines)


def _child_main(args: argparse.Namespace) -> int:
    _raise_fd_limit()
    # The last resort against a parent that died without killing us.
    signal.alarm(max(1, math.ceil(args.deadline)))
    try:
        asyncio.run(_measure_pool(args.port, args.count, args.idle or 0.0, args.rate, args.initial))
    except Exception as exc:
        _emit("error", message=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from the command line; also the entry point of its pool processes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="10 feeds, 0.5 s idle: a quick check")
    parser.add_argument("--counts", type=int, nargs="+", metavar="N", help="numbers of feeds (default 1000 10000)")
    parser.add_argument("--no-throughput", action="store_true", help="skip the throughput comparison")
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH")
    # The pool process's options.
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--idle", type=float, metavar="SECONDS", help="idle window (default 40, 0.5 with --smoke)")
    parser.add_argument("--rate", type=float, default=1000.0, help=argparse.SUPPRESS)
    parser.add_argument("--initial", type=float, default=2.0, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=600.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.port is not None:
        return _child_main(args)

    _raise_fd_limit()
    settings = SMOKE if args.smoke else FULL
    counts = args.counts or settings["counts"]
    started = time.monotonic()
    idle_seconds = settings["idle"] if args.idle is None else args.idle
    initial = settings["backoff_initial"]
    results = run_pool(counts, idle_seconds, connect_rate=settings["connect_rate"], backoff_initial=initial)
    rates = None
    if not args.no_throughput:
        with _firehose() as url:
            rates = measure_pool_throughput(url, *settings["throughput"])
    elapsed = time.monotonic() - started
    print(_table(results, rates))
    print(
        f"(connect_rate {settings['connect_rate']:g}/s; idle {idle_seconds:g} s; jitter window [0, {initial:g}] s; "
        f"took {elapsed:.1f} s)"
    )
    output = {"scale": results, "throughput": rates}
    print(json.dumps(output, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(output, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
