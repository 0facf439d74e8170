"""Streaming reader of classic pcap and pcapng capture files.

:class:`CaptureReader` auto-detects the format from the file's magic and yields one
plain tuple per packet::

    (ts_ns, linktype, data, orig_len)

``ts_ns`` is the timestamp in integer nanoseconds since the epoch, ``linktype`` the
``LINKTYPE_*`` value of the packet's interface, ``data`` a read-only ``memoryview`` of
the captured bytes and ``orig_len`` the length of the packet on the wire.

Speed and memory: the file is read in big chunks (``chunk_size``, 1 MiB by default)
with ``readinto`` into a fresh ``bytearray`` per chunk, headers are decoded with
precompiled :class:`struct.Struct` objects, and ``data`` is a slice of that chunk — no
per-packet copy.  Because each chunk is a new buffer, a ``data`` view stays valid as
long as the caller holds it (it keeps its chunk alive); callers that keep packets
around for long should copy them with ``bytes(data)``.  Memory use is constant for any
file size as long as the caller drops the views it no longer needs.

Errors raise :class:`sttun.errors.CaptureError` with a message of the form
``"<file>: byte <offset>: <what is wrong>"``: empty file, unknown magic, truncated
file header, corrupt record/block length, an interface with an unsupported link type,
a packet on an undescribed interface.

A record cut off by end of file — what killing ``tcpdump`` usually leaves behind — is
*not* raised by default: iteration stops after the last whole packet and
:attr:`CaptureReader.truncated` holds the :class:`CaptureError` describing the cut
(the caller can count or print it).  Pass ``strict=True`` to have it raised instead,
after every whole packet before it has been yielded.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Final, Protocol

from sttun.errors import CaptureError, TruncatedError
from sttun.wire.ether import ETH_P_IP, ETH_P_IPV6, skip_vlan_tags

__all__ = [
    "LINKTYPE_ETHERNET",
    "LINKTYPE_IPV4",
    "LINKTYPE_IPV6",
    "LINKTYPE_LINUX_SLL",
    "LINKTYPE_LINUX_SLL2",
    "LINKTYPE_RAW",
    "SUPPORTED_LINKTYPES",
    "CaptureReader",
    "Packet",
    "l3_offset",
    "read_packets",
]

# --- link types ------------------------------------------------------------------

LINKTYPE_ETHERNET: Final = 1
LINKTYPE_RAW: Final = 101  # raw IPv4 or IPv6, version from the first nibble
LINKTYPE_LINUX_SLL: Final = 113  # Linux "cooked" capture v1 (16-byte header)
LINKTYPE_IPV4: Final = 228
LINKTYPE_IPV6: Final = 229
LINKTYPE_LINUX_SLL2: Final = 276  # Linux "cooked" capture v2 (20-byte header)
_DLT_RAW_12: Final = 12  # DLT_RAW as written on most systems (seen in the wild)
_DLT_RAW_14: Final = 14  # DLT_RAW on OpenBSD

_RAW_TYPES: Final = frozenset((LINKTYPE_RAW, _DLT_RAW_12, _DLT_RAW_14))

#: Link types :func:`l3_offset` understands; the reader accepts these by default.
SUPPORTED_LINKTYPES: Final[frozenset[int]] = frozenset(
    (LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, LINKTYPE_IPV4, LINKTYPE_IPV6)
).union(_RAW_TYPES)

# linktype -> (offset of the 2-byte protocol/EtherType field, offset of its payload)
_L2_LAYOUT: Final[dict[int, tuple[int, int]]] = {
    LINKTYPE_ETHERNET: (12, 14),
    LINKTYPE_LINUX_SLL: (14, 16),
    LINKTYPE_LINUX_SLL2: (0, 20),
}

#: One packet: (timestamp ns, link type, captured bytes, original length).
Packet = tuple[int, int, memoryview, int]

BytesLike = bytes | bytearray | memoryview


class ReadableBinary(Protocol):
    """What the reader needs from a file object: ``readinto`` and ``close``."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...

    def close(self) -> None: ...


