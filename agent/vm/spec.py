"""VM specs: what a client may ask for, checked before anything is touched."""

from __future__ import annotations

import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")  # \Z: "$" would allow a trailing newline
VCPUS_RANGE = (1, 64)
MEMORY_MB_RANGE = (16, 1024 * 1024)
ACCELS = ("kvm", "tcg", "auto")
MAX_CMDLINE = 4096
DISK_FORMATS = ("raw", "qcow2")
MAX_IMAGE_REF = 1024

_KEYS = {"name", "vcpus", "memory_mb", "kernel", "initrd", "cmdline", "disk", "disk_format", "accel", "start",
         "nics", "cpu_model", "disks"}

# The guest's CPU: a QEMU model name. The default is Nehalem, an x86-64-v2 baseline
# (SSE4.2, POPCNT, SSSE3, CX16): guests built for x86-64-v2 (RHEL 9 and its kin) boot on
# it, every KVM host since Intel Nehalem (2008) and AMD Bulldozer (2011) offers it, and
# QEMU 7.2's TCG runs it with no missing feature (query-cpu-definitions, checked here).
# qemu64 would run everywhere too but is below x86-64-v2. "host" passes the host CPU
# through (KVM only) and pins the VM to hosts with the same CPU.
DEFAULT_CPU_MODEL = "Nehalem"
HOST_CPU_MODEL = "host"
CPU_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")

# NICs: a fleet network name (each agent maps it to a local bridge), a device
# model QEMU emulates, and a MAC that stays with the VM for its life.
NET_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,30}\Z")
NIC_MODELS = ("virtio-net-pci", "e1000", "rtl8139")
DEFAULT_NIC_MODEL = "virtio-net-pci"
MAX_NICS = 8
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")
_NIC_KEYS = {"net", "model", "mac"}


# Data disks (``disks``): each is a qcow2 or raw file on a virtio-blk or virtio-scsi bus.
# "local" disks live in the VM's folder and move with it (created empty at size_gb, as a
# qcow2 overlay on a backing image, or as a copy of an image); "shared" disks are an image
# in an image dir that every host sees (NFS, cluster fs): a migration hands over ownership.
DISK_BUSES = ("virtio-blk", "virtio-scsi")
STORAGE_MODES = ("local", "shared")
MAX_DISKS = 8
MAX_DISK_GB = 64 * 1024
MIN_DISK_BYTES = 1 << 20
_DISK_KEYS = {"format", "bus", "size_gb", "image", "backing", "storage"}


class SpecError(ValueError):
    """A VM spec is invalid; the message names the field and the problem."""


@dataclass(frozen=True)
class NIC:
    net: str
    model: str
    mac: str


@dataclass(frozen=True)
class Disk:
    """One data disk; exactly one of ``size_bytes`` (empty), ``image`` or ``backing`` says
    where its content starts from."""

    format: str
    bus: str
    storage: str
    size_bytes: int = 0
    image: str = ""
    backing: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The spec's own form (what ``parse_spec`` reads back exactly: sizes are whole MiB,
        so ``size_gb`` is an exact binary fraction)."""
        doc: dict[str, Any] = {"format": self.format, "bus": self.bus, "storage": self.storage}
        if self.size_bytes:
            doc["size_gb"] = self.size_bytes / (1 << 30)
        if self.image:
            doc["image"] = self.image
        if self.backing:
            doc["backing"] = self.backing
        return doc

    def file_name(self, index: int) -> str:
        """A local disk's file in the VM folder (its name gives its format, as for images)."""
        return f"disk{index}.{'qcow2' if self.format == 'qcow2' else 'raw'}"


