"""Handlers with concurrency: parallel across chats, in order within one, bounded, drained by close()."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

import pytest

import chatfeed
from chatfeed.testing import FeedServer

from ..conftest import MS, TOKEN
from .conftest import WAIT, Counter, chatfeed_tasks, make_client, running, watch_log


class Gates:
    """A slow handler: each call waits until the test opens its chat's gate, and records the order."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)
        self.started: list[str] = []
        self.finished: list[str] = []
        self.started_count = Counter()
        self.finished_count = Counter()
        self.running = 0
        self.most_running = 0

    async def __call__(self, event: chatfeed.NewMessage) -> None:
        message = event.payload
        self.started.append(message.content)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        self.started_count.bump()
        try:
            await self.gates[message.chat_id].wait()
        finally:
            self.running -= 1
        self.finished.append(message.content)
        self.finished_count.bump()

    def open(self, *chats: str) -> None:
        for chat in chats:
            self.gates[chat].set()


async def push(server: FeedServer, chat: str, *contents: str) -> None:
    for text in contents:
        await server.push_message(chat_id=chat, content=text)


def of_chat(texts: list[str], chat: str) -> list[str]:
    return [text for text in texts if text.startswith(chat)]


async def test_chats_run_side_by_side_and_each_chat_in_order() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        client = make_client(server.url)
        handler = Gates()
        client.on("new_message", concurrency=4)(handler)
        async with client:
            await push(server, "a", "a1", "a2", "a3")
            await push(server, "b", "b1", "b2")
            await push(server, "c", "c1")
            # a, b and c each have one call running; nothing else may start.
            await handler.started_count.wait_for(3)
            assert sorted(handler.started) == ["a1", "b1", "c1"]
            stats = client.statistics().handlers[0]
            assert (stats.running, stats.queued, stats.deepest_lane) == (3, 3, 2)
            assert stats.oldest_queued_age is not None and stats.oldest_queued_age >= 0
            handler.open("b")  # b finishes while a stays stuck: one chat does not hold up another
            await handler.finished_count.wait_for(2)
            assert handler.finished == ["b1", "b2"]
            handler.open("a", "c")
            await handler.finished_count.wait_for(6)
        assert of_chat(handler.started, "a") == ["a1", "a2", "a3"]
        assert handler.most_running == 3


async def test_at_most_concurrency_calls_run_at_once() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        client = make_client(server.url)
        handler = Gates()
        client.on("new_message", concurrency=2)(handler)
        async with client:
            for chat in "abcd":
                await push(server, chat, f"{chat}1")
            await handler.started_count.wait_for(2)
            assert client.statistics().handlers[0].queued == 2
            handler.open(*"abcd")
            await handler.finished_count.wait_for(4)
        assert handler.most_running == 2


async def test_a_full_handler_stops_the_feed_being_read_and_nothing_is_dropped() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        client = make_client(server.url)
        handler = Gates()
        client.on("new_message", concurrency=2, max_pending=4)(handler)
        async with client:
            await push(server, "a", *(f"a{n}" for n in range(30)))
            await handler.started_count.wait_for(1)
            # Four held (one running, three queued); the fifth frame waits for
            # room, and the loop reads nothing after it however much arrives.
            await push(server, "b", "b0")
            stats = client.statistics()
            assert stats.handlers[0].running + stats.handlers[0].queued == 4
            assert stats.frames_received <= 1 + 5  # auth_success, four held and the one that waits
            handler.open("a", "b")
            await handler.finished_count.wait_for(31)
        assert of_chat(handler.finished, "a") == [f"a{n}" for n in range(30)]
        assert "b0" in handler.finished


async def test_a_failing_call_goes_to_on_error_and_its_chat_goes_on() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        client = make_client(server.url)
        seen: list[str] = []
        failures: list[tuple[Exception, Any]] = []
        done = Counter()

        @client.on("new_message", concurrency=4)
        async def handle(event: chatfeed.NewMessage) -> None:
            done.bump()
            if event.payload.content == "boom":
                raise RuntimeError("model unavailable")
            seen.append(event.payload.content)

        @client.on_error
        def hook(exc: Exception, event: Any) -> None:
            failures.append((exc, event))

        async with client:
            await push(server, "a", "a1", "boom", "a2")
            await done.wait_for(3)
            assert client.statistics().handler_errors == 1
        assert seen == ["a1", "a2"]
        assert [(type(exc), event.payload.content) for exc, event in failures] == [(RuntimeError, "boom")]


