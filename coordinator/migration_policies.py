"""Migration policies: named sets of migration options, chosen per migration, per VM or by labels.

Defined in the coordinator's config as ``[migration_policies.NAME]`` tables of the source
agent's migration options (``agent/migration/options.py``) plus an optional
``selector = {label = "value", ...}`` and ``description``. What a migration runs with is
decided once, when it starts, in this order (the first that applies wins):

1. options given with the migration (``options`` in the request, ``--bandwidth-mbps`` ...)
   override single options of the policy chosen by 2-5;
2. the policy named in the request (``policy``, ``novacron migrate --policy NAME``);
3. the VM's own ``migration_policy``;
4. the policy whose selector matches the VM's labels (all of its labels equal); of several,
   the one with the most selector labels. Selectors that could tie are refused at start-up;
5. ``default_migration_policy``;
6. otherwise none: the agent's defaults.

The migration record keeps the policy's name, why it applied and the options sent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from novacron.agent.migration.options import MigrationOptions
from novacron.config import Invalid
from novacron.coordinator.api.errors import ApiError

# VM labels: short keys and values that read the same in TOML, JSON and a shell.
LABEL_KEY = r"^[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?$"
LABEL_VALUE = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$"
MAX_LABELS = 32
POLICY_NAME = r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$"
# "offline" is the coordinator's to set (the VM is stopped), never a policy's
OPTION_NAMES = tuple(f.name for f in fields(MigrationOptions) if f.name != "offline")

# Why a policy applied (the record's ``policy_source``).
REQUEST, VM_POLICY, LABELS, DEFAULT = "request", "vm", "labels", "default"


@dataclass(frozen=True)
class Policy:
    name: str
    options: dict[str, Any]
    selector: dict[str, str] = field(default_factory=dict)
    description: str = ""

    def matches(self, labels: Mapping[str, str]) -> bool:
        return bool(self.selector) and all(labels.get(k) == v for k, v in self.selector.items())

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "selector": self.selector,
                "options": self.options}


@dataclass(frozen=True)
class Applied:
    """What a migration runs with: the policy (if any), why, and the options sent to the agent."""

    policy: str | None
    source: str | None  # REQUEST, VM_POLICY, LABELS, DEFAULT or None
    options: dict[str, Any]


def check_labels(labels: Any, where: str) -> dict[str, str]:
    """A label map (config selector or VM labels), or Invalid naming the bad entry."""
    if not isinstance(labels, dict):
        raise Invalid(where, "expected a table of label = \"value\"")
    if len(labels) > MAX_LABELS:
        raise Invalid(where, f"at most {MAX_LABELS} labels")
    for key, value in labels.items():
        if not isinstance(key, str) or not re.match(LABEL_KEY, key):
            raise Invalid(f"{where}.{key}", "label names are 1-63 of a-z 0-9 . _ / - "
                          "(starting and ending with a letter or digit)")
        if not isinstance(value, str) or not re.match(LABEL_VALUE, value):
            raise Invalid(f"{where}.{key}", "label values are 1-63 of A-Z a-z 0-9 . _ - "
                          "(starting and ending with a letter or digit)")
    return dict(labels)


def _policy(name: str, raw: Any) -> Policy:
    where = f"migration_policies.{name}"
    if not re.match(POLICY_NAME, name):
        raise Invalid(where, "policy names are 1-63 of a-z 0-9 _ - (starting and ending with "
                      "a letter or digit)")
    if not isinstance(raw, dict):
        raise Invalid(where, "expected a [migration_policies.NAME] table")
    options = {k: v for k, v in raw.items() if k not in ("selector", "description")}
    for key, value in options.items():
        if key not in OPTION_NAMES:
            raise Invalid(f"{where}.{key}", "unknown migration option (known: "
                          f"{', '.join(OPTION_NAMES)})")
        try:
            MigrationOptions.from_dict({key: value})  # the agent's own types and bounds
        except ValueError as exc:
            raise Invalid(f"{where}.{key}", str(exc)) from None
    description = raw.get("description", "")
    if not isinstance(description, str) or len(description) > 200:
        raise Invalid(f"{where}.description", "expected text of at most 200 characters")
    selector = check_labels(raw.get("selector", {}), f"{where}.selector")
    return Policy(name, options, selector, description)


def _ambiguity(policies: list[Policy]) -> tuple[str, str] | None:
    """Two selectors some VM could match equally well (no more specific policy between them)."""
    chosen = [p for p in policies if p.selector]
    for i, a in enumerate(chosen):
        for b in chosen[i + 1:]:
            if len(a.selector) != len(b.selector):
                continue
            if any(a.selector[k] != b.selector[k] for k in a.selector.keys() & b.selector.keys()):
                continue  # no VM can carry both
            both = {**a.selector, **b.selector}
            if any(len(c.selector) > len(a.selector) and c.matches(both) for c in chosen):
                continue  # a VM matching both matches this more specific one, which wins
            shown = ", ".join(f"{k}={v}" for k, v in sorted(both.items()))
            return (f"migration_policies.{b.name}.selector",
                    f"a VM labelled {shown} would match both {a.name!r} and {b.name!r} equally; "
                    "make the selectors differ or add a policy selecting all of these labels")
    return None


class Policies:
    """The configured policies; ``resolve`` decides what one migration runs with."""

    def __init__(self, policies: list[Policy], default: str = "") -> None:
        self.by_name = {p.name: p for p in policies}
        self.default = default

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], default: str) -> Policies:
        """Raises Invalid naming the config key of the first problem."""
        policies = [_policy(name, doc) for name, doc in raw.items()]
        ambiguous = _ambiguity(policies)
        if ambiguous is not None:
            raise Invalid(*ambiguous)
        if default and default not in {p.name for p in policies}:
            raise Invalid("default_migration_policy",
                          f"no policy {default!r} (defined: {', '.join(raw) or 'none'})")
        return cls(policies, default)

    def public(self) -> dict[str, Any]:
        return {"policies": [p.public() for p in self.by_name.values()],
                "default": self.default or None}

    def check_name(self, name: str) -> None:
        """A name a client gave (request or VM field): 400 if no such policy is configured."""
        if name not in self.by_name:
            raise ApiError(400, f"no migration policy {name!r} (configured: "
                           f"{', '.join(self.by_name) or 'none'})")

    def by_labels(self, labels: Mapping[str, str]) -> Policy | None:
        matching = [p for p in self.by_name.values() if p.matches(labels)]
        return max(matching, key=lambda p: len(p.selector), default=None)  # no ties: see _ambiguity

    def resolve(self, *, requested: str | None, vm_policy: str | None,
                labels: Mapping[str, str], options: Mapping[str, Any]) -> Applied:
        if requested:
            self.check_name(requested)
            policy, source = self.by_name[requested], REQUEST
        elif vm_policy:
            if vm_policy not in self.by_name:  # the config changed since the VM was given it
                raise ApiError(409, f"the VM's migration_policy {vm_policy!r} is no longer "
                               "configured; name one with --policy (policy) or change the VM's")
            policy, source = self.by_name[vm_policy], VM_POLICY
        elif (matched := self.by_labels(labels)) is not None:
            policy, source = matched, LABELS
        elif self.default:
            policy, source = self.by_name[self.default], DEFAULT
        else:
            return Applied(None, None, dict(options))
        return Applied(policy.name, source, {**policy.options, **options})
