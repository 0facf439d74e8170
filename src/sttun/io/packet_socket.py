"""AF_PACKET socket on the underlay: the wire side of the data path.

A :class:`PacketSocket` is a non-blocking ``AF_PACKET``/``SOCK_RAW`` socket bound to
one interface.  With ``vnet_hdr=True`` (``PACKET_VNET_HDR``) every received frame is
preceded by a 10-byte ``struct virtio_net_hdr`` describing GRO merges and checksum
state, and every sent frame must start with one: a 64 KB TCP "super-packet" sent with
``gso_type=TCPV4|TCPV6`` and ``NEEDS_CSUM`` is cut into MTU-sized segments with
correct checksums by the kernel's GSO (or the NIC's TSO).  The bytes of the vnet
header are passed through; :mod:`sttun.wire` encodes and decodes them.

Receive filtering: a classic BPF program (:mod:`sttun.io.bpf`) admits only TCP to the
STT ports.  The socket is created with protocol 0 - which receives nothing - the
filter is attached, and only then is it bound to ``ETH_P_ALL`` on the interface, so
no unfiltered packet is ever queued.  ``PACKET_IGNORE_OUTGOING`` keeps our own
transmissions (and everything else the host sends) out of the receive queue.

Conventions: :meth:`PacketSocket.recv_into` returns **0 when nothing is pending**,
:meth:`PacketSocket.send` returns **0 when the socket buffer is full** (the frame was
not sent; poll for writability or count a drop).

Cost of one ``sendmsg()`` of a 64 KB GSO frame (45 x 1448-byte segments), Python
3.11, 2-core VM, two namespaces on a veth pair, median of 2000 calls.  On veth the
receiver's softirq work runs inside the sender's call, so the figure depends on it:

==========================================  ===========
sender veth / receiver                      per call
==========================================  ===========
TSO on (no segmentation), nft drop at B       7.4 µs
TSO on, B's stack answers with RSTs          10.4 µs
TSO off (software GSO), GRO on, nft drop     31.6 µs
TSO off, GRO on, RSTs                        39.2 µs
TSO off, GRO off, nft drop                   46.0 µs
TSO off, GRO off, RSTs                      123.0 µs
==========================================  ===========

With TSO on the veth the send costs 9-12 µs.  ``bench/gso_send.py`` measures
it; ``tests/e2e/test_io_packet_socket.py`` checks the segments, not the time.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from sttun.errors import SetupError
from sttun.io.bpf import attach_filter, stt_filter
from sttun.wire.ether import ETH_HLEN, VLAN_HLEN
from sttun.wire.stt import STT_PORT
from sttun.wire.vnet import VNET_HDR_LEN

if TYPE_CHECKING:
    from sttun.io.tx_ring import TxRing

SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_FANOUT = 18
PACKET_IGNORE_OUTGOING = 23
ETH_P_ALL = 0x0003
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32

RECV_SIZE = VNET_HDR_LEN + 65535 + ETH_HLEN + VLAN_HLEN + 64
"""A receive buffer this large holds any GRO-merged frame (64 KB IP + Ethernet)."""

DEFAULT_RCVBUF = 16 * 1024 * 1024
"""Receive buffer: room for ~250 merged 64 KB frames while the event loop is busy."""
DEFAULT_SNDBUF = 4 * 1024 * 1024
"""Send buffer: room for ~60 queued 64 KB GSO frames."""


def set_buffer(sock: socket.socket, force_opt: int, opt: int, size: int) -> None:
    """Set a socket buffer size with ``force_opt`` (beyond ``[rw]mem_max``, as root),
    or with ``opt`` where that is refused."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, size)  # ignores rmem_max (root)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, opt, size)


