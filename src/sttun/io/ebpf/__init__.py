"""Kernel receive fast path: an eBPF tc program generated in Python, loaded with bpf().

* :mod:`sttun.io.ebpf.asm` - a small eBPF assembler;
* :mod:`sttun.io.ebpf.syscall` - the ``bpf()`` system call through ctypes;
* :mod:`sttun.io.ebpf.program` - the tc ingress program (what it accepts and why);
* :mod:`sttun.io.ebpf.attach` - TCX links and the tc clsact fallback.

The daemon uses :class:`sttun.io.rx_fastpath.RxFastPath`.
"""
