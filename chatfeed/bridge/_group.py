"""Worker groups: heartbeats and leases per feed, kept in the broker the bridge publishes to.

A `Coordinator` keeps, for one group:

- the live workers: each heartbeats (`join`) at least every ``ttl / 3``;
  one that stops is gone after ``ttl``;
- one lease per feed: `acquire` succeeds only when nobody holds the feed,
  `renew` only for the holder, `release` only by the holder. A lease expires
  ``ttl`` after its last renewal. Each acquisition of a feed gets a larger
  ``token`` than any before it (the fencing token): a sink can refuse the
  publishes of an older one.

JetStream keeps them in two key-value buckets whose entries age out after
``ttl`` (a renewal writes the entry again, compare-and-set on its revision;
the token is the revision of the acquisition). Redis keeps heartbeats in a
hash of expiry times and leases in keys with ``PX``, behind scripts that
compare before they set (the token comes from a counter per feed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import socket
import time
import urllib.parse
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Protocol

from .._config import TokenSource
from .._logging import log_fields, redact_url
from ..exceptions import UsageError
from ._assign import owner
from ._envelope import subject_token

__all__ = ["Coordinator", "Group", "JetStreamCoordinator", "Lease", "RedisCoordinator"]

logger = logging.getLogger("chatfeed.bridge")


@dataclasses.dataclass
class Lease:
    """A worker's hold on one feed.

    Attributes:
        feed: The feed's key.
        worker: The holder.
        token: The fencing token: larger for every later acquisition of the feed.
        revision: The broker's version of the lease, for compare-and-set (JetStream).
    """

    feed: str
    worker: str
    token: int
    revision: int = 0


class Coordinator(Protocol):
    """Heartbeats and per-feed leases of one group of bridge workers."""

    async def open(self, *, create: bool = True) -> None:
        """Connect; with ``create``, set the group up if it is new."""

    async def join(self, worker: str) -> None:
        """Say ``worker`` is alive, for ``ttl`` more seconds."""

    async def leave(self, worker: str) -> None:
        """Say ``worker`` is gone (on a planned stop)."""

    async def workers(self) -> list[str]:
        """The live workers, sorted."""

    async def acquire(self, feed: str, worker: str) -> Lease | None:
        """Take ``feed`` for ``worker`` if nobody holds it; ``None`` if somebody does."""

    async def renew(self, lease: Lease) -> bool:
        """Extend ``lease`` by ``ttl``; False if it is no longer the holder's (expired, taken)."""

    async def release(self, lease: Lease) -> None:
        """Let go of ``lease``, if it is still the holder's."""

    async def holders(self) -> dict[str, tuple[str, int]]:
        """Every held feed: its holder and fencing token."""

    async def ages(self) -> dict[str, float]:
        """Every held feed: seconds since its lease was taken or last renewed."""

    async def announce_ready(self, feed: str, worker: str) -> None:
        """Say ``worker`` has ``feed`` connected and waits for its lease (make before break)."""

    async def ready_for(self, feed: str) -> str | None:
        """The worker that announced it is ready to take ``feed``, if any (for ``ttl``)."""

    async def close(self) -> None: ...


def _check(group: str, ttl: float) -> None:
    if not isinstance(group, str) or not group or not all(char.isalnum() or char in "-_" for char in group):
        raise UsageError(f"a group's name is letters, digits, '-' and '_', not {group!r}")
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < float("inf"):
        raise UsageError(f"ttl must be a positive number of seconds, not {ttl!r}")


def _key(feed: str) -> str:
    # A key-value key: letters, digits, '-', '_', '=' and '.'; '=' escapes the rest.
    return subject_token(feed).replace("%", "=")


def _feed_of(key: str) -> str:
    """The feed of a key-value key: `_key` undone."""
    if key == "=":  # the empty string (a pool never has such a feed)
        return ""
    return urllib.parse.unquote(key.replace("=", "%"), errors="surrogatepass")