def random_mac() -> str:
    """A unicast, locally administered MAC (first octet x2/x6/xA/xE)."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def _nic(i: int, doc: Any) -> NIC:
    where = f"nics[{i}]"
    if not isinstance(doc, dict):
        raise SpecError(f"{where}: expected an object with net, model, mac")
    unknown = sorted(set(doc) - _NIC_KEYS)
    if unknown:
        raise SpecError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(_NIC_KEYS))})")
    net = doc.get("net")
    if not isinstance(net, str) or not NET_NAME_RE.match(net):
        raise SpecError(f"{where}.net: a network name of 1-31 lowercase letters, digits, '_' or '-', "
                        f"starting with a letter; got {net!r}")
    model = doc.get("model", DEFAULT_NIC_MODEL)
    if model not in NIC_MODELS:
        raise SpecError(f"{where}.model: expected one of {', '.join(NIC_MODELS)}, got {model!r}")
    mac = doc.get("mac")
    if mac is None:
        return NIC(net, model, random_mac())
    if not isinstance(mac, str) or not MAC_RE.match(mac.lower()):
        raise SpecError(f"{where}.mac: expected six hex octets like 52:54:00:12:34:56, got {mac!r}")
    mac = mac.lower()
    first = int(mac[:2], 16)
    if first & 0x01:
        raise SpecError(f"{where}.mac: {mac} is a multicast address; a NIC needs a unicast one")
    if mac == "00:00:00:00:00:00":
        raise SpecError(f"{where}.mac: the all-zero address is not valid")
    return NIC(net, model, mac)


def _nics(value: Any) -> tuple[NIC, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise SpecError("nics: expected a list of NICs")
    if len(value) > MAX_NICS:
        raise SpecError(f"nics: at most {MAX_NICS} NICs, got {len(value)}")
    nics = tuple(_nic(i, d) for i, d in enumerate(value))
    macs = [n.mac for n in nics]
    for i, mac in enumerate(macs):
        if mac in macs[:i]:
            raise SpecError(f"nics[{i}].mac: {mac} is used by another NIC of this VM")
    return nics


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
    nics: tuple[NIC, ...] = field(default=())
    # "" only in records written before VMs had a CPU model: they keep the model they ran with
    cpu_model: str = ""
    disks: tuple[Disk, ...] = field(default=())

    def effective_cpu_model(self, accel: str) -> str:
        """The ``-cpu`` model: the spec's, or for an old record what such VMs ran with."""
        if self.cpu_model:
            return self.cpu_model
        return HOST_CPU_MODEL if accel == "kvm" else "qemu64"

    @property
    def networks(self) -> tuple[str, ...]:
        """The fleet networks this VM joins, each once, in NIC order."""
        return tuple(dict.fromkeys(n.net for n in self.nics))

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["nics"] = [asdict(n) for n in self.nics]
        doc["disks"] = [d.to_dict() for d in self.disks]
        return doc

    @classmethod
    def from_record(cls, doc: dict[str, Any]) -> VMSpec:
        """The spec as ``to_dict`` wrote it into the VM's record (MACs kept)."""
        fields = {k: v for k, v in doc.items() if v not in ("", None) and k not in ("nics", "disks")}
        return cls(**fields, nics=tuple(NIC(**n) for n in doc.get("nics") or ()),
                   disks=tuple(_disk(i, d) for i, d in enumerate(doc.get("disks") or ())))


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
        # The format follows the file name, never the caller: a file that one VM uses raw
        # (its guest writes every byte, a qcow2 header included) must never be opened as
        # qcow2 by another, whose QEMU would then follow files that header names.
        by_name = "qcow2" if disk.endswith(".qcow2") else "raw"
        if disk_format and disk_format != by_name:
            raise SpecError(f"disk_format: {disk_format!r} does not match the image name {disk!r} "
                            f"(qcow2 images end in .qcow2, every other image is raw)")
        disk_format = by_name
    if disk_format and not disk:
        raise SpecError("disk_format: only valid with a disk")
    nics = _nics(doc.get("nics"))  # a MAC not given is generated here, then kept in the record
    cpu_model = doc.get("cpu_model", DEFAULT_CPU_MODEL)
    if not isinstance(cpu_model, str) or not CPU_MODEL_RE.match(cpu_model):
        raise SpecError(f"cpu_model: a QEMU CPU model name (letters, digits, '.', '_', '-'), got {cpu_model!r}")
    if cpu_model == HOST_CPU_MODEL and accel == "tcg":
        raise SpecError("cpu_model: 'host' passes the host's CPU through and needs KVM, not accel tcg")
    disks = _disks(doc.get("disks"))
    return VMSpec(name, vcpus, memory_mb, kernel, initrd, cmdline, disk, disk_format, accel, nics, cpu_model, disks)


