"""A group of ``chatfeed bridge --group`` processes against one FeedServer and one broker, for the group's proof."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chatfeed.bridge import Envelope
from chatfeed.bridge._assign import owner
from chatfeed.bridge._envelope import subject_token
from chatfeed.bridge._group import Coordinator, JetStreamCoordinator, RedisCoordinator
from chatfeed.testing import FeedServer

from ._brokers import Broker, token_of


class WatchedFeedServer(FeedServer):
    """A FeedServer that records, per user, every stretch of time with no authenticated connection."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.zero_since: dict[str, float] = {}
        self.gaps: list[tuple[str, float, float]] = []  # (user, from, to), time.monotonic()

    def _forget_user(self, ws: Any) -> None:
        user = self._user_of.get(ws)
        super()._forget_user(ws)
        if user is not None and user not in self._by_user:
            self.zero_since.setdefault(user, time.monotonic())

    def _notify(self) -> None:
        # Called once a connection is authenticated (and on every other change): few users are at zero.
        if self.zero_since:
            now = time.monotonic()
            for user in [user for user in self.zero_since if user in self._by_user]:
                self.gaps.append((user, self.zero_since.pop(user), now))
        super()._notify()

    def longest_gap(self, users: set[str], since: float) -> float:
        """The longest stretch (ended or not) after ``since`` in which one of ``users`` had no connection."""
        now = time.monotonic()
        spans = [(user, start, end) for user, start, end in self.gaps if end >= since]
        spans += [(user, start, now) for user, start in self.zero_since.items()]
        return max((end - max(start, since) for user, start, end in spans if user in users), default=0.0)


