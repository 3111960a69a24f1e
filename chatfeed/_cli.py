"""The command line: ``chatfeed listen``, ``serve``, ``bridge``, ``consume`` and ``demo``.

Events go to standard output, one per line; connection state and errors go to
standard error, so that ``chatfeed listen ... | jq`` sees only events.

``listen --tokens FILE`` listens to many feeds at once through a `Pool`, and
``serve --users N`` serves that many users, their tokens written to such a
file. Tokens of a pool are only ever read from, or written to, that file:
never taken from the command line, printed or logged.

``bridge URL --tokens FILE --to BROKER`` publishes every event of such a
pool into NATS JetStream or Redis Streams (`chatfeed.bridge.Bridge`), each
feed resumed from its saved watermark with ``--backfill-url`` (the
backend's history over HTTP, `chatfeed._http_backfill`); ``consume BROKER
--durable NAME`` prints what a bridge published, as ``listen`` prints a
feed, acknowledging each event once printed. The bridge's extras (nats-py,
redis-py) are imported by these two commands only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
import secrets
import signal
import sys
import tempfile
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, TextIO

from ._client import Client
from ._http_backfill import http_backfill
from ._logging import redact_url
from ._observe import Observer
from ._policy import Backoff
from ._pool import Pool
from ._recording import Recorder, read_recording
from ._version import __version__
from .exceptions import AuthenticationError, ChatfeedError, ConnectionFailedError, HandshakeError, UsageError
from .models import Connected, Disconnected, FeedEvent, FeedStopped, NewChat, NewMessage, UnknownMessage
from .testing import FeedServer, _is_handshake, synthetic_conversation

if TYPE_CHECKING:
    from .bridge import Bridge, Record, Sink
    from .prometheus import MetricsServer

__all__ = ["main"]

EXIT_OK = 0
EXIT_BROKER = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_UNREACHABLE = 4

_TOKEN_VARIABLE = "CHATFEED_TOKEN"

_EVENT_TYPES = ("new_message", "new_chat", "error", "unknown")
"""What ``--type`` accepts: ``unknown`` stands for every type this version does not know."""

_LISTEN_EPILOG = f"""\
The token is read from ${_TOKEN_VARIABLE} unless --token is given. Prefer the
variable: a command line is visible to every user of the machine (ps).

With --tokens FILE, listen to many feeds at once: FILE holds one JSON object
per line, {{"feed": "<key>", "token": "<jwt>"}}, and every event printed says
its feed ("feed" in JSON lines, a prefix in the pretty format). A feed that
stops is reported on stderr; the others go on.

exit status: 0 on Ctrl-C, when --count is reached or when the reader of the
output goes away (| head), 2 on bad usage, 3 when the server rejects the
token, 4 when the server cannot be reached and reconnection is off or exhausted
(or the server refuses the client for good). With --tokens, 3 or 4 only once
every feed has stopped: 3 if every token was rejected, 4 otherwise.

With --record FILE, every frame received is also written to FILE (JSON lines,
token scrubbed, with its arrival time and, with --tokens, its feed), for
`chatfeed serve --replay FILE` or FeedServer.replay to play back.
"""

_SERVE_EPILOG = """\
With --users N, each user has a token and a conversation of its own, pushed to
that user's connections only; the tokens are generated at each start and
written to the --tokens-file (mode 0600, never printed), one
{"feed": "user-1", "token": "..."} per line, for `chatfeed listen URL --tokens FILE`.

With --replay FILE (a `listen --record` file), the recording is played instead,
its gaps divided by --speed, once a client has authenticated; then the server
goes on serving (--exit-when-done: it exits; --loop: it plays it again). With
--tokens-file, a recording of many feeds gets a user per feed, named after the
feed, whose token is written there: `listen --tokens FILE` gets each feed's
frames on the same feed, and the replay starts once every feed is connected.
"""

_BRIDGE_EPILOG = """\
FILE is a tokens file as for `chatfeed listen --tokens`; a line that is not a
feed is reported (its line number, never its content) and skipped, and a feed
whose token is rejected is reported by its key: the other feeds are bridged.

