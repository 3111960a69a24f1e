"""The envelope: one versioned JSON document per event, as a bridge publishes it.

Pure functions, no I/O: `encode` turns an event into a `Record` (the
envelope's bytes and what a sink needs to route it), `Envelope.decode`
turns the bytes back into the typed event on the consumer's side, and
`dedup_id`, `subject_token` and `partition` are the deterministic names a
sink gives an event. The schema (`ENVELOPE_SCHEMA`) is what a consumer in
another language reads; docs/bridge/envelope.md explains it field by field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from datetime import datetime, timezone
from typing import Any, Literal, get_args

from pydantic import ValidationError

from .._protocol import FRAME_ATTRIBUTE, _validator
from ..exceptions import ProtocolError
from ..models import Chat, FeedEvent, Message, NewChat, NewMessage, ServerMessage

__all__ = [
    "ENVELOPE_SCHEMA",
    "ENVELOPE_VERSION",
    "Envelope",
    "EnvelopeError",
    "Record",
    "dedup_id",
    "encode",
    "partition",
    "subject_token",
]

ENVELOPE_VERSION = 1
"""The version of the envelope this release writes (``"v"``); a consumer refuses any other."""

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class EnvelopeError(ProtocolError):
    """A document in the log is not an envelope this version reads.

    The consumer reports it (its position in the log, never its content) and
    dead-letters it: it would fail the same way on every delivery.
    """


class Record:
    """One event ready to publish: the envelope's bytes and what a sink routes it by.

    Attributes:
        feed: The feed's key.
        type: The event's type (``new_message``, ``new_chat``, ``error``, or another).
        chat: The chat it belongs to, or ``None`` (``error`` and unknown events).
        dedup: Its deterministic dedup id (see `dedup_id`).
        created: Its ``created_at``, for messages and chats, else ``None``.
        data: The envelope, UTF-8 JSON.
        fence: In a group, the feed's lease: its key and the value that says
            this worker holds it. A sink that can (Redis) refuses the record
            when the lease says otherwise, raising
            [`FencedError`][chatfeed.bridge.FencedError].
    """

    __slots__ = ("chat", "created", "data", "dedup", "epoch", "feed", "fence", "type")

    def __init__(
        self, feed: str, type: str, chat: str | None, dedup: str, created: datetime | None, data: bytes
    ) -> None:
        self.feed = feed
        self.type = type
        self.chat = chat
        self.dedup = dedup
        self.created = created
        self.data = data
        # Set by a bridge in a group, at each publish: the key of the feed's
        # lease and the value it must hold, for a sink that can check both
        # with its write (Redis); None outside a group.
        self.fence: tuple[str, str] | None = None
        # A bridge in a group: which of its holds of the feed received it.
        self.epoch = 0

    def __repr__(self) -> str:
        return f"<Record {self.type} feed={self.feed!r} chat={self.chat!r} dedup={self.dedup}>"


def dedup_id(feed: str, type: str, *parts: str) -> str:
    """Return the dedup id of an event: 32 hex digits, the same every time the event is published.

    The id is the BLAKE2b digest, with a digest size of 16 bytes, of the
    feed's key, the type and the event's identity, each written as the
    decimal length of its UTF-8 bytes, a colon, and those bytes (so that no
    two lists of parts give the same text). The identity of a message is its
    id and status (``""`` when none); of a chat, its id and ``updatedAt``
    (ISO 8601). An event with no identity (``error``, unknown types) is
    identified by its frame and the time it was received: its retries share
    an id, and two such events do not.

    Example:
        >>> dedup_id("alice", "new_message", "42", "COMPLETED")
        'e468df60a8f093e2ee2a803fbcdbd18c'
    """
    data = b"".join(b"%d:%s" % (len(encoded), encoded) for encoded in _utf8((feed, type, *parts)))
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _utf8(parts: tuple[str, ...]) -> list[bytes]:
    return [part.encode("utf-8", "surrogatepass") for part in parts]


def subject_token(value: str) -> str:
    """Return ``value`` as one NATS subject token: letters, digits, ``-`` and ``_`` kept, the rest escaped.

    Every other character's UTF-8 bytes become ``%XX`` (upper-case hex), so
    the mapping is one-to-one and reversible; the empty string is ``%``.

    Example:
        >>> subject_token("user.42 *")
        'user%2E42%20%2A'
    """
    if not value:
        return "%"
    if all(char in _SAFE for char in value):
        return value
    return "".join(
        char if char in _SAFE else "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
        for char in value
    )


def partition(feed: str, chat: str | None, partitions: int) -> int:
    """Return the partition of a chat's events: a stable hash, the same in every process and language.

    The BLAKE2b digest, with a digest size of 8 bytes, of the UTF-8 of
    ``feed``, U+001F, ``chat`` (``""`` when none), read as a big-endian
    unsigned integer, modulo ``partitions``.

    Example:
        >>> partition("alice", "17", 16) == partition("alice", "17", 16)
        True
    """
    digest = hashlib.blake2b(f"{feed}\x1f{chat or ''}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


def _iso(moment: datetime) -> str:
    if moment.utcoffset():
        moment = moment.astimezone(timezone.utc)
    return moment.replace(tzinfo=None).isoformat() + "Z"


def _frame_text(event: ServerMessage) -> str:
    """Return the frame of ``event`` as JSON text: the wire's own, when the event kept it and it is plain JSON."""
    frame = getattr(event, FRAME_ATTRIBUTE, None)
    if frame is not None:
        text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
        # What the parser took may hold NaN or Infinity, which JSON does not:
        # such a frame (rare) is written again below, without them.
        if ("NaN" not in text and "Infinity" not in text) or _strict_json(text):
            return text
    document = event.model_dump(mode="json", by_alias=True, exclude_unset=True)
    try:
        return json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(_finite(document), ensure_ascii=False, separators=(",", ":"))


