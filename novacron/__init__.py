"""NovaCron: live migration and placement of KVM virtual machines.

The distribution maps the repository's top-level folders onto this namespace:
``novacron.agent`` (per-host daemon), ``novacron.native`` (Cython transfer
kernels), ``novacron.coordinator`` (fleet service), ``novacron.bench`` and
``novacron.models``.
"""

__version__ = "0.1.0"
