"""A ``PACKET_TX_RING`` (TPACKET_V2) on a send-only AF_PACKET socket with ``PACKET_VNET_HDR``.

Why: a frame sent with ``sendmsg()`` becomes an skb owned by the socket through
``sock_wfree``; when the kernel's software GSO cuts it (a veth with TSO off),
``skb_segment()`` moves that owner to the last segment, and the receiver's GRO does
not merge skbs of different owners: every multi-segment frame arrives in two pieces
and the kernel receive fast path (which takes whole frames only) leaves them to
Python.  An skb built from a TX ring slot has the destructor
``tpacket_destruct_skb`` instead; ``skb_segment()`` moves no owner, and all segments
merge back into one skb at the receiver.

Layout (``tpacket_snd()`` in ``net/packet/af_packet.c``): the ring is blocks of
frames (slots); a slot starts with a ``struct tpacket2_hdr`` (``tp_status`` at 0,
``tp_len`` at 4), and without ``PACKET_TX_HAS_OFF`` the frame data starts at
``tp_hdrlen - sizeof(struct sockaddr_ll)`` = 32.  With ``PACKET_VNET_HDR`` the data
starts with the 10-byte ``virtio_net_hdr`` and ``tp_len`` counts it.  The user writes
the frame, sets ``TP_STATUS_SEND_REQUEST`` and calls ``send()``; the kernel turns
each requested slot (in ring order, from its own head) into an skb, marks it
``TP_STATUS_SENDING`` and, when that skb is freed, ``TP_STATUS_AVAILABLE``.

Copy, not zero-copy: ``tpacket_snd`` copies ``hdr_len`` bytes (the vnet header's)
into the skb and attaches the rest of the slot's pages as fragments.  Fragments can
outlive the skb that releases the slot (GSO segments, a forwarded or orphaned skb
sitting in a receiver's socket queue), so reusing the slot could change bytes still
in flight, unchecked (veth trusts partial checksums).  :meth:`TxRing.send` therefore
writes ``hdr_len`` = the whole frame: the kernel copies it, and a slot is free again
as soon as its skb is freed.  (``sendmsg()`` copies once as well.)

Rejected frames: with ``PACKET_LOSS`` the kernel skips a slot it cannot send (bad
vnet header, too long) and marks it available; without it the ring would stop at
that slot for good.  ``send()`` returns the bytes of the frames it queued, so
:meth:`TxRing.kick` counts the difference between what left the ring and what the
kernel reports sent as :attr:`TxRing.rejected` frames (never a hang).

Conventions as :class:`~sttun.io.packet_socket.PacketSocket`: :meth:`TxRing.send`
returns **0 when no slot is free** (poll for writability with
:meth:`TxRing.wait_writable`).
"""

from __future__ import annotations

import errno
import mmap
import select
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Sequence

from sttun.io.packet_socket import PACKET_VNET_HDR, SO_SNDBUFFORCE, SOL_PACKET, set_buffer
from sttun.wire.vnet import VNET_HDR_LEN

PACKET_VERSION = 10
PACKET_TX_RING = 13
PACKET_LOSS = 14
TPACKET_V2 = 1

TP_STATUS_AVAILABLE = 0
TP_STATUS_SEND_REQUEST = 1
TP_STATUS_SENDING = 2
TP_STATUS_WRONG_FORMAT = 4
_BUSY = TP_STATUS_SEND_REQUEST | TP_STATUS_SENDING | TP_STATUS_WRONG_FORMAT

TPACKET2_HDR_LEN = 32
"""``TPACKET_ALIGN(sizeof(struct tpacket2_hdr))``: where a slot's frame data starts."""
MAX_FRAME = VNET_HDR_LEN + 14 + 4 + 65535
"""vnet header + Ethernet (+ VLAN tag) + the largest IP packet."""
FRAME_SIZE = (TPACKET2_HDR_LEN + MAX_FRAME + 15) & ~15
"""Slot size (a multiple of ``TPACKET_ALIGNMENT`` = 16)."""
BLOCK_SIZE = max(1 << 18, mmap.PAGESIZE)
"""Ring block size: 256 KiB (one order-6 allocation, or vmalloc) holds 3 slots."""
DEFAULT_FRAMES = 64
"""Slots: 64 in-flight 64 KB frames, about the default send buffer's worth."""
_FRAMES_PER_BLOCK = BLOCK_SIZE // FRAME_SIZE

