"""FeedProtocol: the handshake state of one connection, without I/O."""

from __future__ import annotations

import json
import logging

import pytest

from chatfeed import AuthenticationError, ErrorMessage, NewChat, NewMessage, ProtocolError, UnknownMessage
from chatfeed._protocol import FeedProtocol, HandshakeState
from chatfeed.testing import make_chat, make_message

AUTH_SUCCESS = '{"type": "auth_success"}'


def new_message_frame(content: str = "hello") -> str:
    return NewMessage(type="new_message", payload=make_message(content=content)).model_dump_json(by_alias=True)


def state_of(protocol: FeedProtocol) -> HandshakeState:
    """Read the state afresh (mypy would keep it narrowed across ``receive``)."""
    return protocol.state


def open_protocol() -> FeedProtocol:
    protocol = FeedProtocol()
    assert protocol.receive(AUTH_SUCCESS) is None
    return protocol


# The auth frame


@pytest.mark.parametrize(
    "token",
    [
        "eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl",
        "",
        'with "quotes" and \\ backslash',
        "unicode \u00e9\u4e2d\U0001f600",
        "line\nbreak",
    ],
    ids=["jwt", "empty", "quotes", "unicode", "newline"],
)
def test_auth_frame_is_exactly_type_and_token(token: str) -> None:
    data = FeedProtocol().auth_frame(token)

    assert isinstance(data, str)
    assert json.loads(data) == {"type": "auth", "token": token}


def test_auth_frame_has_the_guides_key_order() -> None:
    assert FeedProtocol().auth_frame("t0k3n") == '{"type": "auth", "token": "t0k3n"}'


def test_auth_frame_does_not_change_the_state() -> None:
    protocol = FeedProtocol()

    protocol.auth_frame("t")

    assert protocol.state is HandshakeState.AWAITING_AUTH


# The handshake


def test_state_starts_awaiting_auth() -> None:
    assert FeedProtocol().state is HandshakeState.AWAITING_AUTH


@pytest.mark.parametrize(
    "data",
    [
        AUTH_SUCCESS,
        AUTH_SUCCESS.encode(),
        '{"type": "auth_success", "payload": {"userId": "1"}, "message": "welcome"}',
        '{"type": "auth_success", "sessionId": 7}',
    ],
    ids=["plain", "bytes", "payload-and-message", "extra-field"],
)
def test_auth_success_opens_and_is_not_an_event(data: str | bytes) -> None:
    protocol = FeedProtocol()

    assert protocol.receive(data) is None
    assert protocol.state is HandshakeState.OPEN


@pytest.mark.parametrize(
    "data",
    [
        new_message_frame(),
        '{"type": "error", "message": "busy"}',
        '{"type": "typing", "payload": {}}',
        NewChat(type="new_chat", payload=make_chat()).model_dump_json(by_alias=True),
    ],
    ids=["new_message", "error", "unknown", "new_chat"],
)
def test_frames_before_auth_success_are_ignored(data: str) -> None:
    protocol = FeedProtocol()

    assert protocol.receive(data) is None
    assert protocol.state is HandshakeState.AWAITING_AUTH


def test_ignored_frame_is_logged_without_its_content(caplog: pytest.LogCaptureFixture) -> None:
    protocol = FeedProtocol()

    protocol.receive(new_message_frame(content="private words"))

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("chatfeed")]
    assert len(warnings) == 1
    assert "new_message" in warnings[0].getMessage()
    assert "private words" not in caplog.text


def test_frames_ignored_before_auth_success_are_not_delivered_after_it() -> None:
    protocol = FeedProtocol()
    protocol.receive(new_message_frame("early"))

    protocol.receive(AUTH_SUCCESS)
    event = protocol.receive(new_message_frame("late"))

    assert isinstance(event, NewMessage)
    assert event.payload.content == "late"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ('{"type": "auth_error", "message": "Invalid token"}', "Invalid token"),
        (b'{"type": "auth_error", "message": "Token expired"}', "Token expired"),
        ('{"type": "auth_error"}', ""),
    ],
    ids=["message", "bytes", "no-message"],
)
def test_auth_error_raises_with_the_servers_reason(data: str | bytes, reason: str) -> None:
    protocol = FeedProtocol()

    with pytest.raises(AuthenticationError) as excinfo:
        protocol.receive(data)

    assert excinfo.value.message == reason
    assert protocol.state is HandshakeState.REJECTED


def test_authentication_error_text_includes_the_reason() -> None:
    with pytest.raises(AuthenticationError, match="Invalid token"):
        FeedProtocol().receive('{"type": "auth_error", "message": "Invalid token"}')


def test_auth_error_after_open_raises_too() -> None:
    protocol = open_protocol()
    protocol.receive(new_message_frame())

    with pytest.raises(AuthenticationError) as excinfo:
        protocol.receive('{"type": "auth_error", "message": "Token expired"}')

    assert excinfo.value.message == "Token expired"
    assert protocol.state is HandshakeState.REJECTED


# After auth_success


def test_events_are_returned_after_open() -> None:
    protocol = open_protocol()

    first = protocol.receive(new_message_frame("one"))
    second = protocol.receive(new_message_frame("two").encode())
    error = protocol.receive('{"type": "error", "message": "busy"}')
    unknown = protocol.receive('{"type": "typing", "payload": {"chatId": "3"}}')
    chat = protocol.receive(NewChat(type="new_chat", payload=make_chat(title="t")).model_dump_json(by_alias=True))

    assert isinstance(first, NewMessage) and first.payload.content == "one"
    assert isinstance(second, NewMessage) and second.payload.content == "two"
    assert isinstance(error, ErrorMessage) and error.message == "busy"
    assert isinstance(unknown, UnknownMessage) and unknown.payload == {"chatId": "3"}
    assert isinstance(chat, NewChat) and chat.payload.title == "t"
    assert protocol.state is HandshakeState.OPEN


def test_event_round_trips_what_was_pushed() -> None:
    pushed = NewMessage(type="new_message", payload=make_message(content="same"))
    protocol = open_protocol()

    assert protocol.receive(pushed.model_dump_json(by_alias=True)) == pushed


def test_another_auth_success_keeps_it_open() -> None:
    protocol = open_protocol()

    assert protocol.receive(AUTH_SUCCESS) is None
    assert protocol.state is HandshakeState.OPEN


# Frames that do not parse


@pytest.mark.parametrize("data", ["not json", b"\xff", "[]", '{"type": 1}', '{"type": "new_message", "payload": {}}'])
def test_bad_frame_raises_and_the_protocol_goes_on(data: str | bytes) -> None:
    protocol = open_protocol()

    with pytest.raises(ProtocolError):
        protocol.receive(data)

    assert protocol.state is HandshakeState.OPEN
    event = protocol.receive(new_message_frame("after"))
    assert isinstance(event, NewMessage)
    assert event.payload.content == "after"


def test_bad_frame_during_the_handshake_keeps_waiting() -> None:
    protocol = FeedProtocol()

    with pytest.raises(ProtocolError):
        protocol.receive("{")

    assert protocol.state is HandshakeState.AWAITING_AUTH
    assert protocol.receive(AUTH_SUCCESS) is None
    assert state_of(protocol) is HandshakeState.OPEN
