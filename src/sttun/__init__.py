"""sttun: userspace STT (Stateless Transport Tunneling, draft-davie-stt-08).

The public Python API (imported lazily, so ``import sttun`` stays cheap):

* :class:`SttHeader` — the 18-byte STT frame header codec;
* :func:`encapsulate` — inner Ethernet frame → outer STT segments;
* :func:`decapsulate` — complete STT frame → inner frame + offload state;
* :class:`Reassembler` — sans-I/O segment reassembly with bounded memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Reassembler", "SttHeader", "__version__", "decapsulate", "encapsulate"]

_LAZY = {
    "SttHeader": "sttun.wire.stt",
    "Reassembler": "sttun.core.reassembly",
    "encapsulate": "sttun.core.api",
    "decapsulate": "sttun.core.decap",
}

if TYPE_CHECKING:
    from sttun.core.api import encapsulate
    from sttun.core.decap import decapsulate
    from sttun.core.reassembly import Reassembler
    from sttun.wire.stt import SttHeader


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sttun' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
