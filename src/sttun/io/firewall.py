"""nftables rules that keep the host TCP stack away from STT segments.

The kernel's TCP stack sees every STT segment (AF_PACKET receives a copy before
netfilter) and would answer each with a RST (protocol.md §7).  :class:`Firewall`
installs one table of our own, ``inet sttun_<instance>``, with two chains:

* ``prerouting`` (hook prerouting, priority raw = -300): ``notrack`` for TCP to the
  STT ports at the local addresses, so conntrack never sees the jumping SEQ/ACK;
* ``input`` (hook input, priority filter - 1 = -1): ``drop`` for the same packets, so
  no RST is generated.  Each rule has a counter (:meth:`Firewall.counters`).

Everything goes through ``nft -j -f -`` with a JSON document (libnftables' JSON
schema); nothing is hand-built netlink.  :meth:`Firewall.install` replaces the table
atomically ("add table; delete table; add table ..." in one transaction), which is
also how leftovers from a crashed run are replaced, never duplicated.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
from collections.abc import Iterable
from typing import Any

from sttun.errors import SetupError
from sttun.wire.stt import STT_PORT

FAMILY = "inet"
PRIO_RAW = -300
"""Priority of the notrack chain: NF_IP_PRI_RAW, before conntrack (-200)."""
PRIO_INPUT = -1
"""Priority of the drop chain: just before the filter table (0)."""
NFT_TIMEOUT_S = 30.0
"""Generous upper bound for one nft invocation; it normally takes milliseconds."""

_INSTANCE_RE = re.compile(r"^[A-Za-z0-9_]{1,32}$")


def _nft_binary() -> str:
    path = shutil.which("nft")
    if path is None:
        raise SetupError("nftables: the 'nft' program is not installed (apt install nftables)")
    return path


def _run_nft(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [_nft_binary(), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=NFT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SetupError(f"nftables: cannot run nft: {e}") from e


def _match(protocol: str, field: str, values: list[Any]) -> dict[str, Any]:
    return {
        "match": {
            "op": "==",
            "left": {"payload": {"protocol": protocol, "field": field}},
            "right": {"set": values} if len(values) > 1 else values[0],
        }
    }


class Firewall:
    """One nftables table, ``inet sttun_<instance>``, for one sttun endpoint.

    ``instance``: letters, digits and ``_`` (1..32 characters).
    """

    def __init__(self, instance: str = "sttun") -> None:
        if not _INSTANCE_RE.match(instance):
            raise SetupError(
                f"nftables: instance name must be 1..32 of [A-Za-z0-9_], got {instance!r}"
            )
        self.instance = instance
        self.table = f"sttun_{instance}"

    @property
    def table_name(self) -> str:
        """``"inet sttun_<instance>"``, as nft prints it."""
        return f"{FAMILY} {self.table}"

    # -- document building -------------------------------------------------------
    def _tbl(self) -> dict[str, Any]:
        return {"family": FAMILY, "name": self.table}

    def _chain(self, name: str, hook: str, prio: int) -> dict[str, Any]:
        return {
            "add": {
                "chain": {
                    "family": FAMILY,
                    "table": self.table,
                    "name": name,
                    "type": "filter",
                    "hook": hook,
                    "prio": prio,
                    "policy": "accept",
                }
            }
        }

    def _rules(
        self,
        chain: str,
        addrs: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
        ports: list[int],
        verdict: dict[str, Any],
    ) -> list[dict[str, Any]]:
        port_match = _match("tcp", "dport", list(ports))
        counter = {"counter": {"packets": 0, "bytes": 0}}
        groups: list[list[dict[str, Any]]] = []
        v4 = [str(a) for a in addrs if a.version == 4]
        v6 = [str(a) for a in addrs if a.version == 6]
        if not addrs:  # any destination
            groups.append(
                [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}]
            )
        if v4:
            groups.append([_match("ip", "daddr", v4)])
        if v6:
            groups.append([_match("ip6", "daddr", v6)])
        return [
            {
                "add": {
                    "rule": {
                        "family": FAMILY,
                        "table": self.table,
                        "chain": chain,
                        "expr": [*g, port_match, counter, verdict],
                    }
                }
            }
            for g in groups
        ]

    def document(self, local_addrs: Iterable[str], ports: Iterable[int]) -> dict[str, Any]:
        """The JSON document :meth:`install` feeds to ``nft -j -f -``."""
        addrs = _parse_addrs(local_addrs)
        plist = _parse_ports(ports)
        cmds: list[dict[str, Any]] = [
            {"add": {"table": self._tbl()}},
            {"delete": {"table": self._tbl()}},
            {"add": {"table": self._tbl()}},
            self._chain("prerouting", "prerouting", PRIO_RAW),
            self._chain("input", "input", PRIO_INPUT),
            *self._rules("prerouting", addrs, plist, {"notrack": None}),
            *self._rules("input", addrs, plist, {"drop": None}),
        ]
        return {"nftables": [{"metainfo": {"json_schema_version": 1}}, *cmds]}

    # -- operations ---------------------------------------------------------------
    def install(self, local_addrs: Iterable[str], ports: Iterable[int] = (STT_PORT,)) -> None:
        """Install (or atomically replace) the table for ``local_addrs`` x ``ports``.

        An empty ``local_addrs`` matches TCP to ``ports`` at any destination address.
        Raises :class:`SetupError` when nft is missing or refuses the ruleset.
        """
        self._apply(self.document(local_addrs, ports), "installing")

    def remove(self) -> None:
        """Delete the table if it exists (idempotent)."""
        doc = {"nftables": [{"add": {"table": self._tbl()}}, {"delete": {"table": self._tbl()}}]}
        self._apply(doc, "removing")

    def _apply(self, doc: dict[str, Any], doing: str) -> None:
        """Hand ``doc`` to ``nft -j -f -``; :class:`SetupError` saying what failed if refused."""
        res = _run_nft(["-j", "-f", "-"], json.dumps(doc))
        if res.returncode != 0:
            raise SetupError(
                f"nftables: {doing} table {FAMILY} {self.table} failed: "
                f"{res.stderr.strip() or res.stdout.strip()}"
            )

    def _list(self) -> dict[str, Any] | None:
        res = _run_nft(["-j", "list", "table", FAMILY, self.table])
        if res.returncode != 0:
            return None
        try:
            parsed: dict[str, Any] = json.loads(res.stdout)
        except ValueError as e:
            raise SetupError(f"nftables: cannot parse 'nft -j list' output: {e}") from e
        return parsed

    def is_installed(self) -> bool:
        """True if the table exists."""
        return self._list() is not None

    def counters(self) -> dict[str, int]:
        """Packets matched so far: ``{"notrack": n, "drop": m}`` (0 if not installed)."""
        out = {"notrack": 0, "drop": 0}
        listing = self._list()
        if listing is None:
            return out
        for item in listing.get("nftables", []):
            rule = item.get("rule") if isinstance(item, dict) else None
            if not rule:
                continue
            key = "notrack" if rule.get("chain") == "prerouting" else "drop"
            for expr in rule.get("expr", []):
                if isinstance(expr, dict) and "counter" in expr:
                    out[key] += int(expr["counter"].get("packets", 0))
        return out


def _parse_addrs(addrs: Iterable[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out = []
    for a in addrs:
        try:
            out.append(ipaddress.ip_address(a))
        except ValueError as e:
            raise SetupError(f"nftables: local address {a!r} is not an IP address") from e
    return sorted(set(out), key=lambda x: (x.version, int(x)))


def _parse_ports(ports: Iterable[int]) -> list[int]:
    plist = sorted(set(ports))
    if not plist:
        raise SetupError("nftables: at least one port is needed")
    for p in plist:
        if not isinstance(p, int) or not 0 < p < 65536:
            raise SetupError(f"nftables: port must be 1..65535, got {p!r}")
    return plist
