"""Run the shell examples of ``docs/*.md``, so the documentation stays true.

Convention for code blocks in the docs (stated at the top of each page too):

* A fenced block whose info string starts with ``sh`` is **runnable**: this test
  runs it.  Everything else (```` ```text ````, ```` ```toml ````, ```` ```console ````,
  ```` ```ini ````, ...) is illustrative and never run.  Use ``text`` for commands
  that cannot run here (systemd, package installation).
* After ``sh`` come optional ``key=value`` attributes (GitHub ignores them):

  ``host=a`` / ``host=b``
      which of the two hosts runs the block (default ``a``).
  ``scenario=NAME``
      blocks with the same scenario in the same file run in order in one shared
      world, so a daemon started in one block serves the next ones.  A block
      without a scenario gets a world of its own.

* The world: two network namespaces, host ``a`` and host ``b``, joined by a veth
  pair named ``eth0`` on both sides, with the underlay addresses of
  the documentation ranges (docs/architecture.md): ``198.18.0.1/24`` and ``2001:db8:0:1::1/64``
  on a, ``198.18.0.2/24`` and ``2001:db8:0:1::2/64`` on b; ``lo`` is up.  Each host
  also has a private mount namespace in which ``/etc`` and ``/run`` are overlays
  (writes stay in the test's temporary directory), so ``/etc/sttun/sttun.toml``
  and the default control socket ``/run/sttun/sttun.sock`` work as written without
  touching this machine or colliding between the hosts.  Blocks run with
  ``bash -euo pipefail`` in a per-host working directory that contains a
  ``contrib`` link to the repository's ``contrib/``; ``PATH`` starts with the
  directory of this Python (so ``sttun`` and ``python`` are the project's).
* A block passes when it exits with status 0.  Examples therefore check what they
  show (``ping -c`` fails without replies, ``grep`` fails without a match).
* Processes a block leaves running (``sttun up ... &``) are stopped with SIGTERM at
  the end of the scenario, then the namespaces are deleted.
* A block that fails only because a subcommand is not in this installation yet
  (``sttun X`` prints "is not available in this installation") is skipped, not
  failed, with that reason.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sttun.tools import topology
from tests.netns import make_two_hosts, need_root, need_tools

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
BLOCK_TIMEOUT = 90.0
"""Generous bound for one block (a daemon start takes about a second)."""
NOT_AVAILABLE = "is not available in this installation"

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,})(?P<info>[^`\n]*)$")


@dataclass
class Block:
    """One runnable code block of a markdown file."""

    path: Path
    line: int  # 1-based line of the opening fence
    host: str
    scenario: str | None
    code: str

    @property
    def where(self) -> str:
        """``docs/file.md:LINE``."""
        return f"{self.path.relative_to(REPO)}:{self.line}"


def parse_blocks(path: Path) -> list[Block]:
    """The runnable (```` ```sh ````) blocks of ``path``, in order.

    Raises ValueError for an unknown attribute or host, or an unclosed fence, so a
    typo in the docs cannot silently turn an example into an unchecked one.
    """
    lines = path.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence = m.group("fence")
        words = m.group("info").split()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        if i >= len(lines):
            raise ValueError(f"{path}:{start + 1}: code block never closed")
        i += 1
        if not words or words[0] != "sh":
            continue
        attrs: dict[str, str] = {}
        for w in words[1:]:
            key, sep, value = w.partition("=")
            if not sep or key not in ("host", "scenario") or not value:
                raise ValueError(f"{path}:{start + 1}: unknown block attribute {w!r}")
            attrs[key] = value
        host = attrs.get("host", "a")
        if host not in ("a", "b"):
            raise ValueError(f"{path}:{start + 1}: host must be a or b, got {host!r}")
        out.append(Block(path, start + 1, host, attrs.get("scenario"), "\n".join(body) + "\n"))
    return out


def scenarios() -> list[tuple[str, list[Block]]]:
    """Every scenario of every docs page: (test id, its blocks in order)."""
    out: list[tuple[str, list[Block]]] = []
    for path in sorted(DOCS.glob("*.md")):
        named: dict[str, list[Block]] = {}
        for b in parse_blocks(path):
            if b.scenario is None:
                out.append((f"{path.stem}:{b.line}", [b]))
            elif b.scenario in named:
                named[b.scenario].append(b)
            else:
                named[b.scenario] = [b]
                out.append((f"{path.stem}:{b.scenario}", named[b.scenario]))
    return out


# --------------------------------------------------------------------------------
# the world the examples run in


@dataclass
class Host:
    """One example host: a network namespace plus a mount namespace held open."""

    ns: topology.Host
    base: Path
    holder: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def workdir(self) -> Path:
        """Where the examples of this host run."""
        return self.base / "work"

    def start(self) -> None:
        """Set up the overlays and start the process that keeps the mount namespace."""
        for d in ("etc.up", "etc.work", "run.up", "run.work", "work"):
            (self.base / d).mkdir(parents=True)
        (self.workdir / "contrib").symlink_to(REPO / "contrib")
        mounts = (
            f"mount -t overlay overlay -o lowerdir=/etc,upperdir={self.base}/etc.up,"
            f"workdir={self.base}/etc.work /etc && "
            f"mount -t overlay overlay -o lowerdir=/run,upperdir={self.base}/run.up,"
            f"workdir={self.base}/run.work /run && "
            "echo ready && exec sleep infinity"
        )
        self.holder = subprocess.Popen(
            [
                "ip", "netns", "exec", self.ns.name,
                "unshare", "--mount", "--propagation", "private", "sh", "-c", mounts,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        assert self.holder.stdout is not None
        first = self.holder.stdout.readline().decode().strip()
        if first != "ready":
            rest = self.holder.stdout.read().decode() if self.holder.poll() is not None else ""
            raise RuntimeError(f"cannot set up the mount namespace: {first} {rest}")
        bindir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
            "HOME": str(self.workdir),
            "TERM": "dumb",
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("VIRTUAL_ENV", None)

    def run(self, block: Block, log: Path) -> tuple[int, str]:
        """Run ``block`` here; returns (exit status, everything it printed)."""
        assert self.holder is not None
        script = self.base / f"block-{block.line}.sh"
        script.write_text(f"cd {self.workdir}\n{block.code}")
        argv = [
            "nsenter", "-t", str(self.holder.pid), "-m", "-n", "--",
            "bash", "-euo", "pipefail", str(script),
        ]  # fmt: skip
        # Output goes to a file, not a pipe: a daemon started with `&` keeps its
        # stdout open, and a pipe would never reach end of file.
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=BLOCK_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = -1
        return rc, log.read_text(errors="replace")

    def stop(self) -> None:
        """Stop everything running in the namespace: SIGTERM, then SIGKILL."""
        holder = self.holder.pid if self.holder is not None else None
        pids = [p for p in _ns_pids(self.ns.name) if p != holder]
        _signal_all(pids, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            time.sleep(0.1)
        _signal_all(pids, signal.SIGKILL)
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait()
            if self.holder.stdout is not None:
                self.holder.stdout.close()
            self.holder = None


def _ns_pids(name: str) -> list[int]:
    res = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in res.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours still "exists"; reap it if it is one
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    return True


def _signal_all(pids: list[int], sig: int) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)


@contextlib.contextmanager
def world(tmp: Path) -> Iterator[dict[str, Host]]:
    """Hosts a and b as described in the module docstring; all removed afterwards.

    The network is the project's own two-host test bed (``make_two_hosts``: a veth
    ``eth0`` on both sides with both underlay families, up and ready).
    """
    with make_two_hosts() as h:
        hosts = {"a": Host(h.a, tmp / "a"), "b": Host(h.b, tmp / "b")}
        try:
            for host in hosts.values():
                host.start()
            yield hosts
        finally:
            for host in hosts.values():
                host.stop()


# --------------------------------------------------------------------------------
# the tests


def test_docs_have_runnable_examples() -> None:
    """The convention is in use: the docs have runnable blocks, and they parse."""
    pages = {p.name: parse_blocks(p) for p in DOCS.glob("*.md")}
    assert pages, "no docs/*.md"
    assert sum(len(b) for b in pages.values()) >= 10
    for name in ("operations.md", "protocol.md", "configuration.md"):
        assert pages.get(name), f"docs/{name} has no runnable (```sh) example"