class Worker:
    """A running ``python -m chatfeed bridge --group ...``; its stderr is read as it comes."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.err: list[str] = []
        assert process.stderr is not None
        self._reader = asyncio.ensure_future(self._read(process.stderr))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while raw := await stream.readline():
            self.err.append(raw.decode().rstrip("\n"))

    async def finish(self, signum: int, timeout: float) -> int:
        self.process.send_signal(signum)
        status = await asyncio.wait_for(self.process.wait(), timeout)
        await asyncio.wait_for(self._reader, timeout)
        return status

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, 5)


class Cluster:
    """``count`` feeds (one user, two chats each), the workers of one group, and a stream of messages."""

    def __init__(self, broker: Broker, server: WatchedFeedServer, tmp: Path, count: int, ttl: float) -> None:
        self.broker = broker
        self.server = server
        self.ttl = ttl
        self.group = f"g{secrets.token_hex(4)}"
        self.users = {f"f{number:05d}": f"u{number:05d}" for number in range(count)}  # feed: user
        self.tokens = tmp / "tokens.jsonl"
        self.tokens.write_text(
            "".join(json.dumps({"feed": feed, "token": token_of(user)}) + "\n" for feed, user in self.users.items())
        )
        self.tokens.chmod(0o600)
        server.users.update({token_of(user): user for user in self.users.values()})
        self.workers: dict[str, Worker] = {}
        self.pushed: list[tuple[str, str, str]] = []  # (feed, type, id), in push order
        self._coordinator: Coordinator | None = None
        self._numbers = 0

    def options(self) -> tuple[str, ...]:
        broker = self.broker
        if broker.kind == "nats":
            return ("--stream", broker.stream, "--prefix", broker.prefix)
        return ("--prefix", broker.prefix, "--partitions", str(broker.partitions))

    async def start(self, name: str) -> Worker:
        environment = {key: value for key, value in os.environ.items() if key not in ("CHATFEED_TOKEN", "NO_COLOR")}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "chatfeed",
            "bridge",
            self.server.url,
            "--tokens",
            str(self.tokens),
            "--to",
            self.broker.url,
            *self.options(),
            "--group",
            self.group,
            "--worker",
            name,
            "--lease-ttl",
            str(self.ttl),
            "--backfill-url",
            self.server.url,
            "--summary-every",
            "1",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=environment,
        )
        worker = self.workers[name] = Worker(name, process)
        return worker

    async def close(self) -> None:
        for worker in self.workers.values():
            await worker.kill()
        if self._coordinator is not None:
            await self._coordinator.close()

    # What the group says

    async def holders(self) -> dict[str, str]:
        """Every held feed: its holder."""
        if self._coordinator is None:
            if self.broker.kind == "nats":
                coordinator: Coordinator = JetStreamCoordinator(self.broker.url, self.group, ttl=self.ttl)
            else:
                coordinator = RedisCoordinator(self.broker.url, self.group, prefix=self.broker.prefix, ttl=self.ttl)
            await coordinator.open()
            self._coordinator = coordinator
        keys = {
            subject_token(feed).replace("%", "=") if self.broker.kind == "nats" else feed: feed for feed in self.users
        }
        return {keys[key]: worker for key, (worker, _) in (await self._coordinator.holders()).items() if key in keys}

    def assignment(self, workers: list[str]) -> dict[str, str]:
        return {feed: owner(feed, workers) for feed in self.users}

    async def settle(self, workers: list[str], timeout: float) -> tuple[dict[str, str], float]:
        """Wait until every feed is held by its owner among ``workers``; return the holders and the time it took."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        wanted = self.assignment(workers)
        while True:
            held = await self.holders()
            if held == wanted:
                return held, loop.time() - started
            if loop.time() - started > timeout:
                wrong = sum(held.get(feed) != worker for feed, worker in wanted.items())
                tails = {name: worker.err[-3:] for name, worker in self.workers.items()}
                raise AssertionError(f"not settled on {workers} within {timeout:g} s: {wrong} feeds off; {tails}")
            await asyncio.sleep(0.1)

    # The stream

    async def push_chats(self) -> None:
        for feed, user in self.users.items():
            for side in "ab":
                chat = f"{user}{side}"
                await self.server.push_chat(id=chat, user_id=user)
                self.pushed.append((feed, "new_chat", chat))

    async def stream(self, per_tick: int, tick: float) -> None:
        """Push ``per_tick`` messages every ``tick`` seconds, to the feeds in turn, until cancelled."""
        feeds = list(self.users.items())
        while True:
            for _ in range(per_tick):
                self._numbers += 1
                number = self._numbers
                feed, user = feeds[number % len(feeds)]
                chat = f"{user}{'ab'[number // len(feeds) % 2]}"
                await self.server.push_message(id=str(number), chat_id=chat, user_id=user)
                self.pushed.append((feed, "new_message", str(number)))
            await asyncio.sleep(tick)

    async def streamed(self, count: int, timeout: float = 30.0) -> None:
        """Wait until the stream has pushed ``count`` more messages: mid-stream, whatever the machine's speed."""
        target = len(self.pushed) + count
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.pushed) < target:
            assert loop.time() < deadline, f"the stream pushed {len(self.pushed)} of {target} in {timeout:g} s"
            await asyncio.sleep(0.01)

    async def watermarks(self) -> int:
        """How many feeds have a saved watermark."""
        if self.broker.kind == "nats":
            async with self.broker.nats() as client:
                kv = await client.jetstream().key_value(f"{self.broker.stream}-watermarks")
                try:
                    return len(await kv.keys())
                except Exception:  # no keys yet
                    return 0
        async with self.broker.redis() as client:
            return int(await client.hlen(f"{self.broker.prefix}:watermarks"))

    async def wait_for_watermarks(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while await self.watermarks() < len(self.users):
            assert loop.time() < deadline, "not every feed's watermark was saved"
            await asyncio.sleep(0.2)

    async def complete_log(self, timeout: float) -> list[Envelope]:
        """Read the log until it has every event pushed; return it (in order per chat)."""
        expected = set(self.pushed)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            log = [Envelope.decode(data) for data in await self.broker.read_log()]
            if {(envelope.feed, envelope.type, envelope.id) for envelope in log} >= expected:
                return log
            if loop.time() > deadline:
                missing = expected - {(envelope.feed, envelope.type, envelope.id) for envelope in log}
                raise AssertionError(f"{len(missing)} events missing from the log, e.g. {sorted(missing)[:5]}")
            await asyncio.sleep(0.3)

    def check_log(self, log: list[Envelope]) -> None:
        """Every event pushed once, nothing else, no dedup id twice, each chat's messages in push order."""
        identities = [(envelope.feed, envelope.type, envelope.id) for envelope in log]
        assert set(identities) == set(self.pushed)
        assert len(identities) == len(set(identities)), "an event stored twice"
        assert len({envelope.dedup for envelope in log}) == len(log), "a dedup id twice"
        check_order(log)


def check_order(log: list[Envelope]) -> None:
    chats: dict[tuple[str, str | None], list[int]] = {}
    for envelope in log:
        if envelope.type == "new_message":
            chats.setdefault((envelope.feed, envelope.chat), []).append(int(envelope.id or 0))
    for where, numbers in chats.items():
        assert numbers == sorted(numbers), f"chat {where} out of order: {numbers}"


def moved(before: Mapping[str, str], after: Mapping[str, str]) -> int:
    return sum(before.get(feed) != worker for feed, worker in after.items())
