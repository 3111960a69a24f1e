"""The token never leaves through a side door: server text that quotes it, and redirects.

Every test here also runs under the autouse fixture that fails a test whose
log records (every logger, DEBUG included) hold the token or a part of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import traceback
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

import chatfeed
from chatfeed._logging import Scrubber, redacting_logger
from chatfeed.testing import FeedServer

from ..conftest import SECRET, SIGNATURE, TOKEN
from .conftest import WAIT, Recorder, make_client, raw_server, running, url_of


def assert_no_token_in(error: BaseException) -> None:
    """Neither the text of ``error`` nor the traceback that would be printed for it holds the token."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__)) + repr(error)
    assert SECRET not in text
    assert SIGNATURE not in text


@contextlib.asynccontextmanager
async def http_server(reply: bytes | str) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A loopback server that reads a request and answers ``reply``, whatever it was asked.

    A ``str`` reply is a template: ``{port}`` in it is the server's own port.
    """
    requests: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(reply.format(port=port).encode() if isinstance(reply, str) else reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        host, port = server.sockets[0].getsockname()[:2]
        yield f"ws://{host}:{port}", requests
    finally:
        server.close()
        await server.wait_closed()


# Close reasons and error frames


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (4501, f"token {TOKEN} revoked"),  # final: run() raises it
        (4501, f"token ...{SIGNATURE} revoked"),  # only the tail
        (4501, f"sub {SECRET}-user-1 banned"),  # only the middle
    ],
    ids=["whole", "tail", "middle"],
)
async def test_a_close_reason_quoting_the_token_is_scrubbed_everywhere(code: int, reason: str) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send('{"type": "auth_success"}')
        await ws.close(code, reason)

    async with raw_server(handler) as server:
        client = make_client(url_of(server))
        lost = Recorder()
        client.on("disconnected")(lost)
        with pytest.raises(chatfeed.ConnectionLostError) as caught:
            await asyncio.wait_for(client.run(), WAIT)

    assert caught.value.code == code
    assert "***" in caught.value.reason
    assert_no_token_in(caught.value)
    [event] = lost.events
    assert isinstance(event, chatfeed.Disconnected)
    assert SECRET not in event.reason and SIGNATURE not in event.reason
    assert_no_token_in(event.error)


async def test_a_retried_close_quoting_the_token_is_scrubbed_in_the_disconnected_event(server: FeedServer) -> None:
    client = make_client(server.url)
    lost = Recorder()
    client.on("disconnected")(lost)
    async with running(client):
        await server.wait_for_clients()
        await server.close_connections(4001, f"session of {TOKEN} replaced")
        [event] = await lost.wait_for(1)
    assert event.will_retry
    assert event.reason == "session of *** replaced"
    assert_no_token_in(event.error)


async def test_an_error_frame_quoting_the_token_reaches_the_app_scrubbed(server: FeedServer) -> None:
    client = make_client(server.url)
    errors = Recorder()
    client.on("error")(errors)
    async with client:
        await server.push_error(f"token {TOKEN} is about to expire")
        await server.send_raw(
            json.dumps(
                {"type": "error", "payload": {"message": f"bad {TOKEN}", "token": [TOKEN]}, "echo": SIGNATURE},
            )
        )
        await server.push_error("no secret here")
        first, second, third = await errors.wait_for(3)
    assert first.message == "token *** is about to expire"
    assert second.message == "bad ***"
    for event in (first, second):
        dumped = event.model_dump_json() + repr(event)
        assert SECRET not in dumped and SIGNATURE not in dumped
    assert second.model_dump(by_alias=True) == {
        "type": "error",
        "message": "bad ***",
        "payload": {"message": "bad ***", "token": ["***"]},
        "echo": "***",
    }
    assert third.message == "no secret here"


async def test_an_unknown_frame_quoting_the_token_reaches_the_app_scrubbed(server: FeedServer) -> None:
    # An unknown frame is kept whole: a bridge would put it, token and all, in its broker.
    client = make_client(server.url)
    unknown = Recorder()
    client.on("unknown")(unknown)
    async with client:
        await server.send_raw(json.dumps({"type": "typing", "payload": {"by": TOKEN}, "echo": SIGNATURE}))
        await server.send_raw(json.dumps({"type": "typing", "payload": {"by": "someone"}}))
        first, second = await unknown.wait_for(2)
    assert first.model_dump(by_alias=True) == {
        "type": "typing",
        "payload": {"by": "***"},
        "message": None,
        "echo": "***",
    }
    assert SECRET not in repr(first) and SIGNATURE not in repr(first)
    assert second.payload == {"by": "someone"}


async def test_an_auth_error_quoting_the_token_under_payload_is_scrubbed() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send(json.dumps({"type": "auth_error", "payload": {"message": f"bad token {TOKEN[:-3]}"}}))
        await ws.wait_closed()

    async with raw_server(handler) as server:
        client = make_client(url_of(server))
        with pytest.raises(chatfeed.AuthenticationError) as caught:
            await asyncio.wait_for(client.run(), WAIT)
    assert caught.value.message.startswith("bad token ***")
    assert_no_token_in(caught.value)


# HTTP replies


async def test_an_http_401_echoing_the_token_leaks_it_nowhere(caplog: pytest.LogCaptureFixture) -> None:
    body = f"invalid token {TOKEN}\n".encode()
    reply = (
        f"HTTP/1.1 401 Token {TOKEN} Rejected\r\n"
        f'WWW-Authenticate: Bearer error="invalid_token", token="{TOKEN}"\r\n'
        f"X-Debug-Token: {TOKEN}\r\n"
        f"Connection: close, {TOKEN}\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    async with http_server(reply) as (url, requests):
        client = make_client(url)
        with pytest.raises(chatfeed.HandshakeError) as caught:
            await asyncio.wait_for(client.run(), WAIT)
    assert caught.value.status_code == 401
    assert len(requests) == 1  # final: not retried
    assert_no_token_in(caught.value)
    # websockets did log the reply at DEBUG, with the values that are safe to log.
    logged = [record.getMessage() for record in caplog.records if record.name == "websockets.client"]
    assert "< HTTP/1.1 401 Unauthorized" in logged
    assert "< WWW-Authenticate: ***" in logged
    assert "< Content-Type: text/plain" in logged
    assert "< Connection: close, ***" in logged  # an allow-listed header, scrubbed all the same


async def test_a_reply_that_is_not_a_redirect_keeps_its_meaning_whatever_its_location() -> None:
    reply = b"HTTP/1.1 503 Service Unavailable\r\nLocation: ws://elsewhere.test/\r\nRetry-After: 7\r\n\r\n"
    async with http_server(reply) as (url, _):
        client = make_client(url, reconnect=False)
        with pytest.raises(chatfeed.HandshakeError) as caught:
            await asyncio.wait_for(client.run(), WAIT)
    assert (caught.value.status_code, caught.value.retry_after) == (503, 7.0)
    assert "redirect" not in str(caught.value)


@pytest.mark.parametrize(
    "location", ["ws://[broken/", "ws://user@127.0.0.1:{port}/"], ids=["unparsable", "credentials"]
)
async def test_a_redirect_to_an_invalid_address_is_a_final_handshake_error(location: str) -> None:
    refused = await refused_redirect(f"HTTP/1.1 302 Found\r\nLocation: {location}\r\n\r\n", match="not valid")
    assert refused.status_code == 302


async def refused_redirect(reply: str, *, match: str) -> chatfeed.HandshakeError:
    """Connect to a server that answers ``reply``; check the client gives up at once, saying ``match``."""
    async with http_server(reply) as (url, requests):
        client = make_client(url)
        with pytest.raises(chatfeed.HandshakeError, match=match) as caught:
            await asyncio.wait_for(client.run(), WAIT)
    assert len(requests) == 1  # final, not retried
    return caught.value


async def test_websockets_debug_log_after_a_redirect_to_a_path_holding_the_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/":
            response = connection.respond(302, "moved\n")
            response.headers.update(Headers({"Location": f"/feed/{TOKEN}"}))
            return response
        return None

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send('{"type": "auth_success"}')
        await ws.wait_closed()

    # The server logs the path too; what is checked here is the client's log.
    logger = redacting_logger("websockets.server", Scrubber(TOKEN))
    async with serve(handler, "127.0.0.1", 0, process_request=process_request, logger=logger) as server:
        client = make_client(url_of(server))
        async with client:
            pass
    logged = [record.getMessage() for record in caplog.records if record.name == "websockets.client"]
    assert "> GET /feed/*** HTTP/1.1" in logged


# Redirects


async def test_a_redirect_to_another_origin_is_refused_and_gets_no_token() -> None:
    async with FeedServer(tokens=[TOKEN]) as elsewhere:
        refused = await refused_redirect(
            f"HTTP/1.1 302 Found\r\nLocation: {elsewhere.url}/feed\r\nContent-Length: 0\r\n\r\n",
            match="another origin",
        )
    assert refused.status_code == 302
    assert (elsewhere.handshakes, elsewhere.received_tokens) == (0, [])


@pytest.mark.parametrize("target", ["ws://localhost:{port}/", "wss://127.0.0.1:{port}/"], ids=["host", "scheme"])
async def test_a_redirect_that_changes_only_host_or_scheme_is_refused(target: str) -> None:
    # The server redirects to its own port: only the host, or only the scheme, differs.
    refused = await refused_redirect(
        f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {target}\r\n\r\n", match="another origin"
    )
    assert refused.status_code == 307


async def test_a_redirect_within_the_same_origin_is_followed() -> None:
    paths: list[str] = []

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        paths.append(request.path)
        if request.path == "/":
            response = connection.respond(301, "moved\n")
            response.headers.update(Headers({"Location": "/v2/feed"}))
            return response
        return None

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send('{"type": "auth_success"}')
        await ws.send('{"type": "error", "message": "hello from /v2/feed"}')
        await ws.wait_closed()

    logger = redacting_logger("websockets.server")
    async with serve(handler, "127.0.0.1", 0, process_request=process_request, logger=logger) as server:
        client = make_client(url_of(server))
        errors = Recorder()
        client.on("error")(errors)
        async with client:
            [event] = await errors.wait_for(1)
    assert event.message == "hello from /v2/feed"
    assert paths == ["/", "/v2/feed"]
