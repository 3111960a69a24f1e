"""The command line, driven as a user drives it: as a separate process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import pytest

import chatfeed
from chatfeed.testing import FeedServer, synthetic_conversation

from ..conftest import BAD_TOKEN, MS, OTHER_TOKEN, SECRET, TOKEN
from .conftest import WAIT, free_port

CLI_WAIT = 20_000 * MS
"""How long a command may take: starting Python and importing is part of it."""

EVENT_TYPES = ("new_message", "new_chat", "error", "unknown")
"""What ``listen --type`` accepts."""


class Command:
    """A running ``python -m chatfeed ...`` with its output read as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stderr_lines: list[str] = []

    async def stderr_line_matching(self, pattern: str) -> re.Match[str]:
        assert self.process.stderr is not None
        while True:
            raw = await asyncio.wait_for(self.process.stderr.readline(), CLI_WAIT)
            assert raw, f"stderr ended before {pattern!r}: {self.stderr_lines}"
            line = raw.decode().rstrip("\n")
            self.stderr_lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    async def finish(self, timeout: float = CLI_WAIT) -> tuple[int, str, str]:
        stdout, stderr = await asyncio.wait_for(self.process.communicate(), timeout)
        assert self.process.returncode is not None
        err = "\n".join([*self.stderr_lines, stderr.decode()])
        return self.process.returncode, (stdout or b"").decode(), err


def environment(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("CHATFEED_TOKEN", "NO_COLOR")}
    env.update(extra)
    return env


async def start(*args: str, env: dict[str, str] | None = None, stdout: int = asyncio.subprocess.PIPE) -> Command:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chatfeed",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        env=env if env is not None else environment(),
    )
    return Command(process)


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    command = await start(*args, env=env)
    return await command.finish()


async def start_into_a_pipe(*args: str, env: dict[str, str]) -> tuple[Command, BinaryIO]:
    """Start a command whose standard output is a real pipe; return it and the pipe's read end."""
    read_end, write_end = os.pipe()
    try:
        command = await start(*args, env=env, stdout=write_end)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)  # the command holds the only write end now, as in a shell pipeline
    return command, os.fdopen(read_end, "rb", buffering=0)


async def read_one_line_and_hang_up(pipe: BinaryIO) -> str:
    """Read one line from ``pipe``, then close it, as ``head -1`` does."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        return (await asyncio.wait_for(reader.readline(), CLI_WAIT)).decode()
    finally:
        transport.close()


@pytest.fixture
async def command_cleanup() -> AsyncIterator[list[Command]]:
    """Kills any command a failing test left running."""
    commands: list[Command] = []
    yield commands
    for command in commands:
        if command.process.returncode is None:
            command.process.kill()
            await command.process.wait()


class WireTap:
    """What a TCP relay saw a server send.

    Attributes:
        from_server: Every byte the server sent, in order.
        server_ended: How the server's stream ended, once it has: ``"eof"`` (a
            FIN) or ``"reset"`` (an RST).
    """

    def __init__(self) -> None:
        self.from_server = bytearray()
        self.server_ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()


@contextlib.asynccontextmanager
async def wire_tap(upstream_port: int) -> AsyncIterator[tuple[str, WireTap]]:
    """Relay TCP connections to ``upstream_port`` on loopback; yield the relay's URL and what it saw."""
    tap = WireTap()
    relays: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        relays.add(task)
        writers.append(client_writer)
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        writers.append(upstream_writer)
        to_server = asyncio.ensure_future(_copy(client_reader, upstream_writer, bytearray()))
        ended = await _copy(upstream_reader, client_writer, tap.from_server)
        if not tap.server_ended.done():
            tap.server_ended.set_result(ended)
        await to_server
        for writer in (client_writer, upstream_writer):
            writer.close()

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}", tap
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()
        if relays:
            await asyncio.wait(relays, timeout=WAIT)
        await server.wait_closed()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: bytearray) -> str:
    """Copy ``reader`` to ``writer``, and to ``seen``, until the stream ends; return how it ended."""
    while True:
        try:
            chunk = await reader.read(1 << 16)
        except ConnectionResetError:
            writer.transport.abort()
            return "reset"
        if not chunk:
            # Passed on as a half-close, as the peer made it, so that the other
            # direction can still finish.
            if writer.can_write_eof():
                writer.write_eof()
            return "eof"
        seen += chunk
        writer.write(chunk)
        with contextlib.suppress(ConnectionError):
            await writer.drain()


