"""Live migration: the source state machine (``source``), the receiving side
(``dest``), their protocol, options and live status, the manager that runs
them inside the agent (``manager``) and the QEMU adapter (``qemu_port``)."""