def _strict_json(text: str) -> bool:
    """Whether ``text`` is JSON without NaN or Infinity (the words may be inside strings)."""
    try:
        json.loads(text, parse_constant=_refuse)
    except ValueError:
        return False
    return True


def _refuse(name: str) -> None:
    raise ValueError(name)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(item) for item in value]
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    return value


def encode(event: FeedEvent, feed: str, *, received: datetime | None = None) -> Record:
    """Return the record of ``event``, received by feed ``feed`` (now, unless ``received`` says when).

    The envelope's ``frame`` is the frame as the wire carried it when the
    event kept it (a bridge's pool keeps the frames of messages and chats);
    otherwise, for backfilled events, errors and unknown types, the event
    written again, with the wire's (camelCase) names and only the fields
    it was given.
    """
    received_at = _iso(received or datetime.now(timezone.utc))
    frame = _frame_text(event)
    cls = event.__class__
    identity: str | None
    chat: str | None
    created: datetime | None
    if cls is NewMessage:
        message: Message = event.payload  # type: ignore[union-attr,assignment]
        identity, chat, created = message.id, message.chat_id, message.created_at
        dedup = dedup_id(feed, event.type, message.id, "" if message.status is None else str(message.status))
    elif cls is NewChat:
        new: Chat = event.payload  # type: ignore[union-attr,assignment]
        identity, chat, created = new.id, new.id, new.created_at
        dedup = dedup_id(feed, event.type, new.id, _iso(new.updated_at))
    else:
        identity = chat = created = None
        dedup = dedup_id(feed, event.type, frame, received_at)
    head = json.dumps(
        {
            "v": ENVELOPE_VERSION,
            "feed": feed,
            "type": event.type,
            "id": identity,
            "chat": chat,
            "source": event.source,
            "received": received_at,
            "created": None if created is None else _iso(created),
            "dedup": dedup,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )
    data = f'{head[:-1]},"frame":{frame}}}'.encode("utf-8", "surrogatepass")
    return Record(feed, event.type, chat, dedup, created, data)


@dataclasses.dataclass(frozen=True)
class Envelope:
    """One envelope read back from the log.

    Attributes:
        feed: The key of the feed the event came from.
        type: The event's type.
        id: The message's or chat's id, or ``None``.
        chat: The chat's id, or ``None``.
        source: ``"live"`` or ``"backfill"``.
        received: When the bridge received it (UTC).
        created: The message's or chat's ``createdAt``, or ``None``.
        dedup: Its dedup id.
        frame: The frame, as the wire carried it (camelCase).
        v: The envelope's version.
    """

    feed: str
    type: str
    id: str | None
    chat: str | None
    source: Literal["live", "backfill"]
    received: datetime
    created: datetime | None
    dedup: str
    frame: dict[str, Any]
    v: int = ENVELOPE_VERSION

    @classmethod
    def decode(cls, data: bytes | str) -> Envelope:
        """Read an envelope.

        Raises:
            EnvelopeError: The document is not JSON, not an object, of
                another version, or a field is missing or of the wrong type.
                The error names the field, never quotes the document.
        """
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise EnvelopeError("the envelope is not JSON") from None
        if not isinstance(document, dict):
            raise EnvelopeError("the envelope is not a JSON object")
        version = document.get("v", ...)
        if version != ENVELOPE_VERSION:
            raise EnvelopeError(f"the envelope's version is {_describe(version)}, not {ENVELOPE_VERSION}")
        for name, kinds in _FIELDS:
            if not isinstance(document.get(name, ...), kinds):
                raise EnvelopeError(f"the envelope's {name!r} is {_describe(document.get(name, ...))}")
        if document["source"] not in ("live", "backfill"):
            raise EnvelopeError("the envelope's 'source' is neither 'live' nor 'backfill'")
        received = _time(document["received"])
        created = None if document["created"] is None else _time(document["created"])
        if received is None or (created is None and document["created"] is not None):
            # Raised here, not in an except block: the ValueError would quote the value.
            raise EnvelopeError("the envelope's 'received' or 'created' is not an ISO 8601 time")
        return cls(
            feed=document["feed"],
            type=document["type"],
            id=document["id"],
            chat=document["chat"],
            source=document["source"],
            received=received,
            created=created,
            dedup=document["dedup"],
            frame=document["frame"],
        )

    def event(self) -> FeedEvent:
        """Return the typed event, as a pool would have delivered it (``feed`` and ``source`` set).

        Raises:
            EnvelopeError: The frame does not fit its type.
        """
        try:
            event: ServerMessage = _validator().validate_python(self.frame)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False)
            where = ".".join(str(part) for part in errors[0]["loc"]) or "frame"
            raise EnvelopeError(f"the envelope's frame does not fit its type: {errors[0]['msg']} at {where}") from None
        if event.__class__ not in _EVENTS:
            raise EnvelopeError(f"the envelope's frame is a {event.type!r} frame, not an event")
        if self.source != "live":
            object.__setattr__(event, "source", self.source)
        object.__setattr__(event, "feed", self.feed)
        return event  # type: ignore[return-value]  # one of FeedEvent's classes, checked above


