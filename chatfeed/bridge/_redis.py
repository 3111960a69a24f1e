"""Redis Streams: the bridge's sink and the consumer's source (the ``redis`` extra: redis-py's asyncio API).

Layout in the database, ``chatfeed`` being the configurable prefix:

- ``chatfeed:{P}`` for P in 0 .. partitions-1: the partition streams. A
  chat's events all go to partition ``partition(feed, chat, partitions)``
  (a stable hash, see `chatfeed.bridge.partition`), each entry with one
  field, ``envelope``. The braces make each partition a Redis Cluster hash
  tag, so that a partition's stream and dedup keys share a slot.
- ``chatfeed:{P}:dedup:<dedup id>``: set when the entry is appended, with a
  TTL (10 minutes by default); one script checks it and appends, atomically.
- ``chatfeed:meta``: the number of partitions and the envelope's version,
  written by the first bridge; a bridge or consumer that disagrees refuses
  to start (changing the count would move chats between partitions).
- ``chatfeed:watermarks``: a hash, feed -> watermark (ISO 8601).
- ``chatfeed:dead:<group>``: the dead letters of a consumer group.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import re
import secrets
import socket
import urllib.parse
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from .._logging import log_fields, redact_url
from ..exceptions import UsageError
from ._bridge import BrokerUnavailableError, FencedError, address_problem
from ._consumer import Delivery
from ._envelope import ENVELOPE_VERSION, Record, partition

__all__ = ["RedisStreamSink", "RedisStreamSource"]

logger = logging.getLogger("chatfeed.bridge")

# KEYS[1]: the partition stream, KEYS[2]: the dedup key, KEYS[3]: the feed's
# lease in a group (else the dedup key again); ARGV[1]: the envelope,
# ARGV[2]: the dedup TTL in ms, ARGV[3]: MAXLEN (0: none), ARGV[4]: what the
# lease must say ("" outside a group): a worker that lost the feed writes nothing.
# Checked first and set last: a failed XADD sets nothing, so the retry appends.
_APPEND = """
if ARGV[4] and ARGV[4] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[4] then
    return redis.error_reply('CHATFEED_FENCED the lease of the feed is held by another worker')
end
if redis.call('EXISTS', KEYS[2]) == 1 then
    return false
end
local id
if ARGV[3] ~= '0' then
    id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'envelope', ARGV[1])
else
    id = redis.call('XADD', KEYS[1], '*', 'envelope', ARGV[1])
end
redis.call('SET', KEYS[2], id, 'PX', ARGV[2])
return id
"""

# KEYS[1]: a partition stream; ARGV: group, consumer, entry id, idle (ms, or
# "" to leave it). Claims the entry again for the consumer, resetting its
# idle time or setting it, only if the consumer still holds it: another
# consumer may have claimed it meanwhile, and then it is that one's.
_RECLAIM_OWN = """
local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #held == 0 then
    return 0
