"""The bridge's envelope, without sockets: what goes into the log, and what a consumer reads back."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatfeed import ErrorMessage, NewChat, NewMessage, UnknownMessage
from chatfeed._delivery import Gap, fetch_backfill
from chatfeed._protocol import FeedProtocol
from chatfeed._session import _keeping_frames
from chatfeed.bridge import (
    ENVELOPE_SCHEMA,
    ENVELOPE_VERSION,
    Envelope,
    EnvelopeError,
    dedup_id,
    encode,
    partition,
    subject_token,
)
from chatfeed.models import FeedEvent
from chatfeed.testing import make_chat, make_message

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", re.IGNORECASE)
FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("date-time", raises=ValueError)  # type: ignore[untyped-decorator]  # jsonschema is untyped
def is_date_time(value: object) -> bool:
    # jsonschema checks date-time only with rfc3339-validator installed, which the test extra lacks.
    if not isinstance(value, str):
        return True
    return RFC3339.fullmatch(value) is not None and datetime.fromisoformat(value.replace("Z", "+00:00")) is not None


VALIDATOR = jsonschema.Draft202012Validator(ENVELOPE_SCHEMA, format_checker=FORMATS)
RECEIVED = datetime(2025, 10, 7, 12, 0, 1, 250000, tzinfo=timezone.utc)

MESSAGE_FRAME = (
    '{"type":"new_message","payload":{"id":1,"chatId":"17","role":"assistant","content":"Hi",'
    '"createdAt":"2025-10-07T12:00:00.000+02:00","status":"COMPLETED","reactions":{"up":3}},"trace":"abc"}'
)
CHAT_FRAME = (
    '{"type": "new_chat", "payload": {"id": "17", "userId": 42, "title": "T",'
    ' "createdAt": "2025-10-07T12:00:00Z", "updatedAt": "2025-10-07T12:05:00.5Z", "pinned": true}}'
)


def live(frame: str | bytes) -> FeedEvent:
    """The event a bridge's pool delivers for ``frame``: parsed, with its frame kept."""
    protocol = FeedProtocol()
    protocol.receive('{"type":"auth_success"}')
    event = _keeping_frames(protocol.receive)(frame)
    assert event is not None
    return event


def document(data: bytes) -> dict[str, Any]:
    value = json.loads(data)
    assert isinstance(value, dict)
    VALIDATOR.validate(value)
    return value


async def backfilled(*items: Any) -> list[Any]:
    gap = Gap(since=datetime(2025, 1, 1, tzinfo=timezone.utc), is_reconnect=True, downtime=1.0, feed="alice")
    events, error = await fetch_backfill(lambda _: list(items), gap, 5.0)
    assert error is None
    return events


# The frame: the wire's, verbatim


@pytest.mark.parametrize("as_bytes", [False, True])
def test_a_live_message_keeps_its_frame_verbatim(as_bytes: bool) -> None:
    event = live(MESSAGE_FRAME.encode() if as_bytes else MESSAGE_FRAME)
    record = encode(event, "alice", received=RECEIVED)
    doc = document(record.data)
    # The very text of the wire: numeric id, extra fields, the time zone as sent.
    assert record.data.decode().endswith(f',"frame":{MESSAGE_FRAME}}}')
    assert doc["frame"]["payload"]["id"] == 1
    assert doc["frame"]["trace"] == "abc"
    assert doc["frame"]["payload"]["createdAt"] == "2025-10-07T12:00:00.000+02:00"
    assert {key: doc[key] for key in ("v", "feed", "type", "id", "chat", "source", "received", "created")} == {
        "v": 1,
        "feed": "alice",
        "type": "new_message",
        "id": "1",
        "chat": "17",
        "source": "live",
        "received": "2025-10-07T12:00:01.250000Z",
        "created": "2025-10-07T10:00:00Z",
    }
    assert (record.feed, record.type, record.chat, record.dedup) == ("alice", "new_message", "17", doc["dedup"])
    assert record.created == datetime(2025, 10, 7, 10, tzinfo=timezone.utc)


def test_a_live_chat_keeps_its_frame_verbatim() -> None:
    record = encode(live(CHAT_FRAME), "bob", received=RECEIVED)
    doc = document(record.data)
    assert record.data.decode().endswith(f',"frame":{CHAT_FRAME}}}')
    assert (doc["type"], doc["id"], doc["chat"], doc["created"]) == ("new_chat", "17", "17", "2025-10-07T12:00:00Z")
    assert doc["frame"]["payload"]["userId"] == 42
    assert doc["frame"]["payload"]["pinned"] is True


@pytest.mark.parametrize("word", ["NaN", "Infinity", "-Infinity"])
def test_a_message_whose_text_mentions_nan_or_infinity_keeps_its_frame_verbatim(word: str) -> None:
    # Only a NaN/Infinity *value* is not JSON; the same word inside a string is.
    frame = MESSAGE_FRAME.replace('"content":"Hi"', f'"content":"To {word} and beyond"')
    record = encode(live(frame), "alice", received=RECEIVED)
    document(record.data)
    assert record.data.decode().endswith(f',"frame":{frame}}}')


