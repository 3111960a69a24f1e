"""NATS JetStream: the bridge's sink and the consumer's source (the ``nats`` extra: nats-py).

Layout in the broker, all names configurable:

- stream ``CHATFEED`` captures ``chatfeed.>``; an event is published to
  ``chatfeed.<feed>.<chat>`` (both escaped by `subject_token`; ``%`` for an
  event of no chat), with its dedup id as ``Nats-Msg-Id``: the stream's
  duplicate window (10 minutes by default) stores it once.
- key-value bucket ``CHATFEED-watermarks`` (the stream's name, then
  ``-watermarks``): one key per feed (its escaped
  key, ``=`` for ``%``), the watermark in ISO 8601.
- stream ``CHATFEED_DEAD`` captures ``chatfeed_dead.>``; a consumer
  dead-letters to ``chatfeed_dead.<durable>``, with the reason and the
  original position in headers.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from .._logging import log_fields, redact_url
from ..exceptions import UsageError
from ._bridge import BrokerUnavailableError, RecordRejectedError, address_problem
from ._consumer import Delivery
from ._envelope import Record, subject_token

__all__ = ["JetStreamSink", "JetStreamSource"]

logger = logging.getLogger("chatfeed.bridge")


def _nats() -> Any:
    try:
        import nats
        import nats.js.api
        import nats.js.errors
    except ImportError:
        raise UsageError("JetStream needs nats-py: pip install 'chatfeed[nats]'") from None
    return nats


def _check_url(url: object) -> None:
    """Raise `UsageError` unless ``url`` names one NATS server as nats-py reads it: a scheme, a host, a port.

    nats-py reports a URL it cannot read only when it connects, as if the
    server were away: refused here, before any connection, so that a typo
    is bad usage and is not retried.
    """
    if not isinstance(url, str):
        raise UsageError(f"a NATS URL is a str, not {type(url).__name__}")
    if "," in url:
        # Not echoed: the credentials of the servers after the first would
        # not be redacted.
        raise UsageError("a NATS URL names one server, not a comma-separated list")
    problem = _url_problem(url)
    if problem is not None:
        raise UsageError(f"not a NATS URL: {redact_url(url)} ({problem})")


def _url_problem(url: str) -> str | None:
    scheme, found, _ = url.partition("://")
    # nats-py looks for these, lowercase, to tell a URL from a bare host:port.
    if found and scheme.lower() in ("nats", "tls", "ws", "wss") and scheme not in ("nats", "tls", "ws", "wss"):
        return "its scheme must be lowercase"
    if not found or scheme not in ("nats", "tls", "ws", "wss"):
        return "it starts with nats://, tls://, ws:// or wss://"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # an unclosed [ of an IPv6 address
        return "its host cannot be read"
    if parts.hostname == "none":  # nats-py's own test
        return "it has no host"
    return address_problem(parts)


async def _connect(url: str, name: str, connect_timeout: float) -> Any:
    """Connect to NATS, reconnecting forever after; raise `BrokerUnavailableError` if it is not there now.

    Raises:
        UsageError: ``url`` is not one NATS server's URL.
        BrokerUnavailableError: The server is not there now.
    """
    _check_url(url)
    nats = _nats()
    state = {"down": False}

    async def on_error(exc: Exception) -> None:
        if not state["down"]:
            logger.debug("NATS: %r", exc, extra=log_fields(error=exc, url=url))

    async def on_disconnected() -> None:
        if not state["down"] and not client.is_closed:
            state["down"] = True
            logger.warning(
                "lost the connection to NATS at %s; reconnecting", redact_url(url), extra=log_fields(url=url)
            )

    async def on_reconnected() -> None:
        state["down"] = False
        logger.warning("reconnected to NATS at %s", redact_url(url), extra=log_fields(url=url))

    try:
        client = await nats.connect(
            url,
            name=name,
            connect_timeout=connect_timeout,
            allow_reconnect=True,
            # nats-py applies this to the first connection too: one more try,
            # then NoServersError. Once connected, it reconnects forever (below).
            max_reconnect_attempts=1,
            reconnect_time_wait=0.25,
            # While disconnected, publishes fail at once (the bridge retries
            # them) instead of piling up in the client's buffer.
            pending_size=0,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        )
    except ValueError as exc:  # a URL nats-py cannot read
        raise UsageError(f"not a NATS URL: {redact_url(url)} ({exc})") from None
    except (OSError, asyncio.TimeoutError, nats.errors.Error) as exc:
        raise BrokerUnavailableError(f"cannot reach NATS at {redact_url(url)} ({type(exc).__name__})") from None
    client.options["max_reconnect_attempts"] = -1  # read at each reconnection: never give up from now on
    return client


def _kv_key(feed: str) -> str:
    return subject_token(feed).replace("%", "=")


class JetStreamSink:
    """A [`Sink`][chatfeed.bridge.Sink] into a NATS JetStream stream.

    Args:
        url: The NATS server, ``nats://host:4222`` (credentials in the URL are never logged).
        stream: The stream's name; created if missing, checked if present.
        prefix: The subjects' prefix (one or more tokens); the stream captures ``<prefix>.>``.
        duplicate_window: Seconds the stream remembers dedup ids (when it
            creates the stream): longer than a bridge's restart plus its backfill.
        bucket: The key-value bucket of the watermarks: by default (``True``)
            ``<stream>-watermarks``, so that bridges into different streams do
            not share them; a name; or ``False``: not kept.
        publish_timeout: Seconds to wait for a publish's acknowledgement.
        connect_timeout: Seconds to wait for the server at start.
        replicas: The stream's replicas, when it creates it.
    """

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        stream: str = "CHATFEED",
        prefix: str = "chatfeed",
        duplicate_window: float = 600.0,
        bucket: str | bool = True,
        publish_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        replicas: int = 1,
    ) -> None:
        _nats()
        if not prefix or any(part == "" or set(part) & set(" *>") for part in prefix.split(".")):
            raise UsageError(f"prefix must be dot-separated NATS subject tokens, not {prefix!r}")
        self.url = url
        self.stream = stream
        self.prefix = prefix
        self.duplicate_window = duplicate_window
        self.bucket: str | None = f"{stream}-watermarks" if bucket is True else bucket or None
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self.replicas = replicas
        self._nc: Any = None
        self._js: Any = None
        self._kv: Any = None

    def __repr__(self) -> str:
        return f"<JetStreamSink {redact_url(self.url)} stream={self.stream}>"

    def subject(self, record: Record) -> str:
        """Return the subject of ``record``: ``<prefix>.<feed>.<chat>``."""
        chat = "%" if record.chat is None else subject_token(record.chat) if record.chat else "%%"
        return f"{self.prefix}.{subject_token(record.feed)}.{chat}"

    async def open(self) -> None:
        nats = _nats()
        self._nc = await _connect(self.url, "chatfeed-bridge", self.connect_timeout)
        self._js = self._nc.jetstream(timeout=self.publish_timeout)
        try:
            await _ensure_stream(self._js, self.stream, f"{self.prefix}.>", self.duplicate_window, self.replicas)
            if self.bucket is not None:
                try:
                    self._kv = await self._js.key_value(self.bucket)
                except nats.js.errors.BucketNotFoundError:
                    self._kv = await self._js.create_key_value(bucket=self.bucket, history=1)
        except BaseException:
            await self.close()
            raise

    async def publish(self, record: Record) -> bool:
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise BrokerUnavailableError("not connected to NATS")
        subject = self.subject(record)
        if len(record.data) > nc.max_payload:
            raise RecordRejectedError(f"{len(record.data)} bytes, more than the server's max_payload {nc.max_payload}")
        try:
            ack = await self._js.publish(subject, record.data, headers={"Nats-Msg-Id": record.dedup})
        except _nats().js.errors.BadRequestError as exc:  # the stream's limits refuse it, every time
            raise RecordRejectedError(f"the stream refused it: {exc.description}") from None
        return not ack.duplicate

    async def load_watermarks(self, feeds: Sequence[str]) -> dict[str, datetime]:
        kv = self._kv
        if kv is None:
            return {}
        nats = _nats()
        marks: dict[str, datetime] = {}
        limit = asyncio.Semaphore(64)

        async def load(feed: str) -> None:
            async with limit:
                try:
                    entry = await kv.get(_kv_key(feed))
                except nats.js.errors.KeyNotFoundError:
                    return
            if entry.value:
                try:
                    marks[feed] = datetime.fromisoformat(entry.value.decode())
                except ValueError:
                    logger.warning("ignored the unreadable watermark of feed %r", feed, extra=log_fields(feed))

        await asyncio.gather(*(load(feed) for feed in feeds))
        return marks

    async def save_watermarks(self, marks: Mapping[str, datetime]) -> None:
        kv = self._kv
        if kv is None:
            return
        if not self._nc.is_connected:
            raise BrokerUnavailableError("not connected to NATS")
        limit = asyncio.Semaphore(64)

        async def save(feed: str, mark: datetime) -> None:
            async with limit:
                await kv.put(_kv_key(feed), mark.isoformat().encode())

        await asyncio.gather(*(save(feed, mark) for feed, mark in marks.items()))

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        self._js = self._kv = None
        if nc is not None:
            try:
                await nc.close()
            except Exception as exc:  # closing a connection that is down
                logger.debug("closing the NATS connection: %r", exc)


async def _ensure_stream(js: Any, name: str, subject: str, duplicate_window: float, replicas: int) -> None:
    nats = _nats()
    try:
        info = await js.stream_info(name)
    except ValueError as exc:  # nats-py checks the name
        raise UsageError(f"not a JetStream stream name: {name!r} ({exc})") from None
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(
                name=name,
                subjects=[subject],
                duplicate_window=duplicate_window,
                num_replicas=replicas,
                storage=nats.js.api.StorageType.FILE,
            )
        except nats.js.errors.BadRequestError as exc:  # another stream captures these subjects, say
            raise UsageError(
                f"JetStream refused to create the stream {name} for {subject}: {exc.description}"
            ) from None
        return
    except (asyncio.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise BrokerUnavailableError(f"NATS answers, but not its JetStream ({type(exc).__name__})") from None
    subjects = info.config.subjects or []
    if subject not in subjects and ">" not in subjects:
        raise UsageError(f"the stream {name} exists but does not capture {subject} (it captures {', '.join(subjects)})")
    window = info.config.duplicate_window or 0.0
    if window < duplicate_window:
        logger.warning(
            "the stream %s exists with a duplicate window of %g s, shorter than the %g s asked for: "
            "an event published again after that long (a restart's backfill) is stored twice",
            name,
            window,
            duplicate_window,
        )


class _JetStreamDelivery:
    __slots__ = ("_msg", "_source", "attempt", "data", "position")

    def __init__(self, msg: Any, source: JetStreamSource) -> None:
        self._msg = msg
        self._source = source
        self.data: bytes = msg.data
        metadata = msg.metadata
        self.attempt: int = metadata.num_delivered
        self.position = f"{metadata.stream}#{metadata.sequence.stream}"

    async def ack(self) -> None:
        await self._msg.ack()

    async def extend(self) -> None:
        await self._msg.in_progress()

    async def release(self) -> None:
        await self._msg.nak()

    async def retry(self, delay: float) -> None:
        await self._msg.nak(delay=delay or None)

    async def dead_letter(self, reason: str) -> None:
        source = self._source
        await source._js.publish(
            source.dead_subject,
            self.data,
            headers={
                "Nats-Msg-Id": f"{self.position}:{source.durable}",
                "Chatfeed-Reason": reason.replace("\r", " ").replace("\n", " ")[:500],
                "Chatfeed-Position": self.position,
                "Chatfeed-Subject": self._msg.subject,
            },
        )
        await self._msg.term()


class JetStreamSource:
    """A consumer's reader of a JetStream stream: a durable pull consumer, shared by every process of that name.

    Args:
        url: The NATS server.
        durable: The durable consumer's name.
        stream: The stream the bridge publishes to.
        prefix: The bridge's subject prefix.
        ack_wait: Seconds before an event fetched and not settled is
            delivered again (to any process): longer than a handler's call.
        dead_stream: The dead-letter stream (created if missing); it captures ``<prefix>_dead.>``.
        connect_timeout: Seconds to wait for the server at start.
    """

    def __init__(
        self,
        url: str,
        durable: str,
        *,
        stream: str = "CHATFEED",
        prefix: str = "chatfeed",
        ack_wait: float = 30.0,
        dead_stream: str | None = None,
        connect_timeout: float = 2.0,
    ) -> None:
        _nats()
        if set(durable) & set(" .*>"):
            raise UsageError(f"a JetStream durable name has no spaces, dots, '*' or '>': {durable!r}")
        self.url = url
        self.durable = durable
        self.stream = stream
        self.prefix = prefix
        self.ack_wait = ack_wait
        self.dead_stream = dead_stream or f"{stream}_DEAD"
        self.dead_subject = f"{prefix}_dead.{durable}"
        self.connect_timeout = connect_timeout
        self._nc: Any = None
        self._js: Any = None
        self._subscription: Any = None

    def __repr__(self) -> str:
        return f"<JetStreamSource {redact_url(self.url)} stream={self.stream} durable={self.durable}>"

    async def open(self) -> None:
        nats = _nats()
        api = nats.js.api
        self._nc = await _connect(self.url, f"chatfeed-consumer-{self.durable}", self.connect_timeout)
        self._js = self._nc.jetstream()
        try:
            try:
                await self._js.stream_info(self.stream)
            except ValueError as exc:
                raise UsageError(f"not a JetStream stream name: {self.stream!r} ({exc})") from None
            except nats.js.errors.NotFoundError:
                raise BrokerUnavailableError(f"NATS has no stream {self.stream}: start the bridge first") from None
            # After the check: a consumer of a stream that does not exist leaves nothing behind.
            await _ensure_stream(self._js, self.dead_stream, f"{self.prefix}_dead.>", 120.0, 1)
            self._subscription = await self._js.pull_subscribe(
                f"{self.prefix}.>",
                durable=self.durable,
                stream=self.stream,
                config=api.ConsumerConfig(
                    ack_policy=api.AckPolicy.EXPLICIT,
                    deliver_policy=api.DeliverPolicy.ALL,
                    ack_wait=self.ack_wait,
                    max_deliver=-1,  # the consumer dead-letters; the server never drops silently
                    max_ack_pending=10_000,
                ),
            )
        except BaseException:
            await self.close()
            raise

    async def fetch(self, count: int) -> list[Delivery]:
        try:
            messages = await self._subscription.fetch(count, timeout=1.0)
        except asyncio.TimeoutError:  # nats-py's own, or asyncio's when its deadline runs out first: nothing new
            return []
        return [_JetStreamDelivery(msg, self) for msg in messages]

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        self._js = self._subscription = None
        if nc is not None:
            try:
                await nc.close()
            except Exception as exc:
                logger.debug("closing the NATS connection: %r", exc)
