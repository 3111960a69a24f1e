"""Typed models of everything the chat feed delivers.

Payload models ([`Message`][chatfeed.Message], [`Chat`][chatfeed.Chat]) and one class per server
message ``type`` are frozen pydantic models: attributes are snake_case, JSON is
camelCase (``model_dump(by_alias=True)`` gives back the wire form), fields a
newer server adds are kept rather than rejected, and values the SDK does not
know (a new ``role`` or ``status``) are kept as plain strings.

[`Connected`][chatfeed.Connected] and [`Disconnected`][chatfeed.Disconnected] are not sent by the server: the
client emits them when a connection is authenticated and when it ends.

What may be missing: a message is kept whenever a client can still use it.
Without ``id``, ``chatId``, ``role`` or ``createdAt`` a message cannot be
told apart, placed in its chat, attributed or ordered, so such a frame is
dropped and reported; a missing or null ``content`` is ``""``, a missing or
null ``fallbackUsed`` is ``False``, and ``precis``, ``audioUrl`` and
``status`` may be ``None``. A chat needs ``id``, ``userId`` and ``createdAt``;
a missing or null ``title`` is ``""``, ``summary`` may be ``None``, and a
missing ``updatedAt`` is ``createdAt``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeAlias, Union, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import CoreSchema, core_schema

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
    "FeedStopped",
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


# A time (after "T", or the space of PostgreSQL's text form), then "+05".
_HOURS_ONLY_OFFSET = re.compile(r"[T ]\d\d:\d\d(?::\d\d(?:[.,]\d+)?)?[+-]\d\d\Z")


def _pad_hours_only_offset(value: object) -> object:
    # ISO 8601 allows "+05" for "+05:00"; pydantic's parser does not.
    if isinstance(value, str) and _HOURS_ONLY_OFFSET.search(value):
        return value + ":00"
    return value


@dataclasses.dataclass(frozen=True)
class _NullAs:
    """Accept ``null`` for a field and give it ``value`` instead.

    The field keeps its plain type (``str``, ``bool``) for type checkers and
    users. Validation tries the plain type first, in pydantic's core, so a
    field that is present pays no Python call; only ``null`` does.
    """

    value: Any

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        value = self.value
        return core_schema.union_schema(
            [handler(source), core_schema.no_info_after_validator_function(lambda _: value, core_schema.none_schema())],
            mode="left_to_right",
        )


if TYPE_CHECKING:
    from pydantic import JsonValue
else:
    # As pydantic's JsonValue for what comes from JSON, and without importing
    # pydantic.types, which costs importing chatfeed 10 ms.
    JsonValue = Any


@dataclasses.dataclass(frozen=True)
class _Zone:
    """A timestamp that must (``"aware"``) or must not (``"naive"``) carry a zone; as pydantic's AwareDatetime."""

    constraint: Literal["aware", "naive"]

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.datetime_schema(tz_constraint=self.constraint)


AwareDatetime = Annotated[datetime, _Zone("aware")]
NaiveDatetime = Annotated[datetime, _Zone("naive")]

Id = Annotated[str, Field(coerce_numbers_to_str=True)]
# Aware timestamps, the protocol's promise and so the common case, are
# validated without a Python call; only naive ones go through _assume_utc,
# and only an hours-only offset ("+05") through _pad_hours_only_offset.
Timestamp = Annotated[
    AwareDatetime
    | Annotated[NaiveDatetime, AfterValidator(_assume_utc)]
    | Annotated[AwareDatetime, BeforeValidator(_pad_hours_only_offset)],
    Field(union_mode="left_to_right"),
]


