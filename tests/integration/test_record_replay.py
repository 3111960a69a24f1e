"""Recording a live feed and playing it back.

`chatfeed.Recorder` and ``listen --record`` record; `FeedServer.replay` and ``serve --replay`` play back.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import chatfeed
from chatfeed._recording import read_recording
from chatfeed.testing import FeedServer, synthetic_conversation

from ..conftest import OTHER_TOKEN, SECRET, SIGNATURE, TOKEN
from .conftest import WAIT, Recorder, content, make_client
from .test_cli import CLI_WAIT, Command, environment, run, start, write_tokens

pytestmark = pytest.mark.timeout(60)


HEADER = '{"format": "chatfeed-recording", "version": 1}\n'
"""The first line of a recording, written by hand."""


def assert_holds_no_token(path: Path, *tokens: str) -> None:
    """Fail if any byte of ``path`` holds one of ``tokens``, or any run of 8 of its characters."""
    data = path.read_bytes()
    assert SECRET.encode() not in data
    assert SIGNATURE.encode() not in data
    for token in tokens:
        for start_at in range(len(token) - 7):
            assert token[start_at : start_at + 8].encode() not in data, f"{token[start_at : start_at + 8]!r} recorded"


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_recording(path: Path, frames: list[tuple[float, str | bytes]], feed: str | None = None) -> Path:
    """Write a recording by hand: ``frames`` are (seconds since the start, frame)."""
    lines: list[dict[str, Any]] = [{"format": "chatfeed-recording", "version": 1, "url": "ws://example.invalid"}]
    for t, frame in frames:
        line: dict[str, Any] = {"t": t} if feed is None else {"t": t, "feed": feed}
        if isinstance(frame, str):
            line["text"] = frame
        else:
            line["binary"] = base64.b64encode(frame).decode()
        lines.append(line)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def message_frame(content: str, number: int = 1) -> str:
    return json.dumps(
        {
            "type": "new_message",
            "payload": {
                "id": str(number),
                "chatId": "7",
                "role": "assistant",
                "content": content,
                "createdAt": "2025-10-07T12:00:00.000Z",
            },
        }
    )


@pytest.fixture
async def cleanup() -> AsyncIterator[list[Command]]:
    """Kills any command a failing test left running."""
    commands: list[Command] = []
    yield commands
    for command in commands:
        if command.process.returncode is None:
            command.process.kill()
            await command.process.wait()


# The library: chatfeed.Recorder and FeedServer.replay


async def test_a_recording_never_holds_the_token(tmp_path: Path) -> None:
    path = tmp_path / "feed.jsonl"
    got = Recorder()
    async with FeedServer(tokens=[TOKEN]) as server:
        with chatfeed.Recorder(path) as recorder:
            client = make_client(f"{server.url}/feed?token={TOKEN}", observer=recorder)
            client.on("new_message")(got)
            client.on("error")(got)
            client.on("unknown")(got)
            async with client:
                await server.wait_for_clients()
                await server.push_message(content=f"the token is {TOKEN}")
                await server.push_error(f"token {TOKEN[10:40]} is about to expire")
                await server.send_raw(json.dumps({"type": "typing", "payload": {"by": TOKEN}}).encode())
                await got.wait_for(3)
                await server.close_connections(4001, f"session of {TOKEN} replaced")
                await server.wait_for_handshakes(2)
                await server.wait_for_clients()
                await server.push_message(content="after the reconnect")
                await got.wait_for(4)
    assert recorder.frames == 4
    assert_holds_no_token(path, TOKEN)
    header, *frames = lines_of(path)
    assert header["format"] == "chatfeed-recording"
    assert header["url"] == f"{server.url}/feed?token=***"
    assert [json.loads(frame.get("text") or base64.b64decode(frame["binary"]))["type"] for frame in frames] == [
        "new_message",
        "error",
        "typing",
        "new_message",
    ]
    assert "feed" not in frames[0]
    assert "***" in frames[0]["text"]  # the content, scrubbed
    assert [frame["t"] for frame in frames] == sorted(frame["t"] for frame in frames)


async def test_a_replay_gives_a_new_client_the_same_events_in_the_same_order(tmp_path: Path) -> None:
    path = tmp_path / "feed.jsonl"
    sent: list[str | bytes] = [
        message_frame("first", 1),
        '{"type": "new_message", "payload": {"id": "2"}}',  # does not fit: a ProtocolError, dropped
        json.dumps({"type": "typing", "payload": {"chatId": "7"}}),  # a type this version does not know
        json.dumps(
            {
                "type": "new_chat",
                "payload": {
                    "id": "8",
                    "userId": "1",
                    "title": "t",
                    "createdAt": "2025-10-07T12:00:00Z",
                    "updatedAt": "2025-10-07T12:00:00Z",
                },
            }
        ).encode(),
        "not json at all",
        json.dumps({"type": "error", "message": "slow down"}),
        message_frame("last", 3),
    ]

    async def receive(
        server: FeedServer, send: Any, observer: chatfeed.Observer | None = None
    ) -> tuple[list[Any], chatfeed.ClientStatistics]:
        async with make_client(server.url, observer=observer) as client:
            stream = client.events()
            await server.wait_for_clients()
            await send()
            events = [await asyncio.wait_for(anext(stream), WAIT) for _ in range(5)]
            return events, client.statistics()

    async with FeedServer(tokens=[TOKEN]) as live:
        with chatfeed.Recorder(path) as recorder:

            async def push_live() -> None:
                for frame in sent:
                    await live.send_raw(frame)

            recorded, live_statistics = await receive(live, push_live, recorder)
    async with FeedServer(tokens=[TOKEN]) as replaying:
        replayed_count = 0

        async def replay() -> None:
            nonlocal replayed_count
            replayed_count = await replaying.replay(path, speed=float("inf"))

        replayed, replay_statistics = await receive(replaying, replay)
        history = replaying.history()
    assert replayed_count == len(sent)
    assert [event.model_dump() for event in replayed] == [event.model_dump() for event in recorded]
    assert [event.type for event in replayed] == ["new_message", "typing", "new_chat", "error", "new_message"]
    assert replay_statistics.protocol_errors == live_statistics.protocol_errors == 2
    # What a backend would have stored: the messages and the chat that parse.
    assert [(type(item).__name__, item.id) for item in history] == [("Message", "1"), ("Chat", "8"), ("Message", "3")]


async def test_a_replay_keeps_the_recorded_pace_divided_by_speed(tmp_path: Path) -> None:
    path = write_recording(
        tmp_path / "feed.jsonl",
        [
            (5.0, '{"type": "auth_success"}'),  # the server's own handshake: not replayed
            (5.0, message_frame("at 0 s", 1)),
            (6.0, message_frame("at 1 s", 2)),
            (6.5, '{"type": "auth_error", "message": "expired"}'),  # would end the connection: not replayed
            (8.0, message_frame("at 3 s", 3)),
        ],
    )
    got = Recorder()
    arrivals: list[float] = []
    loop = asyncio.get_running_loop()
    async with FeedServer(tokens=[TOKEN]) as server:
        client = make_client(server.url)

        @client.on("new_message")
        def arrived(event: chatfeed.NewMessage) -> None:
            arrivals.append(loop.time())
            got(event)

        async with client:
            await server.wait_for_clients()
            assert await server.replay(path, speed=10) == 3
            await got.wait_for(3)
            assert client.connected
    assert [event.payload.content for event in got.events] == ["at 0 s", "at 1 s", "at 3 s"]
    since_first = [arrival - arrivals[0] for arrival in arrivals]
    # 1 s and 3 s after the first at speed 10: 0.1 s and 0.3 s, never sooner.
    assert since_first[1] >= 0.08
    assert since_first[2] >= 0.27
    assert since_first[2] < 2.0  # not the recorded 3 s


async def test_a_replay_as_fast_as_possible_does_not_wait(tmp_path: Path) -> None:
    path = write_recording(
        tmp_path / "feed.jsonl", [(3600.0 * number, message_frame(str(number), number)) for number in range(5)]
    )
    async with FeedServer(tokens=[TOKEN]) as server, make_client(server.url) as client:
        stream = client.events()
        await server.wait_for_clients()
        await asyncio.wait_for(server.replay(path, speed=float("inf")), WAIT)
        events = [await asyncio.wait_for(anext(stream), WAIT) for _ in range(5)]
    assert [content(event) for event in events] == ["0", "1", "2", "3", "4"]


async def test_a_pool_recording_replays_each_feed_to_its_user(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    users = {TOKEN: "u1", OTHER_TOKEN: "u2"}

    async def pool_receiving(server: FeedServer, recorder: chatfeed.Recorder | None) -> tuple[chatfeed.Pool, Recorder]:
        pool = chatfeed.Pool(server.url, observer=recorder) if recorder else chatfeed.Pool(server.url)
        pool.add("u1", token=TOKEN)
        pool.add("u2", token=OTHER_TOKEN)
        seen = Recorder()
        pool.on("new_message")(lambda event, feed: seen((feed, event.payload.content)))
        return pool, seen

    async with FeedServer(users=users) as live:
        with chatfeed.Recorder(path) as recorder:
            pool, recorded = await pool_receiving(live, recorder)
            async with pool:
                await live.wait_for_clients(2)
                await live.push_message(content="to u1", user_id="u1")
                await live.push_message(content="to u2", user_id="u2")
                await live.push_message(content="to both")
                await recorded.wait_for(4)
    assert_holds_no_token(path, TOKEN, OTHER_TOKEN)
    assert sorted(read_recording(path).feeds) == ["u1", "u2"]

    async with FeedServer(users=users, tokens=["sees-every-feed"]) as server:
        pool, replayed = await pool_receiving(server, None)
        async with pool, make_client(server.url, token="sees-every-feed") as everything:
            stream = everything.events()
            await server.wait_for_clients(3)
            await server.replay(path, speed=float("inf"))
            await replayed.wait_for(4)
            merged = [content(await asyncio.wait_for(anext(stream), WAIT)) for _ in range(4)]
    assert sorted(replayed.events) == sorted(recorded.events)
    assert sorted(merged) == sorted(text for _, text in recorded.events)


# The command line: listen --record, serve --replay


async def test_listen_record_writes_every_frame_and_never_the_token(tmp_path: Path) -> None:
    path = tmp_path / "feed.jsonl"
    async with FeedServer(tokens=[TOKEN]) as server:
        command = await start(
            "listen",
            f"{server.url}?token={TOKEN}",
            "--record",
            str(path),
            "--count",
            "3",
            env=environment(CHATFEED_TOKEN=TOKEN),
        )
        await server.wait_for_clients(timeout=CLI_WAIT)
        await server.push_message(content=f"quoting {TOKEN}")
        await server.push_error(f"token {TOKEN} expired")
        await server.send_raw(json.dumps({"type": "presence", "payload": {"online": True}}))
        status, out, err = await command.finish()
    assert status == 0, err
    assert f"recorded 3 frame(s) to {path}" in err
    assert_holds_no_token(path, TOKEN)
    recording = read_recording(path)
    assert recording.url is not None and recording.url.endswith("?token=***")
    frames = [json.loads(frame.frame) for frame in recording.frames]
    assert [frame["type"] for frame in frames] == ["new_message", "error", "presence"]  # never the auth frame
    assert [json.loads(line)["type"] for line in out.splitlines()] == ["new_message", "error", "presence"]


async def test_listen_record_survives_ctrl_c_mid_stream(tmp_path: Path, cleanup: list[Command]) -> None:
    path = tmp_path / "feed.jsonl"
    async with FeedServer(tokens=[TOKEN]) as server:
        feed = asyncio.ensure_future(server.play(synthetic_conversation(seed=2), rate=300))
        try:
            command = await start(
                "listen",
                server.url,
                "--record",
                str(path),
                env=environment(CHATFEED_TOKEN=TOKEN),
                stdout=asyncio.subprocess.DEVNULL,
            )
            cleanup.append(command)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + CLI_WAIT
            while not path.exists() or path.read_text().count("\n") < 10:  # flushed once, mid-stream
                assert loop.time() < deadline, "nothing recorded"
                await asyncio.sleep(0.05)
            seen = path.read_text().count("\n") - 1  # frames written so far: every line but the header
            command.process.send_signal(signal.SIGINT)
            status, _, err = await command.finish()
        finally:
            feed.cancel()
            await asyncio.wait([feed])
    assert status == 0, err
    assert "Traceback" not in err
    text = path.read_text()
    assert text.endswith("\n")
    recording = read_recording(path)  # every line whole
    assert len(recording.frames) >= seen
    assert f"recorded {len(recording.frames)} frame(s)" in err


async def test_a_pool_recorded_by_listen_is_served_again_feed_by_feed(tmp_path: Path, cleanup: list[Command]) -> None:
    path = tmp_path / "pool.jsonl"
    async with FeedServer(users={TOKEN: "first", OTHER_TOKEN: "second"}) as server:
        tokens = write_tokens(tmp_path / "tokens.jsonl", {"first": TOKEN, "second": OTHER_TOKEN})
        command = await start("listen", server.url, "--tokens", str(tokens), "--record", str(path), "--count", "3")
        await server.wait_for_clients(2, timeout=CLI_WAIT)
        await server.push_message(content="to first", user_id="first")
        await server.push_message(content="to second", user_id="second")
        await server.push_message(content="more to first", user_id="first")
        status, _, err = await command.finish()
    assert status == 0, err
    assert_holds_no_token(path, TOKEN, OTHER_TOKEN)
    recorded = [(frame.feed, json.loads(frame.frame)["payload"]["content"]) for frame in read_recording(path).frames]
    assert sorted(recorded) == [("first", "more to first"), ("first", "to first"), ("second", "to second")]

    # Replayed with a user per feed: `listen --tokens` gets each frame on its feed again.
    new_tokens = tmp_path / "replay-tokens.jsonl"
    serve = await start(
        "serve",
        "--replay",
        str(path),
        "--tokens-file",
        str(new_tokens),
        "--port",
        "0",
        "--speed",
        "max",
        "--exit-when-done",
    )
    cleanup.append(serve)
    url = (await serve.stderr_line_matching(r"serving the recording .* on (ws://[^\s:]+:\d+)")).group(1)
    await serve.stderr_line_matching("the replay starts once every feed has authenticated")
    status, out, err = await run("listen", url, "--tokens", str(new_tokens), "--count", "3", "--format", "jsonl")
    assert status == 0, err
    replayed = [(line["feed"], line["payload"]["content"]) for line in map(json.loads, out.splitlines())]
    assert sorted(replayed) == sorted(recorded)
    serve_status, _, serve_err = await serve.finish()
    assert serve_status == 0, serve_err
    assert "replayed 3 frame(s)" in serve_err


async def test_serve_replay_plays_a_recording_to_listen_at_its_speed(tmp_path: Path, cleanup: list[Command]) -> None:
    path = write_recording(
        tmp_path / "feed.jsonl",
        [(0.0, message_frame("one", 1)), (1.0, '{"type": "typing"}'), (2.0, message_frame("three", 3))],
    )
    serve = await start(
        "serve", "--replay", str(path), "--port", "0", "--token", TOKEN, "--speed", "10", "--exit-when-done"
    )
    cleanup.append(serve)
    url = (await serve.stderr_line_matching(r"serving the recording .* on (ws://[^\s:]+:\d+): 3 frame")).group(1)
    await serve.stderr_line_matching("the replay starts once a client has authenticated")
    loop = asyncio.get_running_loop()
    began = loop.time()
    status, out, err = await run(
        "listen", url, "--count", "3", "--format", "jsonl", env=environment(CHATFEED_TOKEN=TOKEN)
    )
    assert status == 0, err
    assert loop.time() - began >= 0.18  # 2 s recorded, at speed 10
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["type"] for line in lines] == ["new_message", "typing", "new_message"]
    assert [lines[0]["payload"]["content"], lines[2]["payload"]["content"]] == ["one", "three"]
    serve_status, _, serve_err = await serve.finish()
    assert serve_status == 0, serve_err
    assert "replayed 3 frame(s)" in serve_err


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (HEADER + '{"t": 0, "text": "x"}\n{"t": 1, "text": \n', (), "line 3: not JSON"),
        ('{"t": 0, "text": "x"}\n', (), "line 1: not a chatfeed recording"),
        (HEADER + '{"t": -1, "text": "x"}\n', (), 'line 2: "t" must be'),
        (HEADER, ("--speed", "0"), "must be a positive number"),
        (HEADER, ("--loop",), "--loop needs frames"),
        (HEADER + '{"t": 0, "text": "{\\"type\\": \\"auth_success\\"}"}\n', ("--loop",), "--loop needs frames"),
    ],
)
async def test_serve_replay_refuses_a_bad_recording_with_its_line_number(
    tmp_path: Path, content: str, args: tuple[str, ...], message: str
) -> None:
    path = tmp_path / "feed.jsonl"
    path.write_text(content)
    status, out, err = await run("serve", "--replay", str(path), "--port", "0", *args)
    assert status == 2
    assert message in err
    if not args:
        assert err.strip().splitlines() == [f"chatfeed: error: {err.partition('error: ')[2].strip()}"]  # one line
    assert "Traceback" not in err
    assert out == ""


async def test_serve_speed_without_replay_is_a_usage_error() -> None:
    status, _, err = await run("serve", "--port", "0", "--speed", "2")
    assert status == 2
    assert "--speed, --loop and --exit-when-done go with --replay" in err
