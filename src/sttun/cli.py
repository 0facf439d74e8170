"""The ``sttun`` command: run an endpoint, look at one, and work on STT captures.

Importing this module is cheap on purpose: every subcommand imports what it needs
(pyroute2, prometheus_client, rich, the data path) only when it runs.

Exit status: 0 success, 1 runtime failure, 2 usage or configuration error,
130 interrupted.  A user's mistake ends with one ``sttun: error: ...`` line on
stderr, never a traceback (``--debug`` shows tracebacks of internal errors).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from sttun import __version__
from sttun.daemon.config_keys import DAEMON_KEYS, MAX_KEY, TUNNEL_KEYS
from sttun.wire.stt import STT_PORT

PROG = "sttun"
EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a closed pipe

ROOT_REASON = "CAP_NET_ADMIN needed for TAP and AF_PACKET"


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------
# argument types (the tools get ready-made ints)


def _context_id(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_KEY:
        raise argparse.ArgumentTypeError(f"expected an integer 0..{MAX_KEY}, got {text!r}")
    return value


def _ranged(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            value = lo - 1
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer {lo}..{hi}, got {text!r}")
        return value

    parse.__name__ = f"integer {lo}..{hi}"
    return parse


_port = _ranged(1, 65535)


# --------------------------------------------------------------------------------
# the parser

_UP_EPILOG = """\
examples:
  sttun up -c /etc/sttun/sttun.toml
  sttun up --local-ip 198.18.0.1 --remote-ip 198.18.0.2 --key 0x1234 --dev stt0
  sttun up --local-ip 2001:db8:0:1::1 --remote-ip 2001:db8:0:1::2 --key 7 \\
           --metrics '[::1]:9100' --log-format json
  sttun up -c sttun.toml --check        # validate the file and exit

{file_keys}
Runs in the foreground until SIGINT/SIGTERM; SIGHUP reloads the file.
Needs root (CAP_NET_ADMIN, CAP_NET_RAW) for TAP devices, AF_PACKET and nftables.
"""

_SHOW_EPILOG = """\
examples:
  sttun show
  sttun show --json | jq '.tunnels[] | {name, rx}'
  sttun show --instance tenant2
"""

_DECAP_EPILOG = f"""\
examples:
  sttun decap capture.pcap -o inner.pcap
  sttun decap capture.pcapng -o inner.pcap --context-id 0x1234 --port {STT_PORT}
  sttun decap capture.pcap --split-by-context out/   # out/ctx-<hex id>.pcap
  sttun decap capture.pcap -o inner.pcap --json      # summary as JSON on stdout
"""

_ENCAP_EPILOG = """\
examples:
  sttun encap inner.pcap -o stt.pcap --src 198.18.0.1 --dst 198.18.0.2 --context-id 0x1234
  sttun encap inner.pcap -o stt.pcap --src 2001:db8:0:1::1 --dst 2001:db8:0:1::2 \\
              --ipv6 --context-id 7 --mtu 9000 --sport-hash
"""

_INSPECT_EPILOG = f"""\
examples:
  sttun inspect capture.pcap
  sttun inspect capture.pcapng --json --port {STT_PORT} --port {STT_PORT + 1}
"""

_DEMO_EPILOG = """\
examples:
  sttun demo               # build, test, report and tear down
  sttun demo --keep        # leave the namespaces up to play with
  sttun demo --down        # remove what a --keep run left
  sttun demo --ipv6 --mtu 9000
  sttun demo --ovs         # Open vSwitch type=stt ports served by sttun up --ovsdb
Creates two network namespaces joined by a veth pair (underlay 198.18.0.0/15 or
2001:db8:0:1::/64), an STT tunnel between them, then runs ping, a bulk transfer
and a wire check.  Needs root.
"""


def _help_width() -> int:
    """Help text width as argparse computes it (terminal columns - 2), without
    ``shutil``: argparse imports it in every formatter it makes, which is start-up
    time every command pays (argparse makes a formatter per ``add_argument``)."""
    global _HELP_WIDTH
    if _HELP_WIDTH is None:
        columns = 0
        with contextlib.suppress(ValueError):
            columns = int(os.environ.get("COLUMNS", "0"))
        if columns <= 0:
            try:
                columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
            except (AttributeError, ValueError, OSError):
                columns = 80
        _HELP_WIDTH = max(columns - 2, 20)
    return _HELP_WIDTH


_HELP_WIDTH: int | None = None


def _formatter(prog: str) -> argparse.HelpFormatter:
    """The help formatter of the ``sttun`` parser."""
    return argparse.HelpFormatter(prog, width=_help_width())


def _raw_formatter(prog: str) -> argparse.HelpFormatter:
    """The help formatter of the subcommands (their descriptions are pre-wrapped)."""
    return argparse.RawDescriptionHelpFormatter(prog, width=_help_width())


def _subparser(
    sub: Any, name: str, help_text: str, description: str, epilog: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help_text,
        description=textwrap.fill(description, 78),
        epilog=epilog,
        formatter_class=_raw_formatter,
    )
    return parser


def _file_keys_text() -> str:
    """The paragraph of ``sttun up --help`` that lists the file's tunnel keys."""
    keys = ", ".join(
        f"{k.name} (what {k.flag} sets)" if k.name == "name" else k.name for k in TUNNEL_KEYS
    )
    return textwrap.fill(
        f"The file holds a [daemon] table and one [[tunnel]] table per tunnel: {keys}.  "
        "See docs/configuration.md.",
        78,
    )


