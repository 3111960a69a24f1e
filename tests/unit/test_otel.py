"""chatfeed.otel without a feed: the extra's import error, the options, the ages, the bridge's and consumer's counters.

The instruments a client and a pool feed are tested against a real server in
tests/integration/test_otel.py.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import chatfeed
from chatfeed import ClientStatistics, HandlerStatistics, PoolStatistics, UsageError
from chatfeed import otel as chatfeed_otel
from chatfeed.bridge import BridgeStatistics, ConsumerStatistics, Record
from chatfeed.otel import OpenTelemetryObserver
from chatfeed.testing import make_chat, make_message

Point = NumberDataPoint | HistogramDataPoint


class Telemetry:
    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader], shutdown_on_exit=False)
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider(shutdown_on_exit=False)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def observer(self, **options: Any) -> OpenTelemetryObserver:
        return OpenTelemetryObserver(
            meter_provider=self.meter_provider, tracer_provider=self.tracer_provider, **options
        )

    def collect(self) -> dict[str, list[Point]]:
        data = self.reader.get_metrics_data()
        found: dict[str, list[Point]] = {}
        if data is None:  # not a point to report
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    found.setdefault(metric.name, []).extend(metric.data.data_points)  # type: ignore[arg-type]
        return found


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    telemetry = Telemetry()
    yield telemetry
    telemetry.meter_provider.shutdown()
    telemetry.tracer_provider.shutdown()


def values(points: list[Point], *keys: str) -> dict[tuple[Any, ...], Any]:
    found: dict[tuple[Any, ...], Any] = {}
    for point in points:
        attributes = dict(point.attributes or {})
        key = tuple(attributes.get(name) for name in keys)
        assert key not in found, f"two points for {key}"
        found[key] = point.count if isinstance(point, HistogramDataPoint) else point.value
    return found


def test_importing_it_without_opentelemetry_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "chatfeed.otel")
    with pytest.raises(ImportError, match=r"pip install 'chatfeed\[otel\]'"):
        importlib.import_module("chatfeed.otel")


def test_import_chatfeed_does_not_import_it() -> None:
    assert "otel" not in chatfeed.__all__
    assert not hasattr(chatfeed, "OpenTelemetryObserver")


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"feed_attribute": 1}, "feed_attribute"),
        ({"meter_provider": "global"}, "meter_provider"),
        ({"tracer_provider": object()}, "tracer_provider"),
    ],
)
def test_bad_options_are_usage_errors(options: dict[str, Any], named: str) -> None:
    with pytest.raises(UsageError, match=named):
        OpenTelemetryObserver(**options)


def test_it_is_an_observer_of_the_global_providers_by_default() -> None:
    observer = OpenTelemetryObserver()
    assert isinstance(observer, chatfeed.Observer)
    chatfeed.Client("wss://example.invalid", token="t", observer=observer)  # accepted, nothing recorded


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("feed_attribute", [False, True])
def test_the_age_is_each_feeds_or_the_freshest_feeds(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch, feed_attribute: bool
) -> None:
    clock = Clock()
    monkeypatch.setattr(chatfeed_otel, "_monotonic", clock)
    observer = telemetry.observer(feed_attribute=feed_attribute)
    observer.event_received("alice", chatfeed.NewMessage(type="new_message", payload=make_message()))
    clock.now += 5
    observer.event_received("bob", chatfeed.NewChat(type="new_chat", payload=make_chat()))
    clock.now += 2
    ages = values(telemetry.collect()["chatfeed.feed.last_event.age"], "chatfeed.feed")
    # Without the feed: whether events arrive at all, as PrometheusObserver(per_feed=False) says it.
    assert ages == ({("alice",): 7.0, ("bob",): 2.0} if feed_attribute else {(None,): 2.0})
    observer.state_changed("bob", "closed")  # removed from its pool: its age would grow for ever
    ages = values(telemetry.collect()["chatfeed.feed.last_event.age"], "chatfeed.feed")
    assert ages == ({("alice",): 7.0} if feed_attribute else {(None,): 7.0})


def test_two_observers_of_one_provider_report_the_freshest_age(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(chatfeed_otel, "_monotonic", clock)
    quiet, busy = telemetry.observer(), telemetry.observer()
    quiet.event_received("alice", chatfeed.NewMessage(type="new_message", payload=make_message()))
    clock.now += 900
    busy.event_received("bob", chatfeed.NewMessage(type="new_message", payload=make_message()))
    clock.now += 1
    assert values(telemetry.collect()["chatfeed.feed.last_event.age"], "chatfeed.feed") == {(None,): 1.0}


def test_a_handler_call_cancelled_is_no_error(telemetry: Telemetry) -> None:
    # A concurrent handler's call cancelled by close() past drain_timeout did not fail: a deploy must not
    # look like a burst of handler errors (PrometheusObserver does not count it in chatfeed_handler_errors).
    observer = telemetry.observer()
    event = chatfeed.NewMessage(type="new_message", payload=make_message())
    started = observer.handler_started(None, event, handler="store")
    cancelled = asyncio.CancelledError()
    observer.handler_finished(None, event, handler="store", duration=0.25, error=cancelled, started=started)
    assert values(telemetry.collect()["messaging.process.duration"], "error.type") == {(None,): 1}
    [span] = telemetry.exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.UNSET
    assert dict(span.attributes or {})["chatfeed.cancelled"] is True
    assert "error.type" not in dict(span.attributes or {})
    assert not span.events  # no exception recorded


def test_lag_is_now_minus_created_at_and_never_negative(telemetry: Telemetry) -> None:
    observer = telemetry.observer()
    an_hour_ago = datetime.now(timezone.utc).replace(microsecond=0).timestamp() - 3600
    observer.event_received(
        None,
        chatfeed.NewMessage(
            type="new_message", payload=make_message(created_at=datetime.fromtimestamp(an_hour_ago, timezone.utc))
        ),
    )
    future = datetime(2999, 1, 1, tzinfo=timezone.utc)  # a server clock far ahead
    observer.event_received(None, chatfeed.NewMessage(type="new_message", payload=make_message(created_at=future)))
    [lag] = telemetry.collect()["chatfeed.event.lag"]
    assert isinstance(lag, HistogramDataPoint)
    assert lag.count == 2
    assert lag.min == 0.0
    assert 3600 <= lag.max < 3600 + 60


def test_an_unknown_event_type_is_reported_as_unknown(telemetry: Telemetry) -> None:
    observer = telemetry.observer()
    for kind in ["typing", "presence", "typing"]:
        observer.event_received(None, chatfeed.UnknownMessage(type=kind))
    consumed = telemetry.collect()["messaging.client.consumed.messages"]
    assert values(consumed, "chatfeed.event.type") == {("unknown",): 3}


def test_a_handler_call_is_timed_even_when_its_span_could_not_start(telemetry: Telemetry) -> None:
    observer = telemetry.observer()
    event = chatfeed.NewMessage(type="new_message", payload=make_message())
    started = observer.handler_started(None, event, handler="store")
    observer.handler_finished(None, event, handler="store", duration=0.25, error=None, started=started)
    observer.handler_finished(None, event, handler="store", duration=0.5, error=KeyError("x"), started=None)
    durations = telemetry.collect()["messaging.process.duration"]
    assert values(durations, "error.type") == {(None,): 1, ("KeyError",): 1}
    [span] = telemetry.exporter.get_finished_spans()
    assert span.name == "process new_message"
    assert span.status.status_code is StatusCode.UNSET


def test_the_bridges_and_the_consumers_moments_are_counted(telemetry: Telemetry) -> None:
    observer = telemetry.observer(feed_attribute=True)
    now = datetime.now(timezone.utc)
    message = Record("alice", "new_message", "7", "d1", now, b"{}")
    unknown = Record("alice", "typing", None, "d2", None, b"{}")
    observer.published(message, stored=True, duration=0.02)
    observer.published(message, stored=False, duration=0.01)
    observer.publish_failed(unknown, error=ConnectionError("down"), attempt=1)
    event = chatfeed.NewMessage(type="new_message", payload=make_message())
    observer.acknowledged("alice", event)
    observer.redelivery("alice", event, attempt=1, delay=0.5)
    observer.dead_lettered("alice", event, attempts=5)
    observer.dead_lettered(None, None, attempts=1)  # an unreadable entry of the log
    observer.backpressure(None, engaged=True, where="bridge")
    metrics = telemetry.collect()

    sent = metrics["messaging.client.sent.messages"]
    assert values(sent, "chatfeed.event.type", "chatfeed.stored", "error.type", "chatfeed.feed") == {
        ("new_message", True, None, "alice"): 1,
        ("new_message", False, None, "alice"): 1,
        ("unknown", None, "ConnectionError", "alice"): 1,
    }
    assert all(dict(point.attributes or {})["messaging.operation.name"] == "publish" for point in sent)
    durations = metrics["messaging.client.operation.duration"]
    assert values(durations, "chatfeed.stored") == {(True,): 1, (False,): 1}
    settled = metrics["chatfeed.consumer.settled"]
    assert values(settled, "chatfeed.outcome", "chatfeed.event.type", "chatfeed.feed") == {
        ("acknowledged", "new_message", "alice"): 1,
        ("redelivered", "new_message", "alice"): 1,
        ("dead_lettered", "new_message", "alice"): 1,
        ("dead_lettered", None, None): 1,
    }
    assert values(metrics["chatfeed.backpressure.active"], "chatfeed.buffer", "chatfeed.feed") == {("bridge", None): 1}


def client_statistics(state: Any, *, buffered: int = 0, queued: int = 0) -> ClientStatistics:
    handler = HandlerStatistics("app.answer", chatfeed.NewMessage, 8, 64, 0, queued, 0, None)
    return ClientStatistics(state, state == "open", 1, 0, 0, 0, 1, buffered, handlers=(handler,))


def pool_statistics(
    *,
    up: int = 0,
    connecting: int = 0,
    authenticating: int = 0,
    backing_off: int = 0,
    failed: int = 0,
    buffered: int = 0,
) -> PoolStatistics:
    return PoolStatistics(
        feeds=up + connecting + authenticating + backing_off + failed,
        connecting=connecting,
        authenticating=authenticating,
        up=up,
        backing_off=backing_off,
        failed=failed,
        connections=0,
        reconnects=0,
        frames_received=0,
        protocol_errors=0,
        handler_errors=0,
        duplicates_dropped=0,
        backfilled_events=0,
        backfill_errors=0,
        event_streams=0,
        buffered_events=buffered,
        handlers=(),
        expectations=0,
    )


class Subject:
    """Something an observer may be attached to, with the statistics a test gives it."""

    def __init__(self, statistics: object) -> None:
        self.value = statistics

    def statistics(self) -> object:
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


def test_feeds_by_state_and_buffers_add_up_over_every_subject(telemetry: Telemetry) -> None:
    observer = telemetry.observer()
    subjects = [
        Subject(client_statistics("open", buffered=3, queued=4)),
        Subject(client_statistics("backing_off")),
        Subject(pool_statistics(up=5, connecting=1, authenticating=2, backing_off=3, failed=4, buffered=7)),
        Subject(BridgeStatistics(1, 1, 0, 0, 0, 9, 0, True, 0)),
        Subject(ConsumerStatistics(1, 0, 0, 0, 6, 0)),
        Subject("not statistics"),
        Subject(RuntimeError("statistics() failed")),
    ]
    for subject in subjects:
        observer.attached(subject)
    observer.attached(object())  # no statistics() at all
    metrics = telemetry.collect()
    assert values(metrics["chatfeed.feed.count"], "chatfeed.feed.state") == {
        ("unopened",): 0,
        ("connecting",): 1,
        ("authenticating",): 2,
        ("open",): 6,
        ("backing_off",): 4,
        ("failed",): 4,
        ("closed",): 0,
    }
    assert values(metrics["chatfeed.buffer.depth"], "chatfeed.buffer") == {
        ("events",): 10,
        ("app.answer",): 4,
        ("bridge",): 9,
        ("consumer",): 6,
    }

    # Subjects are held weakly when they can be: one that is gone is not reported.
    del subjects[0]
    gc.collect()
    assert values(telemetry.collect()["chatfeed.feed.count"], "chatfeed.feed.state")[("open",)] == 5


def test_a_closed_subject_is_reported_once_then_forgotten(telemetry: Telemetry) -> None:
    observer = telemetry.observer()
    client = Subject(client_statistics("closed"))
    consumer = Subject(ConsumerStatistics(1, 0, 0, 0, 0, 0, state="closed"))
    observer.attached(client)
    observer.attached(consumer)
    assert values(telemetry.collect()["chatfeed.feed.count"], "chatfeed.feed.state")[("closed",)] == 1
    assert telemetry.collect() == {}  # both forgotten, though still alive
    assert client.statistics() and consumer.statistics()


def test_two_observers_of_one_meter_provider_share_its_gauges(telemetry: Telemetry) -> None:
    first, second = telemetry.observer(), telemetry.observer()
    subjects = [Subject(client_statistics("open")), Subject(client_statistics("open"))]
    first.attached(subjects[0])
    second.attached(subjects[1])
    states = values(telemetry.collect()["chatfeed.feed.count"], "chatfeed.feed.state")
    assert states[("open",)] == 2
    del second
    gc.collect()
    states = values(telemetry.collect()["chatfeed.feed.count"], "chatfeed.feed.state")
    assert states[("open",)] == 1