class PacketSocket:
    """Non-blocking AF_PACKET socket on ``ifname`` filtered to TCP ``ports``.

    ``ports=None`` attaches no filter (every frame on the interface is received;
    useful on a TAP for test traffic).  ``vnet_hdr``: exchange 10-byte virtio-net
    headers (see module docstring).  ``protocol``: the ethertype to bind to;
    ``ETH_P_ALL`` taps run before tc ingress, ``ETH_P_IP``/``ETH_P_IPV6`` after it
    (they see only what a tc program passes on).  Raises :class:`SetupError` when
    the interface does not exist or the socket cannot be set up.

    ``tx_ring=True`` (needs ``vnet_hdr``): :meth:`send` puts GSO frames in a
    ``PACKET_TX_RING`` (:class:`~sttun.io.tx_ring.TxRing`), whose frames the
    receiver's GRO merges whole again after software GSO, and :meth:`wait_writable`
    waits for a free slot; single frames still go with ``sendmsg``; receiving is
    unchanged.  If the
    kernel refuses the ring, the socket sends with ``sendmsg`` and
    :attr:`tx_ring_error` says why (the caller logs it).
    """

    def __init__(
        self,
        ifname: str,
        ports: Iterable[int] | None = (STT_PORT,),
        *,
        vnet_hdr: bool = True,
        rcvbuf: int = DEFAULT_RCVBUF,
        sndbuf: int = DEFAULT_SNDBUF,
        ignore_outgoing: bool = True,
        protocol: int = ETH_P_ALL,
        tx_ring: bool = False,
    ) -> None:
        if tx_ring and not vnet_hdr:
            raise ValueError("a TX ring needs vnet_hdr (its frames carry hdr_len)")
        self.ifname = ifname
        self.vnet_hdr = vnet_hdr
        self.tx_ring: TxRing | None = None
        """The transmit ring, when ``tx_ring`` was asked for and the kernel made one."""
        self.tx_ring_error: str | None = None
        """Why the kernel refused the ring asked for (then ``send`` uses sendmsg)."""
        try:
            self.ifindex = socket.if_nametoindex(ifname)
        except OSError as e:
            raise SetupError(f"packet socket: no interface {ifname!r}") from e
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except OSError as e:
            raise SetupError(f"packet socket on {ifname}: {e.strerror} (needs root)") from e
        self._sock = sock
        try:
            if ports is not None:
                attach_filter(sock, stt_filter(ports))
            if vnet_hdr:
                sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            if ignore_outgoing:
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf)
            set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf)
            sock.bind((ifname, protocol))
            sock.setblocking(False)
            if tx_ring:
                from sttun.io.tx_ring import TxRing  # it builds on this module

                try:
                    self.tx_ring = TxRing(ifname, sndbuf=sndbuf)
                except OSError as e:
                    self.tx_ring_error = f"PACKET_TX_RING refused: {e.strerror or e}"
        except OSError as e:
            self.close()
            raise SetupError(f"packet socket on {ifname}: {e.strerror}") from e
        except BaseException:
            self.close()
            raise
        self._recv_into = sock.recv_into
        self._sendmsg = sock.sendmsg
        if self.tx_ring is not None:
            self.send = self._send_gso_by_ring  # type: ignore[method-assign]
            self.wait_writable = self.tx_ring.wait_writable  # type: ignore[method-assign]

    def set_ports(self, ports: Iterable[int]) -> None:
        """Replace the BPF filter with one for ``ports`` (atomic in the kernel: the old
        program is swapped for the new one, no packet sees neither)."""
        attach_filter(self._sock, stt_filter(ports))

    @property
    def socket(self) -> socket.socket:
        """The underlying socket object."""
        return self._sock

    def fileno(self) -> int:
        """File descriptor for select/poll."""
        return self._sock.fileno()

    def recv_into(self, buf: bytearray | memoryview) -> int:
        """Receive one frame (vnet header first if enabled) into ``buf``.

        Returns its length, or **0 if nothing is pending**.  Frames longer than
        ``buf`` are truncated; use :data:`RECV_SIZE`.
        """
        try:
            return self._recv_into(buf)
        except BlockingIOError:
            return 0

    def recv_many(self, bufs: Sequence[bytearray | memoryview], lengths: list[int]) -> int:
        """Fill ``bufs`` in order until the queue is empty; store lengths in ``lengths``.

        Returns how many buffers were filled (0 if nothing was pending).  Saves the
        caller's per-packet loop overhead; the kernel still sees one syscall per frame
        (Python has no ``recvmmsg``).
        """
        recv = self._recv_into
        n = 0
        try:
            for buf in bufs:
                lengths[n] = recv(buf)
                n += 1
        except BlockingIOError:
            pass
        return n

    def send(self, parts: Sequence[bytes | bytearray | memoryview]) -> int:
        """Send one frame given as parts (scatter-gather ``sendmsg``, no join).

        With ``vnet_hdr`` the first part is the 10-byte vnet header, then the outer
        Ethernet+IP+TCP headers, then payload buffers.  Returns the number of bytes
        accepted, **0 if the send buffer is full**.  Raises ``OSError`` if the kernel
        rejects the frame (``EINVAL`` for an inconsistent vnet header, ``EMSGSIZE``
        for a non-GSO frame above the MTU, ``ENETDOWN``...).
        """
        try:
            return self._sendmsg(parts)
        except BlockingIOError:
            return 0

    def _send_gso_by_ring(self, parts: Sequence[bytes | bytearray | memoryview]) -> int:
        """:meth:`send` with a TX ring: GSO frames (vnet ``gso_type`` set) through the
        ring, where the kernel may cut them; single frames with ``sendmsg``, which
        costs less per frame and delivers them whole anyway, unless frames wait in
        the ring (then the ring too: one queue keeps the order) or the socket buffer
        is full."""
        ring = self.tx_ring
        assert ring is not None
        if not parts[0][1] and not ring.waiting:
            try:
                return self._sendmsg(parts)
            except BlockingIOError:
                pass
        return ring.send(parts)

    def wait_writable(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for room in the send buffer; True if there is."""
        _r, writable, _x = select.select([], [self._sock], [], timeout)
        return bool(writable)

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if self.tx_ring is not None:
            self.tx_ring.close()
            self.tx_ring = None
        self._sock.close()

    def __enter__(self) -> PacketSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        ring = ", tx_ring=True" if self.tx_ring is not None else ""
        return f"PacketSocket({self.ifname!r}, vnet_hdr={self.vnet_hdr}{ring})"
