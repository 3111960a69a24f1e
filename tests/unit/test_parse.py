"""parse_server_message: one frame in, one typed message or a ProtocolError out."""

from __future__ import annotations

import json
import traceback
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import chatfeed
from chatfeed import (
    AuthError,
    AuthSuccess,
    ChatfeedError,
    ErrorMessage,
    Message,
    NewChat,
    NewMessage,
    ProtocolError,
    Role,
    ServerMessage,
    UnknownMessage,
    parse_server_message,
)

MESSAGE_PAYLOAD: dict[str, Any] = {
    "id": "123",
    "chatId": "17",
    "role": "assistant",
    "content": "This is the AI's response...",
    "precis": "AI response summary.",
    "audioUrl": "https://path/to/audio.mp3",
    "fallbackUsed": False,
    "status": "COMPLETED",
    "createdAt": "2025-10-07T12:00:00.000Z",
}

CHAT_PAYLOAD: dict[str, Any] = {
    "id": "18",
    "userId": "1",
    "title": "The first question of the chat...",
    "summary": "This chat is about: The first question...",
    "createdAt": "2025-10-07T12:05:00.000Z",
    "updatedAt": "2025-10-07T12:05:00.000Z",
}

KNOWN_TYPES = ["auth_success", "auth_error", "new_message", "new_chat", "error"]

MARKER = "SECRET-MARKER-123"


def frame(**fields: Any) -> str:
    return json.dumps(fields)


both_forms = pytest.mark.parametrize("encode", [False, True], ids=["str", "bytes"])


def parse(data: str, *, encode: bool) -> chatfeed.AnyServerMessage:
    return parse_server_message(data.encode() if encode else data)


# Known types


@both_forms
def test_auth_success(encode: bool) -> None:
    message = parse(frame(type="auth_success"), encode=encode)

    assert isinstance(message, AuthSuccess)
    assert message.type == "auth_success"


@both_forms
def test_auth_success_may_carry_a_payload_and_a_message(encode: bool) -> None:
    message = parse(frame(type="auth_success", payload={"userId": 1}, message="welcome"), encode=encode)

    assert isinstance(message, AuthSuccess)
    assert message.payload == {"userId": 1}
    assert message.message == "welcome"


@both_forms
def test_auth_error_carries_the_servers_reason(encode: bool) -> None:
    message = parse(frame(type="auth_error", message="Invalid token"), encode=encode)

    assert isinstance(message, AuthError)
    assert message.type == "auth_error"
    assert message.message == "Invalid token"


def test_auth_error_without_a_message() -> None:
    message = parse_server_message(frame(type="auth_error"))

    assert isinstance(message, AuthError)
    assert message.message == ""


@both_forms
def test_new_message_from_the_guide(encode: bool) -> None:
    message = parse(frame(type="new_message", payload=MESSAGE_PAYLOAD), encode=encode)

    assert isinstance(message, NewMessage)
    assert message.type == "new_message"
    assert isinstance(message.payload, Message)
    assert message.payload.id == "123"
    assert message.payload.chat_id == "17"
    assert message.payload.role is Role.ASSISTANT
    assert message.payload.content == "This is the AI's response..."


@both_forms
def test_new_chat_from_the_guide(encode: bool) -> None:
    message = parse(frame(type="new_chat", payload=CHAT_PAYLOAD), encode=encode)

    assert isinstance(message, NewChat)
    assert message.type == "new_chat"
    assert message.payload.id == "18"
    assert message.payload.user_id == "1"
    assert message.payload.title == "The first question of the chat..."


@both_forms
def test_error(encode: bool) -> None:
    message = parse(frame(type="error", message="Something went wrong"), encode=encode)

    assert isinstance(message, ErrorMessage)
    assert message.type == "error"
    assert message.message == "Something went wrong"


def test_every_known_type_is_a_server_message() -> None:
    frames = [
        frame(type="auth_success"),
        frame(type="auth_error", message="no"),
        frame(type="new_message", payload=MESSAGE_PAYLOAD),
        frame(type="new_chat", payload=CHAT_PAYLOAD),
        frame(type="error", message="busy"),
    ]

    messages = [parse_server_message(f) for f in frames]

    assert [m.type for m in messages] == KNOWN_TYPES
    assert all(isinstance(m, ServerMessage) for m in messages)
    assert not any(isinstance(m, UnknownMessage) for m in messages)


