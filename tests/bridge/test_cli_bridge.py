"""``chatfeed bridge`` and ``chatfeed consume``, run as a user runs them: separate processes, real brokers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
import redis.asyncio

from chatfeed.bridge import Envelope
from chatfeed.bridge.testing import NatsServer, RedisServer
from chatfeed.testing import FeedServer

from ..conftest import BAD_TOKEN, MS, OTHER_TOKEN, SECRET, TOKEN
from ..integration.conftest import free_port

WAIT = 10_000 * MS
"""How long a test waits for a command to do something: starting Python and importing is part of it."""

SUMMARY = re.compile(r"bridged: (\d+) received, (\d+) published, (\d+) duplicates, (\d+) held")


class Command:
    """A running ``python -m chatfeed ...`` whose output lines are read as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.out: list[str] = []
        self.err: list[str] = []
        self._changed = asyncio.Event()
        assert process.stdout is not None and process.stderr is not None
        self._readers = [
            asyncio.ensure_future(self._read(process.stdout, self.out)),
            asyncio.ensure_future(self._read(process.stderr, self.err)),
        ]

    async def _read(self, stream: asyncio.StreamReader, lines: list[str]) -> None:
        while raw := await stream.readline():
            lines.append(raw.decode().rstrip("\n"))
            self._changed.set()
        self._changed.set()

    async def wait_until(self, predicate: Callable[[], bool], what: str) -> None:
        """Wait until ``predicate()`` holds, checked whenever the command writes a line."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while not predicate():
            if all(reader.done() for reader in self._readers):
                raise AssertionError(f"the command ended before {what}: {self.err}")
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"not within {WAIT:g} s: {what}; stderr: {self.err}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def stderr_matching(self, pattern: str) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def matched() -> bool:
            found[:] = [match for line in self.err if (match := re.search(pattern, line))][:1]
            return bool(found)

        await self.wait_until(matched, f"a line of stderr matching {pattern!r}")
        return found[0]

    async def finish(self, signum: int | None = None) -> tuple[int, str, str]:
        """Send ``signum`` (if any), wait for the exit; return the status, stdout and stderr."""
        if signum is not None:
            self.process.send_signal(signum)
        status = await asyncio.wait_for(self.process.wait(), WAIT)
        await asyncio.wait_for(asyncio.gather(*self._readers), WAIT)
        return status, "\n".join(self.out), "\n".join(self.err)

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)


@pytest.fixture
async def commands() -> AsyncIterator[Callable[..., Any]]:
    """Starts commands; kills those a failing test left running."""
    started: list[Command] = []

    async def start(*args: str) -> Command:
        environment = {key: value for key, value in os.environ.items() if key not in ("CHATFEED_TOKEN", "NO_COLOR")}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "chatfeed",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=environment,
        )
        command = Command(process)
        started.append(command)
        return command

    yield start
    for command in started:
        await command.kill()


# The brokers, and the log as a test reads it


@dataclass
class Broker:
    """A broker of the session, with names of this test's own, and a way to read what the bridge stored."""

    kind: str
    url: str
    options: tuple[str, ...]
    read: Callable[[], Any]  # async () -> list[Envelope], in log order per chat

    async def log(self) -> list[Envelope]:
        envelopes: list[Envelope] = await self.read()
        return envelopes

    async def watermarks(self) -> set[str]:
        """The feeds whose watermark is saved (in this test's own stream's bucket, or under its Redis prefix)."""
        if self.kind == "redis":
            client = redis.asyncio.from_url(self.url)
            try:
                keys = await client.hkeys(f"{self.options[1]}:watermarks")
            finally:
                await client.aclose()
            return {key.decode() if isinstance(key, bytes) else key for key in keys}
        client_ = await nats.connect(self.url, allow_reconnect=False)
        try:
            kv = await client_.jetstream().key_value(f"{self.options[1]}-watermarks")  # the stream's own bucket
            try:
                return set(await kv.keys())
            except nats.js.errors.NoKeysError:
                return set()
        finally:
            await client_.close()


def unique() -> str:
    return secrets.token_hex(4)


