"""The per-host agent: runs VMs under QEMU and live-migrates them."""
