"""The client's options: checked once, then frozen.

Every knob of [`Client`][chatfeed.Client] lands in one `Options` object, so
that the rest of the package reads settled values and never checks an
argument again.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import ssl as ssl_module
import urllib.parse
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Literal, TypeAlias

from ._delivery import Backfill, Dedupe
from ._logging import log_fields, redact_url
from ._policy import Backoff
from .exceptions import UsageError

__all__ = ["Compression", "Options", "TokenSource"]

logger = logging.getLogger("chatfeed")

TokenSource: TypeAlias = str | Callable[[], str | Awaitable[str]]
"""A JWT, or a function (sync or async) called for a token before every connection attempt."""

Compression: TypeAlias = Literal["deflate"] | None
"""``"deflate"`` to offer permessage-deflate to the server, ``None`` for no compression."""


_DEFAULT_BACKOFF = Backoff()  # frozen: one for every client
_DEFAULT_DEDUPE = Dedupe()


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    """Everything a client needs to know to connect, validated by `Options.check`."""

    url: str
    token: TokenSource
    backoff: Backoff | None
    auth_timeout: float
    ping_interval: float | None
    ping_timeout: float | None
    open_timeout: float
    close_timeout: float
    max_size: int
    ssl: ssl_module.SSLContext | None
    proxy: str | bool | None
    auth_retries: int
    compression: Compression
    backfill: Backfill | None = None
    backfill_since: datetime | None = None
    backfill_timeout: float = 30.0
    dedupe: Dedupe | None = None
    drain_timeout: float = 5.0

    @classmethod
    def check(
        cls,
        url: str,
        *,
        token: TokenSource,
        reconnect: Backoff | bool,
        auth_timeout: float,
        ping_interval: float | None,
        ping_timeout: float | None,
        open_timeout: float,
        close_timeout: float,
        max_size: int,
        ssl: ssl_module.SSLContext | None,
        proxy: str | bool | None,
        auth_retries: int,
        compression: Compression,
        backfill: Backfill | None = None,
        backfill_since: datetime | None = None,
        backfill_timeout: float = 30.0,
        dedupe: Dedupe | bool | None = None,
        drain_timeout: float = 5.0,
    ) -> Options:
        """Return the options, or raise `UsageError` naming the first argument that is wrong."""
        if reconnect is True:
            reconnect = _DEFAULT_BACKOFF
        if reconnect is not False and not isinstance(reconnect, Backoff):
            raise UsageError(f"reconnect must be a Backoff, True or False, not {reconnect!r}")
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size <= 0:
            raise UsageError(f"max_size must be a positive int, not {max_size!r}")
        if ssl is not None and not isinstance(ssl, ssl_module.SSLContext):
            raise UsageError(f"ssl must be an ssl.SSLContext or None, not {ssl!r}")
        if isinstance(auth_retries, bool) or not isinstance(auth_retries, int) or auth_retries < 0:
            raise UsageError(f"auth_retries must be a non-negative int, not {auth_retries!r}")
        if compression not in ("deflate", None):
            raise UsageError(f'compression must be "deflate" or None, not {compression!r}')
        if backfill is not None and not callable(backfill):
            raise UsageError(f"backfill must be a function of a chatfeed.Gap, or None, not {backfill!r}")
        if backfill_since is not None:
            if not isinstance(backfill_since, datetime) or backfill_since.utcoffset() is None:
                raise UsageError(f"backfill_since must be a timezone-aware datetime, not {backfill_since!r}")
            if backfill is None:
                raise UsageError("backfill_since is the start of the first backfill: it needs backfill=")
        if dedupe is None:  # on by default with a backfill, whose overlap it absorbs
            dedupe = backfill is not None
        if dedupe is True:
            dedupe = _DEFAULT_DEDUPE
        if dedupe is not False and not isinstance(dedupe, Dedupe):
            raise UsageError(f"dedupe must be a Dedupe, True or False, not {dedupe!r}")
        if isinstance(drain_timeout, bool) or not isinstance(drain_timeout, (int, float)) or not drain_timeout >= 0:
            raise UsageError(f"drain_timeout must be a number of seconds, 0 or more, not {drain_timeout!r}")
        return cls(
            url=_check_url(url, ssl),
            token=_check_token(token),
            backoff=reconnect or None,
            auth_timeout=_positive("auth_timeout", auth_timeout),
            ping_interval=None if ping_interval is None else _positive("ping_interval", ping_interval),
            ping_timeout=None if ping_timeout is None else _positive("ping_timeout", ping_timeout),
            open_timeout=_positive("open_timeout", open_timeout),
            close_timeout=_positive("close_timeout", close_timeout),
            max_size=max_size,
            ssl=ssl,
            proxy=proxy,
            auth_retries=auth_retries,
            compression=compression,
            backfill=backfill,
            backfill_since=backfill_since,
            backfill_timeout=_positive("backfill_timeout", backfill_timeout),
            dedupe=dedupe or None,
            drain_timeout=float(drain_timeout),
        )

    def __repr__(self) -> str:
        # The token, or a function that holds one, stays out of reprs.
        return f"Options(url={redact_url(self.url)!r}, ...)"


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UsageError(f"{name} must be a positive number of seconds, not {value!r}")
    return float(value)


def _check_token(token: TokenSource) -> TokenSource:
    if isinstance(token, str):
        if not token:
            raise UsageError("token must not be empty")
        return token
    if callable(token):
        return token
    raise UsageError(f"token must be a str or a function returning one, not a {type(token).__name__}")


def _check_url(url: str, ssl: ssl_module.SSLContext | None) -> str:
    if not isinstance(url, str):
        raise UsageError(f"url must be a str, not a {type(url).__name__}")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as exc:
        raise UsageError(f"invalid url {redact_url(url)!r}: {exc}") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise UsageError(f"url must be a ws:// or wss:// address with a host, not {redact_url(url)!r}")
    if parts.fragment:
        raise UsageError("url must not have a #fragment")
    if parts.scheme == "ws":
        if ssl is not None:
            raise UsageError("ssl is given but the url is ws://; use wss://")
        if not _is_loopback(parts.hostname):
            logger.warning(
                "%s is not encrypted: the token and every message cross the network in clear; use wss://",
                redact_url(url),
                extra=log_fields(url=url),
            )
    return url


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
