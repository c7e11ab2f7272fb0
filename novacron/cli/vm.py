"""``novacron vm create|show|start|stop|delete``: one VM's lifecycle through the coordinator."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from typing import Any
from urllib.parse import quote

import aiohttp
from rich.console import Console
from rich.table import Table

from novacron.cli.fleet import _dump, _run, human_bytes
from novacron.cli.placement import PREFERENCES, add_preference_flags, given
from novacron.coordinator.client import CoordinatorClient


def register(sub: argparse._SubParsersAction) -> None:
    vm = sub.add_parser("vm", help="create, show, start, stop or delete one VM")
    cmds = vm.add_subparsers(dest="vm_command", metavar="ACTION", required=True)

    p = cmds.add_parser("create", help="place a VM on a host and start it there",
                        description="Create a VM booting either a kernel (--kernel) or a disk "
                        "image (--disk). The coordinator places it unless --host pins it; "
                        "--priority/--region/--affinity... are placement preferences.")
    p.add_argument("name", metavar="NAME", help="VM name (letters, digits, '-', '_', '.')")
    p.add_argument("--vcpus", type=int, required=True, metavar="N", help="virtual CPUs")
    p.add_argument("--memory-mb", type=int, required=True, metavar="MIB", help="guest RAM in MiB")
    p.add_argument("--kernel", help="kernel image: a name in the host agent's image dirs (direct boot)")
    p.add_argument("--initrd", help="initrd: a name in the host agent's image dirs (with --kernel)")
    p.add_argument("--cmdline", help="kernel command line (with --kernel)")
    p.add_argument("--disk", help="disk image: a name in the host agent's image dirs (disk boot)")
    p.add_argument("--disk-format", choices=["raw", "qcow2"],
                   help="format of --disk (default: detected by the agent)")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"],
                   help="accelerator (default: the host agent's accel setting)")
    p.add_argument("--host", help="pin to this host instead of placing")
    p.add_argument("--nic", action="append", type=nic_arg, metavar="NET[,model=M][,mac=X]",
                   help="a NIC on fleet network NET (repeatable); model default virtio-net-pci, "
                        "MAC generated and kept unless given")
    p.add_argument("--data-disk", action="append", type=disk_arg, metavar="KEY=V[,KEY=V]...",
                   help="a data disk (repeatable), e.g. size_gb=20 (an empty local disk, GiB), "
                        "backing=IMG[,size_gb=N] (a local qcow2 overlay) or image=IMG,storage=shared; "
                        "also format=qcow2|raw (default qcow2), bus=virtio-blk|virtio-scsi "
                        "(default virtio-blk), storage=local|shared (default local)")
    add_preference_flags(p)
    p.add_argument("--label", action="append", type=label_arg, dest="labels", metavar="KEY=VALUE",
                   help="a label (repeatable); migration policies select VMs by labels "
                   "(default: none)")
    p.add_argument("--migration-policy", metavar="NAME",
                   help="the VM's own migration policy, over any its labels select "
                   "(default: none; 'novacron migration policies' lists them)")
    p.add_argument("--json", action="store_true", help="print the VM as JSON")
    p.set_defaults(func=_create)

    p = cmds.add_parser("label", help="change a VM's labels or its migration policy",
                        description="Set (KEY=VALUE) or remove (KEY-) labels of a VM and/or set "
                        "its migration policy; later migrations use them.")
    p.add_argument("name", metavar="NAME", help="VM name")
    p.add_argument("labels", nargs="*", type=label_change, metavar="KEY=VALUE|KEY-",
                   help="labels to set (KEY=VALUE) or remove (KEY-)")
    p.add_argument("--migration-policy", metavar="NAME",
                   help="the VM's own migration policy; 'none' removes it (default: unchanged)")
    p.add_argument("--json", action="store_true", help="print the VM as JSON")
    p.set_defaults(func=lambda a: _run(a, _label))

    p = cmds.add_parser("import", help="record a VM a host already runs (an adopted libvirt domain)",
                        description="Record in the fleet a VM that a host's agent already runs, such as "
                        "a libvirt domain defined outside NovaCron and adopted on that agent "
                        "(POST /v1/vms/NAME/adopt there); migrate, drain and rebalance then move it.")
    p.add_argument("name", metavar="NAME", help="VM (domain) name")
    p.add_argument("--host", required=True, metavar="HOST", help="the host whose agent runs it")
    p.add_argument("--json", action="store_true", help="print the VM as JSON")
    p.set_defaults(func=lambda a: _run(a, _import))

    for action, text in (("show", "one VM with its agent's live status"),
                         ("start", "start a stopped VM"),
                         ("stop", "shut a VM down: ACPI power button, power-off after --timeout"),
                         ("reboot", "reboot a running VM: clean guest shutdown, then reset"),
                         ("delete", "stop and delete a VM (asks nothing)")):
        p = cmds.add_parser(action, help=text)
        p.add_argument("name", metavar="NAME", help="VM name")
        if action in ("stop", "reboot"):
            p.add_argument("--force", action="store_true",
                           help="stop: power off at once; reboot: reset at once "
                                "(default: off, the guest shuts down cleanly first)")
            p.add_argument("--timeout", type=float, metavar="S",
                           help="seconds the guest gets after the power button before it is "
                                "powered off or reset (default: the agent's stop_timeout_s, 60 s)")
        if action == "delete":
            p.add_argument("--force", action="store_true",
                           help="forget the VM even if its host is gone or its agent cannot "
                           "delete it (its QEMU may keep running there)")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=lambda a, fn=_HANDLERS[action]: _run(a, fn))


    p = cmds.add_parser("console", help="attach to a VM's serial console (leave with Ctrl-])",
                        description="Interactive serial console through the coordinator. Keys go "
                        "to the guest; Ctrl-] (as in telnet and virsh) leaves. Without a terminal, "
                        "stdin is sent as it comes and its end (or a Ctrl-] byte) leaves.")
    p.add_argument("name", metavar="NAME", help="VM name")
    p.add_argument("--history", type=int, default=2048, metavar="BYTES",
                   help="recent output to show first, in bytes (default: 2048; 0-65536)")
    p.set_defaults(func=lambda a: _run(a, _console))


ESCAPE = b"\x1d"  # Ctrl-]


async def _console(client: CoordinatorClient, args: argparse.Namespace) -> int:
    ws = await client.console(quote(args.name, safe=""), args.history)
    stdin = sys.stdin.buffer
    tty_mode = None
    if stdin.isatty():
        import termios
        import tty

        tty_mode = termios.tcgetattr(stdin.fileno())
        tty.setraw(stdin.fileno())  # every key goes to the guest, Ctrl-C included
    sys.stderr.write(f"Connected to the serial console of {args.name}. Escape character is ^] "
                     "(Ctrl-]): press it to leave.\r\n")
    sys.stderr.flush()
    loop = asyncio.get_running_loop()
    keys: asyncio.Queue[bytes] = asyncio.Queue()
    fd = stdin.fileno()
    loop.add_reader(fd, lambda: keys.put_nowait(os.read(fd, 1024)))
    how = "closed by the server (the VM stopped?)"
    try:
        async def typed() -> None:
            nonlocal how
            while True:
                data = await keys.get()
                if not data:
                    how = "left (end of input)"
                    return
                head, esc, _rest = data.partition(ESCAPE)
                if head:
                    await ws.send_bytes(head)
                if esc:
                    how = "left"
                    return

        async def shown() -> None:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    sys.stdout.buffer.write(msg.data)
                    sys.stdout.buffer.flush()

        pumps = [asyncio.create_task(typed()), asyncio.create_task(shown())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
    finally:
        loop.remove_reader(fd)
        if tty_mode is not None:
            import termios

            termios.tcsetattr(fd, termios.TCSADRAIN, tty_mode)
        await ws.close()
    sys.stderr.write(f"\r\nConsole of {args.name}: {how}.\r\n")
    return 0 if how.startswith("left") else 1


def nic_arg(text: str) -> dict[str, str]:
    """``prod,model=e1000,mac=52:54:00:00:00:01`` -> a spec NIC (the API checks the values)."""
    net, *opts = text.split(",")
    nic = {"net": net}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or key not in ("model", "mac") or key in nic:
            raise argparse.ArgumentTypeError(f"expected NET[,model=M][,mac=X], got {text!r}")
        nic[key] = value
    return nic


def label_arg(text: str) -> tuple[str, str]:
    """``tier=batch`` -> a label (the API checks names and values)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def label_change(text: str) -> tuple[str, str | None]:
    """``tier=batch`` sets a label, ``tier-`` removes it (value None)."""
    if text.endswith("-") and "=" not in text:
        return text[:-1], None
    return label_arg(text)


