"""Fuzz target ``config``: ``load_config`` / ``parse_config`` on any input.

Byte 0 picks the mode:

* text — the rest is written to a file and read with ``load_config`` (any bytes:
  not UTF-8, not TOML, TOML of any shape), and, when ``tomllib`` accepts it, the
  parsed document goes to ``parse_config`` as well;
* structured — the rest chooses a document made of the real ``[daemon]`` and
  ``[[tunnel]]`` keys (and misspelt ones) with values of every TOML type near
  and past their limits, written out as TOML and loaded.

Invariant: a :class:`~sttun.daemon.config.DaemonConfig` or a
:class:`~sttun.errors.ConfigError`; nothing else.  A config that loads must have
at least one tunnel, unique names and receive matches (local, remote, in_key),
an underlay MTU the core accepts, reassembly low water below high water, and
must pass :func:`~sttun.daemon.config.validate_with_core` again (what ``sttun up``
hands the core).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile
import tomllib

from fuzz.common import Input, Target, check, main
from sttun.core.encap import MIN_UNDERLAY_MTU
from sttun.daemon.config import DaemonConfig, load_config, parse_config, validate_with_core
from sttun.daemon.config_keys import DAEMON_KEYS, TUNNEL_KEYS
from sttun.errors import ConfigError

_DIR = tempfile.mkdtemp(prefix="sttun-fuzz-config-")
atexit.register(shutil.rmtree, _DIR, True)
_PATH = os.path.join(_DIR, "sttun.toml")

# the real keys (from the key table) and misspelt ones
_TUNNEL_KEYS = (*(k.name for k in TUNNEL_KEYS), "remot_ip", "Key")
_DAEMON_KEYS = (*(k.name for k in DAEMON_KEYS), "reassembly", "log-level")
_STRINGS = (
    "198.18.0.1", "198.18.0.2", "2001:db8:0:1::1", "2001:db8:0:1::2", "0.0.0.0", "::",
    "224.0.0.1", "ff02::1", "255.255.255.255", "stt0", "stt1", "br0", "a" * 16, "",
    "inherit", "info", "json", "text", "127.0.0.1:9100", "[::1]:9100", "4 MiB", "64KiB",
    "1 GiB", "3MiB", "0x10", "-1", "1e3", "nan", "inf", "\u00e9t\u00e9", "a/b", "sttun",
    "/run/sttun/x.sock", "/" + "x" * 120, "198.18.0.1:0", "1.2.3.4:65536", " 12 ",
    "9" * 4400, "9" * 4400 + " MiB", "99999999999999999999 GiB", "127.0.0.1:\u00b2",
)  # fmt: skip
_INTS = (
    0, 1, -1, 5, 63, 64, 67, 68, 255, 256, 300, 575, 576, 1279, 1280, 1500, 7471, 7472,
    65000, 65001, 65535,
    65536, 2**31, 2**32, 2**63 - 1, -(2**63), 3 * 1024 * 1024, 4 * 1024 * 1024,
)  # fmt: skip
_FLOATS = (0.0, -0.0, 0.001, 1.5, 30.0, 3600.0, 3600.5, 1e308, float("inf"), float("nan"))


def _toml_value(inp: Input, depth: int = 0) -> str:
    kind = inp.below(8)
    if kind == 0:
        return json.dumps(inp.pick(_STRINGS))  # a JSON string is a TOML basic string
    if kind == 1:
        return str(inp.pick(_INTS))
    if kind == 2:
        v = inp.pick(_FLOATS)
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(repr(v), repr(v))
    if kind == 3:
        return inp.pick(("true", "false"))
    if kind == 4 and depth < 3:
        return "[" + ", ".join(_toml_value(inp, depth + 1) for _ in range(inp.below(4))) + "]"
    if kind == 5 and depth < 3:
        items = (f"k{i} = {_toml_value(inp, depth + 1)}" for i in range(inp.below(3)))
        return "{" + ", ".join(items) + "}"
    if kind == 6:
        return inp.pick(("1979-05-27T07:32:00Z", "07:32:00", "0x1234", "0o17", "1_000", "9" * 4400))
    return json.dumps(inp.take(inp.below(16)).decode("latin-1"))


def _structured(inp: Input) -> str:
    lines = []
    if inp.boolean():
        lines.append("[daemon]")
        for _ in range(inp.below(6)):
            lines.append(f"{inp.pick(_DAEMON_KEYS)} = {_toml_value(inp)}")
    for i in range(inp.below(4)):
        lines.append("[[tunnel]]")
        # distinct names, so that several tunnels reach the core's receive-match rule
        base = {"name": f'"stt{i}"', "local_ip": '"198.18.0.1"', "remote_ip": '"198.18.0.2"'}
        if inp.below(4):
            base["key"] = "1"
        for _ in range(inp.below(6)):
            base[inp.pick(_TUNNEL_KEYS)] = _toml_value(inp)
        lines.extend(f"{k} = {v}" for k, v in base.items())
    if inp.below(8) == 0:
        lines.append(inp.pick(("tunnel = 5", "daemon = []", "[other]", "x = 1")))
    return "\n".join(lines) + "\n"


def _check_config(cfg: DaemonConfig) -> None:
    check(len(cfg.tunnels) >= 1, "config without tunnels accepted")
    check(len({t.name for t in cfg.tunnels}) == len(cfg.tunnels), "duplicate tunnel names")
    matches = {(t.local_ip, t.remote_ip, t.in_key) for t in cfg.tunnels}
    check(len(matches) == len(cfg.tunnels), "two tunnels with the same receive match")
    check(
        cfg.reassembly_low_water < cfg.reassembly_high_water,
        f"low water {cfg.reassembly_low_water} >= high {cfg.reassembly_high_water}",
    )
    for t in cfg.tunnels:
        check(0 <= t.in_key < 2**64 and 0 <= t.out_key < 2**64, f"key out of range: {t}")
        check(t.local_ip.version == t.remote_ip.version, f"mixed families: {t}")
        mtu = t.underlay_mtu
        check(mtu is None or MIN_UNDERLAY_MTU <= mtu <= 65535, f"underlay MTU {mtu}: {t}")
    try:
        validate_with_core(cfg)
    except ConfigError as e:  # load_config ends with it: what it returns must pass
        check(False, f"loaded, but the core refuses it: {e}")


def one_input(data: bytes) -> None:
    """See the module docstring."""
    inp = Input(data)
    mode = inp.u8()
    raw = _structured(inp).encode() if mode & 1 else inp.rest()
    with open(_PATH, "wb") as f:
        f.write(raw)
    with contextlib.suppress(ConfigError):
        _check_config(load_config(_PATH))
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not TOML, > 4300-digit integer
        return  # not TOML: load_config has had its turn above
    with contextlib.suppress(ConfigError):
        _check_config(parse_config(doc, source="fuzz"))


def seeds() -> list[bytes]:
    """A full valid file, a minimal one, structured programs."""
    full = (
        b'[daemon]\ninstance = "sttun"\nmetrics = "127.0.0.1:9100"\nlog_level = "info"\n'
        b'reassembly_timeout = 30\nreassembly_high_water = "4 MiB"\n'
        b'reassembly_low_water = "3 MiB"\nreassembly_source_budget = "2 MiB"\n'
        b'[[tunnel]]\nname = "stt0"\nlocal_ip = "198.18.0.1"\nremote_ip = "198.18.0.2"\n'
        b'key = 0x1234\nmtu = 1450\ntos = "inherit"\nttl = 64\ndf = true\n'
        b'[[tunnel]]\nname = "stt1"\nlocal_ip = "2001:db8:0:1::1"\n'
        b'remote_ip = "2001:db8:0:1::2"\nin_key = 1\nout_key = 2\ndst_port = 7472\n'
    )
    minimal = b'[[tunnel]]\nname="s"\nlocal_ip="198.18.0.1"\nremote_ip="198.18.0.2"\nkey=1\n'
    return [b"\x00" + full, b"\x00" + minimal, b"\x01" + bytes(40), b"\x01" + b"\x01\x05" * 30]


TARGET = Target("config", one_input, seeds, max_len=8192)

if __name__ == "__main__":
    main(TARGET)
