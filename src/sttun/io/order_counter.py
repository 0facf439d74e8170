"""Ordering counters shared by a tc program and the Python reader behind it.

A fast-path program that leaves some frames of a stream to Python and takes the
others itself must not let a frame it takes overtake one it left to Python.  Both
programs (transmit: per tunnel TAP; receive: per underlay) therefore count, with an
atomic add in an ``mmap()``able array map, every frame they leave to Python
(``passed``), and take one themselves only while Python has accounted for all of them
(``consumed``); :class:`OrderCounter` is Python's side of one such pair.
"""

from __future__ import annotations

#: How long the queue must have stayed empty, with no frame read, before the reader
#: forgives frames the program counted but the reader never got (dropped by a full
#: queue, or queued before the program was attached).  A frame the program has
#: just counted can still be on its way into the queue for a few microseconds;
#: this is far longer.
RESYNC_AFTER = 0.005


class OrderCounter:
    """One pair of ordering counters, shared with a program: a tunnel TAP's (the
    transmit program, slot per tunnel) or an underlay's (the receive program).

    The program counts every frame it leaves to Python (``passed``) and takes a
    frame itself only while Python has handled all of them (``consumed ==
    passed``), so no frame overtakes one still queued for Python's reader.  The
    reader calls :meth:`done` after each frame it read has been handled (sent,
    delivered or dropped) and :meth:`drained` whenever its queue had nothing more
    to read.

    Frames the reader never gets (a full queue dropped them; they were queued
    before the program was attached) would keep the counters apart for good.  So
    :meth:`drained` remembers ``passed`` when it first finds them apart, and sets
    ``consumed`` to that remembered value once the queue has been found empty again
    :data:`RESYNC_AFTER` seconds later with no frame read in between: every frame
    counted by then has had ample time to reach the queue, and was not read.  (Taking
    ``passed`` at the empty read itself would forgive a frame the program has just
    counted but not yet queued, and the next frame could overtake it.)
    """

    __slots__ = ("_consumed", "_mv", "_passed", "_snapshot")

    def __init__(self, view: memoryview, slot: int) -> None:
        self._mv = view
        self._passed = 2 * slot
        self._consumed = 2 * slot + 1
        self._snapshot: tuple[int, int, float] | None = None

    def done(self) -> None:
        """One more frame read from the queue has been handled (or dropped)."""
        self._mv[self._consumed] += 1

    def drained(self, now: float) -> None:
        """The queue had nothing more to read at monotonic time ``now``."""
        mv = self._mv
        passed = mv[self._passed]
        consumed = mv[self._consumed]
        if passed == consumed:
            self._snapshot = None
            return
        snap = self._snapshot
        if snap is None or snap[1] != consumed:
            self._snapshot = (passed, consumed, now)
        elif now - snap[2] >= RESYNC_AFTER:
            mv[self._consumed] = snap[0]
            self._snapshot = None

    def lagging(self) -> bool:
        """True while the program counts frames the reader has not accounted for."""
        return bool(self._mv[self._passed] != self._mv[self._consumed])


#: Receive order buckets per underlay (a power of two): packets are ordered within
#: the bucket of their outer TCP source port, which STT senders derive from the inner
#: flow, so one flow's pieces hold back only the flows that share its bucket.
RX_ORDER_BUCKETS = 64


def rx_order_bucket(sport: int) -> int:
    """The receive-order bucket of a packet with outer TCP source port ``sport``
    (the receive program computes the same)."""
    return sport & (RX_ORDER_BUCKETS - 1)


class BucketOrder:
    """The receive program's ordering counters of one underlay: an
    :class:`OrderCounter` per bucket of the outer source port (:func:`rx_order_bucket`).

    The data path calls :meth:`done` with each received packet's outer source port
    and :meth:`drained` when a socket had nothing more to read.
    """

    __slots__ = ("_consumed", "_counters", "_passed")

    def __init__(self, view: memoryview) -> None:
        self._counters = [OrderCounter(view, b) for b in range(RX_ORDER_BUCKETS)]
        # every bucket's passed and consumed side by side: one comparison (in C) says
        # whether any bucket is apart
        self._passed = view[0 : 2 * RX_ORDER_BUCKETS : 2]
        self._consumed = view[1 : 2 * RX_ORDER_BUCKETS : 2]

    def done(self, sport: int) -> None:
        """One more packet with outer source port ``sport`` has been handled."""
        self._counters[sport & (RX_ORDER_BUCKETS - 1)].done()

    def drained(self, now: float) -> None:
        """The underlay's socket had nothing more to read at monotonic time ``now``."""
        if self._passed == self._consumed:
            return
        for c in self._counters:
            c.drained(now)

    def lagging(self) -> bool:
        """True while some bucket counts packets the reader has not accounted for."""
        return bool(self._passed != self._consumed)

    def release(self) -> None:
        """Let go of the views (before the mapping is closed)."""
        self._passed.release()
        self._consumed.release()
