"""OpenTelemetry metrics and traces of a client, pool, bridge or consumer: `OpenTelemetryObserver`.

Needs the ``otel`` extra (``pip install 'chatfeed[otel]'``), which installs
OpenTelemetry's API only: the application chooses the SDK, its exporters and
its sampling, and configures them before it creates the observer.

```python
import chatfeed
from chatfeed.otel import OpenTelemetryObserver

observer = OpenTelemetryObserver()  # the global meter and tracer providers
client = chatfeed.Client(url, token=jwt, observer=observer)
```

The instruments follow OpenTelemetry's messaging semantic conventions where
one exists (``messaging.client.consumed.messages``,
``messaging.process.duration``, a ``process`` span per handler call, with
``messaging.system="chatfeed"``); the feed's own are named ``chatfeed.*``.
The [observability guide](../guides/observability.md#opentelemetry) lists
them with their attributes. No attribute holds a token or a message's content.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from contextvars import Token
from typing import TYPE_CHECKING, Any, TypeAlias

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, trace
except ImportError as exc:  # pragma: no cover - the extra is installed wherever the tests run
    raise ImportError(
        "chatfeed.otel needs OpenTelemetry's API: pip install 'chatfeed[otel]' (and an SDK to export with)"
    ) from exc

from ._client import ClientState, ClientStatistics
from ._collect import LoopReader, closed
from ._observe import Observer
from ._pool import Pool, PoolStatistics
from ._version import __version__
from .exceptions import UsageError
from .models import NewChat, NewMessage, UnknownMessage

if TYPE_CHECKING:
    from ._delivery import Gap
    from .bridge import Record
    from .exceptions import ChatfeedError
    from .models import FeedEvent

__all__ = ["OpenTelemetryObserver"]

logger = logging.getLogger("chatfeed")

_SYSTEM = "chatfeed"
"""The value of ``messaging.system`` on every ``messaging.*`` instrument and span."""

_FEED_STATES = ("unopened", "connecting", "authenticating", "open", "backing_off", "failed", "closed")
"""The values of ``chatfeed.feed.state``: a client's states, and a pool feed's ``failed``."""

_READ_TIMEOUT = 1.0
"""Seconds a collection on another thread waits for the event loop to read the subjects' statistics."""

# The semantic conventions' recommended buckets for messaging durations, in seconds.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
# A live event is late by milliseconds; a backfilled one by as long as the gap lasted.
_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

_monotonic = time.monotonic  # the clock of the ages; a test sets its own

_Attributes: TypeAlias = "dict[str, str | bool | int]"


