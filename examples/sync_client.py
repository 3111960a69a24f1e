"""Blocking code: ``chatfeed.sync.Client``, for scripts, Django commands, Celery tasks and notebooks.

Three ways to use it, one after the other:

1. ``with Client(...) as client:`` returns once the client is authenticated;
   ``for event in client.events(timeout=...)`` reads the feed, blocking, and
   raises ``TimeoutError`` when nothing comes in time.
2. ``client.expect(...)``, made *before* the request whose reply it waits
   for, then ``reply.wait()``.
3. Handlers and ``client.run()``, which calls them in this thread (the main
   one); a handler closes the client after the third message, and ``run()``
   returns. Ctrl-C would do the same.

The program has no event loop of its own. It starts a FeedServer on one, in a
thread of its own, plays the backend with it, and exits; no thread is left.

Run it with ``python examples/sync_client.py``.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import chatfeed
from chatfeed.sync import Client
from chatfeed.testing import FeedServer

T = TypeVar("T")
TOKEN = "dev-token"


class Backend:
    """A FeedServer on an event loop in a thread of its own, driven from blocking code."""

    def __init__(self) -> None:
        self.server = FeedServer(tokens=[TOKEN])
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="backend", daemon=True)

    def __enter__(self) -> Backend:
        self._thread.start()
        self._call(self.server.start())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._call(self.server.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    @property
    def url(self) -> str:
        return self.server.url

    def push(self, content: str, *, chat_id: str = "1", role: str = "assistant") -> None:
        """Push a message to every client, as the backend does when one is created."""
        self._call(self.server.push_message(content=content, chat_id=chat_id, role=role))


def iterate(backend: Backend) -> None:
    print("-- iterating")
    with Client(backend.url, token=TOKEN) as client:
        events = client.events(timeout=5.0)  # at most 5 s per event
        backend.push("first")
        backend.push("second")
        for event in events:
            if isinstance(event, chatfeed.NewMessage):
                print(f"  {event.payload.content}")
                if event.payload.content == "second":
                    break
        events.timeout = 0.2
        try:
            next(events)
        except TimeoutError:
            print("  no event within 0.2 s")  # and `events` is still usable


def ask(backend: Backend) -> None:
    print("-- waiting for a reply")
    with Client(backend.url, token=TOKEN) as client:
        with client.expect(
            "new_message",
            where=lambda e: e.payload.chat_id == "7" and e.payload.role == "assistant",
            timeout=5.0,
        ) as reply:
            # In a real program: the prompt goes to the backend over its REST
            # API, and the model's answer comes back on the feed.
            backend.push("What is 6 x 7?", chat_id="7", role="user")
            backend.push("6 x 7 = 42", chat_id="7")
            event = reply.wait()  # typed: a chatfeed.NewMessage
        print(f"  reply in chat 7: {event.payload.content}")


def serve(backend: Backend) -> None:
    print("-- handlers and run()")
    client = Client(backend.url, token=TOKEN)
    handled: list[str] = []

    @client.on("connected")
    def connected(event: chatfeed.Connected) -> None:
        print(f"  connected, in {threading.current_thread().name}")
        for text in ("one", "two", "three"):
            backend.push(text)  # read once this handler returns

    @client.on("new_message")
    def show(event: chatfeed.NewMessage) -> None:
        handled.append(event.payload.content)
        print(f"  handled {event.payload.content!r}, in {threading.current_thread().name}")
        if len(handled) == 3:
            client.close()  # from a handler: run() returns once it has

    client.run()  # blocks; Ctrl-C closes the client and returns too
    left = [thread.name for thread in threading.enumerate() if thread.name.startswith("chatfeed")]
    print(f"  run() returned: {client.statistics().state}, {len(handled)} messages, threads left: {left}")


def main() -> int:
    with Backend() as backend:
        iterate(backend)
        ask(backend)
        serve(backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
