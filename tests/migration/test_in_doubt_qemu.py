"""The lost-answer switchover with a real guest: the source engine runs here
(so the test can cut its channel right after 'go' reached the destination),
the destination is a real agent whose API settles the doubt. The guest must
end up running at the destination only, without a reboot."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import pytest

from novacron.agent.channel import ChannelClosed, connect
from novacron.agent.guest import cache_root
from novacron.agent.local import LocalAgent, local_grants
from novacron.agent.migration.doubt import HttpOutcomeProbe
from novacron.agent.migration.options import MigrationOptions
from novacron.agent.migration.qemu_port import source_vm
from novacron.agent.migration.source import SourceMigration
from novacron.agent.migration.status import MigrationStatus
from novacron.agent.vm.accel import AccelDetector
from novacron.agent.vm.images import ImageDirs
from novacron.agent.vm.manager import VMManager
from tests.migration.agents import Api
from tests.migration.qemu_helpers import guest_spec, heartbeats

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def test_answer_lost_after_go_commits_through_the_api(tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(32)
    async with LocalAgent("dst", cluster_secret=secret, accel="tcg") as dst:
        api = Api(dst)
        vms = VMManager(tmp_path / "src", AccelDetector(probe_kernels=[]), images=ImageDirs.of([cache_root()]))
        await vms.load()
        try:
            vm = await vms.create(guest_spec("doubt"))
            await vm.wait_serial(r"NOVACRON-HB .* ok=1", timeout=150)
            boot = heartbeats(vm.paths.serial_log.read_text())[-1][0]
            pid = vm.pid
            src = await source_vm(vms, "doubt")
            ch = await connect("127.0.0.1", dst.data_port, secret)
            grant = local_grants().issue(migration="m-doubt", vm="doubt", source="src",
                                         target=dst.name, url=dst.url, data_host="127.0.0.1",
                                         data_port=dst.data_port)
            await ch.send_ctrl({"op": "grant", "grant": grant})  # as a source agent does
            st = MigrationStatus(id="m-doubt", vm="doubt", role="source")  # the granted id
            send = ch.send_ctrl

            async def send_ctrl(msg: dict[str, Any], timeout: float = 60.0) -> None:
                await send(msg, timeout)
                if msg.get("op") == "go":
                    # the destination resumed the guest; now lose its answer
                    done = await api.wait_migration(st.id, timeout=60)
                    assert done["phase"] == "completed", done
                    ch.writer.transport.abort()
                    raise ChannelClosed("cut by the test after 'go'")

            ch.send_ctrl = send_ctrl  # type: ignore[method-assign]
            mig = SourceMigration(src, ch, st, MigrationOptions(in_doubt_timeout_s=30),
                                  probe=HttpOutcomeProbe(dst.url, grant, st.id, "doubt", scheme="Grant"))
            try:
                await mig.run()
            finally:
                await ch.close()
            assert st.phase == "completed", st.to_dict()
            assert "committed" in (st.resolution or "")
            # released here: QEMU gone, folder gone, VM forgotten
            assert pid is not None and not os.path.exists(f"/proc/{pid}")
            assert "doubt" not in vms.vms and not vm.paths.dir.exists()
            # running there, same boot, heartbeats carrying on
            assert (await api.ok("GET", "/v1/vms/doubt"))["state"] == "running"
            _, offset = await api.console("doubt")
            await api.wait_console("doubt", r"NOVACRON-HB .* ok=1", timeout=30, offset=offset)
            text, _ = await api.console("doubt")
            assert heartbeats(text)[-1][0] == boot
        finally:
            await vms.shutdown(stop_vms=True)