Each event becomes an envelope: NATS subjects <prefix>.<feed>.<chat> in the
stream --stream, or Redis streams <prefix>:{P} for P below --partitions. Each
feed's watermark is kept in the broker; with --backfill-url, a bridge started
again fetches what its feeds missed since then (`chatfeed serve` serves it:
give its ws:// address, taken as http://HOST:PORT/history), and the broker
stores what it had already only once.

With --shard K/N, N bridges given the same tokens file share the feeds: each
takes those whose key falls to its shard by rendezvous hashing, so that going
from N to N + 1 shards moves about 1/(N + 1) of the feeds, all to the new one.

A summary line (received, published, duplicates, held) goes to stderr every
--summary-every seconds when it changed, and at exit.

exit status: 0 on Ctrl-C or SIGTERM (held events are published, watermarks
saved), 1 when the broker cannot be reached within --broker-wait, 2 on bad
usage; 3 or 4, as for listen, once every feed has stopped.
"""

_CONSUME_EPILOG = """\
Several `chatfeed consume` with the same --durable share the events. An event
is acknowledged once printed; one not printed (Ctrl-C, or the reader of the
output gone) comes back to the next reader of the durable. --stream and
--prefix (JetStream) or --prefix and --partitions (Redis) must be the bridge's.

exit status: 0 on Ctrl-C or SIGTERM, or when the reader of the output goes
away, 1 when the broker cannot be reached (or has no bridge's log yet), 2 on
bad usage.
"""

_MAX_FEED_WIDTH = 24
"""The widest a feed's key is padded to, in the pretty format."""

_SUMMARY_WAIT = 1.0
"""How long changes to a pool's feeds are gathered into one line on stderr, while some are connecting."""

_NONE_UP_WAIT = 10.0
"""How long a pool's feeds may fail to connect, none of them up, before it is said (sooner once each has failed)."""


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
        description=(
            "Listen to a chat feed, serve one for development, watch a demo of both, or bridge feeds into "
            "NATS JetStream or Redis Streams and consume them from there."
        ),
    )
    parser.add_argument("--version", action="version", version=f"chatfeed {__version__}")
    parser.set_defaults(run=_demo, duration=6.0, format=None, no_color=False)
    commands = parser.add_subparsers(title="commands", metavar="{listen,serve,bridge,consume,demo}")

    listen = commands.add_parser(
        "listen",
        help="print every event of a feed as it arrives",
        description="Connect to a chat feed, authenticate, and print every event until Ctrl-C.",
        epilog=_LISTEN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    listen.add_argument("url", help="the feed's address, ws:// or wss://")
    credentials = listen.add_mutually_exclusive_group()
    credentials.add_argument("--token", help=f"the JWT (default: ${_TOKEN_VARIABLE}, which is safer)")
    credentials.add_argument(
        "--tokens",
        metavar="FILE",
        help=(
            'listen to many feeds at once: FILE has one {"feed": KEY, "token": JWT} per line (blank lines are '
            "ignored); tokens of many feeds are only ever read from a file"
        ),
    )
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
    listen.add_argument(
        "--connect-rate",
        type=_positive_float,
        metavar="N",
        help="with --tokens: at most N connection attempts per second, over all feeds (default: 500)",
    )
    listen.add_argument(
        "--record",
        metavar="FILE",
        help="also write every frame received to FILE, with its arrival time (token scrubbed), "
        "for `serve --replay` or FeedServer.replay",
    )
    listen.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log connection details (never the token); with --tokens, a line per feed and connection",
    )
    _add_metrics_options(listen, keepalive=True)
    listen.set_defaults(run=_listen)

    serve = commands.add_parser(
        "serve",
        help="run a development feed with a synthetic conversation",
        description=(
            "Serve the chat feed protocol on a local port and push a synthetic conversation: new chats, "
            "user and assistant messages with precis, audio URLs and the occasional fallback. A browser "
            "front end following the backend's guide can connect to it. Ctrl-C stops it."
        ),
        epilog=_SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=3001, help="the port (default: 3001; 0 picks a free one)")
    accepted = serve.add_mutually_exclusive_group()
    accepted.add_argument(
        "--token",
        dest="tokens",
        action="append",
        metavar="TOKEN",
        help="a token to accept; repeatable (default: one generated and printed at start-up)",
    )
    accepted.add_argument(
        "--users",
        type=_positive_int,
        metavar="N",
        help="serve N users, each with a token and a conversation of its own; needs --tokens-file",
    )
    serve.add_argument(
        "--tokens-file",
        metavar="FILE",
        help='with --users: write the users\' tokens there, one {"feed": USER, "token": TOKEN} per line, mode 0600',
    )
    serve.add_argument(
        "--rate", type=_positive_float, default=1.0, help="events per second, of each user with --users (default: 1)"
    )
    serve.add_argument("--seed", type=int, help="seed of the synthetic conversation, for a repeatable feed")
    serve.add_argument(
        "--replay",
        metavar="FILE",
        help="play a recording (`listen --record FILE`) instead of a synthetic conversation, once a client has "
        "authenticated",
    )
    serve.add_argument(
        "--speed",
        type=_speed,
        metavar="X",
        help="with --replay: play X times as fast as recorded; max for no waiting (default: 1)",
    )
    replayed = serve.add_mutually_exclusive_group()
    replayed.add_argument("--loop", action="store_true", help="with --replay: play the recording again and again")
    replayed.add_argument(
        "--exit-when-done", action="store_true", help="with --replay: stop serving, and exit, once it is played"
    )
    serve.set_defaults(run=_serve)

    bridge = commands.add_parser(
        "bridge",
        help="publish every event of many feeds into NATS JetStream or Redis Streams",
        description=(
            "Listen to many feeds at once, as `listen --tokens` does, and publish every event into a broker's "
            "log, in order per chat, each event stored once, until Ctrl-C or SIGTERM."
        ),
        epilog=_BRIDGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bridge.add_argument("url", nargs="?", help="the feed's address, ws:// or wss://")
    bridge.add_argument(
        "--tokens",
        metavar="FILE",
        help='the feeds: one {"feed": KEY, "token": JWT} per line (blank lines are ignored)',
    )
    bridge.add_argument(
        "--to",
        metavar="BROKER",
        required=True,
        help="the broker: nats://HOST:PORT (JetStream) or redis://HOST:PORT/DB (Redis Streams)",
    )
    bridge.add_argument(
        "--backfill-url",
        metavar="URL",
        help=(
            "the backend's history, http(s)://... (a ws:// or wss:// address is taken as http(s)://HOST:PORT/history): "
            "each feed is resumed from its saved watermark"
        ),
    )
    bridge.add_argument(
        "--group",
        metavar="NAME",
        help="share the tokens file's feeds with the other bridges of this group, coordinated through "
        "the broker: a dead bridge's feeds move to the others, without loss",
    )
    bridge.add_argument(
        "--worker",
        metavar="NAME",
        help="this bridge's name in its group (default: host, process id and a random suffix)",
    )
    bridge.add_argument(
        "--lease-ttl",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="with --group: how long a dead bridge's feeds stay its own (default: 10)",
    )
    bridge.add_argument(
        "--status",
        action="store_true",
        help="with --group and --to: print the group's bridges and the feeds each holds, then exit",
    )
    bridge.add_argument(
        "--shard",
        type=_shard_spec,
        metavar="K/N",
        help="bridge only the feeds of shard K of N (1 to N), by rendezvous hashing of their keys: "
        "run N bridges, K = 1 to N, each with the whole tokens file",
    )
    bridge.add_argument(
        "--window",
        type=_positive_int,
        default=4096,
        metavar="N",
        help="the most events held unpublished; beyond it, the feeds stop being read (default: 4096)",
    )
    bridge.add_argument(
        "--connect-rate",
        type=_positive_float,
        metavar="N",
        help="at most N connection attempts per second, over all feeds (default: 500)",
    )
    _add_broker_options(bridge)
    bridge.add_argument(
        "--broker-wait",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="how long to keep trying to reach the broker at start (default: 30)",
    )
    bridge.add_argument(
        "--summary-every",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="seconds between summary lines on stderr, when the counts changed (default: 10)",
    )
    bridge.add_argument(
        "-v", "--verbose", action="store_true", help="log connection details (never a token), a line per feed"
    )
    _add_metrics_options(bridge, keepalive=True)
    bridge.set_defaults(run=_bridge)

    consume = commands.add_parser(
        "consume",
        help="print the events a bridge published, acknowledging each",
        description=(
            "Read the events a `chatfeed bridge` published, as a durable consumer (JetStream) or a consumer "
            "group (Redis), and print each as `listen --tokens` does, with its feed, until Ctrl-C or SIGTERM."
        ),
        epilog=_CONSUME_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    consume.add_argument("broker", help="the broker: nats://HOST:PORT or redis://HOST:PORT/DB")
    consume.add_argument(
        "--durable",
        metavar="NAME",
        required=True,
        help="the durable consumer's (JetStream) or the consumer group's (Redis) name",
    )
    consume.add_argument(
        "--max-deliver",
        type=_positive_int,
        default=5,
        metavar="N",
        help="deliveries of an event that fails before it is dead-lettered (default: 5)",
    )
    _add_broker_options(consume)
    _add_output_options(consume)
    consume.add_argument("-v", "--verbose", action="store_true", help="log the broker's connection details")
    _add_metrics_options(consume, keepalive=False)
    consume.set_defaults(run=_consume)

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
        type=_output_format,
        help=(
            f"one JSON object per line, as on the wire (json is taken for jsonl), or a readable line per event "
            f"(default: {default})"
        ),
    )
    parser.add_argument("--no-color", action="store_true", help="no colours in the pretty format (also: $NO_COLOR)")


def _add_broker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stream", metavar="NAME", help="JetStream: the stream (default: CHATFEED)")
    parser.add_argument(
        "--prefix",
        metavar="PREFIX",
        help="the subjects' (JetStream) or the keys' (Redis) prefix (default: chatfeed)",
    )
    parser.add_argument(
        "--partitions",
        type=_positive_int,
        metavar="N",
        help="Redis: the number of partition streams, fixed once written (default: 16)",
    )


def _output_format(text: str) -> str:
    # JSON lines are JSON: the name people reach for first.
    return "jsonl" if text == "json" else text


def _shard_spec(text: str) -> tuple[int, int]:
    number, slash, count = text.partition("/")
    try:
        shard, shards = int(number), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not K/N (shard K of N, as in 2/5): {text!r}") from None
    if not slash or shards < 1 or not 1 <= shard <= shards:
        raise argparse.ArgumentTypeError(f"K/N needs 1 <= K <= N, not {text!r}")
    from .bridge._assign import _MAX_SHARDS

    if shards > _MAX_SHARDS:
        # Each feed of the tokens file costs a hash per shard, before anything starts.
        raise argparse.ArgumentTypeError(f"N is at most {_MAX_SHARDS:,}, not {shards:,}")
    return shard, shards


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


def _speed(text: str) -> float:
    if text.lower() in ("max", "inf"):
        return float("inf")
    return _positive_float(text)


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

    _COLORS: ClassVar[dict[str, str]] = {
        "user": "32",
        "assistant": "35",
        "new_chat": "36",
        "error": "31",
        "dim": "2",
        "feed": "34",
    }

    def __init__(
        self, output_format: str | None, *, no_color: bool, out: TextIO = sys.stdout, feed_width: int = 0
    ) -> None:
        self._out = out
        self._pretty = (output_format or ("pretty" if out.isatty() else "jsonl")) == "pretty"
        self._color = self._pretty and not no_color and "NO_COLOR" not in os.environ and out.isatty()
        self._feed_width = min(feed_width, _MAX_FEED_WIDTH)
        self.closed = asyncio.Event()

    def __call__(self, event: FeedEvent, feed: str | None = None) -> None:
        """Write ``event``; with ``feed``, the key of the pool's feed it came from, marked with it."""
        if self.closed.is_set():
            return
        if self._pretty:
            line = self._pretty_line(event)
            if feed is not None:
                line = f"{self._paint(feed.ljust(self._feed_width), 'feed')} | {line}"
        else:
            line = event.model_dump_json(by_alias=True, exclude_unset=True)
            if feed is not None:
                line = _with_feed(line, feed)
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


def _with_feed(line: str, feed: str) -> str:
    """Return the JSON object ``line`` with a ``"feed"`` field first, holding ``feed``."""
    marked = '{"feed":' + json.dumps(feed, ensure_ascii=False)
    if '"feed"' not in line:
        return marked + "," + line[1:]
    # A frame of its own "feed" field (from a newer server), or a body that
    # mentions it: the field says which of the pool's feeds, whatever the frame held.
    fields = {name: value for name, value in json.loads(line).items() if name != "feed"}
    return json.dumps({"feed": feed, **fields}, ensure_ascii=False, separators=(",", ":"))


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


def _log_to_stderr(verbose: bool, *, pool: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("chatfeed: %(message)s"))
    handler.addFilter(_not_giving_up)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    # A pool's feeds log their state changes without saying which feed: the
    # pool's lifecycle events, which do, are reported instead (_PoolReport).
    # Their failed attempts are still logged, not printed: _PoolReport reads them.
    if pool and not verbose:
        handler.setLevel(logging.WARNING)
    logging.getLogger("chatfeed").setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        logging.getLogger("websockets").setLevel(logging.DEBUG)


def _say(text: str) -> None:
    print(f"chatfeed: {text}", file=sys.stderr, flush=True)


# --metrics: Prometheus and health checks (chatfeed.prometheus)


def _add_metrics_options(parser: argparse.ArgumentParser, *, keepalive: bool) -> None:
    parser.add_argument(
        "--metrics",
        type=_metrics_address,
        metavar="HOST:PORT",
        help=(
            "serve Prometheus metrics on http://HOST:PORT/metrics, and /healthz and /readyz for probes "
            "(a port alone binds 127.0.0.1; port 0 picks a free one); needs pip install 'chatfeed[prometheus]'"
        ),
    )
    parser.add_argument(
        "--ready-fraction",
        type=_fraction,
        default=_READY_FRACTION,
        metavar="F",
        help=f"with --metrics: /readyz answers 200 while this share of the feeds is up (default: {_READY_FRACTION:g})",
    )
    if keepalive:
        parser.add_argument(
            "--ping-interval",
            type=_positive_float,
            metavar="SECONDS",
            help="seconds between keepalive pings (default: 20)",
        )
        parser.add_argument(
            "--ping-timeout",
            type=_positive_float,
            metavar="SECONDS",
            help="seconds without a pong before a connection is dropped as dead (default: 20)",
        )


_READY_FRACTION = 0.9
"""The share of a pool's feeds that must be up for ``/readyz`` to answer 200, by default."""


def _metrics_address(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon:
        host, port = "", text
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1]:9464
    if not port.isdigit() or (":" in host and not text.startswith("[")):
        raise argparse.ArgumentTypeError(f"not HOST:PORT, :PORT, PORT or [IPV6]:PORT: {text!r}")
    number = _port(port)
    # Metrics say much about a deployment: only what the operator names is exposed.
    return host or "127.0.0.1", number


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, not {text}")
    return value


def _keepalive(args: argparse.Namespace) -> dict[str, Any]:
    """Return the keepalive options given on the command line (the library's defaults otherwise)."""
    options = {"ping_interval": args.ping_interval, "ping_timeout": args.ping_timeout}
    return {name: value for name, value in options.items() if value is not None}


def _observers(args: argparse.Namespace) -> list[Observer]:
    """Return the observers the options ask for: a `PrometheusObserver` with ``--metrics``.

    Raises:
        UsageError: ``--metrics`` without prometheus-client installed.
    """
    observers: list[Observer] = []
    if getattr(args, "metrics", None) is not None:
        try:
            from .prometheus import PrometheusObserver
        except ImportError:
            raise UsageError("--metrics needs prometheus-client: pip install 'chatfeed[prometheus]'") from None
        # A series per feed only for listen: a bridge's or a consumer's
        # feeds may be thousands, and a group's come and go.
        observers.append(PrometheusObserver(per_feed=args.run is _listen))
    return observers


async def _start_metrics(args: argparse.Namespace, observers: list[Observer], subject: object) -> MetricsServer | None:
    """With ``--metrics``, start serving the metrics of ``observers`` and the readiness of ``subject``; say where.

    Raises:
        UsageError: The address cannot be listened on.
    """
    if getattr(args, "metrics", None) is None:
        return None
    from .prometheus import MetricsServer, PrometheusObserver, readiness

    registry = next(observer.registry for observer in observers if isinstance(observer, PrometheusObserver))
    host, port = args.metrics
    server = MetricsServer(
        host, port, registry=registry, ready=functools.partial(readiness, subject, fraction=args.ready_fraction)
    )
    try:
        await server.start()
    except OSError as exc:
        raise UsageError(f"--metrics: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    _say(f"metrics on {server.url}, health on /healthz and /readyz")
    return server


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


class _Selection:
    """Prints the events that ``--type`` and ``--chat`` select, until ``--count`` of them are printed."""

    def __init__(self, printer: _Printer, args: argparse.Namespace) -> None:
        self._printer = printer
        self._types: set[str] | None = set(args.types) if args.types else None
        self._chat: str | None = args.chat
        self._count: int | None = args.count
        self._printed = 0
        self.counted = asyncio.Event()

    def __call__(self, event: FeedEvent, feed: str | None = None) -> None:
        if self._printed == self._count or not _wanted(event, self._types, self._chat):
            return
        self._printer(event, feed)
        self._printed += 1
        if self._printed == self._count:
            self.counted.set()


async def _listen(args: argparse.Namespace) -> int:
    if args.tokens is not None:
        return await _listen_to_pool(args)
    if args.connect_rate is not None:
        raise UsageError("--connect-rate goes with --tokens: one feed makes one connection")
    token = args.token or os.environ.get(_TOKEN_VARIABLE)
    if not token:
        raise UsageError(f"no token: set ${_TOKEN_VARIABLE} (or pass --token, or --tokens FILE for many feeds)")
    observers = _observers(args)
    recorder = _recorder(args)
    try:
        client = Client(
            args.url,
            token=token,
            reconnect=_reconnect(args),
            observer=observers if recorder is None else [*observers, recorder],
            **_keepalive(args),
        )
        metrics = await _start_metrics(args, observers, client)
    except BaseException:
        _close_recorder(recorder)
        raise
    _log_to_stderr(args.verbose)
    printer = _Printer(args.format, no_color=args.no_color)
    show = _Selection(printer, args)
    client.on("new_message")(show)
    client.on("new_chat")(show)
    client.on("error")(show)
    client.on("unknown")(show)

    _say(f"connecting to {redact_url(args.url)}")
    running = asyncio.ensure_future(client.run())
    finished = [asyncio.ensure_future(show.counted.wait()), asyncio.ensure_future(printer.closed.wait())]
    try:
        await asyncio.wait([running, *finished], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in finished:
            waiter.cancel()
        await client.close()
        await asyncio.wait([running, *finished])
        _close_recorder(recorder)
        if metrics is not None:
            await metrics.close()
    if running.cancelled() or running.exception() is None:
        return EXIT_OK
    return _explain(running.exception(), args.url)


def _recorder(args: argparse.Namespace) -> Recorder | None:
    """Return the recorder of ``--record``, its file created, or ``None`` without it."""
    if args.record is None:
        return None
    try:
        recorder = Recorder(args.record)
    except OSError as exc:
        raise UsageError(f"cannot write the recording to {args.record}: {exc.strerror or type(exc).__name__}") from None
    _say(f"recording every frame to {args.record}")
    return recorder


def _close_recorder(recorder: Recorder | None) -> None:
    """Write what ``recorder`` holds and close its file; say how many frames it has."""
    if recorder is None:
        return
    recorder.close()
    error = recorder.error
    if error is not None:
        _say(f"could not finish the recording {recorder.path}: {error.strerror or type(error).__name__}")
        return
    _say(f"recorded {recorder.frames} frame(s) to {recorder.path}")


def _reconnect(args: argparse.Namespace) -> Backoff | bool:
    return False if args.no_reconnect else Backoff(max_attempts=args.max_attempts)


def _is_rejection(error: BaseException | None) -> bool:
    """Whether ``error`` says that the token was rejected."""
    return isinstance(error, AuthenticationError) or (
        isinstance(error, HandshakeError) and error.status_code in (401, 403)
    )


def _explain(error: BaseException | None, url: str) -> int:
    if _is_rejection(error):
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


# listen --tokens


def _read_tokens(path: str, *, skip_bad_lines: bool = False) -> dict[str, str]:
    """Return the feeds of a tokens file, key to token, in the file's order.

    Args:
        path: The file.
        skip_bad_lines: Report a line that is not a feed, or whose key came
            before, on stderr and go on with the others, instead of raising.

    Raises:
        UsageError: The file cannot be read, or has no feed; without
            ``skip_bad_lines``, a line is not a feed, or a key comes twice.
            The message never quotes a token; nor the path when the file
            cannot be opened, in case a token was given for a path.
    """
    try:
        with open(path, encoding="utf-8-sig") as file:
            lines = file.read().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read the file given to --tokens: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    feeds: dict[str, str] = {}
    lines_of: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        problem = _tokens_line_problem(line, feeds, lines_of)
        if isinstance(problem, str):
            if not skip_bad_lines:
                raise UsageError(f"{path}, line {number}: {problem}")
            _say(f"{path}, line {number}: {problem}; skipped, the other feeds go on")
            continue
        feed, token = problem
        feeds[feed] = token
        lines_of[feed] = number
    if not feeds:
        raise UsageError(f'{path} has no feeds: one {{"feed": "<key>", "token": "<jwt>"}} per line')
    with contextlib.suppress(OSError):
        if os.name == "posix" and os.stat(path).st_mode & 0o044:
            _say(f"warning: other users of this machine can read {path}; `chmod 600 {path}` protects its tokens")
    return feeds


def _tokens_line_problem(line: str, feeds: Mapping[str, str], lines_of: Mapping[str, int]) -> str | tuple[str, str]:
    """Return a tokens file's line as (key, token), or what is wrong with it (never quoting the line)."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not JSON ({exc.msg}, column {exc.colno})"
    except (ValueError, RecursionError):
        return "not JSON"
    if not isinstance(entry, dict):
        return 'expected an object, {"feed": "<key>", "token": "<jwt>"}'
    feed, token = entry.get("feed"), entry.get("token")
    if not isinstance(feed, str) or not feed:
        return '"feed" must be a non-empty string'
    if not isinstance(token, str) or not token:
        return '"token" must be a non-empty string'
    if feed in feeds:
        return f"feed {feed!r} is already on line {lines_of[feed]}"
    return feed, token


class _PoolReport:
    """Says on stderr how a pool's feeds are doing.

    One line per feed that stops, with why; and one line summing up the
    feeds (how many are up, connecting, stopped, and how many reconnected)
    when that changes, gathered over up to `_SUMMARY_WAIT` while feeds are
    connecting, so that thousands of feeds connecting, or reconnecting after
    a server restart, make a few lines and not thousands. A reconnection is
    always said: what the server pushed meanwhile was missed. While no feed
    has ever connected, one line says so, with the last error, once every
    feed has failed an attempt or after `_NONE_UP_WAIT`. With ``verbose``, a
    line per feed and connection too.
    """

    def __init__(self, feeds: int, *, verbose: bool) -> None:
        self._total = feeds
        self._verbose = verbose
        self._up: set[str] = set()
        self._reconnections = 0  # since the last summary
        self.stopped: dict[str, ChatfeedError] = {}
        self.all_stopped = asyncio.Event()
        self._changed = asyncio.Event()
        self._settled = asyncio.Event()  # no feed connecting
        self._ever_up = False
        self._failed: set[str] = set()  # feeds whose attempts failed, while none has ever connected
        self._last_error: BaseException | None = None
        self._each_failed = asyncio.Event()  # every feed failed an attempt or stopped, none ever up

    def watch(self, pool: Pool) -> None:
        """Register the handlers of ``pool``'s lifecycle events."""
        pool.on("connected")(self._connected)
        pool.on("disconnected")(self._disconnected)
        pool.on("feed_stopped")(self._feed_stopped)

    def _connected(self, event: Connected, feed: str) -> None:
        self._up.add(feed)
        self._ever_up = True
        self._reconnections += event.is_reconnect
        if self._verbose:
            if event.is_reconnect:
                _say(f"feed {feed}: reconnected after {event.downtime or 0.0:.2f} s away")
            else:
                _say(f"feed {feed}: connected")
        self._change()

    def _disconnected(self, event: Disconnected, feed: str) -> None:
        self._up.discard(feed)
        if self._verbose and event.will_retry:
            _say(f"feed {feed}: connection lost (code {event.code}); reconnecting in {event.retry_in or 0.0:.2f} s")
        self._change()

    def _feed_stopped(self, event: FeedStopped, feed: str) -> None:
        self._up.discard(feed)
        self.stopped[feed] = event.error
        _say(f"feed {feed} stopped: {event.error}")
        if len(self.stopped) == self._total:
            self.all_stopped.set()
        self._check_each_failed()
        self._change()

    def attempt_failed(self, feed: str, error: BaseException) -> None:
        """Note that an attempt of ``feed`` to connect failed on ``error``, and that it will try again."""
        if not self._ever_up:
            self._failed.add(feed)
            self._last_error = error
            self._check_each_failed()

    def _check_each_failed(self) -> None:
        if len(self._failed | set(self.stopped)) >= self._total:
            self._each_failed.set()

    def _change(self) -> None:
        self._changed.set()
        if self._total - len(self._up) - len(self.stopped):
            self._settled.clear()
        else:
            self._settled.set()

    def summary(self) -> str:
        """Return a line summing up the feeds."""
        connecting = self._total - len(self._up) - len(self.stopped)
        line = f"{len(self._up)} of {self._total} feeds up"
        if connecting:
            line += f", {connecting} connecting"
        if self.stopped:
            line += f", {len(self.stopped)} stopped"
        return line

    async def run(self) -> None:
        """Write the summary when it changes or feeds reconnected, until cancelled."""
        failures = _FailedAttempts(self)
        chatfeed_logger = logging.getLogger("chatfeed")
        chatfeed_logger.addHandler(failures)
        none_up = asyncio.ensure_future(self._say_if_none_connects())
        try:
            await self._summarize()
        finally:
            chatfeed_logger.removeHandler(failures)
            none_up.cancel()
            await asyncio.wait([none_up])

    async def _say_if_none_connects(self) -> None:
        each_failed = await _wait_until_set(self._each_failed, _NONE_UP_WAIT)
        connecting = self._total - len(self.stopped)
        if self._ever_up or not connecting:
            return
        line = f"0 of {connecting} feeds connected"
        line += ": each one's attempt failed" if each_failed else f" after {_NONE_UP_WAIT:g} s"
        if self._last_error is None:
            _say(f"{line}; still trying, no attempt has ended yet")
        else:
            _say(f"{line}; still trying, the last error: {self._last_error}")

    async def _summarize(self) -> None:
        said = None
        while True:
            await self._changed.wait()
            await _wait_until_set(self._settled, _SUMMARY_WAIT)
            self._changed.clear()
            line = self.summary()
            reconnections, self._reconnections = self._reconnections, 0
            if line != said or reconnections:
                plural = "" if reconnections == 1 else "s"
                _say(line + (f"; {reconnections} reconnection{plural}" if reconnections else ""))
                said = line


class _FailedAttempts(logging.Handler):
    """Gives a `_PoolReport` the failed connection attempts its pool's feeds log (below the level printed)."""

    def __init__(self, report: _PoolReport) -> None:
        super().__init__(logging.INFO)
        self._report = report

    def emit(self, record: logging.LogRecord) -> None:
        feed = getattr(record, "chatfeed_feed", None)
        # A feed's record with a delay is the one of a wait before its next attempt.
        if not isinstance(feed, str) or getattr(record, "chatfeed_delay", None) is None:
            return
        args = record.args if isinstance(record.args, tuple) else ()
        error = next((arg for arg in args if isinstance(arg, BaseException)), None)
        if error is not None:
            self._report.attempt_failed(feed, error)


async def _listen_to_pool(args: argparse.Namespace) -> int:
    feeds = _read_tokens(args.tokens)
    reconnect = _reconnect(args)
    observers = _observers(args)
    recorder = _recorder(args)
    options: dict[str, Any] = _keepalive(args)
    if args.connect_rate is not None:
        options["connect_rate"] = args.connect_rate
    try:
        pool = Pool(
            args.url,
            reconnect=reconnect,
            observer=observers if recorder is None else [*observers, recorder],
            **options,
        )
        for key, token in feeds.items():
            pool.add(key, token=token)
        metrics = await _start_metrics(args, observers, pool)
    except BaseException:
        _close_recorder(recorder)
        raise
    _log_to_stderr(args.verbose, pool=True)
    printer = _Printer(args.format, no_color=args.no_color, feed_width=max(map(len, pool.feeds())))
    show = _Selection(printer, args)
    pool.on("new_message")(show)
    pool.on("new_chat")(show)
    pool.on("error")(show)
    pool.on("unknown")(show)
    report = _PoolReport(len(pool), verbose=args.verbose)
    report.watch(pool)

    rate = f" (at most {args.connect_rate:g} per second)" if args.connect_rate is not None else ""
    _say(f"connecting {len(pool)} feeds to {redact_url(args.url)}{rate}")
    running = asyncio.ensure_future(pool.run())
    reporting = asyncio.ensure_future(report.run())
    finished = [
        asyncio.ensure_future(show.counted.wait()),
        asyncio.ensure_future(printer.closed.wait()),
        asyncio.ensure_future(report.all_stopped.wait()),
    ]
    try:
        await asyncio.wait([running, *finished], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in (reporting, *finished):
            waiter.cancel()
        await pool.close()
        await asyncio.wait([running, reporting, *finished])
        _close_recorder(recorder)
        if metrics is not None:
            await metrics.close()
    error = None if running.cancelled() else running.exception()
    if error is not None:
        raise error
    if show.counted.is_set() or printer.closed.is_set() or not report.all_stopped.is_set():
        return EXIT_OK
    return _every_feed_stopped(report)


def _every_feed_stopped(report: _PoolReport) -> int:
    """Say why every feed of a pool has stopped; return the exit status that says it."""
    reasons = report.stopped.values()
    if all(_is_rejection(reason) for reason in reasons):
        _say("every feed's token was rejected. Check the tokens in the file: they may be wrong or expired.")
        return EXIT_AUTH
    if all(isinstance(reason, ConnectionFailedError) for reason in reasons):
        _say("every feed has stopped: the feed cannot be reached. Is the server running, and is the address right?")
    else:
        _say("every feed has stopped")
    return EXIT_UNREACHABLE


# bridge


def _broker_options(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Return the sink's or the source's options that ``--stream``, ``--prefix`` and ``--partitions`` give.

    Raises:
        UsageError: An option of the other broker.
    """
    scheme = url.partition("://")[0].lower()
    options: dict[str, Any] = {}
    if args.stream is not None:
        if scheme not in ("nats", "tls"):
            raise UsageError("--stream is JetStream's: it goes with a nats:// broker")
        options["stream"] = args.stream
    if args.partitions is not None:
        if scheme not in ("redis", "rediss"):
            raise UsageError("--partitions is Redis's: it goes with a redis:// broker")
        options["partitions"] = args.partitions
    if args.prefix is not None:
        options["prefix"] = args.prefix
    return options


def _history_url(url: str) -> str:
    """Return the history's address for ``--backfill-url``: a feed's ws(s)://HOST:PORT is http(s)://HOST:PORT/history."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("ws", "wss"):
        return urllib.parse.urlunsplit(("http" if scheme == "ws" else "https", parts.netloc, "/history", "", ""))
    if parts.path in ("", "/"):
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/history", parts.query, ""))
    return url


class _OpenedSink:
    """A bridge's sink that says when it has reached the broker: the bridge's start is past the broker."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self.opened = asyncio.Event()

    def __repr__(self) -> str:
        return repr(self._sink)

    async def open(self) -> None:
        await self._sink.open()
        self.opened.set()

    async def publish(self, record: Record) -> bool:
        return await self._sink.publish(record)

    async def load_watermarks(self, feeds: Sequence[str]) -> dict[str, datetime]:
        return await self._sink.load_watermarks(feeds)

    async def save_watermarks(self, marks: Mapping[str, datetime]) -> None:
        await self._sink.save_watermarks(marks)

    async def close(self) -> None:
        await self._sink.close()


class _BridgeSummary:
    """Sums up what a bridge has done in one line on stderr: every ``interval`` seconds when it changed, and at exit."""

    def __init__(self, bridge: Bridge, interval: float) -> None:
        self._bridge = bridge
        self._interval = interval

    def line(self) -> str:
        stats = self._bridge.statistics()
        line = (
            f"bridged: {stats.received} received, {stats.published} published, "
            f"{stats.duplicates} duplicates, {stats.held} held"
        )
        if stats.rejected:
            line += f", {stats.rejected} rejected by the broker"
        if stats.unpublished:
            line += f", {stats.unpublished} not published (a restart with --backfill-url fetches them)"
        group = self._bridge._group
        if group is not None:
            line += f"; holding {len(group.held)} of the group's {len(group.feeds)} feeds"
        return line if stats.broker_up else line + "; the broker is away"

    async def run(self) -> None:
        said = self.line()
        while True:
            await asyncio.sleep(self._interval)
            line = self.line()
            if line != said:
                _say(line)
                said = line


class _JoinedCoordinator:
    """A group's coordinator that says when its worker has first joined: past the checks of the group's ttl."""

    def __init__(self, coordinator: Any) -> None:
        self._coordinator = coordinator
        self.joined = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._coordinator, name)

    def __repr__(self) -> str:
        return repr(self._coordinator)

    async def join(self, worker: str) -> None:
        await self._coordinator.join(worker)
        self.joined.set()


def _quiet_start(record: logging.LogRecord) -> bool:
    # An unreachable broker is one line: the one saying that the bridge gave
    # up, not also the bridge's own at the first failed attempt.
    return not getattr(record, "chatfeed_start_retry", False)


def _coordinator(args: argparse.Namespace) -> Any:
    from .bridge import JetStreamCoordinator, RedisCoordinator

    scheme = args.to.partition("://")[0].lower()
    if scheme in ("nats", "tls"):
        return JetStreamCoordinator(args.to, args.group, ttl=args.lease_ttl)
    if scheme in ("redis", "rediss"):
        return RedisCoordinator(args.to, args.group, prefix=args.prefix or "chatfeed", ttl=args.lease_ttl)
    raise UsageError(f"the broker's URL must start with nats:// or redis://, not {redact_url(args.to)[:40]!r}")


async def _group_status(args: argparse.Namespace) -> int:
    from .bridge import BrokerUnavailableError

    coordinator = _coordinator(args)
    try:
        await coordinator.open(create=False)
    except BrokerUnavailableError as exc:
        _say(f"the broker is unavailable: {exc}")
        return EXIT_BROKER
    try:
        workers = await coordinator.workers()
        holders = await coordinator.holders()
        ages = await coordinator.ages()
    finally:
        await coordinator.close()
    held: dict[str, list[str]] = {}
    for feed, (worker, _) in holders.items():
        held.setdefault(worker, []).append(feed)
    print(f"group {args.group}: {len(workers)} bridge(s), {len(holders)} feed(s) held")
    for worker in sorted(set(workers) | set(held)):
        state = "" if worker in workers else " (not heartbeating: its leases expire)"
        feeds = held.get(worker, [])
        oldest = max((ages.get(feed, 0.0) for feed in feeds), default=0.0)
        print(f"  {worker}: {len(feeds)} feed(s), oldest renewal {oldest:.1f} s ago{state}")
        if args.verbose:
            for feed in sorted(feeds):
                print(f"    {feed} (lease {holders[feed][1]}, renewed {ages.get(feed, 0.0):.1f} s ago)")
    return EXIT_OK


async def _bridge(args: argparse.Namespace) -> int:
    from .bridge import Bridge, BrokerUnavailableError, Group, sink_for

    if args.status:
        if args.group is None or args.to is None:
            raise UsageError("--status needs --group and --to")
        return await _group_status(args)
    if args.url is None or args.tokens is None:
        raise UsageError("the bridge needs the feed's address and --tokens")
    if args.group is not None and args.shard is not None:
        raise UsageError("--group and --shard are two ways to share the feeds: give one")
    feeds = _read_tokens(args.tokens, skip_bad_lines=True)
    if args.shard is not None:
        from .bridge import shard

        number, shards = args.shard
        every = len(feeds)
        mine = {}
        for index, (key, token) in enumerate(feeds.items(), 1):
            if shard(key, shards) == number:
                mine[key] = token
            if index % 64 == 0:
                await asyncio.sleep(0)  # seconds of hashing for many shards: SIGINT and SIGTERM get through
        feeds = mine
        _say(f"shard {number}/{shards}: {len(feeds)} of the {every} feeds")
    observers = _observers(args)
    sink = _OpenedSink(sink_for(args.to, **_broker_options(args.to, args)))
    backfill = None if args.backfill_url is None else http_backfill(_history_url(args.backfill_url), feeds)
    options: dict[str, Any] = _keepalive(args)
    if args.connect_rate is not None:
        options["connect_rate"] = args.connect_rate
    pool = Pool(args.url, backfill=backfill, observer=observers, **options)
    group = None
    if args.group is not None:
        coordinator = _JoinedCoordinator(_coordinator(args))
        group = Group(coordinator, feeds, worker=args.worker)
        _say(f"joining group {args.group} as worker {group.worker}, with the {len(feeds)} feeds of the tokens file")
        if args.backfill_url is None:
            _say(
                "warning: without --backfill-url, what a feed misses while it moves from a dead bridge "
                "to another is lost"
            )
    else:
        for key, token in feeds.items():
            pool.add(key, token=token)
    bridge = Bridge(pool, sink, window=args.window, start_timeout=args.broker_wait, group=group, observer=observers)
    metrics = await _start_metrics(args, observers, bridge)
    _log_to_stderr(args.verbose, pool=True)
    if not args.verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_start)
    report = _PoolReport(len(pool), verbose=args.verbose)
    if group is None:  # a group's feeds come and go: the summary line says how many it holds
        report.watch(pool)
    summary = _BridgeSummary(bridge, args.summary_every)

    async def announce() -> None:
        await sink.opened.wait()
        backfilled = (
            "" if args.backfill_url is None else f", resumed from {redact_url(_history_url(args.backfill_url))}"
        )
        if group is None:
            _say(f"bridging {len(pool)} feeds from {redact_url(args.url)} into {sink!r}{backfilled}")
        else:  # the group decides which feeds, from now on: the summary lines say how many
            await coordinator.joined.wait()
            _say(
                f"bridging the feeds worker {group.worker} holds in group {args.group}, "
                f"from {redact_url(args.url)} into {sink!r}{backfilled}"
            )
        await asyncio.gather(report.run(), summary.run()) if group is None else await summary.run()

    running = asyncio.ensure_future(bridge.run())
    helpers: list[asyncio.Future[Any]] = [asyncio.ensure_future(announce())]
    if group is None:
        helpers.append(asyncio.ensure_future(report.all_stopped.wait()))
    try:
        await asyncio.wait([running, *helpers], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for helper in helpers:
            helper.cancel()
        # Publishes what is held and saves the watermarks, on a signal too.
        await bridge.close()
        await asyncio.wait([running, *helpers])
        if sink.opened.is_set() and (group is None or coordinator.joined.is_set()):  # it did start
            _say(summary.line())
        if metrics is not None:
            await metrics.close()
    error = None if running.cancelled() else running.exception()
    if isinstance(error, BrokerUnavailableError):
        _say(f"the broker is unavailable: {error} (tried for {args.broker_wait:g} s, --broker-wait)")
        return EXIT_BROKER
    if error is not None:
        raise error
    return _every_feed_stopped(report) if report.all_stopped.is_set() else EXIT_OK


# consume


async def _consume(args: argparse.Namespace) -> int:
    from .bridge import Consumer

    observers = _observers(args)
    consumer = Consumer(
        args.broker,
        durable=args.durable,
        max_deliver=args.max_deliver,
        observer=observers,
        **_broker_options(args.broker, args),
    )
    printer = _Printer(args.format, no_color=args.no_color)

    async def show(event: FeedEvent, feed: str) -> None:
        if not printer.closed.is_set():
            printer(event, feed)
        if printer.closed.is_set():
            # Not printed, so not acknowledged: held until close() cancels
            # this wait, it comes back to the durable's next reader.
            await asyncio.get_running_loop().create_future()

    for name in ("new_message", "new_chat", "error", "unknown"):
        consumer.on(name)(show)
    _log_to_stderr(args.verbose)
    # Up while the consumer reaches the broker: /readyz says it is not ready yet.
    metrics = await _start_metrics(args, observers, consumer)
    try:
        try:
            await consumer.start()
        except UsageError:
            raise  # a mismatch with what the bridge set up (its partitions, say): exit 2
        except ChatfeedError as exc:
            _say(f"the broker is unavailable: {exc}")
            return EXIT_BROKER
        try:
            _say(f"consuming {redact_url(args.broker)} as {args.durable!r}")
            await printer.closed.wait()  # or Ctrl-C, or SIGTERM
        finally:
            await consumer.close()
    finally:
        if metrics is not None:
            await metrics.close()
    return EXIT_OK


# serve


async def _serve(args: argparse.Namespace) -> int:
    if args.replay is not None:
        return await _serve_replay(args)
    if args.speed is not None or args.loop or args.exit_when_done:
        raise UsageError("--speed, --loop and --exit-when-done go with --replay FILE")
    if args.users is not None:
        return await _serve_users(args)
    if args.tokens_file is not None:
        raise UsageError("--tokens-file goes with --users: it is where the users' tokens are written")
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


async def _serve_users(args: argparse.Namespace) -> int:
    if args.tokens_file is None:
        raise UsageError("--users needs --tokens-file: where to write the users' tokens")
    users = {secrets.token_urlsafe(16): f"user-{number}" for number in range(1, args.users + 1)}
    # Their connections come at once when a pool starts: the default backlog
    # would drop some, to be retried a second later.
    server = FeedServer(users=users, host=args.host, port=args.port, backlog=max(100, args.users))
    try:
        await server.start()
    except OSError as exc:
        _say(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
        return EXIT_USAGE
    try:
        try:
            _write_tokens(args.tokens_file, users)
        except OSError as exc:
            _say(f"cannot write the tokens to {args.tokens_file}: {exc.strerror or exc}")
            return EXIT_USAGE
        _say(
            f"serving the chat feed on {server.url} to {args.users} user(s), {args.rate:g} events per second each; "
            "Ctrl-C stops it"
        )
        _say(
            f"their tokens are in {args.tokens_file}, one per line; try "
            f"`chatfeed listen {server.url} --tokens {args.tokens_file}`"
        )
        await _play_to_users(server, list(users.values()), rate=args.rate, seed=args.seed)
    finally:
        await server.stop()
    return EXIT_OK


async def _serve_replay(args: argparse.Namespace) -> int:
    """Serve a recording: play it, once a client (or every recorded feed) has authenticated."""
    if args.users is not None:
        raise UsageError(
            "--users plays a synthetic conversation to each user; a replay's users are its recording's feeds "
            "(give --tokens-file alone)"
        )
    if args.seed is not None:
        raise UsageError("--seed is the synthetic conversation's: not with --replay")
    recording = read_recording(args.replay)  # a bad file is a usage error, before anything listens
    feeds = recording.feeds
    if args.tokens_file is not None and not feeds:
        raise UsageError(
            f"--tokens-file goes with a recording of many feeds (`listen --tokens FILE --record`); {args.replay} "
            "has none"
        )
    if args.loop and all(_is_handshake(frame.frame) for frame in recording.frames):
        raise UsageError(f"--loop needs frames to play: {args.replay} has none but the server's handshakes")
    speed = 1.0 if args.speed is None else args.speed
    users = {} if args.tokens_file is None else {secrets.token_urlsafe(16): feed for feed in feeds}
    generated = secrets.token_urlsafe(16) if not args.tokens and not users else None
    tokens = [*(args.tokens or ()), *([generated] if generated else [])]
    server = FeedServer(tokens=tokens, users=users, host=args.host, port=args.port, backlog=max(100, len(users)))
    try:
        await server.start()
    except OSError as exc:
        _say(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
        return EXIT_USAGE
    try:
        if users:
            try:
                _write_tokens(args.tokens_file, users)
            except OSError as exc:
                _say(f"cannot write the tokens to {args.tokens_file}: {exc.strerror or exc}")
                return EXIT_USAGE
        frames = recording.frames
        span = frames[-1].t - frames[0].t if frames else 0.0
        of_feeds = f", of {len(feeds)} feed(s)" if feeds else ""
        _say(
            f"serving the recording {args.replay} on {server.url}: {len(frames)} frame(s){of_feeds} over {span:.3f} s, "
            f"at speed {speed:g}; Ctrl-C stops it"
        )
        if generated is not None:
            _say(f"token: {generated}")
        if users:
            _say(
                f"a user per feed, their tokens in {args.tokens_file}; try "
                f"`chatfeed listen {server.url} --tokens {args.tokens_file}`"
            )
        # Every recorded feed connected, so that none misses the start.
        clients = len(users) or 1
        _say(f"the replay starts once {'every feed' if users else 'a client'} has authenticated")
        rounds = 0
        while True:
            await server.wait_for_clients(clients, timeout=None)
            sent = await server._replay(recording, speed=speed)
            rounds += 1
            if rounds == 1:  # not a line per round: a loop at --speed max would flood the terminal
                _say(f"replayed {sent} frame(s){', and again until Ctrl-C' if args.loop and sent else ''}")
            if not args.loop:
                break
            await asyncio.sleep(0)  # a recording played in no time must not starve Ctrl-C
        if args.exit_when_done:
            return EXIT_OK
        _say("the replay is over; still serving, Ctrl-C stops it")
        await asyncio.get_running_loop().create_future()
    finally:
        await server.stop()
    return EXIT_OK


def _write_tokens(path: str, users: dict[str, str]) -> None:
    """Write ``users`` (token to user id) to ``path`` as a tokens file, readable by its owner only.

    The file is replaced whole, never seen half written, and never readable
    by others, even for a moment: it is written under another name, created
    with mode 0600, then renamed.
    """
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=".chatfeed-tokens-", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), 0o600)
            file.writelines(json.dumps({"feed": user, "token": token}) + "\n" for token, user in users.items())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


async def _play_to_users(server: FeedServer, user_ids: Sequence[str], *, rate: float, seed: int | None) -> None:
    """Play a synthetic conversation to each user, ``rate`` events per second each, until cancelled."""
    chat_ids = itertools.count(1)
    message_ids = itertools.count(1)

    async def play(index: int, user_id: str) -> None:
        # Spread over the first second, instead of every user's event at once.
        await asyncio.sleep(index / len(user_ids) / rate)
        conversation = synthetic_conversation(seed=None if seed is None else seed + index, user_id=user_id)
        await server.play(_renumbered(conversation, chat_ids, message_ids), rate=rate, user_id=user_id)

    players = [asyncio.ensure_future(play(index, user_id)) for index, user_id in enumerate(user_ids)]
    try:
        await asyncio.gather(*players)
    finally:
        for player in players:
            player.cancel()
        await asyncio.wait(players)


def _renumbered(
    conversation: Iterable[NewChat | NewMessage], chat_ids: Iterator[int], message_ids: Iterator[int]
) -> Iterator[NewChat | NewMessage]:
    """Give the chats and messages of one user's conversation ids unique over every user's.

    Each synthetic conversation numbers its own from 1; the server's history,
    and a listener's ``--chat``, need them unique. The messages of a chat
    follow it, as `synthetic_conversation` yields them.
    """
    chat_id = ""
    for event in conversation:
        if isinstance(event, NewChat):
            chat_id = str(next(chat_ids))
            yield NewChat(type="new_chat", payload=event.payload.model_copy(update={"id": chat_id}))
        else:
            message = event.payload
            message_id = str(next(message_ids))
            # The audio's address is named after the message.
            audio_url = message.audio_url and message.audio_url.replace(f"/{message.id}.", f"/{message_id}.")
            changes = {"id": message_id, "chat_id": chat_id, "audio_url": audio_url}
            yield NewMessage(type="new_message", payload=message.model_copy(update=changes))


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
    # Not wait_for: before Python 3.12, it loses a cancellation that comes as
    # the event is set, and the cancelled task would go on.
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([waiter], timeout=timeout)
    finally:
        waiter.cancel()
        await asyncio.wait([waiter])
    return event.is_set()