end
if ARGV[4] == '' then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
else
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', ARGV[4], 'JUSTID')
end
return 1
"""

_BATCH = 512
_BLOCK_MS = 250  # the longest a consumer's read waits for new entries


def _redis() -> Any:
    try:
        import redis.asyncio
        import redis.exceptions
    except ImportError:
        raise UsageError("Redis Streams need redis-py: pip install 'chatfeed[redis]'") from None
    return redis


def _check_url(url: object) -> None:
    """Raise `UsageError` unless ``url`` is a Redis URL that means what it says.

    redis-py reads a database that is not a number as database 0, and a bad
    port only when it connects, as if the server were away: refused here,
    before any connection, so that a typo is bad usage and is not retried.
    """
    if not isinstance(url, str):
        raise UsageError(f"a Redis URL is a str, not {type(url).__name__}")
    problem = _url_problem(url)
    if problem is not None:
        raise UsageError(f"not a Redis URL: {redact_url(url)} ({problem})")


def _url_problem(url: str) -> str | None:
    scheme, found, _ = url.partition("://")
    if found and scheme.lower() in ("redis", "rediss", "unix") and scheme not in ("redis", "rediss", "unix"):
        return "its scheme must be lowercase"
    if not found or scheme not in ("redis", "rediss", "unix"):
        return "it starts with redis://, rediss:// or unix://"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # an unclosed [ of an IPv6 address
        return "its host cannot be read"
    if scheme == "unix":
        return None if parts.path else "it has no socket path"
    problem = address_problem(parts)
    if problem is not None:
        return problem
    if not re.fullmatch(r"/?[0-9]*", parts.path):
        return "its database, after the port, is not a number"
    return None


async def _connect(url: str, connect_timeout: float, command_timeout: float) -> Any:
    _check_url(url)
    redis = _redis()
    # A server that stops answering (frozen, partitioned) fails the command
    # after command_timeout: publishes are retried, close() ends.
    try:
        client = redis.asyncio.from_url(url, socket_connect_timeout=connect_timeout, socket_timeout=command_timeout)
    except ValueError as exc:
        raise UsageError(f"not a Redis URL: {redact_url(url)} ({exc})") from None
    refused: str | None = None
    try:
        await client.ping()
    except (redis.exceptions.AuthenticationError, redis.exceptions.ResponseError, ValueError) as exc:
        # A wrong password, a database that does not exist, a port out of
        # range: trying again would not help.
        refused = f"Redis at {redact_url(url)} refused the connection: {type(exc).__name__}: {exc}"
    except (OSError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        await client.aclose()
        raise BrokerUnavailableError(f"cannot reach Redis at {redact_url(url)} ({type(exc).__name__})") from None
    if refused is not None:
        await client.aclose()
        raise UsageError(refused)
    return client


async def _check_meta(client: Any, prefix: str, partitions: int | None, *, write: bool) -> int:
    """Return the partition count recorded under ``<prefix>:meta``, recording ``partitions`` first if none is."""
    key = f"{prefix}:meta"
    if write and partitions is not None:
        await client.hsetnx(key, "partitions", partitions)
        await client.hsetnx(key, "version", ENVELOPE_VERSION)
    recorded, version = await client.hmget(key, ["partitions", "version"])
    if version is not None and int(version) != ENVELOPE_VERSION:
        raise UsageError(
            f"{key} says the envelopes are of version {int(version)}; this chatfeed reads and writes {ENVELOPE_VERSION}"
        )
    if recorded is None:
        if partitions is None:
            raise BrokerUnavailableError(f"Redis has no {key}: start the bridge first, or give the partition count")
        return partitions
    count = int(recorded)
    if partitions is not None and count != partitions:
        raise UsageError(f"{key} says {count} partitions, not {partitions}: changing the count would reorder chats")
    return count


class RedisStreamSink:
    """A [`Sink`][chatfeed.bridge.Sink] into Redis Streams, one stream per partition.

    Publishes are pipelined: the records that are ready while one round
    trip is under way go together in the next (at most 512 at once).

    Args:
        url: The Redis server, ``redis://host:6379/0`` (a password in the URL is never logged).
        prefix: The prefix of every key.
        partitions: The number of partition streams; fixed once written.
        dedup_ttl: Seconds a dedup id is remembered.
        maxlen: Trim each partition stream to about this many entries (``None``: never).
        connect_timeout: Seconds to wait for the server at start.
        command_timeout: Seconds to wait for an answer before a command fails (and is retried).
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "chatfeed",
        partitions: int = 16,
        dedup_ttl: float = 600.0,
        maxlen: int | None = None,
        connect_timeout: float = 2.0,
        command_timeout: float = 10.0,
    ) -> None:
        _redis()
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise UsageError(f"partitions must be a positive int, not {partitions!r}")
        if not prefix:
            raise UsageError("prefix must be a non-empty str")
        self.url = url
        self.prefix = prefix
        self.partitions = partitions
        self.dedup_ttl = dedup_ttl
        self.maxlen = maxlen
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._client: Any = None
        self._sha = ""
        self._queue: list[tuple[Record, asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<RedisStreamSink {redact_url(self.url)} prefix={self.prefix} partitions={self.partitions}>"

    def stream(self, record: Record) -> str:
        """Return the partition stream of ``record``."""
        return f"{self.prefix}:{{{partition(record.feed, record.chat, self.partitions)}}}"

    async def open(self) -> None:
        self._client = await _connect(self.url, self.connect_timeout, self.command_timeout)
        try:
            await _check_meta(self._client, self.prefix, self.partitions, write=True)
            self._sha = await self._client.script_load(_APPEND)
        except BaseException:
            await self.close()
            raise

    async def publish(self, record: Record) -> bool:
        if self._client is None:
            raise BrokerUnavailableError("the sink is closed")
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append((record, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush(), name="chatfeed-redis-pipeline")
        return await future

    async def _flush(self) -> None:
        # One round trip at a time: what is queued meanwhile goes in the next.
        # Never raises: every record's future gets its result or its error.
        redis = _redis()
        ttl = str(int(self.dedup_ttl * 1000))
        maxlen = str(self.maxlen or 0)
        prefix = self.prefix
        partitions = self.partitions
        client = self._client
        while self._queue and client is not None:
            batch, self._queue = self._queue[:_BATCH], self._queue[_BATCH:]
            unscripted: list[tuple[Record, asyncio.Future[bool]]] = []
            try:
                pipe = client.pipeline(transaction=False)
                for record, _ in batch:
                    stream = f"{prefix}:{{{partition(record.feed, record.chat, partitions)}}}"
                    dedup = f"{stream}:dedup:{record.dedup}"
                    lease, holder = record.fence or (dedup, "")
                    pipe.evalsha(self._sha, 3, stream, dedup, lease, record.data, ttl, maxlen, holder)
                results = await pipe.execute(raise_on_error=False)
                for item, result in zip(batch, results, strict=True):
                    future = item[1]
                    if future.done():
                        continue
                    if isinstance(result, redis.exceptions.NoScriptError):
                        unscripted.append(item)  # a restarted server forgot the script
                    elif isinstance(result, Exception):
                        fenced = str(result).startswith("CHATFEED_FENCED")
                        future.set_exception(FencedError(str(result)[16:]) if fenced else result)
                    else:
                        future.set_result(result is not None)
                if unscripted:
                    self._sha = await client.script_load(_APPEND)
                    self._queue[:0] = unscripted
            except Exception as exc:
                for _, future in (*batch, *unscripted):
                    if not future.done():
                        future.set_exception(exc)

    async def load_watermarks(self, feeds: Sequence[str]) -> dict[str, datetime]:
        if not feeds:
            return {}
        values = await self._client.hmget(f"{self.prefix}:watermarks", list(feeds))
        marks = {}
        for feed, value in zip(feeds, values, strict=True):
            if value is not None:
                try:
                    marks[feed] = datetime.fromisoformat(value.decode())
                except ValueError:
                    logger.warning("ignored the unreadable watermark of feed %r", feed, extra=log_fields(feed))
        return marks

    async def save_watermarks(self, marks: Mapping[str, datetime]) -> None:
        if marks:
            await self._client.hset(
                f"{self.prefix}:watermarks", mapping={feed: mark.isoformat() for feed, mark in marks.items()}
            )

    async def close(self) -> None:
        flusher, self._flusher = self._flusher, None
        if flusher is not None and not flusher.done():
            flusher.cancel()
            await asyncio.wait([flusher])
        for _, future in self._queue:
            if not future.done():
                future.set_exception(BrokerUnavailableError("the sink closed"))
        self._queue = []
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


class _RedisDelivery:
    __slots__ = ("_source", "attempt", "data", "entry", "position", "stream")

    def __init__(self, source: RedisStreamSource, stream: str, entry: str, fields: dict[bytes, bytes], attempt: int):
        self._source = source
        self.stream = stream
        self.entry = entry
        self.data: bytes = fields.get(b"envelope", b"")
        self.attempt = attempt
        self.position = f"{stream}#{entry}"

    async def ack(self) -> None:
        await self._source._client.xack(self.stream, self._source.group, self.entry)

    async def retry(self, delay: float) -> None:
        source = self._source
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        heapq.heappush(source._retries, (due, next(source._order), self.stream, self.entry, self.attempt, delay))

    async def extend(self) -> None:
        source = self._source
        await source._reclaim(keys=[self.stream], args=[source.group, source.name, self.entry, ""])

    async def release(self) -> None:
        # Redis has no "not acknowledged": the entry stays pending with this
        # consumer, made idle for claim_after already, so that another
        # consumer of the group claims it at its next look.
        source = self._source
        idle = str(int(source.claim_after * 1000))
        await source._reclaim(keys=[self.stream], args=[source.group, source.name, self.entry, idle])

    async def dead_letter(self, reason: str) -> None:
        source = self._source
        # Not a transaction: the two keys may be in different cluster slots.
        # Stopped between the two, the event comes back and is dead-lettered again.
        async with source._client.pipeline(transaction=False) as pipe:
            pipe.xadd(
                source.dead_stream,
                {"envelope": self.data, "reason": reason[:500], "position": self.position, "group": source.group},
            )
            pipe.xack(self.stream, source.group, self.entry)
            await pipe.execute()


class RedisStreamSource:
    """A consumer's reader of the partition streams: a consumer group, shared by every process of that name.

    A failed event stays pending in the group; it is claimed again (its
    delivery count goes up) after the retry delay. The events pending with
    a consumer that went away are claimed by another after ``claim_after``.

    Args:
        url: The Redis server.
        durable: The consumer group's name.
        prefix: The bridge's key prefix.
        partitions: The partition count, when ``<prefix>:meta`` does not say it yet.
        name: This process's consumer name in the group (default: host, pid and a random suffix).
        claim_after: Seconds an event may stay idle, pending with another
            consumer, before it is claimed (a consumer keeps the events it
            handles from going idle, however long its handlers take).
        connect_timeout: Seconds to wait for the server at start.
        command_timeout: Seconds to wait for an answer before a command fails.
    """

    def __init__(
        self,
        url: str,
        durable: str,
        *,
        prefix: str = "chatfeed",
        partitions: int | None = None,
        name: str | None = None,
        claim_after: float = 30.0,
        connect_timeout: float = 2.0,
        command_timeout: float = 10.0,
    ) -> None:
        _redis()
        if not prefix:
            raise UsageError("prefix must be a non-empty str")
        self.command_timeout = max(command_timeout, 2.0)  # longer than a fetch's block
        self.url = url
        self.group = durable
        self.prefix = prefix
        self.partitions = partitions
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.claim_after = claim_after
        self.connect_timeout = connect_timeout
        self.dead_stream = f"{prefix}:dead:{durable}"
        self._client: Any = None
        self._streams: dict[str, str] = {}
        self._stream_names: list[str] = []
        self._turn = 0  # the partition the next small read starts at
        # Failed entries to claim again: (due, order, stream, entry id, attempt, delay).
        self._retries: list[tuple[float, int, str, str, int, float]] = []
        # Per stream not yet swept: where the sweep of the entries a previous
        # run under this name left pending goes on from.
        self._own_left: dict[str, str] = {}
        self._order = iter(range(1 << 62))
        self._next_claim = 0.0
        self._reclaim: Any = None

    def __repr__(self) -> str:
        return f"<RedisStreamSource {redact_url(self.url)} prefix={self.prefix} group={self.group}>"

    async def open(self) -> None:
        redis = _redis()
        self._client = await _connect(self.url, self.connect_timeout, self.command_timeout)
        try:
            count = await _check_meta(self._client, self.prefix, self.partitions, write=False)
            self._streams = {f"{self.prefix}:{{{index}}}": ">" for index in range(count)}
            self._stream_names = list(self._streams)
            self._own_left = dict.fromkeys(self._streams, "-")
            self._reclaim = self._client.register_script(_RECLAIM_OWN)
            for stream in self._streams:
                try:
                    await self._client.xgroup_create(stream, self.group, id="0", mkstream=True)
                except redis.exceptions.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
        except BaseException:
            await self.close()
            raise

    async def fetch(self, count: int) -> list[Delivery]:
        deliveries: list[Delivery] = []
        loop = asyncio.get_running_loop()
        now = loop.time()
        retries = self._retries
        while retries and retries[0][0] <= now and len(deliveries) < count:
            _, _, stream, entry, attempt, delay = heapq.heappop(retries)
            # Idle at least as long as the delay: unless another consumer
            # claimed it meanwhile (then it is that one's to handle).
            deliveries.extend(await self._claim(stream, [entry], int(delay * 1000), {entry: attempt}))
        if self._own_left and len(deliveries) < count:
            deliveries.extend(await self._reclaim_own(count - len(deliveries)))
        if now >= self._next_claim and len(deliveries) < count:
            self._next_claim = now + min(self.claim_after, 5.0)
            deliveries.extend(await self._claim_abandoned(count - len(deliveries)))
        if deliveries:
            return deliveries
        # Short blocks: a retry scheduled meanwhile (by a handler that fails
        # while this waits) is due soon after its delay.
        block = _BLOCK_MS if not retries else max(1, min(_BLOCK_MS, int((retries[0][0] - now) * 1000)))
        # COUNT applies to each stream: the read is shared out so that it
        # stays within ``count``; with less room than partitions, it reads
        # one entry from each of ``count`` partitions, taking turns.
        streams = self._stream_names
        if count >= len(streams):
            chosen, per_stream = self._streams, count // len(streams)
        else:
            first = self._turn % len(streams)
            self._turn += count
            chosen = {streams[(first + offset) % len(streams)]: ">" for offset in range(count)}
            per_stream = 1
        answer = await self._client.xreadgroup(self.group, self.name, chosen, count=per_stream, block=block)
        for stream, entries in answer or ():
            name = stream.decode() if isinstance(stream, bytes) else stream
            for entry, fields in entries:
                deliveries.append(_RedisDelivery(self, name, _text(entry), fields, 1))
        return deliveries

    async def _claim(self, stream: str, entries: list[str], idle_ms: int, attempts: dict[str, int]) -> list[Delivery]:
        claimed = await self._client.xclaim(stream, self.group, self.name, idle_ms, entries)
        return [
            _RedisDelivery(self, stream, _text(entry), fields, attempts[_text(entry)] + 1)
            for entry, fields in claimed
            if fields is not None
        ]

    async def _reclaim_own(self, count: int) -> list[Delivery]:
        """Claim, a batch at a time, what a previous run under this consumer name left pending."""
        found: list[Delivery] = []
        for stream, start in list(self._own_left.items()):
            pending = await self._client.xpending_range(stream, self.group, start, "+", count, consumername=self.name)
            if len(pending) < count:
                del self._own_left[stream]  # swept
            else:
                self._own_left[stream] = "(" + _text(pending[-1]["message_id"])
            candidates = {_text(item["message_id"]): item["times_delivered"] for item in pending}
            if candidates:
                found.extend(await self._claim(stream, list(candidates), 0, candidates))
            count -= len(pending)
            if count <= 0:
                break
        return found

    async def _claim_abandoned(self, count: int) -> list[Delivery]:
        """Claim the entries idle too long with other consumers (gone, or stuck)."""
        idle = int(self.claim_after * 1000)
        found: list[Delivery] = []
        for stream in self._streams:
            pending = await self._client.xpending_range(stream, self.group, "-", "+", count, idle=idle)
            candidates = {
                _text(item["message_id"]): item["times_delivered"]
                for item in pending
                if _text(item["consumer"]) != self.name
            }
            if candidates:
                found.extend(await self._claim(stream, list(candidates), idle, candidates))
            if len(found) >= count:
                break
        return found

    async def close(self) -> None:
        client, self._client = self._client, None
        self._retries.clear()
        if client is not None:
            await client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