async def test_close_finishes_the_queued_and_running_calls_first() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        client = make_client(server.url, drain_timeout=WAIT)
        handler = Gates()
        client.on("new_message", concurrency=2)(handler)
        async with client:
            await push(server, "a", "a1", "a2", "a3")
            await handler.started_count.wait_for(1)
            closing = asyncio.create_task(client.close())
            await asyncio.sleep(0)  # close() is under way: the receive loop has stopped
            assert not closing.done()
            handler.open("a")
            await asyncio.wait_for(closing, WAIT)
        assert handler.finished == ["a1", "a2", "a3"]
        assert chatfeed_tasks() == []


async def test_close_cancels_what_is_left_after_drain_timeout_and_says_how_much() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        client = make_client(server.url, drain_timeout=50 * MS)
        handler = Gates()
        cancelled = Counter()

        @client.on("new_message", concurrency=2)
        async def stuck(event: chatfeed.NewMessage) -> None:
            try:
                await handler(event)
            except asyncio.CancelledError:
                cancelled.bump()
                raise

        with watch_log("cancelled") as log:
            async with client:
                await push(server, "a", "a1", "a2")
                await push(server, "b", "b1")
                await handler.started_count.wait_for(2)
        assert cancelled.value == 2  # a1 and b1 ran; a2 never started
        assert handler.started == ["a1", "b1"] or handler.started == ["b1", "a1"]
        assert log.messages == [
            "cancelled 3 call(s) of handler test_close_cancels_what_is_left_after_drain_timeout_and_says_how_much."
            f"<locals>.stuck still queued or running {50 * MS:g} s after close()"
        ]
        assert chatfeed_tasks() == []


async def test_close_from_a_concurrent_handler_stops_the_client() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        client = make_client(server.url)
        after_close: list[str] = []

        @client.on("new_message", concurrency=2)
        async def stop(event: chatfeed.NewMessage) -> None:
            await client.close()  # returns at once: the drain waits for this very call
            after_close.append(event.payload.content)

        async with running(client) as task:
            await server.wait_for_clients()
            await push(server, "a", "stop")
            await asyncio.wait_for(asyncio.wait([task]), WAIT)
            assert task.done() and task.exception() is None
        assert after_close == ["stop"]
        assert client.statistics().state == "closed"
        assert chatfeed_tasks() == []


async def test_run_cancelled_from_outside_cancels_the_handlers_at_once() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        client = make_client(server.url, drain_timeout=3600.0)  # a drain would hang the test
        handler = Gates()
        cancelled = Counter()

        @client.on("new_message", concurrency=2)
        async def stuck(event: chatfeed.NewMessage) -> None:
            try:
                await handler(event)
            except asyncio.CancelledError:
                cancelled.bump()
                raise

        task = asyncio.create_task(client.run())
        await server.wait_for_clients()
        await push(server, "a", "a1")
        await handler.started_count.wait_for(1)
        task.cancel()
        await asyncio.wait_for(asyncio.wait([task]), WAIT)
        assert task.cancelled()
        assert cancelled.value == 1
        assert chatfeed_tasks() == []


async def test_lanes_carry_on_across_a_reconnect_in_order() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        client = make_client(server.url)
        handler = Gates()
        client.on("new_message", concurrency=2)(handler)
        async with client:
            await push(server, "a", "a1", "a2")
            await handler.started_count.wait_for(1)
            server.drop_connections()
            await server.wait_for_clients()
            await push(server, "a", "a3")
            handler.open("a")
            await handler.finished_count.wait_for(3)
        assert handler.finished == ["a1", "a2", "a3"]


async def test_no_ordering_with_key_none_and_any_key_function() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        client = make_client(server.url)
        unordered = Gates()
        by_role = Gates()
        client.on("new_message", concurrency=3, key=None)(unordered)
        client.on("new_message", concurrency=3, key=lambda e: e.payload.role)(by_role)
        async with client:
            for n in range(3):
                await server.push_message(chat_id="a", role="assistant", content=f"a{n}")
            # No key: all three of one chat run at once. By role: one at a time.
            await unordered.started_count.wait_for(3)
            await by_role.started_count.wait_for(1)
            assert by_role.running == 1
            by_role.open("a")
            unordered.open("a")
            await by_role.finished_count.wait_for(3)
            await unordered.finished_count.wait_for(3)
        assert by_role.started == ["a0", "a1", "a2"]


async def test_inline_handlers_and_streams_still_see_every_event_in_order() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        client = make_client(server.url)
        inline: list[str] = []
        handler = Gates()
        client.on("new_message", concurrency=4)(handler)
        client.on("new_message")(lambda event: inline.append(event.payload.content))
        async with client:
            stream = client.events()
            await push(server, "a", "a1", "a2")
            await push(server, "b", "b1")
            streamed = [
                event.payload.content async for event in _take(stream, 3) if isinstance(event, chatfeed.NewMessage)
            ]
            handler.open("a", "b")
            await handler.finished_count.wait_for(3)
        assert inline == streamed == ["a1", "a2", "b1"]