class OpenTelemetryObserver(Observer):
    """An [`Observer`][chatfeed.Observer] that records OpenTelemetry metrics and a span per handler call.

    Pass it as ``observer=`` to a [`Client`][chatfeed.Client], a
    [`Pool`][chatfeed.Pool], a [`Bridge`][chatfeed.bridge.Bridge] or a
    [`Consumer`][chatfeed.bridge.Consumer]; one observer may serve several of
    them, and several observers may share a meter provider (their gauges are
    added up). The gauges of feeds by state and of buffered events read the
    subjects' ``statistics()`` when the metrics are collected, on the event
    loop: a collection from an exporter's thread waits up to a second for it
    (not at all once every subject is closed). So shut the meter provider
    down after the loop, or with ``await asyncio.to_thread(provider.shutdown)``,
    not on the loop while a subject is open: its last collection would wait
    for the loop it blocks. The observer holds its subjects weakly, and
    forgets a client, pool, bridge or consumer once it is closed.

    Each handler call is a span ``process <event type>`` of kind
    ``CONSUMER``, current while the handler runs (spans the handler opens are
    its children) and the root of its own trace: the receive loop's context
    is not its parent, so a long-lived span around ``client.run()`` does not
    collect every event. Use the tracer provider's sampler to record fewer.

    Args:
        meter_provider: Where the metrics go; ``None``: the global one
            (``opentelemetry.metrics.get_meter_provider()``), as it is when
            the observer is made.
        tracer_provider: Where the spans go; ``None``: the global one
            (``opentelemetry.trace.get_tracer_provider()``).
        feed_attribute: Put the pool feed's key, as ``chatfeed.feed``, on the
            metrics that concern one feed, and report the age of each feed's
            last event. Off by default: a pool of 10,000 feeds would make each
            such metric 10,000 series (and more, times the event types), past
            the SDK's default limit of 2,000 series per metric. When off, the
            age gauge reports the freshest feed's: whether events arrive at
            all. Spans always carry the feed.

    Raises:
        UsageError: An argument is invalid.

    Example:
        ```python
        reader = PeriodicExportingMetricReader(OTLPMetricExporter())
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        pool = chatfeed.Pool(url, observer=OpenTelemetryObserver(feed_attribute=True))
        ```
    """

    def __init__(
        self,
        *,
        meter_provider: metrics.MeterProvider | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        feed_attribute: bool = False,
    ) -> None:
        if not isinstance(feed_attribute, bool):
            raise UsageError(f"feed_attribute must be True or False, not {feed_attribute!r}")
        if meter_provider is None:
            meter_provider = metrics.get_meter_provider()
        elif not isinstance(meter_provider, metrics.MeterProvider):
            raise UsageError(f"meter_provider must be an opentelemetry MeterProvider, not {meter_provider!r}")
        if tracer_provider is None:
            tracer_provider = trace.get_tracer_provider()
        elif not isinstance(tracer_provider, trace.TracerProvider):
            raise UsageError(f"tracer_provider must be an opentelemetry TracerProvider, not {tracer_provider!r}")
        self._feed_attribute = feed_attribute
        self._tracer = tracer_provider.get_tracer("chatfeed", __version__)
        self._instruments = _instruments_of(meter_provider)
        self._subjects = _Subjects()
        # The loop the subjects run on, seen by a hook: where their statistics are read.
        self._reader = LoopReader()
        # Per feed (None: a lone client's), when its last event came, on time.monotonic().
        self._last_event: dict[str | None, float] = {}
        # Attribute dicts, made once per combination: the receive path only looks them up.
        self._received: dict[tuple[str, str, str | None], tuple[_Attributes, _Attributes]] = {}
        self._processed: dict[tuple[str, str, str | None], _Attributes] = {}
        self._instruments.observers.add(self)

    # Subjects

    def attached(self, subject: object) -> None:
        """Remember ``subject``, to read its ``statistics()`` when the metrics are collected."""
        self._reader.see_loop()
        if not callable(getattr(subject, "statistics", None)):
            logger.debug("OpenTelemetryObserver: %s has no statistics() to report", type(subject).__qualname__)
            return
        self._subjects.add(subject)

    # Connections

    def connecting(self, feed: str | None, *, attempt: int) -> None:
        """Note the event loop the feeds run on."""
        self._reader.see_loop()

    def connected(self, feed: str | None, *, is_reconnect: bool, downtime: float | None) -> None:
        """Count the connection; record how long the feed was down before a reconnection."""
        attributes = self._feed({"chatfeed.reconnect": is_reconnect}, feed)
        instruments = self._instruments
        instruments.connections.add(1, attributes)
        if downtime is not None:
            instruments.downtime.record(downtime, self._feed({}, feed))

    def disconnected(
        self,
        feed: str | None,
        *,
        code: int | None,
        reason: str,
        error: ChatfeedError,
        retry_in: float | None,
    ) -> None:
        """Count the lost connection by close code, error type and whether the feed reconnects."""
        attributes: _Attributes = {"error.type": type(error).__qualname__, "chatfeed.retry": retry_in is not None}
        if code is not None:
            attributes["chatfeed.close.code"] = code
        self._instruments.disconnects.add(1, self._feed(attributes, feed))

    def state_changed(self, feed: str | None, state: ClientState) -> None:
        """Forget the last event of a feed that closed: its age would grow for ever."""
        self._reader.see_loop()
        if state == "closed":
            self._last_event.pop(feed, None)

    # Events

    def event_received(self, feed: str | None, event: FeedEvent) -> None:
        """Count the event, note when it came, and record its lag when it has a ``created_at``."""
        if self._reader.loop is None:
            self._reader.see_loop()  # a consumer has no connection hooks
        source = getattr(event, "source", "live")
        kind = _event_type(event)
        key = (kind, source, feed if self._feed_attribute else None)
        attributes = self._received.get(key)
        if attributes is None:
            attributes = self._received[key] = self._received_attributes(kind, source, feed)
        instruments = self._instruments
        instruments.consumed.add(1, attributes[0])
        self._last_event[feed] = _monotonic()
        if isinstance(event, (NewMessage, NewChat)):
            # Clock skew between the server and this host can make it negative: no lag, then.
            lag = time.time() - event.payload.created_at.timestamp()
            instruments.lag.record(lag if lag > 0.0 else 0.0, attributes[1])

    def duplicate_dropped(self, feed: str | None, event: FeedEvent) -> None:
        """Count the duplicate by event type."""
        self._instruments.duplicates.add(1, self._feed({"chatfeed.event.type": _event_type(event)}, feed))

    def backfilled(self, feed: str | None, *, gap: Gap, events: int, error: Exception | None) -> None:
        """Count the backfill (with ``error.type`` when it failed) and the events it fetched."""
        attributes: _Attributes = {} if error is None else {"error.type": type(error).__qualname__}
        instruments = self._instruments
        instruments.backfills.add(1, self._feed(attributes, feed))
        instruments.backfilled_events.add(events, self._feed({}, feed))

    # Delivery

    def handler_started(self, feed: str | None, event: Any, *, handler: str) -> object:
        """Start the handler call's span and make it current for the handler."""
        kind = _event_type(event)
        attributes: _Attributes = {
            "messaging.system": _SYSTEM,
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
            "chatfeed.event.type": kind,
            "chatfeed.handler": handler,
        }
        source = getattr(event, "source", None)
        if isinstance(source, str):
            attributes["chatfeed.event.source"] = source
        if feed is not None:
            attributes["chatfeed.feed"] = feed
        if isinstance(event, NewMessage):
            attributes["messaging.message.id"] = event.payload.id
            attributes["messaging.message.conversation_id"] = event.payload.chat_id
        elif isinstance(event, NewChat):
            attributes["messaging.message.conversation_id"] = event.payload.id
        span = self._tracer.start_span(
            f"process {kind}", context=_ROOT, kind=trace.SpanKind.CONSUMER, attributes=attributes
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        return _Call(span, token)

    def handler_finished(
        self,
        feed: str | None,
        event: Any,
        *,
        handler: str,
        duration: float,
        error: BaseException | None,
        started: object,
    ) -> None:
        """Record the call's duration; end its span, with status ERROR and the exception when it raised.

        A call cancelled (by ``close()``, past ``drain_timeout``) did not fail:
        no ``error.type``; its span says ``chatfeed.cancelled``.
        """
        cancelled = isinstance(error, asyncio.CancelledError)
        if cancelled:
            error = None
        kind = _event_type(event)
        key = (kind, handler, feed if self._feed_attribute else None)
        attributes = self._processed.get(key)
        if attributes is None:
            attributes = self._processed[key] = self._feed(
                {
                    "messaging.system": _SYSTEM,
                    "messaging.operation.name": "process",
                    "chatfeed.event.type": kind,
                    "chatfeed.handler": handler,
                },
                feed,
            )
        if error is not None:
            attributes = {**attributes, "error.type": type(error).__qualname__}
        self._instruments.process_duration.record(duration, attributes)
        if not isinstance(started, _Call):  # handler_started failed, and was logged
            return
        span = started.span
        try:
            if cancelled:
                span.set_attribute("chatfeed.cancelled", True)
            elif error is not None:
                span.set_attribute("error.type", type(error).__qualname__)
                span.record_exception(error)
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__qualname__))
            span.end()
        finally:
            otel_context.detach(started.token)

    def backpressure(self, feed: str | None, *, engaged: bool, where: str) -> None:
        """Count the buffer filling up; keep the number of buffers full right now."""
        attributes = self._feed({"chatfeed.buffer": where}, feed)
        instruments = self._instruments
        if engaged:
            instruments.backpressure.add(1, attributes)
        instruments.backpressure_active.add(1 if engaged else -1, attributes)

    # The bridge and the consumer

    def published(self, record: Record, *, stored: bool, duration: float) -> None:
        """Count the published record (``chatfeed.stored``) and record how long the broker took."""
        attributes = self._feed(
            {
                "messaging.system": _SYSTEM,
                "messaging.operation.name": "publish",
                "chatfeed.event.type": _record_type(record),
                "chatfeed.stored": stored,
            },
            record.feed,
        )
        instruments = self._instruments
        instruments.sent.add(1, attributes)
        instruments.publish_duration.record(duration, attributes)

    def publish_failed(self, record: Record, *, error: BaseException, attempt: int) -> None:
        """Count the failed publish, with ``error.type``."""
        attributes: _Attributes = {
            "messaging.system": _SYSTEM,
            "messaging.operation.name": "publish",
            "chatfeed.event.type": _record_type(record),
            "error.type": type(error).__qualname__,
        }
        self._instruments.sent.add(1, self._feed(attributes, record.feed))

    def acknowledged(self, feed: str, event: FeedEvent) -> None:
        """Count the event as settled: ``acknowledged``."""
        self._settled("acknowledged", feed, event)

    def redelivery(self, feed: str, event: FeedEvent, *, attempt: int, delay: float) -> None:
        """Count the event as settled: ``redelivered``."""
        self._settled("redelivered", feed, event)

    def dead_lettered(self, feed: str | None, event: FeedEvent | None, *, attempts: int) -> None:
        """Count the event as settled: ``dead_lettered`` (without an event type when it was unreadable)."""
        self._settled("dead_lettered", feed, event)

    # Inside

    def _settled(self, outcome: str, feed: str | None, event: FeedEvent | None) -> None:
        attributes: _Attributes = {"chatfeed.outcome": outcome}
        if event is not None:
            attributes["chatfeed.event.type"] = _event_type(event)
        self._instruments.settled.add(1, self._feed(attributes, feed))

    def _feed(self, attributes: _Attributes, feed: str | None) -> _Attributes:
        if feed is not None and self._feed_attribute:
            attributes["chatfeed.feed"] = feed
        return attributes

    def _received_attributes(self, kind: str, source: str, feed: str | None) -> tuple[_Attributes, _Attributes]:
        consumed = self._feed(
            {
                "messaging.system": _SYSTEM,
                "messaging.operation.name": "receive",
                "chatfeed.event.type": kind,
                "chatfeed.event.source": source,
            },
            feed,
        )
        lag = self._feed({"chatfeed.event.type": kind, "chatfeed.event.source": source}, feed)
        return consumed, lag

    def _ages(self) -> Iterable[tuple[str | None, float]]:
        now = _monotonic()
        last = self._last_event.copy()  # atomic: the loop may add a feed while an exporter's thread reads
        if self._feed_attribute:
            return [(feed, now - at) for feed, at in last.items()]
        # The freshest feed's: whether events still arrive at all (the per-feed ages say which feed is quiet).
        return [(None, now - max(last.values()))] if last else []

    def _statistics(self, *, forget: bool) -> _Snapshot | None:
        """Read the subjects' statistics on their event loop; ``None`` when it did not answer in time.

        With ``forget``, a subject that is gone or closed is forgotten (a
        closed one after this reading, which reports it closed).
        """
        subjects = self._subjects
        if not subjects.running():
            # Nothing changes any more: read here. A MeterProvider shut down on
            # the loop, once the subjects are closed, then does not wait for it.
            return subjects.read(forget=forget)
        try:
            return self._reader.read(lambda: subjects.read(forget=forget), timeout=_READ_TIMEOUT)
        except TimeoutError:
            logger.debug("OpenTelemetryObserver: the event loop did not answer within %s s", _READ_TIMEOUT)
            return None


