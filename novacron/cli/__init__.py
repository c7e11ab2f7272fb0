"""The ``novacron`` command line: one module per command group."""
