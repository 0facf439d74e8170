"""Prometheus export of ShowData."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from sttun.core.drops import DropReason
from sttun.core.keys import format_key
from sttun.daemon.metrics import (
    ShowData,
    ShowSnapshot,
    SttunCollector,
    empty_reassembly,
    empty_traffic,
    render,
    start_metrics_server,
)
from sttun.errors import ConfigError, SetupError


def sample() -> ShowData:
    # stt0 and stt2 have the same peer: its reassembly numbers appear in both rows
    peer_b = {
        "peer": "198.18.0.2",
        "entries": 2,
        "bytes": 3000,
        "peak_bytes": 65000,
        "evictions": 4,
        "timeouts": 5,
    }
    return {
        "pid": 4242,
        "instance": "sttun",
        "started": 1700000000.0,
        "tunnels": [
            {
                "name": "stt0",
                "dev": "stt0",
                "local_ip": "198.18.0.1",
                "remote_ip": "198.18.0.2",
                "in_key": 0x1234,
                "out_key": 0x1234,
                "dst_port": 7471,
                "state": "up",
                "offload": True,
                "tx": {"frames": 10, "bytes": 15000, "segments": 12},
                "rx": {"frames": 7, "bytes": 9000, "segments": 9},
                "drops": {"bad_tcp_checksum": 3, "late_segment": 1},
                "peer_reassembly": dict(peer_b),
            },
            {
                "name": "stt1",
                "dev": "tap1",
                "local_ip": "2001:db8:0:1::1",
                "remote_ip": "2001:db8:0:1::2",
                "in_key": 1,
                "out_key": 2,
                "dst_port": 7472,
                "state": "down",
                "offload": False,
                "tx": empty_traffic(),
                "rx": empty_traffic(),
                "drops": {},
                "peer_reassembly": {"peer": "2001:db8:0:1::2", **empty_reassembly()},
            },
            {
                "name": "stt2",
                "dev": "stt2",
                "local_ip": "198.18.0.1",
                "remote_ip": "198.18.0.2",
                "in_key": 9,
                "out_key": 9,
                "dst_port": 7471,
                "state": "up",
                "offload": True,
                "tx": empty_traffic(),
                "rx": empty_traffic(),
                "drops": {},
                "peer_reassembly": dict(peer_b),
            },
        ],
        "drops": {"wrong_port": 6, "unknown_source": 2},
        "reassembly": {
            "entries": 2,
            "bytes": 3000,
            "peak_bytes": 70000,
            "evictions": 4,
            "timeouts": 8,
        },
    }


def test_format_key() -> None:
    """The one key format: the metrics' ``key`` label, show, logs and --check use it."""
    assert format_key(0x1234) == "0x1234"
    assert format_key(0x1234, 0x1234) == "0x1234"
    assert format_key(1, 2) == "0x1/0x2"
    assert format_key(0, 2**64 - 1) == "0x0/0xffffffffffffffff"


def test_exposition() -> None:
    text = render(SttunCollector(sample, version="9.9"))
    lines = set(text.splitlines())
    expected = [
        'sttun_info{instance="sttun",version="9.9"} 1.0',
        "sttun_start_time_seconds 1.7e+09",
        'sttun_tunnel_state{key="0x1234",state="up",tunnel="stt0"} 1.0',
        'sttun_tunnel_state{key="0x1234",state="down",tunnel="stt0"} 0.0',
        'sttun_tunnel_state{key="0x1/0x2",state="down",tunnel="stt1"} 1.0',
        'sttun_tunnel_tx_frames_total{key="0x1234",tunnel="stt0"} 10.0',
        'sttun_tunnel_tx_bytes_total{key="0x1234",tunnel="stt0"} 15000.0',
        'sttun_tunnel_tx_segments_total{key="0x1234",tunnel="stt0"} 12.0',
        'sttun_tunnel_rx_frames_total{key="0x1234",tunnel="stt0"} 7.0',
        'sttun_tunnel_rx_bytes_total{key="0x1234",tunnel="stt0"} 9000.0',
        'sttun_tunnel_rx_segments_total{key="0x1234",tunnel="stt0"} 9.0',
        'sttun_tunnel_rx_frames_total{key="0x1/0x2",tunnel="stt1"} 0.0',
        'sttun_tunnel_drops_total{key="0x1234",reason="bad_tcp_checksum",tunnel="stt0"} 3.0',
        'sttun_tunnel_drops_total{key="0x1234",reason="late_segment",tunnel="stt0"} 1.0',
        'sttun_peer_reassembly_entries{peer="198.18.0.2"} 2.0',
        'sttun_peer_reassembly_bytes{peer="198.18.0.2"} 3000.0',
        'sttun_peer_reassembly_peak_bytes{peer="198.18.0.2"} 65000.0',
        'sttun_peer_reassembly_evictions_total{peer="198.18.0.2"} 4.0',
        'sttun_peer_reassembly_timeouts_total{peer="198.18.0.2"} 5.0',
        'sttun_peer_reassembly_entries{peer="2001:db8:0:1::2"} 0.0',
        'sttun_drops_total{reason="wrong_port"} 6.0',
        'sttun_drops_total{reason="unknown_source"} 2.0',
        "sttun_reassembly_entries 2.0",
        "sttun_reassembly_bytes 3000.0",
        "sttun_reassembly_peak_bytes 70000.0",
        "sttun_reassembly_evictions_total 4.0",
        "sttun_reassembly_timeouts_total 8.0",
        "# TYPE sttun_tunnel_tx_frames_total counter",
        "# TYPE sttun_peer_reassembly_bytes gauge",
        "# TYPE sttun_peer_reassembly_evictions_total counter",
    ]
    missing = [e for e in expected if e not in lines]
    assert not missing, f"{missing}\n---\n{text}"
    # a peer's numbers are exported once, however many tunnels lead to it
    assert sum(x.startswith("sttun_peer_reassembly_entries{") for x in lines) == 2
    assert "sttun_tunnel_reassembly" not in text
    # a tunnel with no drops exports no drop series
    assert 'tunnel="stt1"' not in "".join(x for x in lines if x.startswith("sttun_tunnel_drops"))


