"""VM spec validation: every bad field is named; good specs come through intact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from novacron.agent.vm.spec import SpecError, VMSpec, parse_spec


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    kernel, initrd, disk = tmp_path / "vmlinuz", tmp_path / "initrd", tmp_path / "disk.qcow2"
    for f in (kernel, initrd, disk):
        f.write_bytes(b"x")
    return {"kernel": str(kernel), "initrd": str(initrd), "disk": str(disk)}


def base(files: dict[str, str], **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": "vm-1", "vcpus": 2, "memory_mb": 256, "kernel": files["kernel"],
                           "initrd": files["initrd"], "cmdline": "console=ttyS0"}  # fmt: skip
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not None}


def test_kernel_spec_ok(files: dict[str, str]) -> None:
    spec = parse_spec(base(files, accel="tcg", start=False))
    assert (spec.name, spec.vcpus, spec.memory_mb, spec.accel) == ("vm-1", 2, 256, "tcg")
    assert spec.kernel == files["kernel"] and spec.initrd == files["initrd"] and spec.disk == ""


def test_image_names_are_kept_as_given(files: dict[str, str]) -> None:
    # which file a name means is decided by the agent's image dirs (test_images.py)
    spec = parse_spec(base(files, kernel="guest/vmlinuz", initrd="/no/such/initrd"))
    assert (spec.kernel, spec.initrd) == ("guest/vmlinuz", "/no/such/initrd")


def test_disk_spec_infers_format(files: dict[str, str]) -> None:
    spec = parse_spec({"name": "d", "vcpus": 1, "memory_mb": 64, "disk": files["disk"]})
    assert spec.disk_format == "qcow2" and spec.accel == "auto" and spec.kernel == ""


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"name": "has space"}, "name"),
        ({"name": "-leading"}, "name"),
        ({"name": "x" * 64}, "name"),
        ({"name": "../etc"}, "name"),
        ({"name": 5}, "name"),
        ({"vcpus": 0}, "vcpus"),
        ({"vcpus": 65}, "vcpus"),
        ({"vcpus": "2"}, "vcpus"),
        ({"vcpus": True}, "vcpus"),
        ({"vcpus": None}, "vcpus"),
        ({"memory_mb": 8}, "memory_mb"),
        ({"memory_mb": 2.5}, "memory_mb"),
        ({"accel": "xen"}, "accel"),
        ({"kernel": "../vmlinuz"}, "kernel"),
        ({"kernel": "/srv/images/../../etc/shadow"}, "kernel"),
        ({"kernel": "a,b"}, "kernel"),
        ({"kernel": "x" * 1025}, "kernel"),
        ({"kernel": None}, "kernel"),
        ({"initrd": "boot/../../initrd"}, "initrd"),
        ({"cmdline": "a\nb"}, "cmdline"),
        ({"cmdline": 7}, "cmdline"),
        ({"start": "yes"}, "start"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_field_is_named(files: dict[str, str], over: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(base(files, **over))
    assert str(err.value).startswith(f"{field}:"), err.value


def test_disk_and_kernel_are_exclusive(files: dict[str, str]) -> None:
    with pytest.raises(SpecError, match="either a disk or kernel"):
        parse_spec(base(files, disk=files["disk"]))


def test_disk_format_checked(files: dict[str, str]) -> None:
    with pytest.raises(SpecError, match="disk_format"):
        parse_spec({"name": "d", "vcpus": 1, "memory_mb": 64, "disk": files["disk"], "disk_format": "vmdk"})


@pytest.mark.parametrize(("disk", "fmt"), [("disk.qcow2", "raw"), ("disk.img", "qcow2"), ("disk", "qcow2")])
def test_disk_format_follows_the_name(disk: str, fmt: str) -> None:
    # a file one VM writes raw (a forged qcow2 header included) is never opened as qcow2
    # by another, whose QEMU would follow the backing file that header names
    with pytest.raises(SpecError, match="does not match the image name"):
        parse_spec({"name": "d", "vcpus": 1, "memory_mb": 64, "disk": disk, "disk_format": fmt})
    expected = "qcow2" if disk.endswith(".qcow2") else "raw"
    assert parse_spec({"name": "d", "vcpus": 1, "memory_mb": 64, "disk": disk}).disk_format == expected


@pytest.mark.parametrize("doc", [None, [], "spec", 3])
def test_not_an_object(doc: Any) -> None:
    with pytest.raises(SpecError, match="JSON object"):
        parse_spec(doc)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.sampled_from(["name", "vcpus", "memory_mb", "kernel", "initrd", "cmdline", "disk", "accel", "start"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(FIELDS | st.text(max_size=8), JSON, max_size=8))
def test_any_json_gives_a_spec_or_a_named_error(doc: dict[str, Any]) -> None:
    try:
        spec = parse_spec(doc)
    except SpecError as exc:
        named = [*doc, "name", "vcpus", "memory_mb", "kernel", "disk", "spec", "kernel/initrd/disk"]
        assert any(str(exc).startswith(f"{k}: ") for k in named), exc
    else:
        assert spec.name == doc["name"]


# ----- NICs -------------------------------------------------------------------------
def test_nic_defaults_and_generated_mac_is_local_unicast(files: dict[str, str]) -> None:
    spec = parse_spec(base(files, nics=[{"net": "prod"}, {"net": "dev", "model": "e1000"}]))
    (a, b) = spec.nics
    assert (a.net, a.model, b.model) == ("prod", "virtio-net-pci", "e1000")
    for mac in (a.mac, b.mac):
        first = int(mac[:2], 16)
        assert first & 0x02 and not first & 0x01  # locally administered, unicast
    assert a.mac != b.mac and spec.networks == ("prod", "dev")


def test_mac_survives_the_record_and_the_migration(files: dict[str, str]) -> None:
    # the record (to_dict) and the migration (the dict re-parsed at the destination) keep it
    spec = parse_spec(base(files, nics=[{"net": "prod"}]))
    assert VMSpec.from_record(spec.to_dict()) == spec
    again = parse_spec({k: v for k, v in spec.to_dict().items() if v not in ("", None)})
    assert again.nics == spec.nics


def test_given_mac_is_kept_lowercased(files: dict[str, str]) -> None:
    spec = parse_spec(base(files, nics=[{"net": "prod", "mac": "52:54:00:AB:cd:01"}]))
    assert spec.nics[0].mac == "52:54:00:ab:cd:01"


@pytest.mark.parametrize("nics, field, problem", [
    ({"net": "prod"}, "nics", "expected a list"),
    (["prod"], "nics[0]", "expected an object"),
    ([{}], "nics[0].net", "network name"),
    ([{"net": "Prod"}], "nics[0].net", "network name"),
    ([{"net": "br-prod/../x"}], "nics[0].net", "network name"),
    ([{"net": "a" * 40}], "nics[0].net", "network name"),
    ([{"net": "prod", "model": "ne2k_pci"}], "nics[0].model", "expected one of"),
    ([{"net": "prod", "mac": "52:54:00:12:34"}], "nics[0].mac", "six hex octets"),
    ([{"net": "prod", "mac": "52:54:00:12:34:5g"}], "nics[0].mac", "six hex octets"),
    ([{"net": "prod", "mac": "01:00:5e:00:00:01"}], "nics[0].mac", "multicast"),
    ([{"net": "prod", "mac": "00:00:00:00:00:00"}], "nics[0].mac", "all-zero"),
    ([{"net": "prod", "mac": 5}], "nics[0].mac", "six hex octets"),
    ([{"net": "prod", "vlan": 5}], "nics[0].vlan", "unknown field"),
    ([{"net": "prod", "mac": "52:54:00:00:00:01"}, {"net": "dev", "mac": "52:54:00:00:00:01"}],
     "nics[1].mac", "used by another NIC"),
    ([{"net": "prod"}] * 9, "nics", "at most 8"),
])  # fmt: skip
def test_bad_nics_are_named(files: dict[str, str], nics: Any, field: str, problem: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(base(files, nics=nics))
    assert str(err.value).startswith(f"{field}:") and problem in str(err.value)