def test_new_message_with_integer_ids() -> None:
    message = parse_server_message(frame(type="new_message", payload={**MESSAGE_PAYLOAD, "id": 9, "chatId": 4}))

    assert isinstance(message, NewMessage)
    assert (message.payload.id, message.payload.chat_id) == ("9", "4")


def test_new_message_with_an_unknown_role_and_status_is_not_dropped() -> None:
    payload = {**MESSAGE_PAYLOAD, "role": "moderator", "status": "STREAMING"}

    message = parse_server_message(frame(type="new_message", payload=payload))

    assert isinstance(message, NewMessage)
    assert message.payload.role == "moderator"
    assert message.payload.status == "STREAMING"


def test_fields_a_newer_server_adds_to_a_known_frame_are_kept() -> None:
    payload = {**MESSAGE_PAYLOAD, "tokensUsed": 7}

    message = parse_server_message(frame(type="new_message", payload=payload, seq=12))

    assert isinstance(message, NewMessage)
    assert message.model_extra == {"seq": 12}
    assert message.payload.model_extra == {"tokensUsed": 7}


# Unknown types


@both_forms
def test_unknown_type_is_kept_whole(encode: bool) -> None:
    message = parse(
        frame(type="typing", payload={"chatId": "17", "users": [1, 2]}, message="someone is typing", seq=4),
        encode=encode,
    )

    assert isinstance(message, UnknownMessage)
    assert message.type == "typing"
    assert message.payload == {"chatId": "17", "users": [1, 2]}
    assert message.message == "someone is typing"
    assert message.model_extra == {"seq": 4}
    assert json.loads(message.model_dump_json(by_alias=True)) == {
        "type": "typing",
        "payload": {"chatId": "17", "users": [1, 2]},
        "message": "someone is typing",
        "seq": 4,
    }


def test_unknown_type_with_nothing_else() -> None:
    message = parse_server_message(frame(type="ping"))

    assert isinstance(message, UnknownMessage)
    assert message.payload is None
    assert message.message is None


@pytest.mark.parametrize("message_value", [{"code": 3}, ["a"], 5, None])
def test_unknown_type_may_carry_any_json_as_message(message_value: object) -> None:
    message = parse_server_message(frame(type="chat_deleted", message=message_value))

    assert isinstance(message, UnknownMessage)
    assert message.message == message_value


@pytest.mark.parametrize("name", ["NEW_MESSAGE", "new-message", "", " error"])
def test_near_misses_of_known_types_are_unknown(name: str) -> None:
    message = parse_server_message(frame(type=name, payload=MESSAGE_PAYLOAD))

    assert isinstance(message, UnknownMessage)
    assert message.type == name


# Frames that do not fit


def test_protocol_error_is_a_chatfeed_error() -> None:
    assert issubclass(ProtocolError, ChatfeedError)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ("not json", "not valid JSON"),
        ("", "not valid JSON"),
        ('{"type": "error"', "not valid JSON"),
        ("[" * 200_000, "not valid JSON"),
        ('{"a":' * 200_000, "not valid JSON"),
        (b"\xff\xfe\xfd", "not valid JSON"),
        (b'{"type": "error", "message": "\xc3\x28"}', "not valid JSON"),
        ('[{"type": "error"}]', "not a JSON object"),
        ("null", "not a JSON object"),
        ("42", "not a JSON object"),
        ("4.5", "not a JSON object"),
        ('"new_message"', "not a JSON object"),
        ("true", "not a JSON object"),
        ("{}", "no string 'type'"),
        ('{"payload": {}}', "no string 'type'"),
        ('{"type": 5}', "no string 'type'"),
        ('{"type": null}', "no string 'type'"),
        ('{"type": ["new_message"]}', "no string 'type'"),
        ('{"type": {"name": "error"}}', "no string 'type'"),
    ],
    ids=[
        "not-json",
        "empty",
        "truncated",
        "deep-arrays",
        "deep-objects",
        "invalid-utf8",
        "invalid-utf8-in-string",
        "array",
        "null",
        "integer",
        "float",
        "string",
        "boolean",
        "empty-object",
        "missing-type",
        "integer-type",
        "null-type",
        "list-type",
        "object-type",
    ],
)
def test_frames_that_are_not_messages_raise_protocol_error(data: str | bytes, says: str) -> None:
    with pytest.raises(ProtocolError, match=says):
        parse_server_message(data)