def test_drop_reason_values_are_valid_label_values() -> None:
    data = sample()
    data["drops"] = {r.value: 1 for r in DropReason}
    text = render(SttunCollector(lambda: data))
    for r in DropReason:
        assert f'sttun_drops_total{{reason="{r.value}"}} 1.0' in text


def test_unknown_state_is_exported() -> None:
    data = sample()
    data["tunnels"][0]["state"] = "starting"
    text = render(SttunCollector(lambda: data))
    assert 'sttun_tunnel_state{key="0x1234",state="starting",tunnel="stt0"} 1.0' in text
    assert 'sttun_tunnel_state{key="0x1234",state="up",tunnel="stt0"} 0.0' in text


def test_no_data_yet() -> None:
    snap = ShowSnapshot()
    text = render(SttunCollector(snap, version="1"))
    assert 'sttun_info{instance="",version="1"} 1.0' in text
    assert "sttun_tunnel" not in text
    snap.publish(sample())
    assert "sttun_tunnel_tx_frames_total" in render(SttunCollector(snap))


def _free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def test_http_server() -> None:
    port = _free_port()
    stop = start_metrics_server(f"127.0.0.1:{port}", SttunCollector(sample))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            body = r.read().decode()
        assert 'sttun_tunnel_tx_frames_total{key="0x1234",tunnel="stt0"} 10.0' in body
        assert "process_" in body  # process metrics come along
        # the port is taken now
        with pytest.raises(SetupError, match=rf"^cannot serve metrics on 127\.0\.0\.1:{port}: "):
            start_metrics_server(f"127.0.0.1:{port}", SttunCollector(sample))
    finally:
        stop()


def test_http_server_ipv6() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        port = _free_port(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no ::1")
    stop = start_metrics_server(f"[::1]:{port}", SttunCollector(sample))
    try:
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=10) as r:
            assert b"sttun_info" in r.read()
    finally:
        stop()


def test_bad_address() -> None:
    with pytest.raises(ConfigError, match=r'^metrics address: expected "host:port"'):
        start_metrics_server("9100", SttunCollector(sample))


def test_missing_sections_do_not_break_a_scrape() -> None:
    data: dict = dict(sample())
    data["tunnels"] = [dict(data["tunnels"][0], tx=None, drops=None, peer_reassembly=None, extra=1)]
    data["reassembly"] = None
    data["drops"] = None
    text = render(SttunCollector(lambda: data))  # type: ignore[arg-type, return-value]
    assert 'sttun_tunnel_tx_frames_total{key="0x1234",tunnel="stt0"} 0.0' in text
    assert 'sttun_tunnel_rx_frames_total{key="0x1234",tunnel="stt0"} 7.0' in text
    assert "sttun_reassembly_bytes 0.0" in text


def test_fast_path_metrics() -> None:
    data = sample()
    data["tunnels"][0]["rx_fastpath"] = {"frames": 5, "bytes": 7000}
    data["underlays"] = [
        {
            "name": "eth0",
            "sockets": ["ipv4"],
            "tunnels": ["stt0", "stt2"],
            "fastpath": {
                "state": "on",
                "reason": None,
                "attach": "tcx",
                "program_id": 97,
                "passed": {
                    "piece": {"packets": 3, "bytes": 4500},
                    "vlan": {"packets": 0, "bytes": 0},
                },
                "errors": {"packets": 0, "bytes": 0},
            },
        },
        {
            "name": "eth1",
            "sockets": ["all"],
            "tunnels": ["stt1"],
            "fastpath": {
                "state": "off",
                "reason": "fast path: the verifier rejected the program: x",
                "attach": None,
                "program_id": None,
                "passed": {},
                "errors": {"packets": 0, "bytes": 0},
            },
        },
    ]
    text = render(SttunCollector(lambda: data))
    assert 'sttun_fastpath_frames_total{key="0x1234",tunnel="stt0"} 5.0' in text
    assert 'sttun_fastpath_bytes_total{key="0x1234",tunnel="stt0"} 7000.0' in text
    assert 'sttun_fastpath_frames_total{key="0x9",tunnel="stt2"} 0.0' in text
    assert 'sttun_fastpath_attached{underlay="eth0"} 1.0' in text
    assert 'sttun_fastpath_attached{underlay="eth1"} 0.0' in text
    assert 'sttun_fastpath_passed_packets_total{reason="piece",underlay="eth0"} 3.0' in text
    assert 'sttun_fastpath_passed_bytes_total{reason="piece",underlay="eth0"} 4500.0' in text
    assert 'sttun_fastpath_errors_total{underlay="eth0"} 0.0' in text
