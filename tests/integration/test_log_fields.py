"""Structured log fields: what a JSON log formatter finds on chatfeed's records, and never a token in them.

A record about a feed, a chat, a lost connection, an attempt or a wait
carries ``chatfeed_*`` attributes (``extra=``). These tests format every
record of the ``chatfeed`` logger with a JSON formatter of their own, as an
application would, and check the fields a user would query on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

import chatfeed
from chatfeed import Chat, Gap, Message
from chatfeed._logging import Scrubber, redacting_logger
from chatfeed.testing import FeedServer

from ..conftest import FAST, MS, SECRET, SIGNATURE, TOKEN
from .conftest import WAIT, Recorder, make_client, running, url_of

pytestmark = pytest.mark.timeout(20)


class JsonFormatter(logging.Formatter):
    """What an application's JSON formatter does: the message, and every ``chatfeed_`` attribute."""

    def format(self, record: logging.LogRecord) -> str:
        document = {key: value for key, value in record.__dict__.items() if key.startswith("chatfeed_")}
        document["msg"] = record.getMessage()
        # No default=: the fields must be JSON values as they are.
        return json.dumps(document)


class JsonLines(logging.Handler):
    """Keeps each record of the logger it is attached to as the JSON document `JsonFormatter` makes of it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.documents: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.documents.append(json.loads(self.format(record)))

    def matching(self, text: str) -> list[dict[str, Any]]:
        """The documents whose message contains ``text``."""
        return [document for document in self.documents if text in document["msg"]]

    def one(self, text: str) -> dict[str, Any]:
        """The only document whose message contains ``text``."""
        [document] = self.matching(text)
        return document


@contextlib.contextmanager
def json_lines() -> Iterator[JsonLines]:
    """Collect the records of the ``chatfeed`` logger (and its children), DEBUG included, as JSON documents."""
    handler = JsonLines()
    logger = logging.getLogger("chatfeed")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def fields_of(document: dict[str, Any]) -> dict[str, Any]:
    """A document without its message: its structured fields only."""
    return {key: value for key, value in document.items() if key != "msg"}


async def test_a_clients_records_carry_the_chat_the_close_the_attempt_and_the_delay(server: FeedServer) -> None:
    async def unreachable_rest_api(gap: Gap) -> list[Message | Chat]:
        raise ConnectionError("the REST API is down")

    client = make_client(server.url, backfill=unreachable_rest_api)
    connected, lost, errors = Recorder(), Recorder(), Recorder()
    client.on("connected")(connected)
    client.on("disconnected")(lost)
    client.on_error(lambda exc, subject: errors((exc, subject)))

    @client.on("new_message")
    def reply(event: chatfeed.NewMessage) -> None:
        raise ValueError("the reply could not be written")

    with json_lines() as logged:
        async with running(client) as task:
            await connected.wait_for(1)
            await server.push_message(chat_id="chat-7")
            await errors.wait_for(1)  # the handler's
            await server.close_connections(4001, "session replaced")
            await connected.wait_for(2)
            await errors.wait_for(2)  # the backfill's, after the reconnect
            await server.close_connections(4501, "account suspended")  # final
            await asyncio.wait([task], timeout=WAIT)

    assert isinstance(task.exception(), chatfeed.ConnectionLostError)
    handler = logged.one("raised on a new_message event")
    assert fields_of(handler) == {
        "chatfeed_event_type": "new_message",
        "chatfeed_chat": "chat-7",
        "chatfeed_handler": reply.__qualname__,
        "chatfeed_error_type": "ValueError",
    }

    replaced, suspended = logged.matching("lost: connection closed by the server")
    assert fields_of(replaced) == {
        "chatfeed_url": server.url,
        "chatfeed_error_type": "ConnectionLostError",
        "chatfeed_close_code": 4001,
        "chatfeed_close_reason": "session replaced",
    }
    assert (suspended["chatfeed_close_code"], suspended["chatfeed_close_reason"]) == (4501, "account suspended")

    retry = logged.one("reconnecting in")
    first_loss = lost.events[0]
    assert fields_of(retry) == {
        "chatfeed_error_type": "ConnectionLostError",
        "chatfeed_close_code": 4001,
        "chatfeed_close_reason": "session replaced",
        "chatfeed_attempt": 1,
        "chatfeed_delay": first_loss.retry_in,  # the wait the Disconnected event announced, to the bit
    }
    assert 0 <= retry["chatfeed_delay"] <= FAST.initial

    back = logged.one("reconnected to")
    assert back["chatfeed_url"] == server.url
    assert back["chatfeed_downtime"] == pytest.approx(connected.events[1].downtime)

    backfill = logged.one("the backfill failed")
    assert backfill["chatfeed_error_type"] == "ConnectionError"
    assert backfill["chatfeed_downtime"] == pytest.approx(connected.events[1].downtime)

    gave_up = logged.one("giving up on")
    assert fields_of(gave_up) == {
        "chatfeed_url": server.url,
        "chatfeed_error_type": "ConnectionLostError",
        "chatfeed_close_code": 4501,
        "chatfeed_close_reason": "account suspended",
        "chatfeed_failed_attempts": 0,  # the connection had authenticated: the close code alone is final
        "chatfeed_gave_up": True,
    }

    states = [(doc["chatfeed_previous_state"], doc["chatfeed_state"]) for doc in logged.matching("client state:")]
    assert states[:3] == [("unopened", "connecting"), ("connecting", "authenticating"), ("authenticating", "open")]
    assert states[-1] == ("open", "closed")
    # A lone client has no pool key: the field is left out, not null.
    assert not [document for document in logged.documents if "chatfeed_feed" in document]


async def test_every_record_about_a_pool_feed_names_it() -> None:
    tokens = {"alpha": f"{TOKEN}.alpha", "beta": f"{TOKEN}.beta"}
    async with FeedServer(users={token: key for key, token in tokens.items()}) as server:
        pool = chatfeed.Pool(
            server.url, reconnect=FAST, auth_timeout=2000 * MS, open_timeout=2000 * MS, close_timeout=500 * MS
        )
        for key, token in tokens.items():
            pool.add(key, token=token)
        connected, failures = Recorder(), Recorder()
        pool.on("connected")(lambda event, feed: connected(feed))
        pool.on_error(lambda exc, subject: failures(subject))

        @pool.on("new_chat")
        def welcome(event: chatfeed.NewChat, feed: str) -> None:
            raise RuntimeError("no welcome message today")

        with json_lines() as logged:
            async with pool:
                await connected.wait_for(2)
                await server.push_chat(user_id="beta", id="chat-9")
                await failures.wait_for(1)
                await server.close_connections(1012, "restarting")
                await connected.wait_for(4)

    handler = logged.one("raised on a new_chat event")
    assert fields_of(handler) == {
        "chatfeed_feed": "beta",
        "chatfeed_event_type": "new_chat",
        "chatfeed_chat": "chat-9",
        "chatfeed_handler": welcome.__qualname__,
        "chatfeed_error_type": "RuntimeError",
    }
    for key in tokens:
        prefix = f"feed {key!r}: "
        about_it = [document for document in logged.documents if document["msg"].startswith(prefix)]
        assert len(about_it) >= 4  # connected, lost, reconnecting, reconnected
        assert all(document["chatfeed_feed"] == key for document in about_it)
        [lost] = [document for document in about_it if "lost:" in document["msg"]]
        assert (lost["chatfeed_close_code"], lost["chatfeed_close_reason"]) == (1012, "restarting")
        [retry] = [document for document in about_it if "reconnecting in" in document["msg"]]
        assert retry["chatfeed_attempt"] == 1
        assert 0 <= retry["chatfeed_delay"] <= FAST.initial
        states = [document for document in logged.matching("client state:") if document["chatfeed_feed"] == key]
        assert [document["chatfeed_state"] for document in states[:3]] == ["connecting", "authenticating", "open"]


# The token, quoted back by the server, stays out of every field


def token_runs(text: str) -> list[str]:
    """The parts of the token in ``text``: the secret, its signature, or any run of 8 of its characters."""
    runs = [TOKEN[start : start + 8] for start in range(len(TOKEN) - 7)]
    return [part for part in (SECRET, SIGNATURE, *runs) if part in text]


def as_text(value: object) -> str:
    """``str(value)``, for json.dumps; websockets' records hold a weak proxy of a connection that may be gone."""
    try:
        return str(value)
    except ReferenceError:
        return "<a connection that is gone>"


