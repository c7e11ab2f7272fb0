"""Real libvirt daemons for tests: see ``novacron.bench._libvirtd`` (the benchmark
``novacron bench migrate --hypervisor libvirt`` starts the same ones)."""

from novacron.bench._libvirtd import LIBVIRTD, NOBODY, LibvirtDaemon, SharedDir, have_libvirtd

__all__ = ["LIBVIRTD", "NOBODY", "LibvirtDaemon", "SharedDir", "have_libvirtd"]