def write_tokens(path: Path, feeds: Mapping[str, str]) -> Path:
    """Write a tokens file for ``listen --tokens``, feed key to token, readable by its owner only."""
    path.write_text("".join(json.dumps({"feed": feed, "token": token}) + "\n" for feed, token in feeds.items()))
    path.chmod(0o600)
    return path


pytestmark = pytest.mark.timeout(60)


# listen


async def test_listen_prints_each_event_as_a_json_line(server: FeedServer) -> None:
    command = await start("listen", server.url, "--count", "3", env=environment(CHATFEED_TOKEN=TOKEN))
    await server.wait_for_clients(timeout=CLI_WAIT)
    sent = await server.push_message(content="hello", chat_id="17")
    chat = await server.push_chat(title="A chat")
    await server.push_error("slow down")
    status, out, err = await command.finish()
    assert status == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["type"] for line in lines] == ["new_message", "new_chat", "error"]
    assert lines[0]["payload"]["chatId"] == "17"  # camelCase, as on the wire
    assert chatfeed.Message.model_validate(lines[0]["payload"]) == sent
    assert chatfeed.Chat.model_validate(lines[1]["payload"]) == chat
    assert lines[2]["message"] == "slow down"
    assert "connected to" in err
    assert SECRET not in out + err


async def test_listen_filters_by_type_and_chat(server: FeedServer) -> None:
    command = await start(
        "listen", server.url, "--type", "new_message", "--chat", "7", "--count", "2", "--token", TOKEN
    )
    await server.wait_for_clients(timeout=CLI_WAIT)
    await server.push_chat(id="7")
    await server.push_message(chat_id="8", content="other chat")
    await server.push_message(chat_id="7", content="first")
    await server.push_error("not a chat event")
    await server.push_message(chat_id="7", content="second")
    status, out, _ = await command.finish()
    assert status == 0
    assert [json.loads(line)["payload"]["content"] for line in out.splitlines()] == ["first", "second"]


async def test_listen_type_unknown_selects_the_types_this_version_does_not_know(server: FeedServer) -> None:
    command = await start("listen", server.url, "--type", "unknown", "--count", "2", "--token", TOKEN)
    await server.wait_for_clients(timeout=CLI_WAIT)
    await server.push_message(content="a known type")
    await server.send_raw(json.dumps({"type": "typing", "payload": {"chatId": "7"}}))
    await server.push_error("a known type too")
    await server.send_raw(json.dumps({"type": "presence", "payload": {"online": True}}))
    status, out, err = await command.finish()
    assert status == 0, err
    assert [json.loads(line)["type"] for line in out.splitlines()] == ["typing", "presence"]


async def test_listen_rejects_an_unknown_type_and_lists_the_valid_ones() -> None:
    status, out, err = await run("listen", "ws://127.0.0.1:1", "--type", "new_mesage", "--token", TOKEN)
    assert status == 2
    assert out == ""
    assert "invalid choice: 'new_mesage'" in err
    listed = err.partition("choose from")[2]
    assert all(name in listed for name in EVENT_TYPES), err
    assert "Traceback" not in err


async def test_listen_pretty_format_without_colour(server: FeedServer) -> None:
    command = await start(
        "listen", server.url, "--format", "pretty", "--count", "1", env=environment(CHATFEED_TOKEN=TOKEN, NO_COLOR="1")
    )
    await server.wait_for_clients(timeout=CLI_WAIT)
    await server.push_message(chat_id="17", role="assistant", content="Hi there", precis="greeting", fallback_used=True)
    status, out, _ = await command.finish()
    assert status == 0
    assert re.fullmatch(r"\d\d:\d\d:\d\d \[chat 17\] assistant: Hi there \(precis: greeting; audio; fallback\)\n", out)
    assert "\x1b[" not in out


async def test_listen_reports_state_changes_on_stderr(server: FeedServer, command_cleanup: list[Command]) -> None:
    command = await start("listen", server.url, env=environment(CHATFEED_TOKEN=TOKEN))
    command_cleanup.append(command)
    await command.stderr_line_matching("connected to")
    await server.close_connections(1012, "restarting")
    await command.stderr_line_matching(r"reconnecting in [0-9.]+ s")
    await command.stderr_line_matching("reconnected to")
    command.process.send_signal(signal.SIGINT)
    status, out, err = await command.finish()
    assert status == 0
    assert out == ""
    assert "1012" in err