@pytest.fixture(params=["nats", "redis"])
def broker(request: pytest.FixtureRequest) -> Broker:
    tag = unique()
    if request.param == "nats":
        server: NatsServer = request.getfixturevalue("nats_session")
        stream, prefix = f"T_{tag}", f"t{tag}"

        async def read_nats() -> list[Envelope]:
            client = await nats.connect(server.url, allow_reconnect=False)
            try:
                js = client.jetstream()
                try:
                    state = (await js.stream_info(stream)).state
                except nats.js.errors.NotFoundError:
                    return []
                return [
                    Envelope.decode((await js.get_msg(stream, sequence)).data or b"")
                    for sequence in range(state.first_seq, state.last_seq + 1)
                    if state.messages
                ]
            finally:
                await client.close()

        return Broker("nats", server.url, ("--stream", stream, "--prefix", prefix), read_nats)

    redis_server: RedisServer = request.getfixturevalue("redis_session")
    prefix, partitions = f"t{tag}", 4

    async def read_redis() -> list[Envelope]:
        client = redis.asyncio.from_url(redis_server.url)
        try:
            envelopes = []
            for index in range(partitions):
                entries: list[tuple[bytes, dict[bytes, bytes]]] = await client.xrange(f"{prefix}:{{{index}}}")  # type: ignore[assignment]
                envelopes += [Envelope.decode(fields[b"envelope"]) for _, fields in entries]
            return envelopes
        finally:
            await client.aclose()

    return Broker("redis", redis_server.url, ("--prefix", prefix, "--partitions", str(partitions)), read_redis)


