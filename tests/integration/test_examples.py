"""The examples run, as users run them: as programs."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from chatfeed.testing import FeedServer

from ..conftest import TOKEN

EXAMPLES = Path(__file__).parents[2] / "examples"
TESTING_GUIDE = Path(__file__).parents[2] / "docs" / "guides" / "testing.md"
WAIT = 20.0
"""Seconds to wait for a program to start, handle events or stop: a guard against hangs, not a delay."""


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


def test_backfill_delivers_what_was_pushed_during_the_gap_first_and_once() -> None:
    lines = run_example(str(EXAMPLES / "backfill.py")).stdout.splitlines()
    assert lines[2].startswith("-- reconnected after") and lines[2].endswith(": backfilling")
    assert lines[:2] + lines[3:-1] == [
        "live      1: live",
        "live      2: live",
        "backfill  3: pushed while disconnected",
        "backfill  4: pushed while disconnected",
        "live      5: live again",
        "live      6: live again",
    ]
    # It fetched from a second before the last message delivered: 1 and 2 came again, and were dropped.
    assert lines[-1] == "summary: 6 messages delivered, each once; 2 from backfill, 2 duplicate(s) dropped"


ANSWERED = re.compile(r"\[chat (\d+)\] answered question #(\d+) \((live|backfill)\)")
TIMING = re.compile(r"took ([0-9.]+) s with concurrency=8; inline, the model alone would take ([0-9.]+) s")


def test_the_ai_pipeline_answers_every_chat_in_order_side_by_side_across_a_restart() -> None:
    lines = run_example(str(EXAMPLES / "ai_pipeline.py")).stdout.splitlines()
    answers: list[tuple[int, int, str]] = []  # (chat, question, source), in the order they were answered
    for line in lines[:-4]:
        match = ANSWERED.fullmatch(line)
        assert match, line
        answers.append((int(match.group(1)), int(match.group(2)), match.group(3)))
    by_chat: dict[int, list[int]] = {}
    for chat, question, _ in answers:
        by_chat.setdefault(chat, []).append(question)
    assert by_chat == {chat: [1, 2, 3, 4, 5] for chat in range(1, 11)}  # each once, in order within its chat
    # Question 4 of each chat was asked while the server was down: it came from the backfill, and only it did.
    assert {(question, source) for _, question, source in answers} == {
        (1, "live"),
        (2, "live"),
        (3, "live"),
        (4, "backfill"),
        (5, "live"),
    }
    assert [chat for chat, _, _ in answers] != sorted(chat for chat, _, _ in answers)  # not one chat after another
    assert lines[-4:-1] == [
        "handled 50 user messages in 10 chats, 10 of them from backfill",
        "duplicates dropped: 1",  # the last answer before the drop: the backfill fetched from its created_at on
        "each chat in order: yes",
    ]
    timing = TIMING.fullmatch(lines[-1])
    assert timing, lines[-1]
    took, inline = float(timing.group(1)), float(timing.group(2))
    assert inline == 6.35
    assert took < inline / 2, lines[-1]


def test_expect_gets_an_answer_that_came_before_the_await() -> None:
    lines = run_example(str(EXAMPLES / "expect.py")).stdout.splitlines()
    assert lines == [
        "wait after the request (the race):",
        "  no answer within 0.5 s: it came before the wait began",
        "expect before the request:",
        "  answered before the await: yes",
        "  chat 2: Too much sun at noon.",
        "three chats at once:",
        "  chat 3: Earl Grey.",
        "  chat 4: Pepper.",
        "  chat 5: A slow reader making the writer wait.",
    ]


BUSIEST = re.compile(r"answered 20 questions of 20 users, at most (\d+) at a time")
BACK = re.compile(r"all 20 feeds back within ([0-9.]+) s of the drop")


def test_the_pool_example_isolates_a_bad_token_shares_its_lanes_and_brings_every_feed_back() -> None:
    lines = run_example(str(EXAMPLES / "many_feeds.py")).stdout.splitlines()
    # The bad token stops its own feed, before async with returns; the twenty others are up.
    assert lines[:3] == [
        "feed intruder stopped: authentication failed: Invalid token",
        "21 feeds: 20 up, 1 failed",
        "user-7 got: an answer to 'What is the tallest mountain in Europe?'",  # expect(feed=) got its feed's answer
    ]
    busiest = BUSIEST.fullmatch(lines[3])
    assert busiest, lines[3]
    # Twenty users' questions side by side, never more than the handler's concurrency over the whole pool.
    assert 2 <= int(busiest.group(1)) <= 8, lines[3]
    assert lines[4] == "-- the server dropped every connection"
    back = BACK.fullmatch(lines[5])
    assert back, lines[5]
    # Backoff.initial (0.5 s) of jitter, then the ramp; a generous bound, as a guard, not a benchmark.
    assert float(back.group(1)) < 10, lines[5]
    assert lines[6:] == [
        # Each feed's backfill brought its own user's question, and only it: answered once each.
        "answered 20 questions missed while away, from the backfill",
        # The stopped feed was removed; each feed reconnected once; the backfill overlapped the
        # answer each feed had delivered last, and dedupe dropped it.
        "pool: 20 feeds, 20 up, 0 failed; 40 connections, 20 reconnects; 20 backfilled, 20 duplicates dropped",
        "user-7: open, 2 connections, 1 backfilled, 1 duplicate(s) dropped",
    ]


def json_documents(text: str) -> list[Any]:
    """The JSON documents printed one after the other in ``text``, as OpenTelemetry's console exporters print them."""
    decoder = json.JSONDecoder()
    documents: list[Any] = []
    position = 0
    while (position := len(text) - len(text[position:].lstrip())) < len(text):
        document, position = decoder.raw_decode(text, position)
        documents.append(document)
    return documents