async def test_listen_exits_0_on_ctrl_c(server: FeedServer, command_cleanup: list[Command]) -> None:
    command = await start("listen", server.url, env=environment(CHATFEED_TOKEN=TOKEN))
    command_cleanup.append(command)
    await server.wait_for_clients(timeout=CLI_WAIT)
    command.process.send_signal(signal.SIGINT)
    status, _, err = await command.finish()
    assert status == 0
    assert "Traceback" not in err
    await server.wait_for_clients(0, timeout=WAIT)


async def test_listen_exits_0_at_once_when_the_reader_of_its_output_goes_away(
    server: FeedServer, command_cleanup: list[Command]
) -> None:
    feed = asyncio.ensure_future(server.play(synthetic_conversation(seed=1), rate=50))
    try:
        command, output = await start_into_a_pipe("listen", server.url, env=environment(CHATFEED_TOKEN=TOKEN))
        command_cleanup.append(command)
        first = await read_one_line_and_hang_up(output)
        status, _, err = await command.finish(timeout=WAIT)  # while events keep coming
    finally:
        feed.cancel()
        await asyncio.wait([feed])
    assert json.loads(first)["type"] in {"new_chat", "new_message"}
    assert status == 0, err
    assert "Traceback" not in err
    assert "BrokenPipeError" not in err


async def test_listen_with_a_rejected_token_exits_3(server: FeedServer) -> None:
    status, out, err = await run("listen", server.url, env=environment(CHATFEED_TOKEN=BAD_TOKEN))
    assert status == 3
    assert out == ""
    assert err.count("authentication failed") == 1, err  # said once, with what to do about it
    assert "authentication failed: Invalid token" in err
    assert "CHATFEED_TOKEN" in err  # what to try
    assert SECRET not in err
    assert server.handshakes == 1


async def test_listen_to_an_unreachable_server_without_reconnect_exits_4() -> None:
    status, _, err = await run("listen", f"ws://127.0.0.1:{free_port()}", "--no-reconnect", "--token", TOKEN)
    assert status == 4
    assert "cannot reach the feed" in err
    assert "Is the server running" in err


async def test_listen_gives_up_after_max_attempts_with_4() -> None:
    status, _, err = await run(
        "listen", f"ws://127.0.0.1:{free_port()}", "--max-attempts", "2", env=environment(CHATFEED_TOKEN=TOKEN)
    )
    assert status == 4
    assert len(re.findall("reconnecting in", err)) == 1
    assert err.count("could not connect") == 2, err  # once per attempt
    assert "cannot reach the feed" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "the following arguments are required: url"),
        (("ws://127.0.0.1:1", "--count", "0"), "must be at least 1"),
        (("ws://127.0.0.1:1", "--format", "xml"), "invalid choice"),
        (("ws://127.0.0.1:1",), "no token"),
        (("http://127.0.0.1:1", "--token", TOKEN), "ws:// or wss://"),
    ],
)
async def test_listen_bad_usage_exits_2(args: Sequence[str], message: str) -> None:
    status, out, err = await run("listen", *args)
    assert status == 2
    assert out == ""
    assert message in err
    assert "Traceback" not in err


async def test_listen_help_recommends_the_environment_variable() -> None:
    status, out, _ = await run("listen", "--help")
    assert status == 0
    assert "CHATFEED_TOKEN" in out
    assert "visible" in out


async def test_listen_help_lists_the_event_types() -> None:
    status, out, _ = await run("listen", "--help")
    assert status == 0
    help_of_type = " ".join(out.partition("\n  --type TYPE")[2].partition("\n  --chat")[0].split())
    assert all(name in help_of_type for name in EVENT_TYPES), help_of_type
    assert "unknown (any type this version of chatfeed does not know)" in help_of_type


# listen --tokens


@pytest.fixture
async def users_server() -> AsyncIterator[FeedServer]:
    async with FeedServer(users={TOKEN: "u1", OTHER_TOKEN: "u2"}) as server:
        yield server


