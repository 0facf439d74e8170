"""sttun: userspace STT (Stateless Transport Tunneling, draft-davie-stt-08)."""

__version__ = "0.1.0"