class JetStreamCoordinator:
    """A `Coordinator` in two JetStream key-value buckets, ``<group>-workers`` and ``<group>-leases``.

    Args:
        url: The NATS server.
        group: The group's name.
        ttl: Seconds a heartbeat or a lease lasts without renewal.
    """

    def __init__(self, url: str, group: str, *, ttl: float = 10.0) -> None:
        _check(group, ttl)
        self.url = url
        self.group = group
        self.ttl = float(ttl)
        self._nc: Any = None
        self._workers: Any = None
        self._leases: Any = None
        self._ready: Any = None

    async def open(self, *, create: bool = True) -> None:
        """Connect; with ``create``, make the group's buckets if missing and check their ttl.

        Raises:
            UsageError: The group keeps its leases for another ttl; or, without
                ``create``, the group does not exist.
        """
        from ._nats import _connect, _nats

        nats = _nats()
        self._nc = await _connect(self.url, f"chatfeed-group-{self.group}", 2.0)
        # The buckets' requests (the rounds') wait at most ttl / 2; making a
        # bucket may take a loaded server longer than that.
        js = self._nc.jetstream(timeout=_request_timeout(self.ttl))
        slow = self._nc.jetstream(timeout=max(_request_timeout(self.ttl), 5.0))
        buckets = []
        for name in (f"{self.group}-workers", f"{self.group}-leases", f"{self.group}-ready"):
            try:
                bucket = await js.key_value(name)
            except nats.js.errors.BucketNotFoundError:
                if not create:
                    await self.close()
                    raise UsageError(f"there is no group {self.group} at {redact_url(self.url)}") from None
                await slow.create_key_value(bucket=name, history=1, ttl=self.ttl)
                bucket = await js.key_value(name)
            if not create:
                buckets.append(bucket)
                continue
            ttl = (await bucket.status()).ttl
            if ttl is not None and abs(ttl - self.ttl) > 0.001:
                await self.close()
                raise UsageError(
                    f"the group {self.group} keeps its leases for {ttl:g} s, not {self.ttl:g} s: "
                    "every worker of a group needs the same ttl"
                )
            buckets.append(bucket)
        self._workers, self._leases, self._ready = buckets

    async def announce_ready(self, feed: str, worker: str) -> None:
        await self._ready.put(_key(feed), worker.encode())

    async def ready_for(self, feed: str) -> str | None:
        nats = _nats_module()
        try:
            entry = await self._ready.get(_key(feed))
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value.decode() if entry.value else None

    async def join(self, worker: str) -> None:
        await self._workers.put(_key(worker), worker.encode())

    async def leave(self, worker: str) -> None:
        await self._workers.delete(_key(worker))

    async def _keys(self, bucket: str) -> list[str]:
        """Return the keys of one of the group's buckets, from its stream's subjects.

        Not nats-py's ``keys()``: it lists through a consumer, and misses a
        key written while it lists (every round writes the workers' and the
        leases'); a worker that missed the others would think itself alone.
        """
        nats = _nats_module()
        subject = f"$KV.{self.group}-{bucket}."
        api = f"$JS.API.STREAM.INFO.KV_{self.group}-{bucket}"
        keys: list[str] = []
        # One page is read under the stream's lock: no key written meanwhile
        # is missed. Beyond the server's page (100,000 subjects), the next
        # page from where this one ended (nats-py's stream_info cannot page).
        while True:
            request = json.dumps({"subjects_filter": f"{subject}>", "offset": len(keys)}).encode()
            reply = json.loads((await self._nc.request(api, request, timeout=_request_timeout(self.ttl))).data)
            if "error" in reply:
                raise nats.js.errors.APIError.from_error(reply["error"])
            page = (reply.get("state") or {}).get("subjects") or {}
            keys.extend(name[len(subject) :] for name in page)
            if not page or len(keys) >= reply.get("total", 0):
                return keys

    async def workers(self) -> list[str]:
        nats = _nats_module()
        keys = await self._keys("workers")
        names = []
        for key in keys:
            try:
                entry = await self._workers.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue
            if entry.value:
                names.append(entry.value.decode())
        return sorted(names)

    async def acquire(self, feed: str, worker: str) -> Lease | None:
        nats = _nats_module()
        try:
            revision = await self._leases.create(_key(feed), worker.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
        return Lease(feed, worker, revision, revision)

    async def renew(self, lease: Lease) -> bool:
        nats = _nats_module()
        value = _held_value(lease).encode()
        try:
            lease.revision = await self._leases.update(_key(lease.feed), value, last=lease.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            revision = await self._revision_if_ours(lease)
            if revision is None:
                return False
            try:
                lease.revision = await self._leases.update(_key(lease.feed), value, last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                return False
        return True

    async def _revision_if_ours(self, lease: Lease) -> int | None:
        """Return the lease entry's revision if it still holds ``lease``'s acquisition; else None.

        A renewal of ours whose answer was lost (it timed out, the broker
        restarted) may have been stored: then the entry holds this
        acquisition's value at a newer revision than ``lease`` knows. Expired,
        or another acquisition's (its token differs), it is not ours.
        """
        nats = _nats_module()
        try:
            entry = await self._leases.get(_key(lease.feed))
        except nats.js.errors.KeyNotFoundError:
            return None
        held: int | None = entry.revision if entry.value == _held_value(lease).encode() else None
        return held

    async def release(self, lease: Lease) -> None:
        nats = _nats_module()
        try:
            await self._leases.delete(_key(lease.feed), last=lease.revision)
        except nats.js.errors.BadRequestError as exc:  # nats-py does not map delete's error to its own
            if exc.err_code != _WRONG_LAST_SEQUENCE:
                raise  # anything but "no longer ours"
            revision = await self._revision_if_ours(lease)  # or ours at a newer revision
            if revision is not None:
                with contextlib.suppress(nats.js.errors.BadRequestError):
                    await self._leases.delete(_key(lease.feed), last=revision)

    async def ages(self) -> dict[str, float]:
        nats = _nats_module()
        keys = await self._keys("leases")
        js = self._nc.jetstream()
        now = datetime.now(timezone.utc)
        ages = {}
        for key in keys:
            try:
                message = await js.get_last_msg(f"KV_{self.group}-leases", f"$KV.{self.group}-leases.{key}")
            except nats.js.errors.NotFoundError:
                continue
            if (message.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
                continue  # released: its last message is the delete marker
            if message.time is not None:
                ages[_feed_of(key)] = max(0.0, (now - message.time).total_seconds())
        return ages

    async def holders(self) -> dict[str, tuple[str, int]]:
        nats = _nats_module()
        keys = await self._keys("leases")
        held = {}
        for key in keys:
            try:
                entry = await self._leases.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue
            if entry.value:
                worker, bar, token = entry.value.decode().rpartition("|")
                held[_feed_of(key)] = (worker, int(token)) if bar else (token, entry.revision or 0)
        return held

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            await nc.close()


_WRONG_LAST_SEQUENCE = 10071


def _held_value(lease: Lease) -> str:
    """Return the value of ``lease``'s entry or key while it is held: the holder and its acquisition's token."""
    return f"{lease.worker}|{lease.token}"


def _request_timeout(ttl: float) -> float:
    """Return how long a coordinator waits for the broker's answer to a request.

    An answer later than ``ttl / 2`` after the request is of no use: a
    renewal makes the lease usable for ``ttl / 2`` from its sending (the
    self-fencing); and a round that waited longer would push the next
    renewals past the leases' expiry (a broker that died with the request in
    flight never answers it).
    """
    return min(5.0, ttl / 2)


def _nats_module() -> Any:
    from ._nats import _nats

    return _nats()


# Redis: times are the server's (TIME), in milliseconds, so that workers'
# clocks do not matter.

_JOIN = """
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ms + tonumber(ARGV[2]))
return 1
"""

_WORKERS = """
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
local all = redis.call('HGETALL', KEYS[1])
local live = {}
for index = 1, #all, 2 do
    if tonumber(all[index + 1]) > ms then
        table.insert(live, all[index])
    else
        redis.call('HDEL', KEYS[1], all[index])
    end
end
return live
"""

# KEYS[1]: the lease, KEYS[2]: the feed's token counter; ARGV: worker, ttl ms.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
    return false
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return token
"""

# KEYS[1]: the lease; ARGV: worker|token, ttl ms (renew) or nothing (release).
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
end
return 1
"""


class RedisCoordinator:
    """A `Coordinator` in Redis: ``<prefix>:group:<group>:workers`` (a hash) and ``...:lease:<feed>`` keys.

    Args:
        url: The Redis server.
        group: The group's name.
        prefix: The bridge's key prefix.
        ttl: Seconds a heartbeat or a lease lasts without renewal.
    """

    def __init__(self, url: str, group: str, *, prefix: str = "chatfeed", ttl: float = 10.0) -> None:
        _check(group, ttl)
        self.url = url
        self.group = group
        self.ttl = float(ttl)
        self._base = f"{prefix}:group:{group}"
        self._client: Any = None
        self._scripts: dict[str, Any] = {}

    async def open(self, *, create: bool = True) -> None:
        from ._redis import _connect

        self._client = await _connect(self.url, 2.0, _request_timeout(self.ttl))
        self._scripts = {
            name: self._client.register_script(source)
            for name, source in (
                ("join", _JOIN),
                ("workers", _WORKERS),
                ("acquire", _ACQUIRE),
                ("renew", _RENEW),
                ("release", _RELEASE),
            )
        }
        if create:
            # The leases' TTL, for those who read their ages without knowing it
            # (``--status``); it outlives the workers: the group's trace.
            await self._client.set(f"{self._base}:ttl", self._ttl_ms)
        elif not await self._client.exists(f"{self._base}:ttl"):
            await self.close()
            raise UsageError(f"there is no group {self.group} at {redact_url(self.url)}")

    @property
    def _ttl_ms(self) -> int:
        return int(self.ttl * 1000)

    async def join(self, worker: str) -> None:
        await self._scripts["join"](keys=[f"{self._base}:workers"], args=[worker, self._ttl_ms])

    async def leave(self, worker: str) -> None:
        await self._client.hdel(f"{self._base}:workers", worker)

    async def workers(self) -> list[str]:
        live = await self._scripts["workers"](keys=[f"{self._base}:workers"])
        return sorted(name.decode() if isinstance(name, bytes) else name for name in live)

    async def acquire(self, feed: str, worker: str) -> Lease | None:
        token = await self._scripts["acquire"](
            keys=[f"{self._base}:lease:{feed}", f"{self._base}:token:{feed}"], args=[worker, self._ttl_ms]
        )
        return None if token is None else Lease(feed, worker, int(token))

    async def renew(self, lease: Lease) -> bool:
        held = _held_value(lease)
        renewed = await self._scripts["renew"](keys=[f"{self._base}:lease:{lease.feed}"], args=[held, self._ttl_ms])
        return bool(renewed)

    def fence_of(self, lease: Lease) -> tuple[str, str]:
        """The key of ``lease`` and the value it holds while it is the holder's: what a Redis sink checks."""
        return f"{self._base}:lease:{lease.feed}", _held_value(lease)

    async def release(self, lease: Lease) -> None:
        held = _held_value(lease)
        await self._scripts["release"](keys=[f"{self._base}:lease:{lease.feed}"], args=[held])

    async def announce_ready(self, feed: str, worker: str) -> None:
        await self._client.set(f"{self._base}:ready:{feed}", worker, px=self._ttl_ms)

    async def ready_for(self, feed: str) -> str | None:
        value = await self._client.get(f"{self._base}:ready:{feed}")
        return None if value is None else value.decode()

    async def ages(self) -> dict[str, float]:
        ages = {}
        prefix = f"{self._base}:lease:"
        # A lease is set to the group's TTL at each renewal: its age is what it has lost of it since.
        recorded = await self._client.get(f"{self._base}:ttl")
        ttl = int(recorded) / 1000 if recorded is not None else self.ttl
        async for key in self._client.scan_iter(match=f"{prefix}*", count=1000):
            text = key.decode() if isinstance(key, bytes) else key
            left = await self._client.pttl(key)
            if left >= 0:
                ages[text[len(prefix) :]] = max(0.0, ttl - left / 1000)
        return ages

    async def holders(self) -> dict[str, tuple[str, int]]:
        held = {}
        prefix = f"{self._base}:lease:"
        async for key in self._client.scan_iter(match=f"{prefix}*", count=1000):
            text = key.decode() if isinstance(key, bytes) else key
            value = await self._client.get(key)
            if value is not None:
                worker, _, token = value.decode().rpartition("|")
                held[text[len(prefix) :]] = (worker, int(token))
        return held

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def monotonic() -> float:
    """The clock a worker measures its lease's validity with (self-fencing)."""
    return time.monotonic()


class Group:
    """A bridge's share of a set of feeds, coordinated with the other workers of the group.

    Give it to [`Bridge`][chatfeed.bridge.Bridge] (``group=``) with an empty
    pool: the bridge adds the feeds this worker should hold, by rendezvous
    hashing over the live workers, and takes over those of a worker that
    stops.

    - Every ``ttl / 3`` seconds the worker heartbeats, renews its leases, and
      computes the feeds it should hold from the live workers. A round that
      fails (the broker away) is tried again every ``ttl / 20``, so that a
      broker back before the leases expire gets their renewals in time.
    - A feed it should hold and nobody holds (a worker died and its lease
      expired, or at start): it takes the lease and adds the feed, resumed
      from the feed's watermark.
    - A feed it should hold that another worker holds (it joined, or the
      holder is leaving): make before break. It connects and authenticates
      the feed, holds its records, and says it is ready; the holder then
      stops the feed, publishes what it held, saves the watermark and lets
      the lease go; this worker takes the lease and publishes what it held,
      in order. The dedup ids absorb the overlap.
    - A lease it cannot renew (expired during a partition or a long pause,
      and taken): it stops the feed and publishes nothing more of it. It
      also publishes nothing for a feed whose lease it has not renewed for
      ``ttl / 2`` (self-fencing: the lease cannot have expired before then).
    - Closing the bridge leaves the group: the other workers take its feeds,
      make before break, within ``handoff_timeout``.

    Args:
        coordinator: Where the group lives: a
            [`JetStreamCoordinator`][chatfeed.bridge.JetStreamCoordinator] or a
            [`RedisCoordinator`][chatfeed.bridge.RedisCoordinator].
        feeds: Every feed of the group, by key: its token (or token function).
        worker: This worker's name in the group (default: host, pid and a random suffix).
        handoff_timeout: Seconds a feed waits for its next holder to be ready
            before it is let go anyway (at leave), and a handoff's drain.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        feeds: Mapping[str, TokenSource],
        *,
        worker: str | None = None,
        handoff_timeout: float = 30.0,
    ) -> None:
        if not isinstance(feeds, Mapping):
            raise UsageError(f"feeds must be a mapping of key to token, not {feeds!r}")
        self.coordinator = coordinator
        self.ttl: float = getattr(coordinator, "ttl", 10.0)
        self.feeds = dict(feeds)
        self.worker = worker or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.handoff_timeout = handoff_timeout
        self._bridge: Any = None
        self._held: dict[str, Lease] = {}
        self._valid_until: dict[str, float] = {}
        self._waiting: dict[str, float] = {}  # connected, waiting for the lease: since when
        self._letting_go: dict[str, float] = {}  # held, another should hold it: since when
        self._leaving = False
        self._others = 0  # live workers besides this one, at the last round
        self._task: asyncio.Task[None] | None = None
        self._handoffs: dict[str, asyncio.Task[None]] = {}  # feeds being handed over, off the rounds
        self._settled = asyncio.Event()
        self._stopping = False  # _close was called: no round starts after it, cancelled or not
        self._renewed_at = monotonic()  # when the last round's renewals were all answered

    def __repr__(self) -> str:
        return f"<chatfeed.bridge.Group {self.worker} holds {len(self._held)} of {len(self.feeds)} feeds>"

    @property
    def held(self) -> list[str]:
        """The feeds this worker holds now."""
        return sorted(self._held)

    def _attach(self, bridge: Any) -> None:
        if self._bridge is not None:
            raise UsageError("a group belongs to one bridge")
        self._bridge = bridge

    def _may_publish(self, feed: str) -> bool:
        return monotonic() < self._valid_until.get(feed, 0.0)

    def _fence(self, feed: str) -> tuple[str, str] | None:
        lease = self._held.get(feed)
        fence_of = getattr(self.coordinator, "fence_of", None)
        return None if lease is None or fence_of is None else fence_of(lease)

    async def _start(self) -> None:
        await self.coordinator.open()
        await self._tick()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="chatfeed-bridge-group")

    async def _run(self) -> None:
        # Rounds at a fixed rate, every ttl/3 from the first: a slow round
        # does not push the next renewals back. A round that failed before
        # its renewals were done (the broker away) is tried again every
        # ttl/20, not a period later, while the leases it renews can still be
        # saved: they last ttl from their last renewal, and a broker back
        # before they expire must get their renewals in time, whatever the
        # rounds' phase. Otherwise (renewed, then failed adding feeds; or
        # every lease expired already), the next round comes at its time.
        period = self.ttl / 3
        retry = self.ttl / 20
        loop = asyncio.get_running_loop()
        next_at = loop.time() + period
        failures = 0
        while not self._stopping:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            began = monotonic()
            try:
                await self._tick()
            except Exception as exc:  # the broker away: the leases age; renewals resume when it is back
                failures += 1
                renewed = self._renewed_at >= began
                soon = not renewed and monotonic() - self._renewed_at < self.ttl
                next_at = loop.time() + retry if soon else max(next_at + period, loop.time())
                if failures == 1:
                    logger.warning(
                        "the group's round failed (%s); trying again in %g s",
                        exc,
                        next_at - loop.time(),
                        extra=log_fields(error=exc, delay=next_at - loop.time()),
                    )
                else:
                    logger.debug(
                        "the group's round failed again (%s)", exc, extra=log_fields(error=exc, attempt=failures)
                    )
                continue
            if failures:
                logger.warning(
                    "the group's rounds work again, after %d failed", failures, extra=log_fields(attempt=failures)
                )
                failures = 0
            next_at = max(next_at + period, loop.time())

    async def _leave(self) -> None:
        """Hand every feed over to the others (make before break), then stop."""
        if self._task is None:
            return
        self._leaving = True
        try:
            await self.coordinator.leave(self.worker)
        except Exception as exc:
            logger.warning("could not leave the group cleanly (%s)", exc, extra=log_fields(error=exc))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.handoff_timeout + self.ttl
        while self._held and self._others and loop.time() < deadline:
            self._settled.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._settled.wait(), self.ttl / 3)
        # The rounds go on (renewing what is left) while the bridge publishes
        # what it holds; _close stops them, then lets the leases go.

    async def _close(self) -> None:
        # A cancellation can be lost: before Python 3.12, asyncio.wait_for returns
        # the result of a call that completes as it is cancelled, and drops the
        # cancellation (nats-py waits for every reply in one, redis-py for every
        # write). The rounds then check the flag instead of going on forever.
        self._stopping = True
        tasks = [task for task in (self._task, *self._handoffs.values()) if task is not None]
        self._task = None
        while tasks:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            # Begun by a round that went on, its cancellation lost. (One cancelled
            # before it ran never removed itself: done, it is not waited for.)
            tasks = [task for task in self._handoffs.values() if not task.done()]
        for lease in list(self._held.values()):
            try:
                await self.coordinator.release(lease)
            except Exception as exc:
                logger.warning(
                    "could not release the lease of feed %r (%s)",
                    lease.feed,
                    exc,
                    extra=log_fields(lease.feed, error=exc),
                )
        self._held.clear()
        await self.coordinator.close()

    async def _tick(self) -> None:
        coordinator = self.coordinator
        me = self.worker
        bridge = self._bridge
        now = monotonic()
        if not self._leaving:
            await coordinator.join(me)
        live = [worker for worker in await coordinator.workers() if worker != me]
        self._others = len(live)
        if not self._leaving:
            live.append(me)
        # Renewed concurrently, a batch at a time: one round trip each, overlapped.
        leases = list(self._held.items())
        lost: list[str] = []
        for start in range(0, len(leases), _RENEW_BATCH):
            batch = leases[start : start + _RENEW_BATCH]
            sent = monotonic()  # the lease runs at least ttl from here: valid for ttl/2 of it
            renewed = await asyncio.gather(*(coordinator.renew(lease) for _, lease in batch))
            for (feed, sent_for), kept in zip(batch, renewed, strict=True):
                if self._held.get(feed) is not sent_for or (not kept and feed in self._handoffs):
                    continue  # let go while this renewal was in flight, or being let go by its handoff
                if kept:
                    self._valid_until[feed] = sent + self.ttl / 2
                    continue
                logger.debug("lost the lease of feed %r: it is another worker's now", feed, extra=log_fields(feed))
                lost.append(feed)
                self._held.pop(feed)
                self._valid_until.pop(feed, None)
                self._letting_go.pop(feed, None)
                await bridge._drop_feed(feed)
        if lost:
            # One line per round, not per feed: after a long broker outage, every lease is lost at once.
            logger.warning(
                "lost the lease of %d feed(s), another worker's now or expired: %s",
                len(lost),
                _some(lost),
                extra=log_fields(lost[0] if len(lost) == 1 else None),
            )
        self._renewed_at = monotonic()
        if self._stopping:  # close() came while this round waited for the broker (its cancellation lost)
            return
        desired = {feed for feed in self.feeds if live and owner(feed, live) == me}
        wanted = sorted(desired - self._held.keys())
        to_add: list[str] = []  # taken now, not connected yet
        to_gate: list[str] = []  # another's still: connected now, published once the lease is ours
        announce: list[str] = []
        for start in range(0, len(wanted), _RENEW_BATCH):  # a batch of acquisitions at a time, overlapped
            names = wanted[start : start + _RENEW_BATCH]
            sent = monotonic()
            taken = await asyncio.gather(*(coordinator.acquire(feed, me) for feed in names))
            for feed, lease in zip(names, taken, strict=True):
                if lease is not None:
                    self._held[feed] = lease
                    self._valid_until[feed] = sent + self.ttl / 2
                    if feed in self._waiting:
                        del self._waiting[feed]
                        await bridge._open(feed)
                    else:
                        to_add.append(feed)
                elif feed not in self._waiting:
                    self._waiting[feed] = now
                    to_gate.append(feed)
                elif _is_up(bridge.pool, feed):
                    announce.append(feed)
        for feed in to_gate:
            bridge._gate(feed)
        await bridge._add_many({feed: self.feeds[feed] for feed in to_add + to_gate})
        for start in range(0, len(announce), _RENEW_BATCH):
            names = announce[start : start + _RENEW_BATCH]
            await asyncio.gather(*(coordinator.announce_ready(feed, me) for feed in names))
        for feed in sorted(self._waiting.keys() - desired):  # no longer ours to take
            del self._waiting[feed]
            await bridge._drop_feed(feed)
        going = []
        unready = []  # let go after handoff_timeout, their next holder not connected
        for feed in sorted(self._held.keys() - desired - self._handoffs.keys()):
            since = self._letting_go.setdefault(feed, now)
            successor = owner(feed, live) if live else None
            ready = await coordinator.ready_for(feed)
            if successor is not None and (ready == successor or now - since >= self.handoff_timeout):
                going.append(feed)
                if ready != successor:
                    unready.append(feed)
        if unready:
            logger.warning(
                "handing %d feed(s) over without their next holder ready, after %g s of waiting "
                "(the chat server away, or the next holder slow to connect): %s",
                len(unready),
                self.handoff_timeout,
                _some(unready),
                extra=log_fields(unready[0] if len(unready) == 1 else None, timeout=self.handoff_timeout),
            )
        loop = asyncio.get_running_loop()
        for feed in going:
            # Off the rounds: they go on renewing (this feed's lease too, while it drains).
            task = loop.create_task(self._hand_over(feed), name="chatfeed-bridge-handoff")
            self._handoffs[feed] = task
        # A feed held or waited for that the pool does not have (its add failed): added again.
        missing = [
            feed
            for feed in (*self._held, *self._waiting)
            if feed not in bridge.pool and feed not in self._handoffs and feed in desired
        ]
        for feed in missing:
            if feed in self._waiting and feed not in bridge._gates:
                bridge._gate(feed)
        if missing:
            await bridge._add_many({feed: self.feeds[feed] for feed in missing})
        self._settled.set()

    async def _hand_over(self, feed: str) -> None:
        """Stop ``feed``, publish what it held, save its watermark, then let its lease go."""
        bridge = self._bridge
        try:
            drained = await bridge._stop_feed(feed, self.handoff_timeout)
            if not drained:
                # What is left is never published: the next holder fetches it from the watermark,
                # and a record of this hold published after its records would break their order.
                bridge._epochs[feed] += 1
                bridge._fenced.add(feed)
            handed = self._held.get(feed)
            if handed is not None:
                await self.coordinator.release(handed)
                self._held.pop(feed, None)
                self._valid_until.pop(feed, None)
        except Exception as exc:
            logger.warning(
                "handing feed %r over failed (%s); its lease expires by itself",
                feed,
                exc,
                extra=log_fields(feed, error=exc),
            )
            self._held.pop(feed, None)
            self._valid_until.pop(feed, None)
        finally:
            self._letting_go.pop(feed, None)
            self._handoffs.pop(feed, None)
            self._settled.set()

    def _holds(self, feed: str) -> bool:
        return feed in self._held


_RENEW_BATCH = 100


def _some(feeds: list[str], shown: int = 5) -> str:
    """Return the first few feeds of a list, for a log line about many."""
    more = f" and {len(feeds) - shown} more" if len(feeds) > shown else ""
    return ", ".join(map(repr, feeds[:shown])) + more


def _is_up(pool: Any, feed: str) -> bool:
    from .._client import _State

    client = pool._feeds.get(feed)
    return client is not None and client._state is _State.OPEN
