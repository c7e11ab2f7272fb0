"""Migration policies: config checks that name the key, and the precedence of what applies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from novacron import config
from novacron.config import Invalid
from novacron.coordinator.api.errors import ApiError
from novacron.coordinator.config import ENV_PREFIX, CoordinatorConfig, check_config
from novacron.coordinator.migration_policies import Policies

TOKENS = {"admin_token": "admin-0123456789abcdef", "agent_token": "agent-0123456789abcdef"}

POLICIES: dict[str, Any] = {
    "bulk": {"bandwidth_mbps": 50.0, "downtime_ms": 2000, "throttle": True,
             "selector": {"tier": "batch"}, "description": "batch VMs: cap the link"},
    "eu-batch": {"max_rounds": 5, "selector": {"tier": "batch", "zone": "eu"}},
    "latency": {"downtime_ms": 50, "max_rounds": 100, "compression_level": 3},
    "fallback": {"bandwidth_mbps": 500.0},
}


def policies(default: str = "fallback") -> Policies:
    return Policies.from_config(POLICIES, default)


def test_precedence_request_vm_labels_default() -> None:
    p = policies()
    batch_eu = {"tier": "batch", "zone": "eu"}
    # 1. explicit options over 2. the requested policy's
    got = p.resolve(requested="latency", vm_policy="bulk", labels=batch_eu,
                    options={"downtime_ms": 75.0})
    assert (got.policy, got.source) == ("latency", "request")
    assert got.options == {"downtime_ms": 75.0, "max_rounds": 100, "compression_level": 3}
    # 3. the VM's own policy over its labels
    got = p.resolve(requested=None, vm_policy="bulk", labels=batch_eu, options={})
    assert (got.policy, got.source) == ("bulk", "vm")
    assert got.options == {"bandwidth_mbps": 50.0, "downtime_ms": 2000, "throttle": True}
    # 4. labels: the most specific selector wins
    got = p.resolve(requested=None, vm_policy=None, labels=batch_eu, options={})
    assert (got.policy, got.source, got.options) == ("eu-batch", "labels", {"max_rounds": 5})
    got = p.resolve(requested=None, vm_policy=None, labels={"tier": "batch", "zone": "us"},
                    options={"max_rounds": 7})
    assert (got.policy, got.options["max_rounds"], got.options["bandwidth_mbps"]) == ("bulk", 7, 50.0)
    # 5. the default, 6. nothing
    got = p.resolve(requested=None, vm_policy=None, labels={"tier": "web"}, options={})
    assert (got.policy, got.source, got.options) == ("fallback", "default", {"bandwidth_mbps": 500.0})
    got = policies(default="").resolve(requested=None, vm_policy=None, labels={}, options={"x": 1})
    assert (got.policy, got.source, got.options) == (None, None, {"x": 1})


def test_unknown_policy_in_a_request_is_400_and_a_vanished_vm_policy_409() -> None:
    p = policies()
    with pytest.raises(ApiError) as err:
        p.resolve(requested="nope", vm_policy=None, labels={}, options={})
    assert err.value.status == 400 and "no migration policy 'nope'" in err.value.message
    assert "bulk" in err.value.message  # says which exist
    with pytest.raises(ApiError) as err:
        p.resolve(requested=None, vm_policy="gone", labels={}, options={})
    assert err.value.status == 409 and "'gone' is no longer configured" in err.value.message


@pytest.mark.parametrize("raw, default, key, words", [
    ({"a": {"bandwith_mbps": 5}}, "", "migration_policies.a.bandwith_mbps", "unknown migration option"),
    ({"a": {"downtime_ms": 0}}, "", "migration_policies.a.downtime_ms", "between 1 and 60000"),
    ({"a": {"max_rounds": 2.5}}, "", "migration_policies.a.max_rounds", "integer"),
    ({"a": {"throttle": "yes"}}, "", "migration_policies.a.throttle", "true or false"),
    ({"a": {"selector": {"Tier": "x"}}}, "", "migration_policies.a.selector.Tier", "label names"),
    ({"a": {"selector": {"tier": "x y"}}}, "", "migration_policies.a.selector.tier", "label values"),
    ({"a": {"selector": "tier=x"}}, "", "migration_policies.a.selector", "table"),
    ({"A b": {}}, "", "migration_policies.A b", "policy names"),
    ({"a": 5}, "", "migration_policies.a", "table"),
    ({"a": {}}, "b", "default_migration_policy", "no policy 'b'"),
    # two selectors a VM could match equally well
    ({"a": {"selector": {"tier": "batch"}}, "b": {"selector": {"zone": "eu"}}}, "",
     "migration_policies.b.selector", "tier=batch, zone=eu would match both 'a' and 'b'"),
    ({"a": {"selector": {"tier": "batch"}}, "b": {"selector": {"tier": "batch"}}}, "",
     "migration_policies.b.selector", "match both"),
])
def test_bad_policies_name_the_key(raw: dict[str, Any], default: str, key: str, words: str) -> None:
    with pytest.raises(Invalid) as err:
        Policies.from_config(raw, default)
    assert err.value.key == key and words in err.value.problem


def test_selectors_that_cannot_tie_are_accepted() -> None:
    # different values of one label: no VM carries both
    Policies.from_config({"a": {"selector": {"tier": "batch"}}, "b": {"selector": {"tier": "web"}}}, "")
    # a VM matching both also matches the more specific third, which wins
    p = Policies.from_config({"a": {"selector": {"tier": "batch"}}, "b": {"selector": {"zone": "eu"}},
                              "c": {"selector": {"tier": "batch", "zone": "eu"}}}, "")
    assert p.by_labels({"tier": "batch", "zone": "eu", "x": "y"}).name == "c"  # type: ignore[union-attr]
    assert p.by_labels({"zone": "eu"}).name == "b"  # type: ignore[union-attr]
    assert p.by_labels({}) is None


def test_config_file_error_is_one_line_naming_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text('[migration_policies.bulk]\nbandwidth_mbps = 50\ndowntime_ms = -1\n'
                    'selector = { tier = "batch" }\n')
    with pytest.raises(config.ConfigError) as err:
        config.load(CoordinatorConfig, path=path, env_prefix=ENV_PREFIX, environ=TOKENS_ENV,
                    check=check_config)
    text = str(err.value)
    assert text.startswith(f"{path}: key 'migration_policies.bulk.downtime_ms'") and "\n" not in text


TOKENS_ENV = {f"{ENV_PREFIX}_{k.upper()}": v for k, v in TOKENS.items()}


def test_policies_from_file_and_from_json_in_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text('default_migration_policy = "bulk"\n[migration_policies.bulk]\n'
                    'bandwidth_mbps = 50\nthrottle = false\nselector = { tier = "batch" }\n')
    cfg = config.load(CoordinatorConfig, path=path, env_prefix=ENV_PREFIX, environ=TOKENS_ENV,
                      check=check_config)
    assert cfg.migration_policies == {"bulk": {"bandwidth_mbps": 50, "throttle": False,
                                               "selector": {"tier": "batch"}}}
    env = {**TOKENS_ENV, f"{ENV_PREFIX}_MIGRATION_POLICIES": '{"fast": {"downtime_ms": 20}}'}
    cfg = config.load(CoordinatorConfig, env_prefix=ENV_PREFIX, environ=env, check=check_config)
    assert cfg.migration_policies == {"fast": {"downtime_ms": 20}}
    env[f"{ENV_PREFIX}_MIGRATION_POLICIES"] = '{"fast": {"downtime_ms": 0}}'
    with pytest.raises(config.ConfigError) as err:
        config.load(CoordinatorConfig, env_prefix=ENV_PREFIX, environ=env, check=check_config)
    assert str(err.value).startswith(f"environment {ENV_PREFIX}_MIGRATION_POLICIES: key "
                                     "'migration_policies.fast.downtime_ms'")
    env[f"{ENV_PREFIX}_MIGRATION_POLICIES"] = '{"fast": '
    with pytest.raises(config.ConfigError, match="invalid JSON"):
        config.load(CoordinatorConfig, env_prefix=ENV_PREFIX, environ=env, check=check_config)
