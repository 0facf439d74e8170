"""The control socket: ``sttun show`` and friends talk to a running daemon here.

Protocol: a Unix stream socket (mode 0600); the client writes one JSON object per
line, ``{"cmd": "show"}``, and reads one JSON line back per request::

    {"ok": true, "result": {...}}            on success
    {"ok": false, "error": "what went wrong"} otherwise

``ping`` is built in and answers ``{"pid", "instance", "version"}``; the daemon
supplies the other commands as callbacks (``{"show": lambda req: show_data}``).

:class:`ControlServer` never blocks and needs no thread: it keeps its listening
socket and its clients in its own epoll set, whose descriptor (:meth:`fileno`)
the daemon adds to its loop; when that descriptor is readable, the daemon calls
:meth:`ControlServer.handle_readable`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import selectors
import socket
import stat
import time
from collections.abc import Callable, Mapping
from typing import Any

from sttun.errors import SetupError, SttError

log = logging.getLogger("sttun.control")

Handler = Callable[[dict[str, Any]], object]
"""A command callback: gets the request object, returns the JSON-able result."""

MAX_REQUEST = 64 * 1024  # longest request line accepted
MAX_REPLY = 64 * 1024 * 1024  # longest reply a client reads
MAX_CLIENTS = 16  # more connections than this: the oldest one is closed
DEFAULT_TIMEOUT = 5.0  # client: seconds to wait for the whole reply
STALE_CHECK_TIMEOUT = 1.0  # server: how long an existing socket gets to answer a ping


class ControlError(SttError):
    """Talking to the daemon failed, or the daemon refused the request."""


class NotRunningError(ControlError):
    """Nothing listens on the control socket."""


# --------------------------------------------------------------------------------
# client


def query(
    socket_path: str, cmd: str, timeout: float = DEFAULT_TIMEOUT, **args: Any
) -> dict[str, Any]:
    """Send ``{"cmd": cmd, **args}`` to the daemon on ``socket_path``, return its result.

    Raises :class:`NotRunningError` if no daemon listens there, and
    :class:`ControlError` on a timeout, a malformed reply or an error reply.
    """
    deadline = time.monotonic() + timeout
    request = json.dumps({"cmd": cmd, **args}).encode() + b"\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.settimeout(timeout)
            sock.connect(socket_path)
            sock.sendall(request)
            chunks: list[bytes] = []
            size = 0
            while True:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(65536)
                if not chunk:
                    raise ControlError(
                        f"the sttun daemon on {socket_path} closed the connection without answering"
                    )
                chunks.append(chunk)
                size += len(chunk)
                if b"\n" in chunk:
                    break
                if size > MAX_REPLY:
                    raise ControlError(
                        f"bad reply from {socket_path}: longer than {MAX_REPLY} bytes"
                    )
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunningError(
                f"no sttun daemon is listening on {socket_path}: is `sttun up` running?"
            ) from None
        except PermissionError:
            raise ControlError(
                f"permission denied on {socket_path}: the control socket is for root only"
            ) from None
        except TimeoutError:
            raise ControlError(
                f"the sttun daemon on {socket_path} did not answer within {timeout:g} s"
            ) from None
        except (ConnectionResetError, BrokenPipeError):
            raise ControlError(
                f"the sttun daemon on {socket_path} closed the connection without answering"
            ) from None
        except OSError as e:
            raise ControlError(f"cannot talk to {socket_path}: {e.strerror or e}") from None
    finally:
        sock.close()
    line = b"".join(chunks).split(b"\n", 1)[0]
    try:
        reply = json.loads(line)
    except ValueError as e:
        raise ControlError(f"bad reply from {socket_path}: not JSON ({e})") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ControlError(f"bad reply from {socket_path}: not an sttun control reply")
    if not reply["ok"]:
        raise ControlError(
            f"the sttun daemon refused {cmd!r}: {reply.get('error', 'no reason given')}"
        )
    result = reply.get("result")
    if not isinstance(result, dict):
        raise ControlError(f"bad reply from {socket_path}: result is not an object")
    return result


# --------------------------------------------------------------------------------
# server


class _Client:
    __slots__ = ("closing", "inbuf", "outbuf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closing = False  # close once outbuf is flushed


class ControlServer:
    """A non-blocking control socket server driven by the daemon's own loop.

    Binds ``path`` (mode 0600), replacing a stale socket left by a crashed daemon
    but refusing (:class:`SetupError`) if a live daemon answers on it.  ``handlers``
    maps command names to callbacks; ``ping`` is answered unless overridden.
    """

    def __init__(
        self,
        path: str,
        handlers: Mapping[str, Handler],
        *,
        instance: str = "sttun",
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        from sttun import __version__

        self.path = path
        self._ping = {"pid": os.getpid(), "instance": instance, "version": __version__}
        self._handlers: dict[str, Handler] = {"ping": lambda _req: self._ping, **handlers}
        self._max_clients = max_clients
        self._clients: dict[int, _Client] = {}  # by fd, oldest first
        self._sel = selectors.EpollSelector()
        self._listener = self._bind(path)
        self._ino = os.stat(path).st_ino
        self._sel.register(self._listener, selectors.EVENT_READ)

    # --- set-up and tear-down ---

    @staticmethod
    def check_existing(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise SetupError(f"{path} exists and is not a socket: remove it or use another path")
        try:
            reply = query(path, "ping", timeout=STALE_CHECK_TIMEOUT)
        except NotRunningError:
            log.info("replacing stale control socket %s", path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        except ControlError:
            raise SetupError(
                f"something is listening on {path} but does not answer like sttun: "
                "refusing to replace it"
            ) from None
        raise SetupError(f"another sttun is running on {path} (pid {reply.get('pid', '?')})")

    def _bind(self, path: str) -> socket.socket:
        parent = os.path.dirname(path)
        if parent:
            try:
                os.makedirs(parent, mode=0o755, exist_ok=True)
            except OSError as e:
                raise SetupError(f"cannot create {parent}: {e.strerror or e}") from None
        self.check_existing(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the file is born 0600: no window with wider access
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(16)
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                raise SetupError(f"{path} is in use by another process") from None
            raise SetupError(f"cannot listen on {path}: {e.strerror or e}") from None
        finally:
            os.umask(old_umask)
        sock.setblocking(False)
        return sock

    def fileno(self) -> int:
        """The descriptor to watch for reading (an epoll set of the listener and clients)."""
        return self._sel.fileno()

    def close(self) -> None:
        """Close every connection and remove the socket file (if it is still ours)."""
        for fd in list(self._clients):
            self._drop(fd)
        if self._listener.fileno() >= 0:
            self._sel.unregister(self._listener)
            self._listener.close()
            try:
                if os.stat(self.path).st_ino == self._ino:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        self._sel.close()

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client_count(self) -> int:
        """Connections open now."""
        return len(self._clients)

    # --- the loop's entry point ---

    def handle_readable(self) -> None:
        """Accept, read, answer and write whatever is ready now; never blocks."""
        for key, mask in self._sel.select(timeout=0):
            if key.fileobj is self._listener:
                self._accept()
                continue
            fd = key.fd
            client = self._clients.get(fd)
            if client is None:
                continue
            if mask & selectors.EVENT_READ:
                self._read(client)
            if fd in self._clients and (mask & selectors.EVENT_WRITE or client.outbuf):
                self._flush(client)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: try again on the next event
                log.warning("control socket: cannot accept: %s", e)
                return
            sock.setblocking(False)
            if len(self._clients) >= self._max_clients:
                oldest = next(iter(self._clients))
                log.warning("control socket: too many connections, closing the oldest")
                self._drop(oldest)
            client = _Client(sock)
            self._clients[sock.fileno()] = client
            self._sel.register(sock, selectors.EVENT_READ)

    def _read(self, client: _Client) -> None:
        while True:
            try:
                data = client.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(client.sock.fileno())
                return
            if not data:  # the client finished sending: answer what came, then close
                client.closing = True
                break
            client.inbuf += data
            if len(client.inbuf) > MAX_REQUEST and b"\n" not in client.inbuf:
                client.inbuf.clear()
                client.outbuf += _reply_error(f"request longer than {MAX_REQUEST} bytes")
                client.closing = True
                break
        while not client.closing or client.inbuf:
            nl = client.inbuf.find(b"\n")
            if nl < 0:
                if client.closing and client.inbuf.strip():
                    line = bytes(client.inbuf)  # a last request without its newline
                    client.inbuf.clear()
                    client.outbuf += self._answer(line)
                break
            line = bytes(client.inbuf[:nl])
            del client.inbuf[: nl + 1]
            if line.strip():
                client.outbuf += self._answer(line)
        if client.closing and not client.outbuf:
            self._drop(client.sock.fileno())

    def _flush(self, client: _Client) -> None:
        fd = client.sock.fileno()
        while client.outbuf:
            try:
                n = client.sock.send(client.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(fd)
                return
            del client.outbuf[:n]
        if client.outbuf:
            self._sel.modify(client.sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        elif client.closing:
            self._drop(fd)
        else:
            self._sel.modify(client.sock, selectors.EVENT_READ)

    def _drop(self, fd: int) -> None:
        client = self._clients.pop(fd, None)
        if client is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(client.sock)
        client.sock.close()

    # --- requests ---

    def _answer(self, line: bytes) -> bytes:
        try:
            request = json.loads(line)
        except ValueError as e:
            return _reply_error(f"bad request: not JSON ({e})")
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return _reply_error('bad request: expected an object like {"cmd": "show"}')
        cmd = request["cmd"]
        handler = self._handlers.get(cmd)
        if handler is None:
            known = ", ".join(sorted(self._handlers))
            return _reply_error(f"unknown command {cmd!r} (known: {known})")
        try:
            result = handler(request)
            return _encode({"ok": True, "result": result})
        except SttError as e:
            return _reply_error(str(e))
        except Exception as e:
            log.exception("control command %r failed", cmd)
            return _reply_error(f"internal error in {cmd!r}: {type(e).__name__}: {e}")


def _encode(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _reply_error(message: str) -> bytes:
    return _encode({"ok": False, "error": message})
