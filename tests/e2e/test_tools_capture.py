"""sttun.tools.capture: tcpdump started and stopped on its own events, never slept on."""

from __future__ import annotations

from pathlib import Path

import pytest

from sttun.errors import SetupError
from sttun.tools.capture import Capture
from sttun.tools.topology import TwoHosts, link_state
from tests.netns import need_tools

pytestmark = pytest.mark.netns


@pytest.mark.parametrize("immediate", [False, True], ids=["v3-ring", "immediate"])
def test_every_packet_in_the_file_at_stop(
    two_hosts: TwoHosts, tmp_path: Path, immediate: bool
) -> None:
    """Stopped right after the last reply, the file holds every packet: a sync waits
    for tcpdump's own counters (the packed ring hands packets over up to a second
    late, which a stop without sync would lose)."""
    need_tools("tcpdump", "ping")
    h = two_hosts
    pcap = tmp_path / "c.pcap"
    with Capture(h.b, h.dev_b, pcap, "icmp", immediate=immediate) as cap:
        h.a.run(["ping", "-c", "5", "-i", "0.01", "-W", "2", h.ip_b])
        assert cap.stats().received == 10  # the filter passed all requests and replies
    assert cap.final is not None
    assert (cap.final.captured, cap.final.received, cap.final.dropped) == (10, 10, 0)
    assert cap.count() == 10
    assert cap.count("icmp[icmptype] == icmp-echoreply") == 5


def test_wait_for_packets_while_running(two_hosts: TwoHosts, tmp_path: Path) -> None:
    need_tools("tcpdump", "ping")
    h = two_hosts
    with Capture(h.a, h.dev_a, tmp_path / "w.pcap", "icmp6") as cap:
        h.a.run(["ping", "-6", "-c", "3", "-i", "0.01", "-W", "2", h.ip6_b])
        assert cap.wait_for(3, "icmp6 and ip6[40] == 129") == 3
        with pytest.raises(SetupError, match=r"3 packets matching .* expected at least 4"):
            cap.wait_for(4, "icmp6 and ip6[40] == 129", timeout=1.0)


def test_capture_on_a_missing_device_fails_clearly(two_hosts: TwoHosts, tmp_path: Path) -> None:
    need_tools("tcpdump")
    cap = Capture(two_hosts.a, "nosuchdev0", tmp_path / "x.pcap")
    with pytest.raises(SetupError, match=r"did not start: .*nosuchdev0"):
        cap.start()
    assert cap.proc is None


def test_two_hosts_link_is_ready_when_built(two_hosts: TwoHosts) -> None:
    """The underlay is up with IPv6 configured before a test gets it (no tentative
    address, a link-local one to solicit from): the first IPv6 packet goes out."""
    for host in two_hosts.hosts:
        assert link_state(host, two_hosts.dev_a) == ("UP", True, False)
    out = two_hosts.a.run(["ping", "-6", "-c", "1", "-W", "5", two_hosts.ip6_b]).stdout
    assert "1 received" in out
