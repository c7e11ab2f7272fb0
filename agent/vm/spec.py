"""VM specs: what a client may ask for, checked before anything is touched."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")  # \Z: "$" would allow a trailing newline
VCPUS_RANGE = (1, 64)
MEMORY_MB_RANGE = (16, 1024 * 1024)
ACCELS = ("kvm", "tcg", "auto")
MAX_CMDLINE = 4096
DISK_FORMATS = ("raw", "qcow2")
MAX_IMAGE_REF = 1024

_KEYS = {"name", "vcpus", "memory_mb", "kernel", "initrd", "cmdline", "disk", "disk_format", "accel", "start"}


class SpecError(ValueError):
    """A VM spec is invalid; the message names the field and the problem."""


@dataclass(frozen=True)
class VMSpec:
    name: str
    vcpus: int
    memory_mb: int
    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""
    disk: str = ""
    disk_format: str = ""
    accel: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _int(doc: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = doc.get(key)
    if value is None:
        raise SpecError(f"{key}: required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{key}: expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise SpecError(f"{key}: must be between {lo} and {hi}, got {value}")
    return value


def _str(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key, "")
    if not isinstance(value, str):
        raise SpecError(f"{key}: expected a string, got {value!r}")
    return value


def _image_ref(key: str, value: str) -> str:
    """Syntax only: which file a name means is up to the agent's image dirs
    (``novacron.agent.vm.images``), checked before QEMU starts."""
    if len(value) > MAX_IMAGE_REF or any(c in value for c in "\0\n\r,"):
        raise SpecError(f"{key}: an image name of at most {MAX_IMAGE_REF} characters without ',' or "
                        f"control characters, got {value[:80]!r}")
    if ".." in PurePosixPath(value).parts:
        raise SpecError(f"{key}: '..' is not allowed in an image name: {value!r}")
    return value


def parse_spec(doc: Any) -> VMSpec:
    """A validated VMSpec from a JSON object; SpecError names the first problem."""
    if not isinstance(doc, dict):
        raise SpecError("spec: expected a JSON object")
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise SpecError(f"{unknown[0]}: unknown field (known: {', '.join(sorted(_KEYS))})")
    name = doc.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SpecError(
            f"name: must be 1-63 characters of letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit; got {name!r}"
        )
    vcpus = _int(doc, "vcpus", *VCPUS_RANGE)
    memory_mb = _int(doc, "memory_mb", *MEMORY_MB_RANGE)
    accel = doc.get("accel", "auto")
    if accel not in ACCELS:
        raise SpecError(f"accel: expected one of {', '.join(ACCELS)}, got {accel!r}")
    if "start" in doc and not isinstance(doc["start"], bool):
        raise SpecError(f"start: expected true or false, got {doc['start']!r}")
    kernel, initrd, cmdline = _str(doc, "kernel"), _str(doc, "initrd"), _str(doc, "cmdline")
    disk, disk_format = _str(doc, "disk"), _str(doc, "disk_format")
    if disk and (kernel or initrd or cmdline):
        raise SpecError("disk: give either a disk or kernel/initrd/cmdline, not both")
    if not disk and not kernel:
        raise SpecError("kernel: required (or give a disk)")
    if len(cmdline) > MAX_CMDLINE or any(c in cmdline for c in "\0\n\r"):
        raise SpecError(f"cmdline: must be one line of at most {MAX_CMDLINE} characters")
    if kernel:
        kernel = _image_ref("kernel", kernel)
        if initrd:
            initrd = _image_ref("initrd", initrd)
    else:
        disk = _image_ref("disk", disk)
        if disk_format and disk_format not in DISK_FORMATS:
            raise SpecError(f"disk_format: expected one of {', '.join(DISK_FORMATS)}, got {disk_format!r}")
        if not disk_format:
            disk_format = "qcow2" if disk.endswith(".qcow2") else "raw"
    if disk_format and not disk:
        raise SpecError("disk_format: only valid with a disk")
    return VMSpec(name, vcpus, memory_mb, kernel, initrd, cmdline, disk, disk_format, accel)
