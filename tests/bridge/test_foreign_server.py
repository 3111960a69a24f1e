"""A chat server written by someone else: the frames reach the log as its wire carried them."""

from __future__ import annotations

import json

from websockets.asyncio.server import ServerConnection

import chatfeed
from chatfeed.bridge import Bridge, Envelope

from ..conftest import SECRET, TOKEN
from ..integration.conftest import raw_server
from ._brokers import Broker, wait_for

# As another backend might write them: a numeric id, a timestamp with an
# offset and milliseconds, a field this version does not know, odd spacing.
FRAMES = [
    '{"type": "auth_success", "payload": {"user": 1}}',
    '{ "type":"new_chat", "payload": {"id": 7, "userId": 1, "title": null,'
    ' "createdAt": "2026-03-14T10:26:52.120+01:00"} }',
    '{"type":"new_message","payload":{"id":1,"chatId":7,"role":"user","content":"Infinity and NaN, in words",'
    '"createdAt":"2026-03-14T10:26:53.000+01:00","mood":"curious"},"seq":1}',
    '{"type":"new_message","payload":{"id":2,"chatId":7,"role":"assistant","content":"hi","precis":"hi",'
    '"audioUrl":null,"fallbackUsed":true,"status":"COMPLETED","createdAt":"2026-03-14T09:26:54Z"}}',
    '{"type":"typing","payload":{"chatId":7}}',
    json.dumps({"type": "error", "message": f"token {TOKEN} expires soon"}),
]


async def test_a_foreign_servers_frames_are_in_the_log_as_sent_and_the_token_is_not(broker: Broker) -> None:
    async def serve(ws: ServerConnection) -> None:
        json.loads(await ws.recv())  # the auth frame
        for frame in FRAMES:
            await ws.send(frame)
        await ws.wait_closed()

    async with raw_server(serve) as server:
        port = server.sockets[0].getsockname()[1]
        pool = chatfeed.Pool(f"ws://127.0.0.1:{port}", compression=None)
        pool.add("user-1", token=TOKEN)
        async with Bridge(pool, broker.sink()) as bridge:
            await wait_for(lambda: bridge.statistics().published == len(FRAMES) - 1, 5)
    entries = await broker.read_log()
    envelopes = sorted((Envelope.decode(entry) for entry in entries), key=lambda envelope: envelope.received)
    by_type: dict[str, list[Envelope]] = {}
    for envelope in envelopes:
        by_type.setdefault(envelope.type, []).append(envelope)

    # Messages and chats: the frame as the wire carried it, byte for byte once parsed.
    for frame in FRAMES[1:4]:
        sent = json.loads(frame)
        matches = [e for e in envelopes if e.frame == sent]
        assert len(matches) == 1, frame
    chat = by_type["new_chat"][0]
    assert (chat.id, chat.chat, chat.feed) == ("7", "7", "user-1")
    first, second = by_type["new_message"]
    assert (first.id, first.chat, first.frame["payload"]["id"]) == ("1", "7", 1)  # the id as sent: a number
    assert first.frame["payload"]["createdAt"] == "2026-03-14T10:26:53.000+01:00"
    assert first.created is not None and first.created.isoformat() == "2026-03-14T09:26:53+00:00"
    assert second.frame["payload"]["fallbackUsed"] is True

    # The unknown frame is kept whole; the error, which quoted the token, is in the log scrubbed.
    assert by_type["typing"][0].frame == {"type": "typing", "payload": {"chatId": 7}}
    error = by_type["error"][0]
    assert error.frame["message"] == "token *** expires soon"
    assert not any(SECRET in entry.decode() for entry in entries)
    assert isinstance(error.event(), chatfeed.ErrorMessage)
