"""The fast frame path: whole text frames cut out of the byte stream, the rest left to websockets.

Almost every frame of the feed is a small, unfragmented, unmasked text frame
with a JSON document in it. Parsing one takes websockets' frame parser a
generator, a `Frame` object, an event and a queue; `FrameSplitter` takes one
slice and one ``decode()``. Everything else (control frames, binary and
fragmented messages, oversize frames, invalid UTF-8, reserved bits, masked
frames, the closing handshake, anything after a failure) is handed, byte for
byte and in order, to websockets' own sans-I/O parser, which handles it as if
the splitter were not there. The splitter is used only when no extension
(compression) was negotiated, so a frame on the wire is the message.

It does no I/O: it is fed bytes and writes to an output queue and a
``forward`` function, so the unit tests compare it, chunking by chunking,
with websockets' parser alone.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Final

__all__ = ["END", "NEXT_FROM_WEBSOCKETS", "FrameSplitter"]


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEXT_FROM_WEBSOCKETS: Final = _Marker("NEXT_FROM_WEBSOCKETS")
"""In the output queue: the next message is websockets' (``recv()`` returns it), in this place."""

END: Final = _Marker("END")
"""In the output queue: from here on every message is websockets', and the splitter is done."""

_TEXT_FIN = 0x81  # FIN, no reserved bits, opcode 1 (text)
_OP_CONT, _OP_TEXT, _OP_BINARY = 0x0, 0x1, 0x2


class FrameSplitter:
    """Splits a server's byte stream into text messages of its own and bytes for websockets.

    Args:
        max_size: The largest message accepted; a larger frame goes to
            websockets, which fails the connection with 1009.
        out: Where messages go, in order: a ``str`` for each text frame taken
            here, `NEXT_FROM_WEBSOCKETS` where websockets' parser will yield
            the next message, and `END` once the splitter has stopped.
        forward: Feeds bytes to websockets' parser; returns whether the
            connection is still open there (after a close frame or a failure,
            it is not, and from then on every byte goes to websockets).
    """

    __slots__ = ("_buffer", "_forward", "_fragmented", "_max_size", "_out", "_remaining", "done")

    def __init__(
        self,
        max_size: int,
        out: collections.deque[str | _Marker],
        forward: Callable[[bytes], bool],
    ) -> None:
        self._max_size = max_size
        self._out = out
        self._forward = forward
        self._buffer = b""
        self._remaining = 0  # bytes still to forward of a frame that websockets parses
        self._fragmented = False  # inside a fragmented message: every frame is websockets'
        self.done = False

    def feed(self, data: bytes) -> None:
        """Take the bytes that arrived."""
        if self.done:
            self._forward(data)
            return
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        size = len(buffer)
        position = 0
        append = self._out.append
        max_size = self._max_size
        while True:
            if self._remaining:
                end = min(position + self._remaining, size)
                self._remaining -= end - position
                still_open = self._forward(buffer[position:end])
                position = end
                if not still_open:
                    self._stop(buffer[position:])
                    return
                if self._remaining:
                    return
                continue
            if size - position < 2:
                break
            first = buffer[position]
            length = buffer[position + 1]
            masked = length & 0x80
            length &= 0x7F
            header = 6 if masked else 2
            if length == 126:
                if size - position < 4:
                    break
                length = (buffer[position + 2] << 8) | buffer[position + 3]
                header += 2
            elif length == 127:
                if size - position < 10:
                    break
                length = int.from_bytes(buffer[position + 2 : position + 10], "big")
                header += 8
            # A server must not mask; websockets fails the connection for it.
            if first == _TEXT_FIN and not masked and length <= max_size and not self._fragmented:
                end = position + header + length
                if end > size:
                    break
                try:
                    text = buffer[position + header : end].decode()
                except UnicodeDecodeError:
                    pass  # websockets fails the connection with 1007 when the message is read
                else:
                    append(text)
                    position = end
                    continue
            self._take_over(first, header + length)
        self._buffer = buffer[position:]

    def flush(self) -> None:
        """Hand websockets the bytes of an incomplete frame, before the end of the stream."""
        if not self.done:
            self._stop(self._buffer)

    def _take_over(self, first: int, size: int) -> None:
        # The frame that starts here is websockets' to parse: its bytes are
        # forwarded as they come, and its message, if it starts one, is
        # websockets' to deliver, in this place.
        self._remaining = size
        opcode = first & 0x0F
        fin = first & 0x80
        if opcode in (_OP_TEXT, _OP_BINARY):
            self._out.append(NEXT_FROM_WEBSOCKETS)
            self._fragmented = not fin
        elif opcode == _OP_CONT and fin:
            self._fragmented = False

    def _stop(self, rest: bytes) -> None:
        self.done = True
        self._buffer = b""
        self._out.append(END)
        if rest:
            self._forward(rest)
