"""The recording format: what `chatfeed.Recorder` writes and `read_recording` accepts, without a socket."""

from __future__ import annotations

import asyncio
import errno
import json
import stat
from pathlib import Path

import pytest

import chatfeed
from chatfeed._recording import RecordedFrame, read_recording
from chatfeed.testing import FeedServer
from tests.conftest import MS, OTHER_TOKEN, SECRET, TOKEN

HEADER = '{"format": "chatfeed-recording", "version": 1}\n'


def test_what_a_recorder_writes_reads_back_frame_for_frame(tmp_path: Path) -> None:
    path = tmp_path / "feed.jsonl"
    frames: list[tuple[str | None, str | bytes]] = [
        (None, '{"type": "new_message", "payload": {"content": "été \\ud83d 😀"}}'),
        ("user-1", b'{"type": "typing"}\x00\xff'),
        ("user-2", "not json\nover two lines"),
        (None, "\ud83d a lone surrogate, which UTF-8 cannot hold"),
        (None, ""),
    ]
    with chatfeed.Recorder(path) as recorder:
        for feed, frame in frames:
            recorder.frame_received(feed, frame)  # outside an event loop: written at once
        assert recorder.frames == len(frames)
    recording = read_recording(path)
    assert [(frame.feed, frame.frame) for frame in recording.frames] == frames
    assert recording.feeds == ["user-1", "user-2"]
    assert all(isinstance(frame, RecordedFrame) and frame.t >= 0 for frame in recording.frames)
    assert recording.started_at is not None and recording.started_at.endswith("Z")
    assert len(path.read_text(encoding="utf-8").splitlines()) == 1 + len(frames)  # one line each
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    header = json.loads(path.read_text().splitlines()[0])
    assert (header["format"], header["version"], header["url"]) == ("chatfeed-recording", 1, None)


def test_an_existing_file_recorded_over_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "feed.jsonl"
    path.write_text("an older recording")
    path.chmod(0o644)
    with chatfeed.Recorder(path) as recorder:
        recorder.frame_received(None, "a message's content")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_a_recording_whose_writes_fail_stops_and_says_why_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Linux's /dev/full fails every write. The timer's flush must not send the error to
    # asyncio's handler, again and again.
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda loop, context: errors.append(context))
    recorder = chatfeed.Recorder("/dev/full", flush_interval=10 * MS)
    recorder.frame_received(None, "first")
    deadline = loop.time() + 5000 * MS
    while recorder.error is None:
        assert loop.time() < deadline, "the flush never came"
        await asyncio.sleep(10 * MS)
    recorder.frame_received(None, "after the failure")
    recorder.close()
    assert errors == []
    assert recorder.error.errno == errno.ENOSPC
    assert recorder.frames == 1
    stopped = [record for record in caplog.records if "recording to /dev/full stopped" in record.getMessage()]
    assert [record.levelname for record in stopped] == ["ERROR"]


def test_a_recorder_closed_records_nothing_more_and_closes_once(tmp_path: Path) -> None:
    path = tmp_path / "feed.jsonl"
    recorder = chatfeed.Recorder(path)
    recorder.close()
    recorder.frame_received(None, "late")
    recorder.close()
    assert read_recording(path).frames == []
    assert recorder.frames == 0


async def test_a_recorder_writes_what_it_holds_within_its_flush_interval(tmp_path: Path) -> None:
    path = tmp_path / "feed.jsonl"
    with chatfeed.Recorder(path, flush_interval=50 * MS) as recorder:
        recorder.frame_received(None, "first")
        assert path.read_bytes() == b""  # held
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5000 * MS
        while len(path.read_bytes().splitlines()) < 2:
            assert loop.time() < deadline, "never flushed"
            await asyncio.sleep(10 * MS)
        recorder.frame_received(None, "second")
    assert [frame.frame for frame in read_recording(path).frames] == ["first", "second"]


