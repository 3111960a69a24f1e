"""FeedServer's history over HTTP, on the feed's port, as a backend's REST API serves it."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from chatfeed import Chat, Gap, Message, UsageError
from chatfeed._http_backfill import HistoryError, http_backfill
from chatfeed.testing import FeedServer

from ..conftest import OTHER_TOKEN, SECRET, TOKEN
from .conftest import WAIT, free_port


async def get(
    server: FeedServer, target: str, *, token: str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Send ``GET target`` over a raw HTTP/1.1 connection; return the status, the headers and the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{server.port}"]
        if token is not None:
            lines.append(f"Authorization: Bearer {token}")
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), WAIT)  # the server closes after its answer
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in header_lines)
    assert int(fields["Content-Length"]) == len(body)
    return int(status_line.split()[1]), {name.lower(): value for name, value in fields.items()}, body


def since(moment: datetime) -> str:
    return "/history?" + urllib.parse.urlencode({"since": moment.isoformat()})


def frames(body: bytes) -> list[dict[str, Any]]:
    document = json.loads(body)
    assert isinstance(document, list)
    return document


async def test_history_of_a_user_is_its_chats_and_their_messages_oldest_first_in_camel_case() -> None:
    async with FeedServer(users={TOKEN: "u1", OTHER_TOKEN: "u2"}) as server:
        chat = await server.push_chat(id="c1", user_id="u1", title="mine")
        message = await server.push_message(id="m1", chat_id="c1", audio_url=None, user_id="u1")
        await server.push_chat(id="c2", user_id="u2")
        await server.push_message(id="m2", chat_id="c2", user_id="u2")

        status, headers, body = await get(server, "/history", token=TOKEN)

    assert status == 200
    assert headers["content-type"] == "application/json"
    assert [(frame["type"], frame["payload"]["id"]) for frame in frames(body)] == [
        ("new_chat", "c1"),
        ("new_message", "m1"),
    ]
    chat_frame, message_frame = frames(body)
    assert chat_frame["payload"]["userId"] == "u1"
    assert message_frame["payload"]["chatId"] == "c1"
    assert "audioUrl" in message_frame["payload"]
    # What the frames carry is what was pushed.
    assert Chat.model_validate(chat_frame["payload"]) == chat
    assert Message.model_validate(message_frame["payload"]) == message


async def test_history_for_a_token_of_tokens_is_every_users() -> None:
    async with FeedServer(tokens=["any"], users={TOKEN: "u1"}) as server:
        await server.push_chat(id="c1", user_id="u1")
        await server.push_chat(id="c2", user_id="u2")
        status, _, body = await get(server, "/history", token="any")
    assert status == 200
    assert [frame["payload"]["id"] for frame in frames(body)] == ["c1", "c2"]


async def test_history_since_is_inclusive_and_takes_z_or_an_offset() -> None:
    async with FeedServer(users={TOKEN: "u1"}) as server:
        start = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
        await server.push_chat(id="c1", user_id="u1", created_at=start)
        for minute in range(3):
            await server.push_message(id=f"m{minute}", chat_id="c1", created_at=start + timedelta(minutes=minute))

        at_one = start + timedelta(minutes=1)
        _, _, with_offset = await get(server, since(at_one), token=TOKEN)  # +00:00, percent-encoded
        _, _, with_z = await get(server, "/history?since=2024-05-01T12:01:00Z", token=TOKEN)
        paris = at_one.astimezone(timezone(timedelta(hours=2)))
        _, _, elsewhere = await get(server, since(paris), token=TOKEN)
        _, _, later = await get(server, since(start + timedelta(hours=1)), token=TOKEN)

    expected = ["m1", "m2"]
    for body in (with_offset, with_z, elsewhere):
        assert [frame["payload"]["id"] for frame in frames(body)] == expected
    assert frames(later) == []


async def test_history_answers_401_without_a_valid_token() -> None:
    async with FeedServer(users={TOKEN: "u1"}) as server:
        await server.push_chat(id="c1", user_id="u1")
        answers = [
            await get(server, "/history"),
            await get(server, "/history", token=OTHER_TOKEN),
            await get(server, "/history", headers={"Authorization": f"Basic {TOKEN}"}),
        ]
    for status, headers, body in answers:
        assert status == 401
        assert headers["www-authenticate"].startswith("Bearer")
        assert b"c1" not in body
        assert TOKEN.encode() not in body


async def test_history_answers_400_to_a_bad_since() -> None:
    async with FeedServer(users={TOKEN: "u1"}) as server:
        for value in ("yesterday", "2024-05-01T12:00:00", ""):  # not a time; no timezone; empty
            status, _, body = await get(server, f"/history?since={value}", token=TOKEN)
            assert status == 400, value
            assert b"ISO 8601" in body


async def test_http_requests_leave_the_websocket_side_alone() -> None:
    async with FeedServer(users={TOKEN: "u1"}) as server:
        server.reject_handshakes(503)
        status, _, _ = await get(server, "/history", token=TOKEN)
        assert status == 200
        other, _, _ = await get(server, "/elsewhere", token=TOKEN)
        assert other == 426  # websockets' answer to a request that is no upgrade
        assert server.handshakes == 0
        assert server.received_tokens == []
        assert server._rejections  # still there for the next handshake


# What chatfeed bridge --backfill-url fetches it with


async def test_http_backfill_fetches_a_feeds_gap_with_its_token() -> None:
    async with FeedServer(users={TOKEN: "u1", OTHER_TOKEN: "u2"}) as server:
        start = datetime.now(timezone.utc)
        await server.push_chat(id="c1", user_id="u1", created_at=start - timedelta(minutes=1))
        await server.push_message(id="m1", chat_id="c1", created_at=start)
        await server.push_chat(id="c2", user_id="u2")
        url = f"http://127.0.0.1:{server.port}/history"
        backfill = http_backfill(url, {"first": TOKEN}, lookback=0)
        items = await backfill(Gap(since=start, is_reconnect=True, downtime=1.0, feed="first"))
        everything = await backfill(Gap(since=None, is_reconnect=True, downtime=1.0, feed="first"))
        # By default, from a minute before the gap: what changed just before it too.
        looking_back = await http_backfill(url, {"first": TOKEN})(
            Gap(since=start, is_reconnect=True, downtime=1.0, feed="first")
        )
    assert [(type(item).__name__, item.id) for item in items] == [("Message", "m1")]
    assert [item.id for item in everything] == ["c1", "m1"]
    assert [item.id for item in looking_back] == ["c1", "m1"]


async def test_http_backfill_errors_are_chatfeed_errors_that_never_quote_the_token() -> None:
    async with FeedServer(users={TOKEN: "u1"}) as server:
        url = f"http://127.0.0.1:{server.port}/history"
        gap = Gap(since=None, is_reconnect=True, downtime=1.0, feed="first")
        with pytest.raises(HistoryError) as rejected:
            await http_backfill(url, {"first": OTHER_TOKEN})(gap)
        with pytest.raises(HistoryError) as not_there:
            await http_backfill(f"http://127.0.0.1:{server.port}/elsewhere", lambda feed: TOKEN)(gap)
    with pytest.raises(HistoryError) as unreachable:
        await http_backfill(f"http://127.0.0.1:{free_port()}/history", {"first": TOKEN})(gap)
    assert rejected.value.status_code == 401
    assert not_there.value.status_code == 426
    assert unreachable.value.status_code is None
    for error in (rejected.value, not_there.value, unreachable.value):
        assert SECRET not in str(error)
    with pytest.raises(UsageError, match="no token for feed 'second'"):
        await http_backfill(url, {"first": TOKEN})(Gap(since=None, is_reconnect=True, downtime=1.0, feed="second"))
    with pytest.raises(UsageError, match="http:// or https://"):
        http_backfill("ws://127.0.0.1:1", {"first": TOKEN})