async def wait_for_log(broker: Broker, predicate: Callable[[list[Envelope]], bool], what: str) -> list[Envelope]:
    """Read the log until ``predicate`` holds of it, for up to `WAIT`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        log = await broker.log()
        if predicate(log):
            return log
        if loop.time() > deadline:
            raise AssertionError(f"not within {WAIT:g} s: {what}; the log has {len(log)} entries")
        await asyncio.sleep(20 * MS)  # the log is another process's: polled


def write_tokens(path: Path, lines: Mapping[str, str] | list[str]) -> Path:
    if isinstance(lines, Mapping):
        lines = [json.dumps({"feed": feed, "token": token}) for feed, token in lines.items()]
    path.write_text("".join(line + "\n" for line in lines))
    path.chmod(0o600)
    return path


@pytest.fixture
async def users_server() -> AsyncIterator[FeedServer]:
    async with FeedServer(users={TOKEN: "u1", OTHER_TOKEN: "u2"}) as server:
        yield server


def identities(log: list[Envelope]) -> list[tuple[str, str, str | None]]:
    return [(envelope.feed, envelope.type, envelope.id) for envelope in log]


# Tests


async def test_bridge_then_consume_prints_what_was_published(
    broker: Broker, users_server: FeedServer, commands: Callable[..., Any], tmp_path: Path
) -> None:
    first, second = f"first-{unique()}", f"second-{unique()}"
    tokens = write_tokens(tmp_path / "tokens.jsonl", {first: TOKEN, second: OTHER_TOKEN})
    bridge = await commands("bridge", users_server.url, "--tokens", str(tokens), "--to", broker.url, *broker.options)
    await bridge.stderr_matching(r"^chatfeed: 2 of 2 feeds up$")
    assert any(line.startswith("chatfeed: bridging 2 feeds from ws://") for line in bridge.err)

    await users_server.push_chat(id="c1", user_id="u1", title="first's chat")
    await users_server.push_message(id="m1", chat_id="c1", content="to first", user_id="u1")
    await users_server.push_chat(id="c2", user_id="u2")
    await users_server.push_message(id="m2", chat_id="c2", user_id="u2")
    await users_server.push_message(id="m3", chat_id="c1", user_id="u1")
    log = await wait_for_log(broker, lambda log: len(log) >= 5, "5 events in the log")

    consume = await commands("consume", broker.url, "--durable", "cli", *broker.options)
    await consume.wait_until(lambda: len(consume.out) >= 5, "5 lines printed")
    status, out, err = await consume.finish(signal.SIGTERM)
    assert status == 0, err
    printed = [json.loads(line) for line in out.splitlines()]
    assert all(list(line)[:3] == ["feed", "type", "payload"] for line in printed)  # as listen prints them
    assert sorted((line["feed"], line["type"], line["payload"]["id"]) for line in printed) == sorted(identities(log))
    message = next(line for line in printed if line["payload"]["id"] == "m1")
    assert (message["feed"], message["payload"]["chatId"], message["payload"]["content"]) == (first, "c1", "to first")

    # Acknowledged once printed: the durable has nothing more to give.
    again = await commands("consume", broker.url, "--durable", "cli", *broker.options)
    await again.stderr_matching(r"^chatfeed: consuming ")
    await users_server.push_message(id="m4", chat_id="c2", user_id="u2")
    await again.wait_until(lambda: len(again.out) >= 1, "the new event printed")
    status, out, _ = await again.finish(signal.SIGINT)
    assert status == 0
    assert [json.loads(line)["payload"]["id"] for line in out.splitlines()] == ["m4"]

    status, _, err = await bridge.finish(signal.SIGTERM)
    assert status == 0, err
    summary = SUMMARY.search(err.splitlines()[-1])
    assert summary is not None, err
    assert summary.groups() == ("6", "6", "0", "0")
    assert SECRET not in out + err + "".join(consume.err)


async def test_bridge_reports_a_malformed_line_and_a_rejected_token_and_bridges_the_other_feeds(
    broker: Broker, users_server: FeedServer, commands: Callable[..., Any], tmp_path: Path
) -> None:
    good, bad = f"good-{unique()}", f"bad-{unique()}"
    tokens = write_tokens(
        tmp_path / "tokens.jsonl",
        [
            json.dumps({"feed": good, "token": TOKEN}),
            json.dumps({"feed": "broken", "token": OTHER_TOKEN})[:-2],  # cut short: not JSON
            json.dumps({"feed": bad, "token": BAD_TOKEN}),
        ],
    )
    bridge = await commands("bridge", users_server.url, "--tokens", str(tokens), "--to", broker.url, *broker.options)
    await bridge.stderr_matching(rf"^chatfeed: {re.escape(str(tokens))}, line 2: not JSON .*; skipped, the other")
    await bridge.stderr_matching(rf"^chatfeed: feed {bad} stopped: authentication failed: Invalid token$")
    await bridge.stderr_matching(r"^chatfeed: 1 of 2 feeds up, 1 stopped$")

    await users_server.push_chat(id="c1", user_id="u1")
    await users_server.push_message(id="m1", chat_id="c1", user_id="u1")
    log = await wait_for_log(broker, lambda log: len(log) >= 2, "the good feed's events in the log")
    status, out, err = await bridge.finish(signal.SIGINT)
    assert status == 0, err
    assert identities(log) == [(good, "new_chat", "c1"), (good, "new_message", "m1")]
    assert out == ""
    assert SECRET not in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["bridge", "consume"])
@pytest.mark.parametrize("scheme", ["nats", "redis"])
async def test_an_unreachable_broker_is_one_line_and_exit_status_1(
    command: str, scheme: str, commands: Callable[..., Any], tmp_path: Path
) -> None:
    url = f"{scheme}://127.0.0.1:{free_port()}"
    if command == "bridge":
        tokens = write_tokens(tmp_path / "tokens.jsonl", {"a": TOKEN})
        args: tuple[str, ...] = ("bridge", f"ws://127.0.0.1:{free_port()}", "--tokens", str(tokens), "--to", url)
        args += ("--broker-wait", "0.3")
    else:
        args = ("consume", url, "--durable", "x")
    status, out, err = await (await commands(*args)).finish()
    assert status == 1
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith(
        f"chatfeed: the broker is unavailable: cannot reach {'NATS' if scheme == 'nats' else 'Redis'}"
    )
    assert SECRET not in err


def chat_orders(log: list[Envelope]) -> Iterator[tuple[tuple[str, str | None], list[int]]]:
    """Yield each chat's message numbers in log order."""
    chats: dict[tuple[str, str | None], list[int]] = {}
    for envelope in log:
        if envelope.type == "new_message":
            assert envelope.id is not None
            chats.setdefault((envelope.feed, envelope.chat), []).append(int(envelope.id))
    yield from chats.items()


