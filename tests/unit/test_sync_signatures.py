"""chatfeed.sync keeps in step with the async client and pool it drives: same options, corresponding methods.

When one of these fails after a change to ``chatfeed.Client`` (or
``chatfeed.Pool``), make the same change to ``chatfeed.sync.Client`` (or
``chatfeed.sync.Pool``); or, if the difference is meant, list it here with
the reason.
"""

from __future__ import annotations

import inspect
import sys
import threading
from typing import Any

import pytest
from typing_extensions import get_overloads

import chatfeed
import chatfeed.sync

# Public methods and properties that only one of the two has, and why.
ONLY_ASYNC = {
    "__aenter__": "async with; the sync client has __enter__",
    "__aexit__": "async with; the sync client has __exit__",
}
ONLY_SYNC = {
    "__enter__": "with",
    "__exit__": "with",
}

# Parameters of a common method that differ, and why: (method, parameter) -> reason.
PARAMETERS_ONLY_ASYNC = {
    ("on", "key"): "applies to concurrency > 1, which the sync client refuses",
    ("on", "max_pending"): "applies to concurrency > 1, which the sync client refuses",
    ("run", "handle_signals"): "sync run() always closes on KeyboardInterrupt and returns",
}
PARAMETERS_ONLY_SYNC = {
    ("events", "timeout"): "a blocking next() needs a way to stop waiting; async code has asyncio.timeout",
}

# The same for the pools.
POOL_ONLY_ASYNC = ONLY_ASYNC
POOL_ONLY_SYNC = ONLY_SYNC
POOL_PARAMETERS_ONLY_ASYNC = {
    ("on", "key"): "applies to concurrency > 1, which the sync pool refuses",
    ("on", "max_pending"): "applies to concurrency > 1, which the sync pool refuses",
}
POOL_PARAMETERS_ONLY_SYNC = PARAMETERS_ONLY_SYNC

# What differs between each pair, by the async class.
PAIRS: dict[str, tuple[type[Any], type[Any], dict[str, str], dict[str, str], dict[Any, str], dict[Any, str]]] = {
    "Client": (
        chatfeed.Client,
        chatfeed.sync.Client,
        ONLY_ASYNC,
        ONLY_SYNC,
        PARAMETERS_ONLY_ASYNC,
        PARAMETERS_ONLY_SYNC,
    ),
    "Pool": (
        chatfeed.Pool,
        chatfeed.sync.Pool,
        POOL_ONLY_ASYNC,
        POOL_ONLY_SYNC,
        POOL_PARAMETERS_ONLY_ASYNC,
        POOL_PARAMETERS_ONLY_SYNC,
    ),
}

# The classes each side's methods return, and what those have in common.
STREAM_ONLY_ASYNC = {"__aiter__", "__anext__", "__aenter__", "__aexit__", "aclose", "offer", "wait_for_space", "end"}
STREAM_ONLY_SYNC = {"__iter__", "__next__", "__enter__", "__exit__", "close", "timeout"}
EXPECTATION_ONLY_ASYNC = {"__await__"}
EXPECTATION_ONLY_SYNC: set[str] = set()


_PROTOCOL = {"__enter__", "__exit__", "__aenter__", "__aexit__", "__iter__", "__next__", "__aiter__", "__anext__"}


def public_members(cls: type[Any]) -> set[str]:
    """The methods and properties of ``cls`` that its users call (not its data attributes)."""
    names = {name for name in dir(cls) if not name.startswith("_")} | (_PROTOCOL | {"__await__"}) & set(vars(cls))
    return {
        name
        for name in names
        if inspect.isfunction(member := inspect.getattr_static(cls, name)) or isinstance(member, property)
    }


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_every_option_of_the_async_class_is_an_option_of_the_sync_one_with_the_same_default(pair: str) -> None:
    async_class, sync_class, *_ = PAIRS[pair]
    expected = inspect.signature(async_class.__init__).parameters
    actual = inspect.signature(sync_class.__init__).parameters
    assert list(actual) == list(expected), "the same options, in the same order"
    for name, parameter in expected.items():
        other = actual[name]
        assert other.kind == parameter.kind, name
        assert other.default == parameter.default, name
        # Both modules spell their annotations with the same names.
        assert other.annotation == parameter.annotation, name


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_the_public_methods_correspond(pair: str) -> None:
    async_class, sync_class, only_async, only_sync, *_ = PAIRS[pair]
    async_members = public_members(async_class)
    sync_members = public_members(sync_class)
    assert async_members - sync_members == set(only_async)
    assert sync_members - async_members == set(only_sync)