def test_empty_bytes_raise_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        parse_server_message(b"")


@pytest.mark.parametrize(
    "payload",
    [
        {k: v for k, v in MESSAGE_PAYLOAD.items() if k != "createdAt"},
        {**MESSAGE_PAYLOAD, "createdAt": "not a date"},
        {**MESSAGE_PAYLOAD, "createdAt": 1.5e300},
        {**MESSAGE_PAYLOAD, "createdAt": None},
    ],
    ids=["missing", "garbage", "huge-number", "null"],
)
def test_new_message_with_a_bad_created_at_names_the_field(payload: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match=r"payload\.createdAt") as excinfo:
        parse_server_message(frame(type="new_message", payload=payload))

    assert "new_message" in str(excinfo.value)


def test_new_message_names_every_missing_field() -> None:
    with pytest.raises(ProtocolError) as excinfo:
        parse_server_message(frame(type="new_message", payload={"id": "1"}))

    text = str(excinfo.value)
    for field in ("payload.chatId", "payload.role", "payload.createdAt"):
        assert field in text
    assert "payload.id" not in text
    assert "payload.content" not in text  # a message may come without text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", ["1"]),
        ("chatId", {"id": 1}),
        ("content", 5),
        ("fallbackUsed", "maybe"),
        ("precis", 3),
        ("audioUrl", ["x"]),
    ],
)
def test_new_message_with_a_mistyped_field_names_it(field: str, value: object) -> None:
    with pytest.raises(ProtocolError, match=rf"payload\.{field}\b"):
        parse_server_message(frame(type="new_message", payload={**MESSAGE_PAYLOAD, field: value}))


@pytest.mark.parametrize("payload", [None, 5, "text", [MESSAGE_PAYLOAD]], ids=["null", "number", "string", "list"])
def test_new_message_whose_payload_is_not_an_object(payload: object) -> None:
    with pytest.raises(ProtocolError):
        parse_server_message(frame(type="new_message", payload=payload))


def test_new_message_without_a_payload_names_it() -> None:
    with pytest.raises(ProtocolError, match="payload"):
        parse_server_message(frame(type="new_message"))


def test_new_chat_with_a_bad_payload_names_the_field() -> None:
    payload = {k: v for k, v in CHAT_PAYLOAD.items() if k != "createdAt"}

    with pytest.raises(ProtocolError, match=r"new_chat.*payload\.createdAt"):
        parse_server_message(frame(type="new_chat", payload=payload))


@pytest.mark.parametrize(
    ("message", "text"),
    [
        (None, ""),
        ({"text": "x"}, '{"text": "x"}'),
        # What a Node backend sends when it writes `message: err` for a jsonwebtoken error.
        ({"name": "TokenExpiredError", "message": "jwt expired", "expiredAt": "2025-10-07"}, "jwt expired"),
        ({}, ""),
        (["a", 1], '["a", 1]'),
        (42, "42"),
        (True, "true"),
    ],
)
@pytest.mark.parametrize("kind", ["auth_error", "error"])
def test_a_message_of_any_json_type_is_kept_as_text(kind: str, message: object, text: str) -> None:
    parsed = parse_server_message(frame(type=kind, message=message))

    assert isinstance(parsed, (chatfeed.AuthError, chatfeed.ErrorMessage))
    assert parsed.message == text


@pytest.mark.parametrize("kind", ["auth_error", "error"])
def test_the_text_under_payload_is_taken_when_message_is_absent_or_null(kind: str) -> None:
    for fields in (
        {"payload": {"message": "token expired"}},
        {"message": None, "payload": {"message": "token expired"}},
    ):
        parsed = parse_server_message(frame(type=kind, **fields))

        assert isinstance(parsed, (chatfeed.AuthError, chatfeed.ErrorMessage))
        assert parsed.message == "token expired"


