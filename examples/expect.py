"""Waiting for a reply: ``client.expect()`` before the request, ``await`` after it.

The feed is receive-only: a prompt is posted over the backend's REST API, and
its answer comes back on the feed. A fast backend can push the answer before
the HTTP response returns, so a program that starts waiting only once the
request has returned waits for an answer it has already missed.
``client.expect()`` starts waiting at once, when it is called; awaiting it
later returns the answer even if it came first.

Starts its own FeedServer on a free loopback port. Its fake REST call answers
on the feed before it returns, every time. The program shows the race first,
then the pattern that wins it, for one chat and for three at once; then it
exits. Run it with ``python examples/expect.py``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

import chatfeed
from chatfeed.testing import FeedServer

TOKEN = "dev-token"
ANSWERS = {
    "How tall is Mont Blanc?": "About 4,806 metres.",
    "Why is my basil wilting?": "Too much sun at noon.",
    "Name a grey cat.": "Earl Grey.",
    "And a black one?": "Pepper.",
    "What is backpressure?": "A slow reader making the writer wait.",
}


def answer_in(chat_id: str) -> Callable[[chatfeed.NewMessage], bool]:
    """A ``where`` that picks the assistant's message in chat ``chat_id``."""

    def matches(event: chatfeed.NewMessage) -> bool:
        return event.payload.chat_id == chat_id and event.payload.role == chatfeed.Role.ASSISTANT

    return matches


async def main() -> int:
    async with FeedServer(tokens=[TOKEN]) as server:
        client = chatfeed.Client(server.url, token=TOKEN)
        # For the fake backend only: the ids of the messages this client has read.
        read: set[str] = set()
        arrived = asyncio.Condition()

        @client.on("new_message")
        async def note(event: chatfeed.NewMessage) -> None:
            async with arrived:
                read.add(event.payload.id)
                arrived.notify_all()

        async def post_prompt(chat_id: str, prompt: str) -> None:
            """POST /chats/{chat_id}/messages, faked: the answer is on the feed before the response returns."""
            await server.push_message(chat_id=chat_id, role="user", content=prompt, precis=None, audio_url=None)
            answer = await server.push_message(chat_id=chat_id, role="assistant", content=ANSWERS[prompt])
            async with arrived:  # a slow HTTP response: back once this client has read the answer
                await arrived.wait_for(lambda: answer.id in read)

        async def ask(chat_id: str, prompt: str) -> str:
            reply = client.expect("new_message", where=answer_in(chat_id))  # 1. expect
            await post_prompt(chat_id, prompt)  # 2. request
            event = await reply.wait(timeout=10)  # 3. await
            return event.payload.content

        async with client:
            print("wait after the request (the race):")
            await post_prompt("1", "How tall is Mont Blanc?")
            late = client.expect("new_message", where=answer_in("1"))
            try:
                await late.wait(timeout=0.5)
            except TimeoutError:
                print("  no answer within 0.5 s: it came before the wait began")

            print("expect before the request:")
            reply = client.expect("new_message", where=answer_in("2"), timeout=10)
            await post_prompt("2", "Why is my basil wilting?")
            print(f"  answered before the await: {'yes' if reply.done() else 'no'}")
            event = await reply
            print(f"  chat 2: {event.payload.content}")

            print("three chats at once:")
            prompts = {"3": "Name a grey cat.", "4": "And a black one?", "5": "What is backpressure?"}
            answers = await asyncio.gather(*(ask(chat_id, prompt) for chat_id, prompt in prompts.items()))
            for chat_id, answer in zip(prompts, answers, strict=True):
                print(f"  chat {chat_id}: {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