def test_the_otel_example_prints_each_handler_calls_span_with_its_child_and_the_metrics() -> None:
    *spans, exported = json_documents(run_example(str(EXAMPLES / "otel_console.py")).stdout)
    processes = [span for span in spans if span["name"] == "process new_message"]
    children = [span for span in spans if span["name"] == "summarise"]
    assert len(processes) == len(children) == 3
    for process in processes:
        assert process["kind"] == "SpanKind.CONSUMER" and process["parent_id"] is None
        assert process["attributes"]["messaging.system"] == "chatfeed"
        assert process["attributes"]["messaging.message.conversation_id"] == "1"
    assert {child["parent_id"] for child in children} == {process["context"]["span_id"] for process in processes}

    [resource] = exported["resource_metrics"]
    assert resource["resource"]["attributes"]["service.name"] == "otel-console-example"
    [scope] = resource["scope_metrics"]
    assert scope["scope"]["name"] == "chatfeed"
    points = {metric["name"]: metric["data"]["data_points"] for metric in scope["metrics"]}
    consumed = {
        point["attributes"]["chatfeed.event.type"]: point["value"]
        for point in points["messaging.client.consumed.messages"]
    }
    assert consumed == {"new_chat": 1, "new_message": 3}
    [duration] = points["messaging.process.duration"]
    assert duration["count"] == 3 and duration["min"] > 0.005  # the handler sleeps 10 ms
    assert sum(point["count"] for point in points["chatfeed.event.lag"]) == 4
    states = {point["attributes"]["chatfeed.feed.state"]: point["value"] for point in points["chatfeed.feed.count"]}
    assert states["open"] == 1 and sum(states.values()) == 1
    [age] = points["chatfeed.feed.last_event.age"]
    assert 0 <= age["value"] < WAIT
    assert {point["attributes"]["chatfeed.buffer"]: point["value"] for point in points["chatfeed.buffer.depth"]} == {
        "events": 0
    }


def recommended_ini() -> str:
    """The pytest configuration the testing guide recommends, as it shows it."""
    match = re.search(r"```ini\n(.*?)```", TESTING_GUIDE.read_text(), re.DOTALL)
    assert match, "the testing guide shows no pytest.ini"
    return match.group(1)


