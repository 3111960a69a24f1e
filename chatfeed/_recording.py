"""Recordings of a feed: `Recorder` writes one, `read_recording` reads it back for a replay.

A recording is a JSON lines file. Its first line is a header::

    {"format": "chatfeed-recording", "version": 1, "started_at": "2026-11-26T18:08:06.123456Z",
     "url": "wss://api.example.com/feed?session=***", "chatfeed": "1.4.0"}

and every other line one frame, as it arrived::

    {"t": 0.012345, "text": "{\\"type\\":\\"new_message\\",...}"}
    {"t": 0.5, "feed": "user-17", "binary": "eyJ0eXBlIjoi..."}

``t`` is the seconds since the recording started (a monotonic clock, so a
change of the wall clock does not show), ``feed`` the key of a pool's feed
(absent for a lone client), ``text`` a text frame exactly as received (token
scrubbed) and ``binary`` a binary frame, base64-encoded. Lines are written
whole, so a process that dies leaves a file that is valid up to its last
flushed line. [`FeedServer.replay`][chatfeed.testing.FeedServer.replay] plays
a recording back.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from ._logging import Scrubber, redact_url
from ._observe import Observer
from ._version import __version__
from .exceptions import UsageError

__all__ = ["FORMAT", "VERSION", "RecordedFrame", "Recorder", "Recording", "read_recording"]

logger = logging.getLogger("chatfeed")

FORMAT = "chatfeed-recording"
"""The header's ``format``: what says that a file is a recording."""

VERSION = 1
"""The version of the format written; a reader refuses a newer one."""

_FLUSH_SIZE = 1 << 16
"""Bytes of lines held before they are written, whatever the flush interval."""


