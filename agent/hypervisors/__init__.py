"""Hypervisor drivers beside the agent's own QEMU runtime (``novacron.agent.vm``).

``libvirt``: domains of a libvirt daemon (``hypervisor = "libvirt"`` in the agent
config). The ``libvirt`` Python binding is imported lazily, so an agent that
drives QEMU itself runs without it.
"""
