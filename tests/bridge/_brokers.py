"""One face for both brokers in the bridge's tests: a sink, a consumer, and the log read back directly."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import jsonschema_rs
import nats
import nats.errors
import nats.js.api
import redis.asyncio

import chatfeed
from chatfeed.bridge import ENVELOPE_SCHEMA, Consumer, Envelope, JetStreamSink, RedisStreamSink

from ..conftest import FAST, MS, SECRET, SIGNATURE

Kind = Literal["nats", "redis"]

_names = itertools.count(1)
VALIDATOR = jsonschema_rs.validator_for(ENVELOPE_SCHEMA, validate_formats=True)
"""The schema's validator for logs of 100,000 entries: jsonschema-rs, about 5 µs an entry where the
reference implementation (jsonschema, which tests/unit/test_envelope.py uses) takes 50."""
EPOCH = datetime(2025, 10, 7, 12, 0, tzinfo=timezone.utc)


def token_of(user: str) -> str:
    """A test token for ``user`` (holding the secret, as every test token does)."""
    return f"eyJhbGciOiJIUzI1NiJ9.{SECRET}-{user}.{SIGNATURE}"


def message_frame(message_id: str, chat: str, *, offset: int = 0, **extra: Any) -> str:
    """The text of a ``new_message`` frame, as a backend would send it."""
    created = (EPOCH + timedelta(milliseconds=offset)).isoformat().replace("+00:00", "Z")
    payload = {"id": message_id, "chatId": chat, "role": "assistant", "content": "hi", "createdAt": created}
    payload.update(extra)
    return json.dumps({"type": "new_message", "payload": payload}, separators=(",", ":"))


def make_pool(url: str, **options: Any) -> chatfeed.Pool:
    """A pool with test-friendly defaults: fast backoff, short timeouts, no compression."""
    options.setdefault("reconnect", FAST)
    options.setdefault("auth_timeout", 2000 * MS)
    options.setdefault("open_timeout", 2000 * MS)
    options.setdefault("close_timeout", 500 * MS)
    options.setdefault("connect_rate", 10_000)
    return chatfeed.Pool(url, **options)


class Broker:
    """A broker of one kind, with names of this test's own: what the bridge writes to, read back."""

    def __init__(self, kind: Kind, url: str) -> None:
        number = next(_names)
        self.kind = kind
        self.url = url
        self.stream = f"T{number}"
        self.prefix = f"t{number}"
        self.partitions = 4

    def __repr__(self) -> str:
        return f"<Broker {self.kind} {self.url}>"

    def sink(self, **options: Any) -> JetStreamSink | RedisStreamSink:
        if self.kind == "nats":
            options.setdefault("bucket", f"wm-{self.prefix}")
            return JetStreamSink(self.url, stream=self.stream, prefix=self.prefix, **options)
        return RedisStreamSink(self.url, prefix=self.prefix, partitions=self.partitions, **options)

    def consumer(self, durable: str, **options: Any) -> Consumer:
        if self.kind == "nats":
            return Consumer(self.url, durable=durable, stream=self.stream, prefix=self.prefix, **options)
        options.setdefault("claim_after", 1.0)
        return Consumer(self.url, durable=durable, prefix=self.prefix, **options)

    @asynccontextmanager
    async def nats(self) -> AsyncIterator[Any]:
        client = await nats.connect(self.url, allow_reconnect=False, connect_timeout=2)
        try:
            yield client
        finally:
            await client.close()

    @asynccontextmanager
    async def redis(self) -> AsyncIterator[Any]:
        client = redis.asyncio.from_url(self.url)
        try:
            yield client
        finally:
            await client.aclose()

    async def read_log(self) -> list[bytes]:
        """Every entry of the log: in stream order (JetStream), partition after partition (Redis)."""
        if self.kind == "nats":
            return await self._read_stream(self.stream, f"{self.prefix}.>")
        entries: list[bytes] = []
        async with self.redis() as client:
            for index in range(self.partitions):
                start = "-"
                while True:
                    chunk = await client.xrange(f"{self.prefix}:{{{index}}}", start, "+", count=10_000)
                    entries.extend(fields.get(b"envelope", b"") for _, fields in chunk)
                    if len(chunk) < 10_000:
                        break
                    start = "(" + chunk[-1][0].decode()
        return entries

    async def _read_stream(self, stream: str, subject: str) -> list[bytes]:
        async with self.nats() as client:
            js = client.jetstream(timeout=5)
            total = (await js.stream_info(stream)).state.messages
            subscription = await js.pull_subscribe(
                subject,
                stream=stream,
                config=nats.js.api.ConsumerConfig(ack_policy=nats.js.api.AckPolicy.NONE),
            )
            entries: list[bytes] = []
            while len(entries) < total:
                messages = await subscription.fetch(min(5000, total - len(entries)), timeout=5)
                entries.extend(message.data for message in messages)
            await subscription.unsubscribe()
            return entries

    async def dead_letters(self, durable: str) -> list[tuple[bytes, str]]:
        """The dead letters of ``durable``: each envelope and its reason."""
        if self.kind == "nats":
            async with self.nats() as client:
                js = client.jetstream(timeout=5)
                dead_stream = f"{self.stream}_DEAD"
                state = (await js.stream_info(dead_stream)).state
                letters = []
                for sequence in range(state.first_seq, state.last_seq + 1) if state.messages else ():
                    message = await js.get_msg(dead_stream, sequence)
                    if message.subject == f"{self.prefix}_dead.{durable}":
                        letters.append((message.data or b"", (message.headers or {})["Chatfeed-Reason"]))
                return letters
        async with self.redis() as client:
            entries = await client.xrange(f"{self.prefix}:dead:{durable}")
            return [(fields[b"envelope"], fields[b"reason"].decode()) for _, fields in entries]

    async def pending(self, durable: str) -> int:
        """Events delivered to ``durable`` and not acknowledged."""
        if self.kind == "nats":
            async with self.nats() as client:
                info = await client.jetstream(timeout=5).consumer_info(self.stream, durable)
                return int(info.num_ack_pending) + int(info.num_pending)
        async with self.redis() as client:
            total = 0
            for index in range(self.partitions):
                summary = await client.xpending(f"{self.prefix}:{{{index}}}", durable)
                total += int(summary["pending"])
            return total

    async def append_raw(self, data: bytes) -> None:
        """Put ``data`` into the log as an entry, as something other than a bridge might."""
        if self.kind == "nats":
            async with self.nats() as client:
                await client.jetstream(timeout=5).publish(f"{self.prefix}.garbage.%", data)
            return
        async with self.redis() as client:
            await client.xadd(f"{self.prefix}:{{0}}", {"envelope": data})


def check_envelopes(entries: list[bytes]) -> list[Envelope]:
    """Validate every entry against the envelope's schema, and decode it (checking each field)."""
    envelopes = []
    for data in entries:
        VALIDATOR.validate(json.loads(data))
        envelopes.append(Envelope.decode(data))
    return envelopes


def by_chat(envelopes: list[Envelope]) -> dict[tuple[str, str | None], list[str | None]]:
    """The ids of each (feed, chat), in log order."""
    chats: dict[tuple[str, str | None], list[str | None]] = {}
    for envelope in envelopes:
        chats.setdefault((envelope.feed, envelope.chat), []).append(envelope.id)
    return chats


async def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.01) -> None:
    """Poll ``predicate`` until it holds (a guard against hangs, not a delay)."""

    async def loop() -> None:
        while not predicate():  # noqa: ASYNC110  # statistics() has no event to wait on
            await asyncio.sleep(step)

    await asyncio.wait_for(loop(), timeout)
