"""The command line: ``chatfeed listen``, ``chatfeed serve`` and ``chatfeed demo``.

Events go to standard output, one per line; connection state and errors go to
standard error, so that ``chatfeed listen ... | jq`` sees only events.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import ClassVar, TextIO

from ._client import Client
from ._logging import redact_url
from ._policy import Backoff
from ._version import __version__
from .exceptions import AuthenticationError, ChatfeedError, ConnectionFailedError, HandshakeError, UsageError
from .models import Connected, Disconnected, FeedEvent, NewChat, NewMessage, UnknownMessage
from .testing import FeedServer, synthetic_conversation

__all__ = ["main"]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_UNREACHABLE = 4

_TOKEN_VARIABLE = "CHATFEED_TOKEN"

_EVENT_TYPES = ("new_message", "new_chat", "error", "unknown")
"""What ``--type`` accepts: ``unknown`` stands for every type this version does not know."""

_LISTEN_EPILOG = f"""\
The token is read from ${_TOKEN_VARIABLE} unless --token is given. Prefer the
variable: a command line is visible to every user of the machine (ps).

exit status: 0 on Ctrl-C, when --count is reached or when the reader of the
output goes away (| head), 2 on bad usage, 3 when the server rejects the
token, 4 when the server cannot be reached and reconnection is off or exhausted
(or the server refuses the client for good).
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], Awaitable[int]] = args.run
    try:
        return asyncio.run(_until_interrupted(command(args)))
    except UsageError as exc:
        parser.exit(EXIT_USAGE, f"chatfeed: error: {exc}\n")
    except BrokenPipeError:
        # The reader of our output went away (``| head``): not an error.
        _discard_further_output(sys.stdout)
        return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatfeed",
        description="Listen to a chat feed, serve one for development, or watch a demo of both.",
    )
    parser.add_argument("--version", action="version", version=f"chatfeed {__version__}")
    parser.set_defaults(run=_demo, duration=6.0, format=None, no_color=False)
    commands = parser.add_subparsers(title="commands", metavar="{listen,serve,demo}")

    listen = commands.add_parser(
        "listen",
        help="print every event of a feed as it arrives",
        description="Connect to a chat feed, authenticate, and print every event until Ctrl-C.",
        epilog=_LISTEN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    listen.add_argument("url", help="the feed's address, ws:// or wss://")
    listen.add_argument("--token", help=f"the JWT (default: ${_TOKEN_VARIABLE}, which is safer)")
    _add_output_options(listen)
    listen.add_argument(
        "--type",
        dest="types",
        action="append",
        choices=_EVENT_TYPES,
        metavar="TYPE",
        help=(
            "print only events of this type: new_message, new_chat, error, or unknown (any type this "
            "version of chatfeed does not know); repeatable"
        ),
    )
    listen.add_argument("--chat", metavar="ID", help="print only messages of this chat, and the chat itself")
    listen.add_argument("--count", type=_positive_int, metavar="N", help="exit after printing N events")
    listen.add_argument("--no-reconnect", action="store_true", help="exit at the first failure instead of retrying")
    listen.add_argument(
        "--max-attempts", type=_positive_int, metavar="N", help="give up after N failed attempts in a row"
    )
    listen.add_argument("-v", "--verbose", action="store_true", help="log connection details (never the token)")
    listen.set_defaults(run=_listen)

    serve = commands.add_parser(
        "serve",
        help="run a development feed with a synthetic conversation",
        description=(
            "Serve the chat feed protocol on a local port and push a synthetic conversation: new chats, "
            "user and assistant messages with precis, audio URLs and the occasional fallback. A browser "
            "front end following the backend's guide can connect to it. Ctrl-C stops it."
        ),
    )
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=3001, help="the port (default: 3001; 0 picks a free one)")
    serve.add_argument(
        "--token",
        dest="tokens",
        action="append",
        metavar="TOKEN",
        help="a token to accept; repeatable (default: one generated and printed at start-up)",
    )
    serve.add_argument("--rate", type=_positive_float, default=1.0, help="events per second (default: 1)")
    serve.add_argument("--seed", type=int, help="seed of the synthetic conversation, for a repeatable feed")
    serve.set_defaults(run=_serve)

    demo = commands.add_parser(
        "demo",
        help="run a feed and a listener in one process (the default command)",
        description=(
            "Start a development feed on a free loopback port and a listener against it, show the live "
            "events for a few seconds, stop the server for a moment while the feed goes on, so that the "
            "reconnect and the backfill of what was missed are visible, and print a summary."
        ),
    )
    demo.add_argument("--duration", type=_positive_float, default=6.0, help="seconds to run (default: 6)")
    _add_output_options(demo, default="pretty")
    demo.set_defaults(run=_demo)
    return parser


