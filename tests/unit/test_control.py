"""Control socket: round trips over a real Unix socket, stale sockets, bad requests."""

from __future__ import annotations

import json
import os
import select
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sttun.daemon.control import (
    MAX_REQUEST,
    ControlError,
    ControlServer,
    NotRunningError,
    query,
)
from sttun.errors import SetupError, SttError

SAMPLE = {"pid": 1, "instance": "sttun", "started": 0.0, "tunnels": [], "drops": {}}


class Loop:
    """Drives a ControlServer from a select() loop in a thread, like the daemon would."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self.server], [], [], 0.02)
            if r:
                self.server.handle_readable()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "run" / "t.sock")


@pytest.fixture
def served(sock_path: str) -> Iterator[tuple[ControlServer, str]]:
    def boom(_req: dict[str, Any]) -> object:
        raise ValueError("kaput")

    def refuse(_req: dict[str, Any]) -> object:
        raise SttError("not now")

    handlers = {
        "show": lambda req: SAMPLE,
        "echo": lambda req: {"got": req},
        "boom": boom,
        "refuse": refuse,
        "big": lambda req: {"blob": "x" * 5_000_000},
        "list": lambda req: [1, 2],
    }
    server = ControlServer(sock_path, handlers, instance="inst1")
    loop = Loop(server)
    try:
        yield server, sock_path
    finally:
        loop.stop()
        server.close()


def _raw(path: str, payload: bytes, shutdown: bool = False) -> list[dict[str, Any]]:
    """Send raw bytes and read reply lines until the server closes or 1 line per request."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(payload)
        if shutdown:
            s.shutdown(socket.SHUT_WR)
        want = payload.count(b"\n") + (1 if shutdown and not payload.endswith(b"\n") else 0)
        data = b""
        while data.count(b"\n") < want:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return [json.loads(line) for line in data.splitlines() if line]


def test_round_trip(served: tuple[ControlServer, str]) -> None:
    _, path = served
    assert query(path, "show") == SAMPLE
    assert query(path, "echo", extra=5) == {"got": {"cmd": "echo", "extra": 5}}
    ping = query(path, "ping")
    assert ping["pid"] == os.getpid() and ping["instance"] == "inst1"


def test_socket_mode_is_0600(served: tuple[ControlServer, str]) -> None:
    _, path = served
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_error_replies(served: tuple[ControlServer, str]) -> None:
    _, path = served
    with pytest.raises(ControlError) as exc:
        query(path, "nope")
    assert str(exc.value) == (
        "the sttun daemon refused 'nope': unknown command 'nope' "
        "(known: big, boom, echo, list, ping, refuse, show)"
    )
    with pytest.raises(ControlError, match=r"refused 'refuse': not now$"):
        query(path, "refuse")
    with pytest.raises(ControlError, match=r"internal error in 'boom': ValueError: kaput"):
        query(path, "boom")
    with pytest.raises(ControlError, match="result is not an object"):
        query(path, "list")
    assert query(path, "show") == SAMPLE  # still serving


def test_several_requests_on_one_connection(served: tuple[ControlServer, str]) -> None:
    _, path = served
    replies = _raw(path, b'{"cmd":"ping"}\n\n{"cmd":"show"}\nnot json\n[1]\n{"cmd": 3}\n', True)
    assert [r["ok"] for r in replies] == [True, True, False, False, False]
    assert replies[1]["result"] == SAMPLE
    assert replies[2]["error"].startswith("bad request: not JSON")
    assert replies[3]["error"] == 'bad request: expected an object like {"cmd": "show"}'


def test_last_request_without_newline(served: tuple[ControlServer, str]) -> None:
    _, path = served
    replies = _raw(path, b'{"cmd":"show"}', shutdown=True)
    assert replies == [{"ok": True, "result": SAMPLE}]


