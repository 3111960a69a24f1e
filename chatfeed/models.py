"""Typed models of everything the chat feed delivers.

Payload models ([`Message`][chatfeed.Message], [`Chat`][chatfeed.Chat]) and one class per server
message ``type`` are frozen pydantic models: attributes are snake_case, JSON is
camelCase (``model_dump(by_alias=True)`` gives back the wire form), fields a
newer server adds are kept rather than rejected, and values the SDK does not
know (a new ``role`` or ``status``) are kept as plain strings.

[`Connected`][chatfeed.Connected] and [`Disconnected`][chatfeed.Disconnected] are not sent by the server: the
client emits them when a connection is authenticated and when it ends.
"""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime, timezone
from typing import Annotated, ClassVar, Literal, TypeAlias

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, JsonValue, NaiveDatetime
from pydantic.alias_generators import to_camel

from .exceptions import ChatfeedError

__all__ = [
    "AnyServerMessage",
    "AuthError",
    "AuthSuccess",
    "Chat",
    "Connected",
    "Disconnected",
    "ErrorMessage",
    "FeedEvent",
    "Message",
    "MessageStatus",
    "NewChat",
    "NewMessage",
    "Role",
    "ServerMessage",
    "UnknownMessage",
]


def _assume_utc(value: datetime) -> datetime:
    # The protocol promises a zone; a server that forgets one means UTC, and
    # dropping the message over it would lose an event.
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


Id = Annotated[str, Field(coerce_numbers_to_str=True)]
# Aware timestamps, the protocol's promise and so the common case, are
# validated without a Python call; only naive ones go through _assume_utc.
Timestamp = Annotated[
    AwareDatetime | Annotated[NaiveDatetime, AfterValidator(_assume_utc)],
    Field(union_mode="left_to_right"),
]


class Role(str, enum.Enum):
    """Known authors of a message. Others arrive as plain strings."""

    USER = "user"
    ASSISTANT = "assistant"

    def __str__(self) -> str:
        return self.value


class MessageStatus(str, enum.Enum):
    """Known message states. Others arrive as plain (upper-case) strings."""

    COMPLETED = "COMPLETED"

    def __str__(self) -> str:
        return self.value


class _Model(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="allow",
        alias_generator=to_camel,
        populate_by_name=True,
    )


class Message(_Model):
    """One message of a chat, as pushed in a ``new_message`` frame.

    Example:
        >>> m = Message.model_validate_json(
        ...     '{"id": 1, "chatId": "17", "role": "assistant", "content": "Hi",'
        ...     ' "createdAt": "2025-10-07T12:00:00Z"}'
        ... )
        >>> m.id, m.role, m.created_at.tzinfo is not None
        ('1', <Role.ASSISTANT: 'assistant'>, True)
    """

    id: Id
    chat_id: Id
    role: Annotated[Role | str, Field(union_mode="left_to_right")]
    content: str
    precis: str | None = None
    audio_url: str | None = None
    fallback_used: bool = False
    status: Annotated[MessageStatus | str | None, Field(union_mode="left_to_right")] = None
    created_at: Timestamp


class Chat(_Model):
    """A chat session, as pushed in a ``new_chat`` frame."""

    id: Id
    user_id: Id
    title: str
    summary: str | None = None
    created_at: Timestamp
    updated_at: Timestamp


class ServerMessage(_Model):
    """Base class of every frame the server sends; ``type`` names its kind."""

    type: str


class AuthSuccess(ServerMessage):
    """The server accepted the token. Consumed by the client, never dispatched."""

    type: Literal["auth_success"]
    payload: JsonValue = None
    message: str | None = None


class AuthError(ServerMessage):
    """The server rejected the token. The client raises [`AuthenticationError`][chatfeed.AuthenticationError]."""

    type: Literal["auth_error"]
    message: str = ""


class NewMessage(ServerMessage):
    """A new message in one of the user's chats."""

    type: Literal["new_message"]
    payload: Message


class NewChat(ServerMessage):
    """A new chat session was created."""

    type: Literal["new_chat"]
    payload: Chat


class ErrorMessage(ServerMessage):
    """The server reports a problem; the connection stays up."""

    type: Literal["error"]
    message: str = ""


_KNOWN_TYPES = frozenset({"auth_success", "auth_error", "new_message", "new_chat", "error"})


def _not_a_known_type(value: str) -> str:
    # Keeps a malformed known frame (a new_message with a broken payload) from
    # being passed off as an unknown one.
    if value in _KNOWN_TYPES:
        raise ValueError("known type with a payload that does not fit")
    return value


class UnknownMessage(ServerMessage):
    """A frame of a type this version does not know, kept whole.

    ``payload`` and ``message`` hold what the server sent; any other fields
    are kept as extra attributes (``model_extra``).
    """

    type: Annotated[str, AfterValidator(_not_a_known_type)]
    payload: JsonValue = None
    message: JsonValue = None


FeedEvent: TypeAlias = NewMessage | NewChat | ErrorMessage | UnknownMessage
"""What the client delivers to handlers and to ``events()`` after authentication."""

_KnownMessage = Annotated[
    AuthSuccess | AuthError | NewMessage | NewChat | ErrorMessage,
    Field(discriminator="type"),
]

AnyServerMessage: TypeAlias = AuthSuccess | AuthError | NewMessage | NewChat | ErrorMessage | UnknownMessage
"""Every frame the server may send, as [`parse_server_message`][chatfeed.parse_server_message] returns it."""

# Known types are picked by their tag in one pass; only a frame whose tag is
# not known falls through to UnknownMessage.
_ServerMessageUnion = Annotated[_KnownMessage | UnknownMessage, Field(union_mode="left_to_right")]


@dataclasses.dataclass(frozen=True)
class Connected:
    """The client is connected and authenticated.

    Attributes:
        is_reconnect: False for the first connection of the client, True after.
        downtime: Seconds since the previous connection was lost, or ``None``
            for the first connection. The protocol has no replay: anything
            pushed during that gap must be fetched over the backend's REST API.
    """

    type: ClassVar[Literal["connected"]] = "connected"
    is_reconnect: bool
    downtime: float | None


@dataclasses.dataclass(frozen=True)
class Disconnected:
    """An authenticated connection ended, other than by [`Client.close`][chatfeed.Client.close].

    Attributes:
        code: The WebSocket close code (1006 when the connection dropped
            without one; 1000 when the client closed it after a rejection).
        reason: The close reason, possibly empty.
        will_retry: Whether the client will reconnect.
        error: What ended the connection, as a chatfeed exception.
        retry_in: Seconds until the next attempt, when it will retry.
    """

    type: ClassVar[Literal["disconnected"]] = "disconnected"
    code: int
    reason: str
    will_retry: bool
    error: ChatfeedError
    retry_in: float | None = None