def _add_output_options(
    parser: argparse.ArgumentParser, default: str = "pretty on a terminal, jsonl otherwise"
) -> None:
    parser.add_argument(
        "--format",
        choices=("jsonl", "pretty"),
        help=f"one JSON object per line, as on the wire, or a readable line per event (default: {default})",
    )
    parser.add_argument("--no-color", action="store_true", help="no colours in the pretty format (also: $NO_COLOR)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {value}")
    return value


async def _until_interrupted(command: Awaitable[int]) -> int:
    """Run ``command``; on SIGINT or SIGTERM, cancel it and return 0."""
    task = asyncio.ensure_future(command)
    loop = asyncio.get_running_loop()
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupt)
    try:
        return await task
    except asyncio.CancelledError:
        if interrupted:
            return EXIT_OK
        raise
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


# Output


class _Printer:
    """Writes events to standard output as JSON lines or readable lines.

    When the reader of the output goes away (``chatfeed listen ... | head -1``),
    the printer stops writing and sets `closed`, for the command to stop.
    """

    _COLORS: ClassVar[dict[str, str]] = {"user": "32", "assistant": "35", "new_chat": "36", "error": "31", "dim": "2"}

    def __init__(self, output_format: str | None, *, no_color: bool, out: TextIO = sys.stdout) -> None:
        self._out = out
        self._pretty = (output_format or ("pretty" if out.isatty() else "jsonl")) == "pretty"
        self._color = self._pretty and not no_color and "NO_COLOR" not in os.environ and out.isatty()
        self.closed = asyncio.Event()

    def __call__(self, event: FeedEvent) -> None:
        if self.closed.is_set():
            return
        line = self._pretty_line(event) if self._pretty else event.model_dump_json(by_alias=True, exclude_unset=True)
        try:
            self._out.write(line + "\n")
            self._out.flush()
        except BrokenPipeError:
            _discard_further_output(self._out)
            self.closed.set()

    def _paint(self, text: str, key: str) -> str:
        code = self._COLORS.get(key)
        return f"\x1b[{code}m{text}\x1b[0m" if self._color and code else text

    def _pretty_line(self, event: FeedEvent) -> str:
        if isinstance(event, NewMessage):
            message = event.payload
            role = str(message.role)
            when = f"{message.created_at.astimezone():%H:%M:%S}"
            line = f"{when} [chat {message.chat_id}] {self._paint(role, role)}: {message.content}"
            extras = [f"precis: {message.precis}"] if message.precis else []
            if message.audio_url:
                extras.append("audio")
            if message.fallback_used:
                extras.append("fallback")
            if event.source == "backfill":
                extras.append("backfill")
            return line + (" " + self._paint(f"({'; '.join(extras)})", "dim") if extras else "")
        if isinstance(event, NewChat):
            chat = event.payload
            when = f"{chat.created_at.astimezone():%H:%M:%S}"
            line = f"{when} {self._paint('new chat', 'new_chat')} {chat.id}: {chat.title}"
            return line + (" " + self._paint("(backfill)", "dim") if event.source == "backfill" else "")
        if event.type == "error":
            return f"{self._paint('server error', 'error')}: {event.message}"
        return f"{self._paint(event.type, 'dim')}: {event.model_dump_json(by_alias=True)}"


def _discard_further_output(stream: TextIO) -> None:
    """Point ``stream``'s file descriptor at the null device, once its reader has gone away."""
    # What is still buffered is flushed again when Python exits; into a closed
    # pipe, that would print a second BrokenPipeError after we exited cleanly.
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)


def _not_giving_up(record: logging.LogRecord) -> bool:
    # listen explains the error that stopped the client, with what to do about
    # it, just before exiting: the client's own warning would say it twice.
    return not getattr(record, "chatfeed_gave_up", False)


def _log_to_stderr(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("chatfeed: %(message)s"))
    handler.addFilter(_not_giving_up)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("chatfeed").setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        logging.getLogger("websockets").setLevel(logging.DEBUG)


def _say(text: str) -> None:
    print(f"chatfeed: {text}", file=sys.stderr, flush=True)


# listen


def _wanted(event: FeedEvent, types: set[str] | None, chat: str | None) -> bool:
    type_name = "unknown" if isinstance(event, UnknownMessage) else event.type
    if types is not None and type_name not in types:
        return False
    if chat is None:
        return True
    if isinstance(event, NewMessage):
        return event.payload.chat_id == chat
    if isinstance(event, NewChat):
        return event.payload.id == chat
    return False