def _time(text: str) -> datetime | None:
    """Return the time ``text`` says, or ``None`` if it is not ISO 8601."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


_EVENTS: frozenset[type[Any]] = frozenset(get_args(FeedEvent))

_FIELDS: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("feed", str),
    ("type", str),
    ("id", (str, type(None))),
    ("chat", (str, type(None))),
    ("source", str),
    ("received", str),
    ("created", (str, type(None))),
    ("dedup", str),
    ("frame", dict),
)


def _describe(value: object) -> str:
    if value is ...:
        return "missing"
    if value is None:
        return "null"
    return f"a JSON {type(value).__name__}" if not isinstance(value, (int, float)) else repr(value)


ENVELOPE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://chatfeed.dev/schemas/envelope-v1.json",
    "title": "chatfeed envelope, version 1",
    "description": "One event of a chat backend's feed, as chatfeed's bridge publishes it into a log.",
    "type": "object",
    "required": ["v", "feed", "type", "id", "chat", "source", "received", "created", "dedup", "frame"],
    "properties": {
        "v": {"const": 1, "description": "The envelope's version."},
        "feed": {"type": "string", "minLength": 1, "description": "The key of the feed (usually the user's id)."},
        "type": {"type": "string", "description": "The frame's type: new_message, new_chat, error, or another."},
        "id": {"type": ["string", "null"], "description": "The message's or chat's id; null for other events."},
        "chat": {"type": ["string", "null"], "description": "The chat the event belongs to; null for none."},
        "source": {"enum": ["live", "backfill"], "description": "From the live feed, or fetched after a gap."},
        "received": {"type": "string", "format": "date-time", "description": "When the bridge received it, UTC."},
        "created": {
            "type": ["string", "null"],
            "format": "date-time",
            "description": "The message's or chat's createdAt, UTC; null for other events.",
        },
        "dedup": {
            "type": "string",
            "pattern": "^[0-9a-f]{32}$",
            "description": "The deterministic dedup id: the same every time this event is published.",
        },
        "frame": {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"type": "string"}},
            "description": "The frame as the wire carried it (camelCase names), or rebuilt from the event "
            "for backfilled events, errors and unknown types.",
        },
    },
    "additionalProperties": True,
}
"""The JSON Schema (draft 2020-12) of an envelope, version 1.

Later versions may add fields; ``v`` changes when a field changes meaning."""