_U32 = struct.Struct("=I")
_pack_u32 = _U32.pack_into
_pack_u16_le = struct.Struct("<H").pack_into  # virtio_net_hdr is little-endian (virtio 1.0)
#: The byte of the native-endian ``tp_status`` that holds the transmit bits
#: (SEND_REQUEST, SENDING, WRONG_FORMAT); the other bytes hold only timestamp
#: flags, which this ring does not ask for.
_STATUS_BYTE = 0 if sys.byteorder == "little" else 3
_TPACKET_REQ = struct.Struct("=IIII")  # block_size, block_nr, frame_size, frame_nr
_KICK_RETRY = (errno.EAGAIN, errno.ENOBUFS)  # frames stay queued and go at the next kick
#: How long :meth:`TxRing.wait_writable` naps when poll says writable (send buffer
#: room) but the next slot is still held by an skb in flight.
_SLOT_NAP = 0.0002


class TxRing:
    """A send-only AF_PACKET socket on ``ifname`` with ``PACKET_VNET_HDR`` and a mapped
    TPACKET_V2 transmit ring.

    Its own socket: on a socket with a TX ring ``sendmsg()`` only kicks the ring (its
    data is ignored), so a socket that also sends with ``sendmsg`` cannot have one.
    Bound with protocol 0, it receives nothing (sent frames get their protocol from
    their Ethernet header or vnet ``gso_type``).  Raises ``OSError`` if the kernel
    refuses (no memory, no ``PACKET_TX_RING``, no interface).  ``frames``: the number
    of slots, each large enough for a 64 KB GSO frame; ``sndbuf``: the socket's send
    buffer (each frame in flight is charged for its skb).
    """

    def __init__(self, ifname: str, frames: int = DEFAULT_FRAMES, sndbuf: int = 0) -> None:
        blocks = -(-frames // _FRAMES_PER_BLOCK)
        self.frames = blocks * _FRAMES_PER_BLOCK
        sock = self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
            sock.setsockopt(SOL_PACKET, PACKET_LOSS, 1)
            if sndbuf:
                set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf)
            req = _TPACKET_REQ.pack(BLOCK_SIZE, blocks, FRAME_SIZE, self.frames)
            sock.setsockopt(SOL_PACKET, PACKET_TX_RING, req)
            sock.bind((ifname, 0))
            self._map = mmap.mmap(sock.fileno(), BLOCK_SIZE * blocks)
        except BaseException:
            sock.close()
            raise
        self._mv = memoryview(self._map)
        self._slots = [
            b * BLOCK_SIZE + f * FRAME_SIZE for b in range(blocks) for f in range(_FRAMES_PER_BLOCK)
        ]
        self._next = 0
        #: (slot offset, bytes the kernel counts when it sends it) in ring order,
        #: requested and not yet seen taken by the kernel.
        self._requested: deque[tuple[int, int]] = deque()
        self._send = sock.send
        self.rejected = 0
        """Frames the kernel skipped (``PACKET_LOSS``) instead of sending."""
        self.rejected_bytes = 0
        """Their bytes (vnet header excluded)."""

    def _status(self, slot: int) -> int:
        return self._mv[slot + _STATUS_BYTE]

    def send(self, parts: Sequence[bytes | bytearray | memoryview], *, kick: bool = True) -> int:
        """Copy one frame (vnet header first, then headers and payload) into the next
        free slot and request its transmission.

        Returns the frame's length, **0 if no slot is free**.  ``kick=False`` leaves
        it queued until :meth:`kick` (several frames per system call).  Raises
        ``OSError(EMSGSIZE)`` for a frame larger than a slot, and what the kick
        raises: ``EINVAL`` when the kernel rejected the frame, ``ENETDOWN``... (the
        frame stays queued for the next kick).
        """
        slot = self._slots[self._next]
        mv = self._mv
        if mv[slot + _STATUS_BYTE] & _BUSY:
            self.kick()  # frames requested earlier may be waiting for one
            if mv[slot + _STATUS_BYTE] & _BUSY:
                return 0
        start = pos = slot + TPACKET2_HDR_LEN
        end = start + MAX_FRAME
        for part in parts:
            n = len(part)  # byte buffers: len is the byte count
            if pos + n > end:
                raise OSError(errno.EMSGSIZE, "frame larger than a TX ring slot")
            mv[pos : pos + n] = part
            pos += n
        length = pos - start
        if length < VNET_HDR_LEN:
            raise OSError(errno.EINVAL, "frame shorter than its vnet header")
        # hdr_len = the whole frame: the kernel copies it all (see the module docstring)
        _pack_u16_le(mv, start + 2, length - VNET_HDR_LEN)
        _pack_u32(mv, slot + 4, length)
        _pack_u32(mv, slot, TP_STATUS_SEND_REQUEST)  # last: hands the slot over
        self._requested.append((slot, length - VNET_HDR_LEN))
        self._next = self._next + 1 if self._next + 1 < self.frames else 0
        if kick:
            self.kick()
        return length

    def kick(self) -> int:
        """Have the kernel send every requested frame; returns the bytes it sent.

        Frames it could not take now (send buffer full, ``ENOBUFS``) stay requested
        for the next kick.  Frames it skipped are counted in :attr:`rejected`, and
        then ``OSError(EINVAL)`` is raised, as ``sendmsg`` would for such a frame
        (the frames after it are sent all the same).
        """
        if not self._requested:
            return 0
        try:
            sent: int | None = self._send(b"", socket.MSG_DONTWAIT)
        except OSError as exc:
            if exc.errno not in _KICK_RETRY:
                self._settle(None)
                raise
            sent = None
        rejected = self.rejected
        self._settle(sent)
        if self.rejected != rejected:
            n = self.rejected - rejected
            raise OSError(errno.EINVAL, f"the kernel rejected {n} frame(s) of the TX ring")
        return sent or 0

    def _settle(self, sent: int | None) -> None:
        """Forget the requested frames the kernel has taken; if it reported ``sent``
        bytes for them, the missing bytes are frames it skipped."""
        requested = self._requested
        status = self._status
        taken = frames = 0
        while requested and not status(requested[0][0]) & TP_STATUS_SEND_REQUEST:
            taken += requested.popleft()[1]
            frames += 1
        if sent is not None and taken > sent:
            # which were skipped is not known when several left at once (send()
            # kicks after each frame, so usually one did): all if none was sent
            self.rejected += frames if sent == 0 else 1
            self.rejected_bytes += taken - sent

    @property
    def waiting(self) -> bool:
        """True while frames of the ring wait for the kernel to take them."""
        return bool(self._requested)

    def next_slot_free(self) -> bool:
        """True when :meth:`send` would find a free slot now."""
        return not self._status(self._slots[self._next]) & _BUSY

    def wait_writable(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a free slot; True if there is one.

        Requested frames are kicked first.  ``poll`` reports ``POLLOUT`` when the
        kernel's next slot is free or the send buffer has room; the latter can be
        true while the slot this ring writes next is still held by an skb in flight,
        so the wait re-checks the slot and naps briefly in that case.
        """
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLOUT)
        while True:
            self.kick()
            if self.next_slot_free():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if poller.poll(max(1, int(remaining * 1000))):
                time.sleep(min(_SLOT_NAP, remaining))

    def fileno(self) -> int:
        """The ring socket's descriptor (``POLLOUT``: a slot or send buffer is free)."""
        return self._sock.fileno()

    def close(self) -> None:
        """Unmap the ring and close its socket (idempotent)."""
        self._mv.release()
        self._map.close()
        self._sock.close()
