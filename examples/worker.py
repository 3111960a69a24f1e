"""A worker process: handle the feed until SIGTERM or Ctrl-C, then exit with status 0.

The shape of a service run by systemd, a container or a process manager: one
client, handlers that do the work, and ``client.run(handle_signals=True)``,
which on SIGINT or SIGTERM closes the client and returns normally, so the
program can report and exit cleanly instead of dying with a traceback.

Run it against a development feed::

    chatfeed serve --port 3001            # prints the token to use
    CHATFEED_TOKEN=... python examples/worker.py

``CHATFEED_URL`` sets the feed's address (``ws://localhost:3001`` by default).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections import Counter

import chatfeed

log = logging.getLogger("worker")


async def main() -> int:
    url = os.environ.get("CHATFEED_URL", "ws://localhost:3001")
    client = chatfeed.Client(url, token=os.environ["CHATFEED_TOKEN"])
    per_chat: Counter[str] = Counter()

    @client.on("new_message")
    async def process(event: chatfeed.NewMessage) -> None:
        message = event.payload
        per_chat[message.chat_id] += 1  # the work: store, index, answer...
        log.info("handled message %s of chat %s", message.id, message.chat_id)

    try:
        await client.run(handle_signals=True)  # returns after SIGINT or SIGTERM
    except chatfeed.ChatfeedError as exc:  # a rejected token, a fatal close code, retries exhausted
        log.error("stopped: %s", exc)
        return 1
    log.info("stopped: %d message(s) in %d chat(s)", sum(per_chat.values()), len(per_chat))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(main()))
