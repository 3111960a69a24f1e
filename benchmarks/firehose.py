"""A feed server for benchmarks, in its own process, so that it never competes with the client measured.

It completes the WebSocket handshake and the auth exchange, then writes
pre-encoded ``new_message`` frames straight to the socket in large chunks:
the client, not the server, is the bottleneck. The token of the auth frame
says what to send:

- ``firehose:N``: N frames as fast as the client reads them;
- ``paced:RATE:SECONDS``: RATE frames per second for SECONDS, each stamped
  with its send time (``time.monotonic_ns()``, the same clock in every
  process) in ``content``.

Run: ``python benchmarks/firehose.py`` prints the port it listens on.
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys
import time

from websockets.asyncio.server import ServerConnection, serve

PAYLOAD = {
    "id": "123",
    "chatId": "17",
    "role": "assistant",
    "content": "This is the AI's response to the question about the tallest mountains of Europe.",
    "precis": "AI response summary.",
    "audioUrl": "https://path/to/audio.mp3",
    "fallbackUsed": False,
    "status": "COMPLETED",
    "createdAt": "2025-10-07T12:00:00.000Z",
}
CHUNK = 1000
"""Frames per write in firehose mode."""
WRITE_LIMIT = 1 << 20
"""Bytes the server lets queue in its transport before waiting for the client."""


def encode(text: str) -> bytes:
    """Encode one unmasked server text frame."""
    data = text.encode()
    size = len(data)
    if size < 126:
        header = struct.pack("!BB", 0x81, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + data


FRAME = encode(json.dumps({"type": "new_message", "payload": PAYLOAD}))


async def firehose(ws: ServerConnection, count: int) -> None:
    transport = ws.transport
    chunk = FRAME * CHUNK
    for sent in range(0, count, CHUNK):
        transport.write(chunk if count - sent >= CHUNK else FRAME * (count - sent))
        # websockets' flow control, with the limits given to serve(): waits
        # only while more than WRITE_LIMIT bytes are queued, until half is sent.
        await ws.drain()


async def paced(ws: ServerConnection, rate: float, seconds: float) -> None:
    transport = ws.transport
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0
    total = int(rate * seconds)
    while sent < total:
        # Every frame due by now goes out, each stamped as it is written.
        due = min(int((loop.time() - start) * rate) + 1, total)
        while sent < due:
            content = str(time.monotonic_ns())
            transport.write(encode(json.dumps({"type": "new_message", "payload": {**PAYLOAD, "content": content}})))
            sent += 1
        await asyncio.sleep(max(start + sent / rate - loop.time(), 0))


async def handler(ws: ServerConnection) -> None:
    auth = json.loads(await ws.recv())
    await ws.send(json.dumps({"type": "auth_success"}))
    mode, *args = auth["token"].split(":")
    if mode == "firehose":
        await firehose(ws, int(args[0]))
    elif mode == "paced":
        await paced(ws, float(args[0]), float(args[1]))
    await ws.wait_closed()


async def main() -> None:
    async with serve(
        handler, "127.0.0.1", 0, compression=None, max_queue=None, write_limit=(WRITE_LIMIT, WRITE_LIMIT // 2)
    ) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin


if __name__ == "__main__":
    asyncio.run(main())