@pytest.mark.parametrize("mode", ["auto", "strict"])
def test_the_testkit_example_passes_under_pytest(tmp_path: Path, mode: str) -> None:
    # A copy in a directory of its own, with the pytest.ini that the testing
    # guide recommends: this project's configuration must not help it pass.
    ini = recommended_ini()
    assert ini.startswith("[pytest]\n") and "asyncio_mode = auto\n" in ini
    if mode == "strict":  # pytest-asyncio's default, when asyncio_mode is not set
        ini = ini.replace("asyncio_mode = auto\n", "")
    (tmp_path / "pytest.ini").write_text(ini)
    shutil.copy(EXAMPLES / "test_with_testkit.py", tmp_path)
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-W", "error"]
    command += ["-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), str(tmp_path / "test_with_testkit.py")]
    result = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(rf"^asyncio: mode=(Mode\.)?{mode},", result.stdout, re.IGNORECASE | re.MULTILINE), result.stdout
    assert "3 passed" in result.stdout


async def start_example(*args: str, server: FeedServer) -> asyncio.subprocess.Process:
    """Start a program that reads the feed's address and token from the environment, as the examples do."""
    environment = {**os.environ, "CHATFEED_URL": server.url, "CHATFEED_TOKEN": TOKEN}
    return await asyncio.create_subprocess_exec(
        sys.executable, *args, cwd=EXAMPLES.parent, env=environment, stderr=asyncio.subprocess.PIPE
    )


async def read_until(process: asyncio.subprocess.Process, found: Callable[[str], bool]) -> list[str]:
    """Read the program's stderr line by line until ``found`` says yes; return the lines read."""
    lines: list[str] = []

    async def read() -> None:
        assert process.stderr is not None
        while not lines or not found(lines[-1]):
            line = await process.stderr.readline()
            assert line, "the program ended its output early:\n" + "".join(lines)
            lines.append(line.decode())

    await asyncio.wait_for(read(), WAIT)
    return lines


async def stop(process: asyncio.subprocess.Process, signum: signal.Signals) -> tuple[int, str]:
    """Send ``signum``; return the exit status and what the program wrote to stderr until it ended."""
    assert process.stderr is not None
    process.send_signal(signum)
    rest = await asyncio.wait_for(process.stderr.read(), WAIT)
    return await asyncio.wait_for(process.wait(), WAIT), rest.decode()


@pytest.fixture
async def processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Programs started by a test; any still running when it ends is killed."""
    started: list[asyncio.subprocess.Process] = []
    yield started
    for process in started:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_the_worker_handles_events_and_exits_cleanly_on_sigterm(
    server: FeedServer, processes: list[asyncio.subprocess.Process]
) -> None:
    worker = await start_example(str(EXAMPLES / "worker.py"), server=server)
    processes.append(worker)
    await server.wait_for_clients()
    for message_id, chat_id in [("m1", "1"), ("m2", "2"), ("m3", "1")]:
        await server.push_message(id=message_id, chat_id=chat_id)
    handled = await read_until(worker, lambda line: "handled message m3 " in line)
    assert [line for line in handled if "handled" in line] == [
        "INFO worker: handled message m1 of chat 1\n",
        "INFO worker: handled message m2 of chat 2\n",
        "INFO worker: handled message m3 of chat 1\n",
    ]
    status, output = await stop(worker, signal.SIGTERM)
    assert status == 0, output
    lines = output.splitlines()
    assert "INFO chatfeed: received SIGTERM: closing the client" in lines
    assert lines[-1] == "INFO worker: stopped: 3 message(s) in 2 chat(s)"


async def get(url: str) -> tuple[int, Any]:
    """GET ``url``; return the status code and the JSON body."""

    def get_blocking() -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(url, timeout=WAIT) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.load(error)

    return await asyncio.to_thread(get_blocking)


async def start_app(
    server: FeedServer, processes: list[asyncio.subprocess.Process]
) -> tuple[asyncio.subprocess.Process, str]:
    """Run examples/fastapi_app.py with uvicorn on a free port; return the process and the app's base URL."""
    app = await start_example(
        "-m", "uvicorn", "--app-dir", "examples", "fastapi_app:app", "--host", "127.0.0.1", "--port", "0", server=server
    )
    processes.append(app)
    # Uvicorn binds its port after the lifespan's startup, so after the client has connected.
    started = await read_until(app, lambda line: "Uvicorn running on" in line)
    assert server.clients == 1
    match = re.search(r"http://127\.0\.0\.1:(\d+)", started[-1])
    assert match, started[-1]
    return app, f"http://127.0.0.1:{match.group(1)}"


async def poll(url: str, until: Callable[[int, Any], bool]) -> tuple[int, Any]:
    """GET ``url`` until ``until(status code, body)`` says yes, within WAIT; the app offers nothing to wait on."""

    async def polling() -> tuple[int, Any]:
        while True:
            code, body = await get(url)
            if until(code, body):
                return code, body
            await asyncio.sleep(0.02)

    return await asyncio.wait_for(polling(), WAIT)


async def test_the_fastapi_app_serves_what_the_feed_pushed(
    server: FeedServer, processes: list[asyncio.subprocess.Process]
) -> None:
    app, base = await start_app(server, processes)
    sent = [await server.push_message(chat_id="7", content=content) for content in ["first", "second"]]

    code, messages = await poll(base + "/messages", lambda code, body: len(body) == len(sent))
    assert code == 200
    assert messages == [message.model_dump(mode="json", by_alias=True) for message in sent]
    assert messages[0]["chatId"] == "7" and messages[0]["content"] == "first"

    code, status = await get(base + "/status")
    assert code == 200
    assert status["state"] == "open" and status["connected"] is True
    assert status["connections"] == 1 and status["frames_received"] == 3  # auth_success and two messages

    # Uvicorn shuts down gracefully (the lifespan closes the client), then
    # ends with the signal it received, as process managers expect.
    exit_status, output = await stop(app, signal.SIGTERM)
    assert "Application shutdown complete." in output
    assert exit_status == -signal.SIGTERM, output


async def test_the_fastapi_app_health_check_fails_once_the_client_stopped_for_good(
    server: FeedServer, processes: list[asyncio.subprocess.Process]
) -> None:
    _, base = await start_app(server, processes)
    await server.close_connections(4500, "account deleted")  # a fatal close code: no reconnection
    code, status = await poll(base + "/status", lambda code, body: code != 200)
    assert code == 503
    assert status["state"] == "closed" and status["connected"] is False
