"""The package's public surface: complete, sorted, documented, typed."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import chatfeed
import chatfeed.bridge
import chatfeed.bridge.testing
import chatfeed.exceptions
import chatfeed.testing


def test_all_is_sorted_and_complete() -> None:
    assert chatfeed.__all__ == sorted(chatfeed.__all__)
    public = {name for name in vars(chatfeed) if not name.startswith("_")} - {
        "bridge",
        "exceptions",
        "models",
        "otel",  # imported by its own tests, not by chatfeed
        "prometheus",
        "sync",
        "testing",
    }
    assert public | {"__version__"} == set(chatfeed.__all__)


def test_the_bridge_all_is_sorted_and_complete() -> None:
    bridge = chatfeed.bridge  # its __all__ is sorted by ruff (RUF022: constants first)
    public = {name for name in vars(bridge) if not name.startswith("_")} - {
        "annotations",
        "testing",
        "Any",
        "UsageError",
    }
    assert public == set(bridge.__all__)


def test_every_exception_is_exported_and_in_the_drawn_tree() -> None:
    docstring = chatfeed.exceptions.__doc__ or ""
    for name in chatfeed.exceptions.__all__:
        assert getattr(chatfeed, name) is getattr(chatfeed.exceptions, name)
        assert name in docstring, f"{name} missing from the exception tree"
        assert issubclass(getattr(chatfeed, name), chatfeed.ChatfeedError)


def test_every_public_name_has_a_docstring() -> None:
    modules = (chatfeed, chatfeed.testing, chatfeed.bridge, chatfeed.bridge.testing)
    for module in modules:
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if typing.get_origin(obj) is not None:
                continue  # a type alias (a class on Python 3.10); documented where it is defined
            if inspect.isclass(obj) or inspect.isfunction(obj):
                assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"


def test_package_is_typed() -> None:
    assert (Path(chatfeed.__file__).parent / "py.typed").exists()