async def test_listen_with_tokens_marks_each_event_with_its_feed(users_server: FeedServer, tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.jsonl", {"first": TOKEN, "second": OTHER_TOKEN})
    command = await start("listen", users_server.url, "--tokens", str(tokens), "--count", "3")
    await users_server.wait_for_clients(2, timeout=CLI_WAIT)
    await users_server.push_message(content="to u1", user_id="u1")
    await users_server.push_chat(title="a chat of u2", user_id="u2")
    await users_server.push_message(content="to u2", user_id="u2")
    status, out, err = await command.finish()
    assert status == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert all(next(iter(line)) == "feed" for line in lines)  # first, then the frame as on the wire
    by_feed = {
        (line["feed"], line["type"], line["payload"].get("content") or line["payload"]["title"]) for line in lines
    }
    assert by_feed == {
        ("first", "new_message", "to u1"),
        ("second", "new_chat", "a chat of u2"),
        ("second", "new_message", "to u2"),
    }
    assert "connecting 2 feeds" in err
    assert SECRET not in out + err


async def test_listen_with_tokens_pretty_format_starts_each_line_with_the_feed(
    users_server: FeedServer, tmp_path: Path
) -> None:
    tokens = write_tokens(tmp_path / "tokens.jsonl", {"first": TOKEN, "second-feed": OTHER_TOKEN})
    command = await start(
        "listen", users_server.url, "--tokens", str(tokens), "--format", "pretty", "--count", "1",
        env=environment(NO_COLOR="1"),
    )  # fmt: skip
    await users_server.wait_for_clients(2, timeout=CLI_WAIT)
    await users_server.push_message(chat_id="17", role="user", content="Hi", precis=None, audio_url=None, user_id="u1")
    status, out, _ = await command.finish()
    assert status == 0
    # Padded to the longest key, so that the lines of every feed line up.
    assert re.fullmatch(r"first       \| \d\d:\d\d:\d\d \[chat 17\] user: Hi\n", out), out


async def test_listen_with_tokens_reports_a_rejected_feed_and_the_others_go_on(
    users_server: FeedServer, tmp_path: Path, command_cleanup: list[Command]
) -> None:
    tokens = write_tokens(tmp_path / "tokens.jsonl", {"good": TOKEN, "bad": BAD_TOKEN})
    command = await start("listen", users_server.url, "--tokens", str(tokens), "--count", "1")
    command_cleanup.append(command)
    await command.stderr_line_matching(r"^chatfeed: feed bad stopped: authentication failed: Invalid token$")
    await command.stderr_line_matching(r"1 of 2 feeds up, 1 stopped")
    await users_server.push_message(content="still here", user_id="u1")
    status, out, err = await command.finish()
    assert status == 0, err
    line = json.loads(out)
    assert (line["feed"], line["payload"]["content"]) == ("good", "still here")
    assert SECRET not in out + err


async def test_listen_with_tokens_verbose_reports_each_feeds_connections(
    users_server: FeedServer, tmp_path: Path, command_cleanup: list[Command]
) -> None:
    tokens = write_tokens(tmp_path / "tokens.jsonl", {"first": TOKEN, "second": OTHER_TOKEN})
    command = await start("listen", users_server.url, "--tokens", str(tokens), "-v")
    command_cleanup.append(command)
    await command.stderr_line_matching("2 of 2 feeds up")
    await users_server.close_connections(1012, "restarting")
    await command.stderr_line_matching(r"feed (first|second): connection lost \(code 1012\); reconnecting in")
    await command.stderr_line_matching(r"feed (first|second): reconnected after [0-9.]+ s away")
    await command.stderr_line_matching(r"2 of 2 feeds up; [12] reconnections?$")
    command.process.send_signal(signal.SIGINT)
    status, out, err = await command.finish()
    assert status == 0
    assert out == ""
    assert "feed first: connected" in err
    assert "feed second: connected" in err
    assert SECRET not in err


async def test_listen_with_tokens_exits_3_when_every_token_is_rejected(server: FeedServer, tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.jsonl", {"a": BAD_TOKEN, "b": BAD_TOKEN + "2"})
    status, out, err = await run("listen", server.url, "--tokens", str(tokens))
    assert status == 3, err
    assert out == ""
    assert "feed a stopped: authentication failed" in err
    assert "feed b stopped: authentication failed" in err
    assert "every feed's token was rejected" in err
    assert SECRET not in err


async def test_listen_with_tokens_exits_4_when_every_feed_gives_up(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.jsonl", {"a": TOKEN, "b": OTHER_TOKEN})
    status, _, err = await run("listen", f"ws://127.0.0.1:{free_port()}", "--tokens", str(tokens), "--no-reconnect")
    assert status == 4
    assert err.count("stopped: could not connect") == 2, err
    assert "Is the server running" in err


A_FEED = json.dumps({"feed": "a", "token": TOKEN})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (f"{A_FEED}\n\n{A_FEED[:-1]}\n", ", line 3: not JSON"),
        (json.dumps([TOKEN]), ', line 1: expected an object, {"feed": "<key>", "token": "<jwt>"}'),
        (json.dumps({"feed": "a", "tokn": TOKEN}), ', line 1: "token" must be a non-empty string'),
        (json.dumps({"feed": "", "token": TOKEN}), ', line 1: "feed" must be a non-empty string'),
        (A_FEED + "\n" + json.dumps({"feed": "a", "token": OTHER_TOKEN}), ", line 2: feed 'a' is already on line 1"),
        ("\n  \n", " has no feeds"),
    ],
)
async def test_listen_with_a_malformed_tokens_file_exits_2_without_quoting_a_token(
    tmp_path: Path, content: str, message: str
) -> None:
    tokens = tmp_path / "tokens.jsonl"
    tokens.write_text(content)
    tokens.chmod(0o600)
    status, out, err = await run("listen", "ws://127.0.0.1:1", "--tokens", str(tokens))
    assert status == 2
    assert out == ""
    assert f"chatfeed: error: {tokens}{message}" in err, err
    assert SECRET not in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--tokens", TOKEN), "cannot read the file given to --tokens: No such file or directory"),
        (("--tokens", "tokens.jsonl", "--token", TOKEN), "not allowed with argument"),
        (("--token", TOKEN, "--connect-rate", "10"), "--connect-rate goes with --tokens"),
        (("--tokens", "tokens.jsonl", "--connect-rate", "0"), "must be a positive number"),
    ],
)
async def test_listen_bad_usage_of_tokens_exits_2_without_quoting_a_token(args: Sequence[str], message: str) -> None:
    status, out, err = await run("listen", "ws://127.0.0.1:1", *args)
    assert status == 2
    assert out == ""
    assert message in err
    assert SECRET not in err