DISK_KEYS = ("size_gb", "image", "backing", "format", "bus", "storage")


def disk_arg(text: str) -> dict[str, Any]:
    """``size_gb=20,bus=virtio-scsi`` -> a spec disk (the API checks the values)."""
    disk: dict[str, Any] = {}
    for opt in text.split(","):
        key, sep, value = opt.partition("=")
        if not sep or key not in DISK_KEYS or key in disk:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE pairs of {', '.join(DISK_KEYS)}, got {text!r}")
        if key == "size_gb":
            try:
                disk[key] = float(value) if "." in value else int(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"size_gb: expected a number of GiB, got {value!r}") from None
        else:
            disk[key] = value
    return disk


def boot_problem(args: argparse.Namespace) -> str | None:
    """Why the boot options are unusable (the API would refuse them less clearly), or None."""
    if args.kernel is None and args.disk is None:
        return "one of --kernel or --disk is required"
    if args.kernel is not None and args.disk is not None:
        return "--kernel and --disk exclude each other: boot a kernel or a disk image"
    if args.disk is not None and (args.initrd is not None or args.cmdline is not None):
        return "--initrd and --cmdline go with --kernel, not --disk"
    if args.kernel is not None and args.disk_format is not None:
        return "--disk-format goes with --disk, not --kernel"
    return None


