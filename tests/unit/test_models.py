"""Message and Chat: the payloads of new_message and new_chat frames."""

from __future__ import annotations

import ast
import inspect
import itertools
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pydantic
import pytest

import chatfeed.models
from chatfeed import Chat, Message, MessageStatus, Role

# The payloads of the backend's integration guide, verbatim.
GUIDE_MESSAGE: dict[str, Any] = {
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

GUIDE_CHAT: dict[str, Any] = {
    "id": "18",
    "userId": "1",
    "title": "The first question of the chat...",
    "summary": "This chat is about: The first question...",
    "createdAt": "2025-10-07T12:05:00.000Z",
    "updatedAt": "2025-10-07T12:05:00.000Z",
}

NOON = datetime(2025, 10, 7, 12, 0, tzinfo=timezone.utc)


def message(**changes: Any) -> Message:
    """Parse the guide's message payload with some wire fields changed (None removes one)."""
    payload = {**GUIDE_MESSAGE, **changes}
    return Message.model_validate_json(json.dumps({k: v for k, v in payload.items() if v is not None}))


# Parsing the guide's payloads


def test_guide_message_parses_to_snake_case_attributes() -> None:
    m = Message.model_validate_json(json.dumps(GUIDE_MESSAGE))

    assert m.id == "123"
    assert m.chat_id == "17"
    assert m.role is Role.ASSISTANT
    assert m.content == "This is the AI's response..."
    assert m.precis == "AI response summary."
    assert m.audio_url == "https://path/to/audio.mp3"
    assert m.fallback_used is False
    assert m.status is MessageStatus.COMPLETED
    assert m.created_at == NOON
    assert m.model_extra == {}


def test_guide_chat_parses_to_snake_case_attributes() -> None:
    c = Chat.model_validate_json(json.dumps(GUIDE_CHAT))

    assert c.id == "18"
    assert c.user_id == "1"
    assert c.title == "The first question of the chat..."
    assert c.summary == "This chat is about: The first question..."
    assert c.created_at == datetime(2025, 10, 7, 12, 5, tzinfo=timezone.utc)
    assert c.updated_at == c.created_at


def test_guide_payloads_parse_from_python_dicts_too() -> None:
    assert Message.model_validate(GUIDE_MESSAGE) == Message.model_validate_json(json.dumps(GUIDE_MESSAGE))
    assert Chat.model_validate(GUIDE_CHAT) == Chat.model_validate_json(json.dumps(GUIDE_CHAT))


def test_optional_message_fields_have_defaults() -> None:
    m = Message.model_validate(
        {"id": "1", "chatId": "2", "role": "user", "content": "hi", "createdAt": "2025-10-07T12:00:00Z"}
    )

    assert m.precis is None
    assert m.audio_url is None
    assert m.fallback_used is False
    assert m.status is None


def test_precis_and_audio_url_may_be_null() -> None:
    m = Message.model_validate({**GUIDE_MESSAGE, "precis": None, "audioUrl": None})

    assert m.precis is None
    assert m.audio_url is None


def test_chat_summary_may_be_null() -> None:
    assert Chat.model_validate({**GUIDE_CHAT, "summary": None}).summary is None


@pytest.mark.parametrize("field", ["id", "chatId", "role", "createdAt"])
def test_message_without_a_required_field_is_rejected(field: str) -> None:
    payload = {k: v for k, v in GUIDE_MESSAGE.items() if k != field}

    with pytest.raises(pydantic.ValidationError) as excinfo:
        Message.model_validate(payload)

    assert [error["loc"] for error in excinfo.value.errors()] == [(field,)]


@pytest.mark.parametrize("field", ["id", "chatId", "role", "createdAt"])
def test_message_with_a_null_required_field_is_rejected(field: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        Message.model_validate({**GUIDE_MESSAGE, field: None})


@pytest.mark.parametrize("absent", [False, True], ids=["null", "absent"])
def test_message_keeps_what_a_client_can_live_without(absent: bool) -> None:
    fields = ("content", "precis", "audioUrl", "fallbackUsed", "status")
    payload = {k: v for k, v in GUIDE_MESSAGE.items() if k not in fields}
    if not absent:
        payload.update(dict.fromkeys(fields))

    m = Message.model_validate_json(json.dumps(payload))

    assert (m.content, m.precis, m.audio_url, m.fallback_used, m.status) == ("", None, None, False, None)


def test_chat_keeps_what_a_client_can_live_without() -> None:
    c = Chat.model_validate_json(json.dumps({**GUIDE_CHAT, "title": None, "summary": None, "updatedAt": None}))

    assert (c.title, c.summary, c.updated_at) == ("", None, c.created_at)
    absent = Chat.model_validate({k: v for k, v in GUIDE_CHAT.items() if k not in ("title", "updatedAt")})
    assert (absent.title, absent.updated_at) == ("", absent.created_at)


@pytest.mark.parametrize("field", ["id", "userId", "createdAt"])
def test_chat_without_a_required_field_is_rejected(field: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        Chat.model_validate({k: v for k, v in GUIDE_CHAT.items() if k != field})


@pytest.mark.parametrize(
    ("stamp", "hours"),
    [
        ("2025-10-07T12:00:00+05", 5),
        ("2025-10-07T12:00:00.000+00", 0),
        ("2025-10-07T12:00:00-03", -3),
        ("2025-10-07 12:00:00+05", 5),  # PostgreSQL's text form of a timestamptz
        ("2025-10-07T12:00+05", 5),
    ],
)
def test_timestamps_with_an_hours_only_offset_are_accepted(stamp: str, hours: int) -> None:
    m = Message.model_validate_json(json.dumps({**GUIDE_MESSAGE, "createdAt": stamp}))

    assert m.created_at.utcoffset() == timedelta(hours=hours)
    assert m.created_at == datetime(2025, 10, 7, 12, tzinfo=timezone(timedelta(hours=hours)))


@pytest.mark.parametrize("stamp", ["2025-10-07T12:00:00+5", "2025-10-07T12:00:00+055", "12:00:00+05"])
def test_malformed_offsets_are_still_rejected(stamp: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        Message.model_validate({**GUIDE_MESSAGE, "createdAt": stamp})


def test_every_field_of_the_models_has_a_docstring() -> None:
    # The reference renders the docstring under each field, read from the source.
    tree = ast.parse(inspect.getsource(chatfeed.models))
    for model in (Message, Chat):
        [body] = [node.body for node in tree.body if isinstance(node, ast.ClassDef) and node.name == model.__name__]
        documented = {
            statement.target.id
            for statement, after in itertools.pairwise(body)
            if isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        }
        assert set(model.model_fields) <= documented, f"{model.__name__} fields without a docstring"


# Names: camelCase on the wire, snake_case in Python


def test_construction_by_snake_case_names() -> None:
    m = Message(
        id="1",
        chat_id="17",
        role=Role.USER,
        content="hello",
        audio_url="https://example.invalid/a.mp3",
        fallback_used=True,
        created_at=NOON,
    )

    assert m.chat_id == "17"
    assert m.audio_url == "https://example.invalid/a.mp3"
    assert m.fallback_used is True

    c = Chat(id="5", user_id="9", title="t", created_at=NOON, updated_at=NOON)
    assert c.user_id == "9"


def test_construction_by_camel_case_aliases_gives_the_same_model() -> None:
    by_alias = Message.model_validate(
        {"id": "1", "chatId": "17", "role": "user", "content": "x", "createdAt": NOON, "fallbackUsed": True}
    )
    by_name = Message.model_validate(
        {"id": "1", "chat_id": "17", "role": "user", "content": "x", "created_at": NOON, "fallback_used": True}
    )

    assert by_alias == by_name


def test_dump_by_alias_gives_the_wire_names() -> None:
    m = Message.model_validate(GUIDE_MESSAGE)

    assert set(m.model_dump(by_alias=True)) == set(GUIDE_MESSAGE)
    assert set(json.loads(m.model_dump_json(by_alias=True))) == set(GUIDE_MESSAGE)
    assert set(Chat.model_validate(GUIDE_CHAT).model_dump(by_alias=True)) == set(GUIDE_CHAT)


def test_dump_json_by_alias_is_the_wire_form() -> None:
    wire = json.loads(Message.model_validate(GUIDE_MESSAGE).model_dump_json(by_alias=True))

    assert wire == {**GUIDE_MESSAGE, "createdAt": "2025-10-07T12:00:00Z"}


@pytest.mark.parametrize(
    "m",
    [
        Message.model_validate(GUIDE_MESSAGE),
        Message.model_validate({**GUIDE_MESSAGE, "role": "moderator", "status": "STREAMING"}),
        Message.model_validate({**GUIDE_MESSAGE, "precis": None, "audioUrl": None, "tokensUsed": 3}),
    ],
    ids=["guide", "unknown-enums", "nulls-and-extra"],
)
def test_message_round_trips_through_its_wire_form(m: Message) -> None:
    assert Message.model_validate(m.model_dump(by_alias=True)) == m
    assert Message.model_validate_json(m.model_dump_json(by_alias=True)) == m


def test_chat_round_trips_through_its_wire_form() -> None:
    c = Chat.model_validate({**GUIDE_CHAT, "summary": None, "archived": False})

    assert Chat.model_validate(c.model_dump(by_alias=True)) == c
    assert Chat.model_validate_json(c.model_dump_json(by_alias=True)) == c


# Immutability


def test_message_is_frozen() -> None:
    m = Message.model_validate(GUIDE_MESSAGE)

    with pytest.raises(pydantic.ValidationError, match="frozen"):
        m.content = "edited"

    assert m.content == "This is the AI's response..."


def test_chat_is_frozen() -> None:
    c = Chat.model_validate(GUIDE_CHAT)

    with pytest.raises(pydantic.ValidationError, match="frozen"):
        c.title = "edited"


def test_models_are_hashable_and_equal_by_value() -> None:
    a = Message.model_validate(GUIDE_MESSAGE)
    b = Message.model_validate(GUIDE_MESSAGE)

    assert a == b
    assert hash(a) == hash(b)
    assert a != Message.model_validate({**GUIDE_MESSAGE, "content": "other"})


# Identifiers


def test_integer_ids_become_strings() -> None:
    m = Message.model_validate_json(json.dumps({**GUIDE_MESSAGE, "id": 123, "chatId": 17}))
    c = Chat.model_validate_json(json.dumps({**GUIDE_CHAT, "id": 18, "userId": 1}))

    assert (m.id, m.chat_id) == ("123", "17")
    assert (c.id, c.user_id) == ("18", "1")
    assert json.loads(m.model_dump_json(by_alias=True))["id"] == "123"


def test_integer_ids_become_strings_when_constructing() -> None:
    values: dict[str, Any] = {"id": 5, "chat_id": 6, "role": "user", "content": "x", "created_at": NOON}

    m = Message(**values)

    assert (m.id, m.chat_id) == ("5", "6")


# Timestamps


def test_timestamps_are_timezone_aware() -> None:
    m = Message.model_validate(GUIDE_MESSAGE)
    c = Chat.model_validate(GUIDE_CHAT)

    for stamp in (m.created_at, c.created_at, c.updated_at):
        assert stamp.tzinfo is not None
        assert stamp.utcoffset() == timedelta(0)


def test_naive_timestamp_on_the_wire_is_taken_as_utc() -> None:
    m = message(createdAt="2025-10-07T12:00:00")
    c = Chat.model_validate({**GUIDE_CHAT, "createdAt": "2025-10-07T12:05:00", "updatedAt": "2025-10-07T13:00:00"})

    assert m.created_at == NOON
    assert m.created_at.tzinfo is timezone.utc
    assert c.created_at.tzinfo is timezone.utc
    assert c.updated_at == datetime(2025, 10, 7, 13, 0, tzinfo=timezone.utc)


def test_naive_datetime_passed_in_python_is_taken_as_utc() -> None:
    m = Message(id="1", chat_id="1", role="user", content="x", created_at=datetime(2025, 10, 7, 12, 0))

    assert m.created_at == NOON
    assert m.created_at.tzinfo is timezone.utc


def test_timestamp_with_an_offset_keeps_it() -> None:
    m = message(createdAt="2025-10-07T14:00:00+02:00")

    assert m.created_at.utcoffset() == timedelta(hours=2)
    assert m.created_at == NOON


def test_timestamp_that_is_not_a_date_is_rejected() -> None:
    with pytest.raises(pydantic.ValidationError):
        message(createdAt="yesterday")


# Open enumerations


def test_known_role_and_status_become_enums() -> None:
    m = Message.model_validate(GUIDE_MESSAGE)

    assert m.role is Role.ASSISTANT
    assert m.status is MessageStatus.COMPLETED
    assert message(role="user").role is Role.USER


def test_enums_compare_equal_to_their_wire_strings() -> None:
    m = Message.model_validate(GUIDE_MESSAGE)

    assert m.role == "assistant"
    assert m.status == "COMPLETED"


def test_enums_print_as_their_wire_strings() -> None:
    m = Message.model_validate(GUIDE_MESSAGE)

    assert str(m.role) == "assistant"
    assert f"{m.role}/{m.status}" == "assistant/COMPLETED"


def test_unknown_role_is_kept_as_a_plain_string() -> None:
    m = message(role="moderator")

    assert m.role == "moderator"
    assert type(m.role) is str


def test_unknown_status_is_kept_as_a_plain_string() -> None:
    m = message(status="STREAMING")

    assert m.status == "STREAMING"
    assert type(m.status) is str


def test_status_may_be_absent_or_null() -> None:
    assert message(status=None).status is None
    assert Message.model_validate({**GUIDE_MESSAGE, "status": None}).status is None


@pytest.mark.parametrize("role", [None, 5, ["user"]], ids=["null", "number", "list"])
def test_role_that_is_not_a_string_is_rejected(role: object) -> None:
    with pytest.raises(pydantic.ValidationError):
        Message.model_validate({**GUIDE_MESSAGE, "role": role})


# Fields a newer server adds


def test_extra_message_fields_are_kept() -> None:
    m = message(tokensUsed=42, reactions=[{"emoji": "+1"}])

    assert m.model_extra == {"tokensUsed": 42, "reactions": [{"emoji": "+1"}]}


def test_extra_fields_round_trip() -> None:
    m = message(tokensUsed=42, model={"name": "x", "fallback": None})

    wire = json.loads(m.model_dump_json(by_alias=True))

    assert wire["tokensUsed"] == 42
    assert wire["model"] == {"name": "x", "fallback": None}
    again = Message.model_validate_json(m.model_dump_json(by_alias=True))
    assert again == m
    assert again.model_extra == m.model_extra


def test_extra_chat_fields_are_kept() -> None:
    c = Chat.model_validate({**GUIDE_CHAT, "pinned": True})

    assert c.model_extra == {"pinned": True}
    assert c.model_dump(by_alias=True)["pinned"] is True