def test_parse_blocks_convention(tmp_path: Path) -> None:
    """Only ```sh blocks run; attributes are read; mistakes are refused."""
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```text\nnot run\n```\n```sh\necho one\n```\n"
        "```sh scenario=s host=b\necho two\n```\n````sh\n```\n````\n"
    )
    blocks = parse_blocks(page)
    assert [(b.host, b.scenario, b.code) for b in blocks] == [
        ("a", None, "echo one\n"),
        ("b", "s", "echo two\n"),
        ("a", None, "```\n"),
    ]
    page.write_text("```sh hots=b\necho\n```\n")
    with pytest.raises(ValueError, match="unknown block attribute"):
        parse_blocks(page)
    page.write_text("```sh host=c\necho\n```\n")
    with pytest.raises(ValueError, match="host must be"):
        parse_blocks(page)
    page.write_text("```sh\necho\n")
    with pytest.raises(ValueError, match="never closed"):
        parse_blocks(page)


_SCENARIOS = scenarios() if DOCS.is_dir() else []


@pytest.mark.parametrize(
    "blocks", [pytest.param(b, id=i) for i, b in _SCENARIOS] or [pytest.param([], id="none")]
)
def test_example(blocks: list[Block], tmp_path: Path) -> None:
    """Every block of one scenario exits 0, run in order in a fresh two-host world."""
    if not blocks:
        pytest.skip("no runnable examples")
    need_root()
    need_tools("ip", "nsenter", "unshare", "bash")
    with world(tmp_path) as hosts:
        for n, block in enumerate(blocks):
            rc, output = hosts[block.host].run(block, tmp_path / f"out-{n}.log")
            if rc != 0 and NOT_AVAILABLE in output:
                line = next(x for x in output.splitlines() if NOT_AVAILABLE in x)
                pytest.skip(f"{block.where}: {line.strip()}")
            assert rc == 0, (
                f"{block.where} (host {block.host}) exited with {rc}\n"
                f"--- script ---\n{block.code}--- output ---\n{output}"
            )