def test_the_top_level_message_wins_over_the_one_under_payload() -> None:
    parsed = parse_server_message(frame(type="error", message="top", payload={"message": "nested"}))

    assert isinstance(parsed, chatfeed.ErrorMessage)
    assert parsed.message == "top"


def test_auth_success_with_an_unexpected_message_is_still_auth_success() -> None:
    parsed = parse_server_message(frame(type="auth_success", message={"user": 1}, payload=[1]))

    assert isinstance(parsed, chatfeed.AuthSuccess)
    assert parsed.message == '{"user": 1}'


@both_forms
def test_a_lone_surrogate_escape_becomes_the_replacement_character(encode: bool) -> None:
    # Node's JSON.stringify writes one for a string cut in the middle of an emoji.
    data = frame(type="new_message", payload={**MESSAGE_PAYLOAD, "content": "cut \ud83d"})
    assert "\\ud83d" in data

    parsed = parse(data, encode=encode)

    assert isinstance(parsed, chatfeed.NewMessage)
    assert parsed.payload.content == "cut \ufffd"


def test_a_surrogate_pair_escape_is_still_one_character() -> None:
    parsed = parse_server_message('{"type": "error", "message": "\\ud83d\\ude00 and a lone \\udc00"}')

    assert isinstance(parsed, chatfeed.ErrorMessage)
    assert parsed.message == "\U0001f600 and a lone \ufffd"


def test_invalid_json_with_a_surrogate_escape_is_still_invalid() -> None:
    with pytest.raises(ProtocolError, match="not valid JSON"):
        parse_server_message('{"type": "error", "message": "\\ud83d", }')


# The error never quotes the frame

FRAMES_WITH_MARKER: list[str | bytes] = [
    f'{{"type": "new_message", "payload": {MARKER}}}',
    f'{{"type": "new_message", "payload": {{"content": "{MARKER}',
    f'{{"type": "{MARKER}", "bad": "\xff"}}'.encode("latin-1"),
    f'["{MARKER}"]',
    f'"{MARKER}"',
    frame(kind=MARKER),
    frame(type=[MARKER]),
    frame(type={MARKER: "new_message"}),
    frame(type="new_message", payload={"content": MARKER}),
    frame(type="new_message", payload={**MESSAGE_PAYLOAD, "createdAt": MARKER}),
    frame(type="new_message", payload={**MESSAGE_PAYLOAD, "id": {MARKER: 1}}),
    frame(type="new_message", payload={**MESSAGE_PAYLOAD, "role": [MARKER]}),
    frame(type="new_message", payload={**MESSAGE_PAYLOAD, "status": {MARKER: True}}),
    frame(type="new_message", payload={**MESSAGE_PAYLOAD, "fallbackUsed": MARKER}),
    frame(type="new_message", payload=MARKER),
    frame(type="new_chat", payload={**CHAT_PAYLOAD, "updatedAt": MARKER}),
    frame(type="new_chat", payload={**CHAT_PAYLOAD, "userId": [MARKER]}),
    frame(type="new_message", payload={**MESSAGE_PAYLOAD, "content": {MARKER: 1}}),
    '{"type": "new_message", "payload": "\\ud83d' + MARKER + '"}',
    f'["{MARKER}", ' + "[" * 200_000,
]