class Recorder(Observer):
    """Write every frame a client or a pool receives to a file, with its arrival time.

    An [`Observer`][chatfeed.Observer]: pass it as ``observer=`` to a
    [`Client`][chatfeed.Client] or a [`Pool`][chatfeed.Pool]. Each frame an
    authenticated connection receives is written to ``path`` as one JSON
    line: the seconds since the recorder was made, the pool's feed key, and
    the frame exactly as it arrived, after the token was scrubbed from it
    (``***`` in its place). The auth frame the client sends is never
    recorded. A header line comes first: the format and its version, when
    the recording started (UTC) and the feed's address, without
    credentials, query values or the token.
    [`FeedServer.replay`][chatfeed.testing.FeedServer.replay] plays the file
    back in a test, at the recorded pace or faster.

    Lines are held in memory and written (whole lines only) every
    ``flush_interval`` seconds, when 64 KiB are held, and by
    [`close`][chatfeed.Recorder.close]: a process that is killed leaves a
    valid file, up to the last line written. Close the recorder after the
    client, or use it as a context manager around it. The file is created
    readable by its owner only (it holds the messages' content) and
    replaced if it exists.

    Args:
        path: The file to write.
        flush_interval: The most seconds a frame is held before it is written.

    Raises:
        UsageError: ``flush_interval`` is not a positive number.
        OSError: The file cannot be created.

    Example:
        ```python
        with chatfeed.Recorder("feed.jsonl") as recorder:
            client = chatfeed.Client(url, token=jwt, observer=recorder)
            await client.run(handle_signals=True)  # until Ctrl-C
        ```
    """

    def __init__(self, path: str | os.PathLike[str], *, flush_interval: float = 1.0) -> None:
        if isinstance(flush_interval, bool) or not isinstance(flush_interval, (int, float)) or not flush_interval > 0:
            raise UsageError(f"flush_interval must be a positive number of seconds, not {flush_interval!r}")
        self._path = os.fspath(path)
        self._flush_interval = float(flush_interval)
        self._started = time.monotonic()
        self._started_at = datetime.now(timezone.utc)
        self._subject: object | None = None
        self._header_written = False
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._flush_due = False  # a timer will flush what is pending
        self._frames = 0
        self._closed = False
        self._error: OSError | None = None
        # A blocking client's observers run on its event loop's thread, and
        # close() may come from another one.
        self._lock = threading.Lock()
        # os.open: created with its mode, never readable by others even for a moment;
        # an existing file keeps its own, so it is set again.
        self._fd: int | None = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_BINARY, 0o600)
        if hasattr(os, "fchmod"):  # not on Windows
            os.fchmod(self._fd, 0o600)

    def __repr__(self) -> str:
        return f"<chatfeed.Recorder path={self._path!r} frames={self._frames}{' closed' if self._closed else ''}>"

    @property
    def path(self) -> str:
        """The file written."""
        return self._path

    @property
    def frames(self) -> int:
        """How many frames were recorded so far."""
        return self._frames

    @property
    def error(self) -> OSError | None:
        """Why the recording stopped early (a full disk, say), or ``None``.

        A write that fails is logged once, at ERROR; the recorder then closes
        its file, which holds every line written before, and records nothing more.
        """
        return self._error

    def attached(self, subject: object) -> None:
        """Remember the client or pool recorded, whose address the header gives."""
        if self._subject is None:
            self._subject = subject

    def frame_received(self, feed: str | None, frame: str | bytes) -> None:
        """Record ``frame``, received now by ``feed``."""
        line: dict[str, Any] = {"t": round(time.monotonic() - self._started, 6)}
        if feed is not None:
            line["feed"] = feed
        if isinstance(frame, str):
            line["text"] = frame
        else:
            line["binary"] = base64.b64encode(frame).decode("ascii")
        text = _json_line(line)
        with self._lock:
            if self._closed:
                return
            self._pending.append(text)
            self._pending_size += len(text)
            self._frames += 1
            if self._pending_size >= _FLUSH_SIZE:
                self._write_pending()
            elif not self._flush_due:
                self._flush_due = True
                try:
                    # A timer, not a task: nothing to wait for, and it does nothing once closed.
                    asyncio.get_running_loop().call_later(self._flush_interval, self.flush)
                except RuntimeError:  # called outside an event loop: nothing will come back to flush
                    self._write_pending()

    def flush(self) -> None:
        """Write the lines held so far."""
        with self._lock:
            if not self._closed:
                self._write_pending()

    def close(self) -> None:
        """Write what is held and close the file; the frames that come after are not recorded.

        Closing twice does nothing.
        """
        with self._lock:
            if self._closed:
                return
            try:
                self._write_pending()
            finally:
                self._closed = True
                fd, self._fd = self._fd, None
                if fd is not None:
                    os.close(fd)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _write_pending(self) -> None:
        self._flush_due = False
        if not self._header_written:
            self._pending.insert(0, self._header())
            self._header_written = True
        if not self._pending or self._fd is None:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            # Called from a timer too, where an exception would only reach asyncio's handler.
            self._error = exc
            self._closed = True
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
            logger.error(
                "the recording to %s stopped: %s; it holds the frames written before, and records no more",
                self._path,
                exc.strerror or type(exc).__name__,
            )

    def _header(self) -> bytes:
        # Made at the first write rather than when attached: a pool's feeds,
        # whose tokens are scrubbed from the address, are added after.
        url = _address_of(self._subject)
        header = {
            "format": FORMAT,
            "version": VERSION,
            "started_at": self._started_at.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "url": None if url is None else _scrubbed_url(url, _tokens_of(self._subject)),
            "chatfeed": __version__,
        }
        return _json_line(header)


_O_BINARY: int = getattr(os, "O_BINARY", 0)  # Windows would translate newlines otherwise


