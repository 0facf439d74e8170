"""How sttun writes a tunnel's keys (STT context ids) for people: one format.

Logs, error messages, ``sttun up --check``, ``sttun show`` and the metrics'
``key`` label all use :func:`format_key`, so a key looks the same wherever it is
read: hexadecimal, as Open vSwitch and Wireshark show STT context ids.
"""

from __future__ import annotations

__all__ = ["format_key"]


def format_key(in_key: int, out_key: int | None = None) -> str:
    """``0x1234``; ``0x1/0x2`` (received/sent) when ``out_key`` is given and differs."""
    if out_key is None or out_key == in_key:
        return f"{in_key:#x}"
    return f"{in_key:#x}/{out_key:#x}"