def test_a_frame_with_a_nan_value_is_written_again_as_json() -> None:
    frame = MESSAGE_FRAME.replace('"trace":"abc"', '"score":NaN')
    event = live(frame)
    record = encode(event, "alice", received=RECEIVED)
    doc = document(record.data)  # json.loads accepts NaN: check that the text has none
    assert b"NaN" not in record.data
    assert doc["frame"]["score"] is None
    assert Envelope.decode(record.data).event().payload == event.payload  # type: ignore[union-attr]


# Round trips


@pytest.mark.parametrize("frame", [MESSAGE_FRAME, CHAT_FRAME])
def test_live_events_come_back_as_the_same_typed_events(frame: str) -> None:
    event = live(frame)
    record = encode(event, "alice", received=RECEIVED)
    envelope = Envelope.decode(record.data)
    again = envelope.event()
    assert again == event
    assert type(again) is type(event)
    assert (again.feed, again.source) == ("alice", "live")
    assert envelope.received == RECEIVED
    assert envelope.dedup == record.dedup
    assert Envelope.decode(record.data.decode()) == envelope


def test_error_and_unknown_events_round_trip_without_frames_of_their_own() -> None:
    error = live('{"type":"error","message":"busy","code":7}')
    unknown = live('{"type":"typing","payload":{"chatId":"17"},"who":"bob"}')
    assert isinstance(error, ErrorMessage)
    assert isinstance(unknown, UnknownMessage)
    for event in (error, unknown):
        record = encode(event, "alice", received=RECEIVED)
        doc = document(record.data)
        assert (doc["id"], doc["chat"], doc["created"], record.chat, record.created) == (None,) * 5
        again = Envelope.decode(record.data).event()
        assert again == event
        assert again.feed == "alice"
    assert document(encode(unknown, "a", received=RECEIVED).data)["frame"] == {
        "type": "typing",
        "payload": {"chatId": "17"},
        "who": "bob",
    }


async def test_backfilled_events_round_trip_marked_as_backfill() -> None:
    message = make_message(id="5", chat_id="17", status="COMPLETED")
    chat = make_chat(id="17")
    events = await backfilled(chat, message)
    for event in events:
        record = encode(event, "alice", received=RECEIVED)
        doc = document(record.data)
        assert doc["source"] == "backfill"
        assert doc["frame"]["type"] == event.type
        again = Envelope.decode(record.data).event()
        assert again == event
        assert (again.source, again.feed) == ("backfill", "alice")


# Dedup ids


async def test_a_message_has_the_same_dedup_id_live_and_backfilled() -> None:
    frame = (
        '{"type":"new_message","payload":{"id":"5","chatId":"17","role":"assistant",'
        '"status":"COMPLETED","createdAt":"2025-10-07T12:00:00Z"}}'
    )
    from_wire = live(frame)
    assert isinstance(from_wire, NewMessage)
    (from_history,) = await backfilled(from_wire.payload)
    live_record = encode(from_wire, "alice", received=RECEIVED)
    backfill_record = encode(from_history, "alice")  # received later: not part of the id
    assert live_record.dedup == backfill_record.dedup
    assert encode(from_wire, "alice").dedup == live_record.dedup
    assert live_record.dedup == dedup_id("alice", "new_message", "5", "COMPLETED")


async def test_a_chat_has_the_same_dedup_id_live_and_backfilled() -> None:
    from_wire = live(CHAT_FRAME)
    assert isinstance(from_wire, NewChat)
    (from_history,) = await backfilled(from_wire.payload)
    assert encode(from_wire, "bob").dedup == encode(from_history, "bob").dedup


def test_dedup_ids_differ_by_status_updated_at_and_feed() -> None:
    def message_id(feed: str, status: str | None) -> str:
        message = make_message(id="5", chat_id="17", status=status)
        return encode(NewMessage(type="new_message", payload=message), feed).dedup

    ids = {message_id("alice", "PENDING"), message_id("alice", "COMPLETED"), message_id("alice", None)}
    ids.add(message_id("bob", "COMPLETED"))
    assert len(ids) == 4

    def chat_id(updated: datetime) -> str:
        chat = make_chat(id="17", created_at=RECEIVED, updated_at=updated)
        return encode(NewChat(type="new_chat", payload=chat), "alice").dedup

    assert chat_id(RECEIVED) != chat_id(datetime(2025, 10, 8, tzinfo=timezone.utc))
    assert chat_id(RECEIVED) == chat_id(RECEIVED.astimezone(timezone.utc))