def test_oversized_request(served: tuple[ControlServer, str]) -> None:
    _, path = served
    replies = _raw(path, b"x" * (MAX_REQUEST + 10), shutdown=True)
    assert replies == [{"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}]


def test_large_reply(served: tuple[ControlServer, str]) -> None:
    _, path = served
    assert len(query(path, "big", timeout=30)["blob"]) == 5_000_000


def test_driven_without_threads(sock_path: str) -> None:
    server = ControlServer(sock_path, {"show": lambda req: SAMPLE})
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(sock_path)
            c.sendall(b'{"cmd":"show"}\n')
            c.settimeout(0.01)
            data = b""
            for _ in range(1000):
                select.select([server], [], [], 1.0)
                server.handle_readable()
                try:
                    data += c.recv(65536)
                except TimeoutError:
                    continue
                if data.endswith(b"\n"):
                    break
            assert json.loads(data) == {"ok": True, "result": SAMPLE}
            assert server.client_count == 1
        # the client hung up: the server notices and forgets it
        for _ in range(1000):
            if server.client_count == 0:
                break
            select.select([server], [], [], 1.0)
            server.handle_readable()
        assert server.client_count == 0
    finally:
        server.close()


def test_too_many_clients_closes_oldest(sock_path: str) -> None:
    server = ControlServer(sock_path, {}, max_clients=2)
    try:
        clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
        for c in clients:
            c.connect(sock_path)
        while server.client_count < 2 or select.select([server], [], [], 0)[0]:
            select.select([server], [], [], 1.0)
            server.handle_readable()
        assert server.client_count == 2
        clients[0].settimeout(5)
        assert clients[0].recv(10) == b""  # closed by the server
        for c in clients:
            c.close()
    finally:
        server.close()


def test_query_no_daemon(tmp_path: Path) -> None:
    path = str(tmp_path / "none.sock")
    with pytest.raises(NotRunningError) as exc:
        query(path, "show")
    assert str(exc.value) == f"no sttun daemon is listening on {path}: is `sttun up` running?"


def _stale_socket(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, nobody listens: what a crashed daemon leaves


def test_stale_socket_is_replaced(sock_path: str) -> None:
    _stale_socket(sock_path)
    with pytest.raises(NotRunningError):
        query(sock_path, "ping")
    server = ControlServer(sock_path, {"show": lambda req: SAMPLE})
    loop = Loop(server)
    try:
        assert query(sock_path, "show") == SAMPLE
    finally:
        loop.stop()
        server.close()
    assert not os.path.exists(sock_path)


def test_live_daemon_is_not_replaced(served: tuple[ControlServer, str]) -> None:
    _, path = served
    with pytest.raises(SetupError) as exc:
        ControlServer(path, {})
    assert str(exc.value) == f"another sttun is running on {path} (pid {os.getpid()})"
    assert query(path, "show") == SAMPLE  # the first one is untouched


def test_silent_listener_is_not_replaced(sock_path: str) -> None:
    os.makedirs(os.path.dirname(sock_path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(sock_path)
        other.listen(1)
        with pytest.raises(SetupError) as exc:
            ControlServer(sock_path, {})
    assert str(exc.value) == (
        f"something is listening on {sock_path} but does not answer like sttun: "
        "refusing to replace it"
    )


def test_regular_file_is_not_replaced(sock_path: str) -> None:
    os.makedirs(os.path.dirname(sock_path))
    Path(sock_path).write_text("precious")
    with pytest.raises(SetupError) as exc:
        ControlServer(sock_path, {})
    assert (
        str(exc.value) == f"{sock_path} exists and is not a socket: remove it or use another path"
    )
    assert Path(sock_path).read_text() == "precious"


def test_close_leaves_a_successors_socket(sock_path: str) -> None:
    server = ControlServer(sock_path, {})
    os.unlink(sock_path)
    _stale_socket(sock_path)  # someone else's socket now
    server.close()
    assert os.path.exists(sock_path)


def test_context_manager_removes_socket(sock_path: str) -> None:
    with ControlServer(sock_path, {}) as server:
        assert server.fileno() >= 0
        assert os.path.exists(sock_path)
    assert not os.path.exists(sock_path)