def _add_up(sub: Any) -> None:
    p = _subparser(
        sub,
        "up",
        "run an STT endpoint (foreground daemon)",
        "Run an STT tunnel endpoint: one or more tunnels from a TOML file (-c), "
        "or one tunnel described by flags.",
        _UP_EPILOG.format(file_keys=_file_keys_text()),
    )
    p.add_argument("-c", "--config", metavar="FILE.toml", help="configuration file")
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the configuration as `up` would, print it and exit",
    )
    tunnel = p.add_argument_group("one tunnel (instead of -c)")
    for key in TUNNEL_KEYS:
        key.add_flag(tunnel)
    daemon = p.add_argument_group("daemon (override the file's [daemon] table)")
    for key in DAEMON_KEYS:
        key.add_flag(daemon)
    p.set_defaults(func=_cmd_up)


def _add_show(sub: Any) -> None:
    p = _subparser(
        sub,
        "show",
        "show a running endpoint's tunnels and counters",
        "Ask a running `sttun up` for its tunnels, counters, drops and reassembly state.",
        _SHOW_EPILOG,
    )
    p.add_argument("--json", action="store_true", help="print the raw data as JSON")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--instance", metavar="NAME", help="the daemon's instance name (default: sttun)"
    )
    where.add_argument("--control-socket", metavar="PATH", help="the daemon's control socket")
    p.add_argument(
        "--timeout", type=float, default=5.0, metavar="S", help="seconds to wait (default: 5)"
    )
    p.set_defaults(func=_tool("show"))


def _add_port_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--port",
        metavar="P",
        type=_port,
        action="append",
        help=f"STT destination port (repeatable; default: {STT_PORT})",
    )


def _add_verify_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-verify-checksum",
        dest="verify_checksum",
        action="store_false",
        help="do not check outer TCP checksums (captures taken on the sending host, where "
        "NIC offload has not filled them in yet)",
    )


def _add_jobs_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-j",
        "--jobs",
        metavar="N",
        type=int,
        choices=(1, 2),
        help="processes: 2 verifies most TCP checksums in a second process, ahead of "
        "the scan (the default with two or more CPUs, for capture files of 4 MiB or "
        "more); 1 does everything in one",
    )