def test_events_without_identity_differ_by_time_received() -> None:
    error = live('{"type":"error","message":"busy"}')
    first = encode(error, "alice", received=RECEIVED)
    assert encode(error, "alice", received=RECEIVED).dedup == first.dedup
    assert encode(error, "alice").dedup != first.dedup


def test_dedup_id_is_pinned() -> None:
    # Other languages compute the same ids: BLAKE2b-128 of the parts joined by U+001F.
    assert dedup_id("alice", "new_message", "42", "COMPLETED") == "e468df60a8f093e2ee2a803fbcdbd18c"
    assert re.fullmatch("[0-9a-f]{32}", dedup_id("", "x"))


# Subjects and partitions


@given(st.text())
def test_subject_token_is_a_valid_nats_token(value: str) -> None:
    token = subject_token(value)
    assert token
    assert re.fullmatch(r"[A-Za-z0-9_%-]+", token), token


@given(st.text(), st.text())
def test_subject_token_is_injective(first: str, second: str) -> None:
    if first != second:
        assert subject_token(first) != subject_token(second)


def test_subject_token_examples() -> None:
    assert subject_token("user.42 *") == "user%2E42%20%2A"
    assert subject_token("") == "%"
    assert subject_token("%") == "%25"
    assert subject_token("é>") == "%C3%A9%3E"
    assert subject_token("ok-_1") == "ok-_1"


def test_partition_is_pinned() -> None:
    # Fixed values another implementation can check itself against.
    assert partition("alice", "17", 16) == 10
    assert partition("alice", None, 16) == 14
    assert partition("bob", "17", 16) == 10
    assert partition("alice", "17", 1000) == 658


def test_partition_spreads_keys() -> None:
    counts = [0] * 16
    for feed in range(100):
        for chat in range(100):
            counts[partition(f"u{feed}", str(chat), 16)] += 1
    assert min(counts) > 10_000 / 16 * 0.8
    assert max(counts) < 10_000 / 16 * 1.2


# Refusals


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"\xff\xfe not json", "not JSON"),
        (b'{"v": 1, "feed": "a"', "not JSON"),
        (b'["v", 1]', "not a JSON object"),
        (b'{"v": 2}', "version is 2"),
        (b'{"v": "1"}', "version"),
        (b'{"feed": "a"}', "version"),
    ],
)
def test_decode_refuses_what_is_not_an_envelope(data: bytes, says: str) -> None:
    with pytest.raises(EnvelopeError, match=says):
        Envelope.decode(data)


def valid_document() -> dict[str, Any]:
    doc = json.loads(encode(live(MESSAGE_FRAME), "alice", received=RECEIVED).data)
    assert isinstance(doc, dict)
    return doc


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("feed", None),
        ("feed", 7),
        ("type", ["new_message"]),
        ("id", 1),
        ("chat", {}),
        ("source", "replay"),
        ("received", None),
        ("received", "yesterday"),
        ("created", "2025-13-45"),
        ("dedup", 5),
        ("frame", "{}"),
        ("frame", None),
    ],
)
def test_decode_names_the_field_that_does_not_fit_and_never_quotes_the_document(field: str, value: Any) -> None:
    doc = valid_document()
    doc[field] = value
    doc["feed"] = doc["feed"] if field == "feed" else "secret-feed-name"
    with pytest.raises(EnvelopeError) as caught:
        Envelope.decode(json.dumps(doc))
    text = str(caught.value)
    assert field in text
    assert "secret-feed-name" not in text
    assert "COMPLETED" not in text
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__ or caught.value.__context__ is None


@pytest.mark.parametrize("field", ["feed", "type", "id", "chat", "source", "received", "created", "dedup", "frame"])
def test_decode_refuses_a_missing_field(field: str) -> None:
    doc = valid_document()
    del doc[field]
    with pytest.raises(EnvelopeError, match=field):
        Envelope.decode(json.dumps(doc))


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "new_message", "payload": {"id": "1", "content": "secret content"}},
        {"type": "new_message"},
        {"type": "auth_success"},
        {"type": 7},
    ],
)
def test_event_refuses_a_frame_that_does_not_fit(frame: dict[str, Any]) -> None:
    doc = valid_document()
    doc["frame"] = frame
    envelope = Envelope.decode(json.dumps(doc))
    with pytest.raises(EnvelopeError) as caught:
        envelope.event()
    assert "secret content" not in str(caught.value)
    assert caught.value.__cause__ is None


def test_the_schema_is_a_valid_draft_2020_12_schema_and_refuses_a_bad_dedup() -> None:
    jsonschema.Draft202012Validator.check_schema(ENVELOPE_SCHEMA)
    doc = valid_document()
    assert doc["v"] == ENVELOPE_VERSION
    doc["dedup"] = "XYZ"
    assert not VALIDATOR.is_valid(doc)
    doc = valid_document()
    doc["received"] = "not a time"
    assert not VALIDATOR.is_valid(doc)