async def test_a_bridge_killed_and_started_again_with_backfill_loses_nothing_and_stores_nothing_twice(
    broker: Broker, users_server: FeedServer, commands: Callable[..., Any], tmp_path: Path
) -> None:
    feeds = {"u1": f"one-{unique()}", "u2": f"two-{unique()}"}
    tokens = write_tokens(tmp_path / "tokens.jsonl", {feeds["u1"]: TOKEN, feeds["u2"]: OTHER_TOKEN})
    args = ("bridge", users_server.url, "--tokens", str(tokens), "--to", broker.url, *broker.options)
    args += ("--backfill-url", users_server.url)
    first = await commands(*args)
    await first.stderr_matching(r"^chatfeed: 2 of 2 feeds up$")

    chats = [(user, f"{user}-c{number}") for user in feeds for number in (1, 2)]
    for user, chat in chats:
        await users_server.push_chat(id=chat, user_id=user)
    pushed: list[tuple[str, str]] = []  # (feed, message id), in push order
    progress = asyncio.Event()

    async def push_forever() -> None:
        number = 0
        while True:
            number += 1
            user, chat = chats[number % len(chats)]
            await users_server.push_message(id=str(number), chat_id=chat, user_id=user)
            pushed.append((feeds[user], str(number)))
            progress.set()
            await asyncio.sleep(2 * MS)  # a busy feed, not a flood

    async def pushed_at_least(count: int) -> None:
        while len(pushed) < count:
            progress.clear()
            await asyncio.wait_for(progress.wait(), WAIT)

    pusher = asyncio.ensure_future(push_forever())
    try:
        await wait_for_log(broker, lambda log: len(log) >= 40, "40 events in the log")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while not set(feeds.values()) <= await broker.watermarks():  # saved every second
            assert loop.time() < deadline, "no watermarks saved"
            await asyncio.sleep(20 * MS)
        await first.kill()  # SIGKILL, mid-stream: nothing drained, nothing saved
        assert first.process.returncode == -signal.SIGKILL
        down_from = len(pushed)
        await pushed_at_least(down_from + 40)  # missed by every bridge

        second = await commands(*args)
        await second.stderr_matching(r"^chatfeed: 2 of 2 feeds up$")
        await pushed_at_least(len(pushed) + 40)
    finally:
        pusher.cancel()
        await asyncio.wait([pusher])

    expected = {(feed, message) for feed, message in pushed} | {(feeds[user], chat) for user, chat in chats}
    log = await wait_for_log(
        broker, lambda log: {(e.feed, e.id) for e in log} >= expected, "every event pushed in the log"
    )
    status, _, err = await second.finish(signal.SIGTERM)
    assert status == 0, err

    assert len(log) == len(expected), "an event stored twice"
    assert len({envelope.dedup for envelope in log}) == len(log)
    assert {(envelope.feed, envelope.id) for envelope in log} == expected
    for where, numbers in chat_orders(log):
        assert numbers == sorted(numbers), f"chat {where} out of order"
    assert any(envelope.source == "backfill" for envelope in log)  # what the first bridge never saw
    summary = SUMMARY.search(err)
    assert summary is not None, err
    assert int(summary.group(3)) >= 1, "the overlap of the backfill was stored again, or never fetched"
    assert down_from < len(pushed)
    assert SECRET not in err + "\n".join(first.err)


async def test_a_partition_count_other_than_the_logs_is_bad_usage(
    redis_session: RedisServer, commands: Callable[..., Any], tmp_path: Path
) -> None:
    prefix = f"t{unique()}"
    client = redis.asyncio.from_url(redis_session.url)
    try:
        await client.hset(f"{prefix}:meta", mapping={"partitions": 4, "version": 1})
    finally:
        await client.aclose()
    tokens = write_tokens(tmp_path / "tokens.jsonl", {"a": TOKEN})
    args = ("--to", redis_session.url, "--prefix", prefix, "--partitions", "8")
    status, out, err = await (await commands("bridge", "ws://127.0.0.1:1", "--tokens", str(tokens), *args)).finish()
    assert status == 2
    assert out == ""
    assert err.splitlines() == [
        f"chatfeed: error: {prefix}:meta says 4 partitions, not 8: changing the count would reorder chats"
    ]


