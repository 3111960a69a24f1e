"""The retry policy: which failures are worth a reconnect, and how long to wait."""

from __future__ import annotations

import math
import ssl
import statistics
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from chatfeed import (
    AuthenticationError,
    AuthTimeoutError,
    Backoff,
    ChatfeedError,
    ConnectError,
    ConnectionLostError,
    HandshakeError,
    ProtocolError,
    TokenProviderError,
    UsageError,
)
from chatfeed._policy import MAX_RETRY_AFTER, TRY_AGAIN_LATER_DELAY, RetryState, Verdict, classify, parse_retry_after

SAMPLES = 500

# Close codes


@pytest.mark.parametrize("code", [1000, 1001, 1005, 1006, 1011, 1012, 1014, 3000, 3499, 4000, 4499])
def test_server_close_codes_that_retry(code: int) -> None:
    verdict = classify(ConnectionLostError(code))

    assert verdict.retry is True
    assert verdict.min_delay == 0


def test_try_again_later_retries_after_a_minimum_delay() -> None:
    verdict = classify(ConnectionLostError(1013, "overloaded"))

    assert verdict == Verdict(retry=True, min_delay=TRY_AGAIN_LATER_DELAY)
    assert TRY_AGAIN_LATER_DELAY > 0


@pytest.mark.parametrize("code", [1002, 1003, 1007, 1008, 1009, 1010, 3500, 3999, 4500, 4999])
def test_server_close_codes_that_stop(code: int) -> None:
    assert classify(ConnectionLostError(code, "policy")).retry is False


@pytest.mark.parametrize("code", [1000, 1002, 1006, 1008, 1009, 1013, 3999, 4999])
def test_closes_by_this_side_always_retry(code: int) -> None:
    assert classify(ConnectionLostError(code, local=True)).retry is True


# HTTP status of the WebSocket handshake


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_handshake_statuses_that_retry(status: int) -> None:
    verdict = classify(HandshakeError(status))

    assert verdict.retry is True
    assert verdict.min_delay == 0


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_sets_the_minimum_delay(status: int) -> None:
    assert classify(HandshakeError(status, retry_after=12.5)) == Verdict(retry=True, min_delay=12.5)


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_capped(status: int) -> None:
    verdict = classify(HandshakeError(status, retry_after=MAX_RETRY_AFTER * 24))

    assert verdict == Verdict(retry=True, min_delay=MAX_RETRY_AFTER)


def test_infinite_retry_after_is_capped() -> None:
    assert classify(HandshakeError(503, retry_after=math.inf)).min_delay == MAX_RETRY_AFTER


@pytest.mark.parametrize("status", [400, 401, 403, 404, None])
def test_handshake_statuses_that_stop(status: int | None) -> None:
    assert classify(HandshakeError(status)).retry is False


def test_retry_after_on_a_status_that_stops_does_not_make_it_retry() -> None:
    assert classify(HandshakeError(403, retry_after=5)).retry is False


# Other errors


def test_connect_error_retries() -> None:
    error = ConnectError("connection refused")
    error.__cause__ = ConnectionRefusedError(111, "Connection refused")

    assert classify(error) == Verdict(retry=True)
    assert classify(ConnectError("no cause")).retry is True


def test_connect_error_from_other_tls_errors_retries() -> None:
    error = ConnectError("TLS handshake failed")
    error.__cause__ = ssl.SSLError(1, "unexpected eof")

    assert classify(error).retry is True


@pytest.mark.parametrize("connected_before", [False, True])
def test_connect_error_from_an_untrusted_certificate_stops(connected_before: bool) -> None:
    error = ConnectError("TLS certificate verification failed", tls=True)
    error.__cause__ = ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed certificate")

    assert classify(error, connected_before=connected_before).retry is False


def test_a_failed_tls_handshake_is_final_for_an_address_never_seen_speaking_tls() -> None:
    error = ConnectError("TLS handshake failed (WRONG_VERSION_NUMBER)", tls=True)

    assert classify(error).retry is False
    # Once the address has spoken TLS, the same failure is a server restarting mid-handshake.
    assert classify(error, connected_before=True).retry is True


def test_other_connect_errors_are_retried() -> None:
    assert classify(ConnectError("could not connect: Connection refused")).retry is True


