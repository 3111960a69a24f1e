"""chatfeed: a typed async client for a chat backend's real-time WebSocket feed.

Example:
    ```python
    import chatfeed

    client = chatfeed.Client("wss://api.example.com", token=jwt)

    @client.on("new_message")
    async def show(event: chatfeed.NewMessage) -> None:
        print(event.payload.chat_id, event.payload.content)

    await client.run()
    ```
"""

from ._client import Client, ClientState, ClientStatistics, HandlerStatistics, TokenSource
from ._config import Compression
from ._delivery import Backfill, BackfillItem, Dedupe, Gap
from ._dispatch import EventName, EventStream, Expectation
from ._lanes import by_chat
from ._observe import Observer
from ._policy import Backoff
from ._pool import Pool, PoolEventName, PoolEventStream, PoolHandler, PoolStatistics
from ._protocol import parse_server_message
from ._recording import Recorder
from ._version import __version__
from .exceptions import (
    AuthenticationError,
    AuthTimeoutError,
    ChatfeedError,
    ClientClosedError,
    ConnectError,
    ConnectionFailedError,
    ConnectionLostError,
    HandshakeError,
    ProtocolError,
    TokenProviderError,
    UsageError,
)
from .models import (
    AnyServerMessage,
    AuthError,
    AuthSuccess,
    Chat,
    Connected,
    Disconnected,
    ErrorMessage,
    FeedEvent,
    FeedStopped,
    Message,
    MessageStatus,
    NewChat,
    NewMessage,
    Role,
    ServerMessage,
    UnknownMessage,
)

__all__ = [
    "AnyServerMessage",
    "AuthError",
    "AuthSuccess",
    "AuthTimeoutError",
    "AuthenticationError",
    "Backfill",
    "BackfillItem",
    "Backoff",
    "Chat",
    "ChatfeedError",
    "Client",
    "ClientClosedError",
    "ClientState",
    "ClientStatistics",
    "Compression",
    "ConnectError",
    "Connected",
    "ConnectionFailedError",
    "ConnectionLostError",
    "Dedupe",
    "Disconnected",
    "ErrorMessage",
    "EventName",
    "EventStream",
    "Expectation",
    "FeedEvent",
    "FeedStopped",
    "Gap",
    "HandlerStatistics",
    "HandshakeError",
    "Message",
    "MessageStatus",
    "NewChat",
    "NewMessage",
    "Observer",
    "Pool",
    "PoolEventName",
    "PoolEventStream",
    "PoolHandler",
    "PoolStatistics",
    "ProtocolError",
    "Recorder",
    "Role",
    "ServerMessage",
    "TokenProviderError",
    "TokenSource",
    "UnknownMessage",
    "UsageError",
    "__version__",
    "by_chat",
    "parse_server_message",
]