@contextlib.asynccontextmanager
async def server_quoting_the_token() -> AsyncIterator[str]:
    """A server that puts the token everywhere it can, one connection after another.

    First an HTTP 503 whose reason phrase, header and body quote it; then a
    connection with a frame of that name before ``auth_success``, ``error``
    and unknown frames and a malformed ``new_message`` quoting it, closed with
    a retryable code whose reason quotes it; then a final close quoting it.
    """
    attempts = 0

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        nonlocal attempts
        attempts += 1
        if attempts > 1:
            return None
        body = f"overloaded, try {TOKEN} later\n".encode()
        headers = Headers({"WWW-Authenticate": f'Bearer token="{TOKEN}"', "Content-Length": str(len(body))})
        return Response(503, f"Token {TOKEN} Overloaded", headers, body)

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        if attempts == 2:
            await ws.send(json.dumps({"type": TOKEN}))
            await ws.send('{"type": "auth_success"}')
            await ws.send(json.dumps({"type": "error", "message": f"token {TOKEN} expires soon"}))
            await ws.send(json.dumps({"type": "typing", "payload": {"by": TOKEN}}))
            await ws.send(json.dumps({"type": "new_message", "payload": {"id": TOKEN}}))
            await ws.close(4001, f"session of {TOKEN} replaced")
        else:
            await ws.send('{"type": "auth_success"}')
            await ws.close(4501, f"token ...{TOKEN[-20:]} revoked")

    # The server's own DEBUG records (its frames, its reply) would quote the token too.
    logger = redacting_logger("websockets.server", Scrubber(TOKEN))
    async with serve(handler, "127.0.0.1", 0, process_request=process_request, logger=logger) as server:
        yield url_of(server)