async def test_two_shards_bridge_every_feed_of_one_tokens_file_once(
    broker: Broker, users_server: FeedServer, commands: Callable[..., Any], tmp_path: Path
) -> None:
    keys = [f"sharded-{unique()}-{number}" for number in range(12)]
    owners = {key: TOKEN if number % 2 == 0 else OTHER_TOKEN for number, key in enumerate(keys)}
    tokens = write_tokens(tmp_path / "tokens.jsonl", owners)
    common = ("--tokens", str(tokens), "--to", broker.url, *broker.options)
    bridges = [await commands("bridge", users_server.url, "--shard", f"{k}/2", *common) for k in (1, 2)]
    counts = []
    for number, bridge in enumerate(bridges, 1):
        taken = await bridge.stderr_matching(rf"^chatfeed: shard {number}/2: (\d+) of the 12 feeds$")
        counts.append(int(taken.group(1)))
        await bridge.stderr_matching(rf"^chatfeed: {taken.group(1)} of {taken.group(1)} feeds up$")
    assert sum(counts) == 12 and min(counts) > 0  # each feed to one shard; both shards have some

    await users_server.push_chat(id="c1", user_id="u1")
    await users_server.push_chat(id="c2", user_id="u2")
    for number in range(3):
        await users_server.push_message(id=f"m1-{number}", chat_id="c1", user_id="u1")
        await users_server.push_message(id=f"m2-{number}", chat_id="c2", user_id="u2")
    expected = sorted(
        (key, kind, identity)
        for key, token in owners.items()
        for kind, identity in [("new_chat", "c1" if token == TOKEN else "c2")]
        + [("new_message", f"m{1 if token == TOKEN else 2}-{number}") for number in range(3)]
    )
    log = await wait_for_log(broker, lambda log: len(log) >= len(expected), f"{len(expected)} events in the log")
    assert sorted(identities(log)) == expected  # every feed's events once: no feed bridged twice, none left out
    for bridge in bridges:
        status, _, err = await bridge.finish(signal.SIGTERM)
        assert status == 0, err


# What an outside review of the bridge's commands found


async def test_a_malformed_broker_url_is_bad_usage_at_once_and_its_password_is_not_said(
    commands: Callable[..., Any], tmp_path: Path
) -> None:
    tokens = write_tokens(tmp_path / "tokens.jsonl", {"a": TOKEN})
    bridge = ("bridge", f"ws://127.0.0.1:{free_port()}", "--tokens", str(tokens), "--to")
    port = free_port()  # nothing listens there: before the URL was checked, each of these was retried
    cases = {
        (*bridge, f"redis://:hunter2pw@127.0.0.1:{port}/abc"): (
            f"not a Redis URL: redis://***@127.0.0.1:{port}/abc (its database, after the port, is not a number)"
        ),
        (*bridge, "nats://"): "not a NATS URL: nats: (it has no host)",
        ("consume", "nats://user:hunter2pw@127.0.0.1:notaport", "--durable", "x"): (
            "not a NATS URL: nats://***@127.0.0.1:notaport (its port is not a number from 1 to 65535)"
        ),
        ("consume", f"redis://127.0.0.1:{port}/0?db=x", "--durable", "x"): "not a Redis URL: ",
        ("bridge", "--status", "--group", "g", "--to", f"nats://u:hunter2pw@127.0.0.1:{port},nats://h:1"): (
            "a NATS URL names one server, not a comma-separated list"
        ),
        ("bridge", "--status", "--group", "g", "--to", f"NATS://127.0.0.1:{port}"): (
            f"not a NATS URL: nats://127.0.0.1:{port} (its scheme must be lowercase)"
        ),
    }
    started = {args: await commands(*args) for args in cases}
    results = dict(zip(started, await asyncio.gather(*(command.finish() for command in started.values())), strict=True))
    for args, (status, out, err) in results.items():
        assert (status, out) == (2, ""), (args, err)
        assert err.startswith(f"chatfeed: error: {cases[args]}") and len(err.splitlines()) == 1, (args, err)
        assert "hunter2pw" not in err


