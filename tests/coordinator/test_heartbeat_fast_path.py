"""The heartbeat's hand-written body check never accepts what the schema refuses,
and accepts the bodies real agents send (so the shortcut is taken)."""

from __future__ import annotations

from typing import Any

import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st

from novacron.coordinator.api.hosts import HEARTBEAT, heartbeat_valid

SCHEMA = jsonschema.Draft202012Validator(HEARTBEAT)

names = st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", fullmatch=True),
                  st.text(max_size=70), st.integers())
numbers = st.one_of(st.integers(min_value=-10, max_value=2**63), st.floats(allow_nan=True),
                    st.booleans(), st.none(), st.text(max_size=3))
bodies = st.one_of(
    st.fixed_dictionaries({"memory_available_bytes": numbers},
                          optional={"vms": st.one_of(st.lists(names, max_size=5), names),
                                    "load": numbers, "extra": numbers}),
    st.lists(numbers, max_size=2), numbers)


@settings(max_examples=600, deadline=None)
@given(bodies)
def test_fast_check_accepts_only_what_the_schema_accepts(body: Any) -> None:
    if heartbeat_valid(body):
        assert SCHEMA.is_valid(body), body


def test_agents_bodies_take_the_fast_path() -> None:
    for body in ({"memory_available_bytes": 0},
                 {"memory_available_bytes": 64 << 30, "load": 0.5,
                  "vms": [f"vm-{i}.x_y" for i in range(10)]},
                 {"memory_available_bytes": 2**62, "load": 1000000, "vms": []}):
        assert SCHEMA.is_valid(body) and heartbeat_valid(body), body
    for body in ({"memory_available_bytes": -1}, {"memory_available_bytes": True},
                 {"memory_available_bytes": 1, "vms": ["bad name"]},
                 {"memory_available_bytes": 1, "load": float("nan")},
                 {"memory_available_bytes": 1, "cpus": 4}, []):
        assert not heartbeat_valid(body), body
