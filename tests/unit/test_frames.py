"""The fast frame path against websockets' own parser: same messages, same failures, whatever the bytes.

Both sides are sans-I/O: websockets' ``ClientProtocol`` fed every byte (the
reference), and `FrameSplitter` in front of a second ``ClientProtocol`` that
gets only what the splitter forwards (the fast path). A message is read as
``recv()`` would read it: fragments joined, text decoded, and invalid UTF-8
failing the connection with 1007.
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN
from websockets.uri import parse_uri

from chatfeed._frames import FrameSplitter
from chatfeed._logging import redacting_logger

MAX_SIZE = 64


@dataclass
class Reader:
    """Reads messages from a ClientProtocol's events as the asyncio connection's recv() does."""

    protocol: ClientProtocol
    fragments: list[Frame] = field(default_factory=list)
    messages: collections.deque[str | bytes] = field(default_factory=collections.deque)

    def take_events(self) -> None:
        for event in self.protocol.events_received():
            assert isinstance(event, Frame)
            if event.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                self.fragments.append(event)
                if event.fin:
                    first = self.fragments[0]
                    data = b"".join(frame.data for frame in self.fragments)
                    self.fragments = []
                    self.messages.append(data if first.opcode is Opcode.BINARY else _Text(data))


class _Text(bytes):
    """A text message not decoded yet: recv() decodes when it reads it."""


def protocol() -> ClientProtocol:
    # chatfeed's logger for websockets: websockets 15 cannot log a text frame that is not UTF-8.
    logger = redacting_logger("websockets.client")
    return ClientProtocol(parse_uri("ws://feed.test/"), state=OPEN, max_size=MAX_SIZE, logger=logger)


Outcome = tuple[list[object], object, object, object, int]


def read(message: str | bytes, protocol: ClientProtocol) -> tuple[object, bool]:
    """What recv() gives for a message: the message, or a 1007 failure (then reading stops)."""
    if isinstance(message, _Text):
        try:
            return bytes(message).decode(), True
        except UnicodeDecodeError:
            if protocol.state is OPEN:
                protocol.fail(1007, "invalid UTF-8")
            return "fail 1007", False
    return message, True


def outcome(protocol: ClientProtocol, messages: list[object], sent: int) -> Outcome:
    return (
        messages,
        protocol.state,
        protocol.close_rcvd and (protocol.close_rcvd.code, protocol.close_rcvd.reason),
        protocol.close_sent and protocol.close_sent.code,
        sent + sum(len(data) for data in protocol.data_to_send()),
    )


def reference(chunks: list[bytes]) -> Outcome:
    ws = protocol()
    reader = Reader(ws)
    sent = 0
    for chunk in chunks:
        ws.receive_data(chunk)
        reader.take_events()
        sent += sum(len(data) for data in ws.data_to_send())
    ws.receive_eof()
    reader.take_events()
    messages: list[object] = []
    while reader.messages:
        message, go_on = read(reader.messages.popleft(), ws)
        messages.append(message)
        if not go_on:
            break
    return outcome(ws, messages, sent)


def fast(chunks: list[bytes], largest: int = MAX_SIZE) -> Outcome:
    ws = protocol()
    reader = Reader(ws)
    # One queue for both kinds of message, as on the connection: the text
    # messages the splitter takes, and websockets' messages as it parses them.
    queue: list[str | bytes] = []
    sent = 0

    def forward(data: bytes) -> bool:
        nonlocal sent
        ws.receive_data(data)
        reader.take_events()
        queue.extend(reader.messages)
        reader.messages.clear()
        sent += sum(len(data) for data in ws.data_to_send())
        return ws.state is OPEN

    splitter = FrameSplitter(MAX_SIZE, queue.append, forward, largest=largest)
    for chunk in chunks:
        splitter.feed(chunk)
    splitter.flush()
    ws.receive_eof()
    reader.take_events()
    queue.extend(reader.messages)
    messages: list[object] = []
    for message in queue:
        if isinstance(message, str):
            messages.append(message)
            continue
        read_message, go_on = read(message, ws)
        messages.append(read_message)
        if not go_on:
            break
    return outcome(ws, messages, sent)


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = False, width: int = 0) -> bytes:
    """Encode a server frame by hand, so that it may break every rule."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    length = len(payload)
    mask_bit = 0x80 if mask else 0
    if width == 0:
        width = 1 if length < 126 else 2 if length < 65536 else 8
    if width == 1:
        head += bytes([mask_bit | length])
    elif width == 2:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if mask:
        key = b"\x01\x02\x03\x04"
        head += key
        payload = bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))
    return head + payload


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    chunks, start = [], 0
    for point in [*points, len(data)]:
        chunks.append(data[start:point])
        start = point
    return [chunk for chunk in chunks if chunk]


