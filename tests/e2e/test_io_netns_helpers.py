"""tests/netns.py itself: names, clean-up even on failure, leftovers."""

from __future__ import annotations

import os

import pytest

from tests.netns import (
    Netns,
    ifname,
    leftover_namespaces,
    list_namespaces,
    make_two_hosts,
    need_root,
    unique_suffix,
)

pytestmark = pytest.mark.netns


def test_unique_names() -> None:
    names = {unique_suffix() for _ in range(2000)}
    assert len(names) == 2000
    assert all(len(n) <= 9 for n in names)
    assert len(ifname("vrole")) <= 15
    with pytest.raises(ValueError, match="15"):
        ifname("x" * 7, "y" * 9)


def test_cleanup_on_failure() -> None:
    need_root()
    name = ""
    with pytest.raises(RuntimeError, match="boom"), Netns("t") as ns:
        name = ns.name
        assert name in list_namespaces()
        proc = ns.popen(["sleep", "60"])
        raise RuntimeError("boom")
    assert proc.poll() is not None  # killed
    assert name not in list_namespaces()
    assert name not in leftover_namespaces()


def test_entered_switches_and_restores() -> None:
    need_root()
    before = os.readlink("/proc/thread-self/ns/net")
    with make_two_hosts() as h:
        with h.a.entered():
            inside = os.readlink("/proc/thread-self/ns/net")
            assert inside != before
            assert os.path.exists("/proc/thread-self/ns/net")
        assert os.readlink("/proc/thread-self/ns/net") == before
        out = h.a.run(["ping", "-c", "1", "-W", "2", h.ip_b]).stdout
        assert "1 received" in out
        out = h.b.run(["ping", "-6", "-c", "1", "-W", "2", h.ip6_a]).stdout
        assert "1 received" in out
        names = [h.a.name, h.b.name]
    assert not set(names) & set(list_namespaces())
    assert leftover_namespaces() == []
