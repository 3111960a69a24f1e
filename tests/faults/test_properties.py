"""Arbitrary frames: only ProtocolError escapes parsing, and the receive loop never dies."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.server import ServerConnection

import chatfeed
from chatfeed._dispatch import Dispatcher
from chatfeed._protocol import FeedProtocol

from ..integration.conftest import WAIT, Recorder, make_client, raw_server, running, url_of


async def deliver(dispatcher: Dispatcher, event: Any) -> None:
    """Dispatch ``event`` and wait until it is delivered, as the receive loop does."""
    pending = dispatcher.dispatch(event)
    if pending is not None:
        await pending


KNOWN_TYPES = ["auth_success", "auth_error", "new_message", "new_chat", "error"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
message_fields = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values,
        "chatId": json_values,
        "role": st.sampled_from(["user", "assistant", "tool"]) | json_values,
        "content": json_values,
        "createdAt": st.sampled_from(["2025-10-07T12:00:00.000Z", "yesterday"]) | json_values,
    },
)
frames = st.one_of(
    st.text(max_size=60),
    st.binary(max_size=60),
    json_values.map(json.dumps),
    st.fixed_dictionaries(
        {"type": st.sampled_from(KNOWN_TYPES) | st.text(max_size=12) | json_values},
        optional={"payload": message_fields | json_values, "message": json_values},
    ).map(json.dumps),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(frames, max_size=20), failing=st.sets(st.integers(min_value=0, max_value=19)))
async def test_protocol_and_dispatch_survive_any_frames(batch: list[str | bytes], failing: set[int]) -> None:
    protocol = FeedProtocol()
    protocol.auth_frame("t")
    protocol.receive('{"type": "auth_success"}')
    dispatcher = Dispatcher()
    delivered: list[Any] = []
    calls = 0

    def handler(event: Any) -> None:
        nonlocal calls
        calls += 1
        if calls - 1 in failing:
            raise RuntimeError("handler failure")
        delivered.append(event)

    dispatcher.add_handler(chatfeed.ServerMessage, handler)
    stream = dispatcher.subscribe(buffer=len(batch) + 1)
    events = 0
    for frame in batch:
        try:
            event = protocol.receive(frame)
        except (chatfeed.ProtocolError, chatfeed.AuthenticationError):
            continue
        if event is not None:
            events += 1
            await deliver(dispatcher, event)
    assert calls == events
    assert len(delivered) == events - len(failing & set(range(events)))
    assert stream.pending() == events


def random_frame(rng: random.Random) -> str | bytes:
    """A frame a broken or newer server might send (valid UTF-8 when text)."""
    kind = rng.randrange(6)
    if kind == 0:
        return "".join(rng.choice('{}[]":,abc0123 \\') for _ in range(rng.randrange(40)))
    if kind == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
    if kind == 2:
        # auth_error is left out: mid-session it rightly ends a static-token client.
        kind_name = rng.choice(["auth_success", "new_message", "new_chat", "error"])
        return json.dumps({"type": kind_name, "payload": {"id": rng.random()}})
    if kind == 3:
        return json.dumps({"type": f"future_{rng.randrange(100)}", "payload": [rng.random()]})
    if kind == 4:
        return json.dumps(rng.choice([None, [], 1.5, "text", {"type": None}]))
    return "[" * rng.randrange(1, 5000)


async def test_receive_loop_survives_a_stream_of_garbage_over_the_wire() -> None:
    rng = random.Random(20261126)
    garbage = [random_frame(rng) for _ in range(500)]

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send(json.dumps({"type": "auth_success"}))
        for frame in garbage:
            await ws.send(frame)
        await ws.send(json.dumps({"type": "error", "message": "sentinel"}))
        await ws.wait_closed()

    async with raw_server(handler) as server:
        client = make_client(url_of(server))
        errors, lifecycle = Recorder(), Recorder()
        client.on("error")(errors)
        client.on("disconnected")(lifecycle)
        async with running(client):
            await errors.wait_for(1)
            await asyncio.wait_for(_sentinel(errors), WAIT)
            stats = client.statistics()
    assert lifecycle.events == []
    assert stats.frames_received == len(garbage) + 2  # auth_success and the sentinel too
    assert stats.protocol_errors > 0


async def _sentinel(errors: Recorder) -> None:
    while not any(event.message == "sentinel" for event in errors.events):
        await errors._next_change()
