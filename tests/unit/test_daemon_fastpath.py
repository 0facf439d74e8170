"""sttun.daemon.fastpath without the kernel: the "off" setting and the counter sums.

(Attaching, syncing and detaching run against the kernel in
tests/e2e/test_endpoint_fastpath.py.)"""

from __future__ import annotations

import logging

import pytest

from sttun.daemon.fastpath import OFF_BY_SETTING, FastPaths


def test_off_never_attaches_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    fps = FastPaths("off", logging.getLogger("test"))
    with caplog.at_level(logging.INFO):
        fps.check()
        assert fps.attach("eth0") is False
    assert not fps.is_attached("eth0") and fps.unsupported == OFF_BY_SETTING
    status = fps.status("eth0", {})
    assert status["state"] == "off" and status["reason"] == OFF_BY_SETTING
    assert status["attach"] is None and status["passed"] == {}
    assert caplog.records == []  # "off" is a choice, not a problem: nothing logged
    fps.set_tunnels([])  # nothing attached: nothing to do
    fps.close()


def test_a_bad_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, on or off"):
        FastPaths("yes", logging.getLogger("test"))


def test_tunnel_totals_add_up_every_underlay() -> None:
    counters = {
        "eth0": {"tunnels": {"a": {"frames": 2, "bytes": 200}, "b": {"frames": 1, "bytes": 9}}},
        "eth1": {"tunnels": {"a": {"frames": 3, "bytes": 300}}},
        "eth2": {},
    }
    assert FastPaths.tunnel_totals(counters) == {
        "a": {"frames": 5, "bytes": 500},
        "b": {"frames": 1, "bytes": 9},
    }