@pytest.mark.parametrize(
    "error", [AuthTimeoutError(10.0), TokenProviderError("refresh failed")], ids=lambda e: type(e).__name__
)
def test_transient_errors_retry(error: ChatfeedError) -> None:
    assert classify(error) == Verdict(retry=True)


@pytest.mark.parametrize(
    "error",
    [AuthenticationError("Invalid token"), ProtocolError("bad frame"), UsageError("wrong"), ChatfeedError("?")],
    ids=lambda e: type(e).__name__,
)
def test_errors_that_stop(error: ChatfeedError) -> None:
    assert classify(error).retry is False


# Retry-After


@pytest.mark.parametrize(("value", "seconds"), [("120", 120.0), ("0", 0.0), (" 7 ", 7.0), ("86400", 86400.0)])
def test_retry_after_in_delta_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value) == seconds


def test_retry_after_as_a_future_http_date() -> None:
    now = datetime(2025, 10, 7, 12, 0, 0, tzinfo=timezone.utc)
    header = format_datetime(now + timedelta(seconds=90), usegmt=True)

    assert header == "Tue, 07 Oct 2025 12:01:30 GMT"
    assert parse_retry_after(header, now=now) == 90.0


def test_retry_after_as_a_past_http_date_is_zero() -> None:
    now = datetime(2025, 10, 7, 12, 0, 0, tzinfo=timezone.utc)

    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=now) == 0.0


def test_retry_after_as_an_http_date_defaults_to_the_clock() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    far = parse_retry_after("Fri, 01 Jan 9999 00:00:00 GMT")
    assert far is not None and far > 0


@pytest.mark.parametrize(
    "value",
    [None, "", "soon", "1.5", "-5", "12abc", "Wed, 32 Oct 2015 07:28:00 GMT", "\u00b2"],
    ids=["none", "empty", "word", "fraction", "negative", "trailing-junk", "bad-date", "superscript-two"],
)
def test_retry_after_garbage_gives_none(value: str | None) -> None:
    # "\u00b2" is how websockets hands over a header byte 0xB2 (ISO-8859-1).
    assert parse_retry_after(value) is None


# Backoff


def bound(backoff: Backoff, failures: int) -> float:
    return min(backoff.initial * backoff.multiplier ** (failures - 1), backoff.maximum)


@pytest.mark.parametrize("failures", [1, 2, 3, 4, 5, 6, 10, 50])
def test_delays_stay_within_the_full_jitter_bound(failures: int) -> None:
    backoff = Backoff(initial=0.5, maximum=10.0, multiplier=2.0)

    delays = [backoff.delay(failures) for _ in range(SAMPLES)]

    assert all(0 <= delay <= bound(backoff, failures) for delay in delays)


def test_upper_bound_grows_then_caps() -> None:
    backoff = Backoff(initial=1.0, maximum=8.0, multiplier=2.0)

    highest = [max(backoff.delay(n) for _ in range(SAMPLES)) for n in range(1, 8)]

    # Bounds 1, 2, 4, 8, 8, 8, 8: each failure's largest sample goes past the
    # previous bound until the cap, and no sample ever passes the cap.
    assert highest[0] <= 1.0
    assert 1.0 < highest[1] <= 2.0
    assert 2.0 < highest[2] <= 4.0
    assert all(7.0 < h <= 8.0 for h in highest[3:])


def test_delays_are_jittered() -> None:
    backoff = Backoff()

    assert len({backoff.delay(3) for _ in range(50)}) > 40


def test_mean_delay_for_many_failures_is_half_the_maximum() -> None:
    backoff = Backoff(initial=1.0, maximum=30.0)

    mean = statistics.fmean(backoff.delay(40) for _ in range(2000))

    assert 0.4 * 30.0 < mean < 0.6 * 30.0


def test_huge_failure_counts_are_capped_not_overflowed() -> None:
    backoff = Backoff(initial=1.0, maximum=30.0, multiplier=10.0)

    assert 0 <= backoff.delay(10_000) <= 30.0


def test_multiplier_one_keeps_the_bound_constant() -> None:
    backoff = Backoff(initial=2.0, maximum=30.0, multiplier=1.0)

    assert all(backoff.delay(n) <= 2.0 for n in range(1, 20) for _ in range(20))


