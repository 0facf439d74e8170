"""Hypothesis fallback of fuzz target ``config`` (fuzz/fuzz_config.py).

Besides the byte-level target, hypothesis builds TOML documents from the real keys
with values of every TOML type and feeds them to ``parse_config`` (as parsed
data) and to ``load_config`` (written out as TOML text).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fuzz.common import time_limit
from fuzz.fuzz_config import _DAEMON_KEYS, _STRINGS, _TUNNEL_KEYS, TARGET, _check_config
from hypothesis import given
from hypothesis import strategies as st
from tests.property.fuzz_cases import fuzz_settings, target_tests

from sttun.daemon.config import load_config, parse_config
from sttun.errors import ConfigError

SETTINGS = fuzz_settings(200)
test_seeds, test_any_bytes = target_tests(TARGET, 200)

scalars = st.one_of(
    st.sampled_from(_STRINGS),
    st.text(max_size=20),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["a", "b", "name"]), inner, max_size=3),
    ),
    max_leaves=6,
)
tunnel = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(st.sampled_from(["stt0", "stt1"]), values),
        "local_ip": st.one_of(st.sampled_from(["198.18.0.1", "2001:db8:0:1::1"]), values),
        "remote_ip": st.one_of(st.sampled_from(["198.18.0.2", "2001:db8:0:1::2"]), values),
        "key": st.one_of(st.integers(0, 2**64 + 5), values),
    },
).flatmap(
    lambda base: st.dictionaries(st.sampled_from(_TUNNEL_KEYS), values, max_size=4).map(
        lambda extra: {**base, **extra}
    )
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "daemon": st.dictionaries(st.sampled_from(_DAEMON_KEYS), values, max_size=5),
        "tunnel": st.one_of(st.lists(tunnel, max_size=3), values),
        "other": values,
    },
)


def toml_value(v: object) -> str:
    """A TOML literal for ``v`` (inline tables and arrays for containers)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    assert isinstance(v, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def _is_table_array(v: object) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def toml_document(doc: dict[str, object]) -> str:
    lines = []
    for key in ("other", "tunnel"):
        if key in doc and not (key == "tunnel" and _is_table_array(doc[key])):
            lines.append(f"{key} = {toml_value(doc[key])}")
    if "daemon" in doc:
        lines.append("[daemon]")
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in doc["daemon"].items()]  # type: ignore[attr-defined]
    if _is_table_array(doc.get("tunnel")):
        for t in doc["tunnel"]:  # type: ignore[attr-defined]
            lines.append("[[tunnel]]")
            lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in t.items()]
    return "\n".join(lines) + "\n"


@SETTINGS
@given(st.text(max_size=400))
def test_any_text(text: str) -> None:
    with time_limit(TARGET.time_limit):
        TARGET.one_input(b"\x00" + text.encode("utf-8", "surrogatepass"))


@SETTINGS
@given(documents)
def test_structured_documents(doc: dict[str, object]) -> None:
    """parse_config on hypothesis-built data: a ConfigError, or a config that keeps
    the target's invariants (the core accepts it, ...)."""
    with time_limit(TARGET.time_limit):
        try:
            cfg = parse_config(doc, source="hyp")
        except ConfigError:
            return
        _check_config(cfg)


@SETTINGS
@given(documents)
def test_structured_toml_text(
    tmp_path_factory: pytest.TempPathFactory, doc: dict[str, object]
) -> None:
    """The same documents written as TOML and read back with load_config."""
    path: Path = tmp_path_factory.mktemp("cfg") / "sttun.toml"
    path.write_text(toml_document(doc))
    with time_limit(TARGET.time_limit):
        try:
            cfg = load_config(path)
        except ConfigError:
            return
        _check_config(cfg)
