"""Every input the fuzz harness (fuzz/) found crashing, kept as a regression test.

Each case names the target, what went wrong and the fix.  Inputs are stored inline;
the file inputs under ``tests/data/fuzz/<target>/`` (if any) are replayed through
the target's ``one_input`` as well.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzz.common import time_limit
from fuzz.fuzz_config import TARGET as CONFIG
from fuzz.fuzz_outer import TARGET as OUTER
from fuzz.fuzz_pcap import TARGET as PCAP
from fuzz.fuzz_reassembly import TARGET as REASSEMBLY
from fuzz.fuzz_softpath import TARGET as SOFTPATH
from fuzz.fuzz_stt_header import TARGET as STT_HEADER

from sttun.daemon.config import load_config, parse_config
from sttun.errors import ConfigError

TARGETS = {t.name: t for t in (CONFIG, OUTER, PCAP, REASSEMBLY, SOFTPATH, STT_HEADER)}
DATA = Path(__file__).resolve().parent.parent / "data" / "fuzz"

# (target, input, what it found) -- replayed through the harness with its invariants.
CASES = [
    (
        "config",
        b"\x00a=" + b"[" * 3000,
        "load_config: RecursionError from tomllib on deeply nested arrays "
        "(fixed: load_config turns it into ConfigError)",
    ),
    (
        "config",
        b"\x00a=" + b"{b=" * 3000,
        "load_config: RecursionError from tomllib on deeply nested inline tables",
    ),
    (
        "config",
        b"\x00a = " + b"9" * 4400 + b"\n",
        "load_config: ValueError from tomllib on an integer literal of > 4300 digits "
        "(fixed: load_config turns it into ConfigError)",
    ),
    (
        "config",
        b'\x00[daemon]\nreassembly_high_water = "' + b"9" * 4400 + b'"\n[[tunnel]]\n'
        b'name = "s"\nlocal_ip = "198.18.0.1"\nremote_ip = "198.18.0.2"\nkey = 1\n',
        "parse_config: ValueError from int() on a size string of > 4300 digits "
        "(fixed: _size caps the digits and the value)",
    ),
]


@pytest.mark.parametrize(("target", "data", "what"), CASES, ids=[c[2][:40] for c in CASES])
def test_case(target: str, data: bytes, what: str) -> None:
    with time_limit(TARGETS[target].time_limit):
        TARGETS[target].one_input(data)


@pytest.mark.parametrize("opener", ["[", "{b=", "[{b="])
def test_deep_toml_nesting_is_a_config_error(tmp_path: Path, opener: str) -> None:
    path = tmp_path / "sttun.toml"
    path.write_text("a=" + opener * 5000)
    with pytest.raises(ConfigError, match="nested too deep"):
        load_config(path)


@pytest.mark.parametrize("text", ["9" * 4400, "9" * 4400 + " MiB", "99999999999999999999 GiB"])
def test_huge_size_strings_are_config_errors(text: str) -> None:
    raw = {
        "daemon": {"reassembly_high_water": text},
        "tunnel": [{"name": "s", "local_ip": "198.18.0.1", "remote_ip": "198.18.0.2", "key": 1}],
    }
    with pytest.raises(ConfigError, match="reassembly_high_water"):
        parse_config(raw)


def _files() -> list[Path]:
    return sorted(p for p in DATA.glob("*/*") if p.is_file()) if DATA.is_dir() else []


@pytest.mark.parametrize("path", _files(), ids=lambda p: f"{p.parent.name}/{p.name[:16]}")
def test_stored_input(path: Path) -> None:
    target = TARGETS[path.parent.name]
    with time_limit(target.time_limit):
        target.one_input(path.read_bytes())
