"""``novacron demo``: a coordinator, two agents and a real guest, live-migrated.

Everything runs on loopback under one temporary directory, which is removed at
the end, also after an error or Ctrl-C (every process started here is stopped,
QEMUs included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

HB_RE = re.compile(r"NOVACRON-HB boot=(\w+) seq=(\d+) uptime=([\d.]+) ok=(\d)")
BOOT_TIMEOUT_S = 240.0  # TCG boots the guest in ~15 s on an idle machine; CI may be busy
MIGRATE_TIMEOUT_S = 600.0


class DemoError(Exception):
    pass


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a coordinator and two agents locally and live-migrate "
                       "a real guest between them",
                       description="Starts a coordinator and two agents on loopback, boots the "
                       "test guest on one, live-migrates it to the other through the "
                       "coordinator with a progress bar, prints the metrics and checks the "
                       "guest kept running. Cleans up after itself, also on Ctrl-C.")
    p.add_argument("--memory-mb", type=int, default=256, help="guest RAM (256)")
    p.add_argument("--workload-mb", type=int, default=64,
                   help="guest working set the workload dirties and verifies (64)")
    p.add_argument("--rate-mb", type=int, default=8, help="MB/s the guest dirties (8)")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    p.add_argument("--bandwidth-mbps", type=float, help="cap the migration's page data at this many MB/s")
    p.add_argument("--keep", action="store_true", help="keep the work directory (for debugging)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="novacron-demo-"))
    console.print(f"[dim]work directory: {workdir}[/dim]")
    try:
        asyncio.run(run_demo(args, workdir, console))
        return 0
    except DemoError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: everything the demo started has been stopped[/yellow]")
        return 130
    except Exception as exc:  # e.g. the guest build failed: one clear line, after clean-up
        console.print(f"[red]demo failed:[/red] {type(exc).__name__}: {exc}")
        return 1
    finally:
        if args.keep:
            console.print(f"[dim]kept {workdir}[/dim]")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def heartbeats(text: str) -> list[tuple[str, int, float, int]]:
    return [(m[1], int(m[2]), float(m[3]), int(m[4])) for m in HB_RE.finditer(text)]


async def wait_heartbeat(serial_log: Path, timeout_s: float, *, boot: str | None = None,
                         after_seq: int = 0) -> tuple[str, int, float, int]:
    """The newest guest heartbeat line in ``serial_log`` (matching ``boot``, past ``after_seq``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        with contextlib.suppress(OSError):
            beats = [b for b in heartbeats(serial_log.read_text(errors="replace"))
                     if (boot is None or b[0] == boot) and b[1] > after_seq]
            if beats:
                return beats[-1]
        await asyncio.sleep(0.25)
    raise DemoError(f"no guest heartbeat in {serial_log} within {timeout_s:.0f} s")


async def run_demo(args: argparse.Namespace, workdir: Path, console: Console) -> None:
    from novacron.agent.guest import ensure_guest
    from novacron.agent.local import LocalAgent, LocalAgentError
    from novacron.cli.fleet import follow_migration, metrics_table
    from novacron.coordinator.client import ApiClientError, CoordinatorClient
    from novacron.coordinator.local import CoordinatorStartError, LocalCoordinator

    console.print("[bold]1.[/bold] test guest (kernel + busybox initramfs + workload)")
    guest = await asyncio.to_thread(ensure_guest)
    coord = LocalCoordinator(workdir / "coordinator",
                             settings={"heartbeat_interval_s": "1", "heartbeat_timeout_s": "10",
                                       "poll_interval_s": "0.2"})
    cluster_secret = secrets.token_urlsafe(32)
    # each agent's image dir is the guest's folder: specs name images, not host paths
    agents = [LocalAgent(name, cluster_secret=cluster_secret, state_dir=workdir / name,
                         accel=args.accel, image_dirs=[guest.kernel.parent]) for name in ("host-a", "host-b")]
    try:
        console.print("[bold]2.[/bold] coordinator and two agents on loopback")
        try:
            await coord.start()
            for agent in agents:
                agent.settings.update(coordinator_url=coord.url,
                                      coordinator_token=coord.agent_token)
            await asyncio.gather(*(a.start() for a in agents))
        except (CoordinatorStartError, LocalAgentError) as exc:
            raise DemoError(str(exc)) from None
        console.print(f"   coordinator {coord.url}")
        async with CoordinatorClient(coord.url, coord.admin_token) as client:
            await wait_registered(client, agents)
            for h in await client.hosts():
                console.print(f"   {h['name']}: {h['url']} · {h['cpus']} CPUs · "
                              f"accel {h.get('accel', {}).get('default', '?')} · {h['state']}")

            console.print("[bold]3.[/bold] boot the guest on host-a through the coordinator")
            spec: dict[str, Any] = {
                "name": "demo-vm", "vcpus": 1, "memory_mb": args.memory_mb,
                "kernel": guest.kernel.name, "initrd": guest.initrd.name,
                "cmdline": guest.workload_cmdline(mem_mb=args.workload_mb, rate_mb=args.rate_mb),
                "accel": args.accel, "host": "host-a",
            }
            try:
                vm = await client.create_vm(spec)
                status = (await client.vm("demo-vm")).get("agent") or {}
            except ApiClientError as exc:
                raise DemoError(f"creating the VM: {exc}") from None
            src_log = Path(status.get("serial_log", ""))
            console.print(f"   started on {vm['host']} (accel {status.get('accel', '?')}); "
                          "waiting for the guest's heartbeat …")
            t0 = time.monotonic()
            boot, seq, uptime, ok = await wait_heartbeat(src_log, BOOT_TIMEOUT_S)
            console.print(f"   guest up in {time.monotonic() - t0:.1f} s: boot={boot} "
                          f"heartbeat seq={seq} uptime={uptime:.1f}s ok={ok}")
            await asyncio.sleep(2)  # let it run (and dirty memory) a little before moving it
            boot, seq_before, uptime_before, _ = await wait_heartbeat(src_log, 10, boot=boot)

            console.print("[bold]4.[/bold] live-migrate demo-vm host-a → host-b")
            options: dict[str, Any] = {}
            if args.bandwidth_mbps:
                options["bandwidth_mbps"] = args.bandwidth_mbps
            try:
                mig = await client.migrate("demo-vm", "host-b", options)
                mig = await asyncio.wait_for(follow_migration(client, mig, console),
                                             MIGRATE_TIMEOUT_S)
            except ApiClientError as exc:
                raise DemoError(f"migration: {exc}") from None
            except TimeoutError:
                raise DemoError(f"migration did not finish in {MIGRATE_TIMEOUT_S:.0f} s") \
                    from None
            console.print(metrics_table(mig))
            if mig["phase"] != "completed":
                raise DemoError(f"migration ended {mig['phase']}: {mig.get('error')}")

            console.print("[bold]5.[/bold] the guest runs on host-b and its heartbeat continued")
            vm = await client.vm("demo-vm")
            dst_status = vm.get("agent") or {}
            if vm["host"] != "host-b" or dst_status.get("state") != "running":
                raise DemoError(f"after migration the coordinator says host={vm['host']}, "
                                f"agent state={dst_status.get('state')}")
            dst_log = Path(dst_status.get("serial_log", ""))
            boot2, seq2, uptime2, ok2 = await wait_heartbeat(dst_log, 60, boot=boot,
                                                             after_seq=seq_before)
            console.print(f"   same boot={boot2} (no reboot); heartbeat seq {seq_before} → {seq2}, "
                          f"uptime {uptime_before:.1f}s → {uptime2:.1f}s, memory check "
                          f"{'ok' if ok2 == 1 else '[red]FAILED[/red]'}")
            if ok2 != 1:
                raise DemoError("the guest's memory check failed after migration")
            await client.delete_vm("demo-vm")
        console.print("[bold green]demo complete[/bold green]")
    finally:
        await asyncio.gather(*(a.stop(remove=False) for a in agents), return_exceptions=True)
        coord.stop()


async def wait_registered(client: Any, agents: list[Any], timeout_s: float = 30.0) -> None:
    """Each agent registers with the coordinator itself (its coordinator_url setting)."""
    names = {a.name for a in agents}
    deadline = time.monotonic() + timeout_s
    while True:
        missing = names - {h["name"] for h in await client.hosts()}
        if not missing:
            return
        if time.monotonic() > deadline:
            raise DemoError(f"agent(s) {', '.join(sorted(missing))} did not register with the "
                            f"coordinator within {timeout_s:.0f} s")
        await asyncio.sleep(0.1)
