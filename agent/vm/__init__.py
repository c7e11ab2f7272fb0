"""The VM runtime: specs, accelerator detection, the QEMU command line, and
VMs whose QEMU processes are supervised.

``VMManager`` holds an agent's VMs; a ``VM`` has ``.spec``, ``.ram_path``,
``.pid``, ``.qmp`` (QMPClient), ``.state`` and ``.argv(files, incoming=True)``:
the exact command line, so a migration destination starts the identical
machine with its own RAM file. ``ImageDirs`` decides which images a spec may
name; ``sandbox`` how QEMU is confined.
"""

from novacron.agent.vm.accel import AccelDetector, AccelInfo, AccelUnavailable
from novacron.agent.vm.errors import (
    InsufficientSpace,
    VMConflict,
    VMError,
    VMNotFound,
    VMStartError,
)
from novacron.agent.vm.images import ImageDirs, OpenedImages
from novacron.agent.vm.machine import CRASHED, PAUSED, RUNNING, STOPPED, VM
from novacron.agent.vm.manager import VMManager
from novacron.agent.vm.qemu_args import QemuFiles, VMPaths, machine_args, qemu_argv
from novacron.agent.vm.ramfile import prepare_ram_file, remove_ram_file
from novacron.agent.vm.sandbox import QemuIdentity, qemu_identity
from novacron.agent.vm.spec import SpecError, VMSpec, parse_spec

__all__ = [
    "CRASHED", "PAUSED", "RUNNING", "STOPPED", "VM", "AccelDetector", "AccelInfo",
    "AccelUnavailable", "ImageDirs", "InsufficientSpace", "OpenedImages", "QemuFiles",
    "QemuIdentity", "SpecError", "VMConflict", "VMError",
    "VMManager", "VMNotFound", "VMPaths", "VMSpec", "VMStartError", "machine_args",
    "parse_spec", "prepare_ram_file", "qemu_argv", "qemu_identity", "remove_ram_file",
]  # fmt: skip
