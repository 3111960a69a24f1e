"""The ``extra`` fields of chatfeed's log records, as `log_fields` builds them."""

from __future__ import annotations

import pytest

import chatfeed
from chatfeed._logging import log_fields, redact_url
from chatfeed.testing import make_chat, make_message


def test_a_field_without_a_value_is_left_out_not_null() -> None:
    assert log_fields() == {}
    assert log_fields(None, attempt=None, delay=None, url=None) == {}
    assert log_fields("user-17", attempt=0, delay=0.0, gave_up=False) == {
        "chatfeed_feed": "user-17",
        "chatfeed_attempt": 0,
        "chatfeed_delay": 0.0,
        "chatfeed_gave_up": False,
    }


def test_the_url_is_redacted() -> None:
    fields = log_fields(url="wss://bot:hunter2@feed.example/ws?token=abc&v=2")
    assert fields == {"chatfeed_url": "wss://***@feed.example/ws?token=***&v=***"}


def test_an_error_gives_its_type_and_its_close_code_and_reason_or_its_status() -> None:
    lost = chatfeed.ConnectionLostError(4001, "session of *** replaced")
    assert log_fields(error=lost) == {
        "chatfeed_error_type": "ConnectionLostError",
        "chatfeed_close_code": 4001,
        "chatfeed_close_reason": "session of *** replaced",
    }
    assert log_fields(error=chatfeed.HandshakeError(503)) == {
        "chatfeed_error_type": "HandshakeError",
        "chatfeed_status_code": 503,
    }
    assert log_fields(error=chatfeed.HandshakeError(None)) == {"chatfeed_error_type": "HandshakeError"}
    assert log_fields(error=ValueError("no")) == {"chatfeed_error_type": "ValueError"}


def test_an_event_gives_its_type_its_chat_and_its_feed() -> None:
    message = chatfeed.NewMessage(type="new_message", payload=make_message(chat_id="7"))
    assert log_fields(event=message) == {"chatfeed_event_type": "new_message", "chatfeed_chat": "7"}
    chat = chatfeed.NewChat(type="new_chat", payload=make_chat(id="9"))
    object.__setattr__(chat, "feed", "user-17")  # as a pool's feed marks its events
    assert log_fields(event=chat, handler="welcome") == {
        "chatfeed_event_type": "new_chat",
        "chatfeed_chat": "9",
        "chatfeed_feed": "user-17",
        "chatfeed_handler": "welcome",
    }
    error = chatfeed.ErrorMessage(type="error", message="slow down")
    assert log_fields(event=error) == {"chatfeed_event_type": "error"}
    lost = chatfeed.Disconnected(code=1012, reason="", will_retry=True, error=chatfeed.ConnectionLostError(1012))
    assert log_fields(event=lost) == {"chatfeed_event_type": "disconnected"}


def test_without_an_event_its_type_and_chat_can_be_given() -> None:
    # A bridge's record is no event, but says which it was.
    assert log_fields("user-17", event_type="new_message", chat="7", position="42") == {
        "chatfeed_event_type": "new_message",
        "chatfeed_chat": "7",
        "chatfeed_feed": "user-17",
        "chatfeed_position": "42",
    }


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("wss://feed.example/ws/eyJhbGciOi.eyJzdWIiOiIxIn0.c2lnbmF0dXJl", "wss://feed.example/ws/***"),
        ("wss://feed.example/ws/eyJhbGciOi.eyJzdWIiOiIxIn0./feed", "wss://feed.example/ws/***/feed"),
        ("ws://h/k/" + "A1b2C3d4" * 6, "ws://h/k/***"),
        ("ws://h/k/" + "%41" * 40, "ws://h/k/***"),
        ("ws://h/feed;token=abc/x", "ws://h/feed;***/x"),
        ("ws://h/ws/Bearer%20eyJhbGciOi.eyJzdWIiOiIxIn0.c2lnbmF0dXJl", "ws://h/ws/***"),
        ("ws://h/ws/token:eyJhbGciOi.eyJzdWIiOiIxIn0.c2lnbmF0dXJl/x", "ws://h/ws/***/x"),
        ("ws://h/k/" + "q+Z%2Fa8Xc" * 5 + "%3D", "ws://h/k/***"),  # standard base64, its '/' as %2F
        # Kept: what names a resource, and what a person reads.
        ("ws://h/api/v1.2/feed.json", "ws://h/api/v1.2/feed.json"),
        ("ws://h/rooms/chat.example.com/ws", "ws://h/rooms/chat.example.com/ws"),
        ("ws://h/feeds/news.sports.football", "ws://h/feeds/news.sports.football"),
        (
            "ws://h/chats/3f2c9d6e-8a4b-4c1d-9e7f-0a1b2c3d4e5f/ws",
            "ws://h/chats/3f2c9d6e-8a4b-4c1d-9e7f-0a1b2c3d4e5f/ws",
        ),
        ("/ws?token=abc", "/ws?token=***"),
        ("nats://u:pw1@h1:1,nats://u:pw2@h2:2", "nats://***@h1:1,nats://***@h2:2"),
        ("nats://a:1, NATS://u:pw2@h2:2", "nats://a:1,nats://***@h2:2"),
        # A password with a raw '/', '?' or '#': the credentials are not in the netloc.
        ("redis://:Zm9v/YmFyc2VjcmV0@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
        ("nats://u:pa?secret@h:4222", "nats://***@h:4222"),
        ("wss://h/ws?email=a@b.example", "wss://h/ws?email=***"),
        ("ws://h/", "ws://h/"),
    ],
)
def test_a_token_in_the_path_is_redacted_and_an_ordinary_path_is_kept(url: str, expected: str) -> None:
    assert redact_url(url) == expected
