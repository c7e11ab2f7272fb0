"""How QEMU is confined: its seccomp sandbox and the unprivileged user it runs as.

Every QEMU runs with ``-sandbox on,obsolete=deny,elevateprivileges=deny,
spawn=deny,resourcecontrol=deny`` (seccomp: no exec, no set*uid, no
scheduler/affinity games). When the agent runs as root, QEMU runs as
``qemu_user`` (default ``novacron-qemu`` when that user exists).

The drop happens in the agent (``subprocess.Popen(user=, group=,
extra_groups=)``) before QEMU is exec'd, not with QEMU's ``-runas``: on QEMU
7.2 ``-runas`` calls setgid/setuid *after* the sandbox is installed, and
``elevateprivileges=deny`` then kills QEMU with SIGSYS ("Bad system call",
checked by hand). The agent therefore never lets QEMU open a path it chose
for itself as root: images arrive as descriptors (``images.py``), and the VM
folder, its RAM file and the migration sockets are shared with the QEMU group.

What this does and does not isolate: all QEMUs share one uid, so file modes
cannot keep one VM's QEMU from another VM's files (RAM files must be
writable by QEMU, and a same-uid process can even reach another's open
descriptors through /proc). The real barrier is that a QEMU is only ever
told about validated images (never a caller's path) and cannot spawn or
escalate; the unprivileged user keeps a compromised QEMU away from the
host's own files (/etc/shadow, the agent's config and secrets: 0600 root).
Serial logs are the agent's (root, 0600) and reach QEMU only as a
descriptor, so a QEMU cannot open another VM's console log by path.
"""

from __future__ import annotations

import logging
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from novacron.agent.safefs import share_path

log = logging.getLogger("novacron.agent.vm")

SANDBOX_ARGS = ("-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
DEFAULT_QEMU_USER = "novacron-qemu"
AGENT_USER = "root"  # qemu_user = "root": keep QEMU as the agent's user (not recommended)


class QemuUserError(ValueError):
    pass


@dataclass(frozen=True)
class QemuIdentity:
    """Who QEMU runs as: ``uid`` None means the agent's own user (no drop)."""

    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()
    name: str = ""

    @property
    def drops(self) -> bool:
        return self.uid is not None

    def can_read(self, st: os.stat_result) -> bool:
        """Whether QEMU may open a file with this inode's owner and mode."""
        if self.uid is None or self.uid == 0:
            return True
        if st.st_uid == self.uid:
            return bool(st.st_mode & stat.S_IRUSR)
        if st.st_gid == self.gid or st.st_gid in self.groups:
            return bool(st.st_mode & stat.S_IRGRP)
        return bool(st.st_mode & stat.S_IROTH)

    def share_dir(self, folder: Path) -> None:
        """A VM folder QEMU creates its sockets in: root:<qemu group> 0770."""
        if self.drops:
            os.chown(folder, -1, self.gid if self.gid is not None else -1)
            os.chmod(folder, 0o770)
        else:
            os.chmod(folder, 0o700)

    def share_file(self, path: Path) -> None:
        """A file or socket QEMU opens by name in its folder: root:<qemu group> 0660.
        Never through a symlink: QEMU can write the folder (``safefs``)."""
        share_path(path, self.gid if self.drops else None, 0o660 if self.drops else 0o600)

    def share_fd(self, fd: int) -> None:
        """share_file for a file the agent holds open (the RAM file): no name to swap."""
        if self.drops:
            os.fchown(fd, -1, self.gid if self.gid is not None else -1)
            os.fchmod(fd, 0o660)
        else:
            os.fchmod(fd, 0o600)


def qemu_identity(qemu_user: str) -> QemuIdentity:
    """The identity for the ``qemu_user`` setting ("" = the default user if it exists).

    Only root can drop to another user; an agent running unprivileged runs
    QEMU as itself. QemuUserError names a configured user that does not exist.
    """
    if os.geteuid() != 0:
        if qemu_user and qemu_user != pwd.getpwuid(os.geteuid()).pw_name:
            log.warning("qemu_user ignored: the agent is not root, QEMU runs as the agent's user",
                        extra={"qemu_user": qemu_user})
        return QemuIdentity()
    name = qemu_user or DEFAULT_QEMU_USER
    if name == AGENT_USER:
        log.warning("QEMU runs as root (qemu_user = root)")
        return QemuIdentity()
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if qemu_user:
            raise QemuUserError(f"no such user {qemu_user!r}") from None
        log.warning("QEMU runs as root: create the user novacron-qemu or set qemu_user",
                    extra={"qemu_user": DEFAULT_QEMU_USER})
        return QemuIdentity()
    if entry.pw_uid == 0:
        raise QemuUserError(f"{name!r} has uid 0; QEMU needs an unprivileged user")
    groups = tuple(g for g in os.getgrouplist(name, entry.pw_gid) if g != 0)
    return QemuIdentity(entry.pw_uid, entry.pw_gid, groups, name)


