"""Prometheus metrics and health checks: an observer that counts, and a small server that answers scrapes and probes.

Needs the ``prometheus`` extra: ``pip install 'chatfeed[prometheus]'``
(prometheus-client). ``import chatfeed`` does not import this module.

- [`PrometheusObserver`][chatfeed.prometheus.PrometheusObserver] is an
  [`Observer`][chatfeed.Observer]: give it to a client, a pool, a bridge or a
  consumer, and it keeps ``chatfeed_*`` metrics in a
  ``prometheus_client.CollectorRegistry``.
- [`MetricsServer`][chatfeed.prometheus.MetricsServer] serves that registry
  on ``/metrics``, and ``/healthz`` and ``/readyz`` for probes, from the
  event loop: no thread.
- [`readiness`][chatfeed.prometheus.readiness] says whether a client, a pool,
  a bridge or a consumer is ready, and why.

Example:
    ```python
    from chatfeed.prometheus import MetricsServer, PrometheusObserver

    metrics = PrometheusObserver()
    pool = chatfeed.Pool(url, observer=metrics)
    ...
    async with MetricsServer("127.0.0.1", 9464, registry=metrics.registry, ready=metrics.readiness):
        await pool.run()
    ```
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

from typing_extensions import Self

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.metrics_core import Metric
except ImportError as exc:  # pragma: no cover - run by a test in a subprocess
    raise ImportError(
        "chatfeed.prometheus needs prometheus-client: pip install 'chatfeed[prometheus]'", name=exc.name
    ) from exc

from ._client import Client, ClientState
from ._collect import LoopReader, closed
from ._observe import Observer
from ._pool import Pool
from .bridge import Bridge, Consumer, Record
from .exceptions import ChatfeedError, UsageError
from .models import FeedEvent, NewChat, NewMessage, UnknownMessage

__all__ = ["MetricsServer", "PrometheusObserver", "Readiness", "readiness"]

logger = logging.getLogger("chatfeed")

LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
"""The event lag histogram's buckets, in seconds: a backfill after a long outage lands in the last ones."""

_STATES = ("unopened", "connecting", "authenticating", "open", "backing_off", "closed", "failed")
"""The values of ``chatfeed_feeds``'s ``state`` label: a client's states, and a pool's feeds stopped for good."""

_READ_TIMEOUT = 1.0
"""Seconds a collection on another thread waits for the event loop to read what the observer observes."""


# Readiness


@dataclasses.dataclass(frozen=True)
class Readiness:
    """Whether something is ready, and why, in one line: what ``/readyz`` answers.

    Attributes:
        ready: Whether it is.
        reason: Why, for a person: ``"ready: 9 of 10 feeds up (need 90%)"``.
    """

    ready: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ready


def readiness(subject: object, *, fraction: float = 0.9) -> Readiness:
    """Return whether ``subject`` is ready to do its work.

    - A [`Client`][chatfeed.Client] is ready while its state is ``open``
      (connected and authenticated).
    - A [`Pool`][chatfeed.Pool] is ready while it runs and at least
      ``fraction`` of its feeds are up (a feed stopped for good counts as not
      up). A running pool with no feeds is ready: a bridge of a group may hold
      none, and is no less able to take some.
    - A [`Bridge`][chatfeed.bridge.Bridge] is ready while it runs, its broker
      takes its publishes, and its pool is ready.
    - A [`Consumer`][chatfeed.bridge.Consumer] is ready from when it has
      joined its durable on the broker until it closes, except while its
      fetches fail (``ConsumerStatistics.broker_up``).

    Args:
        subject: What to check.
        fraction: The share of a pool's feeds that must be up, above 0 and at most 1.

    Raises:
        UsageError: ``subject`` is none of those, or ``fraction`` is out of range.
    """
    _check_fraction(fraction)
    if isinstance(subject, Client):
        state = subject.statistics().state
        return Readiness(
            state == "open", "ready: connected" if state == "open" else f"not ready: the client is {state}"
        )
    if isinstance(subject, Pool):
        return _pool_readiness(subject, fraction)
    if isinstance(subject, Bridge):
        bridge_state = subject._state
        if bridge_state != "running":
            doing = "reaching the broker" if bridge_state == "starting" else bridge_state
            return Readiness(False, f"not ready: the bridge is {doing}")
        if not subject.statistics().broker_up:
            return Readiness(False, "not ready: the broker is away (publishes fail)")
        return _pool_readiness(subject.pool, fraction)
    if isinstance(subject, Consumer):
        consumer = subject.statistics()
        if consumer.state != "running":
            return Readiness(False, f"not ready: the consumer is {consumer.state}")
        if subject._fetcher is None:  # made once the consumer has joined its durable
            return Readiness(False, "not ready: the consumer is reaching the broker")
        if not consumer.broker_up:
            return Readiness(False, "not ready: fetching from the broker fails")
        return Readiness(True, "ready: consuming")
    raise UsageError(f"readiness is that of a Client, a Pool, a Bridge or a Consumer, not {subject!r}")


