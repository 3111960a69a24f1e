"""The bridge: a pool's events into a broker, in order per chat, with a bounded window and no loss.

Every event a feed of the pool delivers goes through one inline handler,
which makes its `Record` (the envelope, stamped with the time it arrived)
and offers it to a `Lanes`: one lane per (feed, chat), at most
``concurrency`` publishes in flight, at most ``window`` records held. A lane
publishes one record at a time and retries it, with backoff, until the
broker stores it: a chat's events reach the log in the order they arrived,
whatever the broker does meanwhile (a newer message is never published while
an older one of the same chat waits for a retry). When ``window`` records
are held, the handler waits for room, so the feeds stop being read and the
chat server is slowed down by TCP: memory stays bounded through an outage of
any length. Retries reuse the record, hence its dedup id, which the broker
uses to store each event once.

Per feed, the bridge keeps a watermark: the newest ``created_at`` such that
every message and chat of the feed received before it is in the log (the
oldest still held, or the newest published when none is). It saves the
watermarks that moved every ``watermark_interval`` seconds and at the end,
in the broker; a bridge started again backfills each feed from its
watermark, when the pool has a ``backfill`` function.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from typing_extensions import Self

from .._config import TokenSource, _positive
from .._delivery import Gap
from .._lanes import Lanes
from .._logging import log_fields
from .._observe import Observer, hooks_of
from .._pool import Pool
from ..exceptions import ChatfeedError, UsageError
from ..models import ServerMessage
from ._envelope import Record, encode
from ._group import Group

__all__ = ["Bridge", "BridgeStatistics", "BrokerUnavailableError", "FencedError", "RecordRejectedError", "Sink"]

logger = logging.getLogger("chatfeed.bridge")


class BrokerUnavailableError(ChatfeedError):
    """The broker could not be reached (at start, within ``start_timeout``), or refused the bridge's set-up."""


class FencedError(ChatfeedError):
    """The sink refused a record because its feed's lease is another worker's (a group's fencing).

    The bridge drops the record: the feed's new holder fetches it again, from the watermark.
    """


class RecordRejectedError(ChatfeedError):
    """The broker will never store this record (it is larger than the broker takes, say).

    A sink raises it instead of an error worth retrying; the bridge reports
    the record (feed, type, dedup id; never its content), counts it in
    ``statistics().rejected`` and goes on with the chat's next event, instead
    of retrying it forever and holding the chat behind it.
    """


@runtime_checkable
class Sink(Protocol):
    """Where a [`Bridge`][chatfeed.bridge.Bridge] publishes: a broker, behind five methods.

    A sink publishes records one at a time per chat (the bridge never has
    two records of one chat in flight), possibly many chats at once. It
    decides where a record goes from ``record.feed`` and ``record.chat``.
    """

    async def open(self) -> None:
        """Connect, and create or check what the records go into.

        Raises:
            BrokerUnavailableError: The broker cannot be reached now (the
                bridge tries again, until its ``start_timeout``).
            Exception: Anything else ends the bridge's start.
        """

    async def publish(self, record: Record) -> bool:
        """Store ``record`` once: return True when stored, False when the broker had it already (its dedup id).

        Raises:
            RecordRejectedError: The broker will never take it; the bridge reports it and goes on.
            Exception: The record may not be stored; the bridge publishes it again (same dedup id).
        """

    async def load_watermarks(self, feeds: Sequence[str]) -> dict[str, datetime]:
        """Return the saved watermarks of those of ``feeds`` that have one."""

    async def save_watermarks(self, marks: Mapping[str, datetime]) -> None:
        """Save watermarks, replacing the feeds' previous ones."""

    async def close(self) -> None:
        """Let go of the broker; idempotent."""


