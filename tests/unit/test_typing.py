"""Decorators keep the type of what they decorate (checked by mypy --strict in CI)."""

from __future__ import annotations

from typing import Any

import pytest

import chatfeed
from chatfeed.testing import make_message

client = chatfeed.Client("wss://api.example.com", token="t")
shown: list[str] = []


@client.on("new_message")
async def show(event: chatfeed.NewMessage) -> None:
    shown.append(event.payload.content)


@client.on(chatfeed.NewChat)
def count(event: chatfeed.NewChat) -> None:
    pass


@client.on_error
def report(exc: Exception, event: Any) -> None:
    pass


async def test_decorated_handlers_can_still_be_called_as_written() -> None:
    await show(chatfeed.NewMessage(type="new_message", payload=make_message(content="direct")))
    assert shown == ["direct"]


def test_an_event_name_held_in_a_variable_is_accepted() -> None:
    name: chatfeed.EventName = "new_chat"
    client.on(name)(count)


def test_a_misspelt_event_name_is_a_type_error_and_a_usage_error() -> None:
    # mypy --strict (warn_unused_ignores) fails CI if this line type-checks.
    with pytest.raises(chatfeed.UsageError, match="did you mean 'new_message'"):
        client.on("new_mesage")  # type: ignore[call-overload]


def test_a_payload_class_is_a_type_error_with_a_hint_at_its_event() -> None:
    with pytest.raises(chatfeed.UsageError, match=r"register chatfeed\.NewMessage"):
        client.on(chatfeed.Message)  # type: ignore[arg-type]
    with pytest.raises(chatfeed.UsageError, match=r"register chatfeed\.NewChat"):
        client.on(chatfeed.Chat)  # type: ignore[arg-type]