@pytest.mark.parametrize(
    ("pair", "method"),
    [
        (pair, method)
        for pair in sorted(PAIRS)
        for method in sorted(public_members(PAIRS[pair][0]) - set(PAIRS[pair][2]))
    ],
)
def test_each_common_method_takes_the_same_parameters_with_the_same_defaults(pair: str, method: str) -> None:
    async_class, sync_class, _, _, parameters_only_async, parameters_only_sync = PAIRS[pair]
    async_member = inspect.getattr_static(async_class, method)
    sync_member = inspect.getattr_static(sync_class, method)
    if isinstance(async_member, property):
        assert isinstance(sync_member, property), method
        return
    assert inspect.iscoroutinefunction(sync_member) is False, f"sync {method} must block, not be awaited"
    expected = inspect.signature(async_member).parameters
    actual = inspect.signature(sync_member).parameters
    for name, parameter in expected.items():
        if (method, name) in parameters_only_async:
            assert name not in actual, f"{method}({name}=) is listed as async-only"
            continue
        assert name in actual, f"sync {method}() lacks {name}="
        assert actual[name].kind == parameter.kind, (method, name)
        assert actual[name].default == parameter.default, (method, name)
    extra = {name for name in actual if name not in expected}
    assert extra == {name for (of, name) in parameters_only_sync if of == method}, method


@pytest.mark.parametrize("pair", sorted(PAIRS))
@pytest.mark.parametrize("method", ["on", "expect"])
def test_the_overloads_cover_the_same_events(pair: str, method: str) -> None:
    async_class, sync_class, *_ = PAIRS[pair]

    def events_of(function: Any) -> list[str]:
        overloads = get_overloads(function)
        return [str(inspect.signature(overload).parameters["event"].annotation) for overload in overloads]

    assert events_of(getattr(sync_class, method)) == events_of(getattr(async_class, method))


def test_the_stream_and_the_expectation_correspond() -> None:
    async_stream = public_members(chatfeed.EventStream) | {"__aenter__", "__aexit__"}
    sync_stream = public_members(chatfeed.sync.EventStream)
    assert async_stream - sync_stream == STREAM_ONLY_ASYNC
    assert sync_stream - async_stream == STREAM_ONLY_SYNC
    async_expectation = public_members(chatfeed.Expectation) | {"__enter__", "__exit__"}
    sync_expectation = public_members(chatfeed.sync.Expectation)
    assert async_expectation - sync_expectation == EXPECTATION_ONLY_ASYNC
    assert sync_expectation - async_expectation == EXPECTATION_ONLY_SYNC
    wait = inspect.signature(chatfeed.sync.Expectation.wait).parameters
    assert list(wait) == list(inspect.signature(chatfeed.Expectation.wait).parameters)


def test_the_pools_stream_corresponds() -> None:
    async_stream = public_members(chatfeed.PoolEventStream) | {"__aenter__", "__aexit__"}
    sync_stream = public_members(chatfeed.sync.PoolEventStream)
    assert async_stream - sync_stream == {"__aiter__", "__anext__", "__aenter__", "__aexit__", "aclose"}
    assert sync_stream - async_stream == STREAM_ONLY_SYNC


def test_the_module_is_public_documented_and_not_imported_by_chatfeed() -> None:
    assert chatfeed.sync.__all__ == sorted(chatfeed.sync.__all__)
    for name in chatfeed.sync.__all__:
        assert inspect.getdoc(getattr(chatfeed.sync, name)), f"chatfeed.sync.{name} has no docstring"
    assert "sync" not in chatfeed.__all__


def test_a_client_starts_no_thread_until_it_is_used() -> None:
    before = set(threading.enumerate())
    client = chatfeed.sync.Client("ws://127.0.0.1:9", token="t")
    client.on("new_message")(lambda event: None)
    client.on_error(lambda exc, event: None)
    assert client.statistics().state == "unopened"
    assert not client.connected
    assert repr(client) == "<chatfeed.sync.Client url='ws://127.0.0.1:9' state=unopened>"
    client.close()
    assert set(threading.enumerate()) == before
    assert client.statistics().state == "closed"


def test_import_chatfeed_does_not_import_the_sync_client() -> None:
    import subprocess

    code = "import sys, chatfeed; print('chatfeed.sync' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout == "False\n"
