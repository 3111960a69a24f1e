"""Beyond one process: a pool's events into NATS JetStream or Redis Streams, and typed consumers on the other side.

``chatfeed.bridge`` needs an extra: ``pip install 'chatfeed[nats]'`` for
JetStream (nats-py), ``'chatfeed[redis]'`` for Redis Streams (redis-py), or
``'chatfeed[bridge]'`` for both. Importing it needs neither; a sink or a
consumer of a broker whose client is missing raises a `UsageError` naming
the extra.

- [`Bridge`][chatfeed.bridge.Bridge] publishes every event of a
  [`Pool`][chatfeed.Pool] through a [`Sink`][chatfeed.bridge.Sink]
  ([`JetStreamSink`][chatfeed.bridge.JetStreamSink],
  [`RedisStreamSink`][chatfeed.bridge.RedisStreamSink]), as
  [envelopes](../bridge/envelope.md).
- [`Consumer`][chatfeed.bridge.Consumer] reads them back as the same typed
  events, acknowledging each once its handlers succeeded.
"""

from __future__ import annotations

from typing import Any

from .._logging import redact_url as _redact_url
from ..exceptions import UsageError
from ._assign import owner, shard
from ._bridge import Bridge, BridgeStatistics, BrokerUnavailableError, FencedError, RecordRejectedError, Sink
from ._consumer import Consumer, ConsumerEventStream, ConsumerStatistics, Delivery, Source
from ._envelope import (
    ENVELOPE_SCHEMA,
    ENVELOPE_VERSION,
    Envelope,
    EnvelopeError,
    Record,
    dedup_id,
    encode,
    partition,
    subject_token,
)
from ._group import Group, JetStreamCoordinator, RedisCoordinator
from ._nats import JetStreamSink, JetStreamSource
from ._redis import RedisStreamSink, RedisStreamSource

__all__ = [
    "ENVELOPE_SCHEMA",
    "ENVELOPE_VERSION",
    "Bridge",
    "BridgeStatistics",
    "BrokerUnavailableError",
    "Consumer",
    "ConsumerEventStream",
    "ConsumerStatistics",
    "Delivery",
    "Envelope",
    "EnvelopeError",
    "FencedError",
    "Group",
    "JetStreamCoordinator",
    "JetStreamSink",
    "JetStreamSource",
    "Record",
    "RecordRejectedError",
    "RedisCoordinator",
    "RedisStreamSink",
    "RedisStreamSource",
    "Sink",
    "Source",
    "dedup_id",
    "encode",
    "owner",
    "partition",
    "shard",
    "sink_for",
    "subject_token",
]


def sink_for(url: str, **options: Any) -> Sink:
    """Return the sink for a broker's URL: `JetStreamSink` for ``nats://``, `RedisStreamSink` for ``redis://``.

    Raises:
        UsageError: The scheme is neither, or the broker's client is not installed.
    """
    scheme = url.partition("://")[0].lower() if isinstance(url, str) else ""
    if scheme in ("nats", "tls"):
        return JetStreamSink(url, **options)
    if scheme in ("redis", "rediss"):
        return RedisStreamSink(url, **options)
    raise UsageError(f"the broker's URL must start with nats:// or redis://, not {_redact_url(str(url))[:40]!r}")
