"""A chat feed server for tests: the real protocol, on loopback, in your process.

[`FeedServer`][chatfeed.testing.FeedServer] speaks the backend's protocol over a real WebSocket server
(websockets'): it checks the auth frame against the tokens it was given,
answers ``auth_success`` or ``auth_error``, and pushes what you tell it to. It
can also misbehave on purpose (reject the handshake with an HTTP status, stay
silent, close with any code, drop or freeze connections, restart) so that you
can test how your application copes. It keeps a history of the messages and
chats it pushed, as a backend's database would, for a client to backfill from
after a gap: in the process ([`history`][chatfeed.testing.FeedServer.history]),
or over HTTP on the same port (``GET /history``), as a backend's REST API
serves it. And it replays recordings of real feeds
([`replay`][chatfeed.testing.FeedServer.replay]), made with
[`Recorder`][chatfeed.Recorder] or ``chatfeed listen --record``, to turn what
production sent into a test.

Example:
    ```python
    from chatfeed.testing import FeedServer

    async def test_shows_new_messages() -> None:
        async with FeedServer(tokens=["t"]) as server:
            client = chatfeed.Client(server.url, token="t")
            async with client:
                stream = client.events()
                await server.push_message(content="hello")
                event = await anext(stream)
                assert event.payload.content == "hello"
    ```
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import operator
import os
import random
import ssl as ssl_module
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any, Literal

from typing_extensions import Self
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ._logging import redacting_logger
from ._protocol import parse_server_message
from ._recording import Recording, read_recording
from .exceptions import ProtocolError, UsageError
from .models import Chat, Message, NewChat, NewMessage, ServerMessage

__all__ = ["FeedServer", "make_chat", "make_message", "synthetic_conversation"]

logger = logging.getLogger("chatfeed.testing")

_WEBSOCKETS_LOGGER = redacting_logger("websockets.server")
_ids = itertools.count(1)


def make_message(**fields: Any) -> Message:
    """Return a plausible assistant [`Message`][chatfeed.Message]; ``fields`` override any field.

    Example:
        >>> make_message(content="Hi", chat_id="7").content
        'Hi'
    """
    values: dict[str, Any] = {
        "id": str(next(_ids)),
        "chat_id": "1",
        "role": "assistant",
        "content": "This is the AI's response...",
        "precis": "AI response summary.",
        "audio_url": "https://example.invalid/audio.mp3",
        "fallback_used": False,
        "status": "COMPLETED",
        "created_at": datetime.now(timezone.utc),
    }
    values.update(fields)
    return Message(**values)


def make_chat(**fields: Any) -> Chat:
    """Return a plausible [`Chat`][chatfeed.Chat]; ``fields`` override any field."""
    now = datetime.now(timezone.utc)
    values: dict[str, Any] = {
        "id": str(next(_ids)),
        "user_id": "1",
        "title": "The first question of the chat...",
        "summary": "This chat is about: the first question...",
        "created_at": now,
        "updated_at": now,
    }
    values.update(fields)
    return Chat(**values)


_TOPICS = [
    [
        ("What is the tallest mountain in Europe?", "Mount Elbrus, in the Caucasus, at 5,642 metres."),
        ("And in the Alps?", "Mont Blanc, at about 4,806 metres, on the French-Italian border."),
        (
            "Can I climb it without a guide?",
            "Experienced alpinists do, but most people hire a guide for the summit day.",
        ),
    ],
    [
        (
            "How do I keep basil alive indoors?",
            "Give it six hours of sun, water when the top soil is dry, and pinch the tips.",
        ),
        ("Why are the leaves turning yellow?", "Usually too much water: let the pot drain and water less often."),
    ],
    [
        (
            "Explain backpressure in one sentence.",
            "A slow reader makes the writer wait instead of letting a buffer grow.",
        ),
        (
            "Is TCP doing that for me?",
            "Yes: when the receive window fills, the sender stops until the reader catches up.",
        ),
        ("And WebSockets?", "They ride on TCP, so a client that stops reading slows the server's writes too."),
    ],
    [
        ("Suggest a name for a grey cat.", "Ash, Pebble or Earl Grey, if it is a dignified cat."),
        ("It is not dignified.", "Then Dust Bunny."),
    ],
]


def synthetic_conversation(*, seed: int | None = None, user_id: str = "1") -> Iterator[NewChat | NewMessage]:
    """Yield a plausible, endless feed: a new chat, then its user and assistant messages.

    Assistant messages carry a precis and an audio URL; about one in eight was
    answered by the fallback model. Ids increase; timestamps are the time of
    generation.

    Args:
        seed: Seed of the random choices, for a repeatable feed.
        user_id: The ``userId`` of every chat.

    Example:
        >>> events = synthetic_conversation(seed=1)
        >>> next(events).type, next(events).type
        ('new_chat', 'new_message')
    """
    rng = random.Random(seed)
    chat_ids = itertools.count(1)
    message_ids = itertools.count(1)
    while True:
        exchanges = rng.choice(_TOPICS)
        first_question = exchanges[0][0]
        chat = make_chat(
            id=str(next(chat_ids)),
            user_id=user_id,
            title=first_question,
            summary=f"This chat is about: {first_question}",
        )
        yield NewChat(type="new_chat", payload=chat)
        for question, answer in exchanges:
            yield NewMessage(
                type="new_message",
                payload=make_message(
                    id=str(next(message_ids)),
                    chat_id=chat.id,
                    role="user",
                    content=question,
                    precis=None,
                    audio_url=None,
                ),
            )
            message_id = str(next(message_ids))
            yield NewMessage(
                type="new_message",
                payload=make_message(
                    id=message_id,
                    chat_id=chat.id,
                    role="assistant",
                    content=answer,
                    precis=_precis(answer),
                    audio_url=f"https://example.com/audio/{message_id}.mp3",
                    fallback_used=rng.random() < 0.125,
                ),
            )


def _precis(text: str, words: int = 5) -> str:
    head = text.split()
    return " ".join(head[:words]) + ("..." if len(head) > words else "")


class FeedServer:
    """A chat feed backend on a loopback port.

    Args:
        tokens: The tokens it accepts; the `tokens` attribute can be changed later
            (remove one to make the next auth with it fail). A connection
            authenticated with one of these is no user's in particular: it
            gets every frame pushed, whatever ``user_id`` the push names. By
            default ``"test-token"``, or none when ``users`` is given.
        users: Tokens of users, each mapped to its user's id; they are
            accepted too, and a connection authenticated with one gets only
            what is pushed to every client (no ``user_id``) or to its user
            (``user_id=`` of [`push_message`][chatfeed.testing.FeedServer.push_message],
            [`push_chat`][chatfeed.testing.FeedServer.push_chat],
            [`send_raw`][chatfeed.testing.FeedServer.send_raw] and
            [`play`][chatfeed.testing.FeedServer.play]). The `users` attribute
            can be changed later, as `tokens` can.
        host: The address to listen on.
        port: The port; 0 picks a free one (see [`url`][chatfeed.testing.FeedServer.url]).
        close_on_auth_error: Close the connection (code 1008) after
            ``auth_error``, as most backends do.
        ssl: A server-side TLS context, to serve ``wss://``.
        history_size: How many pushed messages and chats
            [`history`][chatfeed.testing.FeedServer.history] keeps; the oldest
            are forgotten first.
        backlog: The listening socket's queue of connections not yet
            accepted (``listen()``'s backlog, capped by the system's
            ``somaxconn``). The default of 100 is asyncio's; thousands of
            clients connecting within a second overflow it, and the kernel
            then drops their connection requests, which they retry a second
            later: raise it to serve a pool of many feeds.
        compression: ``"deflate"`` (the default, websockets') to accept
            permessage-deflate when a client offers it, ``None`` never to
            compress. A connection that negotiated it keeps zlib state on
            both sides, for as long as it is open.

    Raises:
        UsageError: ``history_size`` or ``backlog`` is not a positive int, or
            ``compression`` is neither ``"deflate"`` nor ``None``, or ``users``
            is not a mapping of non-empty str to non-empty str.

    HTTP: the history is served on the same port, as a backend's REST API
    would, to a request without an ``Upgrade`` header (any other such request
    gets websockets' 426):

    ```text
    GET /history?since=2024-05-01T12:00:00.5Z HTTP/1.1
    Authorization: Bearer <token>
    ```

    answers ``200`` with a JSON array of frames, ``{"type": "new_message",
    "payload": {...}}`` or ``{"type": "new_chat", "payload": {...}}`` (the
    payloads as the feed's frames carry them, camelCase), oldest first: what
    [`history(since, user_id=)`][chatfeed.testing.FeedServer.history] returns
    for the token's user, or for every user with a token of ``tokens``.
    ``since`` is ISO 8601 with a timezone (``Z``, or an offset whose ``+`` is
    sent as ``%2B``); without it, the whole history. A missing or unknown
    token gets ``401``, a bad ``since`` ``400``. Neither `silent` nor
    [`reject_handshakes`][chatfeed.testing.FeedServer.reject_handshakes]
    applies to these requests, and they are not counted in `handshakes`.

    Attributes:
        tokens: The accepted tokens.
        users: The users' tokens, each mapped to its user's id.
        silent: When True, auth frames get no answer at all.
        received_tokens: Every token received in an auth frame, in order.
        handshakes: WebSocket handshakes completed so far.
    """

    def __init__(
        self,
        *,
        tokens: Iterable[str] | None = None,
        users: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        close_on_auth_error: bool = True,
        ssl: ssl_module.SSLContext | None = None,
        history_size: int = 100_000,
        backlog: int = 100,
        compression: Literal["deflate"] | None = "deflate",
    ) -> None:
        if isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1:
            raise UsageError(f"history_size must be a positive int, not {history_size!r}")
        if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 1:
            raise UsageError(f"backlog must be a positive int, not {backlog!r}")
        if compression not in ("deflate", None):
            raise UsageError(f'compression must be "deflate" or None, not {compression!r}')
        if users is not None and not (
            isinstance(users, Mapping)
            and all(isinstance(item, str) and item for pair in users.items() for item in pair)
        ):
            raise UsageError("users must map each user's token to its user's id, both non-empty str")
        if tokens is None:
            tokens = () if users is not None else ("test-token",)
        self.tokens: set[str] = set(tokens)
        self.users: dict[str, str] = dict(users or {})
        self.silent = False
        self.close_on_auth_error = close_on_auth_error
        self.received_tokens: list[str] = []
        self.handshakes = 0
        self._host = host
        self._port = port
        self._ssl = ssl
        self._backlog = backlog
        self._compression: Literal["deflate"] | None = compression
        self._server: Server | None = None
        self._connections: set[ServerConnection] = set()
        self._clients: set[ServerConnection] = set()
        # The authenticated connections by user id; None holds those of
        # `tokens`, which are no user's and get every push.
        self._user_of: dict[ServerConnection, str | None] = {}
        self._by_user: dict[str | None, set[ServerConnection]] = {}
        self._frozen: set[ServerConnection] = set()
        self._rejections: list[tuple[int, dict[str, str]]] = []
        self._changed: asyncio.Future[None] | None = None
        self._history: deque[Message | Chat] = deque(maxlen=history_size)

    # Life cycle

    async def start(self) -> Self:
        """Start listening. The port stays the same across restarts."""
        if self._server is not None:
            raise UsageError("the server is already running")
        self._server = await serve(
            self._handle,
            self._host,
            self._port,
            process_request=self._process_request,
            logger=_WEBSOCKETS_LOGGER,
            ssl=self._ssl,
            compression=self._compression,
            backlog=self._backlog,
        )
        if self._port == 0:
            self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Close every connection (code 1001) and stop listening."""
        server, self._server = self._server, None
        # A frozen connection would not notice the closing handshake.
        for ws in self._frozen:
            ws.transport.abort()
        self._frozen.clear()
        if server is not None:
            server.close()
            await server.wait_closed()

    async def restart(self) -> None:
        """Stop (clients see 1001, Going Away) and start again on the same port."""
        await self.stop()
        await self.start()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """The address clients connect to: ``ws://``, or ``wss://`` with ``ssl``."""
        return f"{'wss' if self._ssl else 'ws'}://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        """The port it listens on."""
        return self._port

    @property
    def clients(self) -> int:
        """How many authenticated connections are open."""
        return len(self._clients)

    # Misbehaviour

    def reject_handshakes(self, status: int, *, times: int = 1, headers: Mapping[str, str] | None = None) -> None:
        """Answer the next ``times`` handshakes with HTTP ``status`` instead of upgrading.

        Example:
            ``server.reject_handshakes(429, headers={"Retry-After": "1"})``
        """
        self._rejections.extend([(status, dict(headers or {}))] * times)

    async def close_connections(self, code: int = 1000, reason: str = "") -> None:
        """Close every open connection with ``code`` and ``reason``."""
        connections = self._forget_connections()
        await asyncio.gather(*(ws.close(code, reason) for ws in connections))

    def drop_connections(self) -> None:
        """Drop every open connection at once, with no closing handshake (TCP reset)."""
        for ws in self._forget_connections():
            ws.transport.abort()

    def freeze_connections(self) -> None:
        """Stop reading from every open connection: the peer looks dead (no pongs, no close)."""
        for ws in self._forget_connections():
            ws.transport.pause_reading()
            self._frozen.add(ws)

    def _forget_connections(self) -> list[ServerConnection]:
        # What the caller ends is no client any more, even before its handler
        # has noticed: wait_for_clients() after it waits for new ones.
        connections = list(self._connections)
        self._connections.clear()
        self._clients.clear()
        self._user_of.clear()
        self._by_user.clear()
        self._notify()
        return connections

    # Pushing

    async def push_message(
        self, message: Message | None = None, *, user_id: str | None = None, **fields: Any
    ) -> Message:
        """Send a ``new_message`` frame to every authenticated client, or to one user's.

        Args:
            message: The message; by default [`make_message`][chatfeed.testing.make_message] with ``fields``.
            user_id: Send it only to the connections of this user (see
                ``users``), and to those of ``tokens``, which are no user's;
                to every client when ``None``.

        Returns:
            The message sent.
        """
        message = message or make_message(**fields)
        await self._publish(NewMessage(type="new_message", payload=message), user_id)
        return message

    async def push_chat(self, chat: Chat | None = None, *, user_id: str | None = None, **fields: Any) -> Chat:
        """Send a ``new_chat`` frame to every authenticated client, or to one user's.

        Works like [`push_message`][chatfeed.testing.FeedServer.push_message].
        The chat made when ``chat`` is not given is ``user_id``'s (its
        ``userId``), unless ``fields`` say otherwise; a connection of
        ``tokens`` gets it whatever ``user_id`` is, as before users existed.
        """
        if chat is None:
            if user_id is not None:
                fields.setdefault("user_id", user_id)
            chat = make_chat(**fields)
        await self._publish(NewChat(type="new_chat", payload=chat), user_id)
        return chat

    async def push_error(self, message: str, *, user_id: str | None = None) -> None:
        """Send an ``error`` frame to every authenticated client, or to one user's (as ``push_message``)."""
        await self.send_raw(json.dumps({"type": "error", "message": message}), user_id=user_id)

    async def send_raw(self, frame: str | bytes, *, user_id: str | None = None) -> int:
        """Send ``frame`` as is (text for ``str``, binary for ``bytes``) to every authenticated client.

        The frame is opaque to the server, so it is not recorded in the
        [`history`][chatfeed.testing.FeedServer.history], even when it holds a
        message or a chat.

        Args:
            frame: The frame.
            user_id: Send it only to the connections of this user (see
                ``users``), and to those of ``tokens``, which are no user's;
                to every client when ``None``.

        Returns:
            How many clients it was sent to.
        """
        if user_id is None:
            clients = list(self._clients)
        else:
            clients = [*self._by_user.get(user_id, ()), *self._by_user.get(None, ())]
        for ws in clients:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(frame)
        return len(clients)

    async def play(self, events: Iterable[ServerMessage], *, rate: float, user_id: str | None = None) -> None:
        """Send ``events`` to every authenticated client, ``rate`` per second, until they run out.

        Events are sent whether or not anyone is connected, as a live backend
        would; cancel the task running it to stop an endless feed. The
        payloads of ``new_message`` and ``new_chat`` events are recorded in the
        [`history`][chatfeed.testing.FeedServer.history]. With ``user_id``,
        they go only to that user's connections (and those of ``tokens``), as
        with [`push_message`][chatfeed.testing.FeedServer.push_message]; one
        ``play`` per user, each in its own task, gives every user a
        conversation of its own.

        Example:
            ``await server.play(synthetic_conversation(), rate=2.0)``

            ``await server.play(synthetic_conversation(user_id="u1"), rate=2.0, user_id="u1")``
        """
        if not rate > 0:
            raise UsageError(f"rate must be a positive number of events per second, not {rate!r}")
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        for event in events:
            await self._publish(event, user_id)
            # Scheduled from the start, so that slow sends do not make it drift.
            next_at += 1 / rate
            await asyncio.sleep(max(next_at - loop.time(), 0))

    async def replay(self, path: str | os.PathLike[str], *, speed: float = 1.0, user_id: str | None = None) -> int:
        """Play a recording back to the authenticated clients, at its pace divided by ``speed``.

        The recording is a file written by [`Recorder`][chatfeed.Recorder] or
        ``chatfeed listen --record``, from production say: replayed to a
        client under test, it reproduces what that feed sent, byte for byte.
        Its frames are sent verbatim and in order, malformed and unknown ones
        too, binary ones as binary frames; only the handshake's frames
        (``auth_success``, ``auth_error``) are left out, since the server
        makes its own handshake. The first frame is sent at once, and each
        next one when its recorded time since the first, divided by
        ``speed``, has passed: ``speed=10`` plays a 1 s gap in 0.1 s,
        ``speed=float("inf")`` plays everything as fast as the clients read.

        As with [`play`][chatfeed.testing.FeedServer.play], frames are sent
        whether or not anyone is connected (call
        [`wait_for_clients`][chatfeed.testing.FeedServer.wait_for_clients]
        first), and the ``new_message`` and ``new_chat`` frames that parse
        are recorded in the [`history`][chatfeed.testing.FeedServer.history],
        for a client's backfill.

        Where each frame goes: a frame of a lone client's recording goes to
        every authenticated client. A frame of a pool's recording, which
        names its feed, goes to the connections of the user whose id is that
        feed's key (``users={token: key}``), and to those of ``tokens``, which
        get every frame: one client of ``tokens`` sees every feed, in the
        order they were recorded. With ``user_id``, every frame goes to that
        user's connections (and to those of ``tokens``), whatever its feed.

        Args:
            path: The recording.
            speed: How many times faster than recorded; a positive number,
                ``float("inf")`` for no waiting at all.
            user_id: Send every frame to this user's connections only.

        Returns:
            How many frames were replayed.

        Raises:
            UsageError: ``speed`` is not a positive number, or the file cannot
                be read or is not a recording (the message gives the line).

        Example:
            A bug seen in production, turned into a regression test:

            ```python
            async def test_survives_the_feed_of_incident_42() -> None:
                async with FeedServer(tokens=["t"]) as server:
                    async with chatfeed.Client(server.url, token="t") as client:
                        stream = client.events()
                        await server.wait_for_clients()
                        await server.replay("tests/recordings/incident-42.jsonl", speed=float("inf"))
                        ...
            ```
        """
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not speed > 0:
            raise UsageError(f"speed must be a positive number (float('inf'): as fast as possible), not {speed!r}")
        return await self._replay(read_recording(path), speed=speed, user_id=user_id)

    async def _replay(self, recording: Recording, *, speed: float, user_id: str | None = None) -> int:
        loop = asyncio.get_running_loop()
        begun = loop.time()
        first: float | None = None
        sent = 0
        for recorded in recording.frames:
            frame = recorded.frame
            if _is_handshake(frame):
                continue
            if first is None:
                first = recorded.t
            # Due from the start, so that slow sends do not make it drift.
            delay = begun + (recorded.t - first) / speed - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._remember(frame)
            await self.send_raw(frame, user_id=recorded.feed if user_id is None else user_id)
            sent += 1
        return sent

    def _remember(self, frame: str | bytes) -> None:
        """Record in the history the message or chat ``frame`` carries, as a backend would have stored it."""
        try:
            message = parse_server_message(frame)
        except ProtocolError:
            return
        if isinstance(message, (NewMessage, NewChat)):
            self._history.append(message.payload)

    async def _publish(self, event: ServerMessage, user_id: str | None = None) -> None:
        # Stored before it is sent, and whether or not anyone is connected, as
        # a backend writes to its database before it pushes.
        if isinstance(event, (NewMessage, NewChat)):
            self._history.append(event.payload)
        await self.send_raw(event.model_dump_json(by_alias=True), user_id=user_id)

    # History

    def history(self, since: datetime | None = None, *, user_id: str | None = None) -> list[Message | Chat]:
        """Return the messages and chats pushed so far, oldest first, as a backend's REST API would.

        Everything [`push_message`][chatfeed.testing.FeedServer.push_message],
        [`push_chat`][chatfeed.testing.FeedServer.push_chat] and
        [`play`][chatfeed.testing.FeedServer.play] sent is recorded, whether or
        not a client was connected, and kept across restarts, up to
        ``history_size`` items.

        Args:
            since: Only what was created at or after this time (``created_at >= since``);
                everything when ``None``. It must be timezone-aware.
            user_id: Only the chats of this user, and the messages of those of
                its chats that are still in the history.

        Returns:
            The items, sorted by ``created_at``; items created at the same time
            keep the order they were pushed in.

        Raises:
            UsageError: ``since`` is naive (has no timezone).

        Example:
            A client that fetches what it missed while it was disconnected:

            ```python
            async with FeedServer(tokens=["t"]) as server:
                client = chatfeed.Client(
                    server.url,
                    token="t",
                    backfill=lambda gap: server.history(since=gap.since),
                )
            ```
        """
        if since is not None and since.utcoffset() is None:
            raise UsageError(f"since must be a timezone-aware datetime, not {since!r}")
        items: Iterable[Message | Chat] = self._history
        if user_id is not None:
            chat_ids = {item.id for item in items if isinstance(item, Chat) and item.user_id == user_id}
            items = [
                item
                for item in items
                if (isinstance(item, Chat) and item.user_id == user_id)
                or (isinstance(item, Message) and item.chat_id in chat_ids)
            ]
        if since is not None:
            items = [item for item in items if item.created_at >= since]
        return sorted(items, key=operator.attrgetter("created_at"))

    def clear_history(self) -> None:
        """Forget every message and chat recorded so far."""
        self._history.clear()

    # Waiting

    async def wait_for_clients(self, count: int = 1, *, timeout: float | None = 10.0) -> None:
        """Wait until at least ``count`` authenticated connections are open.

        Raises:
            TimeoutError: Not within ``timeout`` seconds.
        """
        await self._wait_until(lambda: len(self._clients) >= count, timeout)

    async def wait_for_handshakes(self, count: int, *, timeout: float | None = 10.0) -> None:
        """Wait until ``count`` WebSocket handshakes have completed in all.

        Raises:
            TimeoutError: Not within ``timeout`` seconds.
        """
        await self._wait_until(lambda: self.handshakes >= count, timeout)

    async def wait_for_auth_frames(self, count: int, *, timeout: float | None = 10.0) -> None:
        """Wait until ``count`` auth frames have been received in all.

        See the `received_tokens` attribute.

        Raises:
            TimeoutError: Not within ``timeout`` seconds.
        """
        await self._wait_until(lambda: len(self.received_tokens) >= count, timeout)

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not predicate():
            if self._changed is None:
                self._changed = loop.create_future()
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"FeedServer: condition not met within {timeout} s")
            await asyncio.wait([self._changed], timeout=remaining)

    def _notify(self) -> None:
        # Wakes every waiter; each checks its own condition and waits anew.
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None

    # The protocol

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if "Upgrade" not in request.headers:
            return self._serve_http(connection, request)
        if not self._rejections:
            return None
        status, headers = self._rejections.pop(0)
        response = connection.respond(status, "rejected by FeedServer\n")
        response.headers.update(Headers(headers))
        return response

    def _serve_http(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer a plain HTTP request: ``GET /history``; ``None`` (websockets' 426) for any other path."""
        target = urllib.parse.urlsplit(request.path)
        if target.path.rstrip("/") != "/history":
            return None
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not (token in self.users or token in self.tokens):
            response = connection.respond(
                HTTPStatus.UNAUTHORIZED, "a valid token is needed: Authorization: Bearer <token>\n"
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="chatfeed"'
            return response
        since = None
        values = urllib.parse.parse_qs(target.query, keep_blank_values=True).get("since")
        if values is not None:
            since = _parse_since(values[-1])
            if since is None:
                return connection.respond(
                    HTTPStatus.BAD_REQUEST,
                    "since must be an ISO 8601 time with a timezone, such as 2024-05-01T12:00:00Z\n",
                )
        frames = [
            (
                NewMessage(type="new_message", payload=item)
                if isinstance(item, Message)
                else NewChat(type="new_chat", payload=item)
            ).model_dump_json(by_alias=True)
            for item in self.history(since, user_id=self.users.get(token))
        ]
        response = connection.respond(HTTPStatus.OK, "[" + ",".join(frames) + "]")
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "application/json"
        return response

    async def _handle(self, ws: ServerConnection) -> None:
        self.handshakes += 1
        self._connections.add(ws)
        self._notify()
        try:
            await self._serve(ws)
        except ConnectionClosed:
            pass
        finally:
            self._connections.discard(ws)
            self._clients.discard(ws)
            self._forget_user(ws)
            self._notify()

    def _forget_user(self, ws: ServerConnection) -> None:
        if ws not in self._user_of:
            return
        user_id = self._user_of.pop(ws)
        connections = self._by_user[user_id]
        connections.discard(ws)
        if not connections:
            del self._by_user[user_id]

    async def _serve(self, ws: ServerConnection) -> None:
        frame = await ws.recv()
        token = _auth_token(frame)
        if token is None:
            await ws.close(1008, "expected an auth frame")
            return
        self.received_tokens.append(token)
        self._notify()
        if self.silent:
            await ws.wait_closed()
            return
        user_id = self.users.get(token)
        if user_id is None and token not in self.tokens:
            await ws.send(json.dumps({"type": "auth_error", "message": "Invalid token"}))
            if self.close_on_auth_error:
                await ws.close(1008, "invalid token")
                return
        else:
            await ws.send(json.dumps({"type": "auth_success"}))
            self._clients.add(ws)
            self._user_of[ws] = user_id
            self._by_user.setdefault(user_id, set()).add(ws)
            self._notify()
        async for _ in ws:  # clients send nothing after auth; keep the connection read
            pass


_HANDSHAKE_TYPES = frozenset({"auth_success", "auth_error"})


def _is_handshake(frame: str | bytes) -> bool:
    """Whether ``frame`` is the server's side of a handshake, which a replay leaves to the server."""
    if not ("auth_" in frame if isinstance(frame, str) else b"auth_" in frame):
        return False
    try:
        data = json.loads(frame)
    except (ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("type") in _HANDSHAKE_TYPES


def _parse_since(text: str) -> datetime | None:
    """Return the ISO 8601 time ``text`` (``Z`` taken for UTC), or ``None`` when it is not one with a timezone."""
    try:
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text)
    except ValueError:
        return None
    return moment if moment.utcoffset() is not None else None


def _auth_token(frame: str | bytes) -> str | None:
    try:
        data = json.loads(frame)
    except ValueError:
        return None
    token = data.get("token") if isinstance(data, dict) and data.get("type") == "auth" else None
    return token if isinstance(token, str) else None
