"""Starting, closing and cancelling: prompt, and nothing left behind."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest

import chatfeed
from chatfeed.testing import FeedServer

from ..conftest import MS, SECRET, TOKEN
from .conftest import (
    WAIT,
    Recorder,
    ThreadedFeedServer,
    chatfeed_tasks,
    content,
    free_port,
    make_client,
    running,
    tcp_server,
    unfinished_tasks,
)

T = TypeVar("T")


@pytest.fixture
def feed() -> Iterator[ThreadedFeedServer]:
    with ThreadedFeedServer(tokens=[TOKEN]) as feed:
        yield feed


async def close_promptly(client: chatfeed.Client, run: asyncio.Task[None], before: set[asyncio.Task[Any]]) -> None:
    """Close ``client`` within a second; check that ``run`` and an open iterator end, and that no task is left.

    Every task of the loop started since ``before`` counts, whatever its name.
    """
    stream = client.events()
    await asyncio.wait_for(client.close(), 1000 * MS)
    await asyncio.wait_for(run, WAIT)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(stream), WAIT)
    assert unfinished_tasks(before) == []
    assert client.statistics().state == "closed"


async def test_close_while_opening_the_connection() -> None:
    before = asyncio.all_tasks()
    async with tcp_server(lambda writer: None) as (url, accepted):
        client = make_client(url, open_timeout=30_000 * MS)
        run = asyncio.create_task(client.run())
        await accepted.wait_for(1)  # the client is now stuck in the WebSocket handshake
        await close_promptly(client, run, before)


async def test_close_while_an_async_token_function_is_pending(server: FeedServer) -> None:
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow_token() -> str:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return TOKEN

    before = asyncio.all_tasks()
    client = make_client(server.url, token=slow_token)
    run = asyncio.create_task(client.run())
    await asyncio.wait_for(entered.wait(), WAIT)
    await close_promptly(client, run, before)
    assert cancelled.is_set()
    assert server.handshakes == 0


async def test_close_while_authenticating(feed: ThreadedFeedServer) -> None:
    feed.server.silent = True
    before = asyncio.all_tasks()
    client = make_client(feed.server.url, auth_timeout=30_000 * MS)
    run = asyncio.create_task(client.run())
    await feed.call(lambda: feed.server.wait_for_auth_frames(1, timeout=WAIT))  # the client now waits for the answer
    await close_promptly(client, run, before)


async def test_close_while_connected(feed: ThreadedFeedServer) -> None:
    before = asyncio.all_tasks()
    client = make_client(feed.server.url)  # the default ping_interval: a keepalive task runs
    connected = Recorder()
    client.on("connected")(connected)
    run = asyncio.create_task(client.run())
    await connected.wait_for(1)
    await close_promptly(client, run, before)


async def test_close_while_backing_off(feed: ThreadedFeedServer) -> None:
    before = asyncio.all_tasks()
    client = make_client(feed.server.url)
    connected, disconnected = Recorder(), Recorder()
    client.on("connected")(connected)
    client.on("disconnected")(disconnected)
    run = asyncio.create_task(client.run())
    await connected.wait_for(1)
    await feed.call(lambda: feed.server.close_connections(1013, "overloaded"))  # a wait of at least 5 s
    [lost] = await disconnected.wait_for(1)
    assert lost.will_retry
    await close_promptly(client, run, before)


async def test_close_while_a_handler_is_running(feed: ThreadedFeedServer) -> None:
    before = asyncio.all_tasks()
    client = make_client(feed.server.url)
    connected = Recorder()
    client.on("connected")(connected)
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    @client.on("new_message")
    async def slow(event: chatfeed.NewMessage) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    run = asyncio.create_task(client.run())
    await connected.wait_for(1)
    await feed.call(lambda: feed.server.push_message())
    await asyncio.wait_for(entered.wait(), WAIT)
    await close_promptly(client, run, before)
    assert cancelled.is_set()


async def test_close_from_inside_a_handler(server: FeedServer) -> None:
    client = make_client(server.url)

    @client.on("new_message")
    async def stop(event: chatfeed.NewMessage) -> None:
        await client.close()

    async with running(client) as task:
        await server.wait_for_clients()
        await server.push_message()
        await asyncio.wait_for(asyncio.shield(task), WAIT)
    assert task.result() is None
    assert chatfeed_tasks() == []


async def test_close_ends_every_iterator(server: FeedServer) -> None:
    client = make_client(server.url)
    async with client:
        streams = [client.events() for _ in range(3)]

        async def drain(stream: chatfeed.EventStream[chatfeed.FeedEvent]) -> int:
            return len([event async for event in stream])

        consumers = [asyncio.create_task(drain(stream)) for stream in streams]
        await asyncio.sleep(0)
        await client.close()
        assert await asyncio.wait_for(asyncio.gather(*consumers), WAIT) == [0, 0, 0]


async def test_fatal_error_ends_iterators_with_that_error(server: FeedServer) -> None:
    client = make_client(server.url)
    stream = client.events()  # subscribed before the client starts
    async with running(client):
        await server.wait_for_clients()
        await server.close_connections(1008, "policy")
        with pytest.raises(chatfeed.ConnectionLostError):
            await asyncio.wait_for(anext(stream), WAIT)


async def test_async_with_raises_a_fatal_error_that_stopped_the_client_while_the_block_worked(
    server: FeedServer,
) -> None:
    client = make_client(server.url)
    body_cancelled = False

    async def block() -> None:
        nonlocal body_cancelled
        async with client:
            try:
                await server.close_connections(4501, "banned")
                await asyncio.sleep(WAIT)  # other work: cut short, as in a task group
            except asyncio.CancelledError:
                body_cancelled = True
                raise

    with pytest.raises(chatfeed.ConnectionLostError) as excinfo:
        await block()
    assert body_cancelled
    assert excinfo.value.code == 4501
    assert client.statistics().state == "closed"
    cancelling = getattr(asyncio.current_task(), "cancelling", None)  # Python 3.11+
    assert cancelling is None or cancelling() == 0  # the cancellation it used is taken back


async def test_async_with_raises_the_fatal_error_once_when_the_block_read_it_from_events(server: FeedServer) -> None:
    client = make_client(server.url)
    closing: list[asyncio.Future[None]] = []

    async def block() -> None:
        async with client:
            stream = client.events()
            await server.push_message(content="first")
            async for _ in stream:  # waiting here for the next event when the client stops
                closing.append(asyncio.ensure_future(server.close_connections(1008, "policy")))

    with pytest.raises(chatfeed.ConnectionLostError) as excinfo:
        await block()
    await asyncio.wait_for(closing[0], WAIT)
    assert excinfo.value.code == 1008
    # The body raised it from the stream: the block was not cancelled for it.
    assert not isinstance(excinfo.value.__context__, asyncio.CancelledError)


async def test_async_with_does_not_raise_again_an_error_the_block_handled(server: FeedServer) -> None:
    # The block reads the stream itself (no task in between, as asyncio.wait_for
    # makes before Python 3.12): it learns of the error there, and handles it.
    client = make_client(server.url)
    seen: list[int] = []
    async with client:
        stream = client.events()
        await server.push_message(content="first")
        assert content(await anext(stream)) == "first"
        await server.close_connections(1008, "policy")
        try:
            await anext(stream)
        except chatfeed.ConnectionLostError as exc:
            seen.append(exc.code)
    assert seen == [1008]


async def test_async_with_raises_at_exit_an_error_another_task_read_from_a_stream(server: FeedServer) -> None:
    # As with a task group: only the block's own reading of events() counts
    # as having seen the error.
    client = make_client(server.url)
    readers: list[asyncio.Future[chatfeed.FeedEvent]] = []

    async def block() -> None:
        async with client:
            readers.append(asyncio.ensure_future(anext(client.events())))
            await asyncio.sleep(0)  # the reader starts, and waits on the stream
            await server.close_connections(1008, "policy")
            await readers[0]

    with pytest.raises(chatfeed.ConnectionLostError):
        await asyncio.wait_for(block(), WAIT)
    await asyncio.wait(readers, timeout=WAIT)
    assert readers[0].cancelled() or isinstance(readers[0].exception(), chatfeed.ConnectionLostError)


async def test_outside_cancellation_of_an_async_with_block_stays_a_cancellation(server: FeedServer) -> None:
    client = make_client(server.url)
    entered = asyncio.Event()

    async def block() -> None:
        async with client:
            entered.set()
            await asyncio.sleep(WAIT)

    task = asyncio.create_task(block())
    await asyncio.wait_for(entered.wait(), WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)
    assert client.statistics().state == "closed"


async def test_reading_events_of_a_client_never_started_is_a_usage_error() -> None:
    client = make_client("ws://127.0.0.1:9")
    stream = client.events()
    with pytest.raises(chatfeed.UsageError, match="never started"):
        await asyncio.wait_for(anext(stream), WAIT)


async def test_events_read_just_before_run_starts_in_a_task_wait_for_events(server: FeedServer) -> None:
    client = make_client(server.url)
    stream = client.events()
    async with running(client):  # run() in a task created after the stream, before the read
        waiting = asyncio.ensure_future(anext(stream))
        await server.wait_for_clients()
        await server.push_message(content="hello")
        assert content(await asyncio.wait_for(waiting, WAIT)) == "hello"


async def test_cancelling_run_closes_the_client(server: FeedServer) -> None:
    client = make_client(server.url)
    task = asyncio.create_task(client.run())
    await server.wait_for_clients()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)
    assert chatfeed_tasks() == []
    assert client.statistics().state == "closed"
    await server.wait_for_clients(0)


async def test_cancelling_async_with_while_connecting_closes_the_client(server: FeedServer) -> None:
    server.silent = True
    client = make_client(server.url, auth_timeout=30_000 * MS)

    async def enter() -> None:
        async with client:
            pytest.fail("never authenticated")

    task = asyncio.create_task(enter())
    await server.wait_for_auth_frames(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)
    assert chatfeed_tasks() == []


async def test_close_is_idempotent_and_works_before_start() -> None:
    client = make_client("ws://127.0.0.1:9")
    await client.close()
    await client.close()
    with pytest.raises(chatfeed.UsageError, match="closed"):
        await client.run()


async def test_running_twice_is_a_usage_error(server: FeedServer) -> None:
    client = make_client(server.url)
    async with client:
        with pytest.raises(chatfeed.UsageError, match="already running"):
            await client.run()


async def test_statistics_and_repr_never_show_the_token(server: FeedServer) -> None:
    client = make_client(server.url)
    async with client:
        await server.push_message()
        stats = client.statistics()
        assert SECRET not in repr(client)
        assert SECRET not in repr(stats)
    assert stats.connected
    assert stats.connections == 1


def test_repr_hides_url_credentials() -> None:
    client = chatfeed.Client(f"wss://user:{SECRET}@feed.example.com/ws?token={SECRET}", token=TOKEN)
    assert SECRET not in repr(client)
    assert "feed.example.com" in repr(client)


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("http://localhost", {}, "ws:// or wss://"),
        ("ws://", {}, "ws:// or wss://"),
        ("ws://localhost:99999", {}, "invalid url"),
        ("ws://localhost", {"token": ""}, "token must not be empty"),
        ("ws://localhost", {"token": 42}, "token must be a str"),
        ("ws://localhost", {"auth_timeout": 0}, "auth_timeout"),
        ("ws://localhost", {"ping_interval": -1}, "ping_interval"),
        ("ws://localhost", {"max_size": 0}, "max_size"),
        ("ws://localhost", {"reconnect": "yes"}, "reconnect"),
        ("ws://localhost", {"auth_retries": -1}, "auth_retries"),
        ("ws://localhost", {"compression": "gzip"}, "compression"),
        ("ws://localhost", {"ssl": "strict"}, "ssl"),
    ],
)
def test_bad_arguments_are_usage_errors(url: str, options: dict[str, object], message: str) -> None:
    options.setdefault("token", TOKEN)
    with pytest.raises(chatfeed.UsageError, match=message):
        chatfeed.Client(url, **options)  # type: ignore[arg-type]


def test_unknown_event_name_is_an_error_at_registration() -> None:
    client = chatfeed.Client("ws://localhost", token=TOKEN)
    with pytest.raises(chatfeed.UsageError, match="new_message"):
        client.on("new_mesage")  # type: ignore[call-overload]


def test_plain_ws_to_a_remote_host_warns(caplog: pytest.LogCaptureFixture) -> None:
    chatfeed.Client("ws://feed.example.com", token=TOKEN)
    chatfeed.Client("ws://127.0.0.1:3001", token=TOKEN)
    chatfeed.Client("wss://feed.example.com", token=TOKEN)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "in clear" in r.getMessage()]
    assert len(warnings) == 1
    assert "feed.example.com" in warnings[0].getMessage()


_SIGNALLED_PROGRAM = """
import asyncio, sys
import chatfeed