def l3_offset(linktype: int, data: BytesLike) -> tuple[int, int] | None:
    """Locate the network-layer header of a captured packet.

    Returns ``(ethertype, offset)``: the EtherType of the payload and the offset of its
    first byte in ``data``.  VLAN tags (:data:`sttun.wire.ether.VLAN_TPIDS`) are
    stepped over on Ethernet and Linux cooked (SLL, SLL2) captures, so the EtherType is
    the innermost one; it may be anything (ARP, ...), the caller checks for 0x0800 /
    0x86DD.  For raw-IP link types the EtherType is derived from the IP version nibble.

    Returns ``None`` when the packet cannot be used: unknown link type, data shorter
    than the link-layer header (or with nothing after it), an 802.3 length field
    instead of an EtherType, a raw packet that is neither IPv4 nor IPv6.
    """
    n = len(data)
    layout = _L2_LAYOUT.get(linktype)
    if layout is not None:
        try:
            etype, off = skip_vlan_tags(data, *layout)
        except TruncatedError:
            return None
        if n <= off or etype < 0x0600:  # nothing after it; 802.3 length / SLL pseudo-protocol
            return None
        return etype, off
    if n == 0:
        return None
    if linktype in _RAW_TYPES:
        version = data[0] >> 4
        if version == 4:
            return ETH_P_IP, 0
        if version == 6:
            return ETH_P_IPV6, 0
        return None
    if linktype == LINKTYPE_IPV4:
        return (ETH_P_IP, 0) if data[0] >> 4 == 4 else None
    if linktype == LINKTYPE_IPV6:
        return (ETH_P_IPV6, 0) if data[0] >> 4 == 6 else None
    return None


# --- file formats ----------------------------------------------------------------

_PCAP_MAGICS: Final[dict[bytes, tuple[str, int]]] = {
    # first four bytes of the file -> (struct byte order, timestamp units per second)
    b"\xd4\xc3\xb2\xa1": ("<", 1_000_000),
    b"\xa1\xb2\xc3\xd4": (">", 1_000_000),
    b"\x4d\x3c\xb2\xa1": ("<", 1_000_000_000),
    b"\xa1\xb2\x3c\x4d": (">", 1_000_000_000),
}
_PCAP_MODIFIED_MAGICS: Final = (b"\x34\xcd\xb2\xa1", b"\xa1\xb2\xcd\x34")
_PCAPNG_SHB: Final = b"\x0a\x0d\x0d\x0a"
_PCAPNG_BOM: Final[dict[bytes, str]] = {b"\x4d\x3c\x2b\x1a": "<", b"\x1a\x2b\x3c\x4d": ">"}

_PCAP_HDR_LEN: Final = 24
_PCAP_REC_LEN: Final = 16
_PCAP_MAX_RECORD: Final = 1 << 26  # hard cap whatever the snaplen says (64 MiB)
_NG_MAX_BLOCK: Final = 1 << 26

_SHB_TYPE: Final = 0x0A0D0D0A
_IDB_TYPE: Final = 1
_PB_TYPE: Final = 2  # obsolete Packet Block
_SPB_TYPE: Final = 3
_EPB_TYPE: Final = 6

_OPT_END: Final = 0
_OPT_IF_TSRESOL: Final = 9
_OPT_IF_TSOFFSET: Final = 14

_DEFAULT_CHUNK: Final = 1 << 20
_NS: Final = 1_000_000_000

# Per-byte-order structs, built once.
_STRUCTS: Final[dict[str, dict[str, struct.Struct]]] = {
    bo: {
        "pcap_hdr": struct.Struct(bo + "HHiIII"),  # after the magic
        "pcap_rec": struct.Struct(bo + "IIII"),
        "blk": struct.Struct(bo + "II"),
        "u32": struct.Struct(bo + "I"),
        "epb": struct.Struct(bo + "IIIII"),
        "epb_full": struct.Struct(bo + "IIIIIII"),  # block type and length + EPB fields
        "pb": struct.Struct(bo + "HHIIII"),
        "idb": struct.Struct(bo + "HHI"),
        "opt": struct.Struct(bo + "HH"),
        "shb": struct.Struct(bo + "HHq"),
        "i64": struct.Struct(bo + "q"),
    }
    for bo in "<>"
}