class _Call:
    """One handler call's span, and the token that made it current."""

    __slots__ = ("span", "token")

    def __init__(self, span: trace.Span, token: Token[otel_context.Context]) -> None:
        self.span = span
        self.token = token


_KNOWN_TYPES = frozenset({"new_message", "new_chat", "error"})
"""The event types a bridge's record names as they are; any other is the server's, reported as ``unknown``."""

_ROOT = otel_context.Context()
"""An empty context: a handler call's span has no parent."""


def _event_type(event: object) -> str:
    # An unknown type is the server's to name: as an attribute, a bounded "unknown".
    if isinstance(event, UnknownMessage):
        return "unknown"
    kind = getattr(event, "type", None)
    return kind if isinstance(kind, str) else type(event).__name__


def _record_type(record: Record) -> str:
    kind = record.type
    return kind if kind in _KNOWN_TYPES else "unknown"


class _Snapshot:
    """What the subjects' statistics say: feeds by state (``None``: no client nor pool), events by buffer."""

    __slots__ = ("buffers", "states")

    def __init__(self) -> None:
        self.states: collections.Counter[str] | None = None
        self.buffers: collections.Counter[str] = collections.Counter()


class _Subjects:
    """The clients, pools, bridges and consumers an observer reports on, weakly held: it must not keep them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: list[weakref.ref[object]] = []
        self._unknown: set[str] = set()  # types whose statistics() were not understood, logged once

    def add(self, subject: object) -> None:
        try:
            ref = weakref.ref(subject)
        except TypeError:  # chatfeed's own can all be: this is something else
            logger.debug(
                "OpenTelemetryObserver: %s cannot be referenced weakly: not reported", type(subject).__qualname__
            )
            return
        with self._lock:
            self._refs.append(ref)

    def running(self) -> bool:
        """Whether a subject is alive and not closed: one whose statistics may change."""
        with self._lock:
            refs = list(self._refs)
        return any(subject is not None and not closed(subject) for subject in (ref() for ref in refs))

    def read(self, *, forget: bool) -> _Snapshot:
        snapshot = _Snapshot()
        done: list[weakref.ref[object]] = []
        with self._lock:
            refs = list(self._refs)
        for ref in refs:
            subject = ref()
            if subject is None or _closed(subject):
                done.append(ref)
                continue
            try:
                statistics = subject.statistics()  # type: ignore[attr-defined]  # checked by attached()
            except Exception:
                logger.debug("OpenTelemetryObserver: %r.statistics() raised", subject, exc_info=True)
                continue
            if getattr(statistics, "state", None) == "closed":
                done.append(ref)  # a client or consumer reported closed this once: it will not change again
            self._add(snapshot, subject, statistics)
        if done and forget:
            forgotten = {id(ref) for ref in done}
            with self._lock:
                self._refs = [ref for ref in self._refs if id(ref) not in forgotten]
        return snapshot

    def _add(self, snapshot: _Snapshot, subject: object, statistics: object) -> None:
        if isinstance(statistics, (ClientStatistics, PoolStatistics)):
            states = snapshot.states
            if states is None:
                states = snapshot.states = collections.Counter(dict.fromkeys(_FEED_STATES, 0))
            if isinstance(statistics, ClientStatistics):
                states[statistics.state] += 1
            else:
                states["connecting"] += statistics.connecting
                states["authenticating"] += statistics.authenticating
                states["open"] += statistics.up
                states["backing_off"] += statistics.backing_off
                states["failed"] += statistics.failed
            snapshot.buffers["events"] += statistics.buffered_events
            for handler in statistics.handlers:
                snapshot.buffers[handler.name] += handler.queued
            return
        from .bridge import BridgeStatistics, ConsumerStatistics

        if isinstance(statistics, BridgeStatistics):
            snapshot.buffers["bridge"] += statistics.held
        elif isinstance(statistics, ConsumerStatistics):
            snapshot.buffers["consumer"] += statistics.in_flight
        elif type(subject).__qualname__ not in self._unknown:
            self._unknown.add(type(subject).__qualname__)
            logger.debug("OpenTelemetryObserver: nothing to report from %s's statistics()", type(subject).__qualname__)


def _closed(subject: object) -> bool:
    """Whether ``subject`` is a pool or a bridge that was closed (their statistics do not say)."""
    from .bridge import Bridge

    return isinstance(subject, (Pool, Bridge)) and subject._state == "closed"


class _Instruments:
    """The instruments of one meter provider, shared by every observer that records there.

    The SDK makes an instrument once per name: a second observer asking for
    it gets the first one's, callbacks included. So the callbacks of the
    gauges are these, and add up what each observer of the provider reports.
    """

    def __init__(self, meter: metrics.Meter) -> None:
        self.observers: weakref.WeakSet[OpenTelemetryObserver] = weakref.WeakSet()
        self.consumed = meter.create_counter(
            "messaging.client.consumed.messages",
            unit="{message}",
            description="Events delivered to the application: live, backfilled, or fetched from a broker.",
        )
        self.process_duration = meter.create_histogram(
            "messaging.process.duration",
            unit="s",
            description="Duration of a handler's call.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.lag = meter.create_histogram(
            "chatfeed.event.lag",
            unit="s",
            description="Time from an event's created_at to its delivery.",
            explicit_bucket_boundaries_advisory=_LAG_BUCKETS,
        )
        self.connections = meter.create_counter(
            "chatfeed.connections", unit="{connection}", description="Connections authenticated."
        )
        self.downtime = meter.create_histogram(
            "chatfeed.reconnect.downtime",
            unit="s",
            description="Time from a lost connection to the next authenticated one.",
            explicit_bucket_boundaries_advisory=_LAG_BUCKETS,
        )
        self.disconnects = meter.create_counter(
            "chatfeed.disconnects", unit="{disconnect}", description="Authenticated connections that ended."
        )
        self.duplicates = meter.create_counter(
            "chatfeed.duplicates.dropped", unit="{event}", description="Events dropped by dedupe as repeats."
        )
        self.backfills = meter.create_counter("chatfeed.backfills", unit="{backfill}", description="Backfills run.")
        self.backfilled_events = meter.create_counter(
            "chatfeed.backfill.events", unit="{event}", description="Events fetched by backfills."
        )
        self.backpressure = meter.create_counter(
            "chatfeed.backpressure.engagements",
            unit="{engagement}",
            description="Times a full buffer stopped the reading of the feeds.",
        )
        self.backpressure_active = meter.create_up_down_counter(
            "chatfeed.backpressure.active",
            unit="{buffer}",
            description=(
                "Full buffers holding feeds back now: a feed each for events() and a handler's lanes; "
                "1 for a bridge's or a consumer's window, which holds every feed."
            ),
        )
        self.sent = meter.create_counter(
            "messaging.client.sent.messages", unit="{message}", description="Records a bridge published, or tried to."
        )
        self.publish_duration = meter.create_histogram(
            "messaging.client.operation.duration",
            unit="s",
            description="Time a bridge's broker took to acknowledge a record.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.settled = meter.create_counter(
            "chatfeed.consumer.settled", unit="{message}", description="Events a consumer settled, by outcome."
        )
        instruments = weakref.ref(self)  # the meter's callbacks must not keep observers alive
        meter.create_observable_gauge(
            "chatfeed.feed.last_event.age",
            callbacks=[lambda options: _observe(instruments, _Instruments.ages)],
            unit="s",
            description="Seconds since a feed's last event (without chatfeed.feed: the freshest feed's).",
        )
        meter.create_observable_up_down_counter(
            "chatfeed.feed.count",
            callbacks=[lambda options: _observe(instruments, _Instruments.feeds)],
            unit="{feed}",
            description="Feeds by state.",
        )
        meter.create_observable_up_down_counter(
            "chatfeed.buffer.depth",
            callbacks=[lambda options: _observe(instruments, _Instruments.buffers)],
            unit="{event}",
            description="Events waiting in a buffer: events() streams, concurrent handlers, a bridge, a consumer.",
        )

    def ages(self) -> list[metrics.Observation]:
        # The freshest: of every observer's feeds, and of a feed two observers report.
        freshest: float | None = None
        points: dict[str, float] = {}
        for observer in list(self.observers):
            for feed, age in observer._ages():
                if feed is None:
                    freshest = age if freshest is None else min(freshest, age)
                else:
                    points[feed] = min(age, points.get(feed, age))
        observations = [metrics.Observation(age, {"chatfeed.feed": feed}) for feed, age in points.items()]
        if freshest is not None:
            observations.append(metrics.Observation(freshest))
        return observations

    def feeds(self) -> list[metrics.Observation]:
        states: collections.Counter[str] | None = None
        # The reading that forgets closed subjects: this one reports them closed, once.
        for snapshot in self._snapshots(forget=True):
            if snapshot.states is not None:
                states = snapshot.states if states is None else states + snapshot.states
        if states is None:
            return []
        # Counter's + drops zeros; every state is reported, a zero included.
        return [metrics.Observation(states[state], {"chatfeed.feed.state": state}) for state in _FEED_STATES]

    def buffers(self) -> list[metrics.Observation]:
        buffers: collections.Counter[str] = collections.Counter()
        for snapshot in self._snapshots(forget=False):
            for name, depth in snapshot.buffers.items():
                buffers[name] += depth
        return [metrics.Observation(depth, {"chatfeed.buffer": name}) for name, depth in buffers.items()]

    def _snapshots(self, *, forget: bool) -> list[_Snapshot]:
        snapshots = [observer._statistics(forget=forget) for observer in list(self.observers)]
        return [snapshot for snapshot in snapshots if snapshot is not None]


def _observe(
    instruments: weakref.ref[_Instruments], callback: Callable[[_Instruments], list[metrics.Observation]]
) -> list[metrics.Observation]:
    alive = instruments()
    return [] if alive is None else callback(alive)


_registry_lock = threading.Lock()
_registry: weakref.WeakKeyDictionary[metrics.MeterProvider, _Instruments] = weakref.WeakKeyDictionary()
_kept: dict[int, tuple[metrics.MeterProvider, _Instruments]] = {}  # providers that cannot be referenced weakly


def _instruments_of(provider: metrics.MeterProvider) -> _Instruments:
    """Return the instruments of ``provider``, made the first time it is asked for."""
    with _registry_lock:
        try:
            instruments = _registry.get(provider)
        except TypeError:
            kept = _kept.get(id(provider))
            instruments = None if kept is None else kept[1]
        if instruments is None:
            instruments = _Instruments(provider.get_meter("chatfeed", __version__))
            try:
                _registry[provider] = instruments
            except TypeError:
                _kept[id(provider)] = (provider, instruments)
        return instruments
