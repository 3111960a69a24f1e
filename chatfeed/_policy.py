"""When to reconnect, and how long to wait first.

`classify` is the retry policy for one error: a pure function from the error
that ended a connection attempt to a `Verdict`. [`Backoff`][chatfeed.Backoff] turns the
number of failures in a row into a wait (exponential, full jitter, capped).
`RetryState` carries what matters across attempts (failures in a row, auth
rejections in a row, whether the address ever worked) and answers, after each
attempt, how long to wait or to stop. None of them does any I/O, so all are
tested without a socket.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import math
import ssl

import tenacity

from .exceptions import (
    AuthenticationError,
    AuthTimeoutError,
    ChatfeedError,
    ConnectError,
    ConnectionLostError,
    HandshakeError,
    TokenProviderError,
    UsageError,
)

__all__ = ["Backoff", "RetryState", "Verdict", "classify", "parse_retry_after"]

TRY_AGAIN_LATER_DELAY = 5.0
"""Shortest wait after close code 1013 (Try Again Later), in seconds."""

MAX_RETRY_AFTER = 3600.0
"""Longest ``Retry-After`` honoured, in seconds; a larger value is capped."""

_RETRYABLE_CLOSE_CODES = frozenset({1000, 1001, 1005, 1006, 1011, 1012, 1013, 1014})
_FATAL_CLOSE_CODES = frozenset({1002, 1003, 1007, 1008, 1009, 1010})


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What to do after a failed or ended connection.

    Attributes:
        retry: Whether to connect again.
        min_delay: The shortest wait before that, in seconds, whatever the backoff says.
    """

    retry: bool
    min_delay: float = 0.0


RETRY = Verdict(retry=True)
STOP = Verdict(retry=False)


def classify(error: ChatfeedError, *, connected_before: bool = False) -> Verdict:
    """Decide whether the error that ended a connection is worth a retry.

    Transient conditions (network errors, timeouts, server restarts, overload,
    HTTP 5xx and 429) are retried; conditions that the same request would meet
    again (a rejected token, HTTP 4xx and 3xx, a close code that blames the
    client, an untrusted certificate, a server that does not speak TLS) are
    not. Authentication errors are not retried here: the client retries them
    only with a fresh token.

    Args:
        error: The translated exception that ended the attempt.
        connected_before: Whether a connection to this address has been
            authenticated before. A failed TLS handshake (other than an
            untrusted certificate) is then a passing fault of a server that
            does speak TLS, such as a restart mid-handshake, and is retried;
            before, it means the address is wrong, and it is final.

    Returns:
        The verdict, with a minimum wait for 1013 and ``Retry-After``.
    """
    if isinstance(error, ConnectionLostError):
        return _classify_close(error.code, local=error.local)
    if isinstance(error, HandshakeError):
        return _classify_status(error.status_code, error.retry_after)
    if isinstance(error, ConnectError):
        if not error.tls:
            return RETRY
        # A certificate that fails verification fails the same way next time.
        if isinstance(error.__cause__, ssl.SSLCertVerificationError) or not connected_before:
            return STOP
        return RETRY
    if isinstance(error, (AuthTimeoutError, TokenProviderError)):
        return RETRY
    return STOP


def _classify_close(code: int, *, local: bool) -> Verdict:
    if local:
        # This side closed because the server broke the protocol (bad UTF-8,
        # an oversize frame) or stopped answering pings: the next connection
        # may well be fine, and giving up for good over one frame would be harsh.
        return RETRY
    if code == 1013:
        return Verdict(retry=True, min_delay=TRY_AGAIN_LATER_DELAY)
    if code in _RETRYABLE_CLOSE_CODES or 3000 <= code < 3500 or 4000 <= code < 4500:
        return RETRY
    if code in _FATAL_CLOSE_CODES or 3500 <= code < 4000 or 4500 <= code < 5000:
        return STOP
    # Codes nobody assigned: not a reason to give up on a feed for good.
    return RETRY


def _classify_status(status_code: int | None, retry_after: float | None) -> Verdict:
    if status_code is not None and (status_code == 429 or 500 <= status_code < 600):
        return Verdict(retry=True, min_delay=min(retry_after or 0.0, MAX_RETRY_AFTER))
    return STOP