async def _take(stream: chatfeed.EventStream[chatfeed.FeedEvent], count: int) -> Any:
    for _ in range(count):
        yield await asyncio.wait_for(anext(stream), WAIT)


@pytest.mark.parametrize("concurrency", [1, 8])
async def test_slow_handlers_over_many_chats(concurrency: int, caplog: pytest.LogCaptureFixture) -> None:
    # The workload, scaled down: every event is delivered once and in
    # order within its chat, inline or concurrent (the speed-up is measured by
    # the benchmark, not asserted here).
    async with FeedServer(tokens=[TOKEN]) as server:
        client = make_client(server.url)
        done = Counter()
        seen: dict[str, list[int]] = collections.defaultdict(list)

        options: dict[str, Any] = {"concurrency": concurrency} if concurrency > 1 else {}

        @client.on("new_message", **options)
        async def work(event: chatfeed.NewMessage) -> None:
            await asyncio.sleep(1 * MS)
            seen[event.payload.chat_id].append(int(event.payload.content))
            done.bump()

        with caplog.at_level(logging.WARNING, logger="chatfeed"):
            async with client:
                for n in range(100):
                    await server.push_message(chat_id=str(n % 10), content=str(n))
                await done.wait_for(100)
        assert all(numbers == sorted(numbers) for numbers in seen.values())
        assert sum(map(len, seen.values())) == 100
        assert [record for record in caplog.records if record.name == "chatfeed"] == []


async def test_a_block_cancelled_from_outside_cancels_the_handlers_at_once() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        client = make_client(server.url, drain_timeout=3600.0)  # a drain would hang the test
        handler = Gates()
        cancelled = Counter()
        inside = asyncio.Event()

        @client.on("new_message", concurrency=2)
        async def stuck(event: chatfeed.NewMessage) -> None:
            try:
                await handler(event)
            except asyncio.CancelledError:
                cancelled.bump()
                raise

        async def block() -> None:
            async with client:
                await push(server, "a", "a1")
                await handler.started_count.wait_for(1)
                inside.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(block())
        await asyncio.wait_for(inside.wait(), WAIT)
        task.cancel()
        await asyncio.wait_for(asyncio.wait([task]), WAIT)
        assert task.cancelled()
        assert cancelled.value == 1
        assert chatfeed_tasks() == []


async def test_a_second_close_from_another_handler_does_not_cut_the_drain_short() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        client = make_client(server.url, drain_timeout=WAIT)
        handler = Gates()

        @client.on("new_message", concurrency=2)
        async def work_then_close(event: chatfeed.NewMessage) -> None:
            await handler(event)
            await client.close()  # "that was the last one I wanted", from every call

        async with running(client) as task:
            await server.wait_for_clients()
            await push(server, "a", "a1")
            await push(server, "b", "b1")
            await push(server, "c", "c1")  # queued: two calls run at most
            await handler.started_count.wait_for(2)
            handler.open("a")  # a1 closes the client: the drain begins, b1 runs, c1 waits
            await handler.finished_count.wait_for(1)
            # The connection is closed first; then the client drains.
            await server._wait_until(lambda: server.clients == 0, WAIT)
            handler.open("b")  # b1 closes it again, while it drains
            await handler.started_count.wait_for(3)
            handler.open("c")
            await asyncio.wait_for(asyncio.wait([task]), WAIT)
            assert task.exception() is None
        assert sorted(handler.finished) == ["a1", "b1", "c1"]


async def test_leaving_the_block_while_a_handler_drains_waits_for_it() -> None:
    async with FeedServer(tokens=[TOKEN]) as server:
        client = make_client(server.url, drain_timeout=WAIT)
        handler = Gates()
        closed = asyncio.Event()

        @client.on("new_message", concurrency=2)
        async def work(event: chatfeed.NewMessage) -> None:
            await handler(event)
            if event.payload.content == "a1":
                await client.close()
                closed.set()

        async def open_b_once_the_block_is_left() -> None:
            await closed.wait()
            await asyncio.sleep(0)  # a turn of the loop: __aexit__ is under way
            handler.open("b")

        opener = asyncio.create_task(open_b_once_the_block_is_left())
        async with client:
            await push(server, "a", "a1")
            await push(server, "b", "b1")
            await handler.started_count.wait_for(2)
            handler.open("a")
            await closed.wait()
            await server._wait_until(lambda: server.clients == 0, WAIT)  # the client drains now
        await opener
        assert sorted(handler.finished) == ["a1", "b1"]  # b1 was not cancelled by __aexit__'s close()
        assert chatfeed_tasks() == []
