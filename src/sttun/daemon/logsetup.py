"""Logging set-up: one line per event, as text or as JSON.

Text::

    2026-01-02T10:11:12.345+00:00 INFO sttun.endpoint [stt0 key=0x1234] tunnel up

JSON (one object per line; extra fields given with ``extra=`` are included)::

    {"ts": "2026-01-02T10:11:12.345+00:00", "level": "info", "logger": "sttun.endpoint",
     "msg": "tunnel up", "tunnel": "stt0", "key": "0x1234"}

Tunnel events carry the tunnel name and context id: log them through
:func:`tunnel_logger` (or pass ``extra={"tunnel": name, "key": key}``).
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

from sttun.core.keys import format_key

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
_NOISY_LIBRARIES = ("pyroute2",)  # kept at WARNING unless the level is debug


def _key_text(key: object) -> str:
    """A context id as :func:`~sttun.core.keys.format_key` writes it; other values as text."""
    if isinstance(key, int) and not isinstance(key, bool):
        return format_key(key)
    return str(key)


def _timestamp(record: logging.LogRecord) -> str:
    t = datetime.datetime.fromtimestamp(record.created).astimezone()
    return t.isoformat(timespec="milliseconds")


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger> [<tunnel> key=<key>] <message>``, newlines escaped."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, record.name]
        tunnel = getattr(record, "tunnel", None)
        key = getattr(record, "key", None)
        if tunnel is not None or key is not None:
            ctx = [str(tunnel)] if tunnel is not None else []
            if key is not None:
                ctx.append(f"key={_key_text(key)}")
            parts.append(f"[{' '.join(ctx)}]")
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        parts.append(_one_line(text))
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, tunnel/key and any extras."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name in _STANDARD_ATTRS or name.startswith("_"):
                continue
            out[name] = _key_text(value) if name == "key" else value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class _SttunHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler :func:`setup_logging` installed, so a second call replaces it."""


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every log record at ``level`` or above to ``stream`` (stderr) as ``fmt``.

    ``level`` is one of :data:`LEVELS` (any case), ``fmt`` ``"text"`` or ``"json"``.
    Calling it again (e.g. after a configuration reload) replaces the previous set-up.
    """
    try:
        numeric = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"log level: expected one of {', '.join(LEVELS)}, got {level!r}") from None
    formatters = {"text": TextFormatter, "json": JsonFormatter}
    if fmt not in formatters:
        raise ValueError(f'log format: expected "text" or "json", got {fmt!r}')
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _SttunHandler):
            root.removeHandler(h)
            h.close()
    handler = _SttunHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatters[fmt]())
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in _NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(numeric if numeric <= logging.DEBUG else logging.WARNING)


class TunnelLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger whose records all carry ``tunnel`` and ``key`` (merged with call extras)."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra: Mapping[str, Any] = self.extra or {}
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return msg, kwargs


def tunnel_logger(logger: logging.Logger | str, tunnel: str, key: int) -> TunnelLogger:
    """A :class:`TunnelLogger` for the tunnel ``tunnel`` with context id ``key``."""
    if isinstance(logger, str):
        logger = logging.getLogger(logger)
    return TunnelLogger(logger, {"tunnel": tunnel, "key": key})