def _pool_readiness(pool: Pool, fraction: float) -> Readiness:
    if pool._state != "running":
        return Readiness(
            False,
            "not ready: the pool has not started" if pool._state == "unopened" else "not ready: the pool is closed",
        )
    stats = pool.statistics()
    if not stats.feeds:
        return Readiness(True, "ready: no feeds to hold")
    ready = stats.up / stats.feeds >= fraction
    return Readiness(
        ready, f"{'ready' if ready else 'not ready'}: {stats.up} of {stats.feeds} feeds up (need {fraction * 100:g}%)"
    )


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise UsageError(f"fraction must be a number above 0 and at most 1, not {fraction!r}")


# The observer


class PrometheusObserver(Observer):
    """Keeps Prometheus metrics of what it observes: events, lag, connections, feeds, handlers, the bridge.

    Give it as ``observer=`` to a [`Client`][chatfeed.Client], a
    [`Pool`][chatfeed.Pool], a [`Bridge`][chatfeed.bridge.Bridge] or a
    [`Consumer`][chatfeed.bridge.Consumer] (one observer may observe several:
    the scrape-time figures are their sums; give a bridge and its pool the
    same one, as the pool reports the feeds' moments), and serve `registry`, with a
    [`MetricsServer`][chatfeed.prometheus.MetricsServer] or any exporter of
    prometheus-client. Every metric is named ``chatfeed_*``; no label ever
    holds a token or a message's content, and every label's values are few
    (event types, close codes, states, handler names) except ``feed``, which
    ``per_feed=False`` leaves out.

    The figures read from what it observes (feeds by state, buffered events,
    the age of the last event) are computed when the registry is collected,
    on the event loop: a collection from another thread (prometheus-client's
    ``start_http_server``, or the application's, beside a ``chatfeed.sync``
    client) hands the reading to the loop and waits up to a second for it.
    It holds what it observes weakly, and forgets a client, pool, bridge or
    consumer once a collection has reported it closed.

    Args:
        registry: Where the metrics go; ``None`` for a registry of its own
            (not prometheus-client's global ``REGISTRY``), so that two
            observers in one process never clash. Give ``REGISTRY`` to serve
            them with your application's metrics.
        per_feed: Whether ``chatfeed_last_event_age_seconds`` has a series per
            feed (label ``feed``; a lone client's is ``""``), or one: the
            freshest feed's, the time since the last event of any feed. Leave
            it out for pools of thousands of feeds, or whose feeds come and go.

    Raises:
        UsageError: ``registry`` has chatfeed's metrics already.
    """

    def __init__(self, *, registry: CollectorRegistry | None = None, per_feed: bool = True) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        self.per_feed = per_feed
        self._subjects: list[weakref.ref[object]] = []
        self._subjects_lock = threading.Lock()  # a sync client is made on its caller's thread, read on its loop's
        self._reader = LoopReader()  # the loop the subjects run on, seen by a hook
        self._last_event: dict[str | None, float] = {}  # feed (or None: any, without per_feed) to monotonic time
        # The metrics' children of each event class, and of each handler and
        # event class, looked up once: a label lookup takes a lock.
        self._received: dict[type[Any], Callable[[str | None, Any], None]] = {}
        self._handlers: dict[tuple[str, type[Any]], tuple[Callable[[float], None], Callable[[], None]]] = {}
        registry = self.registry
        try:
            self._make_metrics(registry)
            self._collector = _ScrapeCollector(self)
            registry.register(self._collector)
        except ValueError as exc:  # prometheus-client's DuplicateTimeseries
            raise UsageError(
                f"this registry has chatfeed's metrics already ({exc}): give each PrometheusObserver a registry "
                "of its own, or observe everything with one"
            ) from None

    def _make_metrics(self, registry: CollectorRegistry) -> None:
        self._events = Counter(
            "chatfeed_events_received",
            "Events received, by type (live, backfilled or fetched).",
            ["type"],
            registry=registry,
        )
        self._lag = Histogram(
            "chatfeed_event_lag_seconds",
            "Seconds from a message's or a chat's created_at to its arrival, by type and source (live or backfill).",
            ["type", "source"],
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self._reconnects = Counter(
            "chatfeed_reconnects",
            "Connections lost and retried, by close code (1006: dropped without a closing handshake).",
            ["code"],
            registry=registry,
        )
        self._handler_duration = Histogram(
            "chatfeed_handler_duration_seconds",
            "Seconds each handler call took, by handler and event type.",
            ["handler", "type"],
            registry=registry,
        )
        self._handler_errors = Counter(
            "chatfeed_handler_errors",
            "Handler calls that raised, by handler and event type.",
            ["handler", "type"],
            registry=registry,
        )
        self._duplicates = Counter(
            "chatfeed_duplicates_dropped", "Events dropped by dedupe: seen already.", registry=registry
        )
        self._backfilled = Counter("chatfeed_backfilled_events", "Events fetched by backfills.", registry=registry)
        self._backfill_errors = Counter("chatfeed_backfill_errors", "Backfills that failed.", registry=registry)
        self._backpressure = Counter(
            "chatfeed_backpressure_engaged",
            "Times a full buffer stopped feeds being read, by where (events, a handler, bridge, consumer).",
            ["where"],
            registry=registry,
        )
        self._backpressure_active = Gauge(
            "chatfeed_backpressure_active",
            "Waits for room in a full buffer now, by where: a feed each for events and a handler's lanes; "
            "1 while a bridge's or a consumer's window is full (every feed waits).",
            ["where"],
            registry=registry,
        )
        self._published = Counter(
            "chatfeed_bridge_published",
            "Records the broker acknowledged, by stored (false: it had them already).",
            ["stored"],
            registry=registry,
        )
        self._publish_duration = Histogram(
            "chatfeed_bridge_publish_duration_seconds",
            "Seconds from publishing a record to the broker's acknowledgement.",
            registry=registry,
        )
        self._publish_failed = Counter(
            "chatfeed_bridge_publish_failed", "Publishes that failed, to be tried again.", registry=registry
        )
        self._acknowledged = Counter(
            "chatfeed_consumer_acknowledged", "Events a consumer acknowledged.", registry=registry
        )
        self._redeliveries = Counter(
            "chatfeed_consumer_redeliveries", "Events whose handler failed, to be delivered again.", registry=registry
        )
        self._dead_lettered = Counter(
            "chatfeed_consumer_dead_lettered", "Events given up after max_deliver failures.", registry=registry
        )

    def __repr__(self) -> str:
        return f"<chatfeed.prometheus.PrometheusObserver subjects={len(self._subjects)} per_feed={self.per_feed}>"

    # What it observes

    def attached(self, subject: object) -> None:
        """Remember ``subject``, weakly, to read its statistics when the metrics are collected."""
        self._reader.see_loop()
        with self._subjects_lock:
            if not any(subject is ref() for ref in self._subjects):
                self._subjects.append(weakref.ref(subject))

    def readiness(self, *, fraction: float = 0.9) -> Readiness:
        """Return whether everything observed is ready (see [`readiness`][chatfeed.prometheus.readiness]).

        Not ready while nothing is observed; else the first of them not ready
        says why, or the last one says that it is.
        """
        _check_fraction(fraction)
        if not self._running():
            return self._readiness(fraction)
        try:
            return self._reader.read(lambda: self._readiness(fraction), timeout=_READ_TIMEOUT)
        except TimeoutError:
            return Readiness(False, f"not ready: the event loop did not answer within {_READ_TIMEOUT:g} s")

    def _readiness(self, fraction: float) -> Readiness:
        answer = Readiness(False, "not ready: nothing observed (yet, or any more)")
        for subject in self._top_subjects():
            answer = readiness(subject, fraction=fraction)
            if not answer:
                return answer
        return answer

    def _alive(self) -> list[object]:
        """The subjects still alive (the others' references are dropped)."""
        with self._subjects_lock:
            subjects = [ref() for ref in self._subjects]
            if any(subject is None for subject in subjects):
                self._subjects = [ref for ref in self._subjects if ref() is not None]
        return [subject for subject in subjects if subject is not None]

    def _running(self) -> bool:
        """Whether a subject is alive and not closed: else nothing changes any more, on any thread."""
        return any(not closed(subject) for subject in self._alive())

    def _forget_closed(self) -> None:
        """Forget the subjects that are closed: a collection has just reported them so."""
        with self._subjects_lock:
            self._subjects = [ref for ref in self._subjects if (alive := ref()) is not None and not closed(alive)]

    def _top_subjects(self) -> list[object]:
        """The subjects, without the pools of observed bridges: the bridge speaks for its pool."""
        subjects = self._alive()
        bridged = [subject.pool for subject in subjects if isinstance(subject, Bridge)]
        return [subject for subject in subjects if not any(subject is pool for pool in bridged)]

    def _feed_holders(self) -> list[Client | Pool]:
        """The clients and pools observed, each once, a bridge's pool included."""
        holders: list[Client | Pool] = []
        for subject in self._alive():
            holder = subject.pool if isinstance(subject, Bridge) else subject
            if isinstance(holder, (Client, Pool)) and not any(holder is kept for kept in holders):
                holders.append(holder)
        return holders

    # The moments

    def connecting(self, feed: str | None, *, attempt: int) -> None:
        """Note the event loop the feeds run on."""
        self._reader.see_loop()

    def state_changed(self, feed: str | None, state: ClientState) -> None:
        """Note the event loop; forget the last event of a feed that closed: its age would grow for ever."""
        self._reader.see_loop()
        if state == "closed" and self.per_feed:
            self._last_event.pop(feed, None)

    def disconnected(
        self, feed: str | None, *, code: int | None, reason: str, error: ChatfeedError, retry_in: float | None
    ) -> None:
        """Count a reconnect by its close code, when one follows."""
        if retry_in is not None:
            self._reconnects.labels("none" if code is None else str(code)).inc()

    def event_received(self, feed: str | None, event: FeedEvent) -> None:
        """Count ``event``, time its lag, and note when ``feed`` last had one."""
        if self._reader.loop is None:
            self._reader.see_loop()  # a consumer has no connection hooks
        received = self._received.get(event.__class__)
        if received is None:
            received = self._received[event.__class__] = self._receiver(event)
        received(feed, event)

    def _receiver(self, event: FeedEvent) -> Callable[[str | None, Any], None]:
        """Return what counts an event of ``event``'s class: its metrics' children, looked up once."""
        kind = _type_of(event)
        counted = self._events.labels(kind).inc
        last_event = self._last_event
        clock = time.monotonic
        per_feed = self.per_feed
        if event.__class__ not in (NewMessage, NewChat):

            def count(feed: str | None, event: Any) -> None:
                counted()
                last_event[feed if per_feed else None] = clock()

            return count
        lags = {source: self._lag.labels(kind, source).observe for source in ("live", "backfill")}
        now = time.time

        def count_and_time(feed: str | None, event: Any) -> None:
            counted()
            last_event[feed if per_feed else None] = clock()
            # A clock behind the server's would make it negative: it is no lag.
            lags.get(event.source, lags["live"])(max(now() - event.payload.created_at.timestamp(), 0.0))

        return count_and_time

    def duplicate_dropped(self, feed: str | None, event: FeedEvent) -> None:
        """Count a duplicate dropped."""
        self._duplicates.inc()

    def backfilled(self, feed: str | None, *, gap: Any, events: int, error: Exception | None) -> None:
        """Count the events a backfill fetched, and the backfill if it failed."""
        self._backfilled.inc(events)
        if error is not None:
            self._backfill_errors.inc()

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
        """Time the handler's call; count it if it raised."""
        key = (handler, event.__class__)
        children = self._handlers.get(key)
        if children is None:
            kind = _type_of(event)
            children = self._handlers[key] = (
                self._handler_duration.labels(handler, kind).observe,
                self._handler_errors.labels(handler, kind).inc,
            )
        observe, count_error = children
        observe(duration)
        if error is not None and not isinstance(error, asyncio.CancelledError):
            count_error()

    def backpressure(self, feed: str | None, *, engaged: bool, where: str) -> None:
        """Count backpressure engaged, and keep how many feeds it holds up now."""
        if engaged:
            self._backpressure.labels(where).inc()
            self._backpressure_active.labels(where).inc()
        else:
            self._backpressure_active.labels(where).dec()

    def published(self, record: Record, *, stored: bool, duration: float) -> None:
        """Count a record the broker acknowledged, and time it."""
        self._published.labels("true" if stored else "false").inc()
        self._publish_duration.observe(duration)

    def publish_failed(self, record: Record, *, error: BaseException, attempt: int) -> None:
        """Count a failed publish."""
        self._publish_failed.inc()

    def acknowledged(self, feed: str, event: FeedEvent) -> None:
        """Count an acknowledged event."""
        self._acknowledged.inc()

    def redelivery(self, feed: str, event: FeedEvent, *, attempt: int, delay: float) -> None:
        """Count a redelivery."""
        self._redeliveries.inc()

    def dead_lettered(self, feed: str | None, event: FeedEvent | None, *, attempts: int) -> None:
        """Count a dead-lettered event."""
        self._dead_lettered.inc()


def _type_of(event: Any) -> str:
    """The ``type`` label of ``event``: its type, ``unknown`` for every type this version does not know."""
    if isinstance(event, UnknownMessage):
        return "unknown"  # the server's own word: any number of them
    kind = getattr(event, "type", None)
    return kind if isinstance(kind, str) else "other"


class _ScrapeCollector:
    """The observer's figures that are read from what it observes when the registry is collected."""

    def __init__(self, observer: PrometheusObserver) -> None:
        self._observer = observer

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        families = {family.name: family for family in self._families()}
        observer = self._observer
        if not observer._running():
            # Nothing changes any more: read here. Then the closed ones, reported once, are forgotten.
            self._read(families)
            return list(families.values())
        try:
            observer._reader.read(lambda: self._read(families), timeout=_READ_TIMEOUT)
        except TimeoutError:  # a loop blocked: this scrape has the counters, not these figures
            logger.debug("PrometheusObserver: the event loop did not answer within %s s", _READ_TIMEOUT)
            families = {family.name: family for family in self._families()}
        return list(families.values())

    def _read(self, families: dict[str, GaugeMetricFamily]) -> None:
        """Add what the observer observes to ``families``; on the event loop, unless nothing runs any more."""
        observer = self._observer
        states = dict.fromkeys(_STATES, 0)
        buffered = 0
        for holder in observer._feed_holders():
            if isinstance(holder, Client):
                stats = holder.statistics()
                states[stats.state] += 1
                buffered += stats.buffered_events
            else:
                pool = holder.statistics()
                buffered += pool.buffered_events
                states["connecting"] += pool.connecting
                states["authenticating"] += pool.authenticating
                states["open"] += pool.up
                states["backing_off"] += pool.backing_off
                states["failed"] += pool.failed
                rest = pool.feeds - pool.connecting - pool.authenticating - pool.up - pool.backing_off - pool.failed
                states["unopened" if holder._state == "unopened" else "closed"] += rest
        for state, count in states.items():
            families["chatfeed_feeds"].add_metric([state], count)
        families["chatfeed_buffered_events"].add_metric([], buffered)
        self._ages(families["chatfeed_last_event_age_seconds"])
        held = up = 0
        bridges = consumers = in_flight = 0
        for subject in observer._alive():
            if isinstance(subject, Bridge):
                bridged = subject.statistics()
                bridges += 1
                held += bridged.held
                up += bridged.broker_up
            elif isinstance(subject, Consumer):
                consumers += 1
                in_flight += subject.statistics().in_flight
        if bridges:
            families["chatfeed_bridge_held_records"].add_metric([], held)
            families["chatfeed_bridge_broker_up"].add_metric([], up / bridges)
        if consumers:
            families["chatfeed_consumer_in_flight"].add_metric([], in_flight)
        observer._forget_closed()

    def _ages(self, family: GaugeMetricFamily) -> None:
        observer = self._observer
        last_event = observer._last_event.copy()  # atomic: read here when no loop is known, hooks may write
        if not last_event:
            return
        now = time.monotonic()
        if not observer.per_feed:
            family.add_metric([], now - last_event[None])
            return
        holders = observer._feed_holders()
        pools = [holder for holder in holders if isinstance(holder, Pool)]
        if pools and len(pools) == len(holders) == len(observer._top_subjects()):
            # Only pools observed (a bridge's, maybe): a feed that left them
            # (a group moved it away) has no series any more.
            present: set[str | None] = set()
            for pool in pools:
                present.update(pool.feeds())
            for gone in [feed for feed in last_event if feed not in present]:
                del last_event[gone]
                observer._last_event.pop(gone, None)
        for feed, at in last_event.items():
            family.add_metric(["" if feed is None else feed], now - at)

    def _families(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "chatfeed_feeds",
            "Feeds (a lone client is one) by state; failed: a pool's feeds stopped for good.",
            labels=["state"],
        )
        yield GaugeMetricFamily("chatfeed_buffered_events", "Events waiting in events() streams' buffers.")
        yield GaugeMetricFamily(
            "chatfeed_last_event_age_seconds",
            "Seconds since the last event arrived, per feed (without per_feed: of any feed, the freshest's).",
            labels=["feed"] if self._observer.per_feed else [],
        )
        yield GaugeMetricFamily(
            "chatfeed_bridge_held_records", "Records a bridge received and the broker has not stored yet."
        )
        yield GaugeMetricFamily(
            "chatfeed_bridge_broker_up", "1 while the bridge's broker takes its publishes, 0 while they fail."
        )
        yield GaugeMetricFamily("chatfeed_consumer_in_flight", "Events a consumer fetched and has not settled yet.")


# The server


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

_TEXT = "text/plain; charset=utf-8"

_LINGER = 1.0
"""Seconds a connection is read (and what comes discarded) after its answer, before it is closed.

Closing a socket with unread data sends a reset, which can destroy the answer
before the client reads it (an oversized request is answered unread).
"""


class MetricsServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` over HTTP/1.1, from the event loop.

    - ``GET /metrics``: the registry in Prometheus's text format.
    - ``GET /healthz``: 200 ``ok`` whenever the event loop answers at all.
    - ``GET /readyz``: 200 or 503, with ``ready`` 's one-line reason as the
      body (``not ready: 3 of 10 feeds up (need 90%)``); 200 when there is no
      ``ready``.
    - ``HEAD`` of each; 404 for any other path, 405 for any other method.

    One request per connection, closed after the answer. A request's head
    must arrive within ``read_timeout`` and fit in ``max_request_size``
    bytes, or it is answered 408 or 431: a client cannot hold the server.
    Use it as an async context manager, or call [`start`][chatfeed.prometheus.MetricsServer.start]
    and [`close`][chatfeed.prometheus.MetricsServer.close].

    Args:
        host: The address to listen on; keep it on loopback, or on a pod's
            network, never on an address the world can reach.
        port: The port; 0 picks a free one (see [`port`][chatfeed.prometheus.MetricsServer.port]).
        registry: What ``/metrics`` serves, usually a `PrometheusObserver`'s
            ``registry``; ``None`` for prometheus-client's global ``REGISTRY``.
        ready: What ``/readyz`` asks, a function returning a
            [`Readiness`][chatfeed.prometheus.Readiness] or a bool, such as
            ``observer.readiness``; ``None``: always ready.
        read_timeout: Seconds a client has to send its request's head.
        max_request_size: The longest request head accepted, in bytes.

    Raises:
        UsageError: An argument is invalid.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9464,
        *,
        registry: CollectorRegistry | None = None,
        ready: Callable[[], Readiness | bool] | None = None,
        read_timeout: float = 5.0,
        max_request_size: int = 8192,
    ) -> None:
        if not isinstance(host, str) or not host:
            raise UsageError(f"host must be a non-empty str, not {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise UsageError(f"port must be a port number (0 for any free one), not {port!r}")
        if (
            isinstance(read_timeout, bool)
            or not isinstance(read_timeout, (int, float))
            or not 0 < read_timeout < float("inf")
        ):
            raise UsageError(f"read_timeout must be a positive number of seconds, not {read_timeout!r}")
        if isinstance(max_request_size, bool) or not isinstance(max_request_size, int) or max_request_size < 256:
            raise UsageError(f"max_request_size must be an int of at least 256 bytes, not {max_request_size!r}")
        if ready is not None and not callable(ready):
            raise UsageError(f"ready must be a function returning a Readiness or a bool, not {ready!r}")
        if registry is None:
            from prometheus_client import REGISTRY

            registry = REGISTRY
        self.host = host
        self._port = port
        self._registry = registry
        self._ready = ready
        self._read_timeout = float(read_timeout)
        self._max_request_size = max_request_size
        self._server: asyncio.Server | None = None
        # The connections being answered, by the task answering each.
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    def __repr__(self) -> str:
        where = f"{self.host}:{self.port}" if self._server is not None else "not started"
        return f"<chatfeed.prometheus.MetricsServer {where}>"

    @property
    def port(self) -> int:
        """The port it listens on: the one it picked, when it was given 0.

        Raises:
            UsageError: It has not started.
        """
        if self._server is None:
            raise UsageError("the metrics server has not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """Its ``/metrics`` address, ``http://HOST:PORT/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def start(self) -> None:
        """Start listening.

        Raises:
            OSError: The address cannot be listened on (the port is taken, say).
            UsageError: It has started already.
        """
        if self._server is not None:
            raise UsageError("the metrics server has started already")
        self._server = await asyncio.start_server(
            self._accept, self.host, self._port, limit=self._max_request_size, reuse_address=True
        )
        logger.debug("metrics server listening on %s", self.url)

    async def close(self) -> None:
        """Stop listening, end the connections being answered, and wait until all is closed; idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Aborted rather than cancelled: each answering task then ends on its
        # own, as for a client gone (the server's tasks are asyncio's).
        for writer in self._connections.values():
            writer.transport.abort()
        if self._connections:
            await asyncio.wait(list(self._connections))
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # Answering

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            try:
                status, content_type, body, head_only, extra = await self._answer(reader)
            except Exception:  # a collector that raised, say: the next scrape may do better
                logger.error("the metrics server could not answer a request", exc_info=True)
                status, content_type, body, head_only, extra = 500, _TEXT, b"internal error\n", False, []
            lines = [
                f"HTTP/1.1 {status} {_REASONS[status]}",
                f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}",
                "Cache-Control: no-store",
                "Connection: close",
                *extra,
            ]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body))
            # Bounded: a client that does not read its answer does not hold the connection.
            with contextlib.suppress(ConnectionError, TimeoutError, asyncio.TimeoutError):  # distinct before 3.11
                await asyncio.wait_for(writer.drain(), self._read_timeout)
                if writer.can_write_eof():
                    writer.write_eof()
                await asyncio.wait_for(_discard(reader), _LINGER)
        finally:
            self._connections.pop(task, None)
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # what it did not read is dropped, not flushed at leisure
            else:
                writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes, bool, list[str]]:
        """Read one request; return the status, content type, body, whether it was HEAD, and other headers."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._read_timeout)
        except asyncio.LimitOverrunError:
            return 431, _TEXT, b"request too large\n", False, []
        except asyncio.IncompleteReadError as exc:
            if len(exc.partial) >= self._max_request_size:
                return 431, _TEXT, b"request too large\n", False, []
            return 400, _TEXT, b"incomplete request\n", False, []
        except (TimeoutError, asyncio.TimeoutError):  # distinct before Python 3.11
            return 408, _TEXT, b"request not received in time\n", False, []
        except ConnectionError:
            return 400, _TEXT, b"", False, []
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, _TEXT, b"bad request\n", False, []
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return 405, _TEXT, b"method not allowed\n", False, ["Allow: GET, HEAD"]
        head_only = method == "HEAD"
        path = target.split("?", 1)[0]
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry), head_only, []
        if path == "/healthz":
            return 200, _TEXT, b"ok\n", head_only, []
        if path == "/readyz":
            answer = self._readiness()
            return (200 if answer.ready else 503), _TEXT, (answer.reason + "\n").encode(), head_only, []
        return 404, _TEXT, b"not found: try /metrics, /healthz or /readyz\n", head_only, []

    def _readiness(self) -> Readiness:
        if self._ready is None:
            return Readiness(True, "ready")
        try:
            answer = self._ready()
        except Exception as exc:
            logger.error("the readiness check raised; /readyz answers 503", exc_info=True)
            return Readiness(False, f"not ready: the readiness check raised {type(exc).__name__}")
        if isinstance(answer, Readiness):
            return Readiness(answer.ready, " ".join(answer.reason.split()))  # one line, whatever it says
        return Readiness(bool(answer), "ready" if answer else "not ready")


async def _discard(reader: asyncio.StreamReader) -> None:
    """Read what the client still sends, up to 64 KiB, until it closes its side."""
    left = 64 * 1024
    while left > 0:
        data = await reader.read(min(left, 4096))
        if not data:
            return
        left -= len(data)
