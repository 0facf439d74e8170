"""Typed errors raised by sttun's codecs and configuration.

Codecs in :mod:`sttun.wire` raise :class:`DecodeError` subclasses with a message that
names the field, what was expected and what was found.  The protocol core converts
them into counted drops (:class:`sttun.core.drops.DropReason`); nothing raises out of
the receive path.
"""

from __future__ import annotations


class SttError(Exception):
    """Base class of every error sttun raises on purpose."""


class DecodeError(SttError, ValueError):
    """A buffer could not be decoded.

    ``field`` is the name of the offending field, ``expected`` and ``got`` describe
    the mismatch; ``str(err)`` reads ``"<field>: expected <expected>, got <got>"``.
    """

    def __init__(self, field: str, expected: object, got: object) -> None:
        self.field = field
        self.expected = expected
        self.got = got
        super().__init__(f"{field}: expected {expected}, got {got}")


class TruncatedError(DecodeError):
    """The buffer is shorter than the structure being decoded."""

    def __init__(self, field: str, need: int, have: int) -> None:
        super().__init__(field, f">= {need} bytes", f"{have} bytes")
        self.need = need
        self.have = have


class EncodeError(SttError, ValueError):
    """A value cannot be encoded (out of range, too long, ...)."""


class ConfigError(SttError):
    """The configuration is invalid; the message names the key and the bad value."""


class CaptureError(SttError):
    """A capture file cannot be read; the message names the file and byte offset."""


class SetupError(SttError):
    """The host cannot be set up as asked (not root, no such interface, ...)."""