def create_body(args: argparse.Namespace) -> dict[str, Any]:
    body = given(args, "name", "vcpus", "memory_mb", "kernel", "initrd", "cmdline", "disk",
                 "disk_format", "accel", "host")
    if getattr(args, "nic", None):
        body["nics"] = args.nic
    if getattr(args, "labels", None):
        body["labels"] = dict(args.labels)
    if getattr(args, "migration_policy", None):
        body["migration_policy"] = args.migration_policy
    if getattr(args, "data_disk", None):
        body["disks"] = args.data_disk
    placement = given(args, *PREFERENCES)
    if placement:
        body["placement"] = placement
    return body


def _create(args: argparse.Namespace) -> int:
    problem = boot_problem(args)
    if problem:
        print(f"novacron vm create: error: {problem}", file=sys.stderr)
        return 2
    return _run(args, _create_vm)


async def _create_vm(client: CoordinatorClient, args: argparse.Namespace) -> int:
    vm = await client.create_vm(create_body(args))
    if args.json:
        _dump(vm)
    else:
        print(f"{vm['name']} created on {vm['host']} ({vm['state']})")
    return 0


def vm_table(vm: dict[str, Any]) -> Table:
    spec = vm.get("spec", {})
    table = Table(title=f"VM {vm['name']}", title_justify="left", show_header=False)
    table.add_column("field")
    table.add_column("value")
    table.add_row("host", str(vm.get("host", "-")))
    table.add_row("state", str(vm.get("state", "-")))
    table.add_row("vcpus", str(spec.get("vcpus", "-")))
    memory = spec.get("memory_mb")
    table.add_row("memory", human_bytes(memory << 20) if isinstance(memory, int) else "-")
    boot = spec.get("kernel") or spec.get("disk") or "-"
    table.add_row("boots", str(boot))
    labels = vm.get("labels") or {}
    table.add_row("labels", ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-")
    table.add_row("migration policy", vm.get("migration_policy") or "- (its labels', else the default)")
    agent = vm.get("agent")
    if isinstance(agent, dict):
        for key in ("state", "pid", "accel"):
            if key in agent:
                table.add_row(f"agent {key}", str(agent[key]))
    elif vm.get("agent_error"):
        # the coordinator's words already say whether the agent was unreachable or refused
        table.add_row("agent", str(vm["agent_error"]))
    return table


async def _show(client: CoordinatorClient, args: argparse.Namespace) -> int:
    vm = await client.vm(quote(args.name, safe=""))
    if args.json:
        _dump(vm)
    else:
        Console().print(vm_table(vm))
    return 0


async def _lifecycle(client: CoordinatorClient, args: argparse.Namespace, action: str) -> int:
    query = ""
    if action in ("stop", "reboot"):
        query = f"?force={'true' if args.force else 'false'}"
        if args.timeout is not None:
            query += f"&timeout_s={args.timeout!r}"
        # the agent waits for the guest (its own stop_timeout_s when no --timeout, at most 3600 s)
        wait = args.timeout if args.timeout is not None and math.isfinite(args.timeout) else 3600.0
        client.timeout_s = max(client.timeout_s, min(wait, 3600.0) + 60.0)
    vm = dict(await client.request("POST", f"/vms/{quote(args.name, safe='')}/{action}{query}"))
    if args.json:
        _dump(vm)
        return 0
    outcome = vm.get("outcome")
    how = ""
    if isinstance(outcome, dict):
        how = f" ({outcome.get('reason', '')}, {outcome.get('seconds', 0):.1f} s)"
    print(f"{vm['name']} on {vm['host']}: {vm['state']}{how}")
    return 0


async def _start(client: CoordinatorClient, args: argparse.Namespace) -> int:
    return await _lifecycle(client, args, "start")


async def _stop(client: CoordinatorClient, args: argparse.Namespace) -> int:
    return await _lifecycle(client, args, "stop")


async def _reboot(client: CoordinatorClient, args: argparse.Namespace) -> int:
    return await _lifecycle(client, args, "reboot")


async def _delete(client: CoordinatorClient, args: argparse.Namespace) -> int:
    doc = await client.delete_vm(quote(args.name, safe=""), force=args.force)
    if args.json:
        _dump(doc)
    else:
        print(f"{doc['deleted']} deleted")
    return 0


async def _import(client: CoordinatorClient, args: argparse.Namespace) -> int:
    vm = await client.request("POST", f"/vms/{quote(args.name, safe='')}/import", {"host": args.host})
    if args.json:
        _dump(vm)
    else:
        print(f"{vm['name']}: recorded on {vm['host']} ({vm['state']})")
    return 0


async def _label(client: CoordinatorClient, args: argparse.Namespace) -> int:
    if not args.labels and args.migration_policy is None:
        print("novacron vm label: error: give labels (KEY=VALUE, KEY-) or --migration-policy",
              file=sys.stderr)
        return 2
    body: dict[str, Any] = {}
    if args.labels:
        vm = await client.vm(quote(args.name, safe=""))
        labels = dict(vm.get("labels") or {})
        for key, value in args.labels:
            if value is None:
                labels.pop(key, None)
            else:
                labels[key] = value
        body["labels"] = labels
    if args.migration_policy is not None:
        body["migration_policy"] = None if args.migration_policy == "none" else args.migration_policy
    vm = await client.request("PUT", f"/vms/{quote(args.name, safe='')}/labels", body)
    if args.json:
        _dump(vm)
    else:
        shown = ", ".join(f"{k}={v}" for k, v in sorted((vm.get("labels") or {}).items()))
        print(f"{vm['name']}: labels {shown or 'none'}; migration policy "
              f"{vm.get('migration_policy') or 'none'}")
    return 0


_HANDLERS = {"show": _show, "start": _start, "stop": _stop, "reboot": _reboot, "delete": _delete}
