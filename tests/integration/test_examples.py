"""The examples run, as users run them: as programs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parents[2] / "examples"


def run_example(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, *args], cwd=EXAMPLES.parent, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_handlers_run_in_order_and_a_failure_reaches_on_error() -> None:
    lines = run_example(str(EXAMPLES / "handlers.py")).stdout.splitlines()
    assert lines[:5] == [
        "chat 1: Basil on a windowsill",
        "  1 show   user: Why is my basil wilting?",
        "  2 store  saved message 2",
        "  on_error ValueError: message 2 has no precis",
        "  4 count  1 message(s) handled",
    ]
    assert lines[-2:] == ["  3 precis Move it back.", "  4 count  3 message(s) handled"]


def test_iterate_matches_every_kind_of_event() -> None:
    lines = run_example(str(EXAMPLES / "iterate.py")).stdout.splitlines()
    assert lines[0].startswith("new chat 1: ")
    assert "server error: rate limit reached for chat 1" in lines
    assert "unknown event type 'typing', skipped" in lines
    assert lines[-1] == "done after 7 events"


def test_token_refresh_fetches_a_fresh_token_to_reconnect() -> None:
    result = run_example(str(EXAMPLES / "token_refresh.py"))
    lines = result.stdout.splitlines()
    assert lines.index("token fetch #1") < lines.index("connected") < lines.index("token fetch #2")
    assert any(line.startswith("reconnected after") for line in lines)
    assert "received: Delivered over the new connection." in lines
    assert lines[-1] == "summary: 2 token fetches, 2 distinct tokens in 2 auth frames"


def test_backfill_recovers_what_was_pushed_during_the_gap() -> None:
    lines = run_example(str(EXAMPLES / "backfill.py")).stdout.splitlines()
    assert lines[0].startswith("-- reconnected after")
    assert lines[0].endswith(": 2 message(s) recovered over REST")
    assert lines[1:] == [
        "view: 1: live",
        "view: 2: live",
        "view: 3: pushed while disconnected",
        "view: 4: pushed while disconnected",
        "view: 5: live again",
        "view: 6: live again",
    ]


def test_the_testkit_example_passes_under_pytest() -> None:
    # testpaths keeps examples/ out of the normal run: run the module explicitly, as a user would.
    result = run_example("-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLES / "test_with_testkit.py"))
    assert "3 passed" in result.stdout
