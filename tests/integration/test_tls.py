"""wss://: certificates are checked unless the caller says otherwise."""

from __future__ import annotations

import asyncio
import ssl

import pytest
import trustme
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

import chatfeed
from chatfeed._logging import redacting_logger
from chatfeed.testing import FeedServer

from ..conftest import TOKEN
from .conftest import WAIT, make_client


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_context(authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(context)
    return context


async def test_untrusted_certificate_is_refused_for_good(server_context: ssl.SSLContext) -> None:
    async with FeedServer(tokens=[TOKEN], host="localhost", ssl=server_context) as server:
        assert server.url.startswith("wss://")
        client = make_client(server.url)
        with pytest.raises(chatfeed.ConnectError, match="certificate verification failed") as caught:
            await asyncio.wait_for(client.run(), WAIT)
    assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)
    assert server.handshakes == 0


async def test_certificate_trusted_through_an_explicit_context(
    authority: trustme.CA, server_context: ssl.SSLContext
) -> None:
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    async with FeedServer(tokens=[TOKEN], host="localhost", ssl=server_context) as server:
        client = make_client(server.url, ssl=client_context)
        async with client:
            stream = client.events()
            await server.push_message(content="over TLS")
            event = await asyncio.wait_for(anext(stream), WAIT)
    assert isinstance(event, chatfeed.NewMessage)
    assert event.payload.content == "over TLS"


def test_ssl_context_with_plain_ws_is_a_usage_error() -> None:
    with pytest.raises(chatfeed.UsageError, match="wss://"):
        chatfeed.Client("ws://localhost", token=TOKEN, ssl=ssl.create_default_context())


async def test_wss_to_a_plain_websocket_server_is_final_and_says_why(server: FeedServer) -> None:
    url = server.url.replace("ws://", "wss://")
    client = make_client(url)
    with pytest.raises(chatfeed.ConnectError, match="may not be speaking TLS") as caught:
        await asyncio.wait_for(client.run(), WAIT)
    assert caught.value.tls
    assert server.handshakes == 0


async def test_wss_to_a_plain_http_server_is_final_and_says_why() -> None:
    accepted = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.read(100)  # the TLS ClientHello, taken for a bad request
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    plain = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        port = plain.sockets[0].getsockname()[1]
        client = make_client(f"wss://127.0.0.1:{port}")
        with pytest.raises(chatfeed.ConnectError, match=r"WRONG_VERSION_NUMBER.*may not be speaking TLS") as caught:
            await asyncio.wait_for(client.run(), WAIT)
    finally:
        plain.close()
        await plain.wait_closed()
    assert caught.value.tls
    assert accepted == 1


async def test_a_redirect_from_wss_down_to_ws_is_refused(authority: trustme.CA, server_context: ssl.SSLContext) -> None:
    requests: list[str] = []

    def process_request(connection: ServerConnection, request: Request) -> Response:
        requests.append(request.path)
        port = connection.local_address[1]
        response = connection.respond(301, "moved\n")
        response.headers.update(Headers({"Location": f"ws://localhost:{port}/plain"}))
        return response

    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    logger = redacting_logger("websockets.server")
    async with serve(
        handler, "localhost", 0, ssl=server_context, process_request=process_request, logger=logger
    ) as server:
        port = server.sockets[0].getsockname()[1]
        client = make_client(f"wss://localhost:{port}/", ssl=client_context)
        with pytest.raises(chatfeed.HandshakeError, match="refused") as caught:
            await asyncio.wait_for(client.run(), WAIT)
    assert caught.value.status_code == 301
    assert requests == ["/"]  # never followed, over TLS or not
