"""The ``bpf()`` system call through ctypes: maps, program loading, TCX links, queries.

No toolchain and no library beyond libc: each command fills the few fields of
``union bpf_attr`` it needs (offsets from ``include/uapi/linux/bpf.h``; the rest of
the attribute block stays zero, which the kernel requires) and calls ``syscall(2)``.
Failures raise :class:`OSError` with the kernel's errno; a program the verifier
refuses raises :class:`VerifierError` carrying the verifier's log.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

# Commands (enum bpf_cmd).
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
# Map types (enum bpf_map_type).
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
#: ``map_flags``: an array map that user space may mmap() (Linux >= 5.5).
BPF_F_MMAPABLE = 1 << 10
# Program types (enum bpf_prog_type).
BPF_PROG_TYPE_SCHED_CLS = 3
# Attach types (enum bpf_attach_type); TCX since Linux 6.6.
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
# BPF_MAP_UPDATE_ELEM flags.
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

#: Size of the attribute block passed to the kernel (larger than any command needs;
#: the kernel accepts a longer block whose tail is zero).
ATTR_SIZE = 160
#: Verifier log buffer for a failed load (the kernel truncates longer logs).
LOG_SIZE = 1 << 20

_SYSCALL_NR = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "riscv64": 280, "ppc64le": 361}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class VerifierError(OSError):
    """``BPF_PROG_LOAD`` failed; :attr:`log` holds the verifier's explanation."""

    def __init__(self, errno: int, log: str) -> None:
        super().__init__(errno, os.strerror(errno))
        self.log = log

    @property
    def summary(self) -> str:
        """The last non-empty line of the log (usually the reason), or the errno text."""
        for line in reversed(self.log.splitlines()):
            if line.strip() and not line.startswith("processed "):
                return line.strip()
        return os.strerror(self.errno or 0)

    def __str__(self) -> str:
        return f"program rejected ({os.strerror(self.errno or 0)}): {self.summary}"


def syscall_number() -> int:
    """The ``bpf`` system call number on this machine (OSError if unknown)."""
    nr = _SYSCALL_NR.get(platform.machine())
    if nr is None:
        raise OSError(38, f"bpf(): unknown system call number on {platform.machine()}")
    return nr


def bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    """Run one ``bpf()`` command; returns its result (a fd or 0), raises OSError."""
    ret = _libc.syscall(
        ctypes.c_long(syscall_number()), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr))
    )
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return int(ret)