def test_the_header_gives_the_address_without_credentials_query_values_or_token(tmp_path: Path) -> None:
    url = f"wss://someone:{TOKEN}@feed.example.com/v1/{TOKEN}/stream?token={TOKEN}&room=7"
    path = tmp_path / "client.jsonl"
    with chatfeed.Recorder(path) as recorder:
        chatfeed.Client(url, token=TOKEN, observer=recorder)
    assert json.loads(path.read_text().splitlines()[0])["url"] == (
        "wss://***@feed.example.com/v1/***/stream?token=***&room=***"
    )
    path = tmp_path / "pool.jsonl"
    with chatfeed.Recorder(path) as recorder:
        pool = chatfeed.Pool(f"wss://feed.example.com/{OTHER_TOKEN[:20]}", observer=recorder)
        pool.add("first", token=TOKEN)
        pool.add("second", token=OTHER_TOKEN)
    header = json.loads(path.read_text().splitlines()[0])
    assert header["url"] == "wss://feed.example.com/***"
    assert SECRET not in path.read_text()


def test_a_recorder_refuses_a_flush_interval_that_is_not_positive(tmp_path: Path) -> None:
    for bad in (0, -1.0, float("nan"), True, "1"):
        with pytest.raises(chatfeed.UsageError, match="flush_interval"):
            chatfeed.Recorder(tmp_path / "feed.jsonl", flush_interval=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "line 1: empty file"),
        (b"\n" + HEADER.encode(), "line 1: empty"),
        (b'{"format": "something else"}\n', "line 1: not a chatfeed recording"),
        (b"[1, 2]\n", "line 1: expected a JSON object"),
        (b'{"format": "chatfeed-recording", "version": 2}\n', "line 1: a recording of version 2, newer"),
        (b'{"format": "chatfeed-recording", "version": "1"}\n', 'line 1: the header\'s "version"'),
        (HEADER.encode() + b'{"t": 0, "text": "a"}\n{"t": 1, "text": "b"\n', "line 3: not JSON"),
        (HEADER.encode() + b'{"t": 0, "text": "\xff"}\n', "line 2: not UTF-8"),
        (HEADER.encode() + b'{"text": "a"}\n', 'line 2: "t" must be'),
        (HEADER.encode() + b'{"t": "soon", "text": "a"}\n', 'line 2: "t" must be'),
        (HEADER.encode() + b'{"t": 0}\n', 'line 2: a frame needs "text"'),
        (HEADER.encode() + b'{"t": 0, "text": "a", "binary": "YQ=="}\n', 'line 2: a frame needs "text"'),
        (HEADER.encode() + b'{"t": 0, "text": 1}\n', 'line 2: "text" must be a string'),
        (HEADER.encode() + b'{"t": 0, "binary": "not base64!"}\n', 'line 2: "binary" is not valid base64'),
        (HEADER.encode() + b'{"t": 0, "feed": 7, "text": "a"}\n', 'line 2: "feed" must be a string'),
    ],
)
def test_a_bad_recording_is_refused_with_its_line_number(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "feed.jsonl"
    path.write_bytes(content)
    with pytest.raises(chatfeed.UsageError) as caught:
        read_recording(path)
    assert str(caught.value).startswith(f"{path}, {message}")
    assert "\n" not in str(caught.value)


def test_blank_lines_after_the_header_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "feed.jsonl"
    path.write_text(HEADER + '\n{"t": 0.5, "text": "a", "extra": "ignored"}\n  \n')
    assert read_recording(path).frames == [RecordedFrame(0.5, None, "a")]


def test_a_missing_recording_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(chatfeed.UsageError, match=r"cannot read the recording .*missing\.jsonl"):
        read_recording(tmp_path / "missing.jsonl")


async def test_replay_refuses_a_speed_that_is_not_positive(tmp_path: Path) -> None:
    path = tmp_path / "feed.jsonl"
    path.write_text(HEADER)
    server = FeedServer()  # not started: nothing to send to
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(chatfeed.UsageError, match="speed must be a positive number"):
            await server.replay(path, speed=bad)
    assert await server.replay(path, speed=float("inf")) == 0
