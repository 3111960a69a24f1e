"""An AI pipeline: a slow model answers user messages of many chats, side by side, in order within each chat.

``@client.on("new_message", concurrency=8)`` runs up to eight calls of the
handler at once, in worker tasks: the chats are answered in parallel, while
the messages of one chat are answered one after the other, in the order they
arrived. The model here is a fake one that takes 50 to 200 ms per answer (the
same for every run). Its answer goes back to the backend, which pushes it on
the feed, as a real backend would after ``POST /chats/{id}/messages``.

Half-way, the server stops (a deploy) while users keep writing. The client
reconnects, and ``backfill=`` fetches what the feed pushed meanwhile (here
from the server's history; in an application, from the backend's REST API).
Those messages are answered too, before the new connection's live ones, and
``dedupe=True`` drops what the backfill and the live feed both delivered.

Starts its own FeedServer on a free loopback port and prints each answer,
then a summary. Run it with ``python examples/ai_pipeline.py``.
"""

from __future__ import annotations

import asyncio
import collections
import sys
import time

import chatfeed
from chatfeed.testing import FeedServer

TOKEN = "dev-token"
CHATS = 10
BEFORE, WHILE_DOWN, AFTER = 3, 1, 1  # user messages per chat: before the restart, while down, after it
TOTAL = CHATS * (BEFORE + WHILE_DOWN + AFTER)


def thinking_time(chat: int, number: int) -> float:
    """How long the fake model takes: 50 to 200 ms, the same for every run."""
    return 0.05 * (1 + (chat + number) % 4)


async def model(chat: int, number: int, question: str) -> str:
    await asyncio.sleep(thinking_time(chat, number))  # stands for a call to a model
    return f"an answer to {question!r}"


async def main() -> int:
    answered: dict[str, list[int]] = collections.defaultdict(list)
    from_backfill = 0
    progress = asyncio.Condition()

    async def until_answered(count: int) -> None:
        async with progress:
            await asyncio.wait_for(progress.wait_for(lambda: sum(map(len, answered.values())) >= count), timeout=20)

    async with FeedServer(tokens=[TOKEN]) as server:
        client = chatfeed.Client(
            server.url,
            token=TOKEN,
            reconnect=chatfeed.Backoff(initial=0.1, maximum=0.5),
            backfill=lambda gap: server.history(since=gap.since),  # GET /messages?since=... in an application
            dedupe=True,
        )

        @client.on("new_message", concurrency=8)  # in order within a chat (key=chatfeed.by_chat)
        async def answer(event: chatfeed.NewMessage) -> None:
            nonlocal from_backfill
            message = event.payload
            if message.role != chatfeed.Role.USER:
                return  # our own answers, coming back on the feed
            chat, number = int(message.chat_id), int(message.content.split("#")[1])
            reply = await model(chat, number, message.content)
            # POST /chats/{id}/messages: the backend stores the answer and pushes it on the feed.
            await server.push_message(chat_id=message.chat_id, role="assistant", content=reply)
            async with progress:
                answered[message.chat_id].append(number)
                if event.source == "backfill":
                    from_backfill += 1
                progress.notify_all()
            print(f"[chat {chat}] answered question #{number} ({event.source})")

        async def ask(numbers: range) -> list[chatfeed.Message]:
            """Each user writes the questions ``numbers``, one chat after the other."""
            sent = []
            for number in numbers:
                for chat in range(1, CHATS + 1):
                    content = f"question #{number}"
                    sent.append(await server.push_message(chat_id=str(chat), role="user", content=content, precis=None))
            return sent

        started = time.perf_counter()
        async with client:
            await ask(range(1, BEFORE + 1))
            await until_answered(CHATS * BEFORE)

            await server.stop()  # a deploy: what users write now reaches no client
            missed = await ask(range(BEFORE + 1, BEFORE + WHILE_DOWN + 1))
            # For this program's own bookkeeping only: the backfill has delivered the last missed message.
            caught_up = client.expect("new_message", where=lambda event: event.payload.id == missed[-1].id)
            await server.start()
            await caught_up.wait(timeout=20)

            await ask(range(BEFORE + WHILE_DOWN + 1, BEFORE + WHILE_DOWN + AFTER + 1))
            await until_answered(TOTAL)
            statistics = client.statistics()
        elapsed = time.perf_counter() - started

    in_order = all(numbers == sorted(numbers) for numbers in answered.values())
    one_at_a_time = sum(
        thinking_time(chat, number) for chat in range(1, CHATS + 1) for number in range(1, TOTAL // CHATS + 1)
    )
    handled = sum(map(len, answered.values()))
    print(f"handled {handled} user messages in {len(answered)} chats, {from_backfill} of them from backfill")
    print(f"duplicates dropped: {statistics.duplicates_dropped}")
    print(f"each chat in order: {'yes' if in_order else 'NO'}")
    print(f"took {elapsed:.2f} s with concurrency=8; inline, the model alone would take {one_at_a_time:.2f} s")
    return 0 if in_order else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
