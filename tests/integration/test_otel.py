"""chatfeed.otel against a real feed: each instrument's values and attributes, and the handler spans."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import chatfeed
from chatfeed import otel as chatfeed_otel
from chatfeed.otel import OpenTelemetryObserver
from chatfeed.testing import FeedServer

from ..conftest import BAD_TOKEN, FAST, MS, OTHER_TOKEN, SECRET, SIGNATURE, TOKEN
from .conftest import WAIT, Recorder, make_client, running

pytestmark = pytest.mark.timeout(20)

Point = NumberDataPoint | HistogramDataPoint


class Telemetry:
    """An SDK meter provider read in memory, and a tracer provider exporting to memory, as a test's own."""

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
        """Collect now: each metric's points by name."""
        data = self.reader.get_metrics_data()
        assert data is not None
        found: dict[str, list[Point]] = {}
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                assert scope.scope.name == "chatfeed"
                for metric in scope.metrics:
                    found.setdefault(metric.name, []).extend(metric.data.data_points)  # type: ignore[arg-type]
        return found

    def spans(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()

    def shutdown(self) -> None:
        self.meter_provider.shutdown()
        self.tracer_provider.shutdown()


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    telemetry = Telemetry()
    yield telemetry
    telemetry.shutdown()


def values(points: list[Point], *keys: str) -> dict[tuple[Any, ...], Any]:
    """The points' values (a histogram's count) by the values of ``keys`` in their attributes."""
    found: dict[tuple[Any, ...], Any] = {}
    for point in points:
        attributes = dict(point.attributes or {})
        key = tuple(attributes.get(name) for name in keys)
        assert key not in found, f"two points for {key}"
        found[key] = point.count if isinstance(point, HistogramDataPoint) else point.value
    return found


def attributes_of(points: list[Point]) -> list[dict[str, Any]]:
    return [dict(point.attributes or {}) for point in points]


def assert_no_secret(telemetry: Telemetry, *secrets: str) -> None:
    """No attribute of any metric or span holds a token or one of ``secrets``."""
    dumped = json.dumps(
        [attributes_of(points) for points in telemetry.collect().values()]
        + [dict(span.attributes or {}) for span in telemetry.spans()],
        default=str,
    )
    for secret in (SECRET, SIGNATURE, *secrets):
        assert secret not in dumped


async def poll(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until ``condition()`` holds: for what no event tells (statistics, metrics)."""

    async def polling() -> None:
        while True:
            if condition():
                return
            await asyncio.sleep(5 * MS)

    await asyncio.wait_for(polling(), timeout)


def make_pool(url: str, **options: Any) -> chatfeed.Pool:
    options.setdefault("reconnect", FAST)
    options.setdefault("auth_timeout", 2000 * MS)
    options.setdefault("open_timeout", 2000 * MS)
    options.setdefault("close_timeout", 500 * MS)
    return chatfeed.Pool(url, **options)


@pytest.fixture
async def users() -> AsyncIterator[FeedServer]:
    """A server whose two tokens are two users', each getting only what is pushed to them."""
    async with FeedServer(users={TOKEN: "1", OTHER_TOKEN: "2"}) as server:
        yield server


# Events


async def test_events_are_counted_by_type_with_their_lag_and_the_age_of_the_last(
    server: FeedServer, telemetry: Telemetry
) -> None:
    client = make_client(server.url, observer=telemetry.observer())
    done = Recorder()
    client.on(chatfeed.ServerMessage)(done)
    async with running(client):
        await server.wait_for_clients()
        chat = await server.push_chat(title="A private title")
        for content in ["private content 1", "private content 2"]:
            await server.push_message(chat_id=chat.id, content=content)
        await server.push_error("slow down")
        await done.wait_for(4)
        metrics = telemetry.collect()

    consumed = metrics["messaging.client.consumed.messages"]
    assert values(consumed, "chatfeed.event.type") == {("new_chat",): 1, ("new_message",): 2, ("error",): 1}
    for attributes in attributes_of(consumed):
        assert attributes["messaging.system"] == "chatfeed"
        assert attributes["messaging.operation.name"] == "receive"
        assert attributes["chatfeed.event.source"] == "live"
        assert "chatfeed.feed" not in attributes  # a lone client's events have no feed
    # Lag only for the events with a created_at; the error frame has none.
    lag = metrics["chatfeed.event.lag"]
    assert values(lag, "chatfeed.event.type") == {("new_chat",): 1, ("new_message",): 2}
    for point in lag:
        assert isinstance(point, HistogramDataPoint)
        assert 0 <= point.min <= point.max < WAIT
    [age] = metrics["chatfeed.feed.last_event.age"]
    assert isinstance(age, NumberDataPoint)
    assert not age.attributes
    assert 0 <= age.value < WAIT
    assert_no_secret(telemetry, "A private title", "private content")


async def test_the_age_of_the_last_event_grows_until_the_next_event(server: FeedServer, telemetry: Telemetry) -> None:
    client = make_client(server.url, observer=telemetry.observer())
    done = Recorder()
    client.on("new_message")(done)

    def age() -> float:
        [point] = telemetry.collect()["chatfeed.feed.last_event.age"]
        assert isinstance(point, NumberDataPoint)
        return float(point.value)

    async with running(client):
        await server.wait_for_clients()
        assert "chatfeed.feed.last_event.age" not in telemetry.collect()  # no event yet: no age
        await server.push_message()
        await done.wait_for(1)
        first = age()
        await poll(lambda: age() >= first + 50 * MS)
        await server.push_message()
        await done.wait_for(2)
        assert age() < first + 50 * MS


# Handler calls


async def test_each_handler_call_is_a_consumer_span_whose_children_are_the_handlers_spans(
    server: FeedServer, telemetry: Telemetry
) -> None:
    client = make_client(server.url, observer=telemetry.observer())
    tracer = telemetry.tracer_provider.get_tracer("app")
    done = Recorder()

    @client.on("new_message")
    async def store(event: chatfeed.NewMessage) -> None:
        with tracer.start_as_current_span("store in the database"):
            await asyncio.sleep(0)
        done(event)

    @client.on("new_chat")
    def remember(event: chatfeed.NewChat) -> None:
        with tracer.start_as_current_span("remember the chat"):
            done(event)

    # Around the client's run: not the parent of the handler calls' spans.
    with tracer.start_as_current_span("the application"):
        async with running(client):
            await server.wait_for_clients()
            chat = await server.push_chat()
            message = await server.push_message(chat_id=chat.id, content="private content")
            await done.wait_for(2)
            metrics = telemetry.collect()

    spans = {span.name: span for span in telemetry.spans()}
    process_message, process_chat = spans["process new_message"], spans["process new_chat"]
    for process, child in [(process_message, "store in the database"), (process_chat, "remember the chat")]:
        assert process.kind is SpanKind.CONSUMER
        assert process.parent is None  # a trace of its own
        assert process.status.status_code is StatusCode.UNSET
        parent, context, own = spans[child].parent, process.context, spans[child].context
        assert parent is not None and context is not None and own is not None
        assert parent.span_id == context.span_id
        assert own.trace_id == context.trace_id
    assert dict(process_message.attributes or {}) == {
        "messaging.system": "chatfeed",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "chatfeed.event.type": "new_message",
        "chatfeed.event.source": "live",
        "chatfeed.handler": store.__qualname__,
        "messaging.message.id": message.id,
        "messaging.message.conversation_id": chat.id,
    }
    assert dict(process_chat.attributes or {})["messaging.message.conversation_id"] == chat.id
    assert "messaging.message.id" not in dict(process_chat.attributes or {})

    durations = metrics["messaging.process.duration"]
    assert values(durations, "chatfeed.handler", "chatfeed.event.type", "error.type") == {
        (store.__qualname__, "new_message", None): 1,
        (remember.__qualname__, "new_chat", None): 1,
    }
    for point in durations:
        assert isinstance(point, HistogramDataPoint)
        assert 0 <= point.min <= point.max < WAIT
        assert dict(point.attributes or {})["messaging.operation.name"] == "process"
    assert_no_secret(telemetry, "private content")


async def test_a_handler_that_raises_marks_its_span_and_its_duration_with_the_error(
    server: FeedServer, telemetry: Telemetry
) -> None:
    client = make_client(server.url, observer=telemetry.observer())
    done = Recorder()

    @client.on("new_message")
    def parse(event: chatfeed.NewMessage) -> None:
        if event.payload.content == "bad":
            raise ValueError("cannot parse it")

    client.on("new_message")(done)
    async with running(client):
        await server.wait_for_clients()
        for content in ["bad", "good"]:
            await server.push_message(content=content)
        await done.wait_for(2)
        durations = telemetry.collect()["messaging.process.duration"]

    assert values(durations, "chatfeed.handler", "error.type") == {
        (parse.__qualname__, "ValueError"): 1,
        (parse.__qualname__, None): 1,
        (done.__class__.__qualname__, None): 2,
    }
    failed, succeeded = [
        span for span in telemetry.spans() if dict(span.attributes or {})["chatfeed.handler"] == parse.__qualname__
    ]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "ValueError"
    assert dict(failed.attributes or {})["error.type"] == "ValueError"
    [exception] = [event for event in failed.events if event.name == "exception"]
    assert dict(exception.attributes or {})["exception.type"] == "ValueError"
    assert succeeded.status.status_code is StatusCode.UNSET
    assert not succeeded.events


# Connections


async def test_disconnects_are_counted_by_close_code_and_reconnections_with_their_downtime(
    server: FeedServer, telemetry: Telemetry
) -> None:
    client = make_client(server.url, observer=telemetry.observer())
    connected = Recorder()
    client.on("connected")(connected)
    async with running(client):
        await connected.wait_for(1)
        await server.close_connections(4000, "going for maintenance")
        await connected.wait_for(2)
        server.drop_connections()  # no closing handshake: 1006, as the client reports it
        await connected.wait_for(3)
        await server.close_connections(4500, "account deleted")  # fatal: no retry
        await poll(lambda: client.statistics().state == "closed")
        metrics = telemetry.collect()

    disconnects = metrics["chatfeed.disconnects"]
    assert values(disconnects, "chatfeed.close.code", "chatfeed.retry") == {
        (4000, True): 1,
        (1006, True): 1,
        (4500, False): 1,
    }
    assert all(attributes["error.type"] for attributes in attributes_of(disconnects))
    assert values(metrics["chatfeed.connections"], "chatfeed.reconnect") == {(False,): 1, (True,): 2}
    [downtime] = metrics["chatfeed.reconnect.downtime"]
    assert isinstance(downtime, HistogramDataPoint)
    assert downtime.count == 2 and 0 < downtime.min <= downtime.max < WAIT
    # A closed client is reported closed once, then forgotten.
    assert values(metrics["chatfeed.feed.count"], "chatfeed.feed.state")[("closed",)] == 1
    assert "chatfeed.feed.count" not in telemetry.collect()


async def test_duplicates_and_backfills_are_counted(server: FeedServer, telemetry: Telemetry) -> None:
    def history(gap: chatfeed.Gap) -> list[chatfeed.Message | chatfeed.Chat]:
        return server.history(since=gap.since)

    client = make_client(server.url, observer=telemetry.observer(), backfill=history, dedupe=True)
    done = Recorder()
    client.on("new_message")(done)
    async with running(client):
        await server.wait_for_clients()
        await server.push_message(content="before")
        await done.wait_for(1)
        server.drop_connections()
        await server.push_message(content="while away")  # nobody connected: in the history only
        await done.wait_for(2)
        metrics = telemetry.collect()

    assert values(metrics["chatfeed.backfills"], "error.type") == {(None,): 1}
    # From a second before the last event delivered: the one delivered already, dropped, and the missed one.
    assert values(metrics["chatfeed.backfill.events"]) == {(): 2}
    assert values(metrics["chatfeed.duplicates.dropped"], "chatfeed.event.type") == {("new_message",): 1}
    assert values(metrics["messaging.client.consumed.messages"], "chatfeed.event.source") == {
        ("live",): 1,
        ("backfill",): 1,
    }


# What the subjects' statistics say


async def test_a_pool_reports_its_feeds_by_state_and_each_feeds_metrics_with_its_key(
    users: FeedServer, telemetry: Telemetry
) -> None:
    pool = make_pool(users.url, observer=telemetry.observer(feed_attribute=True))
    done = Recorder()
    pool.on("new_message")(lambda event, feed: done(feed))
    pool.add("alice", token=TOKEN)
    pool.add("bob", token=OTHER_TOKEN)
    pool.add("mallory", token=BAD_TOKEN)
    async with pool:
        await users.push_message(user_id="1")
        await users.push_message(user_id="1")
        await users.push_message(user_id="2")
        await done.wait_for(3)
        metrics = telemetry.collect()
        await pool.remove("bob")
        after_removal = telemetry.collect()

    states = values(metrics["chatfeed.feed.count"], "chatfeed.feed.state")
    assert states == {
        ("unopened",): 0,
        ("connecting",): 0,
        ("authenticating",): 0,
        ("open",): 2,
        ("backing_off",): 0,
        ("failed",): 1,
        ("closed",): 0,
    }
    assert values(metrics["messaging.client.consumed.messages"], "chatfeed.feed") == {("alice",): 2, ("bob",): 1}
    ages = values(metrics["chatfeed.feed.last_event.age"], "chatfeed.feed")
    assert set(ages) == {("alice",), ("bob",)}
    assert all(0 <= age < WAIT for age in ages.values())
    # A removed feed's age is not reported: it would grow for ever.
    assert set(values(after_removal["chatfeed.feed.last_event.age"], "chatfeed.feed")) == {("alice",)}
    assert values(after_removal["chatfeed.feed.count"], "chatfeed.feed.state")[("open",)] == 1


async def test_without_feed_attribute_no_metric_names_a_pools_feed(users: FeedServer, telemetry: Telemetry) -> None:
    pool = make_pool(users.url, observer=telemetry.observer())
    done = Recorder()
    pool.on("new_message")(lambda event, feed: done(feed))
    pool.add("alice", token=TOKEN)
    pool.add("bob", token=OTHER_TOKEN)
    async with pool:
        await users.push_message(user_id="1")
        await users.push_message(user_id="2")
        await done.wait_for(2)
        metrics = telemetry.collect()

    assert values(metrics["messaging.client.consumed.messages"], "chatfeed.event.type") == {("new_message",): 2}
    [age] = metrics["chatfeed.feed.last_event.age"]  # the freshest feed's (see the unit tests)
    assert not age.attributes
    for points in metrics.values():
        assert all("chatfeed.feed" not in attributes for attributes in attributes_of(points))
    # Spans, which have no cardinality to mind, still say which feed.
    assert {dict(span.attributes or {})["chatfeed.feed"] for span in telemetry.spans()} == {"alice", "bob"}


async def test_buffered_events_and_backpressure_are_reported_until_the_stream_is_read(
    server: FeedServer, telemetry: Telemetry
) -> None:
    client = make_client(server.url, observer=telemetry.observer())

    def metric(name: str, *keys: str) -> dict[tuple[Any, ...], Any]:
        return values(telemetry.collect().get(name, []), *keys)

    connected = Recorder()
    client.on("connected")(connected)
    async with running(client), client.events(buffer=2) as stream:
        await connected.wait_for(1)
        for index in range(3):
            await server.push_message(content=str(index))
        # Two in the buffer; the third waits for room, and the feed is not read.
        await poll(lambda: metric("chatfeed.backpressure.active", "chatfeed.buffer") == {("events",): 1})
        assert metric("chatfeed.buffer.depth", "chatfeed.buffer") == {("events",): 2}
        assert metric("chatfeed.backpressure.engagements", "chatfeed.buffer") == {("events",): 1}
        for _ in range(3):
            await asyncio.wait_for(anext(stream), WAIT)
        await poll(lambda: metric("chatfeed.backpressure.active", "chatfeed.buffer") == {("events",): 0})
        assert metric("chatfeed.buffer.depth", "chatfeed.buffer") == {("events",): 0}
        assert metric("chatfeed.feed.count", "chatfeed.feed.state")[("open",)] == 1


async def test_a_collection_on_an_exporters_thread_reads_the_statistics_on_the_loop(
    server: FeedServer, telemetry: Telemetry
) -> None:
    client = make_client(server.url, observer=telemetry.observer())
    connected = Recorder()
    client.on("connected")(connected)
    async with running(client):
        await connected.wait_for(1)
        metrics = await asyncio.to_thread(telemetry.collect)  # as a periodic reader does
    assert values(metrics["chatfeed.feed.count"], "chatfeed.feed.state")[("open",)] == 1
    assert values(metrics["chatfeed.buffer.depth"], "chatfeed.buffer") == {("events",): 0}


async def test_two_observers_of_one_meter_provider_add_up(server: FeedServer, telemetry: Telemetry) -> None:
    first = make_client(server.url, observer=telemetry.observer())
    second = make_client(server.url, token=OTHER_TOKEN, observer=telemetry.observer())
    connected = Recorder()
    first.on("connected")(connected)
    second.on("connected")(connected)
    async with running(first), running(second):
        await connected.wait_for(2)
        metrics = telemetry.collect()
    assert values(metrics["chatfeed.feed.count"], "chatfeed.feed.state")[("open",)] == 2
    assert values(metrics["chatfeed.connections"], "chatfeed.reconnect") == {(False,): 2}


async def test_a_collection_on_another_thread_gives_up_on_a_blocked_loop(
    server: FeedServer, telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chatfeed_otel, "_READ_TIMEOUT", 50 * MS)
    client = make_client(server.url, observer=telemetry.observer())
    connected = Recorder()
    client.on("connected")(connected)
    async with running(client):
        await connected.wait_for(1)
        collected: dict[str, list[Point]] = {}
        collector = threading.Thread(target=lambda: collected.update(telemetry.collect()))
        collector.start()
        collector.join(WAIT)  # blocking the event loop, as a slow sync handler would
        assert not collector.is_alive()
        # What is recorded as it happens is there; what needs the loop is not, this time.
        assert values(collected["chatfeed.connections"], "chatfeed.reconnect") == {(False,): 1}
        assert "chatfeed.feed.count" not in collected
        assert "chatfeed.buffer.depth" not in collected
        await asyncio.sleep(0)  # the loop runs the reading the collection gave up on, harmlessly
        assert values(telemetry.collect()["chatfeed.feed.count"], "chatfeed.feed.state")[("open",)] == 1


class Exported(MetricExporter):
    """An exporter that keeps what it is given, for a periodic reader."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[MetricsData] = []

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        self.batches.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass

    def points(self, name: str) -> list[Any]:
        return [
            point
            for batch in self.batches
            for resource in batch.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]


async def test_a_provider_shut_down_on_the_loop_once_the_client_closed_exports_at_once(server: FeedServer) -> None:
    # An async main's finally: the periodic reader's last collection, on its thread, needs no loop
    # once every subject is closed, and has the feeds by state.
    exporter = Exported()
    provider = MeterProvider(metric_readers=[PeriodicExportingMetricReader(exporter, export_interval_millis=60_000)])
    client = make_client(server.url, observer=OpenTelemetryObserver(meter_provider=provider))
    connected = Recorder()
    client.on("connected")(connected)
    async with running(client):
        await connected.wait_for(1)
    began = time.perf_counter()
    provider.shutdown()
    took = time.perf_counter() - began
    assert took < chatfeed_otel._READ_TIMEOUT / 2
    assert values(exporter.points("chatfeed.feed.count"), "chatfeed.feed.state")[("closed",)] == 1


async def test_a_provider_shut_down_on_the_loop_waits_for_it_once_not_per_gauge(
    server: FeedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not the place to shut it down (the docs say so), but it costs one wait, not one per gauge.
    monkeypatch.setattr(chatfeed_otel, "_READ_TIMEOUT", 300 * MS)
    exporter = Exported()
    provider = MeterProvider(metric_readers=[PeriodicExportingMetricReader(exporter, export_interval_millis=60_000)])
    client = make_client(server.url, observer=OpenTelemetryObserver(meter_provider=provider))
    connected = Recorder()
    client.on("connected")(connected)
    async with running(client):
        await connected.wait_for(1)
        began = time.perf_counter()
        provider.shutdown()  # blocks the loop the last collection would read on
        took = time.perf_counter() - began
    assert 300 * MS <= took < 500 * MS
    assert exporter.points("chatfeed.feed.count") == []  # the loop could not say
    assert values(exporter.points("chatfeed.connections"), "chatfeed.reconnect") == {(False,): 1}