async def main() -> None:
    client = chatfeed.Client(sys.argv[1], token=sys.argv[2])
    client.on("connected")(lambda event: print("connected", flush=True))
    await client.run(handle_signals=True)
    print("stopped cleanly", flush=True)

asyncio.run(main())
"""


async def signal_a_program(
    source: str, server: FeedServer, ready: bytes, signum: signal.Signals
) -> tuple[int | None, bytes, bytes]:
    """Run ``source`` against ``server``; once it prints ``ready``, send it ``signum``; return how it ended."""
    program = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        source,
        server.url,
        TOKEN,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert program.stdout is not None
        assert await asyncio.wait_for(program.stdout.readline(), WAIT * 2) == ready
        program.send_signal(signum)
        stdout, stderr = await asyncio.wait_for(program.communicate(), WAIT)
    finally:
        if program.returncode is None:
            program.kill()
            await program.wait()
    return program.returncode, stdout, stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_run_with_handle_signals_stops_cleanly_on_a_signal(server: FeedServer, signum: signal.Signals) -> None:
    returncode, stdout, stderr = await signal_a_program(_SIGNALLED_PROGRAM, server, b"connected\n", signum)
    assert returncode == 0, stderr.decode()
    assert stdout == b"stopped cleanly\n"
    assert b"Traceback" not in stderr
    await server.wait_for_clients(0)


def test_handle_signals_outside_the_main_thread_is_a_usage_error_and_leaves_the_client_unstarted() -> None:
    errors: list[BaseException] = []
    client = make_client("ws://127.0.0.1:9")

    def in_thread() -> None:
        try:
            asyncio.run(asyncio.wait_for(client.run(handle_signals=True), WAIT))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(WAIT)
    assert len(errors) == 1 and isinstance(errors[0], chatfeed.UsageError), errors
    assert "main thread" in str(errors[0])
    assert client.statistics().state == "unopened"


async def test_async_with_lets_a_slow_events_loop_finish_what_its_stream_holds(server: FeedServer) -> None:
    client = make_client(server.url)
    handled: list[str] = []

    async def block() -> None:
        async with client:
            stream = client.events()
            for index in range(5):
                await server.push_message(content=str(index))
            await server.close_connections(4501, "banned")
            async for event in stream:
                await asyncio.sleep(50 * MS)  # work per event: the client dies meanwhile
                handled.append(content(event))

    with pytest.raises(chatfeed.ConnectionLostError):
        await asyncio.wait_for(block(), WAIT)
    assert handled == ["0", "1", "2", "3", "4"]


async def test_async_with_stops_a_block_whose_events_are_read_by_another_task(server: FeedServer) -> None:
    client = make_client(server.url)
    consumer_saw: list[BaseException] = []
    consumers: list[asyncio.Task[None]] = []

    async def consume(stream: chatfeed.EventStream[chatfeed.FeedEvent]) -> None:
        try:
            async for _ in stream:
                pass
        except chatfeed.ConnectionLostError as exc:
            consumer_saw.append(exc)

    async def block() -> None:
        async with client:
            consumers.append(asyncio.create_task(consume(client.events())))
            await server.push_message()
            await server.close_connections(4501, "banned")
            await asyncio.Event().wait()  # the block's own work, which never ends by itself

    with pytest.raises(chatfeed.ConnectionLostError):
        await asyncio.wait_for(block(), WAIT)
    await asyncio.wait_for(consumers[0], WAIT)
    assert len(consumer_saw) == 1


_PROGRAM_WITH_ITS_OWN_HANDLER = """
import asyncio, signal, sys
import chatfeed

