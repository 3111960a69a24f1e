"""chatfeed.prometheus against real servers: what a client's and a pool's metrics say, and the HTTP server's answers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import subprocess
import sys
import threading
import urllib.request
import weakref
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import prometheus_client
import pytest

import chatfeed
import chatfeed.sync
from chatfeed import Gap, Message
from chatfeed._cli import main
from chatfeed.prometheus import MetricsServer, PrometheusObserver, Readiness, readiness
from chatfeed.testing import FeedServer, make_chat, make_message

from ..conftest import BAD_TOKEN, FAST, MS, OTHER_TOKEN, SECRET, TOKEN
from ._probe import Response, http_get, http_request
from .conftest import WAIT, Recorder, ThreadedFeedServer, make_client, running
from .test_pool import Seen, make_pool

pytestmark = pytest.mark.timeout(20)


def sample(observer: PrometheusObserver, name: str, **labels: str) -> float | None:
    """The value of one series of ``observer``'s registry, collected now; ``None`` if it has none."""
    return observer.registry.get_sample_value(name, labels)


def series(observer: PrometheusObserver, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every series of the metric ``name`` of ``observer``'s registry, by their labels."""
    return {
        tuple(sorted(each.labels.items())): each.value
        for metric in observer.registry.collect()
        for each in metric.samples
        if each.name == name
    }


async def eventually(condition: Any, what: str) -> None:
    """Wait until ``condition()`` holds (chatfeed's own state, checked every few milliseconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"not within {WAIT:g} s: {what}")
        await asyncio.sleep(5 * MS)


@pytest.fixture
async def users_server() -> AsyncIterator[FeedServer]:
    async with FeedServer(users={TOKEN: "u1", OTHER_TOKEN: "u2"}) as server:
        yield server


# What a client's metrics say


async def test_a_clients_events_lag_handlers_and_reconnects_by_close_code(server: FeedServer) -> None:
    metrics = PrometheusObserver()
    client = make_client(server.url, observer=metrics)
    received = Recorder()
    connections = Recorder()
    client.on("connected")(connections)

    @client.on("new_message")
    def fails_on_boom(event: chatfeed.NewMessage) -> None:
        received(event)
        if event.payload.content == "content-b00m":
            raise ValueError("the handler failed")

    client.on("new_chat")(received)
    assert sample(metrics, "chatfeed_feeds", state="unopened") == 1
    async with running(client):
        await connections.wait_for(1)
        assert sample(metrics, "chatfeed_feeds", state="open") == 1
        await server.push_message(content="content-7f3a", created_at=datetime.now(timezone.utc) - timedelta(seconds=2))
        await server.push_message(content="content-b00m")
        await server.push_chat(title="a chat")
        await server.push_error("slow down")
        await received.wait_for(3)
        await server.close_connections(1012, "restarting")
        await connections.wait_for(2)
        await server.push_message(content="after")
        await received.wait_for(4)
        await eventually(lambda: sample(metrics, "chatfeed_events_received_total", type="new_message") == 3, "3")

        assert sample(metrics, "chatfeed_events_received_total", type="new_chat") == 1
        assert sample(metrics, "chatfeed_events_received_total", type="error") == 1
        # Lag: one message was two seconds old when it arrived.
        assert sample(metrics, "chatfeed_event_lag_seconds_count", type="new_message", source="live") == 3
        assert sample(metrics, "chatfeed_event_lag_seconds_bucket", type="new_message", source="live", le="1.0") == 2
        assert sample(metrics, "chatfeed_event_lag_seconds_bucket", type="new_message", source="live", le="2.5") == 3
        assert sample(metrics, "chatfeed_event_lag_seconds_count", type="new_chat", source="live") == 1
        assert series(metrics, "chatfeed_reconnects_total") == {(("code", "1012"),): 1}
        handler = fails_on_boom.__qualname__
        assert sample(metrics, "chatfeed_handler_duration_seconds_count", handler=handler, type="new_message") == 3
        assert sample(metrics, "chatfeed_handler_errors_total", handler=handler, type="new_message") == 1
        age = sample(metrics, "chatfeed_last_event_age_seconds", feed="")
        assert age is not None and 0 <= age < WAIT
        assert sample(metrics, "chatfeed_feeds", state="open") == 1
        assert readiness(client) == Readiness(True, "ready: connected")
    assert sample(metrics, "chatfeed_feeds", state="closed") == 1
    assert sample(metrics, "chatfeed_feeds", state="open") == 0
    assert readiness(client) == Readiness(False, "not ready: the client is closed")
    text = prometheus_client.generate_latest(metrics.registry).decode()
    assert "content-" not in text and SECRET not in text  # no content, no token


async def test_duplicates_and_backfills_are_counted_as_the_client_counts_them(server: FeedServer) -> None:
    calls = 0

    def backfill(gap: Gap) -> list[Message]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the history is away")
        return [make_message(id=f"missed-{calls}", content="missed")]

    metrics = PrometheusObserver()
    client = make_client(server.url, observer=metrics, dedupe=True, backfill=backfill)
    received = Recorder()
    client.on("new_message")(received)
    async with running(client):
        await server.wait_for_clients()
        first = await server.push_message(content="once")
        await server.push_message(first)  # the same message again: dropped
        await server.push_message(content="twice")
        await received.wait_for(2)
        for _ in range(2):  # the first backfill fails, the second fetches one message
            await server.close_connections(1012)
            await server.wait_for_clients()
        await received.wait_for(3)
        stats = client.statistics()
    assert (stats.duplicates_dropped, stats.backfilled_events, stats.backfill_errors) == (1, 1, 1)
    assert sample(metrics, "chatfeed_duplicates_dropped_total") == 1
    assert sample(metrics, "chatfeed_backfilled_events_total") == 1
    assert sample(metrics, "chatfeed_backfill_errors_total") == 1
    assert sample(metrics, "chatfeed_event_lag_seconds_count", type="new_message", source="backfill") == 1
    assert sample(metrics, "chatfeed_events_received_total", type="new_message") == 3


async def test_backpressure_of_an_unread_stream_is_counted_and_active_until_it_is_read(server: FeedServer) -> None:
    metrics = PrometheusObserver()
    client = make_client(server.url, observer=metrics)
    async with running(client), client.events(buffer=1) as stream:
        await server.wait_for_clients()
        await server.push_message(content="1")
        await server.push_message(content="2")
        await eventually(lambda: sample(metrics, "chatfeed_backpressure_active", where="events") == 1, "engaged")
        assert sample(metrics, "chatfeed_backpressure_engaged_total", where="events") == 1
        assert sample(metrics, "chatfeed_buffered_events") == 1
        await anext(stream)
        await eventually(lambda: sample(metrics, "chatfeed_backpressure_active", where="events") == 0, "released")
        await anext(stream)
        assert sample(metrics, "chatfeed_buffered_events") == 0


# A pool


async def test_a_pools_feeds_by_state_ages_per_feed_and_readiness_against_the_fraction(
    users_server: FeedServer,
) -> None:
    metrics = PrometheusObserver()
    pool = make_pool(users_server.url, observer=metrics)
    pool.add("first", token=TOKEN)
    pool.add("second", token=OTHER_TOKEN)
    pool.add("rejected", token=BAD_TOKEN)
    stopped = Seen()
    pool.on("feed_stopped")(stopped)
    received = Seen()
    pool.on("new_message")(received)
    assert readiness(pool) == Readiness(False, "not ready: the pool has not started")
    assert sample(metrics, "chatfeed_feeds", state="unopened") == 3
    running_pool = asyncio.create_task(pool.run())
    try:
        await stopped.wait_for(1)
        await users_server.wait_for_clients(2)
        await eventually(lambda: pool.statistics().up == 2, "2 feeds up")
        await users_server.push_message(content="to first", user_id="u1")
        await received.wait_for(1)

        states = series(metrics, "chatfeed_feeds")
        assert states[(("state", "open"),)] == 2
        assert states[(("state", "failed"),)] == 1
        assert sum(states.values()) == 3
        ages = series(metrics, "chatfeed_last_event_age_seconds")
        assert list(ages) == [(("feed", "first"),)]  # only the feeds that had an event
        assert readiness(pool, fraction=0.5) == Readiness(True, "ready: 2 of 3 feeds up (need 50%)")
        assert readiness(pool) == Readiness(False, "not ready: 2 of 3 feeds up (need 90%)")
        assert metrics.readiness(fraction=0.6) == Readiness(True, "ready: 2 of 3 feeds up (need 60%)")

        # A feed that leaves the pool leaves the metrics.
        await pool.remove("first")
        assert series(metrics, "chatfeed_last_event_age_seconds") == {}
        assert readiness(pool, fraction=0.5) == Readiness(True, "ready: 1 of 2 feeds up (need 50%)")
        await pool.remove("second")
        await pool.remove("rejected")
        assert readiness(pool) == Readiness(True, "ready: no feeds to hold")
    finally:
        await pool.close()
        await running_pool
    assert readiness(pool) == Readiness(False, "not ready: the pool is closed")


async def test_without_per_feed_the_age_of_the_last_event_is_one_series(users_server: FeedServer) -> None:
    metrics = PrometheusObserver(per_feed=False)
    pool = make_pool(users_server.url, observer=metrics)
    pool.add("first", token=TOKEN)
    pool.add("second", token=OTHER_TOKEN)
    received = Seen()
    pool.on("new_message")(received)
    assert series(metrics, "chatfeed_last_event_age_seconds") == {}
    async with pool:
        await users_server.wait_for_clients(2)
        await users_server.push_message(user_id="u1")
        await users_server.push_message(user_id="u2")
        await received.wait_for(2)
        ages = series(metrics, "chatfeed_last_event_age_seconds")
    assert list(ages) == [()]


# What it keeps, and from which thread it is read


async def test_closed_clients_are_reported_once_then_forgotten(server: FeedServer) -> None:
    # One observer for the application's life, a client per job: it must keep neither the clients
    # nor their series.
    metrics = PrometheusObserver()
    clients: list[weakref.ref[chatfeed.Client]] = []
    for _ in range(3):
        client = make_client(server.url, observer=metrics)
        connected = Recorder()
        client.on("connected")(connected)
        async with running(client):
            await connected.wait_for(1)
            assert sample(metrics, "chatfeed_feeds", state="open") == 1
        clients.append(weakref.ref(client))
        assert sample(metrics, "chatfeed_feeds", state="closed") == 1  # reported closed once...
        assert sample(metrics, "chatfeed_feeds", state="closed") == 0  # ...then forgotten
    assert repr(metrics).startswith("<chatfeed.prometheus.PrometheusObserver subjects=0 ")
    del client, connected
    gc.collect()
    assert [ref() for ref in clients] == [None, None, None]


def test_a_scrape_on_another_thread_reads_on_the_loop_while_feeds_come_and_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # prometheus-client's start_http_server scrapes on a thread of its own, while the loop records
    # events of feeds that come and go, and a pool's feeds change: read there, a dict would change
    # size while it is iterated. Each scrape reads on the loop's thread.
    metrics = PrometheusObserver()
    event = chatfeed.NewChat(type="new_chat", payload=make_chat())
    started, stop = threading.Event(), threading.Event()
    readers: set[str] = set()
    statistics = chatfeed.Pool.statistics

    def spied(self: chatfeed.Pool) -> chatfeed.PoolStatistics:
        readers.add(threading.current_thread().name)
        return statistics(self)

    monkeypatch.setattr(chatfeed.Pool, "statistics", spied)

    async def feeds() -> None:
        pool = chatfeed.Pool("wss://example.invalid", observer=metrics)  # never opened: feeds come and go
        index = 0
        while not stop.is_set():
            for _ in range(20):
                pool.add(f"feed-{index}", token=TOKEN)
                metrics.event_received(f"feed-{index}", event)
                if index >= 200:
                    await pool.remove(f"feed-{index - 200}")
                    metrics.state_changed(f"feed-{index - 200}", "closed")  # its series goes
                index += 1
            started.set()
            await asyncio.sleep(0)

    thread = threading.Thread(target=lambda: asyncio.run(feeds()), name="feeds")
    thread.start()
    try:
        assert started.wait(WAIT)
        for _ in range(5):
            prometheus_client.generate_latest(metrics.registry)
    finally:
        stop.set()
        thread.join(WAIT)
    assert not thread.is_alive()
    assert readers == {"feeds"}


def test_a_sync_clients_statistics_are_read_on_its_loop_when_scraped_from_the_main_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    metrics = PrometheusObserver()
    readers: list[str] = []
    statistics = chatfeed.Client.statistics

    def spied(self: chatfeed.Client) -> chatfeed.ClientStatistics:
        readers.append(threading.current_thread().name)
        return statistics(self)

    with ThreadedFeedServer(tokens=[TOKEN]) as feed:
        client = chatfeed.sync.Client(feed.server.url, token=TOKEN, reconnect=FAST, observer=metrics)
        with client:
            stream = client.events()
            asyncio.run_coroutine_threadsafe(feed.server.push_message(content="x"), feed._loop).result(WAIT)
            next(stream)
            with monkeypatch.context() as spying:
                spying.setattr(chatfeed.Client, "statistics", spied)
                text = prometheus_client.generate_latest(metrics.registry).decode()  # on this thread
            stream.close()
    assert 'chatfeed_feeds{state="open"} 1.0' in text
    assert 'chatfeed_last_event_age_seconds{feed=""}' in text
    assert readers == ["chatfeed-sync"]  # the client's loop's thread, not this one


# The observer's own rules


def test_each_observer_has_a_registry_of_its_own_and_a_shared_one_is_refused_twice() -> None:
    one, two = PrometheusObserver(), PrometheusObserver()
    assert one.registry is not two.registry
    assert prometheus_client.REGISTRY not in (one.registry, two.registry)
    shared = prometheus_client.CollectorRegistry()
    PrometheusObserver(registry=shared)
    with pytest.raises(chatfeed.UsageError, match="has chatfeed's metrics already"):
        PrometheusObserver(registry=shared)


def test_readiness_refuses_what_it_cannot_judge() -> None:
    with pytest.raises(chatfeed.UsageError, match="Client, a Pool, a Bridge or a Consumer"):
        readiness(object())
    for fraction in (0, 1.5, float("nan"), True):
        with pytest.raises(chatfeed.UsageError, match="fraction must be"):
            readiness(chatfeed.Pool("ws://127.0.0.1:1"), fraction=fraction)
    assert PrometheusObserver().readiness() == Readiness(False, "not ready: nothing observed (yet, or any more)")


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT, check=False)


def test_without_prometheus_client_the_import_says_which_extra_to_install() -> None:
    # None in sys.modules makes an import fail as if the package were not installed.
    done = run_python(
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"
        "try:\n"
        "    import chatfeed.prometheus\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    assert done.stdout.strip() == "chatfeed.prometheus needs prometheus-client: pip install 'chatfeed[prometheus]'"


def test_import_chatfeed_does_not_import_prometheus_client() -> None:
    done = run_python("import sys, chatfeed, chatfeed.bridge; print('prometheus_client' in sys.modules)")
    assert done.stdout.strip() == "False", done.stderr


def test_the_metrics_option_without_prometheus_client_is_one_line_and_exit_status_2() -> None:
    done = run_python(
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"
        "from chatfeed._cli import main\n"
        f"sys.exit(main(['listen', 'ws://127.0.0.1:1', '--token', {TOKEN!r}, '--metrics', ':0']))\n"
    )
    assert done.returncode == 2
    assert done.stderr == ("chatfeed: error: --metrics needs prometheus-client: pip install 'chatfeed[prometheus]'\n")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("nonsense", "not HOST:PORT, :PORT, PORT or [IPV6]:PORT: 'nonsense'"),
        ("127.0.0.1:99999", "not a port number: 99999"),
        ("[::1]:x", "not HOST:PORT, :PORT, PORT or [IPV6]:PORT: '[::1]:x'"),
        ("::1", "not HOST:PORT, :PORT, PORT or [IPV6]:PORT: '::1'"),  # not port 1 of host ":"
    ],
)
def test_a_bad_metrics_address_is_bad_usage(option: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["listen", "ws://127.0.0.1:1", "--token", TOKEN, "--metrics", option])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_metrics_port_in_use_is_bad_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exited:
            main(["listen", "ws://127.0.0.1:1", "--token", TOKEN, "--metrics", f":{port}"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"chatfeed: error: --metrics: cannot listen on 127.0.0.1:{port}: ")
    assert err.count("\n") == 1


# The HTTP server


def fetch_in_a_thread(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=WAIT) as answer:  # a real HTTP client
        return answer.status, answer.headers["Content-Type"], answer.read().decode()


async def test_metrics_healthz_and_readyz_over_http(server: FeedServer) -> None:
    metrics = PrometheusObserver()
    client = make_client(server.url, observer=metrics)
    connected = Recorder()
    client.on("connected")(connected)
    async with MetricsServer("127.0.0.1", 0, registry=metrics.registry, ready=metrics.readiness) as http:
        assert http.port > 0
        assert http.url == f"http://127.0.0.1:{http.port}/metrics"
        answer = await http_get(http.port, "/readyz")
        assert (answer.status, answer.text) == (503, "not ready: the client is unopened\n")
        async with running(client):
            await connected.wait_for(1)
            await server.push_message(content="hello")
            await eventually(lambda: sample(metrics, "chatfeed_events_received_total", type="new_message"), "1")
            status, content_type, text = await asyncio.to_thread(fetch_in_a_thread, http.url)
            assert (status, content_type) == (200, prometheus_client.CONTENT_TYPE_LATEST)
            assert 'chatfeed_events_received_total{type="new_message"} 1.0' in text
            assert 'chatfeed_feeds{state="open"} 1.0' in text
            answer = await http_get(http.port, "/readyz?verbose=1")  # a query is no other path
            assert (answer.status, answer.text) == (200, "ready: connected\n")
            assert answer.headers["content-type"] == "text/plain; charset=utf-8"
            answer = await http_get(http.port, "/healthz")
            assert (answer.status, answer.text) == (200, "ok\n")
        answer = await http_get(http.port, "/readyz")
        assert (answer.status, answer.text) == (503, "not ready: the client is closed\n")


async def test_other_paths_methods_and_bad_requests() -> None:
    async with MetricsServer("127.0.0.1", 0, registry=PrometheusObserver().registry) as http:
        port = http.port
        answer = await http_get(port, "/")
        assert answer.status == 404
        assert answer.headers["connection"] == "close"
        assert (await http_get(port, "/metrics/../secret")).status == 404
        for method in ("POST", "PUT", "DELETE", "OPTIONS"):
            answer = await http_get(port, "/metrics", method=method)
            assert (answer.status, answer.headers["allow"]) == (405, "GET, HEAD"), method
        head = await http_get(port, "/healthz", method="HEAD")
        assert (head.status, head.headers["content-length"], head.body) == (200, "3", b"")
        assert (await http_get(port, "/readyz")).text == "ready\n"  # nothing to check
        assert (await http_request(port, b"NONSENSE\r\n\r\n")).status == 400
        assert (await http_request(port, b"GET /metrics", half_close=True)).status == 400  # ended early


async def test_an_oversized_or_slow_request_does_not_hold_the_server() -> None:
    registry = PrometheusObserver().registry
    async with MetricsServer("127.0.0.1", 0, registry=registry, read_timeout=200 * MS, max_request_size=1024) as http:
        huge = b"GET /metrics HTTP/1.1\r\n" + b"X-Padding: " + b"a" * 20_000 + b"\r\n\r\n"
        answer = await http_request(http.port, huge)
        assert answer.status == 431

        loop = asyncio.get_running_loop()
        began = loop.time()
        slow = await http_request(http.port, b"GET /metrics HTTP/1.1\r\n")  # and never the end of its head
        assert slow.status == 408
        assert 150 * MS <= loop.time() - began < WAIT

        answer = await http_get(http.port, "/metrics")  # still answering
        assert answer.status == 200


async def test_closing_the_server_ends_the_connections_it_is_answering() -> None:
    http = MetricsServer("127.0.0.1", 0, registry=PrometheusObserver().registry, read_timeout=WAIT * 10)
    await http.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", http.port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # the server waits for the rest
        await writer.drain()
        await asyncio.wait_for(http.close(), WAIT)
        # Ended (a reset, as the server drops what it did not read): nothing more comes, nothing hangs.
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), WAIT) == b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    await http.close()  # idempotent
    with pytest.raises(chatfeed.UsageError, match="has not started"):
        http.port  # noqa: B018


async def test_a_readiness_check_that_raises_is_a_503_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> Readiness:
        raise RuntimeError("oops")

    async with MetricsServer("127.0.0.1", 0, registry=PrometheusObserver().registry, ready=broken) as http:
        answer: Response = await http_get(http.port, "/readyz")
    assert (answer.status, answer.text) == (503, "not ready: the readiness check raised RuntimeError\n")
    assert any("readiness check raised" in record.getMessage() for record in caplog.records)


def test_bad_server_arguments_are_usage_errors() -> None:
    for options in ({"port": 70000}, {"port": "9464"}, {"read_timeout": 0}, {"max_request_size": 10}, {"ready": 1}):
        with pytest.raises(chatfeed.UsageError):
            MetricsServer(**options)


def test_the_modules_all_is_sorted_complete_and_documented() -> None:
    import chatfeed.prometheus as module

    assert module.__all__ == sorted(module.__all__)
    defined_here = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
    }
    assert defined_here == set(module.__all__)
    for name in module.__all__:
        assert (getattr(module, name).__doc__ or "").strip(), name
