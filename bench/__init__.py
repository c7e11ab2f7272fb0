"""Benchmarks, one module each, run by ``novacron bench NAME``.

Every benchmark measures a reference in the same run (memcpy, QEMU's own
migration, best-fit placement, one process per call ...) and reports ratios
beside absolute figures, so results are comparable across machines.
"""
