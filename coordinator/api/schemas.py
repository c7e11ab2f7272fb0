"""JSON schemas of the coordinator's records, shared by route modules."""

from __future__ import annotations

from typing import Any

from novacron.coordinator import migration_policies as mp
from novacron.coordinator.api.openapi import NAME_SCHEMA

POLICY_NAME: dict[str, Any] = {"type": "string", "pattern": mp.POLICY_NAME}
LABELS: dict[str, Any] = {
    "type": "object", "maxProperties": mp.MAX_LABELS,
    "propertyNames": {"pattern": mp.LABEL_KEY},
    "additionalProperties": {"type": "string", "pattern": mp.LABEL_VALUE},
    "description": "name = value labels; migration policies select VMs by them",
}

NULLABLE_STR: dict[str, Any] = {"type": ["string", "null"]}

HOST: dict[str, Any] = {
    "type": "object",
    "required": ["name", "url", "state", "cpus", "memory_bytes", "memory_available_bytes"],
    "properties": {
        "name": {"type": "string"}, "url": {"type": "string"},
        "state": {"enum": ["up", "down"]},
        "cpus": {"type": "integer"}, "memory_bytes": {"type": "integer"},
        "memory_available_bytes": {"type": "integer"},
        "accel": {"type": "object"}, "data_port": {"type": ["integer", "null"]},
        "networks": {"type": "array", "items": {"type": "string"}},
        "cpu_models": {"type": ["array", "null"], "items": {"type": "string"},
                       "description": "CPU models a VM may use there (null: not reported)"},
        "cpu_signature": {"type": "string", "description": "its CPU; a VM with cpu_model "
                          "'host' moves only between hosts with the same signature"},
        "version": {"type": "string"}, "vms": {"type": "array", "items": {"type": "string"}},
        "load": {"type": ["number", "null"]},
        "registered_at": {"type": "number"}, "last_heartbeat": {"type": "number"},
        "maintenance": {"type": "boolean",
                        "description": "no VM is placed on or migrated to it (but with force)"},
        "drain": {**NULLABLE_STR, "description": "the drain emptying it now (GET /drains/{id})"},
        "lifecycle": {"enum": ["active", "maintenance", "draining"],
                      "description": "draining while a drain runs, then maintenance"},
    },
}

CPU_MODEL: dict[str, Any] = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"}

VM: dict[str, Any] = {
    "type": "object",
    "required": ["name", "host", "state", "spec"],
    "properties": {
        "name": {"type": "string"}, "host": {"type": "string"}, "state": {"type": "string"},
        "spec": {"type": "object"}, "error": NULLABLE_STR,
        "created_at": {"type": "number"}, "updated_at": {"type": "number"},
        "agent": {"type": ["object", "null"]},
        "labels": {"type": "object"}, "migration_policy": NULLABLE_STR,
        "outcome": {"type": "object", "description": "stop and reboot: whether the guest shut "
                    "down by itself (graceful), how long it took (seconds) and why (reason)",
                    "properties": {"graceful": {"type": "boolean"}, "seconds": {"type": "number"},
                                   "reason": {"type": "string"}}},
    },
}

MIGRATION: dict[str, Any] = {
    "type": "object",
    "required": ["id", "vm", "source", "target", "phase"],
    "properties": {
        "id": {"type": "string"}, "vm": {"type": "string"},
        "source": {"type": "string"}, "target": {"type": "string"},
        "phase": {"type": "string"}, "round": {"type": "integer"},
        "options": {"type": "object"}, "metrics": {"type": "object"}, "error": NULLABLE_STR,
        "agent_migration_id": NULLABLE_STR, "budget_exceeded": {"type": "boolean"},
        "policy": NULLABLE_STR,
        "policy_source": {"enum": ["request", "vm", "labels", "default", None]},
        "created_at": {"type": "number"}, "updated_at": {"type": "number"},
        "finished_at": {"type": ["number", "null"]},
        "started_at": {"type": ["number", "null"],
                       "description": "when it left the queue for the source agent"},
        "queue_reason": {**NULLABLE_STR, "description": "while queued: the limit it waits for"},
    },
}


def list_of(key: str, item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": [key],
            "properties": {key: {"type": "array", "items": item}}}


NAME = NAME_SCHEMA

# What the scheduler weighs besides a VM's size (POST /placements and VM create).
_VM_NAMES = {"type": "array", "items": NAME, "maxItems": 256, "uniqueItems": True}
PLACEMENT_PREFERENCES: dict[str, Any] = {
    "priority": {"enum": ["low", "normal", "high"]},
    "region": {"type": "string", "minLength": 1, "maxLength": 64,
               "description": "user region the VM should be close to"},
    "max_latency_ms": {"type": "number", "minimum": 0, "maximum": 60_000},
    "affinity": {**_VM_NAMES, "description": "place beside these VMs"},
    "anti_affinity": {**_VM_NAMES, "description": "keep away from these VMs"},
    "anti_affinity_scope": {"enum": ["host", "zone"]},
}
