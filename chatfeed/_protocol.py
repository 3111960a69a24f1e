"""The chat feed protocol without I/O: frames in, typed messages out.

[`parse_server_message`][chatfeed.parse_server_message] turns one frame into a model in a single pydantic
pass. `FeedProtocol` keeps the handshake state of one connection: what
to send first, and what each received frame means in that state. The client
feeds it frames from the socket; tests feed it strings.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NoReturn, get_args

from pydantic import TypeAdapter, ValidationError
from pydantic_core import ErrorDetails, SchemaValidator

from ._logging import Scrubber
from .exceptions import AuthenticationError, ProtocolError
from .models import (
    AnyServerMessage,
    AuthError,
    AuthSuccess,
    ErrorMessage,
    FeedEvent,
    UnknownMessage,
    _ServerMessageUnion,
)

if TYPE_CHECKING:
    from pydantic.plugin._schema_validator import PluggableSchemaValidator

__all__ = ["FRAME_ATTRIBUTE", "FeedProtocol", "HandshakeState", "parse_server_message"]

FRAME_ATTRIBUTE = "_chatfeed_frame"
"""The attribute of an event that holds its frame's text, on events a bridge asked to keep it."""

logger = logging.getLogger("chatfeed.protocol")

_EVENT_CLASS_SET: frozenset[type[FeedEvent]] = frozenset(get_args(FeedEvent))


@functools.cache
def _validator() -> SchemaValidator | PluggableSchemaValidator:
    """The validator of every server frame, built at the first call.

    Building it takes pydantic tens of milliseconds (and the import of its
    schema machinery), so ``import chatfeed`` does not: the first client
    builds it when it starts connecting, before any frame arrives, and
    ``parse_server_message`` at its first call. The core validator itself:
    TypeAdapter.validate_json adds a Python call per frame.
    """
    return TypeAdapter(_ServerMessageUnion).validator


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")


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
        return _validator().validate_json(data)  # type: ignore[no-any-return]
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
    return _parse_again(data, errors)


def _parse_again(data: str | bytes, errors: list[ErrorDetails]) -> AnyServerMessage:
    """Parse a frame that pydantic's JSON parser refused, or raise `ProtocolError` saying why."""
    if errors[0]["type"] == "json_invalid":
        # Off the fast path: JSON that only Python's parser accepts.
        document = _lenient_json(data)
        if document is not None:
            try:
                return _validator().validate_python(document)  # type: ignore[no-any-return]
            except ValidationError as exc:
                errors = exc.errors(include_url=False, include_input=False)
    # Raised outside the except block so that it is neither chained to nor
    # carries as context the ValidationError, whose text quotes the frame.
    raise ProtocolError(_describe(errors))


def _lenient_json(data: str | bytes) -> object | None:
    """Parse JSON that holds a lone surrogate escape (``"\\ud83d"``), with U+FFFD in its place.

    A JavaScript backend that cuts a string in the middle of an emoji sends
    one: ``JSON.stringify`` writes it and ``JSON.parse`` reads it, while
    pydantic's parser refuses the frame. Returns ``None`` when the frame is
    invalid for another reason.
    """
    pattern = _SURROGATE_ESCAPE if isinstance(data, str) else _SURROGATE_ESCAPE_BYTES
    if pattern.search(data) is None:  # type: ignore[arg-type]
        return None
    try:
        document = json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return None
    return _replace_surrogates(document)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _replace_surrogates(value: object) -> object:
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_replace_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_replace_surrogates(key): _replace_surrogates(item) for key, item in value.items()}
    return value


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


_NO_SECRET = Scrubber("")


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

    __slots__ = ("_scrub", "_validate_json", "log_extra", "state")

    def __init__(self) -> None:
        self.state: HandshakeState = HandshakeState.AWAITING_AUTH
        # The fields of this connection's log records (its pool feed), given by its owner.
        self.log_extra: Mapping[str, object] = {}
        self._scrub = _NO_SECRET
        self._validate_json: Callable[[str | bytes], AnyServerMessage] = _validator().validate_json

    def __repr__(self) -> str:
        return f"<FeedProtocol state={self.state.value}>"

    def auth_frame(self, token: str, *, scrub: Scrubber | None = None) -> str:
        """Return the frame to send first on a new connection.

        Args:
            token: The token to send.
            scrub: The scrubber of that token, if one exists already.
        """
        self._scrub = scrub or Scrubber(token)
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
                handshake or later (a token that expired mid-session),
                whatever else the frame holds.
        """
        try:
            message = self._validate_json(data)  # parse_server_message, less a call: this runs for every frame
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False)
            message = None
        if message is None:
            try:
                message = _parse_again(data, errors)
            except ProtocolError:
                if _is_auth_error(data):
                    self._reject("")
                raise
        cls = message.__class__
        if cls in _EVENT_CLASS_SET and self.state is HandshakeState.OPEN:
            if cls is ErrorMessage or cls is UnknownMessage:
                # A server that quotes the token (in the message, the payload
                # or any field) would put it in the application's logs, or in
                # a bridge's broker. Both kinds are rare: the check costs nothing.
                text = data if isinstance(data, str) else data.decode("utf-8", "replace")
                if self._scrub.leaks(text):
                    return cls.model_validate(_scrub_json(message.model_dump(by_alias=True), self._scrub))
            return message  # type: ignore[return-value]  # its class is one of FeedEvent's
        if isinstance(message, AuthError):
            self._reject(message.message)
        if isinstance(message, AuthSuccess):
            self.state = HandshakeState.OPEN
            return None
        if self.state is not HandshakeState.OPEN:
            kind = self._scrub(message.type[:40])
            logger.warning(
                "ignored a %r frame received before auth_success",
                kind,
                extra={**self.log_extra, "chatfeed_event_type": kind},
            )
            return None
        return message

    def _reject(self, text: str) -> NoReturn:
        self.state = HandshakeState.REJECTED
        # Servers that quote the rejected token would put it in the logs.
        raise AuthenticationError(self._scrub(text))


def _scrub_json(value: object, scrub: Scrubber) -> object:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, list):
        return [_scrub_json(item, scrub) for item in value]
    if isinstance(value, dict):
        return {scrub(key): _scrub_json(item, scrub) for key, item in value.items()}
    return value


def _is_auth_error(data: str | bytes) -> bool:
    """Whether a frame that did not parse still says ``auth_error``: a rejection is never dropped."""
    if ("auth_error" if isinstance(data, str) else b"auth_error") not in data:  # type: ignore[operator]
        return False
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return False
    return isinstance(document, dict) and document.get("type") == "auth_error"