def _raise_protocol_error(data: str | bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as excinfo:
        parse_server_message(data)
    return excinfo.value


@pytest.mark.parametrize("data", FRAMES_WITH_MARKER, ids=range(len(FRAMES_WITH_MARKER)))
def test_protocol_error_text_never_quotes_the_frame(data: str | bytes) -> None:
    exc = _raise_protocol_error(data)

    assert MARKER not in str(exc)
    assert MARKER not in repr(exc)
    # What logging.exception() and an uncaught traceback print.
    assert MARKER not in "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def test_protocol_error_does_not_chain_an_exception_that_quotes_the_frame() -> None:
    # Error reporters walk __cause__ and __context__; either may end up in a report.
    leaks: list[str] = []
    for index, data in enumerate(FRAMES_WITH_MARKER):
        exc = _raise_protocol_error(data)
        for attribute in ("__cause__", "__context__"):
            linked = getattr(exc, attribute)
            if linked is not None and (MARKER in str(linked) or MARKER in repr(linked)):
                leaks.append(f"frame {index}: {attribute} is a {type(linked).__name__} quoting it")

    assert leaks == []


def test_protocol_error_text_is_short_for_a_long_frame() -> None:
    payload = {**MESSAGE_PAYLOAD, "content": MARKER * 10_000, "createdAt": "never"}

    exc = _raise_protocol_error(frame(type="new_message", payload=payload))

    assert MARKER not in str(exc)
    assert len(str(exc)) < 500


# Text that is not valid Unicode


@pytest.mark.parametrize(
    "data",
    ["\ud800", '{"type": "typing", "payload": "\ud800"}', '{"type": "new_message", "payload": "\udcff"}'],
    ids=["alone", "in-unknown-frame", "in-known-frame"],
)
def test_text_with_a_lone_surrogate_raises_protocol_error(data: str) -> None:
    # A str is not guaranteed to be encodable: a lone surrogate must not
    # escape as anything but a ProtocolError.
    with pytest.raises(ProtocolError):
        parse_server_message(data)


# Properties: whatever arrives, a ServerMessage or a ProtocolError

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
    | st.sampled_from(["2025-10-07T12:00:00.000Z", "2025-10-07T12:00:00", "assistant", "COMPLETED"])
)
_json = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
_payload_keys = sorted({*MESSAGE_PAYLOAD, *CHAT_PAYLOAD})


def _altered(base: dict[str, Any], changes: dict[str, Any], dropped: set[str]) -> dict[str, Any]:
    return {key: value for key, value in {**base, **changes}.items() if key not in dropped}


# Valid payloads with a few fields changed or removed, and arbitrary JSON.
_payloads = _json | st.builds(
    _altered,
    st.sampled_from([MESSAGE_PAYLOAD, CHAT_PAYLOAD]),
    st.dictionaries(st.sampled_from(_payload_keys), _json, max_size=2),
    st.sets(st.sampled_from(_payload_keys), max_size=2),
)
_frames = st.fixed_dictionaries(
    {"type": st.sampled_from([*KNOWN_TYPES, "typing"]) | st.text(max_size=12) | _json},
    optional={"payload": _payloads, "message": _json, "extra": _json},
)
# new_message and new_chat frames that are valid or nearly so.
_payload_frames = st.builds(
    lambda kind, changes, dropped, extra: {"type": kind[0], "payload": _altered(kind[1], changes, dropped), **extra},
    st.sampled_from([("new_message", MESSAGE_PAYLOAD), ("new_chat", CHAT_PAYLOAD)]),
    st.dictionaries(st.sampled_from(_payload_keys), _scalars, max_size=1),
    st.sets(st.sampled_from(_payload_keys), max_size=1),
    st.dictionaries(st.text(max_size=8), _scalars, max_size=2),
)

_CLASSES: dict[str, type[ServerMessage]] = {
    "auth_success": AuthSuccess,
    "auth_error": AuthError,
    "new_message": NewMessage,
    "new_chat": NewChat,
    "error": ErrorMessage,
}

_property_settings = settings(max_examples=200, deadline=None, database=None)


def _check(data: str | bytes) -> ServerMessage | None:
    try:
        message = parse_server_message(data)
    except ProtocolError:
        return None
    assert isinstance(message, ServerMessage)
    return message


@_property_settings
@given(st.text())
def test_any_text_gives_a_message_or_a_protocol_error(data: str) -> None:
    _check(data)


@_property_settings
@given(st.binary())
def test_any_bytes_give_a_message_or_a_protocol_error(data: bytes) -> None:
    _check(data)


@_property_settings
@given(_payload_frames | _frames | _json, st.booleans())
def test_any_json_gives_a_message_of_its_type_or_a_protocol_error(value: object, encode: bool) -> None:
    data = json.dumps(value)

    message = _check(data.encode() if encode else data)

    if message is not None:
        assert isinstance(value, dict)
        assert message.type == value["type"]
        assert type(message) is _CLASSES.get(value["type"], UnknownMessage)