@dataclasses.dataclass(frozen=True)
class Backoff:
    """How long to wait between connection attempts.

    The n-th failure in a row waits a random time between 0 and
    ``min(initial * multiplier ** (n - 1), maximum)`` seconds ("full jitter",
    computed by tenacity), so that many clients dropped at once do not come
    back at once. The count of failures goes back to zero only once a
    connection has stayed authenticated for ``reset_after`` seconds: a server
    that accepts and then drops every connection still sees the waits grow.

    Args:
        initial: Upper bound of the first wait, in seconds.
        maximum: Cap of the upper bound, in seconds.
        multiplier: Growth of the upper bound per failure.
        reset_after: Seconds a connection must stay authenticated before the
            next failure counts as the first again.
        max_attempts: Failed attempts in a row before giving up (the last
            error is raised), or ``None`` to retry for as long as the errors
            are transient.

    Example:
        >>> Backoff(initial=0.5, maximum=10.0).delay(3) <= 2.0
        True
    """

    initial: float = 1.0
    maximum: float = 30.0
    multiplier: float = 2.0
    reset_after: float = 10.0
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        for name in ("initial", "maximum", "multiplier", "reset_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UsageError(f"Backoff.{name} must be a finite number, not {value!r}")
        if self.initial <= 0:
            raise UsageError(f"Backoff.initial must be positive, not {self.initial!r}")
        if self.maximum < self.initial:
            raise UsageError("Backoff.maximum must be at least Backoff.initial")
        if self.multiplier < 1:
            raise UsageError(f"Backoff.multiplier must be at least 1, not {self.multiplier!r}")
        if self.reset_after < 0:
            raise UsageError(f"Backoff.reset_after must not be negative, not {self.reset_after!r}")
        if self.max_attempts is not None and (
            isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1
        ):
            raise UsageError(f"Backoff.max_attempts must be a positive int or None, not {self.max_attempts!r}")

    def delay(self, failures: int) -> float:
        """Return the wait before the next attempt after ``failures`` failures in a row.

        Args:
            failures: Failed attempts in a row, at least 1.
        """
        wait = tenacity.wait_random_exponential(multiplier=self.initial, max=self.maximum, exp_base=self.multiplier)
        state = tenacity.RetryCallState(retry_object=_NO_RETRYING, fn=None, args=(), kwargs={})
        state.attempt_number = max(failures, 1)
        return float(wait(state))

    def exhausted(self, failures: int) -> bool:
        """Return whether ``failures`` failures in a row use up ``max_attempts``."""
        return self.max_attempts is not None and failures >= self.max_attempts


# tenacity's wait strategies read only the attempt number of the state they are
# given; the state wants a retrying object to belong to.
_NO_RETRYING = tenacity.Retrying()


@dataclasses.dataclass(slots=True)
class RetryState:
    """The retry decision across the attempts of one client.

    Args:
        backoff: The waits between attempts, or ``None`` to never retry.
        auth_retries: ``auth_error`` answers in a row retried with a fresh token.
        token_refreshes: Whether the token comes from a function, so that a
            new attempt may carry a new token.

    Example:
        >>> state = RetryState(Backoff(initial=1.0, max_attempts=2), auth_retries=1, token_refreshes=False)
        >>> state.after(ConnectError("refused"), uptime=None) is not None
        True
        >>> state.after(ConnectError("refused"), uptime=None) is None  # max_attempts reached
        True
    """

    backoff: Backoff | None
    auth_retries: int
    token_refreshes: bool
    failures: int = 0
    """Attempts in a row that failed, or whose connection ended before ``reset_after``: sets the wait."""
    failed_attempts: int = 0
    """Attempts in a row that did not authenticate: counts against ``max_attempts``."""
    auth_failures: int = 0
    """``auth_error`` answers in a row."""
    connected_before: bool = False
    """Whether an attempt ever authenticated."""

    def after(self, error: ChatfeedError, *, uptime: float | None) -> float | None:
        """Record how an attempt ended; return the wait before the next one, or ``None`` to stop.

        Args:
            error: What ended the attempt, or its authenticated connection.
            uptime: Seconds the connection stayed authenticated, or ``None``
                when the attempt never authenticated.
        """
        backoff = self.backoff
        if uptime is None:
            self.failed_attempts += 1
        else:
            self.connected_before = True
            self.failed_attempts = 0
            self.auth_failures = 0
            if backoff is not None and uptime >= backoff.reset_after:
                self.failures = 0
        self.failures += 1
        if backoff is None or backoff.exhausted(self.failed_attempts):
            return None
        if isinstance(error, AuthenticationError):
            self.auth_failures += 1
            # Only a token function can do better next time, and only so often.
            if not self.token_refreshes or self.auth_failures > self.auth_retries:
                return None
            return backoff.delay(self.failures)
        verdict = classify(error, connected_before=self.connected_before)
        if not verdict.retry:
            return None
        return max(backoff.delay(self.failures), verdict.min_delay)


def parse_retry_after(value: str | None, *, now: datetime.datetime | None = None) -> float | None:
    """Return the seconds a ``Retry-After`` header asks to wait, or ``None``.

    Args:
        value: The header: delta-seconds or an HTTP date.
        now: The current time, for an HTTP date (default: the clock).
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return max((when - now).total_seconds(), 0.0)
