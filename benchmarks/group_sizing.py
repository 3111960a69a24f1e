"""Worker group sizing: what a group's leases and heartbeats cost its broker.

The figures of the sizing section of docs/bridge/deployment.md. Against a
real nats-server (JetStream) and redis-server, each started on loopback by
`chatfeed.bridge.testing`, with the coordinators a ``chatfeed bridge --group``
uses (`chatfeed.bridge.JetStreamCoordinator`, `chatfeed.bridge.RedisCoordinator`):

- acquire N leases in batches of 100, overlapped (as a group's round does),
  then N more in another group one after the other;
- the broker's storage for the N leases: JetStream, the bytes of the stream
  ``KV_<group>-leases``; Redis, the ``used_memory`` delta of ``INFO memory``;
- renew the N leases one await after the other, then in batches of 100
  (as a round does), and the broker process's CPU time for each
  (user + system, from ``/proc/<pid>/stat``);
- ``holders()`` over the N leases (what ``chatfeed bridge --status`` reads);
- ``workers()`` with W workers heartbeating, and one heartbeat.

Then it prints a table and, on paper, what 100 workers x 10,000 feeds at a
10 s ttl would ask of one broker. The leases are made with a ttl of 600 s so
that none expires while being measured: an operation's cost does not depend
on the ttl. Feeds are named like real ones (``user-000001``), the worker like
the default name (host, process id, random suffix).

Usage:
    ``python benchmarks/group_sizing.py`` (10,000 leases, 100 workers),
    ``python benchmarks/group_sizing.py --smoke`` (200 leases, 10 workers), or
    ``--leases N --workers W``; ``--json PATH`` also writes the results. Linux
    only (``/proc``). A broker whose server binary or Python client is
    missing is skipped, with a line saying so, unless ``CI`` is set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from bridge import BROKERS, _missing

__all__ = ["FULL", "SMOKE", "run_group_sizing", "sizing_report"]

FULL: dict[str, int] = {"leases": 10_000, "workers": 100}
SMOKE: dict[str, int] = {"leases": 200, "workers": 10}

MEASURE_TTL = 600.0
"""The leases' ttl while measured: long enough that none expires meanwhile."""
BATCH = 100
"""Requests overlapped at a time, as a group's round does (``_RENEW_BATCH``)."""
WORKER = "bridge-7f3c9-12345-ab12"
"""A worker's name shaped like the default one: host, process id, random suffix."""
GROUPS = ("group-a", "group-b")
"""The groups' names: 7 characters, as ``bridges``; the same length, since it is in every lease's subject."""
BATCHED, ONE_BY_ONE = GROUPS
WORKERS_ROUNDS = 20
"""Times ``workers()`` is read; the median and the longest are reported."""

_T = TypeVar("_T")


def feed_key(index: int) -> str:
    """Return the ``index``-th feed's key, shaped like a real one (11 characters)."""
    return f"user-{index:06d}"


def _cpu_seconds(pid: int | None) -> float:
    """Return the CPU seconds (user + system) process ``pid`` has used, from /proc; NaN without one."""
    if pid is None:
        return float("nan")
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        # The command's name, in parentheses, may hold spaces: count the fields after it.
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _timed(awaitable: Awaitable[_T]) -> tuple[float, _T]:
    started = time.perf_counter()
    result = await awaitable
    return time.perf_counter() - started, result


async def _batched(call: Callable[[Any], Awaitable[_T]], items: list[Any]) -> list[_T]:
    """Call ``call`` on every item, ``BATCH`` of them overlapped at a time, as a group's round does."""
    results: list[_T] = []
    for start in range(0, len(items), BATCH):
        results += await asyncio.gather(*(call(item) for item in items[start : start + BATCH]))
    return results


async def _one_by_one(call: Callable[[Any], Awaitable[_T]], items: list[Any]) -> list[_T]:
    return [await call(item) for item in items]


class _Storage:
    """Read what the broker stores for a group, through a client of its own."""

    def __init__(self, broker: str, url: str) -> None:
        self.broker = broker
        self.url = url
        self._client: Any = None

    async def __aenter__(self) -> _Storage:
        if self.broker == "jetstream":
            import nats

            self._client = await nats.connect(self.url)
        else:
            import redis.asyncio

            self._client = redis.asyncio.Redis.from_url(self.url)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.broker == "jetstream":
            await self._client.close()
        else:
            await self._client.aclose()

    async def bytes(self, group: str) -> int:
        """JetStream: the bytes of the group's leases stream; Redis: the server's whole ``used_memory``."""
        if self.broker == "jetstream":
            info = await self._client.jetstream().stream_info(f"KV_{group}-leases")
            return int(info.state.bytes)
        memory = await self._client.info("memory")
        return int(memory["used_memory"])


