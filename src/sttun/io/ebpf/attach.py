"""Attaching a tc program at an interface's ingress or egress: a TCX link, or a
clsact filter.

* :func:`attach_tcx` (Linux >= 6.6): ``BPF_LINK_CREATE`` with ``BPF_TCX_INGRESS``
  (``BPF_TCX_EGRESS`` with ``egress=True``).
  The link is owned by its file descriptor: closing it, or the process dying, takes
  the program off the interface.
* :func:`attach_tc` (older kernels): a clsact qdisc and a direct-action ``bpf``
  filter that refers to the program by fd, through pyroute2.  A filter outlives
  the process, so it is put in with a fixed priority and handle (:data:`TC_PRIO`),
  replacing whatever an earlier run left, and :meth:`TcFilter.detach` removes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

from sttun.io.ebpf.syscall import BPF_TCX_EGRESS, BPF_TCX_INGRESS, link_create, prog_query

log = logging.getLogger(__name__)

#: tc filter priority and handle of sttun's ingress filter (an arbitrary pair; one
#: sttun program per interface).
TC_PRIO = 0x5354  # "ST"
TC_HANDLE = 1
TC_NAME = "sttun_rx"
TC_NAME_EGRESS = "sttun_tx"
_INGRESS_PARENT = 0xFFFFFFF2  # TC_H_CLSACT:TC_H_MIN_INGRESS
_EGRESS_PARENT = 0xFFFFFFF3  # TC_H_CLSACT:TC_H_MIN_EGRESS
_ETH_P_ALL = 0x0003


@dataclass
class TcxLink:
    """A program attached with a TCX link; :meth:`detach` closes the link."""

    ifindex: int
    link_fd: int
    mode: str = field(default="tcx", init=False)

    def detach(self) -> None:
        """Take the program off the interface (idempotent)."""
        if self.link_fd >= 0:
            os.close(self.link_fd)
            self.link_fd = -1


@dataclass
class TcFilter:
    """A program attached as a clsact ingress (or egress) ``bpf`` filter."""

    ifindex: int
    egress: bool = False
    mode: str = field(default="tc", init=False)
    attached: bool = True

    def detach(self) -> None:
        """Delete the filter (idempotent; an interface that is gone is fine)."""
        if not self.attached:
            return
        self.attached = False
        from pyroute2 import IPRoute

        with IPRoute() as ipr, contextlib.suppress(Exception):
            ipr.tc(
                "del-filter",
                "bpf",
                self.ifindex,
                TC_HANDLE,
                parent=_EGRESS_PARENT if self.egress else _INGRESS_PARENT,
                prio=TC_PRIO,
                protocol=_ETH_P_ALL,
            )


def attach_tcx(prog_fd: int, ifindex: int, *, egress: bool = False) -> TcxLink:
    """Attach at ``ifindex``'s ingress (egress) with a TCX link (OSError if the kernel
    cannot)."""
    kind = BPF_TCX_EGRESS if egress else BPF_TCX_INGRESS
    return TcxLink(ifindex, link_create(prog_fd, ifindex, kind))


def attach_tc(prog_fd: int, ifindex: int, *, egress: bool = False) -> TcFilter:
    """Attach as a direct-action clsact filter at the ingress (egress), replacing an
    earlier sttun filter there.

    Raises OSError (or pyroute2's NetlinkError, an OSError) when tc refuses.
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            ipr.tc("add", "clsact", ifindex)
        except NetlinkError as e:
            if e.code != 17:  # EEXIST: the qdisc is there already
                raise
        ipr.tc(
            "replace-filter",
            "bpf",
            ifindex,
            TC_HANDLE,
            fd=prog_fd,
            name=TC_NAME_EGRESS if egress else TC_NAME,
            parent=_EGRESS_PARENT if egress else _INGRESS_PARENT,
            prio=TC_PRIO,
            protocol=_ETH_P_ALL,
            classid=1,
            direct_action=True,
        )
    return TcFilter(ifindex, egress)


def attach_auto(
    prog_fd: int, ifindex: int, mode: str = "auto", *, egress: bool = False
) -> TcxLink | TcFilter:
    """Attach at the ingress (egress): ``mode`` ``"tcx"``, ``"tc"``, or ``"auto"``
    (a TCX link, else - the kernel does not know TCX, before 6.6 - a tc filter).
    Raises OSError when the kernel refuses."""
    if mode in ("auto", "tcx"):
        try:
            return attach_tcx(prog_fd, ifindex, egress=egress)
        except OSError as e:
            # EINVAL/EOPNOTSUPP/ENOTSUPP: the kernel does not know the TCX attach type
            if mode == "tcx" or e.errno not in (22, 95, 524):
                raise
            log.info("TCX not available (%s): attaching with a tc filter", e.strerror)
    return attach_tc(prog_fd, ifindex, egress=egress)


def tcx_ingress_programs(ifindex: int) -> list[int]:
    """IDs of the programs attached to ``ifindex``'s TCX ingress (empty if none)."""
    return prog_query(ifindex, BPF_TCX_INGRESS)


def tcx_egress_programs(ifindex: int) -> list[int]:
    """IDs of the programs attached to ``ifindex``'s TCX egress (empty if none)."""
    return prog_query(ifindex, BPF_TCX_EGRESS)


def tc_ingress_filter_names(ifindex: int) -> list[str]:
    """Names of the ``bpf`` filters on ``ifindex``'s clsact ingress."""
    from pyroute2 import IPRoute

    names: list[str] = []
    with IPRoute() as ipr:
        try:
            filters = ipr.get_filters(index=ifindex, parent=_INGRESS_PARENT)
        except OSError:
            return names
        for msg in filters:
            opts = msg.get_attr("TCA_OPTIONS")
            if opts is not None and msg.get_attr("TCA_KIND") == "bpf":
                name = opts.get_attr("TCA_BPF_NAME")
                if name:
                    names.append(str(name))
    return names