async def _listen(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get(_TOKEN_VARIABLE)
    if not token:
        raise UsageError(f"no token: set ${_TOKEN_VARIABLE} (or pass --token)")
    reconnect: Backoff | bool = False if args.no_reconnect else Backoff(max_attempts=args.max_attempts)
    client = Client(args.url, token=token, reconnect=reconnect)
    _log_to_stderr(args.verbose)
    printer = _Printer(args.format, no_color=args.no_color)
    types = set(args.types) if args.types else None
    printed = 0
    counted = asyncio.Event()

    @client.on("new_message")
    @client.on("new_chat")
    @client.on("error")
    @client.on("unknown")
    def show(event: FeedEvent) -> None:
        nonlocal printed
        if printed == args.count or not _wanted(event, types, args.chat):
            return
        printer(event)
        printed += 1
        if printed == args.count:
            counted.set()

    _say(f"connecting to {redact_url(args.url)}")
    running = asyncio.ensure_future(client.run())
    finished = [asyncio.ensure_future(counted.wait()), asyncio.ensure_future(printer.closed.wait())]
    try:
        await asyncio.wait([running, *finished], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in finished:
            waiter.cancel()
        await client.close()
        await asyncio.wait([running, *finished])
    if running.cancelled() or running.exception() is None:
        return EXIT_OK
    return _explain(running.exception(), args.url)


def _explain(error: BaseException | None, url: str) -> int:
    if isinstance(error, AuthenticationError) or (
        isinstance(error, HandshakeError) and error.status_code in (401, 403)
    ):
        _say(f"{error}. Check the token (${_TOKEN_VARIABLE} or --token): it may be wrong or expired.")
        return EXIT_AUTH
    if isinstance(error, ConnectionFailedError):
        _say(f"cannot reach the feed: {error}. Is the server running, and is the address right?")
        return EXIT_UNREACHABLE
    if isinstance(error, UsageError):
        raise error
    if isinstance(error, ChatfeedError):
        _say(str(error))
        return EXIT_UNREACHABLE
    raise error or RuntimeError("no error to explain")


# serve


async def _serve(args: argparse.Namespace) -> int:
    tokens = args.tokens or [secrets.token_urlsafe(16)]
    server = FeedServer(tokens=tokens, host=args.host, port=args.port)
    try:
        await server.start()
    except OSError as exc:
        _say(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
        return EXIT_USAGE
    try:
        _say(f"serving the chat feed on {server.url} ({args.rate:g} events per second); Ctrl-C stops it")
        if not args.tokens:
            _say(f"token: {tokens[0]}")
        await server.play(synthetic_conversation(seed=args.seed), rate=args.rate)
    finally:
        await server.stop()
    return EXIT_OK


# demo


async def _demo(args: argparse.Namespace) -> int:
    token = secrets.token_urlsafe(16)
    printer = _Printer(args.format or "pretty", no_color=args.no_color)
    received = backfilled = reconnects = 0
    away = 0.0

    async with FeedServer(tokens=[token]) as server:
        client = Client(
            server.url,
            token=token,
            reconnect=Backoff(initial=0.25, maximum=1.0),
            # What the server pushed while the client was away, from its
            # history: an application fetches it over the backend's REST API.
            backfill=lambda gap: server.history(since=gap.since),
            dedupe=True,
        )

        @client.on("connected")
        def connected(event: Connected) -> None:
            nonlocal reconnects, away
            if event.is_reconnect:
                reconnects += 1
                away += event.downtime or 0.0
                _say(f"reconnected after {event.downtime or 0.0:.2f} s away; backfilling what was missed")
            else:
                _say(f"connected to the demo feed on {server.url}")

        @client.on("disconnected")
        def disconnected(event: Disconnected) -> None:
            _say(f"disconnected (code {event.code}); reconnecting in {event.retry_in or 0.0:.2f} s")

        @client.on("new_message")
        @client.on("new_chat")
        def show(event: FeedEvent) -> None:
            nonlocal received, backfilled
            received += 1
            if event.source == "backfill":
                backfilled += 1
            printer(event)

        async with client:
            feed = asyncio.ensure_future(server.play(synthetic_conversation(), rate=4.0))
            loop = asyncio.get_running_loop()
            ends_at = loop.time() + args.duration
            down = min(args.duration / 4, 1.0)
            try:
                # Nobody to show the rest to once the output's reader has gone (``| head``).
                if not await _wait_until_set(printer.closed, args.duration / 2):
                    _say(f"stopping the server for {down:.2f} s; the feed goes on meanwhile")
                    reconnected = client.expect("connected")
                    await server.stop()
                    await asyncio.sleep(down)  # nothing is shown meanwhile, so nothing to stop for
                    await server.start()
                    # The next attempt comes within the backoff's maximum: the
                    # reconnect, and what it backfills, are part of the demo.
                    with contextlib.suppress(TimeoutError):
                        await reconnected.wait(timeout=5.0)
                    await _wait_until_set(printer.closed, max(ends_at - loop.time(), 0.5))
            finally:
                feed.cancel()
                await asyncio.wait([feed])

    _say(
        f"demo done: {received} events received ({backfilled} from backfill), {reconnects} reconnect(s), "
        f"{away:.2f} s away"
    )
    return EXIT_OK


async def _wait_until_set(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds have passed; return whether it is set."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)
    return event.is_set()
