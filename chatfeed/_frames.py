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

It does no I/O: it is fed bytes and calls two functions, one with each text
message it takes and one with the bytes it leaves to websockets, so the unit
tests compare it, chunking by chunking, with websockets' parser alone. The
connection gives it functions that put both kinds of message in one queue,
websockets' own, so that the order on the wire is the order of delivery.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["FrameSplitter"]

_TEXT_FIN = 0x81  # FIN, no reserved bits, opcode 1 (text)
_OP_CONT, _OP_TEXT, _OP_BINARY = 0x0, 0x1, 0x2


class FrameSplitter:
    """Splits a server's byte stream into text messages of its own and bytes for websockets.

    Args:
        max_size: The largest message accepted; a larger frame goes to
            websockets, which fails the connection with 1009.
        take: Called with each text message taken here, in order.
        forward: Feeds bytes to websockets' parser, in order; returns whether
            the connection is still open there (after a close frame or a
            failure it is not, and from then on every byte goes to websockets).
        largest: The largest text frame taken here. A larger one goes to
            websockets, whose reader collects a frame that arrives in many
            reads in linear time; the splitter would join its reads again
            and again.
    """

    __slots__ = ("_buffer", "_forward", "_fragmented", "_largest", "_remaining", "_take", "done")

    def __init__(
        self,
        max_size: int,
        take: Callable[[str], object],
        forward: Callable[[bytes], bool],
        *,
        largest: int = 65536,
    ) -> None:
        # Beyond max_size, websockets fails the connection (1009): its to do.
        self._largest = min(largest, max_size)
        self._take = take
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
        take = self._take
        largest = self._largest
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
            if first == _TEXT_FIN and not masked and length <= largest and not self._fragmented:
                end = position + header + length
                if end > size:
                    break
                try:
                    text = buffer[position + header : end].decode()
                except UnicodeDecodeError:
                    pass  # websockets fails the connection with 1007 when the message is read
                else:
                    take(text)
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
        if opcode in (_OP_TEXT, _OP_BINARY):
            self._fragmented = not first & 0x80
        elif opcode == _OP_CONT and first & 0x80:
            self._fragmented = False

    def _stop(self, rest: bytes) -> None:
        self.done = True
        self._buffer = b""
        if rest:
            self._forward(rest)
