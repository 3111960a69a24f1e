"""A pool: one feed per user, in one process, with one set of handlers.

An assistant service watches the chats of many users at once, each user's
feed opened with that user's own token. ``chatfeed.Pool`` runs them all: one
``add()`` per user, handlers that get each event with the key of its feed,
and one keepalive task and one connection ramp for every feed. A feed whose
token is rejected stops alone, with a ``FeedStopped`` event; the others go on.

The handler answers each user's question with a fake model that takes 100 ms,
at most eight calls at once over the whole pool. The answer goes back to the
backend, which pushes it on that user's feed. Half-way, the server drops
every connection at once while users keep writing: every feed comes back
through the ramp, and each one's backfill fetches what that user missed.

Starts its own FeedServer with 20 users on a free loopback port, prints what
happens and the pool's statistics, then exits. Run it with
``python examples/many_feeds.py``.
"""

from __future__ import annotations

import asyncio
import collections
import sys

import chatfeed
from chatfeed.testing import FeedServer

USERS = [f"user-{number}" for number in range(1, 21)]
# In an application: each user's JWT, from your own store.
TOKENS = {user: f"dev-token-of-{user}" for user in USERS}
QUESTIONS = ["What is the tallest mountain in Europe?", "Why is my basil wilting?", "Suggest a name for a grey cat."]
CONNECT_RATE = 40  # connection attempts per second, over every feed


async def model(question: str) -> str:
    await asyncio.sleep(0.1)  # stands for a call to a model
    return f"an answer to {question!r}"


class Progress:
    """Counts what the handlers did, for this program to wait on; an application would not need it."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._changed = asyncio.Condition()

    async def bump(self, what: str) -> None:
        async with self._changed:
            self.counts[what] += 1
            self._changed.notify_all()

    async def until(self, what: str, count: int) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.counts[what] >= count), timeout=20)


async def main() -> int:
    progress = Progress()
    running = busiest = 0

    async with FeedServer(users={token: user for user, token in TOKENS.items()}) as server:
        pool = chatfeed.Pool(
            server.url,
            connect_rate=CONNECT_RATE,
            reconnect=chatfeed.Backoff(initial=0.5, maximum=2.0),
            # The feed has no replay: each feed fetches what its user missed
            # (GET /users/{id}/messages?since=... in an application).
            backfill=lambda gap: server.history(since=gap.since, user_id=gap.feed),
        )
        for user, token in TOKENS.items():
            pool.add(user, token=token)  # the feed's key is the user's id
        pool.add("intruder", token="not-a-valid-token")

        @pool.on("new_message", concurrency=8)  # eight calls at once over the whole pool; in order within a chat
        async def answer(event: chatfeed.NewMessage, feed: str) -> None:
            nonlocal running, busiest
            message = event.payload
            if message.role != chatfeed.Role.USER:
                await progress.bump("answers delivered")  # our own answer, back on the user's feed
                return
            running += 1
            busiest = max(busiest, running)
            try:
                reply = await model(message.content)
            finally:
                running -= 1
            # POST /chats/{id}/messages: the backend stores the answer and pushes it on this user's feed.
            await server.push_message(chat_id=message.chat_id, role="assistant", content=reply, user_id=feed)
            await progress.bump(f"answered ({event.source})")

        @pool.on("feed_stopped")
        def stopped(event: chatfeed.FeedStopped, feed: str) -> None:
            print(f"feed {feed} stopped: {event.error}")

        @pool.on("connected")
        async def connected(event: chatfeed.Connected, feed: str) -> None:
            if event.is_reconnect:
                await progress.bump("reconnected")

        async def ask(user: str, chat: chatfeed.Chat, question: str) -> None:
            """The user writes in their chat (through the backend's REST API, not the feed)."""
            await server.push_message(
                chat_id=chat.id, role="user", content=question, precis=None, audio_url=None, user_id=user
            )

        loop = asyncio.get_running_loop()
        async with pool:  # returns once every feed is up or has stopped
            statistics = pool.statistics()
            print(f"{statistics.feeds} feeds: {statistics.up} up, {statistics.failed} failed")
            await pool.remove("intruder")  # a stopped feed stays in the pool, counted as failed, until removed

            chats = {user: await server.push_chat(user_id=user) for user in USERS}
            # Registered before the questions go out, so that the answer cannot come too early for it.
            with pool.expect(
                "new_message", feed="user-7", where=lambda event: event.payload.role == chatfeed.Role.ASSISTANT
            ) as reply:
                for number, user in enumerate(USERS):
                    await ask(user, chats[user], QUESTIONS[number % len(QUESTIONS)])
                answer_to_7 = await reply.wait(timeout=20)
            print(f"user-7 got: {answer_to_7.payload.content}")
            await progress.until("answers delivered", len(USERS))
            print(
                f"answered {progress.counts['answered (live)']} questions of {len(USERS)} users, "
                f"at most {busiest} at a time"
            )

            server.drop_connections()  # a mass disconnection: every connection reset at once
            dropped_at = loop.time()
            print("-- the server dropped every connection")
            for user in USERS:  # written while every feed is away: no connection gets these
                await ask(user, chats[user], "Are you still there?")
            await progress.until("reconnected", len(USERS))
            back_after = loop.time() - dropped_at
            await progress.until("answers delivered", 2 * len(USERS))
            print(f"all {len(USERS)} feeds back within {back_after:.2f} s of the drop")
            print(f"answered {progress.counts['answered (backfill)']} questions missed while away, from the backfill")

            statistics = pool.statistics()
            one = pool.statistics("user-7")

    print(
        f"pool: {statistics.feeds} feeds, {statistics.up} up, {statistics.failed} failed; "
        f"{statistics.connections} connections, {statistics.reconnects} reconnects; "
        f"{statistics.backfilled_events} backfilled, {statistics.duplicates_dropped} duplicates dropped"
    )
    print(
        f"user-7: {one.state}, {one.connections} connections, {one.backfilled_events} backfilled, "
        f"{one.duplicates_dropped} duplicate(s) dropped"
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