def _coordinator(broker: str, url: str, group: str) -> Any:
    from chatfeed.bridge import JetStreamCoordinator, RedisCoordinator

    if broker == "jetstream":
        return JetStreamCoordinator(url, group, ttl=MEASURE_TTL)
    return RedisCoordinator(url, group, ttl=MEASURE_TTL)


async def measure(broker: str, url: str, pid: int | None, leases_count: int, workers_count: int) -> dict[str, Any]:
    """Measure one broker's coordinator; return its figures, in seconds, bytes and counts."""
    result: dict[str, Any] = {"leases": leases_count, "workers": workers_count}
    feeds = [feed_key(index) for index in range(leases_count)]
    coordinator = _coordinator(broker, url, BATCHED)
    other = _coordinator(broker, url, ONE_BY_ONE)
    await coordinator.open()
    await other.open()
    try:
        async with _Storage(broker, url) as storage:
            # Stored by the acquisitions one by one: one connection. Batched, redis-py opens one per
            # request in flight, and their buffers would count in the server's used_memory.
            await other.acquire("warm-up", WORKER)  # the script loaded, the connection made: not counted
            before = await storage.bytes(ONE_BY_ONE)
            result["acquire_one_by_one_s"], taken = await _timed(
                _one_by_one(lambda feed: other.acquire(feed, WORKER), feeds)
            )
            result["storage_bytes"] = await storage.bytes(ONE_BY_ONE) - before
            result["acquire_batched_s"], leases = await _timed(
                _batched(lambda feed: coordinator.acquire(feed, WORKER), feeds)
            )
            if any(lease is None for lease in [*taken, *leases]):
                raise RuntimeError(f"{broker}: a lease of a fresh group was somebody's")
            cpu = _cpu_seconds(pid)
            result["renew_one_by_one_s"], renewed = await _timed(_one_by_one(coordinator.renew, leases))
            result["broker_cpu_one_by_one_s"] = _cpu_seconds(pid) - cpu
            cpu = _cpu_seconds(pid)
            result["renew_batched_s"], renewed_again = await _timed(_batched(coordinator.renew, leases))
            result["broker_cpu_batched_s"] = _cpu_seconds(pid) - cpu
            if not all(renewed) or not all(renewed_again):
                raise RuntimeError(f"{broker}: a renewal failed with nobody else in the group")
            if broker == "jetstream":  # one entry per key (history=1), its latest: renewals rewrite it
                result["storage_bytes_renewed"] = await storage.bytes(BATCHED)  # only these leases in it
        result["holders_s"], held = await _timed(coordinator.holders())
        if len(held) != leases_count:
            raise RuntimeError(f"{broker}: holders() saw {len(held)} leases of {leases_count}")
        names = [f"worker-{index:03d}" for index in range(workers_count)]
        await _batched(coordinator.join, names)
        times = []
        for _ in range(WORKERS_ROUNDS):
            elapsed, live = await _timed(coordinator.workers())
            times.append(elapsed)
            if len(live) != workers_count:
                raise RuntimeError(f"{broker}: workers() saw {len(live)} workers of {workers_count}")
        result["workers_median_s"] = statistics.median(times)
        result["workers_max_s"] = max(times)
        joins, _ = await _timed(_one_by_one(coordinator.join, names))
        result["join_s"] = joins / workers_count
    finally:
        await coordinator.close()
        await other.close()
    return result


def run_group_sizing(settings: dict[str, int]) -> dict[str, Any]:
    """Measure every broker that can be measured here, each in a server of its own.

    Args:
        settings: ``leases`` and ``workers``.

    Returns:
        ``settings``, ``load`` (the 1-minute load average before and after),
        ``skipped`` (broker -> why), and per broker measured its figures.

    Raises:
        RuntimeError: A coordinator misbehaved; or, with ``CI`` set, a broker is missing.
    """
    from chatfeed.bridge.testing import NatsServer, RedisServer

    results: dict[str, Any] = {"settings": settings, "skipped": {}, "load": [os.getloadavg()[0]]}
    for broker, label in BROKERS.items():
        reason = _missing(broker)
        if reason is not None:
            if os.environ.get("CI"):
                raise RuntimeError(f"group sizing: {label}: {reason}, and CI is set")
            print(f"group sizing: {label} skipped: {reason}", flush=True)
            results["skipped"][broker] = reason
            continue
        print(f"group sizing: {label}, {settings['leases']:,} leases, {settings['workers']} workers", flush=True)
        with NatsServer() if broker == "jetstream" else RedisServer() as server:
            results[broker] = asyncio.run(
                measure(broker, server.url, server.pid, settings["leases"], settings["workers"])
            )
    results["load"].append(os.getloadavg()[0])
    return results