def test_default_backoff() -> None:
    backoff = Backoff()

    assert (backoff.initial, backoff.maximum, backoff.multiplier) == (1.0, 30.0, 2.0)
    assert backoff.max_attempts is None
    assert all(0 <= backoff.delay(1) <= 1.0 for _ in range(100))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": 0},
        {"initial": -1.0},
        {"initial": math.nan},
        {"initial": math.inf},
        {"maximum": 0.5},
        {"maximum": math.nan},
        {"multiplier": 0.5},
        {"multiplier": math.nan},
        {"reset_after": -1},
        {"reset_after": math.nan},
        {"max_attempts": 0},
        {"max_attempts": -3},
        {"max_attempts": True},
        {"max_attempts": 2.0},
        {"initial": True},
        {"initial": "1"},
    ],
    ids=repr,
)
def test_invalid_backoff_arguments_raise_usage_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError, match="Backoff"):
        Backoff(**kwargs)  # type: ignore[arg-type]


def test_valid_edge_arguments() -> None:
    Backoff(initial=5.0, maximum=5.0, multiplier=1.0, reset_after=0, max_attempts=1)


def test_exhausted() -> None:
    backoff = Backoff(max_attempts=3)

    assert [backoff.exhausted(n) for n in range(5)] == [False, False, False, True, True]


def test_never_exhausted_without_max_attempts() -> None:
    assert not Backoff().exhausted(10**9)


# RetryState: the decision across attempts

NO_JITTER = Backoff(initial=1.0, maximum=8.0, reset_after=10.0)


def state(backoff: Backoff | None = NO_JITTER, *, auth_retries: int = 1, refreshes: bool = False) -> RetryState:
    return RetryState(backoff, auth_retries, token_refreshes=refreshes)


def test_retry_state_counts_failures_in_a_row_for_the_wait() -> None:
    retry = state()
    for failures in range(1, 5):
        delay = retry.after(ConnectError("refused"), uptime=None)
        assert delay is not None and 0 <= delay <= min(2 ** (failures - 1), 8.0)
        assert retry.failures == failures


def test_retry_state_resets_the_wait_only_after_a_connection_that_lasted() -> None:
    retry = state()
    for _ in range(3):
        retry.after(ConnectionLostError(1012), uptime=1.0)  # accepted, then dropped soon after
    assert retry.failures == 3
    retry.after(ConnectionLostError(1012), uptime=10.0)
    assert retry.failures == 1


def test_retry_state_max_attempts_counts_only_attempts_that_did_not_authenticate() -> None:
    retry = state(Backoff(max_attempts=2))
    for _ in range(5):
        assert retry.after(ConnectionLostError(1012), uptime=0.1) is not None
    assert retry.after(ConnectError("refused"), uptime=None) is not None
    assert retry.after(ConnectError("refused"), uptime=None) is None


def test_retry_state_never_retries_without_a_backoff() -> None:
    assert state(None).after(ConnectError("refused"), uptime=None) is None


def test_retry_state_retries_auth_errors_only_with_a_token_function_and_so_often() -> None:
    assert state().after(AuthenticationError("expired"), uptime=None) is None
    retry = state(auth_retries=2, refreshes=True)
    assert retry.after(AuthenticationError("expired"), uptime=None) is not None
    assert retry.after(AuthenticationError("expired"), uptime=None) is not None
    assert retry.after(AuthenticationError("expired"), uptime=None) is None


def test_retry_state_forgets_auth_errors_after_an_authenticated_connection() -> None:
    retry = state(auth_retries=1, refreshes=True)
    assert retry.after(AuthenticationError("expired"), uptime=None) is not None
    assert retry.after(ConnectionLostError(1012), uptime=5.0) is not None  # a fresh token worked
    assert retry.after(AuthenticationError("expired"), uptime=None) is not None


def test_retry_state_takes_the_verdicts_minimum_wait() -> None:
    retry = state()
    delay = retry.after(ConnectionLostError(1013), uptime=1.0)
    assert delay is not None and delay >= 5.0


def test_retry_state_tls_failure_is_final_until_the_address_has_worked() -> None:
    failure = ConnectError("TLS handshake failed (WRONG_VERSION_NUMBER)", tls=True)
    assert state().after(failure, uptime=None) is None
    retry = state()
    retry.after(ConnectionLostError(1001), uptime=20.0)
    assert retry.connected_before
    assert retry.after(failure, uptime=None) is not None