def _json_line(value: dict[str, Any]) -> bytes:
    """Return ``value`` as one line of JSON, UTF-8 encoded."""
    try:
        return (json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which UTF-8 cannot hold: escaped instead
        return (json.dumps(value, separators=(",", ":")) + "\n").encode("ascii")


def _address_of(subject: object) -> str | None:
    options = getattr(subject, "_options", None)
    url = getattr(options, "url", None)
    return url if isinstance(url, str) else None


def _tokens_of(subject: object) -> list[str]:
    """Return the static tokens of a client, or of a pool's feeds: the secrets the address might hold."""
    from ._client import Client
    from ._pool import Pool

    if isinstance(subject, Client):
        clients: Iterable[Client] = (subject,)
    elif isinstance(subject, Pool):
        clients = subject._feeds.values()
    else:
        return []
    return [client._token for client in clients if isinstance(client._token, str)]


def _scrubbed_url(url: str, tokens: Iterable[str]) -> str:
    """Return ``url`` without credentials, query values, nor a token anywhere (a path may hold one)."""
    url = redact_url(url)
    width = Scrubber.WINDOW
    # A pool has thousands of tokens: only those sharing a run with the
    # address are worth a scrubber.
    runs = {url[i : i + width] for i in range(len(url) - width + 1)}
    for token in tokens:
        if token in url or any(run in token for run in runs):
            url = Scrubber(token)(url)
    return url


# Reading


@dataclasses.dataclass(frozen=True, slots=True)
class RecordedFrame:
    """One frame of a recording."""

    t: float
    """Seconds since the recording started."""
    feed: str | None
    """The pool's feed key, ``None`` for a lone client's."""
    frame: str | bytes
    """The frame: text, or binary."""


@dataclasses.dataclass(frozen=True, slots=True)
class Recording:
    """A recording read back: its header's fields and its frames, in the file's order."""

    started_at: str | None
    url: str | None
    frames: list[RecordedFrame]

    @property
    def feeds(self) -> list[str]:
        """The feed keys of the frames, each once, in the order they first came."""
        return list(dict.fromkeys(frame.feed for frame in self.frames if frame.feed is not None))


def read_recording(path: str | os.PathLike[str]) -> Recording:
    """Read the recording at ``path``.

    Raises:
        UsageError: The file cannot be read, or is not a recording; the
            message gives the line number and what is wrong, never the line.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise UsageError(f"cannot read the recording {name}: {exc.strerror or type(exc).__name__}") from None
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the newline that ends the last line
    header: dict[str, Any] | None = None
    frames: list[RecordedFrame] = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            if header is None:
                raise UsageError(f"{name}, line {number}: empty; a recording starts with its header line")
            continue
        try:
            value = _object_of(raw)
            if header is None:
                header = _checked_header(value)
            else:
                frames.append(_checked_frame(value))
        except ValueError as exc:
            raise UsageError(f"{name}, line {number}: {exc}") from None
    if header is None:
        raise UsageError(f"{name}, line 1: empty file; a recording starts with its header line")
    started_at, url = header.get("started_at"), header.get("url")
    return Recording(
        started_at=started_at if isinstance(started_at, str) else None,
        url=url if isinstance(url, str) else None,
        frames=frames,
    )


def _object_of(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg}, column {exc.colno})") from None
    except (ValueError, RecursionError):
        raise ValueError("not JSON") from None
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _checked_header(value: dict[str, Any]) -> dict[str, Any]:
    if value.get("format") != FORMAT:
        raise ValueError(f'not a chatfeed recording: the first line must be its header, {{"format": "{FORMAT}", ...}}')
    version = value.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f'the header\'s "version" must be a positive whole number, not {version!r}')
    if version > VERSION:
        raise ValueError(f"a recording of version {version}, newer than this chatfeed reads ({VERSION})")
    return value


def _checked_frame(value: dict[str, Any]) -> RecordedFrame:
    t = value.get("t")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise ValueError('"t" must be a number of seconds, 0 or more')
    feed = value.get("feed")
    if feed is not None and not isinstance(feed, str):
        raise ValueError('"feed" must be a string when present')
    text, binary = value.get("text"), value.get("binary")
    if (text is None) == (binary is None):
        raise ValueError('a frame needs "text" (a text frame) or "binary" (base64), and only one')
    if text is not None:
        if not isinstance(text, str):
            raise ValueError('"text" must be a string')
        return RecordedFrame(float(t), feed, text)
    if not isinstance(binary, str):
        raise ValueError('"binary" must be a base64 string')
    try:
        frame = base64.b64decode(binary, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError('"binary" is not valid base64') from None
    return RecordedFrame(float(t), feed, frame)
