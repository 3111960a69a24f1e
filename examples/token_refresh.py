"""Token refresh: give the client a function, and it gets a fresh token for every connection.

``token=`` takes a JWT or a function (sync or async) returning one. The client
calls the function before every connection attempt, so when the backend
revokes a token and drops the connection, the client asks for a new token and
reconnects with it, by itself. (A rejected token, ``auth_error``, is also
retried with a fresh one, ``auth_retries`` times in a row.)

Starts its own FeedServer on a free loopback port; an in-process "auth
service" issues tokens that the server accepts. The server then revokes the
first token and drops the connection. Prints each token fetch (a counter:
tokens themselves are never printed, nor logged by chatfeed) and exits.

Run it with ``python examples/token_refresh.py``.
"""

from __future__ import annotations

import asyncio
import secrets
import sys

import chatfeed
from chatfeed.testing import FeedServer


async def main() -> int:
    issued: list[str] = []

    async with FeedServer(tokens=[]) as server:

        async def fetch_token() -> str:
            # A real application asks its auth service here, e.g. with an async HTTP client.
            issued.append(secrets.token_urlsafe(16))
            server.tokens.add(issued[-1])  # the backend accepts what the auth service issues
            print(f"token fetch #{len(issued)}")
            return issued[-1]

        client = chatfeed.Client(server.url, token=fetch_token, reconnect=chatfeed.Backoff(initial=0.1, maximum=1.0))

        @client.on("connected")
        def on_connected(event: chatfeed.Connected) -> None:
            print(f"reconnected after {event.downtime:.2f} s" if event.is_reconnect else "connected")

        @client.on("disconnected")
        def on_disconnected(event: chatfeed.Disconnected) -> None:
            print(f"disconnected (code {event.code}), will retry: {event.will_retry}")

        async with client, client.events() as stream:
            server.tokens.discard(issued[0])  # e.g. the user logged out elsewhere
            server.drop_connections()
            await server.wait_for_clients()  # authenticated again, so with a token still valid
            await server.push_message(content="Delivered over the new connection.")
            event = await asyncio.wait_for(anext(stream), timeout=10)
            assert isinstance(event, chatfeed.NewMessage)
            print(f"received: {event.payload.content}")

    sent = server.received_tokens
    print(f"summary: {len(issued)} token fetches, {len(set(sent))} distinct tokens in {len(sent)} auth frames")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