async def main() -> None:
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, lambda: (print("the app's handler", flush=True), stopped.set()))
    client = chatfeed.Client(sys.argv[1], token=sys.argv[2])
    client.on("connected")(lambda event: asyncio.ensure_future(client.close()))
    await client.run(handle_signals=True)
    print("run returned", flush=True)
    await stopped.wait()

asyncio.run(main())
"""


async def test_handle_signals_puts_the_handlers_it_replaced_back(server: FeedServer) -> None:
    returncode, stdout, stderr = await signal_a_program(
        _PROGRAM_WITH_ITS_OWN_HANDLER, server, b"run returned\n", signal.SIGTERM
    )
    assert (returncode, stdout) == (0, b"the app's handler\n"), stderr.decode()


async def test_close_waits_for_run_to_return_and_leaves_the_task_that_ran_it_alone(server: FeedServer) -> None:
    # run() runs in the caller's task, which has a life of its own after run() returns.
    client = make_client(server.url)
    after_run = asyncio.Event()
    release = asyncio.Event()

    async def main() -> None:
        await client.run()
        after_run.set()
        await release.wait()

    task = asyncio.create_task(main())
    await server.wait_for_clients()
    await asyncio.wait_for(client.close(), WAIT)
    await asyncio.wait_for(after_run.wait(), WAIT)
    await asyncio.wait_for(client.close(), WAIT)  # again, once run() has returned
    assert not task.done()
    release.set()
    await asyncio.wait_for(task, WAIT)


async def test_an_async_with_block_that_awaits_nothing_leaves_nothing_behind(server: FeedServer) -> None:
    before = asyncio.all_tasks()
    client = make_client(server.url)
    stream = client.events()
    reader = asyncio.create_task(anext(stream, None))
    async with client:
        pass  # the supervisor is cancelled before its first step
    await asyncio.wait_for(server.wait_for_clients(0), WAIT)
    assert await asyncio.wait_for(reader, WAIT) is None  # the stream ended
    assert unfinished_tasks(before) == []
    assert client.statistics().state == "closed"


@pytest.mark.parametrize("reachable", [True, False])
async def test_close_from_the_token_function_stops_run(server: FeedServer, reachable: bool) -> None:
    calls = 0

    async def token() -> str:
        nonlocal calls
        calls += 1
        await client.close()
        return TOKEN

    url = server.url if reachable else f"ws://127.0.0.1:{free_port()}"
    client = make_client(url, token=token)
    await asyncio.wait_for(client.run(), WAIT)
    assert calls == 1
    assert client.statistics().state == "closed"


async def test_a_second_close_from_elsewhere_stops_a_handler_that_closed_and_goes_on(server: FeedServer) -> None:
    client = make_client(server.url)
    entered = asyncio.Event()

    @client.on("new_message")
    async def closes_then_waits(event: chatfeed.NewMessage) -> None:
        await client.close()  # returns at once, from a handler
        entered.set()
        await asyncio.Event().wait()  # and the handler goes on

    run = asyncio.create_task(client.run())
    await server.wait_for_clients()
    await server.push_message()
    await asyncio.wait_for(entered.wait(), WAIT)
    await asyncio.wait_for(client.close(), WAIT)
    await asyncio.wait_for(run, WAIT)
