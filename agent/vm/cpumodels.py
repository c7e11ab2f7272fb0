"""Which CPU models this host can run, and whether a VM's model is one of them.

QEMU answers for itself: ``query-cpu-definitions`` on a throw-away QEMU
(``-machine none``) under each accelerator lists every model with the features
this host (KVM) or QEMU's emulator (TCG) lacks for it; a model is runnable when
that list is empty. The answer is asked once per accelerator and kept (it only
changes with the host's CPU or QEMU). An operator may narrow it with the
``cpu_models`` allow-list (e.g. to the models the whole fleet shares).

``host`` (passthrough) exists under KVM only; a VM using it sees this host's
exact CPU, so it may only move to hosts with the same CPU: the agent reports a
signature of its CPU (vendor, family, model, stepping and the feature flags)
and the coordinator compares them.

Untested here (these machines' nested KVM does not boot guests): the probe under
``accel=kvm`` (QEMU then lists what the host CPU offers through KVM, ``host``
among them) and VMs running ``-cpu host``. The code paths are the TCG ones with
another accelerator name; what differs is only QEMU's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from pathlib import Path

from novacron.agent.vm.spec import CPU_MODEL_RE, HOST_CPU_MODEL, SpecError, VMSpec

log = logging.getLogger("novacron.agent.vm")

PROBE_TIMEOUT_S = 30.0


def cpu_signature(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """``vendor/family/model/stepping/<flags digest>`` of the first CPU: hosts with the same
    signature offer a ``host`` passthrough guest the same CPU."""
    fields: dict[str, str] = {}
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ""
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = " ".join(sorted(fields.get("flags", "").split()))
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return "/".join((fields.get("vendor_id", "?"), fields.get("cpu family", "?"),
                     fields.get("model", "?"), fields.get("stepping", "?"), digest))


async def probe_models(qemu: str, accel: str) -> frozenset[str]:
    """The CPU models QEMU can run here under ``accel`` (empty ``unavailable-features``)."""
    proc = await asyncio.create_subprocess_exec(
        qemu, "-machine", f"none,accel={accel}", "-nodefaults", "-no-user-config", "-display", "none",
        "-qmp", "stdio", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    script = b"".join(json.dumps({"execute": c}).encode() + b"\n"
                      for c in ("qmp_capabilities", "query-cpu-definitions", "quit"))
    try:
        out, err = await asyncio.wait_for(proc.communicate(script), PROBE_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise RuntimeError(f"{qemu} did not answer query-cpu-definitions within {PROBE_TIMEOUT_S:g} s") from None
    for line in out.splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict) and isinstance(doc.get("return"), list):
                return frozenset(str(c["name"]) for c in doc["return"]
                                 if isinstance(c, dict) and "name" in c and not c.get("unavailable-features"))
    detail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no answer"]
    raise RuntimeError(f"{qemu} -machine none,accel={accel}: {detail[0]}")


def check_allow_list(names: list[str]) -> str | None:
    """What is wrong with a ``cpu_models`` allow-list, or None."""
    for name in names:
        if not CPU_MODEL_RE.match(name):
            return f"{name!r} is not a CPU model name (letters, digits, '.', '_', '-')"
    return None


class CpuCatalog:
    """This host's runnable CPU models per accelerator, asked once and cached."""

    def __init__(self, qemu: str, allow: list[str] | None = None, host: str = "this host") -> None:
        self.qemu = qemu
        self.allow = frozenset(allow) if allow else None  # the operator's cpu_models allow-list
        self.host = host
        self.signature = cpu_signature()
        self._known: dict[str, frozenset[str] | None] = {}
        self._lock = asyncio.Lock()

    async def models(self, accel: str) -> frozenset[str] | None:
        """The models runnable under ``accel`` (after the allow-list); None when QEMU could not
        be asked (then nothing is refused here: QEMU itself refuses what it cannot run)."""
        async with self._lock:
            if accel not in self._known:
                found: frozenset[str] | None = None
                try:
                    found = probed = await probe_models(self.qemu, accel)
                    log.info("cpu models", extra={"accel": accel, "count": len(probed)})
                except (OSError, RuntimeError) as exc:
                    log.warning("cannot list CPU models", extra={"accel": accel, "error": str(exc)})
                self._known[accel] = found
            found = self._known[accel]
        if found is not None and self.allow is not None:
            found = found & self.allow
        return found

    async def check(self, spec: VMSpec, accel: str) -> None:
        """SpecError naming the model and this host when it cannot run the VM's CPU model."""
        model = spec.effective_cpu_model(accel)
        if model == HOST_CPU_MODEL and accel != "kvm":
            raise SpecError(f"cpu_model: 'host' passes the host's CPU through and needs KVM; "
                            f"{self.host} would run this VM under {accel}")
        runnable = await self.models(accel)
        if runnable is not None and model not in runnable:
            raise SpecError(f"cpu_model: host {self.host} cannot run CPU model {model!r} under {accel} "
                            f"(it runs {len(runnable)} models; see cpu_models in GET /v1/host)")
