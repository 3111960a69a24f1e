"""A FastAPI application that follows the feed for as long as it runs.

The lifespan opens the client with ``async with`` on startup, so the
application serves requests once the first connection is authenticated, and
closes it on shutdown. A handler keeps the last messages in memory; two
endpoints report them and the client's statistics, which double as a health
check.

Run it with uvicorn, against a development feed::

    chatfeed serve --port 3001            # prints the token to use
    CHATFEED_TOKEN=... uvicorn --app-dir examples fastapi_app:app

then open http://127.0.0.1:8000/messages and http://127.0.0.1:8000/status.
``CHATFEED_URL`` sets the feed's address (``ws://localhost:3001`` by default).
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI, Request, Response

import chatfeed


class Feed:
    """What the application keeps of the feed: the client and the last messages."""

    def __init__(self, client: chatfeed.Client, *, keep: int = 20) -> None:
        self.client = client
        self.recent: collections.deque[chatfeed.Message] = collections.deque(maxlen=keep)
        client.on("new_message")(self.remember)

    def remember(self, event: chatfeed.NewMessage) -> None:
        self.recent.append(event.payload)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Feed]]:
    url = os.environ.get("CHATFEED_URL", "ws://localhost:3001")
    client = chatfeed.Client(url, token=os.environ["CHATFEED_TOKEN"])
    feed = Feed(client)
    # Startup waits for the first authenticated connection; a rejected token stops it.
    async with client:
        yield {"feed": feed}  # in request.state, for every request
    # On shutdown, leaving the block closes the client.


app = FastAPI(lifespan=lifespan)


def get_feed(request: Request) -> Feed:
    feed: Feed = request.state.feed
    return feed


FeedDependency = Annotated[Feed, Depends(get_feed)]


@app.get("/messages")
async def messages(feed: FeedDependency) -> list[chatfeed.Message]:
    """The last messages the feed delivered, oldest first, in the feed's JSON form."""
    return list(feed.recent)


@app.get("/status")
async def status(feed: FeedDependency, response: Response) -> chatfeed.ClientStatistics:
    """The client's counters; 503 once it has stopped for good, so that a health check can act."""
    statistics = feed.client.statistics()
    if statistics.state == "closed":  # a rejected token, a fatal close code, retries exhausted
        response.status_code = 503
    return statistics