# Interface as the pcapng loop uses it: (linktype, ts multiplier, ts divisor, offset ns)
_Iface = tuple[int, int, int, int]


def _ts_factors(tsresol: int) -> tuple[int, int]:
    """(mul, div) turning raw if_tsresol units into nanoseconds: ``ts * mul // div``."""
    exp = tsresol & 0x7F
    if tsresol & 0x80:  # negative power of 2
        return _NS, 1 << exp
    if exp <= 9:
        return 10 ** (9 - exp), 1
    return 1, 10 ** (exp - 9)


class CaptureReader:
    """Iterate over the packets of a pcap or pcapng file without loading it.

    ``source`` is a path or a binary file object with ``readinto`` (a pipe works:
    the reader only blocks for the bytes it needs).  The file header is read and
    checked by the constructor, so a file that is empty or not a capture fails here.

    ``linktypes`` is the set of link types accepted (default
    :data:`SUPPORTED_LINKTYPES`); an interface with another link type raises
    :class:`CaptureError`.  Pass ``None`` to accept any link type.

    Iterating yields :data:`Packet` tuples ``(ts_ns, linktype, data, orig_len)``; a
    reader can be iterated once.  See the module docstring for :attr:`truncated` and
    ``strict``.  Use it as a context manager (or call :meth:`close`) to close a file
    it opened.
    """

    format: str
    """``"pcap"`` or ``"pcapng"``."""
    linktype: int | None
    """Link type of a classic pcap file; for pcapng the first interface's, once seen."""
    snaplen: int
    """Snapshot length of a classic pcap file (0 for pcapng)."""
    truncated: CaptureError | None
    """Set when the file ended in the middle of a record or block (not raised unless
    ``strict``); every whole packet before it has been yielded."""

    def __init__(
        self,
        source: str | os.PathLike[str] | ReadableBinary,
        *,
        linktypes: frozenset[int] | set[int] | None = SUPPORTED_LINKTYPES,
        strict: bool = False,
        chunk_size: int = _DEFAULT_CHUNK,
    ) -> None:
        if isinstance(source, (str, os.PathLike)):
            self.name = os.fspath(source)
            self._file: ReadableBinary = open(self.name, "rb", buffering=0)  # noqa: SIM115
            self._owns = True
        else:
            self.name = str(getattr(source, "name", "<stream>"))
            self._file = source
            self._owns = False
        self._linktypes = None if linktypes is None else frozenset(linktypes)
        self._strict = strict
        self._chunk = max(int(chunk_size), 4096)
        self._buf = bytearray()
        self._end = 0
        self._base = 0  # file offset of self._buf[0]
        self._eof = False
        self._started = False
        self.linktype = None
        self.snaplen = 0
        self.truncated = None
        self.nanosecond = False
        try:
            self._read_header()
        except BaseException:
            self.close()
            raise

    # --- plumbing ------------------------------------------------------------------

    def _error(self, offset: int, what: str) -> CaptureError:
        return CaptureError(f"{self.name}: byte {offset}: {what}")

    def _fill(self, pos: int, need: int) -> int:
        """Make ``need`` bytes from ``pos`` available; return the new ``pos`` (0).

        Starts a fresh buffer (so views handed out earlier stay intact) holding the
        unconsumed tail, then reads until ``need`` bytes are there or the file ends.
        """
        old = self._buf
        rem = self._end - pos
        size = max(self._chunk, need)
        buf = bytearray(size)
        if rem:
            buf[:rem] = memoryview(old)[pos : self._end]
        self._base += pos
        end = rem
        view = memoryview(buf)
        readinto = self._file.readinto
        while end < need and not self._eof:
            n = readinto(view[end:])
            if not n:  # 0 (EOF) or None (non-blocking, nothing yet: treat as EOF)
                self._eof = True
                break
            end += n
        view.release()
        self._buf = buf
        self._end = end
        return 0

    def _cut(self, pos: int, what: str) -> None:
        """The file ended inside a record: remember (or raise) it."""
        err = self._error(self._base + pos, what)
        if self._strict:
            raise err
        self.truncated = err

    def _check_linktype(self, offset: int, linktype: int, what: str) -> None:
        if self._linktypes is not None and linktype not in self._linktypes:
            raise self._error(offset, f"{what} has unsupported link type {linktype}")

    # --- header --------------------------------------------------------------------

    def _read_header(self) -> None:
        self._fill(0, _PCAP_HDR_LEN)
        end = self._end
        buf = self._buf
        if end == 0:
            raise self._error(0, "empty file (0 bytes), not a capture file")
        magic = bytes(buf[: min(4, end)])
        if magic in _PCAP_MAGICS:
            self.format = "pcap"
            bo, units = _PCAP_MAGICS[magic]
            if end < _PCAP_HDR_LEN:
                raise self._error(
                    0, f"truncated pcap file header: need {_PCAP_HDR_LEN} bytes, have {end}"
                )
            self._s = _STRUCTS[bo]
            _vmaj, _vmin, _zone, _sigfigs, snaplen, network = self._s["pcap_hdr"].unpack_from(
                buf, 4
            )
            self.nanosecond = units == _NS
            self.snaplen = snaplen
            self.linktype = network & 0xFFFF  # upper bits: FCS length flags
            self._check_linktype(20, self.linktype, "file")
            self._pos = _PCAP_HDR_LEN
            self._limit = min(4 * max(snaplen, 65535), _PCAP_MAX_RECORD)
            return
        if magic == _PCAPNG_SHB:
            self.format = "pcapng"
            if end < 12:
                raise self._error(0, f"truncated pcapng section header: need 12 bytes, have {end}")
            self._s = _STRUCTS["<"]  # replaced by the first SHB's byte order
            self._ifaces: list[_Iface] = []
            self._snaplens: list[int] = []
            self._pos = 0
            return
        if magic in _PCAP_MODIFIED_MAGICS:
            raise self._error(0, "unsupported capture format (Kuznetzov modified pcap)")
        raise self._error(0, f"unknown magic 0x{magic.hex()}: not a pcap or pcapng file")

    # --- iteration -----------------------------------------------------------------

    def __iter__(self) -> Iterator[Packet]:
        if self._started:
            raise RuntimeError("a CaptureReader can be iterated only once")
        self._started = True
        if self.format == "pcap":
            return self._iter_pcap()
        return self._iter_pcapng()

    def _iter_pcap(self) -> Iterator[Packet]:
        unpack = self._s["pcap_rec"].unpack_from
        linktype = self.linktype
        assert linktype is not None
        frac_mul = 1 if self.nanosecond else 1000
        limit = self._limit
        pos = self._pos
        buf = self._buf
        end = self._end
        mv = memoryview(buf).toreadonly()
        while True:
            # Fast path: whole records already in the buffer.
            while end - pos >= 16:
                sec, frac, incl, orig = unpack(buf, pos)
                start = pos + 16
                nxt = start + incl
                if nxt > end or incl > limit:
                    break
                yield (sec * 1_000_000_000 + frac * frac_mul, linktype, mv[start:nxt], orig)
                pos = nxt
            # Slow path: refill, check, end.
            if end - pos >= 16:
                incl = unpack(buf, pos)[2]
                if incl > limit:
                    raise self._error(
                        self._base + pos,
                        f"record length {incl} exceeds {limit}"
                        f" (4 * max(snaplen {self.snaplen}, 65535))",
                    )
                need = 16 + incl
            else:
                need = 16
            pos = self._fill(pos, need)
            buf = self._buf
            end = self._end
            mv = memoryview(buf).toreadonly()
            if end < need:
                if end:
                    if need == 16:
                        what = f"last record header cut off ({end} of 16 bytes)"
                    else:
                        what = f"last record cut off ({end - 16} of {need - 16} data bytes)"
                    self._cut(pos, what)
                return

    def _iter_pcapng(self) -> Iterator[Packet]:
        s = self._s
        bhdr = s["blk"].unpack_from
        u32 = s["u32"].unpack_from
        epb = s["epb"].unpack_from
        epb_full = s["epb_full"].unpack_from
        ifaces = self._ifaces
        nif = 0
        pos = self._pos
        buf = self._buf
        end = self._end
        mv = memoryview(buf).toreadonly()
        while True:
            # Fast path: Enhanced Packet Blocks already whole in the buffer.
            while end - pos >= 32:
                btype, blen, ifid, hi, lo, cap, orig = epb_full(buf, pos)
                nxt = pos + blen
                if (
                    btype != 6
                    or nxt > end
                    or blen & 3
                    or cap > blen - 32
                    or ifid >= nif
                    or u32(buf, nxt - 4)[0] != blen
                ):
                    break
                linktype, mul, div, off = ifaces[ifid]
                start = pos + 28
                yield (
                    ((hi << 32) | lo) * mul // div + off,
                    linktype,
                    mv[start : start + cap],
                    orig,
                )
                pos = nxt

            # Slow path: one block of any type, every check, refills.
            if end - pos < 12:
                pos = self._fill(pos, 12)
                buf = self._buf
                end = self._end
                mv = memoryview(buf).toreadonly()
                if end == 0:
                    return
            offset = self._base + pos
            is_shb = buf[pos : pos + 4] == _PCAPNG_SHB
            header = 12 if is_shb else 8  # the SHB's length needs its byte-order magic
            if end - pos < header:
                self._cut(pos, f"last block header cut off ({end - pos} of {header} bytes)")
                return
            if is_shb:
                bom = bytes(buf[pos + 8 : pos + 12])
                if bom not in _PCAPNG_BOM:
                    raise self._error(
                        offset + 8, f"bad section header byte-order magic 0x{bom.hex()}"
                    )
                s = _STRUCTS[_PCAPNG_BOM[bom]]
                bhdr = s["blk"].unpack_from
                u32 = s["u32"].unpack_from
                epb = s["epb"].unpack_from
                epb_full = s["epb_full"].unpack_from
                self._s = s
            btype, blen = bhdr(buf, pos)
            if blen < 12 or blen & 3 or blen > _NG_MAX_BLOCK:
                raise self._error(
                    offset + 4,
                    f"corrupt block length {blen} (block type 0x{btype:08x}):"
                    f" must be a multiple of 4 between 12 and {_NG_MAX_BLOCK}",
                )
            if end - pos < blen:
                pos = self._fill(pos, blen)
                buf = self._buf
                end = self._end
                mv = memoryview(buf).toreadonly()
                if end < blen:
                    self._cut(
                        pos,
                        f"last block cut off ({end} of {blen} bytes, block type 0x{btype:08x})",
                    )
                    return
            nxt = pos + blen
            trailer = u32(buf, nxt - 4)[0]
            if trailer != blen:
                raise self._error(
                    offset + blen - 4,
                    f"corrupt block: trailing length {trailer} != leading length {blen}"
                    f" (block type 0x{btype:08x})",
                )
            if btype in (_EPB_TYPE, _PB_TYPE):
                if blen < 32:
                    raise self._error(offset + 4, f"packet block too short ({blen} bytes)")
                if btype == _EPB_TYPE:
                    ifid, hi, lo, cap, orig = epb(buf, pos + 8)
                else:
                    ifid, _drops, hi, lo, cap, orig = s["pb"].unpack_from(buf, pos + 8)
                if cap > blen - 32:
                    raise self._error(
                        offset + 20,
                        f"captured length {cap} exceeds the block ({blen} bytes)",
                    )
                if ifid >= nif:
                    raise self._error(
                        offset + 8,
                        f"packet on interface {ifid} but only {nif} interface(s) described",
                    )
                linktype, mul, div, off = ifaces[ifid]
                start = pos + 28
                yield (
                    ((hi << 32) | lo) * mul // div + off,
                    linktype,
                    mv[start : start + cap],
                    orig,
                )
            elif btype == _SPB_TYPE:
                if blen < 16:
                    raise self._error(offset + 4, f"simple packet block too short ({blen} bytes)")
                if nif == 0:
                    raise self._error(offset, "simple packet block before any interface")
                orig = u32(buf, pos + 8)[0]
                cap = min(orig, blen - 16)
                snap = self._snaplens[0]
                if snap:
                    cap = min(cap, snap)
                yield (0, ifaces[0][0], mv[pos + 12 : pos + 12 + cap], orig)
            elif btype == _IDB_TYPE:
                ifaces.append(self._parse_idb(pos, blen, nif))
                nif += 1
            elif btype == _SHB_TYPE:
                if blen < 28:
                    raise self._error(offset + 4, f"section header block too short ({blen})")
                major = s["shb"].unpack_from(buf, pos + 12)[0]
                if major != 1:
                    raise self._error(offset + 12, f"unsupported pcapng major version {major}")
                ifaces.clear()
                self._snaplens = []
                nif = 0
            # any other block type: skipped
            pos = nxt

    def _parse_idb(self, pos: int, blen: int, ifid: int) -> _Iface:
        offset = self._base + pos
        if blen < 20:
            raise self._error(offset + 4, f"interface description block too short ({blen})")
        buf = self._buf
        s = self._s
        linktype, _reserved, snaplen = s["idb"].unpack_from(buf, pos + 8)
        self._check_linktype(offset + 8, linktype, f"interface {ifid}")
        tsresol = 6
        tsoffset = 0
        opt = pos + 16
        stop = pos + blen - 4
        unpack_opt = s["opt"].unpack_from
        while opt + 4 <= stop:
            code, olen = unpack_opt(buf, opt)
            if code == _OPT_END:
                break
            value = opt + 4
            if value + olen > stop:
                raise self._error(
                    self._base + opt,
                    f"interface {ifid} option {code} length {olen} runs past the block",
                )
            if code == _OPT_IF_TSRESOL and olen >= 1:
                tsresol = buf[value]
            elif code == _OPT_IF_TSOFFSET and olen >= 8:
                tsoffset = s["i64"].unpack_from(buf, value)[0]
            opt = value + ((olen + 3) & ~3)
        if (tsresol & 0x80 == 0 and tsresol > 30) or (tsresol & 0x7F) > 64:
            raise self._error(offset, f"interface {ifid} if_tsresol {tsresol} out of range")
        mul, div = _ts_factors(tsresol)
        if self.linktype is None:
            self.linktype = linktype
        if ifid == 0:
            self._snaplens = [snaplen]
        else:
            self._snaplens.append(snaplen)
        return linktype, mul, div, tsoffset * _NS

    # --- resource handling -----------------------------------------------------------

    def close(self) -> None:
        """Close the file if the reader opened it (a caller's file object is left open)."""
        if self._owns:
            self._file.close()

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_packets(
    source: str | os.PathLike[str] | ReadableBinary,
    *,
    linktypes: frozenset[int] | set[int] | None = SUPPORTED_LINKTYPES,
    strict: bool = True,
) -> Iterator[Packet]:
    """Yield every packet of a capture file, closing it at the end.

    Convenience wrapper around :class:`CaptureReader` — strict by default, so a cut
    last record raises :class:`CaptureError` after the packets before it.
    """
    with CaptureReader(source, linktypes=linktypes, strict=strict) as reader:
        yield from reader