def _as_text(value: object) -> str:
    """Return a server's ``message`` as text, whatever JSON it was."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("message"), str):
        return str(value["message"])  # an error object, as a Node backend writes `message: err`
    if value in ({}, []):
        return ""
    return json.dumps(value, ensure_ascii=False, default=str)


def _text_of_message(data: Any) -> Any:
    """Take ``message`` as text; when it is absent or null, take ``payload.message``."""
    if not isinstance(data, dict):
        return data
    message = data.get("message")
    payload = data.get("payload")
    if message is None and isinstance(payload, dict):
        message = payload.get("message")
    return {**data, "message": _as_text(message)}


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
        # Each class's own validator is built at its first use. The receive
        # path parses with one adapter over the union (chatfeed._protocol),
        # built once by the first client: building every class's validator
        # at import would cost tens of milliseconds for nothing. (The fields'
        # docstrings are for the reference, which reads them from the source;
        # pydantic's use_attribute_docstrings would parse the source at import.)
        defer_build=True,
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
    """``id``: the message's identifier; a number on the wire becomes a string."""
    chat_id: Id
    """``chatId``: the chat the message belongs to."""
    role: Annotated[Role | str, Field(union_mode="left_to_right")]
    """``role``: who wrote it, a [`Role`][chatfeed.Role], or the plain string of a role this version does not know."""
    content: Annotated[str, _NullAs("")] = ""
    """``content``: the text; ``""`` when the server sent none (or null)."""
    precis: str | None = None
    """``precis``: a short summary of the content, or ``None``."""
    audio_url: str | None = None
    """``audioUrl``: the URL of a spoken version, or ``None``."""
    fallback_used: Annotated[bool, _NullAs(False)] = False
    """``fallbackUsed``: True when a fallback model wrote the answer; ``False`` when absent or null."""
    status: Annotated[MessageStatus | str | None, Field(union_mode="left_to_right")] = None
    """``status``: a [`MessageStatus`][chatfeed.MessageStatus], another (upper-case) state as a string, or ``None``."""
    created_at: Timestamp
    """``createdAt``: when the message was created, always timezone-aware (a timestamp without a zone is UTC)."""


class Chat(_Model):
    """A chat session, as pushed in a ``new_chat`` frame."""

    id: Id
    """``id``: the chat's identifier; a number on the wire becomes a string."""
    user_id: Id
    """``userId``: the user the chat belongs to."""
    title: Annotated[str, _NullAs("")] = ""
    """``title``: the chat's title; ``""`` when the server sent none (or null)."""
    summary: str | None = None
    """``summary``: a summary of the chat, or ``None``."""
    created_at: Timestamp
    """``createdAt``: when the chat was created, timezone-aware."""
    updated_at: Timestamp
    """``updatedAt``: when the chat last changed, timezone-aware; ``createdAt`` when the server sent none."""

    @model_validator(mode="before")
    @classmethod
    def _updated_at_defaults_to_created_at(cls, data: Any) -> Any:
        # Chats are rare on the feed, so this Python call costs nothing measurable.
        if isinstance(data, dict):
            for updated, created in (("updatedAt", "createdAt"), ("updated_at", "created_at")):
                if data.get(updated) is None and data.get(created) is not None:
                    return {**data, updated: data[created]}
        return data


class ServerMessage(_Model):
    """Base class of every frame the server sends; ``type`` names its kind."""

    type: str
    """``type``: the kind of frame."""
    source: ClassVar[Literal["live", "backfill"]] = "live"
    """Where the client got the event: ``"live"`` from the feed, ``"backfill"`` from the client's
    ``backfill`` function after a gap. Not part of the frame: never parsed, never serialised."""
    feed: ClassVar[str | None] = None
    """The key of the [`Pool`][chatfeed.Pool] feed the event came from, or ``None`` for a
    [`Client`][chatfeed.Client]'s. Not part of the frame."""


class AuthSuccess(ServerMessage):
    """The server accepted the token. Consumed by the client, never dispatched."""

    type: Literal["auth_success"]
    payload: JsonValue = None
    """``payload``: whatever the server sent with it, as JSON."""
    message: Annotated[str | None, BeforeValidator(lambda value: None if value is None else _as_text(value))] = None
    """``message``: the server's text, if any (non-text JSON is kept as its JSON text)."""


class AuthError(ServerMessage):
    """The server rejected the token. The client raises [`AuthenticationError`][chatfeed.AuthenticationError]."""

    type: Literal["auth_error"]
    message: str = ""
    """``message`` (or ``payload.message``): the server's reason, as text; any JSON is accepted, ``""`` if none."""

    _message_as_text = model_validator(mode="before")(_text_of_message)


class NewMessage(ServerMessage):
    """A new message in one of the user's chats."""

    type: Literal["new_message"]
    payload: Message
    """``payload``: the new [`Message`][chatfeed.Message]."""