async def test_a_shard_count_beyond_the_bound_is_bad_usage_at_once(
    commands: Callable[..., Any], tmp_path: Path
) -> None:
    tokens = write_tokens(tmp_path / "tokens.jsonl", {f"feed-{number}": TOKEN for number in range(100)})
    args = ("bridge", "ws://127.0.0.1:1", "--tokens", str(tokens), "--to", "nats://127.0.0.1:1")
    status, out, err = await (await commands(*args, "--shard", "1/100000000")).finish()
    assert (status, out) == (2, "")
    assert err.splitlines()[-1].endswith("error: argument --shard: N is at most 1,000, not 100,000,000"), err


async def test_a_bridge_whose_chat_server_is_unreachable_says_so_then_says_when_the_feeds_connect(
    redis_session: RedisServer, commands: Callable[..., Any], tmp_path: Path
) -> None:
    port = free_port()
    tokens = write_tokens(tmp_path / "tokens.jsonl", {f"one-{unique()}": TOKEN, f"two-{unique()}": OTHER_TOKEN})
    bridge = await commands(
        "bridge", f"ws://127.0.0.1:{port}", "--tokens", str(tokens), "--to", redis_session.url, "--prefix", unique()
    )
    await bridge.stderr_matching(
        r"^chatfeed: 0 of 2 feeds connected: each one's attempt failed; still trying, the last error: could not connect"
    )
    async with FeedServer(users={TOKEN: "u1", OTHER_TOKEN: "u2"}, port=port):
        await bridge.stderr_matching(r"^chatfeed: 2 of 2 feeds up$")
        status, _, err = await bridge.finish(signal.SIGTERM)
    assert status == 0, err
    assert sum("feeds connected" in line for line in err.splitlines()) == 1  # once, not once per feed or attempt
    assert SECRET not in err


async def test_a_group_worker_says_it_joins_and_a_refused_one_does_not_say_it_bridges(
    nats_session: NatsServer, users_server: FeedServer, commands: Callable[..., Any], tmp_path: Path
) -> None:
    group = f"g{unique()}"
    tokens = write_tokens(tmp_path / "tokens.jsonl", {f"one-{unique()}": TOKEN, f"two-{unique()}": OTHER_TOKEN})
    options = ("--stream", f"T_{unique()}", "--prefix", f"t{unique()}", "--group", group)
    worker = ("bridge", users_server.url, "--tokens", str(tokens), "--to", nats_session.url, *options)
    first = await commands(*worker, "--worker", "w1", "--lease-ttl", "3")
    await first.stderr_matching(rf"^chatfeed: bridging the feeds worker w1 holds in group {group}, from ws://")
    refused = await commands(*worker, "--worker", "w2", "--lease-ttl", "7")
    status, _, err = await refused.finish()
    assert status == 2
    assert err.splitlines() == [
        f"chatfeed: joining group {group} as worker w2, with the 2 feeds of the tokens file",
        "chatfeed: warning: without --backfill-url, what a feed misses while it moves from a dead bridge "
        "to another is lost",
        f"chatfeed: error: the group {group} keeps its leases for 3 s, not 7 s: every worker of a group needs the "
        "same ttl",
    ]
    status, _, err = await first.finish(signal.SIGTERM)
    assert status == 0, err
    assert err.splitlines()[0] == f"chatfeed: joining group {group} as worker w1, with the 2 feeds of the tokens file"
    assert not any(line.startswith("chatfeed: bridging 0 feeds") for line in err.splitlines())


async def test_the_status_of_a_group_that_does_not_exist_is_the_same_error_with_either_broker(
    nats_session: NatsServer, redis_session: RedisServer, commands: Callable[..., Any]
) -> None:
    group, prefix = f"g{unique()}", f"t{unique()}"
    nats = await commands("bridge", "--status", "--group", group, "--to", nats_session.url)
    redis_ = await commands("bridge", "--status", "--group", group, "--to", redis_session.url, "--prefix", prefix)
    (nats_status, nats_out, nats_err), (redis_status, redis_out, redis_err) = await asyncio.gather(
        nats.finish(), redis_.finish()
    )
    assert (nats_status, nats_out, nats_err) == (
        2,
        "",
        f"chatfeed: error: there is no group {group} at {nats_session.url}",
    )
    assert (redis_status, redis_out, redis_err) == (
        2,
        "",
        f"chatfeed: error: there is no group {group} at {redis_session.url}",
    )
