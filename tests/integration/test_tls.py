"""wss://: certificates are checked unless the caller says otherwise."""

from __future__ import annotations

import asyncio
import ssl

import pytest
import trustme

import chatfeed
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
