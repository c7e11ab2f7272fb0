"""Images are not paths: what a VM spec may name, checked without QEMU.

The attack chain through a real agent (every path field against host files,
the agent's own files and another VM's RAM file and serial log) is in
test_images_api.py.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from novacron import config
from novacron.agent.config import AgentConfig, ImagesConfig
from novacron.agent.main import check_images
from novacron.agent.vm.images import ImageDirs, check_image_dirs
from novacron.agent.vm.sandbox import QemuIdentity
from novacron.agent.vm.spec import SpecError, VMSpec


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    (d / "guest").mkdir(parents=True)
    (d / "guest" / "vmlinuz").write_bytes(b"kernel")
    (d / "disk.raw").write_bytes(b"\0" * 4096)
    return d


def refused(dirs: ImageDirs, key: str, ref: str) -> str:
    with pytest.raises(SpecError) as err:
        dirs.resolve(key, ref)
    assert str(err.value).startswith(f"{key}: "), err.value
    return str(err.value)


def test_names_resolve_inside_the_image_dirs(images: Path, tmp_path: Path) -> None:
    second = tmp_path / "more"
    second.mkdir()
    (second / "initrd.img").write_bytes(b"initrd")
    dirs = ImageDirs.of([images, second])
    assert dirs.resolve("kernel", "guest/vmlinuz") == images / "guest" / "vmlinuz"
    assert dirs.resolve("initrd", "initrd.img") == second / "initrd.img"  # found in a later dir
    assert dirs.resolve("kernel", str(images / "guest" / "vmlinuz")) == images / "guest" / "vmlinuz"
    (images / "latest").symlink_to("guest/vmlinuz")  # a symlink that stays inside is fine
    assert dirs.resolve("kernel", "latest") == images / "guest" / "vmlinuz"


def test_everything_else_is_refused(images: Path, tmp_path: Path) -> None:
    dirs = ImageDirs.of([images])
    outside = tmp_path / "secret.toml"
    outside.write_text('token = "s3cret-s3cret-s3cret"\n')
    (images / "escape").symlink_to(outside)
    (images / "etc").symlink_to("/etc")
    os.mkfifo(images / "fifo")
    for ref in ("/etc/shadow", "/proc/self/environ", "/dev/zero", str(outside), "/etc/hostname"):
        assert "is not a file inside an image directory" in refused(dirs, "kernel", ref)
    assert "'..' is not allowed" in refused(dirs, "initrd", "../secret.toml")
    assert "'..' is not allowed" in refused(dirs, "initrd", "guest/../../secret.toml")
    assert "no image 'escape'" in refused(dirs, "disk", "escape")  # the symlink leads out
    assert "no image 'etc/shadow'" in refused(dirs, "disk", "etc/shadow")
    assert "not a regular file" in refused(dirs, "kernel", "fifo")  # and it did not block
    assert "not a regular file" in refused(dirs, "kernel", "guest")
    assert "no image 'missing'" in refused(dirs, "kernel", "missing")
    assert "no image directories" in refused(ImageDirs.of([]), "kernel", "guest/vmlinuz")


def test_open_hands_out_the_checked_file_only(images: Path) -> None:
    dirs = ImageDirs.of([images])
    spec = VMSpec("v", 1, 64, disk="disk.raw", disk_format="raw")
    opened = dirs.open(spec)
    try:
        assert opened.disk_rw is not None and opened.disk_ro is not None and opened.kernel is None
        assert os.readlink(f"/proc/self/fd/{opened.disk_rw}") == str(images / "disk.raw")
        assert os.get_blocking(opened.disk_rw)
        assert os.fstat(opened.disk_ro).st_ino == os.fstat(opened.disk_rw).st_ino
    finally:
        opened.close()
    assert opened.fds == ()
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(SpecError, match=r"^initrd: "):
        dirs.open(VMSpec("v", 1, 64, kernel="guest/vmlinuz", initrd="/etc/shadow"))
    assert len(os.listdir("/proc/self/fd")) == before  # the kernel opened first was closed again


def test_qcow2_naming_other_files_is_refused(images: Path) -> None:
    dirs = ImageDirs.of([images])
    header = bytearray(104)
    header[0:4] = b"QFI\xfb"
    header[4:8] = (3).to_bytes(4, "big")
    (images / "plain.qcow2").write_bytes(bytes(header))
    dirs.check(VMSpec("v", 1, 64, disk="plain.qcow2", disk_format="qcow2"))
    backed = bytearray(header)
    backed[8:16] = (104).to_bytes(8, "big")  # backing file name at offset 104
    (images / "backed.qcow2").write_bytes(bytes(backed) + b"/etc/shadow")
    with pytest.raises(SpecError, match=r"^disk: qcow2 image 'backed\.qcow2' refers to another file"):
        dirs.check(VMSpec("v", 1, 64, disk="backed.qcow2", disk_format="qcow2"))
    external = bytearray(header)
    external[72:80] = (4).to_bytes(8, "big")  # incompatible feature: external data file
    (images / "external.qcow2").write_bytes(bytes(external))
    with pytest.raises(SpecError, match="refers to another file"):
        dirs.check(VMSpec("v", 1, 64, disk="external.qcow2", disk_format="qcow2"))
    with pytest.raises(SpecError, match="is not a qcow2 file"):
        dirs.check(VMSpec("v", 1, 64, disk="disk.raw", disk_format="qcow2"))


def test_images_unreadable_by_the_qemu_user_are_refused(images: Path) -> None:
    kernel = images / "guest" / "vmlinuz"
    os.chmod(kernel, 0o600)
    st = kernel.stat()
    nobody = QemuIdentity(uid=st.st_uid + 4242, gid=st.st_gid + 4242, groups=(), name="q")
    assert "not readable by the QEMU user" in refused(ImageDirs.of([images], nobody), "kernel", "guest/vmlinuz")
    os.chmod(kernel, 0o640)
    in_group = QemuIdentity(uid=st.st_uid + 4242, gid=st.st_gid + 4242, groups=(st.st_gid,), name="q")
    assert ImageDirs.of([images], in_group).resolve("kernel", "guest/vmlinuz") == kernel
    os.chmod(kernel, 0o644)
    assert ImageDirs.of([images], nobody).resolve("kernel", "guest/vmlinuz") == kernel
    assert QemuIdentity().can_read(os.stat_result((stat.S_IFREG, 0, 0, 1, 0, 0, 0, 0, 0, 0)))


def test_listing(images: Path, tmp_path: Path) -> None:
    (images / "escape").symlink_to(tmp_path)
    os.mkfifo(images / "fifo")
    listed = ImageDirs.of([images]).listing()
    assert [(i["name"], i["size"]) for i in listed] == [("disk.raw", 4096), ("guest/vmlinuz", 6)]
    assert {i["dir"] for i in listed} == {str(images)}


def test_image_dirs_must_not_overlap_the_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert check_image_dirs([state / "images"], state) == ""
    assert check_image_dirs([tmp_path / "elsewhere"], state) == ""
    assert "must not contain the state dir" in check_image_dirs([state], state)
    assert "must not contain the state dir" in check_image_dirs([tmp_path], state)
    assert "must be under" in check_image_dirs([state / "vms"], state)
    assert "absolute" in check_image_dirs([Path("images")], state)
    for system in ("/etc", "/etc/novacron", "/proc/self", "/dev"):
        assert "system folder" in check_image_dirs([Path(system)], state), system
    assert "must not contain the state dir" in check_image_dirs([Path("/")], state)
    assert "must not contain /root" in check_image_dirs([Path("/root")], state)
    assert "must not contain /var/lib" in check_image_dirs([Path("/var")], state)
    assert check_image_dirs([Path("/var/lib/novacron/images")], state) == ""


def test_agent_config_checks_image_dirs_and_qemu_user(tmp_path: Path) -> None:
    state = tmp_path / "state"
    check_images(AgentConfig(state_dir=state))  # the default <state_dir>/images
    with pytest.raises(config.Invalid, match="must not contain the state dir") as err:
        check_images(AgentConfig(state_dir=state, images=ImagesConfig(dirs=[tmp_path])))
    assert err.value.key == "images.dirs"
    with pytest.raises(config.Invalid, match="not a directory"):
        check_images(AgentConfig(state_dir=state, images=ImagesConfig(dirs=[tmp_path / "nope"])))
    with pytest.raises(config.Invalid, match="no such user") as err:
        check_images(AgentConfig(state_dir=state, qemu_user=f"nc-no-such-{os.getpid()}"))
    assert err.value.key == "qemu_user"


def test_image_dirs_from_toml_and_environment(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    toml = tmp_path / "agent.toml"
    toml.write_text(f'token = "{"t" * 16}"\n[images]\ndirs = ["{a}", "{b}"]\n')
    cfg = config.load(AgentConfig, path=toml, env_prefix="NOVACRON_AGENT", environ={})
    assert cfg.image_dirs() == [a, b]
    cfg = config.load(AgentConfig, env_prefix="NOVACRON_AGENT", environ={"NOVACRON_AGENT_IMAGES_DIRS": f"{b}"})
    assert cfg.image_dirs() == [b]
    assert AgentConfig(state_dir=tmp_path).image_dirs() == [tmp_path / "images"]