async def test_listen_warns_about_a_tokens_file_others_can_read(server: FeedServer, tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.jsonl", {"a": BAD_TOKEN})
    tokens.chmod(0o644)
    status, _, err = await run("listen", server.url, "--tokens", str(tokens))
    assert status == 3
    assert f"other users of this machine can read {tokens}" in err


# serve


async def test_serve_pushes_a_synthetic_conversation(command_cleanup: list[Command]) -> None:
    command = await start("serve", "--port", "0", "--rate", "50", "--seed", "3")
    command_cleanup.append(command)
    url = (await command.stderr_line_matching(r"serving the chat feed on (ws://\S+)")).group(1)
    token = (await command.stderr_line_matching(r"token: (\S+)")).group(1)
    client = chatfeed.Client(url, token=token)
    async with client:
        stream = client.events()
        events = [await asyncio.wait_for(anext(stream), WAIT) for _ in range(8)]
    kinds = {event.type for event in events}
    assert kinds == {"new_chat", "new_message"}
    messages = [event.payload for event in events if isinstance(event, chatfeed.NewMessage)]
    assert {message.role for message in messages} == {chatfeed.Role.USER, chatfeed.Role.ASSISTANT}
    answers = [message for message in messages if message.role is chatfeed.Role.ASSISTANT]
    assert all(message.precis and message.audio_url for message in answers)
    command.process.send_signal(signal.SIGINT)
    status, _, err = await command.finish()
    assert status == 0, err
    assert "Traceback" not in err


async def test_serve_accepts_only_the_given_tokens(command_cleanup: list[Command]) -> None:
    port = free_port()
    command = await start("serve", "--port", str(port), "--token", TOKEN, "--token", "second-token")
    command_cleanup.append(command)
    await command.stderr_line_matching("serving the chat feed")
    async with chatfeed.Client(f"ws://127.0.0.1:{port}", token="second-token") as client:
        assert client.connected
    with pytest.raises(chatfeed.AuthenticationError):
        await asyncio.wait_for(chatfeed.Client(f"ws://127.0.0.1:{port}", token=BAD_TOKEN).run(), WAIT)
    command.process.send_signal(signal.SIGTERM)
    status, _, err = await command.finish()
    assert status == 0
    assert "token:" not in err  # nothing generated, nothing printed


async def test_serve_users_gives_each_user_a_token_in_the_file_and_a_conversation_of_its_own(
    tmp_path: Path, command_cleanup: list[Command]
) -> None:
    tokens_file = tmp_path / "tokens.jsonl"
    tokens_file.write_text("tokens of an earlier run\n")
    tokens_file.chmod(0o644)
    command = await start("serve", "--users", "2", "--tokens-file", str(tokens_file), "--port", "0", "--rate", "100")
    command_cleanup.append(command)
    url = (await command.stderr_line_matching(r"serving the chat feed on (ws://\S+) to 2 user")).group(1)
    await command.stderr_line_matching(r"their tokens are in")
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600
    entries = [json.loads(line) for line in tokens_file.read_text().splitlines()]
    assert [entry["feed"] for entry in entries] == ["user-1", "user-2"]
    tokens = [entry["token"] for entry in entries]
    assert len(set(tokens)) == 2

    async def receive(token: str) -> list[chatfeed.FeedEvent]:
        async with chatfeed.Client(url, token=token) as client:
            stream = client.events()
            return [await asyncio.wait_for(anext(stream), WAIT) for _ in range(16)]

    received = dict(zip(("user-1", "user-2"), await asyncio.gather(*map(receive, tokens)), strict=True))
    chats = {
        user: {event.payload.id for event in events if isinstance(event, chatfeed.NewChat)}
        for user, events in received.items()
    }
    for user, events in received.items():
        other = "user-2" if user == "user-1" else "user-1"
        assert {event.payload.user_id for event in events if isinstance(event, chatfeed.NewChat)} == {user}
        messages = [event.payload for event in events if isinstance(event, chatfeed.NewMessage)]
        assert messages
        assert not {message.chat_id for message in messages} & chats[other]
        # A message after one of its chats is in it.
        first_chat = next(index for index, event in enumerate(events) if isinstance(event, chatfeed.NewChat))
        later = [event.payload for event in events[first_chat:] if isinstance(event, chatfeed.NewMessage)]
        assert {message.chat_id for message in later} <= chats[user]
    assert not chats["user-1"] & chats["user-2"]  # ids unique over every user
    command.process.send_signal(signal.SIGINT)
    status, out, err = await command.finish()
    assert status == 0, err
    assert not any(token in out + err for token in tokens)


async def test_serve_users_and_listen_tokens_make_a_pool_in_two_commands(
    tmp_path: Path, command_cleanup: list[Command]
) -> None:
    tokens_file = tmp_path / "tokens.jsonl"
    server = await start("serve", "--users", "3", "--tokens-file", str(tokens_file), "--port", "0", "--rate", "20")
    command_cleanup.append(server)
    url = (await server.stderr_line_matching(r"serving the chat feed on (ws://\S+)")).group(1)
    await server.stderr_line_matching(r"their tokens are in")
    status, out, err = await run("listen", url, "--tokens", str(tokens_file), "--format", "json", "--count", "12")
    assert status == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 12
    assert {line["feed"] for line in lines} <= {"user-1", "user-2", "user-3"}
    assert all(line["payload"]["userId"] == line["feed"] for line in lines if line["type"] == "new_chat")
    server.process.send_signal(signal.SIGINT)
    serve_status, serve_out, serve_err = await server.finish()
    assert serve_status == 0
    tokens = [json.loads(line)["token"] for line in tokens_file.read_text().splitlines()]
    assert not any(token in out + err + serve_out + serve_err for token in tokens)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--users", "2"), "--users needs --tokens-file"),
        (("--tokens-file", "FILE"), "--tokens-file goes with --users"),
        (("--users", "2", "--token", TOKEN, "--tokens-file", "FILE"), "not allowed with argument"),
        (("--users", "0", "--tokens-file", "FILE"), "must be at least 1"),
    ],
)
async def test_serve_bad_usage_of_users_exits_2(args: Sequence[str], message: str, tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.jsonl"
    status, _, err = await run("serve", "--port", "0", *(str(tokens_file) if arg == "FILE" else arg for arg in args))
    assert status == 2
    assert message in err
    assert not tokens_file.exists()


async def test_serve_on_a_busy_port_says_so() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        status, _, err = await run("serve", "--port", str(busy.getsockname()[1]))
    assert status == 2
    assert "cannot listen on" in err


# demo and the entry points


async def test_demo_shows_events_and_a_reconnect_with_a_backfill_then_a_summary() -> None:
    status, out, err = await run("demo", "--duration", "2", env=environment(NO_COLOR="1"))
    assert status == 0, err
    assert re.search(r"\[chat \d+\] (user|assistant): ", out)
    assert "reconnected after" in err
    summary = err.strip().splitlines()[-1]
    match = re.fullmatch(
        r"chatfeed: demo done: (\d+) events received \((\d+) from backfill\), 1 reconnect\(s\), [0-9.]+ s away", summary
    )
    assert match, summary
    received, backfilled = int(match.group(1)), int(match.group(2))
    # The feed went on while the server was down: what it pushed meanwhile came from the backfill.
    assert 0 < backfilled < received
    lines = out.splitlines()
    assert len(lines) == received
    marked = [line for line in lines if line.endswith(("; backfill)", "(backfill)"))]
    assert len(marked) == backfilled, out
    # Each event shown once: the backfill fetched from the last event delivered, which dedupe dropped.
    shown = [line.split(" ", 1)[1].replace("; backfill)", ")").removesuffix(" (backfill)") for line in lines]
    assert len(set(shown)) == len(shown), out


async def test_demo_stops_when_the_reader_of_its_output_goes_away(command_cleanup: list[Command]) -> None:
    command, output = await start_into_a_pipe("demo", "--duration", "600", env=environment(NO_COLOR="1"))
    command_cleanup.append(command)
    first = await read_one_line_and_hang_up(output)
    status, _, err = await command.finish(timeout=WAIT)
    assert re.match(r"\d\d:\d\d:\d\d ", first)
    assert status == 0, err
    assert "Traceback" not in err


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("chatfeed")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=CLI_WAIT, check=False)
    assert result.returncode == 0
    assert result.stdout.strip() == f"chatfeed {chatfeed.__version__}"