@dataclasses.dataclass(frozen=True)
class BridgeStatistics:
    """What a bridge has done, from [`Bridge.statistics`][chatfeed.bridge.Bridge.statistics].

    Attributes:
        received: Events received from the feeds.
        published: Records the broker acknowledged: each event received is
            published once, whatever the retries.
        duplicates: Of those, the records the broker had already (after an
            acknowledgement lost on the way, a restart or a backfill
            overlap), and did not store twice.
        retries: Publishes that failed and were tried again.
        rejected: Records the broker will never store (see
            [`RecordRejectedError`][chatfeed.bridge.RecordRejectedError]), reported and skipped.
        held: Records received and not yet stored (queued or in flight); at most ``window``.
        unpublished: Records still held when the bridge closed, after its
            ``drain_timeout``: not in the log; the saved watermarks are older
            than they are, so a bridge started again with a backfill fetches them.
        broker_up: False while publishes fail.
        watermarks_saved: Times the watermarks were saved.
    """

    received: int
    published: int
    duplicates: int
    retries: int
    rejected: int
    held: int
    unpublished: int
    broker_up: bool
    watermarks_saved: int


def by_feed_and_chat(record: Record) -> tuple[str, str | None]:
    return (record.feed, record.chat)


class Bridge:
    """Publishes every event of a [`Pool`][chatfeed.Pool] into a broker, through a [`Sink`][chatfeed.bridge.Sink].

    Args:
        pool: The feeds, not started yet. Give it a ``backfill`` function to
            resume each feed from its saved watermark after a restart.
        sink: The broker: [`JetStreamSink`][chatfeed.bridge.JetStreamSink],
            [`RedisStreamSink`][chatfeed.bridge.RedisStreamSink], or your own.
        window: The most records held, queued or being published. When the
            broker is slow or away, the feeds stop being read once this many
            are held.
        concurrency: The most publishes in flight (each of a different chat).
        watermark_interval: Seconds between saves of the watermarks that moved.
        start_timeout: Seconds to keep trying to reach the broker at start
            (``None``: forever) before raising
            [`BrokerUnavailableError`][chatfeed.bridge.BrokerUnavailableError].
        drain_timeout: Seconds [`close`][chatfeed.bridge.Bridge.close] lets the
            held records be published; those left are not lost: the saved
            watermark is older than they are, and a restart backfills them.
        retry_initial: The first retry's delay bound, in seconds (full jitter, doubling).
        retry_maximum: The retry delay's cap, in seconds.
        group: The worker group this bridge is a member of; see
            [`Group`][chatfeed.bridge.Group].
        observer: An [`Observer`][chatfeed.Observer], or a list of them, told
            of each record published or refused, and of the window filling
            up (``backpressure`` with ``where="bridge"``). The feeds' own
            moments are the pool's: give the pool the same observer.

    Raises:
        UsageError: An argument is invalid, or the pool has started.

    Example:
        ```python
        pool = chatfeed.Pool("wss://api.example.com", backfill=fetch_missed)
        for user, token in tokens.items():
            pool.add(user, token=token)
        sink = JetStreamSink("nats://127.0.0.1:4222")
        await Bridge(pool, sink).run()  # until bridge.close(), or cancelled
        ```
    """

    __slots__ = (
        "__weakref__",
        "_closed",
        "_drained",
        "_epochs",
        "_fenced",
        "_floors",
        "_flusher",
        "_gates",
        "_group",
        "_held_by_feed",
        "_held_count",
        "_hooks",
        "_lanes",
        "_options",
        "_pool",
        "_published_max",
        "_saved",
        "_sink",
        "_state",
        "_stats",
        "_unsaved",
        "_up",
        "_waiting_for_room",
    )

    def __init__(
        self,
        pool: Pool,
        sink: Sink,
        *,
        window: int = 4096,
        concurrency: int = 256,
        watermark_interval: float = 1.0,
        start_timeout: float | None = 30.0,
        drain_timeout: float = 10.0,
        retry_initial: float = 0.05,
        retry_maximum: float = 2.0,
        group: Group | None = None,
        observer: Observer | Sequence[Observer] | None = None,
    ) -> None:
        if not isinstance(pool, Pool):
            raise UsageError(f"pool must be a chatfeed.Pool, not {pool!r}")
        if pool._state != "unopened":
            raise UsageError("the bridge needs a pool that has not started: it starts it")
        if not isinstance(sink, Sink):
            raise UsageError(f"sink must implement chatfeed.bridge.Sink, not {sink!r}")
        for name, value in (("window", window), ("concurrency", concurrency)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive int, not {value!r}")
        for name, number in (
            ("watermark_interval", watermark_interval),
            ("drain_timeout", drain_timeout),
            ("retry_initial", retry_initial),
            ("retry_maximum", retry_maximum),
            ("start_timeout", 1.0 if start_timeout is None else start_timeout),
        ):
            _positive(name, number)
        self._pool = pool
        self._sink = sink
        self._options = _Options(
            window,
            min(concurrency, window),
            watermark_interval,
            start_timeout,
            drain_timeout,
            retry_initial,
            retry_maximum,
        )
        self._lanes = Lanes(
            self._publish, self._report, concurrency=self._options.concurrency, key=by_feed_and_chat, max_pending=window
        )
        # Watermarks: per feed, the records received and not yet stored (with
        # their created_at), the newest created_at stored, and what was saved.
        self._held_by_feed: dict[str, dict[Record, datetime]] = {}
        self._published_max: dict[str, datetime] = {}
        self._saved: dict[str, datetime] = {}
        self._unsaved: set[str] = set()
        # Per feed whose backfill failed: the start of the gap it missed. Its
        # saved watermark stays there for the rest of the run, so that a
        # bridge started again backfills that gap again.
        self._floors: dict[str, datetime] = {}
        # Per feed: every record held (for a feed's own drain), the gate of a
        # feed connected before its lease is held (its records wait there),
        # and the feeds whose lease was lost (their records are not published).
        self._held_count: collections.Counter[str] = collections.Counter()
        self._drained: dict[str, asyncio.Future[None]] = {}
        self._gates: dict[str, _Gate] = {}
        self._fenced: set[str] = set()
        # Per feed, how many times its lease was lost: a record received under
        # an earlier hold is never published, even once the feed is held again.
        self._epochs: collections.Counter[str] = collections.Counter()
        self._group = group
        if group is not None:
            if len(pool):
                raise UsageError("a bridge with a group adds the feeds itself: give it an empty pool")
            group._attach(self)
        self._stats = dict.fromkeys(
            ("received", "published", "duplicates", "retries", "rejected", "unpublished", "watermarks_saved"), 0
        )
        self._up = True
        self._state = "unopened"
        self._flusher: asyncio.Task[None] | None = None
        self._closed: asyncio.Future[None] | None = None
        self._hooks = hooks_of(observer)
        self._waiting_for_room = 0  # feeds waiting for room in the window: backpressure while > 0
        if self._hooks is not None:
            self._hooks.attach(self)
        dispatcher = pool._dispatcher
        dispatcher.keep_frames = True
        dispatcher.add_handler(ServerMessage, self._take, with_feed=True)
        dispatcher.add_error_hook(self._backfill_failed)

    def __repr__(self) -> str:
        state = getattr(self, "_state", "unopened")  # also for an __init__ that raised
        return (
            f"<chatfeed.bridge.Bridge {getattr(self, '_sink', None)!r} feeds={len(getattr(self, '_pool', ()))} {state}>"
        )

    @property
    def pool(self) -> Pool:
        """The bridge's pool."""
        return self._pool

    # Lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Reach the broker, load the watermarks, start the pool; return once every feed authenticated or stopped.

        A feed that cannot connect keeps this waiting, as with
        ``async with pool``; [`run`][chatfeed.bridge.Bridge.run] does not wait.

        Raises:
            BrokerUnavailableError: The broker could not be reached within ``start_timeout``.
            UsageError: The bridge has started already.
        """
        if not await self._begin():
            raise UsageError("the bridge was closed while it was starting")
        try:
            await self._pool.__aenter__()
        except BaseException:
            await self.close()
            raise

    async def run(self) -> None:
        """Bridge until [`close`][chatfeed.bridge.Bridge.close] is called (by a handler, a task, a signal) or cancelled.

        Raises:
            BrokerUnavailableError: The broker could not be reached within ``start_timeout``.
            UsageError: The bridge has started already.
        """
        if not await self._begin():
            return  # closed while starting
        try:
            await self._pool.run()
        finally:
            await self.close()

    async def _begin(self) -> bool:
        """Open the sink and load the watermarks; return False if close() was called meanwhile."""
        if self._state != "unopened":
            raise UsageError(f"the bridge is {self._state}: it starts once")
        self._state = "starting"
        loop = asyncio.get_running_loop()
        closed = self._closed = loop.create_future()
        try:
            opened = await self._open_sink(closed)
            keys = self._pool.feeds()
            marks = await self._sink.load_watermarks(keys) if opened and keys else {}
        except BaseException:
            if self._state == "starting":
                self._state = "closed"
                closed.set_result(None)
            await self._sink.close()
            raise
        if self._state != "starting":  # close() was called meanwhile; the sink may have opened since
            await self._sink.close()
            return False
        self._saved.update(marks)
        if self._pool._options.backfill is not None:
            for key, mark in marks.items():
                feed = self._pool._feeds.get(key)
                if feed is not None and feed._delivery is not None:
                    feed._since = mark
                    feed._delivery.watermark = mark
        self._state = "running"
        self._flusher = loop.create_task(self._flush_every(), name="chatfeed-bridge-watermarks")
        if self._group is not None:
            try:
                await self._group._start()
            except BaseException:
                await self.close()
                raise
        return True

    async def wait_closed(self) -> None:
        """Wait until the bridge has closed."""
        if self._closed is not None:
            await asyncio.shield(self._closed)

    async def add(self, key: str, *, token: TokenSource) -> None:
        """Add a feed to the running bridge's pool, resuming it from its saved watermark.

        Raises:
            UsageError: As [`Pool.add`][chatfeed.Pool.add].
        """
        self._fenced.discard(key)  # held again (a lease lost, then taken back)
        mark = None
        if self._state == "running" and self._pool._options.backfill is not None:
            # Before the start, start() loads every feed's watermark at once.
            mark = (await self._sink.load_watermarks([key])).get(key)
        if mark is not None:
            self._saved[key] = mark
        self._pool.add(key, token=token, backfill_since=mark)

    async def _add_many(self, feeds: Mapping[str, TokenSource]) -> None:
        """Add feeds to the running pool, each resumed from its saved watermark: one load for all of them."""
        if not feeds:
            return
        taken = datetime.now(timezone.utc)  # before the load: the leases are held from here on
        marks: dict[str, datetime] = await self._sink.load_watermarks(list(feeds))
        new = dict.fromkeys([key for key in feeds if key not in marks], taken)
        if new:
            # A feed the group has never bridged: from now, the moment its lease
            # was taken. Saved at once, so that a next holder, after a crash,
            # backfills what this one held; and backfilled from by this one, as
            # its first connection may come after events pushed meanwhile.
            await self._sink.save_watermarks(new)
            self._saved.update(new)
            marks.update(new)
        if self._pool._options.backfill is None:
            marks = {}
        for key, token in feeds.items():
            self._fenced.discard(key)
            mark = marks.get(key)
            if mark is not None:
                self._saved[key] = mark
            self._pool.add(key, token=token, backfill_since=mark)

    async def close(self) -> None:
        """Stop the feeds, publish what is held (for ``drain_timeout``), save the watermarks, and close the sink.

        Idempotent; a second call waits for the first.
        """
        if self._state == "unopened":
            self._state = "closed"
            await self._sink.close()
            return
        if self._state == "closing" or self._state == "closed":
            if self._closed is not None:
                await asyncio.shield(self._closed)
            return
        self._state = "closing"
        try:
            if self._group is not None:
                await self._group._leave()  # its feeds go to the other workers, make before break
            await self._pool.close()
            left = await self._lanes.drain(self._options.drain_timeout, "bridge publish")
            self._stats["unpublished"] = left
            if left:
                logger.warning(
                    "%d event(s) were not published before the bridge closed; the saved watermarks are older "
                    "than they are, so a bridge started again %s",
                    left,
                    "backfills them"
                    if self._pool._options.backfill is not None
                    else "with a backfill function fetches them (this one has none)",
                    extra=log_fields(events=left),
                )
            flusher, self._flusher = self._flusher, None
            if flusher is not None:
                flusher.cancel()
                await asyncio.wait([flusher])
            await self._save()
            if self._group is not None:
                await self._group._close()
        finally:
            self._state = "closed"
            try:
                await self._sink.close()
            finally:
                if self._closed is not None and not self._closed.done():
                    self._closed.set_result(None)

    def statistics(self) -> BridgeStatistics:
        """Return what the bridge has received and published so far."""
        stats = self._stats
        return BridgeStatistics(
            received=stats["received"],
            published=stats["published"],
            duplicates=stats["duplicates"],
            retries=stats["retries"],
            rejected=stats["rejected"],
            held=self._lanes.held,
            unpublished=stats["unpublished"],
            broker_up=self._up,
            watermarks_saved=stats["watermarks_saved"],
        )

    # The event path

    async def _take(self, event: Any, feed: str) -> None:
        record = encode(event, feed)
        self._stats["received"] += 1
        created = record.created
        if created is not None:
            # Held from now: if this wait is cancelled (the bridge closes), the
            # record stays held, so the watermark never passes it.
            held = self._held_by_feed.get(feed)
            if held is None:
                held = self._held_by_feed[feed] = {}
            held[record] = created
        self._held_count[feed] += 1
        if self._group is not None:
            record.epoch = self._epochs[feed]
        gate = self._gates.get(feed)
        if gate is not None and not gate.opened.is_set():
            # Connected before its lease: held here, in order, until the lease is this worker's.
            gate.records.append(record)
            if len(gate.records) >= self._options.window:
                await gate.opened.wait()
            return
        await self._offer(record)

    async def _offer(self, record: Record) -> None:
        lanes = self._lanes
        if lanes.offer(record):
            return
        hooks = self._hooks
        backpressure = None if hooks is None else hooks.backpressure
        self._waiting_for_room += 1
        if backpressure is not None and self._waiting_for_room == 1:  # the first feed to wait: engaged
            backpressure(None, engaged=True, where="bridge")
        try:
            while not lanes.offer(record):
                # Shared by every feed: one feed's cancelled wait must not cancel the others'.
                await asyncio.shield(lanes.wait_for_room())
        finally:
            self._waiting_for_room -= 1
            if backpressure is not None and self._waiting_for_room == 0:
                backpressure(None, engaged=False, where="bridge")

    async def _fenced_out(self, record: Record) -> bool:
        """Wait until this worker may publish for the record's feed; True if it never will (lease lost)."""
        group = self._group
        while True:
            if record.feed in self._fenced or record.epoch != self._epochs[record.feed]:
                self._forget(record)  # the feed's new holder fetches it again, from the watermark
                return True
            if group is None or group._may_publish(record.feed):
                return False
            await asyncio.sleep(group.ttl / 20)  # the lease's renewal is late: publish nothing meanwhile

    async def _publish(self, record: Record) -> None:
        stats = self._stats
        hooks = self._hooks
        began = 0.0  # the first attempt's time, for an observer of publishes
        failures = 0
        while True:
            if (self._group is not None or self._fenced) and await self._fenced_out(record):
                return
            if self._group is not None:
                record.fence = self._group._fence(record.feed)
            if not began and hooks is not None and hooks.published is not None:
                began = time.perf_counter()
            try:
                stored = await self._sink.publish(record)
            except FencedError:
                logger.info(
                    "feed %r: a record refused, the feed's lease is another worker's",
                    record.feed,
                    extra=log_fields(record.feed, event_type=record.type, chat=record.chat),
                )
                self._forget(record)
                return
            except RecordRejectedError as exc:
                stats["rejected"] += 1
                logger.error(
                    "the broker will never store the %s event %s of feed %r (%s); it is skipped",
                    record.type,
                    record.dedup,
                    record.feed,
                    exc,
                    extra=log_fields(record.feed, event_type=record.type, chat=record.chat, error=exc),
                )
                break
            except Exception as exc:
                failures += 1
                stats["retries"] += 1
                if hooks is not None and hooks.publish_failed is not None:
                    hooks.publish_failed(record, error=exc, attempt=failures)
                options = self._options
                bound = min(options.retry_maximum, options.retry_initial * 2 ** min(failures - 1, 30))
                delay = random.uniform(0, bound)  # jitter, not cryptography
                if self._up:
                    self._up = False
                    logger.warning(
                        "the broker refused or did not acknowledge a publish (%s); the bridge retries, "
                        "and the feeds stop being read once %d event(s) are held",
                        describe_error(exc),
                        options.window,
                        extra=log_fields(record.feed, error=exc, attempt=failures, delay=delay),
                    )
                if self._lanes.stopping:  # close() gave up on it, and the cancellation was lost in the sink
                    return
                await asyncio.sleep(delay)
                continue
            if not self._up:
                self._up = True
                waiting = self._lanes.held
                logger.warning(
                    "the broker is back; publishing resumes (%d event(s) held)",
                    waiting,
                    extra=log_fields(events=waiting),
                )
            stats["published"] += 1
            if not stored:
                stats["duplicates"] += 1
            if hooks is not None and hooks.published is not None:
                hooks.published(record, stored=stored, duration=time.perf_counter() - began)
            break
        created = record.created
        feed = record.feed
        if created is not None:  # stored, or never to be: the watermark may pass it
            held = self._held_by_feed[feed]
            del held[record]
            if not held:
                del self._held_by_feed[feed]
            newest = self._published_max.get(feed)
            if newest is None or created > newest:
                self._published_max[feed] = created
            self._unsaved.add(feed)
        self._release_count(feed)

    def _release_count(self, feed: str) -> None:
        count = self._held_count[feed] - 1
        if count > 0:
            self._held_count[feed] = count
            return
        del self._held_count[feed]
        waiter = self._drained.pop(feed, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _forget(self, record: Record) -> None:
        held = self._held_by_feed.get(record.feed)
        if held is not None:
            held.pop(record, None)
        self._release_count(record.feed)

    # One feed at a time, for a group

    def _gate(self, feed: str) -> None:
        """Hold the records of ``feed`` (about to be added) until `_open`."""
        self._gates[feed] = _Gate()
        self._fenced.discard(feed)

    async def _open(self, feed: str) -> None:
        """Publish what the gate of ``feed`` held, in order, then let its records through."""
        gate = self._gates.get(feed)
        if gate is None:
            return
        while gate.records:
            await self._offer(gate.records.popleft())
        gate.opened.set()
        del self._gates[feed]

    async def _stop_feed(self, feed: str, timeout: float) -> bool:
        """Remove ``feed`` from the pool and wait until its records are published; save its watermark.

        Returns:
            Whether everything of the feed was published within ``timeout``.
        """
        if feed in self._pool:
            await self._pool.remove(feed)
        drained = True
        if self._held_count.get(feed):
            waiter = self._drained.setdefault(feed, asyncio.get_running_loop().create_future())
            done, _ = await asyncio.wait([waiter], timeout=timeout)
            drained = bool(done)
        self._unsaved.add(feed)
        await self._save()
        self._forget_feed(feed)
        return drained

    async def _drop_feed(self, feed: str) -> None:
        """Stop ``feed`` at once, publishing nothing more of it: its lease is another worker's now."""
        self._fenced.add(feed)
        self._epochs[feed] += 1  # what it still holds of the feed is never published
        gate = self._gates.pop(feed, None)
        if gate is not None:
            for record in gate.records:
                self._forget(record)
            gate.records.clear()
            gate.opened.set()
        if feed in self._pool:
            await self._pool.remove(feed)
        self._forget_feed(feed)

    def _forget_feed(self, feed: str) -> None:
        # Its watermark is its next holder's to save.
        self._unsaved.discard(feed)
        self._published_max.pop(feed, None)
        self._saved.pop(feed, None)
        self._floors.pop(feed, None)

    async def _report(self, exc: BaseException, record: Any) -> None:
        # _publish catches every Exception; what reaches here is a cancellation
        # of something it awaited (the sink's own), logged and not fatal.
        logger.error(
            "publishing %r failed: %r; the record stays held until the bridge closes",
            record,
            exc,
            extra=log_fields(getattr(record, "feed", None), error=exc),
        )

    # Watermarks

    def _watermarks(self) -> dict[str, datetime]:
        marks = {}
        group = self._group
        for feed in self._unsaved:
            if feed in self._fenced or (group is not None and not group._holds(feed)):
                continue  # another worker's now: its watermark is that one's to save
            held = self._held_by_feed.get(feed)
            mark = min(held.values()) if held else self._published_max.get(feed)
            floor = self._floors.get(feed)
            if floor is not None and (mark is None or floor < mark):
                mark = floor
            if mark is not None and mark != self._saved.get(feed):
                marks[feed] = mark
        return marks

    def _backfill_failed(self, exc: Exception, subject: Any) -> None:
        # An error hook of the pool: a failed backfill passes its Gap.
        if not isinstance(subject, Gap) or subject.feed is None:
            return
        feed = subject.feed
        # No start: the backfill asked for everything, and a restart will too.
        since = _EVERYTHING if subject.since is None else subject.since
        floor = self._floors.get(feed)
        if floor is None or since < floor:
            self._floors[feed] = since
            logger.warning(
                "the watermark of feed %r stays at %s, the start of the gap its backfill could not fetch: "
                "a bridge started again backfills it again",
                feed,
                since.isoformat(),
                extra=log_fields(feed),
            )
        self._unsaved.add(feed)

    async def _save(self) -> None:
        marks = self._watermarks()
        unsaved = self._unsaved
        self._unsaved = set()
        if not marks:
            return
        try:
            await self._sink.save_watermarks(marks)
        except BaseException as exc:
            self._unsaved |= unsaved  # saved next time (close() saves once more after the flusher's end)
            if not isinstance(exc, Exception):
                raise
            logger.warning(
                "could not save %d watermark(s) (%s); trying again later",
                len(marks),
                describe_error(exc),
                extra=log_fields(error=exc),
            )
            return
        self._saved.update(marks)
        self._stats["watermarks_saved"] += 1

    async def _flush_every(self) -> None:
        # Until close() takes the task away, not merely until it is cancelled: a
        # cancellation that lands in the sink's call can be lost (see Group._close).
        while self._flusher is not None:
            await asyncio.sleep(self._options.watermark_interval)
            await self._save()

    async def _open_sink(self, closed: asyncio.Future[None]) -> bool:
        """Open the sink, trying again until ``start_timeout``; return False if close() was called meanwhile.

        Raises:
            BrokerUnavailableError: The last failure's, once ``start_timeout`` has passed.
        """
        options = self._options
        loop = asyncio.get_running_loop()
        deadline = None if options.start_timeout is None else loop.time() + options.start_timeout
        failure: BrokerUnavailableError | None = None
        failures = 0
        while self._state == "starting":
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                break
            try:
                # A sink whose open() hangs still ends at start_timeout.
                await asyncio.wait_for(self._sink.open(), remaining)
            except asyncio.TimeoutError:
                await self._sink.close()
                break
            except BrokerUnavailableError as exc:
                failure = exc
                failures += 1
                delay = min(2.0, 0.1 * 2 ** min(failures - 1, 30))
                if failures == 1:
                    logger.warning(
                        "%s; trying again until it answers",
                        exc,
                        extra={"chatfeed_start_retry": True, **log_fields(error=exc, attempt=failures, delay=delay)},
                    )
                await asyncio.wait([closed], timeout=delay if remaining is None else min(delay, remaining))
                continue
            return True
        if self._state != "starting":
            return False
        if failure is None:
            failure = BrokerUnavailableError(
                f"{self._sink!r} did not answer within start_timeout ({options.start_timeout:g} s)"
            )
        raise failure


_EVERYTHING = datetime(1970, 1, 1, tzinfo=timezone.utc)
"""The watermark of a feed whose backfill of everything failed: its next start fetches everything again."""


class _Gate:
    """The records of a feed connected before its lease is held, in arrival order."""

    __slots__ = ("opened", "records")

    def __init__(self) -> None:
        self.records: collections.deque[Record] = collections.deque()
        self.opened = asyncio.Event()


@dataclasses.dataclass(frozen=True)
class _Options:
    window: int
    concurrency: int
    watermark_interval: float
    start_timeout: float | None
    drain_timeout: float
    retry_initial: float
    retry_maximum: float


def address_problem(parts: urllib.parse.SplitResult) -> str | None:
    """Return what is wrong with a broker URL's host or port, or None: for a `UsageError` before connecting."""
    if not parts.hostname:
        return "it has no host"
    try:
        port = parts.port  # a ValueError for a port that is not a number, or beyond 65535
    except ValueError:
        port = 0
    if port is not None and not 1 <= port <= 65535:
        return "its port is not a number from 1 to 65535"
    return None


def describe_error(exc: BaseException) -> str:
    """An exception as one line for a log: its type, and its text if it has one."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
