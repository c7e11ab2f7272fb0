"""VM spec validation: every bad field is named; good specs come through intact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from novacron.agent.vm.spec import SpecError, parse_spec


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