def _format_of(ref: str) -> str:
    """An image's format follows its name (see the boot ``disk`` above)."""
    return "qcow2" if ref.endswith(".qcow2") else "raw"


def _disk(i: int, doc: Any) -> Disk:
    where = f"disks[{i}]"
    if not isinstance(doc, dict):
        raise SpecError(f"{where}: expected an object with format, bus, storage and one of "
                        "size_gb, image, backing")
    unknown = sorted(set(doc) - _DISK_KEYS)
    if unknown:
        raise SpecError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(_DISK_KEYS))})")
    storage = doc.get("storage", "local")
    if storage not in STORAGE_MODES:
        raise SpecError(f"{where}.storage: expected one of {', '.join(STORAGE_MODES)}, got {storage!r}")
    bus = doc.get("bus", "virtio-blk")
    if bus not in DISK_BUSES:
        raise SpecError(f"{where}.bus: expected one of {', '.join(DISK_BUSES)}, got {bus!r}")
    fmt = doc.get("format")
    if fmt is not None and fmt not in DISK_FORMATS:
        raise SpecError(f"{where}.format: expected one of {', '.join(DISK_FORMATS)}, got {fmt!r}")
    sources = [k for k in ("size_gb", "image", "backing") if doc.get(k) is not None]
    if len(sources) != 1 and sources != ["size_gb", "backing"]:
        raise SpecError(f"{where}: give exactly one of size_gb (an empty disk), image (an image to "
                        f"use or copy) or backing (a qcow2 overlay, optionally with size_gb); "
                        f"got {', '.join(sources) or 'none'}")
    size = 0
    if "size_gb" in sources:
        gb = doc["size_gb"]
        if isinstance(gb, bool) or not isinstance(gb, int | float) or not 0 < gb <= MAX_DISK_GB:
            raise SpecError(f"{where}.size_gb: expected a number of GiB above 0 and at most "
                            f"{MAX_DISK_GB}, got {gb!r}")
        size = int(gb * (1 << 30)) // MIN_DISK_BYTES * MIN_DISK_BYTES  # whole MiB
        if size < MIN_DISK_BYTES:
            raise SpecError(f"{where}.size_gb: at least 1 MiB (0.001 GiB), got {gb!r}")
    image = backing = ""
    if "image" in sources:
        image = _image_ref(f"{where}.image", _field_str(doc, where, "image"))
        by_name = _format_of(image)
        if fmt is not None and fmt != by_name:
            raise SpecError(f"{where}.format: {fmt!r} does not match the image name {image!r} "
                            f"(qcow2 images end in .qcow2, every other image is raw)")
        fmt = by_name
    if "backing" in sources:
        backing = _image_ref(f"{where}.backing", _field_str(doc, where, "backing"))
        if fmt not in (None, "qcow2"):
            raise SpecError(f"{where}.format: a disk with a backing image is qcow2, got {fmt!r}")
        fmt = "qcow2"
    if storage == "shared" and not image:
        raise SpecError(f"{where}: a shared disk is an image in an image dir every host sees; "
                        "give image (size_gb and backing make local disks)")
    fmt = fmt or "qcow2"
    return Disk(fmt, bus, storage, size, image, backing)


def _field_str(doc: dict[str, Any], where: str, key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise SpecError(f"{where}.{key}: expected an image name, got {value!r}")
    return value


def _disks(value: Any) -> tuple[Disk, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise SpecError("disks: expected a list of disk objects")
    if len(value) > MAX_DISKS:
        raise SpecError(f"disks: at most {MAX_DISKS} disks, got {len(value)}")
    disks = tuple(_disk(i, d) for i, d in enumerate(value))
    shared = [d.image for d in disks if d.image]
    if len(set(shared)) != len(shared):
        raise SpecError("disks: the same image is named twice")
    return disks
