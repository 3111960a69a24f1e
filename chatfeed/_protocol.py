"""The chat feed protocol without I/O: frames in, typed messages out.

[`parse_server_message`][chatfeed.parse_server_message] turns one frame into a model in a single pydantic
pass. `FeedProtocol` keeps the handshake state of one connection: what
to send first, and what each received frame means in that state. The client
feeds it frames from the socket; tests feed it strings.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Callable

from pydantic import TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from .exceptions import AuthenticationError, ProtocolError
from .models import (
    AnyServerMessage,
    AuthError,
    AuthSuccess,
    ErrorMessage,
    FeedEvent,
    NewChat,
    NewMessage,
    UnknownMessage,
    _ServerMessageUnion,
)

__all__ = ["FeedProtocol", "HandshakeState", "parse_server_message"]

logger = logging.getLogger("chatfeed.protocol")

_EVENT_CLASSES = (NewMessage, NewChat, ErrorMessage, UnknownMessage)

_ADAPTER: TypeAdapter[AnyServerMessage] = TypeAdapter(_ServerMessageUnion)
# The core validator itself: TypeAdapter.validate_json adds a Python call per frame.
_validate_json: Callable[[str | bytes], AnyServerMessage] = _ADAPTER.validator.validate_json


def parse_server_message(data: str | bytes) -> AnyServerMessage:
    """Parse one frame from the server into its typed message.

    Args:
        data: The frame, as text or as UTF-8 bytes.

    Returns:
        The message: one class per known ``type``, [`UnknownMessage`][chatfeed.UnknownMessage]
        for any other.

    Raises:
        ProtocolError: The frame is not valid JSON, not an object, has no
            string ``type``, or its payload does not fit its type. The error
            says which, and never quotes the frame.

    Example:
        >>> parse_server_message('{"type": "error", "message": "busy"}')
        ErrorMessage(type='error', message='busy')
    """
    try:
        return _validate_json(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
    # Raised outside the except block so that it is neither chained to nor
    # carries as context the ValidationError, whose text quotes the frame.
    raise ProtocolError(_describe(errors))


def _describe(errors: list[ErrorDetails]) -> str:
    first = errors[0]
    kind = first["type"]
    if kind == "json_invalid":
        return f"frame is not valid JSON ({first['msg']})"
    if kind in ("dict_type", "model_type"):
        return "frame is not a JSON object"
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        return "frame has no string 'type'"
    if len(first["loc"]) < 2:  # the frame as a whole, e.g. text with a lone surrogate
        return f"frame is not valid ({first['msg']})"
    # A known type whose fields do not fit: the errors of its own branch, with
    # locations as on the wire ("payload.createdAt").
    branch = first["loc"][:2]
    details = "; ".join(
        f"{'.'.join(str(part) for part in error['loc'][2:]) or 'frame'}: {error['msg']}"
        for error in errors
        if error["loc"][:2] == branch
    )
    return f"{branch[1]} frame does not fit: {details}"


class HandshakeState(enum.Enum):
    """Where a connection stands in the auth exchange."""

    AWAITING_AUTH = "awaiting_auth"
    OPEN = "open"
    REJECTED = "rejected"


class FeedProtocol:
    """The protocol state of one connection.

    Example:
        >>> protocol = FeedProtocol()
        >>> frame = protocol.auth_frame("t0k3n")  # send this first
        >>> protocol.receive('{"type": "auth_success"}') is None
        True
        >>> protocol.state
        <HandshakeState.OPEN: 'open'>
    """

    __slots__ = ("_token", "state")

    def __init__(self) -> None:
        self.state: HandshakeState = HandshakeState.AWAITING_AUTH
        self._token = ""

    def __repr__(self) -> str:
        return f"<FeedProtocol state={self.state.value}>"

    def auth_frame(self, token: str) -> str:
        """Return the frame to send first on a new connection."""
        self._token = token
        return json.dumps({"type": "auth", "token": token})

    def receive(self, data: str | bytes) -> FeedEvent | None:
        """Take one frame from the server.

        Returns:
            The event to deliver, or ``None`` for frames that are not events:
            ``auth_success``, and anything before it (the server must send
            nothing before judging the token).

        Raises:
            ProtocolError: The frame does not parse; the connection can go on.
            AuthenticationError: The server sent ``auth_error``, during the
                handshake or later (a token that expired mid-session).
        """
        message = parse_server_message(data)
        if isinstance(message, _EVENT_CLASSES) and self.state is HandshakeState.OPEN:
            return message
        if isinstance(message, AuthError):
            self.state = HandshakeState.REJECTED
            # Servers that quote the rejected token would put it in the logs.
            text = message.message.replace(self._token, "***") if self._token else message.message
            raise AuthenticationError(text)
        if isinstance(message, AuthSuccess):
            self.state = HandshakeState.OPEN
            return None
        if self.state is not HandshakeState.OPEN:
            logger.warning("ignored a %r frame received before auth_success", message.type[:40])
            return None
        return message