def _add_tools(sub: Any) -> None:
    p = _subparser(
        sub,
        "decap",
        "extract the inner frames of an STT capture",
        "Reassemble the STT frames in a pcap/pcapng capture and write their inner "
        "Ethernet frames to a pcap file.",
        _DECAP_EPILOG,
    )
    p.add_argument("input", metavar="IN", help="capture file (pcap or pcapng)")
    p.add_argument("-o", "--output", metavar="OUT", help="pcap file for the inner frames")
    p.add_argument(
        "--context-id",
        metavar="K",
        type=_context_id,
        action="append",
        help="keep only this context id (repeatable; default: all)",
    )
    _add_port_flag(p)
    p.add_argument(
        "--split-by-context", metavar="DIR", help="write one pcap per context id into DIR"
    )
    _add_verify_flag(p)
    p.add_argument(
        "--keep-partial",
        action="store_true",
        help="leave inner checksums that the sender left partial (P flag) as they are "
        "(default: complete them, so Wireshark shows them correct)",
    )
    _add_jobs_flag(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_tool("decap"), validate=_check_decap)

    p = _subparser(
        sub,
        "encap",
        "wrap the frames of a capture in STT",
        "Encapsulate every Ethernet frame of a capture in STT and write the segmented "
        "outer packets to a pcap file.",
        _ENCAP_EPILOG,
    )
    p.add_argument("input", metavar="IN", help="capture file of inner Ethernet frames")
    p.add_argument("-o", "--output", metavar="OUT", required=True, help="pcap file to write")
    p.add_argument("--src", metavar="A", required=True, help="outer source address")
    p.add_argument("--dst", metavar="B", required=True, help="outer destination address")
    p.add_argument(
        "--context-id", metavar="K", type=_context_id, required=True, help="64-bit context id"
    )
    p.add_argument(
        "--mtu",
        metavar="N",
        type=_ranged(68, 65535),
        default=1500,
        help="underlay MTU the segments must fit (default: 1500)",
    )
    p.add_argument("--ipv6", action="store_true", help="outer IPv6")
    sport = p.add_mutually_exclusive_group()
    sport.add_argument(
        "--sport-hash",
        action="store_true",
        help="source port from a hash of the inner flow (like OVS)",
    )
    sport.add_argument("--sport", metavar="N", type=_port, help="fixed source port")
    p.add_argument(
        "--dst-port",
        metavar="P",
        type=_port,
        default=STT_PORT,
        help=f"destination port (default: {STT_PORT})",
    )
    p.set_defaults(func=_tool("encap"))

    p = _subparser(
        sub,
        "inspect",
        "summarise an STT capture per context id",
        "Report per context id: frames, bytes, segments, offload flags, and every "
        "reassembly or decoding error in a capture.",
        _INSPECT_EPILOG,
    )
    p.add_argument("input", metavar="IN", help="capture file (pcap or pcapng)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_port_flag(p)
    _add_verify_flag(p)
    _add_jobs_flag(p)
    p.set_defaults(func=_tool("inspect"))

    p = _subparser(
        sub,
        "demo",
        "two namespaces, a tunnel, traffic and a report",
        "Build a two-namespace test bed with an STT tunnel, send traffic through it "
        "and report what happened.",
        _DEMO_EPILOG,
    )
    p.add_argument("--keep", action="store_true", help="leave the namespaces and tunnel up")
    p.add_argument("--down", action="store_true", help="tear down what a --keep run left")
    p.add_argument("--ipv6", action="store_true", help="IPv6 underlay")
    p.add_argument(
        "--ovs",
        action="store_true",
        help="Open vSwitch on each host: its old type=stt port served by sttun up --ovsdb",
    )
    p.add_argument(
        "--mtu",
        metavar="N",
        type=_ranged(68, 65000),
        default=1500,
        help="overlay (TAP) MTU (default: 1500)",
    )
    p.add_argument(
        "--no-offload",
        dest="offload",
        action="store_false",
        help="run the endpoints with --no-offload (Python segmentation)",
    )
    p.set_defaults(func=_tool("demo"), needs_root=True)


def build_parser() -> argparse.ArgumentParser:
    """The complete ``sttun`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Userspace STT (Stateless Transport Tunneling, draft-davie-stt-08) "
        "for stock Linux.",
        epilog="Run `sttun COMMAND --help` for each command's options and examples.",
        formatter_class=_formatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a traceback for internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_up(sub)
    _add_show(sub)
    _add_tools(sub)
    return parser


# --------------------------------------------------------------------------------
# commands


def _not_root(command: str) -> bool:
    if os.geteuid() != 0:
        print(f"{PROG}: error: {command} must be run as root ({ROOT_REASON})", file=sys.stderr)
        return True
    return False


def _cmd_up(ns: argparse.Namespace) -> int:
    # Reads and validates the configuration completely, the protocol core's own
    # rules included (config.validate_with_core), with or without --check.
    from sttun.daemon.config import config_from_args, describe_config

    config = config_from_args(ns)
    if ns.check:
        print(describe_config(config))
        return EXIT_OK
    if _not_root("up"):
        return EXIT_USAGE
    try:
        from sttun.daemon.endpoint import run
    except ImportError as e:
        _error(f"the endpoint is not available in this installation ({e})")
        return EXIT_RUNTIME
    return int(run(config))


def _check_decap(ns: argparse.Namespace) -> str | None:
    if ns.output is None and ns.split_by_context is None:
        return "decap needs -o OUT or --split-by-context DIR"
    return None


def _tool(name: str) -> Callable[[argparse.Namespace], int]:
    def run_tool(ns: argparse.Namespace) -> int:
        if getattr(ns, "needs_root", False) and _not_root(name):
            return EXIT_USAGE
        try:
            module = importlib.import_module(f"sttun.tools.{name}")
            entry = module.main
        except (ImportError, AttributeError) as e:
            _error(f"`sttun {name}` is not available in this installation ({e})")
            return EXIT_RUNTIME
        return int(entry(ns) or 0)

    run_tool.__name__ = f"run_{name}"
    return run_tool


# --------------------------------------------------------------------------------
# entry point


def _os_error_text(e: OSError) -> str:
    if e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return e.strerror or str(e)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sttun`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    from sttun.errors import ConfigError, SttError

    parser = build_parser()
    ns: argparse.Namespace | None = None
    try:
        try:
            ns = parser.parse_args(argv)
        except SystemExit as e:  # --help, --version, usage errors
            return (
                e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
            )
        validate = getattr(ns, "validate", None)
        if validate is not None:
            problem = validate(ns)
            if problem:
                _error(problem)
                return EXIT_USAGE
        result: int = ns.func(ns)
        return result
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout went away (`sttun show | head`): leave quietly, without a flush error at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except ConfigError as e:
        _error(str(e))
        return EXIT_USAGE
    except SttError as e:
        _error(str(e))
        return EXIT_RUNTIME
    except OSError as e:
        _error(_os_error_text(e))
        return EXIT_RUNTIME
    except Exception as e:
        if ns is not None and ns.debug:
            raise
        _error(f"internal error: {type(e).__name__}: {e} (run with --debug for a traceback)")
        return EXIT_RUNTIME
