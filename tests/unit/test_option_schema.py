"""The coordinator's ``POST /migrations`` options are exactly the source agent's
MigrationOptions, with the same bounds: an option one accepts the other must too."""

from __future__ import annotations

from dataclasses import fields

import pytest

from novacron.agent.migration.options import MigrationOptions
from novacron.coordinator.api.migrations import START

SCHEMA = START["properties"]["options"]["properties"]
# set by the coordinator itself, never by a caller: a stopped VM's disks copy (offline.py)
COORDINATOR_ONLY = {"offline"}


def test_every_agent_option_is_in_the_coordinator_schema() -> None:
    assert set(SCHEMA) == {f.name for f in fields(MigrationOptions)} - COORDINATOR_ONLY
    assert not COORDINATOR_ONLY & set(SCHEMA)  # a caller cannot ask for them


@pytest.mark.parametrize("name", sorted(n for n, s in SCHEMA.items() if s.get("type") in ("number", "integer")))
def test_numeric_bounds_match_the_agent(name: str) -> None:
    low, high = SCHEMA[name]["minimum"], SCHEMA[name]["maximum"]
    MigrationOptions.from_dict({name: low})
    MigrationOptions.from_dict({name: high})
    step = 1 if SCHEMA[name]["type"] == "integer" else min(0.01, low / 10 if low else 0.01)
    for outside in (low - step, high + step):
        with pytest.raises(ValueError):
            MigrationOptions.from_dict({name: outside})
