"""Run ``sttun up`` with its underlay AF_PACKET sockets bound to one ethertype.

    python fastpath_daemon.py 0x0800 --local-ip ... (the rest of ``sttun up``'s argv)

Stand-in for the daemon integration of the fast path (issue #14) until the daemon
binds per protocol itself: a socket bound to ``ETH_P_ALL`` runs before tc ingress
and would see the frames a tc program redirects (each delivered twice); one bound to
``ETH_P_IP``/``ETH_P_IPV6`` runs after it and sees only what the program passes on.
Everything else is the real daemon.
"""

from __future__ import annotations

import functools
import sys

from sttun.cli import main
from sttun.daemon import endpoint
from sttun.io.packet_socket import PacketSocket

if __name__ == "__main__":
    protocol = int(sys.argv[1], 0)
    endpoint.PacketSocket = functools.partial(PacketSocket, protocol=protocol)  # type: ignore[misc]
    sys.exit(main(["up", *sys.argv[2:]]))