def same(data: bytes, cuts: list[int]) -> None:
    chunks = split(data, cuts)
    expected = reference(chunks)
    assert fast(chunks) == expected
    assert fast(chunks, largest=20) == expected  # frames over 20 bytes left to websockets


# Hand-picked streams


TEXT = frame(0x1, b'{"type": "error", "message": "hi"}')


@pytest.mark.parametrize(
    "data",
    [
        TEXT * 3,
        frame(0x1, "é😀".encode()) + TEXT,
        frame(0x1, b'"' + b"x" * 200 + b'"', width=2),
        frame(0x1, b"x" * (MAX_SIZE + 1)) + TEXT,  # oversize: 1009
        frame(0x1, b"\xff\xfe") + TEXT,  # invalid UTF-8: 1007 when read
        frame(0x2, b"\x00\x01") + TEXT,  # binary, then text: in order
        frame(0x1, b"frag", fin=False) + frame(0x9, b"ping") + frame(0x0, b"ment") + TEXT,
        frame(0x1, b"frag", fin=False) + TEXT,  # a new message inside a fragmented one: 1002
        frame(0x0, b"orphan") + TEXT,  # a continuation with nothing to continue: 1002
        frame(0x9, b"ping") + TEXT,  # answered with a pong
        frame(0x8, struct.pack("!H", 1000) + b"bye") + TEXT,  # nothing after a close
        frame(0x1, b"masked", mask=True) + TEXT,  # a server must not mask: 1002
        frame(0x1, b"reserved", rsv=4) + TEXT,  # no extension: 1002
        frame(0x3, b"") + TEXT,  # reserved opcode: 1002
        frame(0x1, b"short", width=2) + frame(0x1, b"shorter", width=8) + TEXT,  # lengths not minimal
        frame(0x1, b"x" * 10)[:-3],  # cut off by the end of the stream
        b"\x81",  # half a header
        frame(0x1, b"", width=8)[:5],
    ],
)
def test_hand_picked_streams_in_every_two_piece_chunking(data: bytes) -> None:
    for cut in range(len(data) + 1):
        same(data, [cut])
    same(data, list(range(len(data))))  # a byte at a time


# Random streams


payloads = st.one_of(
    st.text(max_size=40).map(str.encode),
    st.binary(max_size=40),
    st.binary(min_size=MAX_SIZE - 2, max_size=MAX_SIZE + 2),
    st.just(b"\xed\xa0\x80"),  # an encoded surrogate: not UTF-8
)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    opcode = draw(st.sampled_from([0x1] * 8 + [0x2, 0x0, 0x9, 0xA, 0x8, 0x3, 0xB]))
    payload = draw(payloads)
    if opcode == 0x8:
        payload = struct.pack("!H", draw(st.sampled_from([1000, 1001, 4000, 999]))) + payload[:20]
    if opcode in (0x8, 0x9, 0xA):
        payload = payload[: draw(st.sampled_from([125, 126]))]
    return frame(
        opcode,
        payload,
        fin=draw(st.booleans()) if opcode in (0x0, 0x1, 0x2) and draw(st.integers(0, 5)) == 0 else True,
        rsv=draw(st.sampled_from([0] * 20 + [1, 4])),
        mask=draw(st.integers(0, 30)) == 0,
        width=draw(st.sampled_from([0] * 6 + [2, 8])),
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames(), max_size=12), st.lists(st.integers(min_value=0), max_size=8))
def test_random_streams_in_random_chunkings_match_websockets(streamed: list[bytes], cuts: list[int]) -> None:
    same(b"".join(streamed), cuts)