async def test_no_field_of_any_record_holds_the_token_the_server_quoted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with server_quoting_the_token() as url:
        client = make_client(url)
        seen = Recorder()
        client.on("error")(seen)
        client.on("unknown")(seen)

        @client.on("error")
        def fail_on_error(event: chatfeed.ErrorMessage) -> None:
            raise RuntimeError(f"the server said: {event.message}")

        with json_lines() as logged, pytest.raises(chatfeed.ConnectionLostError):
            await asyncio.wait_for(client.run(), WAIT)

    assert len(seen.events) == 2
    # The records the server's words reached, with their fields, scrubbed.
    handshake = logged.matching("reconnecting in")[0]
    assert (handshake["chatfeed_error_type"], handshake["chatfeed_status_code"]) == ("HandshakeError", 503)
    assert logged.one("frame received before auth_success")["chatfeed_event_type"] == "***"
    assert logged.one("does not fit the protocol")["msg"]
    replaced = logged.matching("lost:")[0]
    assert (replaced["chatfeed_close_code"], replaced["chatfeed_close_reason"]) == (4001, "session of *** replaced")
    gave_up = logged.one("giving up on")
    assert (gave_up["chatfeed_close_code"], gave_up["chatfeed_close_reason"]) == (4501, "token ...*** revoked")

    records = caplog.get_records("call")
    assert any(record.name == "websockets.client" for record in records)  # DEBUG reached websockets' log too
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    for record in records:
        # Every attribute (extra fields, args, the exception), and the text a handler would write with its traceback.
        text = json.dumps(record.__dict__, default=as_text) + formatter.format(record)
        assert token_runs(text) == [], f"a {record.name} record quotes the token: {record.getMessage()!r}"
