"""Logging set-up: text and JSON lines carrying tunnel name and context id."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from sttun.core.keys import format_key
from sttun.daemon.logsetup import setup_logging, tunnel_logger


@pytest.fixture(autouse=True)
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def test_text_line() -> None:
    out = io.StringIO()
    setup_logging("info", "text", stream=out)
    log = tunnel_logger("sttun.endpoint", "stt0", 0x1234)
    log.info("tunnel %s", "up")
    log.debug("hidden")
    logging.getLogger("sttun.x").warning("two\nlines")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d INFO sttun\.endpoint "
        r"\[stt0 key=0x1234\] tunnel up",
        lines[0],
    ), lines[0]
    assert lines[1].endswith(" WARNING sttun.x two\\nlines")


def test_json_line_with_extras_and_exception() -> None:
    out = io.StringIO()
    setup_logging("DEBUG", "json", stream=out)
    log = tunnel_logger(logging.getLogger("sttun.endpoint"), "stt1", 7)
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("failed", extra={"mtu": 1500})
    (line,) = out.getvalue().splitlines()
    obj = json.loads(line)
    assert obj["level"] == "error" and obj["logger"] == "sttun.endpoint"
    assert (obj["msg"], obj["tunnel"], obj["key"], obj["mtu"]) == ("failed", "stt1", "0x7", 1500)
    assert "ValueError: bad" in obj["exc"]


def test_setup_again_replaces_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("info", "text", stream=first)
    setup_logging("warning", "text", stream=second)
    logging.getLogger("sttun").warning("once")
    logging.getLogger("sttun").info("filtered")
    assert first.getvalue() == ""
    assert second.getvalue().count("\n") == 1


@pytest.mark.parametrize(("level", "fmt"), [("loud", "text"), ("info", "xml")])
def test_bad_arguments(level: str, fmt: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        setup_logging(level, fmt)


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize(
    ("key", "shown"), [(0, "0x0"), (2**64 - 1, "0xffffffffffffffff"), ("0x5", "0x5")]
)
def test_key_as_the_core_formats_it(fmt: str, key: int | str, shown: str) -> None:
    """Logs show a context id as everything else does (sttun.core.keys.format_key)."""
    if isinstance(key, int):
        assert format_key(key) == shown
    out = io.StringIO()
    setup_logging("info", fmt, stream=out)
    logging.getLogger("sttun.endpoint").info("up", extra={"tunnel": "t", "key": key})
    line = out.getvalue().strip()
    if fmt == "json":
        assert json.loads(line)["key"] == shown
    else:
        assert line.endswith(f" [t key={shown}] up")