def _attr() -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(ATTR_SIZE)


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return 0 if buf is None else ctypes.addressof(buf)


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, name: str, flags: int = 0
) -> int:
    """Create a map (``flags``: ``map_flags``, e.g. :data:`BPF_F_MMAPABLE`); returns its
    file descriptor."""
    attr = _attr()
    struct.pack_into("<IIIII", attr, 0, map_type, key_size, value_size, max_entries, flags)
    struct.pack_into("16s", attr, 28, name.encode()[:15])
    return bpf(BPF_MAP_CREATE, attr)


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """Insert or replace ``key`` -> ``value``."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    attr = _attr()
    struct.pack_into("<IxxxxQQQ", attr, 0, fd, _addr(k), _addr(v), flags)
    bpf(BPF_MAP_UPDATE_ELEM, attr)


def _map_elem(
    cmd: int,
    fd: int,
    key: ctypes.Array[ctypes.c_char] | None,
    out: ctypes.Array[ctypes.c_char] | None = None,
) -> bool:
    """One map command on ``key`` (``out``: the value or next key it fills);
    False when the key is not there (``ENOENT``), other errors raise."""
    attr = _attr()
    struct.pack_into("<IxxxxQQ", attr, 0, fd, _addr(key), _addr(out))
    try:
        bpf(cmd, attr)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_delete(fd: int, key: bytes) -> bool:
    """Delete ``key``; False if it was not there."""
    return _map_elem(BPF_MAP_DELETE_ELEM, fd, ctypes.create_string_buffer(key, len(key)))


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value stored under ``key`` (``value_size`` bytes; per-CPU maps return one
    8-byte-aligned slot per possible CPU), or None."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    return v.raw if _map_elem(BPF_MAP_LOOKUP_ELEM, fd, k, v) else None


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """Every key of a hash map (``BPF_MAP_GET_NEXT_KEY`` from no key on)."""
    keys: list[bytes] = []
    cur: ctypes.Array[ctypes.c_char] | None = None
    while True:
        nxt = ctypes.create_string_buffer(key_size)
        if not _map_elem(BPF_MAP_GET_NEXT_KEY, fd, cur, nxt):
            return keys
        keys.append(nxt.raw)
        cur = nxt


def prog_load(
    prog_type: int,
    insns: bytes,
    *,
    license: str = "Apache-2.0",
    name: str = "",
    expected_attach_type: int = 0,
) -> int:
    """Load a program; returns its fd.  Raises :class:`VerifierError` with the log.

    The load is tried first without a log (cheap); on failure once more with a log
    so the error can say why.
    """
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())

    def attempt(log: ctypes.Array[ctypes.c_char] | None) -> int:
        attr = _attr()
        struct.pack_into(
            "<IIQQIIQ",
            attr,
            0,
            prog_type,
            len(insns) // 8,
            _addr(code),
            _addr(lic),
            1 if log is not None else 0,
            len(log) if log is not None else 0,
            _addr(log),
        )
        struct.pack_into("16s", attr, 48, name.encode()[:15])
        struct.pack_into("<I", attr, 68, expected_attach_type)
        return bpf(BPF_PROG_LOAD, attr)

    try:
        return attempt(None)
    except OSError as first:
        if first.errno not in (13, 22, 7, 28):  # EACCES/EINVAL/E2BIG/ENOSPC: verifier
            raise
    log = ctypes.create_string_buffer(LOG_SIZE)
    try:
        return attempt(log)
    except OSError as e:
        text = log.value.decode(errors="replace")
        raise VerifierError(e.errno or 22, text) from None


def link_create(prog_fd: int, ifindex: int, attach_type: int) -> int:
    """``BPF_LINK_CREATE``: attach ``prog_fd`` to ``ifindex``; returns the link fd.

    A TCX link lives as long as a file descriptor refers to it: closing it (or the
    process dying) detaches the program.
    """
    attr = _attr()
    struct.pack_into("<IIII", attr, 0, prog_fd, ifindex, attach_type, 0)
    return bpf(BPF_LINK_CREATE, attr)


def prog_query(ifindex: int, attach_type: int, max_progs: int = 64) -> list[int]:
    """IDs of the programs attached at ``ifindex`` / ``attach_type`` (``BPF_PROG_QUERY``)."""
    ids = (ctypes.c_uint32 * max_progs)()
    attr = _attr()
    struct.pack_into(
        "<IIIIQI", attr, 0, ifindex, attach_type, 0, 0, ctypes.addressof(ids), max_progs
    )
    bpf(BPF_PROG_QUERY, attr)
    (count,) = struct.unpack_from("<I", attr, 24)
    return list(ids[: min(count, max_progs)])


def prog_id(prog_fd: int) -> int:
    """The kernel's id of a loaded program (``BPF_OBJ_GET_INFO_BY_FD``)."""
    info = ctypes.create_string_buffer(256)
    attr = _attr()
    struct.pack_into("<IIQ", attr, 0, prog_fd, len(info), ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    (pid,) = struct.unpack_from("<I", info, 4)
    return int(pid)


def possible_cpus() -> int:
    """How many per-CPU slots a per-CPU map value has (``/sys/.../cpu/possible``)."""
    try:
        with open("/sys/devices/system/cpu/possible") as fh:
            text = fh.read().strip()
    except OSError:
        return os.cpu_count() or 1
    top = 0
    for part in text.split(","):
        hi = part.split("-")[-1]
        top = max(top, int(hi))
    return top + 1
