"""The test guest: a Debian kernel plus a busybox initramfs running our workload.

``ensure_guest()`` returns a :class:`GuestImage` (kernel, initrd, cmdline),
building and caching it on first use; ``python -m novacron.agent.guest build``
does the same from the shell and prints the paths.
"""

from novacron.agent.guest.build import (
    MIN_MEMORY_MB,
    GuestBuildError,
    GuestImage,
    cache_root,
    ensure_guest,
)

__all__ = ["MIN_MEMORY_MB", "GuestBuildError", "GuestImage", "cache_root", "ensure_guest"]