async def test_serve_works_for_a_front_end_written_from_the_guide(command_cleanup: list[Command]) -> None:
    node = shutil.which("node")
    assert node, "Node.js is needed to run a browser-style WebSocket client"
    command = await start("serve", "--port", "0", "--rate", "50")
    command_cleanup.append(command)
    port = int((await command.stderr_line_matching(r"serving the chat feed on ws://\S+:(\d+)")).group(1))
    token = (await command.stderr_line_matching(r"token: (\S+)")).group(1)
    async with wire_tap(port) as (url, tap):
        front_end = await asyncio.create_subprocess_exec(
            node,
            "--experimental-websocket",
            "--no-warnings",
            str(Path(__file__).with_name("js") / "guide_client.mjs"),
            url,
            token,
            "6",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(front_end.communicate(), CLI_WAIT)
        finally:
            if front_end.returncode is None:
                front_end.kill()
                await front_end.wait()
        server_ended = await asyncio.wait_for(asyncio.shield(tap.server_ended), WAIT)
    assert front_end.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0] == "authenticated"
    events = lines[1:7]
    assert all(re.fullmatch(r"new_message \d+ (user|assistant)|new_chat \d+ 1", line) for line in events), events
    assert {"user", "assistant"} <= {line.split()[-1] for line in events}
    # The guide's client closes without a code. The server's part of the
    # closing handshake is checked on the wire: an empty close frame (FIN bit
    # and opcode 8, no payload) as its last bytes, then a clean end of stream.
    assert tap.from_server.endswith(b"\x88\x00"), bytes(tap.from_server[-16:])
    assert server_ended == "eof"
    # The code Node reports is not the server's doing. Node's WebSocket
    # (undici) inflates permessage-deflate frames on its thread pool; when the
    # server's FIN is handled before a close frame that waits behind a frame
    # still inflating, it reports 1006, as if no close frame had come. Under CPU
    # load that happens, so 1006 here says nothing about the server, whose
    # part the two assertions above check.
    assert lines[7:] in (["closed 1005"], ["closed 1006"])
    command.process.send_signal(signal.SIGINT)
    status, _, _ = await command.finish()
    assert status == 0