def sizing_report(results: dict[str, Any]) -> list[str]:
    """Return the figures as a Markdown table, and the on-paper lines, as lines."""
    measured = [broker for broker in BROKERS if broker in results]
    if not measured:
        return ["No broker measured."]
    leases = results["settings"]["leases"]
    workers = results["settings"]["workers"]

    def row(label: str, cell: Callable[[dict[str, Any]], str]) -> str:
        return f"| {label} | " + " | ".join(cell(results[broker]) for broker in measured) + " |"

    def per(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda figures: f"{figures[key] / figures['leases'] * 1e6:.0f} µs"

    lines = [
        f"{leases:,} leases, {workers} workers; load average {results['load'][0]:.1f} before, "
        f"{results['load'][1]:.1f} after:",
        "",
        "| | " + " | ".join(BROKERS[broker] for broker in measured) + " |",
        "|---|" + "---|" * len(measured),
        row(
            f"Acquire {leases:,} leases in batches of {BATCH} (as a round does)",
            lambda f: f"{f['acquire_batched_s']:.2f} s",
        ),
        row(f"Acquire {leases:,} leases one after the other", lambda f: f"{f['acquire_one_by_one_s']:.2f} s"),
        row(f"Renew {leases:,} leases one await each", lambda f: f"{f['renew_one_by_one_s']:.2f} s"),
        row(
            f"Renew {leases:,} leases in batches of {BATCH} (as a round does)",
            lambda f: f"{f['renew_batched_s']:.2f} s",
        ),
        row("Broker CPU per renewal, one by one", per("broker_cpu_one_by_one_s")),
        row("Broker CPU per renewal, batched", per("broker_cpu_batched_s")),
        row(
            "Storage per lease",
            lambda f: (
                f"{f['storage_bytes'] / f['leases']:.0f} bytes"
                + (f" ({f['storage_bytes_renewed'] / f['leases']:.0f} renewed)" if "storage_bytes_renewed" in f else "")
            ),
        ),
        row(f"`workers()` with {workers} workers, median (longest)", _workers_cell),
        row("One heartbeat (`join`)", lambda f: f"{f['join_s'] * 1000:.2f} ms"),
        row(f"`holders()` over {leases:,} leases", lambda f: f"{f['holders_s']:.2f} s"),
    ]
    for broker in BROKERS:
        if broker in results["skipped"]:
            lines.append(f"\n{BROKERS[broker]} skipped: {results['skipped'][broker]}")
    return [*lines, "", *_on_paper(results, measured)]


def _workers_cell(figures: dict[str, Any]) -> str:
    return f"{figures['workers_median_s'] * 1000:.1f} ms ({figures['workers_max_s'] * 1000:.1f} ms)"


def _on_paper(
    results: dict[str, Any], measured: list[str], *, workers: int = 100, feeds: int = 10_000, ttl: float = 10.0
) -> list[str]:
    """What ``workers`` x ``feeds`` leases of ``ttl`` seconds would ask of one broker, by the measured figures."""
    leases = workers * feeds
    round_s = ttl / 3
    rate = leases / round_s
    lines = [
        f"On paper: {workers} workers x {feeds:,} feeds = {leases:,} leases, ttl {ttl:g} s, "
        f"a round every ttl/3 = {round_s:.2f} s: {rate:,.0f} renewals per second.",
    ]
    share = feeds / (workers - 1)  # a dead worker's feeds, per survivor
    for broker in measured:
        figures = results[broker]
        scale = feeds / figures["leases"]
        cpu = figures["broker_cpu_batched_s"] / figures["leases"]
        round_renewals = figures["renew_batched_s"] * scale
        lines += [
            f"- {BROKERS[broker]}: one worker's round renews {feeds:,} leases in {round_renewals:.2f} s "
            f"({'within' if round_renewals < ttl / 6 else 'NOT within'} ttl/6 = {ttl / 6:.2f} s, "
            "beyond which its feeds stall between renewals); "
            f"{cpu * rate:.1f} broker cores at {cpu * 1e6:.0f} µs a renewal; "
            f"storage {figures['storage_bytes'] / figures['leases'] * leases / 1e6:,.0f} MB; "
            f"`holders()` {figures['holders_s'] * leases / figures['leases']:,.0f} s; "
            f"a survivor acquires its {share:.0f} of a dead worker's feeds in about "
            f"{figures['acquire_batched_s'] / figures['leases'] * share * 1000:.0f} ms.",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the measurement from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="200 leases, 10 workers: a quick check")
    parser.add_argument("--leases", type=int, help="leases (default 10,000)")
    parser.add_argument("--workers", type=int, help="heartbeating workers (default 100)")
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH")
    args = parser.parse_args(argv)
    settings = dict(SMOKE if args.smoke else FULL)
    for name in ("leases", "workers"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                parser.error(f"--{name} must be at least 1")
            settings[name] = value
    print(f"{platform.node()}: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}")
    started = time.monotonic()
    results = run_group_sizing(settings)
    print("\n".join(sizing_report(results)))
    print(f"(took {time.monotonic() - started:.1f} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