class NewChat(ServerMessage):
    """A new chat session was created."""

    type: Literal["new_chat"]
    payload: Chat
    """``payload``: the new [`Chat`][chatfeed.Chat]."""


class ErrorMessage(ServerMessage):
    """The server reports a problem; the connection stays up."""

    type: Literal["error"]
    message: str = ""
    """``message`` (or ``payload.message``): the server's text; any JSON is accepted, ``""`` if none."""

    _message_as_text = model_validator(mode="before")(_text_of_message)


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
    """``type``: the kind of frame, one this version does not know."""
    payload: JsonValue = None
    """``payload``: as sent, as JSON."""
    message: JsonValue = None
    """``message``: as sent, as JSON."""


# The vocabulary of the feed is the two unions below and the ``type`` tags of
# their classes; every other list of event kinds is derived from them.

FeedEvent: TypeAlias = NewMessage | NewChat | ErrorMessage | UnknownMessage
"""What the client delivers to handlers and to ``events()`` after authentication."""

AnyServerMessage: TypeAlias = AuthSuccess | AuthError | FeedEvent
"""Every frame the server may send, as [`parse_server_message`][chatfeed.parse_server_message] returns it."""


def tag_of(cls: type[ServerMessage]) -> str:
    """Return the ``type`` a known server message class stands for."""
    tag: str = get_args(cls.model_fields["type"].annotation)[0]
    return tag


_KNOWN_MESSAGES: tuple[type[ServerMessage], ...] = tuple(
    cls for cls in get_args(AnyServerMessage) if cls is not UnknownMessage
)
_KNOWN_TYPES = frozenset(tag_of(cls) for cls in _KNOWN_MESSAGES)

# Known types are picked by their tag in one pass; only a frame whose tag is
# not known falls through to UnknownMessage.
_ServerMessageUnion: Any = Annotated[
    Annotated[Union[_KNOWN_MESSAGES], Field(discriminator="type")] | UnknownMessage,  # noqa: UP007
    Field(union_mode="left_to_right"),
]


@dataclasses.dataclass(frozen=True)
class Connected:
    """The client is connected and authenticated.

    Attributes:
        is_reconnect: False for the first connection of the client, True after.
        downtime: Seconds since the previous connection was lost, or ``None``
            for the first connection. The protocol has no replay: anything
            pushed during that gap must be fetched over the backend's REST API.
        feed: The key of the [`Pool`][chatfeed.Pool] feed it happened to, or
            ``None`` for a [`Client`][chatfeed.Client].
    """

    type: ClassVar[Literal["connected"]] = "connected"
    is_reconnect: bool
    downtime: float | None
    feed: str | None = None


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
        feed: The key of the [`Pool`][chatfeed.Pool] feed it happened to, or
            ``None`` for a [`Client`][chatfeed.Client].
    """

    type: ClassVar[Literal["disconnected"]] = "disconnected"
    code: int
    reason: str
    will_retry: bool
    error: ChatfeedError
    retry_in: float | None = None
    feed: str | None = None


@dataclasses.dataclass(frozen=True)
class FeedStopped:
    """A feed of a [`Pool`][chatfeed.Pool] stopped for good on an error; the pool's other feeds go on.

    Attributes:
        feed: The feed's key.
        error: Why it stopped: its token was rejected (a static token, or the
            token function's retries ran out), a fatal close code, or its
            reconnect attempts ran out.
    """

    type: ClassVar[Literal["feed_stopped"]] = "feed_stopped"
    feed: str
    error: ChatfeedError


EventName: TypeAlias = Literal["new_message", "new_chat", "error", "unknown", "connected", "disconnected"]
"""The names ``Client.on`` accepts: the server events' tags, ``"unknown"`` and the lifecycle events."""

EVENTS_BY_NAME: dict[str, type[Any]] = {
    **{tag_of(cls): cls for cls in get_args(FeedEvent) if cls is not UnknownMessage},
    "unknown": UnknownMessage,
    Connected.type: Connected,
    Disconnected.type: Disconnected,
}
"""Event names accepted by ``Client.on``, and the class each stands for."""

# A type checker needs the names spelt out; they must be the ones derived.
assert set(get_args(EventName)) == set(EVENTS_BY_NAME), "EventName and the event classes disagree"
